"""Keys end to end: `lowering-service keys create` on a data dir, then a real server with
LOWERING_AUTH=required on it answers only that key (and refuses to start without one)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Server

PEPPER = "e2e-pepper-0123456789abcdef"


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
    env.update({"LOWERING_DATA_DIR": str(data_dir), "LOWERING_AUTH_PEPPER": PEPPER,
                "PYTHONPATH": str(ROOT)})
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_keys_create_then_the_key_is_the_way_in(
        start_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = tmp_path_factory.mktemp("auth-data")
    settings = {"auth": "required", "auth_pepper": PEPPER, "prime_workers": "false"}
    keyless = start_server(data_dir, ready=False, **settings)
    assert keyless.proc.wait(timeout=60) == 1
    assert "no active API key" in keyless.log()
    made = _cli(data_dir, "keys", "create", "--tenant", "acme", "--scope", "read")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    server = start_server(data_dir, **settings)
    anonymous = httpx.get(f"{server.url}/v1/lowerings", timeout=10)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"]
    assert anonymous.json()["error"]["code"] == "unauthorized"
    keyed = httpx.get(f"{server.url}/v1/lowerings", timeout=10,
                      headers={"Authorization": f"Bearer {key}"})
    assert keyed.status_code == 200 and keyed.json()["items"] == []
    listed = _cli(data_dir, "keys", "list")
    assert "acme" in listed.stdout and key.split("_")[2] not in listed.stdout
