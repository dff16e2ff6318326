"""GET /v1/lowerings/{id}/events in process: the event sequence, queue positions, the
heartbeat, reconnects, and every way a stream ends. httpx's ASGI transport hands back a
response once the stream has ended, so each test reads whole streams: ones that end by
themselves (a final state), or by ?wait=, a stop, or the duration cap."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from app.api.routes import lowerings as routes
from app.constants import ErrorCode, Phase
from app.errors import JobError, ServiceUnavailable
from app.jobs.models import lowerings
from tests.api.conftest import Api
from tests.factories import submit


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


@pytest.fixture(autouse=True)
def fast_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "EVENTS_POLL_S", 0.02)


def _queue(api: Api, linear: Path, *names: str) -> list[str]:
    ids = []
    for name in names:
        response = submit(api.client, linear, model_name=name)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def _stream(api: Api, job_id: str, **kwargs: Any) -> tuple[list[dict[str, Any]], str]:
    """The stream's ``lowering`` events (data, with the event's id as ``_id``) and its text."""
    response = api.client.get(f"/v1/lowerings/{job_id}/events", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if not line.startswith(":"))
        if fields.get("event") == "lowering":
            events.append({**json.loads(fields["data"]), "_id": fields["id"]})
    return events, response.text


def _states(events: list[dict[str, Any]]) -> list[tuple[str, str | None, int | None]]:
    return [(event["status"], event["phase"], event["queue_position"]) for event in events]


@contextmanager
def _later(*steps: tuple[float, Callable[[], object]]) -> Iterator[threading.Thread]:
    """Run each step after its delay (from now), in a thread."""
    start = time.monotonic()

    def play() -> None:
        for at, step in steps:
            time.sleep(max(0.0, start + at - time.monotonic()))
            step()

    thread = threading.Thread(target=play)
    thread.start()
    yield thread
    thread.join()


def test_a_finished_job_is_one_final_event_and_the_end(api: Api, linear: Path) -> None:
    response = submit(api.client, linear, wait=30, model_name="m")
    job_id = response.headers["x-lowering-id"]
    events, raw = _stream(api, job_id)
    assert _states(events) == [("succeeded", None, None)]
    job = api.client.get(f"/v1/lowerings/{job_id}").json()
    assert {k: v for k, v in events[0].items() if k not in ("_id", "queue_position")} == job
    assert raw.startswith(f"retry: {routes.EVENTS_RETRY_MS}\n\n")
    assert events[0]["_id"] == "succeeded.-.-"


def test_queue_positions_count_the_queued_jobs_admitted_before(api: Api,
                                                                linear: Path) -> None:
    first, second, third = _queue(api, linear, "hold_a", "hold_b", "hold_c")
    # An identical submission follows the first: it waits where its leader waits and is
    # not counted ahead of anyone.
    follower = _queue(api, linear, "hold_a")[0]
    assert api.client.get(f"/v1/lowerings/{follower}").json()["coalesced_with"] == first
    fourth = _queue(api, linear, "hold_d")[0]
    positions = {job_id: _stream(api, job_id, params={"wait": 0})[0]
                 for job_id in (first, second, third, follower, fourth)}
    assert {job_id: _states(events) for job_id, events in positions.items()} == {
        first: [("queued", None, 0)], second: [("queued", None, 1)],
        third: [("queued", None, 2)], follower: [("queued", None, 0)],
        fourth: [("queued", None, 3)]}
    assert positions[follower][0]["leader"] == {"id": first, "status": "queued", "phase": None}
    assert "leader" not in positions[first][0]
    # The store's count is one indexed range scan.
    store = api.services.store
    assert store.count_waiting_before(seq=2**62) == 4
    query = select(func.count()).where(
        (lowerings.c.status == "queued") & (lowerings.c.seq < 3)
        & lowerings.c.parent_id.is_(None))
    sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
    assert "USING INDEX ix_lowerings_status_seq" in plan, plan


def test_the_stream_follows_queue_status_and_phase_to_the_end(api: Api, linear: Path) -> None:
    ahead, job_id = _queue(api, linear, "hold_ahead", "hold_me")
    lifecycle = api.services.lifecycle
    with _later(
        (0.3, lambda: lifecycle.cancel(ahead)),
        (0.6, lambda: lifecycle.claim(job_id, worker_pid=None)),
        (0.9, lambda: lifecycle.progress(job_id, phase=Phase.LOWER)),
        (1.2, lambda: lifecycle.progress(job_id, phase=Phase.LOWER)),  # no change: no event
        (1.5, lambda: lifecycle.fail(job_id, JobError(ErrorCode.LOWERING_FAILED, "no"))),
    ):
        events, _ = _stream(api, job_id)
    assert _states(events) == [("queued", None, 1), ("queued", None, 0),
                               ("running", "load", None), ("running", "lower", None),
                               ("failed", None, None)]
    assert [event["_id"] for event in events] == [
        "queued.-.1", "queued.-.0", "running.load.-", "running.lower.-", "failed.-.-"]
    assert events[-1]["error"]["code"] == "lowering_failed"


def test_a_cancelled_job_ends_its_stream(api: Api, linear: Path) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    cancel = api.services.lifecycle.cancel
    with _later((0.2, lambda: cancel(job_id))):
        events, raw = _stream(api, job_id)
    assert _states(events) == [("queued", None, 0), ("cancelled", None, None)]
    assert raw.endswith("\n\n")


def test_a_quiet_stream_sends_heartbeats(api: Api, linear: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "EVENTS_HEARTBEAT_S", 0.05)
    job_id = _queue(api, linear, "hold_me")[0]
    events, raw = _stream(api, job_id, params={"wait": 0.5})
    assert _states(events) == [("queued", None, 0)]  # ended by ?wait=, not final
    assert raw.count(": heartbeat\n\n") >= 3


def test_no_heartbeat_while_events_flow(api: Api, linear: Path) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    _, raw = _stream(api, job_id, params={"wait": 0.3})
    assert "heartbeat" not in raw  # 15 s by default


def test_a_reconnect_naming_the_current_state_is_not_sent_it_again(
    api: Api, linear: Path
) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    events, _ = _stream(api, job_id, params={"wait": 0})
    again, raw = _stream(api, job_id, params={"wait": 0.2},
                         headers={"Last-Event-ID": events[0]["_id"]})
    assert again == [] and raw.startswith("retry:")
    stale, _ = _stream(api, job_id, params={"wait": 0}, headers={"Last-Event-ID": "running.x"})
    assert _states(stale) == [("queued", None, 0)]
    # A final state is always sent: a stream that ends final ends with that event.
    api.services.lifecycle.cancel(job_id)
    final, _ = _stream(api, job_id)
    done, _ = _stream(api, job_id, headers={"Last-Event-ID": final[0]["_id"]})
    assert _states(done) == [("cancelled", None, None)]


def test_the_stream_is_capped_by_max_wait(make_api: Callable[..., Api], linear: Path) -> None:
    api = make_api(max_wait_s=0.3)
    job_id = _queue(api, linear, "hold_me")[0]
    started = time.monotonic()
    events, _ = _stream(api, job_id, params={"wait": 3600})
    assert _states(events) == [("queued", None, 0)]
    assert time.monotonic() - started < 5


def test_a_stopping_service_ends_streams(api: Api, linear: Path) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    stopping = api.client.app.state.stopping
    stopping.set()
    try:
        started = time.monotonic()
        events, _ = _stream(api, job_id)
        assert _states(events) == [("queued", None, 0)]
        assert time.monotonic() - started < 5
    finally:
        stopping.clear()


@pytest.mark.parametrize("job_id", ["0" * 32, "no such id", "x" * 65])
def test_an_unknown_job_is_a_json_404(api: Api, job_id: str) -> None:
    response = api.client.get(f"/v1/lowerings/{job_id}/events")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"


def test_bad_wait_is_422(api: Api, linear: Path) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    response = api.client.get(f"/v1/lowerings/{job_id}/events", params={"wait": "-1"})
    assert response.status_code == 422


def test_the_openapi_document_describes_the_stream(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    events = spec["paths"]["/v1/lowerings/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "404" in events["responses"]


def test_a_failing_database_is_waited_out_then_ends_the_stream_cleanly(
    api: Api, linear: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "EVENTS_DB_PATIENCE_S", 0.3)
    job_id = _queue(api, linear, "hold_me")[0]
    store = api.services.store
    get, calls = store.get, {"n": 0}
    failing = {"from": 2, "to": 6}  # calls 2..5 fail (a blip of ~0.1 s): waited out

    def flaky(wanted: str, **kwargs: Any) -> Any:
        calls["n"] += 1
        if failing["from"] <= calls["n"] < failing["to"]:
            raise ServiceUnavailable("the job database is busy; retry soon")
        return get(wanted, **kwargs)

    monkeypatch.setattr(store, "get", flaky)
    with _later((0.5, lambda: api.services.lifecycle.cancel(job_id))):
        events, _ = _stream(api, job_id)
    assert _states(events) == [("queued", None, 0), ("cancelled", None, None)]
    # Failing for good: the stream ends (no traceback, no 500 mid-stream).
    other = _queue(api, linear, "hold_other")[0]
    calls["n"], failing["to"] = 0, 10**9
    started = time.monotonic()
    events, _ = _stream(api, other)
    assert _states(events) == [("queued", None, 0)] and time.monotonic() - started < 5


def test_a_client_that_left_ends_the_stream(api: Api, linear: Path) -> None:
    job_id = _queue(api, linear, "hold_me")[0]
    store, checks = api.services.store, []

    class Gone:  # the request of a client that has disconnected
        app = api.client.app

        async def is_disconnected(self) -> bool:
            checks.append(True)
            return True

    async def read() -> list[str]:
        first = await routes._event_state(store, job_id, "default")
        assert first is not None
        return [chunk async for chunk in routes._event_stream(
            Gone(), store, job_id, "default", first, None, 3600)]  # type: ignore[arg-type]

    started = time.monotonic()
    chunks = api.client.portal.call(read)
    assert [chunk.split("\n", 1)[0] for chunk in chunks] == ["retry: 2000", "event: lowering"]
    assert checks == [True] and time.monotonic() - started < 5
