"""What an operator's worst day does to the service: floods, stalls, restarts, leftovers."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.storage.files import LocalUploadStore
from tests.conftest import Server
from tests.factories import leftover_uploads, open_partial_upload, submit, wait_for

pytestmark = pytest.mark.slow


def test_queue_bound_holds_under_concurrent_submits(
    start_server: Callable[..., Server], programs: Path
) -> None:
    server = start_server(workers=1, max_queued=3)
    with server.client() as http:
        def one(i: int) -> httpx.Response:
            return submit(http, programs / "linear.pt2", model_name=f"flood{i}")

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(one, range(16)))
        accepted = [r for r in responses if r.status_code == 202]
        refused = [r for r in responses if r.status_code == 429]
        assert len(accepted) + len(refused) == 16, [r.text for r in responses]
        # At most max_queued waiting, plus the one a slot may already have claimed.
        assert 1 <= len(accepted) <= 3 + 1, len(accepted)
        assert all(r.headers.get("retry-after") for r in refused)
        for response in accepted:  # nothing more to learn from compiling them
            http.post(f"/v1/lowerings/{response.json()['id']}/cancel")


def test_stalled_upload_is_dropped_and_leftovers_cleared_at_start(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    staging = LocalUploadStore(data_dir / "uploads").staging_dir
    staging.mkdir(parents=True)
    crashed = staging / ".upload-left-by-a-crash.part"
    crashed.write_bytes(b"\0" * 4096)
    server = start_server(data_dir, workers=1, prime_workers=False, upload_stall_timeout_s=2)
    assert not crashed.exists(), "a partial upload from before the start is still there"
    with open_partial_upload(server.url, declared_bytes=100_000, sent_bytes=1000) as sock:
        sock.settimeout(20)
        started = time.monotonic()
        answer = sock.recv(65536).decode(errors="replace")
        waited = time.monotonic() - started
        while answer.count("{") > answer.count("}") or "\r\n\r\n{" not in answer:
            more = sock.recv(65536).decode(errors="replace")
            if not more:
                break
            answer += more
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert "upload_stalled" in answer and "LOWERING_UPLOAD_STALL_TIMEOUT_S" in answer
    assert waited < 15
    assert leftover_uploads(data_dir) == []


def test_graceful_stop_answers_held_waits_with_the_job(
    start_server: Callable[..., Server], programs: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, workers=1)
    held: dict[str, Any] = {}

    def hold() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as waiting:
            held["response"] = submit(waiting, programs / "slow.pt2", wait=300,
                                      model_name="held")

    thread = threading.Thread(target=hold)
    thread.start()
    with server.client() as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = http.get("/v1/lowerings").json()["items"]
            if items and items[0]["status"] == "running":
                break
            time.sleep(0.1)
        job_id = items[0]["id"]
    server.stop()
    thread.join(timeout=60)
    response = held["response"]
    assert response.status_code == 202, response.text
    assert response.json()["id"] == job_id
    assert response.headers["location"] == f"/v1/lowerings/{job_id}"

    again = start_server(data_dir, workers=1)
    with again.client() as http:
        done = wait_for(http, job_id, timeout_s=300)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_artifact_head_and_if_none_match_star(
    client: httpx.Client, linear: dict[str, Any]
) -> None:
    url = linear["job"]["artifact"]["url"]
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(linear["archive"])
    assert head.headers["etag"] == f'"{linear["job"]["artifact"]["sha256"]}"'
    assert client.get(url, headers={"If-None-Match": "*"}).status_code == 304
    assert client.get(url, headers={"If-None-Match": f'"x", W/{head.headers["etag"]}'}
                      ).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_job_whose_final_write_fails_still_reaches_a_final_state(
    start_server: Callable[..., Server], programs: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir, workers=1)
    db = sqlite3.connect(data_dir / "jobs.db", timeout=30)
    # The disk fills between the claim and the final write: every final write fails.
    db.execute("CREATE TRIGGER full_disk BEFORE UPDATE OF status ON lowerings "
               "WHEN NEW.status IN ('succeeded', 'failed') "
               "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    db.commit()
    with server.client() as http:
        # Fails fast in the load phase (unknown pytree type): no compile needed.
        job_id = submit(http, programs / "custom_output.pt2", model_name="stuck").json()["id"]
        time.sleep(5)
        stuck = http.get(f"/v1/lowerings/{job_id}").json()
        assert stuck["status"] == "running", stuck
        db.execute("DROP TRIGGER full_disk")  # space is freed
        db.commit()
        db.close()
        job = wait_for(http, job_id, timeout_s=60)
    assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
    assert "final status could not be written" in job["error"]["message"]
