"""Retention on a real server: its own sweep thread removes a finished job's input, then
its unused archive and its log, and every surface says so (410s, the job, /v1/info,
/metrics); the service's stores hold nothing of it afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.factories import stored_artifacts, submit

pytestmark = pytest.mark.slow


def _until(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the sweep did not come"
        time.sleep(0.25)


def test_the_sweep_removes_input_then_archive_and_log_and_says_so(
        start_server: Callable[..., Server], programs: Path) -> None:
    server = start_server(workers=1, input_ttl_s=0, artifact_ttl_s=6, log_ttl_s=6,
                          retention_interval_s=0.5)
    with httpx.Client(base_url=server.url, timeout=600) as http:
        response = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        assert response.status_code == 200, response.text
        job_id = response.headers["x-lowering-id"]
        url = f"/v1/lowerings/{job_id}"
        input_file = server.data_dir / "uploads" / f"{job_id}.pt2"
        _until(lambda: not input_file.exists())  # at the first sweep after it ended
        assert http.get(f"{url}/artifact").status_code == 200  # still within its TTL
        assert http.get(f"{url}/log").status_code == 200

        _until(lambda: http.get(f"{url}/artifact").status_code == 410)
        error = http.get(f"{url}/artifact").json()["error"]
        assert error["code"] == "artifact_expired" and "LOWERING_ARTIFACT_TTL_S" in error["message"]
        _until(lambda: http.get(f"{url}/log").status_code == 410)
        job = http.get(url).json()
        assert job["artifact"]["expired_reason"] == "ttl" and job["log_expired_at"]
        assert stored_artifacts(server.data_dir) == []
        assert not (server.data_dir / "logs" / f"{job_id}.log").exists()
        usage = http.get("/v1/info").json()["usage"]
        assert usage["service"]["archives"] == {"count": 0, "bytes": 0}
        assert usage["service"]["inputs"] == {"count": 0, "bytes": 0}
        assert usage["tenant"]["stored_bytes"] == 0
        metrics = http.get("/metrics").text
        assert 'lowering_retention_removals_total{kind="archive_ttl"} 1.0' in metrics
        assert 'lowering_retention_removals_total{kind="input"} 1.0' in metrics
