"""The README's curl and lowerctl blocks, run as written against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server

pytestmark = pytest.mark.slow


def _block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker}.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert match, f"README has no {marker} block"
    return match.group(1)


def _run(script: str, server: Server, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Only the export line is the reader's to change; every other line runs as written.
    script = re.sub(r"^export LOWERING_URL=.*$", "", script, flags=re.M)
    env = {**os.environ, "LOWERING_URL": server.url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _check_archive(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        rel = {name.split("/", 1)[1] for name in archive.namelist()}
    assert {"models/model.json", "models/model-aoti.json"} <= rel


@pytest.mark.parametrize(("marker", "prints"), [("curl-examples", '"torch_version"'),
                                               ("lowerctl-examples", "model")])
def test_readme_examples(
    server: Server, programs: Path, tmp_path: Path, marker: str, prints: str
) -> None:
    shutil.copy(programs / "dynamic.pt2", tmp_path / "model.pt2")
    result = _run(_block(marker), server, tmp_path)
    assert result.returncode == 0, result.stderr
    _check_archive(tmp_path / "model-aoti.pt2")
    assert prints in result.stdout


def test_lowerctl_failed_job_exits_1(server: Server, programs: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LOWERING_URL": server.url}
    lowerctl = str(Path(sys.executable).parent / "lowerctl")
    result = subprocess.run([lowerctl, "submit", str(programs / "custom_output.pt2"),
                             "--model-name", "custom_cli", "--wait"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "unknown_pytree_type" in result.stderr
    assert "Traceback" not in result.stderr
    bad = subprocess.run([lowerctl, "status", "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "nope" in bad.stderr
    gone = subprocess.run([lowerctl, "--url", "http://127.0.0.1:9", "list"], env=env,
                          capture_output=True, text=True)
    assert gone.returncode == 3
