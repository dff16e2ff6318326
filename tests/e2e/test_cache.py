"""Result cache, coalescing, readiness, queue bound and per-job resources, end to end."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.factories import failed_job, stored_artifacts, submit, wait_for

pytestmark = pytest.mark.slow


def test_identical_request_is_a_cache_hit(
    client: httpx.Client, server: Server, linear: dict[str, Any], programs: Path
) -> None:
    stored = stored_artifacts(server.data_dir)
    again = submit(client, programs / "linear.pt2", wait=60, model_name="linear")
    assert again.status_code == 200, again.text
    assert again.content == linear["archive"]
    job = client.get(f"/v1/lowerings/{again.headers['x-lowering-id']}").json()
    assert job["id"] != linear["job"]["id"]
    assert job["cache_hit"] is True and job["attempts"] == 0 and job["worker_pid"] is None
    assert job["artifact"]["sha256"] == linear["job"]["artifact"]["sha256"]
    assert job["verification"] == linear["job"]["verification"]
    assert job["profile"] == linear["job"]["profile"] is not None
    assert stored_artifacts(server.data_dir) == stored  # no copy
    assert client.get(f"/v1/lowerings/{job['id']}/log").text == ""  # no worker touched it


def test_linear_job_reports_resources(linear: dict[str, Any]) -> None:
    resources = linear["job"]["resources"]
    assert resources["cpu_s"] > 0 and resources["children_cpu_s"] > 0  # g++ is a child
    assert resources["peak_rss_bytes"] > 100 * 1024 * 1024


def test_bypass_lowers_again(
    client: httpx.Client, linear: dict[str, Any], programs: Path
) -> None:
    response = client.post("/v1/lowerings", params={"wait": 600, "cache": "bypass"},
                           data={"model_name": "linear"},
                           files={"program": ("m.pt2", (programs / "linear.pt2").read_bytes())})
    assert response.status_code == 200, response.text
    job = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
    assert job["cache_hit"] is False and job["attempts"] == 1
    assert client.post("/v1/lowerings", params={"cache": "maybe"}).status_code == 422


def test_simultaneous_identical_submissions_compile_once(
    server: Server, programs: Path
) -> None:
    responses: list[httpx.Response] = []
    start = threading.Barrier(3)

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            start.wait()
            responses.append(submit(http, programs / "convnet.pt2", model_name="coalesce"))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in responses] == [202, 202, 202], [r.text for r in responses]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        jobs = [wait_for(http, r.json()["id"], timeout_s=300) for r in responses]
        logs = [http.get(f"/v1/lowerings/{job['id']}/log").text for job in jobs]
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    leaders = [job for job in jobs if job["coalesced_with"] is None]
    assert len(leaders) == 1
    # Exactly one worker ran: one job has attempts and a log, the others neither.
    assert sorted(job["attempts"] for job in jobs) == [0, 0, 1]
    assert sum("lowering job" in log for log in logs) == 1
    assert len({job["artifact"]["sha256"] for job in jobs}) == 1
    assert all(job["coalesced_with"] == leaders[0]["id"] for job in jobs if job is not leaders[0])


def test_failed_job_is_not_cached(client: httpx.Client, programs: Path) -> None:
    ids = []
    for _ in range(2):
        response = submit(client, programs / "custom_output.pt2", wait=300,
                          model_name="never_cached")
        ids.append(failed_job(response)["id"])
    jobs = [client.get(f"/v1/lowerings/{job_id}").json() for job_id in ids]
    assert [job["attempts"] for job in jobs] == [1, 1]
    assert not any(job["cache_hit"] for job in jobs)


def test_readiness_queue_bound_storage_full_and_cpu_limit(
    start_server: Callable[..., Server], programs: Path
) -> None:
    # The slow model spends ~4.7 CPU s in the sandboxed lowering itself (linear ~0.5 s, g++
    # not counted: each compiler has a budget of its own): over the cap.
    constrained = start_server(ready=False, workers=1, max_queued=1,
                               max_artifact_bytes=100_000, job_max_cpu_s=2)
    with constrained.client() as http:
        early = None
        while early is None:
            try:
                early = http.get("/readyz")
            except httpx.TransportError:
                continue
        assert early.status_code == 503 and early.json()["checks"]["workers"] == "starting"
        constrained.wait_ready()
        assert http.get("/v1/info").json()["executor"]["primed_s"] > 0

        # The archive cannot be written under the 100 kB cap: storage_full, nothing kept.
        full = failed_job(submit(http, programs / "linear.pt2", wait=600, model_name="too_big"))
        assert full["error"]["code"] == "storage_full", full["error"]
        assert stored_artifacts(constrained.data_dir) == []
        assert not list((constrained.data_dir / "scratch").glob(full["id"]))
        assert http.get(f"/v1/lowerings/{full['id']}/artifact").status_code == 409

        running = submit(http, programs / "slow.pt2", model_name="q1").json()["id"]
        wait_for(http, running, until={"running"})
        queued = submit(http, programs / "dynamic.pt2", model_name="q2")
        assert queued.status_code == 202, queued.text
        refused = submit(http, programs / "convnet.pt2", model_name="q3")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) > 0
        assert http.post(f"/v1/lowerings/{queued.json()['id']}/cancel").status_code == 200

        # A job that burns through its CPU allowance is stopped; only it fails.
        over = wait_for(http, running, until={"failed"}, timeout_s=300)
        assert over["error"]["code"] == "resource_limit", over["error"]
        assert "LOWERING_JOB_MAX_CPU_S" in over["error"]["message"]
        assert http.get("/readyz").status_code == 200
