"""Webhooks in process: registration, the outbox written with the status change, signed
deliveries to a real local receiver, retries, disabling, and the targets refused."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from app.jobs.models import webhook_deliveries
from app.webhooks import dispatcher, outbox, targets
from tests.api.conftest import Api
from tests.factories import submit

CALLBACK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAST = {"webhook_allow_private": True, "webhook_poll_s": 0.05, "webhook_retry_scale": 0.01,
        "webhook_timeout_s": 2.0, "webhook_callback_secret": CALLBACK_SECRET}


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records each request and answers the next status
    of ``script`` (then the last one, over and over)."""

    script: list[int]
    location: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    port: int = 0

    def wait(self, count: int = 1, timeout_s: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {count} requests"
            time.sleep(0.02)
        return self.requests


@pytest.fixture
def receive() -> Iterator[Callable[..., Receiver]]:
    servers: list[ThreadingHTTPServer] = []

    def start(*script: int, location: str = "") -> Receiver:
        receiver = Receiver(list(script) or [200], location)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append({"headers": headers, "body": body.decode(),
                                          "at": time.monotonic()})
                status = (receiver.script.pop(0) if len(receiver.script) > 1
                          else receiver.script[0])
                self.send_response(status)
                if receiver.location:
                    self.send_header("location", receiver.location)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        receiver.port = server.server_address[1]
        receiver.url = f"http://127.0.0.1:{receiver.port}/hook"
        return receiver

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


def _register(api: Api, url: str, events: list[str] | None = None) -> dict[str, Any]:
    response = api.client.post("/v1/webhooks", json={
        "url": url, "events": events or ["lowering.succeeded", "lowering.failed",
                                         "lowering.cancelled"]})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _deliveries(api: Api, hook_id: str) -> list[dict[str, Any]]:
    response = api.client.get(f"/v1/webhooks/{hook_id}/deliveries")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def _rows(api: Api) -> list[dict[str, Any]]:
    with api.services.store.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(select(webhook_deliveries))]


def _until(check: Callable[[], Any], timeout_s: float = 15) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return found


def _verified(secret: str, request: dict[str, Any]) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in request["headers"].items()}
    return dict(Webhook(secret).verify(request["body"], headers))


# -- hostile: targets refused ---------------------------------------------------------

@pytest.mark.parametrize(("url", "code"), [
    ("http://127.0.0.1:9/hook", "webhook_target_refused"),
    ("http://localhost/hook", "webhook_target_refused"),
    ("http://169.254.169.254/latest/meta-data/", "webhook_target_refused"),
    ("http://[::1]/", "webhook_target_refused"),
    ("http://[::ffff:127.0.0.1]/", "webhook_target_refused"),
    ("http://10.0.0.7/", "webhook_target_refused"),
    ("http://0.0.0.0/", "webhook_target_refused"),
    ("ftp://example.com/", "invalid_webhook_url"),
    ("file:///etc/passwd", "invalid_webhook_url"),
    ("http://user:pw@example.com/", "invalid_webhook_url"),
    ("not a url", "invalid_webhook_url"),
])
def test_private_and_malformed_targets_are_refused_at_registration(
        api: Api, url: str, code: str) -> None:
    response = api.client.post("/v1/webhooks", json={"url": url,
                                                     "events": ["lowering.succeeded"]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert api.client.get("/v1/webhooks").json()["items"] == []


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"url": "https://93.184.215.14/", "events": ["lowering.exploded"]}, 422, "unknown_event"),
    ({"url": "https://93.184.215.14/", "events": []}, 422, "unknown_event"),
    ({"url": "https://93.184.215.14/"}, 422, "invalid_parameter"),
    ({"url": "https://93.184.215.14/", "events": ["lowering.failed"], "x": 1}, 422,
     "invalid_parameter"),
    ("[not json", 400, "bad_request"),
    ("[" * 10_000 + "]" * 10_000, 400, "bad_request"),
    ('{"url": "' + "a" * 20_000 + '"}', 400, "bad_request"),
    ('["a list"]', 422, "invalid_parameter"),
    ('{"url": 7, "events": ["lowering.failed"]}', 422, "invalid_webhook_url"),
    ('{"url": "https://93.184.215.14/", "events": [7]}', 422, "unknown_event"),
])
def test_bad_registrations_say_what_to_fix(api: Api, body: Any, status: int, code: str) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    response = api.client.post("/v1/webhooks", **kwargs)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_private_callback_url_is_refused_at_submit(make_api: Callable[..., Api],
                                                   linear: Path) -> None:
    api = make_api(webhook_callback_secret=CALLBACK_SECRET)
    for url in ("http://169.254.169.254/", "http://[::1]:8080/", "http://127.0.0.1/x"):
        response = submit(api.client, linear, model_name="m", callback_url=url)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "webhook_target_refused"
    response = submit(api.client, linear, model_name="m", callback_url="gopher://x/")
    assert response.json()["error"]["code"] == "invalid_webhook_url"
    assert api.executor.submitted == []
    unsigned = make_api()  # no secret to sign callbacks with
    response = submit(unsigned.client, linear, model_name="m",
                      callback_url="https://93.184.215.14/")
    assert response.json()["error"]["code"] == "callbacks_disabled"


