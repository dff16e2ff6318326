"""Cancel, crash, timeout, restart, and a torch-free API process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ROOT, Server
from tests.factories import submit, wait_for

pytestmark = pytest.mark.slow


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def _workers(server: Server) -> list[int]:
    return [child.pid for child in psutil.Process(server.proc.pid).children(recursive=False)
            if "python" in child.name()]


def test_api_process_never_imports_torch(server: Server) -> None:
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    code = ("import sys; from app.main import create_app; import app.worker, app.client.cli; "
            "create_app(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cancel_running_job_kills_and_replaces_worker(
    client: httpx.Client, server: Server, programs: Path
) -> None:
    job_id = submit(client, programs / "slow.pt2", model_name="slow_cancel").json()["id"]
    running = wait_for(client, job_id, until={"running"}, phase="lower")
    response = client.post(f"/v1/lowerings/{job_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert _gone(running["worker_pid"]), "the cancelled job's worker is still alive"
    assert client.get(f"/v1/lowerings/{job_id}").json()["status"] == "cancelled"
    assert client.post(f"/v1/lowerings/{job_id}/cancel").status_code == 409
    assert client.get(f"/v1/lowerings/{job_id}/artifact").status_code == 409


def test_sigkilled_worker_fails_only_its_job(
    client: httpx.Client, server: Server, programs: Path
) -> None:
    job_id = submit(client, programs / "slow.pt2", model_name="slow_kill").json()["id"]
    running = wait_for(client, job_id, until={"running"}, phase="lower")
    os.kill(running["worker_pid"], signal.SIGKILL)
    job = wait_for(client, job_id, until={"failed"})
    assert job["error"]["code"] == "worker_crashed", job["error"]
    assert "replaced" in job["error"]["message"]
    # The pool replaced the worker: a new job still lowers.
    after = submit(client, programs / "linear.pt2", wait=600, model_name="after_kill")
    assert after.status_code == 200, after.text
    assert client.get("/healthz").status_code == 200


def test_unknown_pytree_type_names_the_module(client: httpx.Client, programs: Path) -> None:
    response = submit(client, programs / "custom_output.pt2", wait=300, model_name="custom")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_pytree_type"
    assert "tests.pytree_types" in error["message"]
    assert "LOWERING_PRELOAD_MODULES" in error["message"]


def test_timeout_then_restart_keeps_jobs_and_preloads(
    start_server: Callable[..., Server], programs: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = start_server(data_dir, workers=1, job_timeout_s=3)
    with first.client() as http:
        slow_id = submit(http, programs / "slow.pt2", model_name="slow_timeout").json()["id"]
        timed_out = wait_for(http, slow_id, timeout_s=120)
        assert timed_out["status"] == "failed"
        assert timed_out["error"]["code"] == "timeout", timed_out["error"]
        assert "LOWERING_JOB_TIMEOUT_S" in timed_out["error"]["message"]
    first.stop()

    second = start_server(data_dir, workers=1, preload_modules="tests.pytree_types")
    with second.client() as http:
        done = submit(http, programs / "custom_output.pt2", wait=600, model_name="custom")
        assert done.status_code == 200, done.text  # the preloaded module makes it loadable
        done_id = done.headers["x-lowering-id"]
    second.stop()

    third = start_server(data_dir, workers=1)
    with third.client() as http:
        job = http.get(f"/v1/lowerings/{done_id}").json()
        assert job["status"] == "succeeded"
        artifact = http.get(job["artifact"]["url"])
        assert artifact.status_code == 200 and artifact.content == done.content
        assert http.get(f"/v1/lowerings/{slow_id}").json()["error"]["code"] == "timeout"


def test_failure_inside_torch_is_a_failed_job(
    client: httpx.Client, server: Server, programs: Path
) -> None:
    response = submit(client, programs / "masked_mean.pt2", wait=600, model_name="masked")
    assert response.status_code == 422, response.text
    job = response.json()
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "lowering_failed", error
    assert error["detail"]["exception_type"] in error["message"]
    assert error["detail"]["exception_type"] in error["detail"]["log_tail"]
    assert client.get("/healthz").status_code == 200