def test_a_redirect_is_not_followed(make_api: Callable[..., Api], receive: Callable[...,
                                    Receiver], linear: Path) -> None:
    api = make_api(**FAST)
    elsewhere = receive(200)
    redirecting = receive(302, location=elsewhere.url)
    hook = _register(api, redirecting.url)
    submit(api.client, linear, wait=30, model_name="m")
    redirecting.wait(2)  # retried as a failure, never sent on
    time.sleep(0.2)
    assert elsewhere.requests == []
    row = _deliveries(api, hook["id"])[0]
    assert row["status"] == "pending" and row["last_status_code"] == 302
    assert "redirects are not followed" in row["last_error"]


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(targets.socket, "getaddrinfo", getaddrinfo)


def test_a_name_rebound_to_loopback_after_registration_is_refused_at_delivery(
        make_api: Callable[..., Api], receive: Callable[..., Receiver], linear: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api(**{**FAST, "webhook_allow_private": False})
    receiver = receive(200)
    _fake_dns(monkeypatch, {"rebind.example": "93.184.215.14"})
    hook = _register(api, f"http://rebind.example:{receiver.port}/hook")
    _fake_dns(monkeypatch, {"rebind.example": "127.0.0.1"})
    submit(api.client, linear, wait=30, model_name="m")
    row = _until(lambda: [r for r in _deliveries(api, hook["id"]) if r["attempts"] >= 1
                          and r["last_error"]])[0]
    assert "refused" in row["last_error"] and "127.0.0.1" in row["last_error"]
    assert receiver.requests == []


def test_the_delivery_goes_to_the_address_checked(
        make_api: Callable[..., Api], receive: Callable[..., Receiver], linear: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once, by the check; the request goes to that address with the
    name in Host (nothing resolves it again: httpx could not, the name is made up)."""
    api = make_api(**FAST)
    receiver = receive(200)
    _fake_dns(monkeypatch, {"receiver.test": "127.0.0.1"})
    hook = _register(api, f"http://receiver.test:{receiver.port}/hook")
    submit(api.client, linear, wait=30, model_name="m")
    request = receiver.wait()[0]
    assert request["headers"]["host"] == f"receiver.test:{receiver.port}"
    _verified(hook["secret"], request)


# -- registration ---------------------------------------------------------------------

def test_register_list_get_delete(make_api: Callable[..., Api]) -> None:
    api = make_api(webhook_allow_private=True)
    created = _register(api, "http://127.0.0.1:9/hook", ["lowering.failed"])
    assert created["secret"].startswith("whsec_") and created["enabled"]
    assert created["events"] == ["lowering.failed"]
    Webhook(created["secret"])  # a secret the library takes
    listed = api.client.get("/v1/webhooks").json()["items"]
    assert [hook["id"] for hook in listed] == [created["id"]]
    assert "secret" not in listed[0]
    one = api.client.get(f"/v1/webhooks/{created['id']}").json()
    assert one["url"] == created["url"] and "secret" not in one
    assert api.client.get(f"/v1/webhooks/{created['id']}/deliveries").json() == {"items": []}
    assert api.client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
    for method in ("GET", "DELETE"):
        gone = api.client.request(method, f"/v1/webhooks/{created['id']}")
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "unknown_webhook")
    odd = api.client.get("/v1/webhooks/..%2F..%2Fetc/deliveries")
    assert odd.status_code == 404


# -- the outbox -----------------------------------------------------------------------

def test_the_event_exists_iff_the_status_change_committed(
        make_api: Callable[..., Api], linear: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api(webhook_allow_private=True, webhook_poll_s=60)
    _register(api, "http://127.0.0.1:9/hook")
    job_id = submit(api.client, linear, model_name="hold_a").json()["id"]
    real = outbox.enqueue

    def enqueue_then_crash(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        raise RuntimeError("the process died mid-transaction")

    monkeypatch.setattr(outbox, "enqueue", enqueue_then_crash)
    with pytest.raises(RuntimeError):
        api.services.lifecycle.cancel(job_id)
    assert api.services.store.get(job_id)["status"] == "queued"
    assert _rows(api) == []  # rolled back with the status
    monkeypatch.setattr(outbox, "enqueue", real)
    assert api.client.post(f"/v1/lowerings/{job_id}/cancel").status_code == 200
    rows = _rows(api)
    assert [(r["event"], r["job_id"]) for r in rows] == [("lowering.cancelled", job_id)]
    assert rows[0]["payload"]["data"]["status"] == "cancelled"
    # A move the guard refuses writes nothing.
    assert not api.services.store.transition(job_id, from_=[outbox.JobStatus.QUEUED],
                                             to=outbox.JobStatus.FAILED)
    assert len(_rows(api)) == 1


# -- deliveries -----------------------------------------------------------------------

def test_signed_deliveries_for_succeeded_failed_and_cache_hits(
        make_api: Callable[..., Api], receive: Callable[..., Receiver], linear: Path) -> None:
    api = make_api(**FAST)
    receiver = receive(204)
    hook = _register(api, receiver.url)
    only_failed = receive(200)
    _register(api, only_failed.url, ["lowering.failed"])
    ok = submit(api.client, linear, wait=30, model_name="m").headers["x-lowering-id"]
    hit = submit(api.client, linear, wait=30, model_name="m").headers["x-lowering-id"]
    bad = submit(api.client, linear, model_name="fail_x").json()["id"]
    requests = receiver.wait(3)
    events = {}
    for request in requests:
        message = _verified(hook["secret"], request)
        events[message["data"]["id"]] = message
        assert request["headers"]["webhook-id"].startswith("msg_")
        assert abs(int(request["headers"]["webhook-timestamp"]) - time.time()) < 60
    assert events[ok]["type"] == "lowering.succeeded"
    assert events[hit]["type"] == "lowering.succeeded" and events[hit]["data"]["cache_hit"]
    assert events[bad]["type"] == "lowering.failed"
    assert events[bad]["data"]["error"]["code"] == "lowering_failed"
    assert events[ok]["data"] == api.client.get(f"/v1/lowerings/{ok}").json()
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(requests[0]["body"], {
            k.lower(): v for k, v in requests[0]["headers"].items()})
    failed_only = only_failed.wait(1)
    time.sleep(0.2)
    assert [json.loads(r["body"])["type"] for r in failed_only] == ["lowering.failed"]
    log = _deliveries(api, hook["id"])
    assert {(row["status"], row["attempts"], row["last_status_code"]) for row in log} == {
        ("delivered", 1, 204)}
    assert {row["job_id"] for row in log} == {ok, hit, bad}


def test_a_500_is_retried_within_seconds(make_api: Callable[..., Api],
                                         receive: Callable[..., Receiver], linear: Path) -> None:
    assert dispatcher.RETRY_SCHEDULE_S[0] <= 10  # the issue: first retry within 10 s
    api = make_api(**{**FAST, "webhook_retry_scale": 0.2})  # 1 s
    receiver = receive(500, 200)
    hook = _register(api, receiver.url)
    submit(api.client, linear, wait=30, model_name="m")
    first, second = receiver.wait(2)
    assert 0.5 < second["at"] - first["at"] < 5
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    _verified(hook["secret"], second)
    row = _until(lambda: [r for r in _deliveries(api, hook["id"]) if r["status"] == "delivered"])
    assert (row[0]["attempts"], row[0]["last_status_code"]) == (2, 200)
    assert row[0]["delivered_at"] is not None


def test_410_disables_the_endpoint(make_api: Callable[..., Api],
                                   receive: Callable[..., Receiver], linear: Path) -> None:
    api = make_api(**FAST)
    receiver = receive(410)
    hook = _register(api, receiver.url)
    submit(api.client, linear, wait=30, model_name="m")
    receiver.wait(1)
    found = _until(lambda: (h := api.client.get(f"/v1/webhooks/{hook['id']}").json())
                   and not h["enabled"] and h)
    assert "410" in found["disabled_reason"] and found["disabled_at"]
    assert _deliveries(api, hook["id"])[0]["status"] == "failed"
    submit(api.client, linear, wait=30, model_name="other")
    time.sleep(0.3)
    assert len(receiver.requests) == 1 and len(_deliveries(api, hook["id"])) == 1


def test_persistent_failure_runs_the_schedule_then_disables(
        make_api: Callable[..., Api], receive: Callable[..., Receiver], linear: Path) -> None:
    api = make_api(**{**FAST, "webhook_retry_scale": 1e-5})
    receiver = receive(503)
    hook = _register(api, receiver.url)
    submit(api.client, linear, wait=30, model_name="m")
    receiver.wait(dispatcher.MAX_ATTEMPTS, timeout_s=30)
    found = _until(lambda: (h := api.client.get(f"/v1/webhooks/{hook['id']}").json())
                   and not h["enabled"] and h)
    assert f"failed {dispatcher.MAX_ATTEMPTS} times" in found["disabled_reason"]
    row = _deliveries(api, hook["id"])[0]
    assert (row["status"], row["attempts"], row["last_status_code"]) == (
        "failed", dispatcher.MAX_ATTEMPTS, 503)
    time.sleep(0.2)
    assert len(receiver.requests) == dispatcher.MAX_ATTEMPTS


def test_callback_url_gets_the_signed_event(make_api: Callable[..., Api],
                                            receive: Callable[..., Receiver],
                                            linear: Path) -> None:
    api = make_api(**FAST)
    receiver = receive(200)
    job_id = submit(api.client, linear, wait=30, model_name="m",
                    callback_url=receiver.url).headers["x-lowering-id"]
    message = _verified(CALLBACK_SECRET, receiver.wait(1)[0])
    assert (message["type"], message["data"]["id"]) == ("lowering.succeeded", job_id)


def test_two_dispatchers_never_send_one_delivery_twice(
        make_api: Callable[..., Api], receive: Callable[..., Receiver], linear: Path) -> None:
    api = make_api(**{**FAST, "webhook_poll_s": 60})
    receiver = receive(200)
    _register(api, receiver.url)
    for name in ("a", "b", "c", "d"):
        submit(api.client, linear, model_name=f"hold_{name}")
    for job_id in api.executor.submitted:
        api.services.lifecycle.cancel(job_id)
    replicas = [dispatcher.Dispatcher(api.services.store.engine, settings=api.settings)
                for _ in range(3)]
    threads = [threading.Thread(target=d.run_once) for d in replicas for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.3)
    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    assert len(ids) == 4 and len(set(ids)) == 4
