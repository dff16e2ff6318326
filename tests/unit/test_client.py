"""The SDK and lowerctl against a fake service behind httpx.MockTransport.

FakeLoweringService mimics the API contract (routes, status codes, error bodies, ETag),
keeps jobs in a dict and moves each one a step (queued -> running -> final) per GET.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import inspect
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.submit import parse_form
from app.client import ChecksumMismatch, LoweringAPIError, LoweringClient
from app.client.cli import build_parser, describe, main
from app.client.sdk import ServerSentEvent, iter_sse
from app.errors import ServiceError
from app.schemas import LoweringCreate
from app.settings import Settings

ARTIFACT = b"PK\x03\x04 not really a zip, but the client never looks inside"


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def _multipart(request: httpx.Request) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw + request.read())
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename():
            files[name] = (str(part.get_filename()), payload)
        else:
            fields[name] = payload.decode()
    return fields, files


class FakeLoweringService:
    """The service's HTTP contract in memory; model_name "broken" makes a job fail. The
    form goes through the service's own parser (one CUDA device), refusals and all."""

    def __init__(self, *, polls_to_finish: int = 2, etag: str | None = None) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, tuple[dict[str, str], dict[str, tuple[str, bytes]]]] = {}
        self.requests: list[httpx.Request] = []
        self.polls_to_finish = polls_to_finish
        self.etag = etag or hashlib.sha256(ARTIFACT).hexdigest()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, path = request.method, request.url.path
        if (method, path) == ("GET", "/healthz"):
            return httpx.Response(200, json={"status": "ok"})
        if (method, path) == ("GET", "/v1/info"):
            return httpx.Response(200, json={"service": "lowering", "backends": ["aoti"]})
        if path == "/v1/lowerings":
            return self._submit(request) if method == "POST" else self._list(request)
        match = re.fullmatch(r"/v1/lowerings/([^/]+)(/artifact|/log|/cancel)?", path)
        if match is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        job = self.jobs.get(match.group(1))
        if job is None:
            return _error(404, "not_found", f"no lowering {match.group(1)!r}")
        action = (method, match.group(2))
        if action == ("GET", None):
            return httpx.Response(200, json=self._advance(job))
        if action == ("DELETE", None):
            del self.jobs[job["id"]]
            return httpx.Response(204)
        if action == ("POST", "/cancel"):
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return _error(409, "conflict", f"job is already {job['status']}")
            job.update(status="cancelled", phase=None)
            return httpx.Response(200, json=job)
        if action == ("GET", "/log"):
            return httpx.Response(200, text=f"lowering {job['id']}\n")
        if action == ("GET", "/artifact"):
            if job["status"] != "succeeded":
                return _error(409, "conflict", f"job is {job['status']}, not succeeded")
            filename = f"{job['model_name']}-{job['backend_id']}.pt2"
            return httpx.Response(200, content=ARTIFACT, headers={
                "ETag": f'"{self.etag}"', "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{filename}"'})
        return httpx.Response(405, json={"detail": "Method Not Allowed"})

    def _submit(self, request: httpx.Request) -> httpx.Response:
        fields, files = _multipart(request)
        try:
            create = parse_form(fields, settings=Settings(), cuda_devices=1)
        except ServiceError as exc:
            return _error(exc.status, exc.code, exc.message)
        job_id = f"job{len(self.jobs) + 1:04d}"
        self.uploads[job_id] = (fields, files)
        self.jobs[job_id] = {
            "id": job_id, "status": "queued", "phase": None, "polls": 0, **create.as_fields(),
            "artifact": None, "error": None,
            "created_at": f"2025-01-01T00:00:{len(self.jobs):02d}Z",
        }
        location = f"/v1/lowerings/{job_id}"
        return httpx.Response(202, json=self.jobs[job_id], headers={"Location": location})

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        if job["status"] in ("queued", "running"):
            job["polls"] += 1
            if job["polls"] < self.polls_to_finish:
                job.update(status="running", phase="lower")
            elif job["model_name"] == "broken":
                job.update(status="failed", phase=None, error={
                    "code": "lowering_failed", "message": "inductor said no", "detail": {}})
            else:
                job.update(status="succeeded", phase=None, artifact={
                    "sha256": hashlib.sha256(ARTIFACT).hexdigest(),
                    "size_bytes": len(ARTIFACT), "url": f"/v1/lowerings/{job['id']}/artifact"})
        return job

    def _list(self, request: httpx.Request) -> httpx.Response:
        query = request.url.params
        jobs = [job for job in self.jobs.values()
                if query.get("status") in (None, job["status"])
                and query.get("model_name") in (None, job["model_name"])]
        start, limit = int(query.get("cursor", 0)), int(query.get("limit", 50))
        more = start + limit < len(jobs)
        return httpx.Response(200, json={"items": jobs[start:start + limit],
                                         "next_cursor": str(start + limit) if more else None})


@pytest.fixture
def service() -> FakeLoweringService:
    return FakeLoweringService()


@pytest.fixture
def client(service: FakeLoweringService) -> Iterator[LoweringClient]:
    with LoweringClient(transport=httpx.MockTransport(service)) as lowering_client:
        yield lowering_client


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 64)
    return path


# --- SDK ---------------------------------------------------------------------------------

def test_submit_sends_every_field_and_the_file(
    client: LoweringClient, service: FakeLoweringService, program: Path
) -> None:
    job = client.submit(program, model_name="resnet", device="cuda:0",
                        options={"max_autotune": True}, verify=False, rtol=0.001)
    assert job["status"] == "queued"
    fields, files = service.uploads[job["id"]]
    assert fields == {"model_name": "resnet", "backend_id": "aoti", "device": "cuda:0",
                      "options": '{"max_autotune": true}', "verify": "false", "rtol": "0.001"}
    assert files == {"program": ("model.pt2", program.read_bytes())}


def test_submit_defaults_leave_tolerances_to_the_server(
    client: LoweringClient, service: FakeLoweringService, program: Path
) -> None:
    fields, _ = service.uploads[client.submit(program, model_name="m")["id"]]
    assert fields == {"model_name": "m", "backend_id": "aoti", "device": "cpu",
                      "options": "{}", "verify": "true"}


def test_submit_keywords_are_the_forms_fields_with_its_defaults() -> None:
    parameters = inspect.signature(LoweringClient.submit).parameters
    keywords = {name: p.default for name, p in parameters.items() if name not in ("self", "path")}
    assert set(keywords) == set(LoweringCreate.model_fields)
    for name, field in LoweringCreate.model_fields.items():
        if name == "options":  # None stands for the model's {}
            assert keywords[name] is None and field.get_default(call_default_factory=True) == {}
        elif field.is_required():
            assert keywords[name] is inspect.Parameter.empty
        else:
            assert keywords[name] == field.default, name


@pytest.mark.parametrize("kwargs", [
    {}, {"backend_id": "aoti2", "device": "cuda:0", "options": {"freezing": True},
         "verify": False, "rtol": 1e-3, "atol": 0.0},
])
def test_submit_sends_only_what_the_model_reads_as_meant(
    client: LoweringClient, service: FakeLoweringService, program: Path, kwargs: dict[str, Any]
) -> None:
    fields, _ = service.uploads[client.submit(program, model_name="m", **kwargs)["id"]]
    sent = LoweringCreate.model_validate(fields)  # extra="forbid": no field it does not know
    assert sent == LoweringCreate(model_name="m", **kwargs)


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (_error(422, "invalid_parameter", "model_name must match"), "invalid_parameter",
         "model_name must match"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), "http_502",
         "<html>Bad Gateway</html>"),
        (httpx.Response(404, json={"detail": "Not Found"}), "http_404", "Not Found"),
        (httpx.Response(500, content=b""), "http_500", "Internal Server Error"),
    ],
)
def test_errors_are_parsed_from_the_body(response: httpx.Response, code: str,
                                         message: str) -> None:
    transport = httpx.MockTransport(lambda request: response)
    with LoweringClient(transport=transport) as lowering_client, \
            pytest.raises(LoweringAPIError) as caught:
        lowering_client.get("job0001")
    assert (caught.value.status, caught.value.code) == (response.status_code, code)
    assert caught.value.message == message


def test_wait_polls_until_final_and_reports_each_poll(
    client: LoweringClient, service: FakeLoweringService, program: Path
) -> None:
    service.polls_to_finish = 3
    job_id = client.submit(program, model_name="m")["id"]
    seen: list[tuple[str, str | None]] = []
    job = client.wait(job_id, poll_s=0, on_update=lambda j: seen.append((j["status"], j["phase"])))
    assert job["status"] == "succeeded"
    assert seen == [("running", "lower"), ("running", "lower"), ("succeeded", None)]


def test_wait_raises_timeout_error(
    client: LoweringClient, service: FakeLoweringService, program: Path
) -> None:
    service.polls_to_finish = 10**9
    job_id = client.submit(program, model_name="m")["id"]
    with pytest.raises(TimeoutError, match="still running"):
        client.wait(job_id, timeout_s=0.05, poll_s=0.01)


def test_download_verifies_sha256_and_renames_into_place(
    client: LoweringClient, program: Path, tmp_path: Path
) -> None:
    job = client.wait(client.submit(program, model_name="m")["id"], poll_s=0)
    out = client.download(job["id"], tmp_path / "out.pt2")
    assert out.read_bytes() == ARTIFACT
    assert not list(tmp_path.glob("*.part"))
    # A directory keeps the server's file name.
    assert client.download(job["id"], tmp_path).name == "m-aoti.pt2"


def test_download_checksum_mismatch_leaves_nothing(
    client: LoweringClient, service: FakeLoweringService, program: Path, tmp_path: Path
) -> None:
    service.etag = "0" * 64
    job = client.wait(client.submit(program, model_name="m")["id"], poll_s=0)
    with pytest.raises(ChecksumMismatch) as caught:
        client.download(job["id"], tmp_path / "out.pt2")
    assert caught.value.expected == "0" * 64
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt2"]


def test_list_and_iter_all_follow_cursors(
    client: LoweringClient, service: FakeLoweringService, program: Path
) -> None:
    ids = [client.submit(program, model_name=f"m{i}")["id"] for i in range(5)]
    page = client.list(limit=2)
    assert [job["id"] for job in page["items"]] == ids[:2] and page["next_cursor"] == "2"
    assert [job["id"] for job in client.iter_all(limit=2)] == ids
    assert client.list(model_name="m3")["items"][0]["id"] == ids[3]
    assert service.requests[-1].url.params["model_name"] == "m3"


def test_cancel_delete_log_info_health(client: LoweringClient, program: Path) -> None:
    job_id = client.submit(program, model_name="m")["id"]
    assert client.cancel(job_id)["status"] == "cancelled"
    assert client.log(job_id) == f"lowering {job_id}\n"
    assert client.delete(job_id) is None
    with pytest.raises(LoweringAPIError, match="not_found"):
        client.get(job_id)
    assert client.info()["backends"] == ["aoti"]
    assert client.health() == {"status": "ok"}


# --- lowerctl ----------------------------------------------------------------------------

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def lowerctl(service: FakeLoweringService, capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*argv: str, transport: httpx.BaseTransport | None = None) -> tuple[int, str, str]:
        code = main(list(argv), transport=transport or httpx.MockTransport(service))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err
    return run


def test_cli_submit_parses_options(lowerctl: Run, service: FakeLoweringService,
                                   program: Path) -> None:
    code, out, _ = lowerctl("submit", str(program), "--model-name", "m", "--no-verify",
                            "--option", "max_autotune=true", "--option", "cpp.march=x86-64-v2")
    assert code == 0 and json.loads(out)["status"] == "queued"
    fields, _ = service.uploads[json.loads(out)["id"]]
    assert json.loads(fields["options"]) == {"max_autotune": True, "cpp.march": "x86-64-v2"}
    assert fields["verify"] == "false"


def test_cli_submit_flags_are_the_forms_fields_with_its_defaults(
    lowerctl: Run, service: FakeLoweringService, program: Path
) -> None:
    args = build_parser().parse_args(["submit", str(program), "--model-name", "m"])
    assert {name: getattr(args, name) for name in LoweringCreate.model_fields} == {
        **LoweringCreate(model_name="m").model_dump(), "options": []}  # [] of KEY=VALUE pairs
    code, out, _ = lowerctl("submit", str(program), "--model-name", "m", "--backend-id", "b",
                            "--device", "cuda:0", "--option", "freezing=true", "--no-verify",
                            "--rtol", "0.5", "--atol", "0.25")
    assert code == 0
    fields, _ = service.uploads[json.loads(out)["id"]]
    assert LoweringCreate.model_validate(fields) == LoweringCreate(
        model_name="m", backend_id="b", device="cuda:0", options={"freezing": True},
        verify=False, rtol=0.5, atol=0.25)


def test_cli_submit_wait_downloads(lowerctl: Run, program: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "lowered.pt2"
    code, out, err = lowerctl("submit", str(program), "--model-name", "m", "--wait",
                              "--poll", "0", "-o", str(out_path))
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    assert out_path.read_bytes() == ARTIFACT and "succeeded" in err


def test_cli_failed_job_exits_1_with_its_error(lowerctl: Run, program: Path) -> None:
    code, out, err = lowerctl("submit", str(program), "--model-name", "broken", "--wait",
                              "--poll", "0")
    assert code == 1 and json.loads(out)["status"] == "failed"
    assert "lowering_failed: inductor said no" in err


def test_cli_cancel_then_wait_exits_1(lowerctl: Run, client: LoweringClient,
                                      program: Path) -> None:
    job_id = client.submit(program, model_name="m")["id"]
    assert lowerctl("cancel", job_id)[0] == 0
    code, out, _ = lowerctl("wait", job_id, "--poll", "0")
    assert code == 1 and json.loads(out)["status"] == "cancelled"


def test_cli_wait_timeout_exits_1(lowerctl: Run, service: FakeLoweringService,
                                  client: LoweringClient, program: Path) -> None:
    service.polls_to_finish = 10**9
    job_id = client.submit(program, model_name="m")["id"]
    code, _, err = lowerctl("wait", job_id, "--timeout", "0.05", "--poll", "0.01")
    assert code == 1 and "still running" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "nope"], "no lowering 'nope' (HTTP 404, not_found)"),
        (["submit", "{program}", "--model-name", "bad name!"],
         "model_name 'bad name!' must match"),
        (["submit", "{program}", "--model-name", "m", "--option", "evil=1"],
         "max_autotune (HTTP 422, unknown_option)"),
        (["submit", "missing.pt2", "--model-name", "m"], "No such file or directory"),
        (["submit", "{program}"], "--model-name"),
        (["submit", "{program}", "--model-name", "m", "--option", "novalue"], "KEY=VALUE"),
    ],
)
def test_cli_usage_and_api_errors_exit_2(lowerctl: Run, program: Path, argv: list[str],
                                         message: str) -> None:
    code, out, err = lowerctl(*(arg.format(program=program) for arg in argv))
    assert (code, out) == (2, "")
    assert message in err


def test_cli_checksum_mismatch_exits_2(lowerctl: Run, service: FakeLoweringService,
                                       client: LoweringClient, program: Path,
                                       tmp_path: Path) -> None:
    service.etag = "f" * 64
    job_id = client.wait(client.submit(program, model_name="m")["id"], poll_s=0)["id"]
    code, _, err = lowerctl("download", job_id, "-o", str(tmp_path / "out.pt2"))
    assert code == 2 and "sha256" in err and not (tmp_path / "out.pt2").exists()


def test_cli_cannot_connect_exits_3(lowerctl: Run) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    code, _, err = lowerctl("status", "job0001", transport=httpx.MockTransport(refuse))
    assert code == 3 and "cannot reach http://127.0.0.1:8000" in err
    # And for real: nothing listens on port 9 of this host.
    assert lowerctl("--url", "http://127.0.0.1:9", "list", transport=httpx.HTTPTransport())[0] == 3


def test_cli_list_prints_a_table(lowerctl: Run, client: LoweringClient, program: Path) -> None:
    ids = [client.submit(program, model_name=f"m{i}")["id"] for i in range(3)]
    code, out, err = lowerctl("list", "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "STATUS", "PHASE", "MODEL", "BACKEND",
                                              "DEVICE", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == ids[:2]
    assert "--cursor 2" in err


def test_cli_log_and_status(lowerctl: Run, client: LoweringClient, program: Path) -> None:
    job_id = client.submit(program, model_name="m")["id"]
    assert lowerctl("log", job_id)[:2] == (0, f"lowering {job_id}\n")
    code, out, _ = lowerctl("status", job_id)
    assert code == 0 and json.loads(out)["id"] == job_id


def test_client_imports_neither_torch_nor_fastapi() -> None:
    probe = ("import sys, app.client, app.client.cli; "
             "print(sorted({'torch', 'fastapi'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


# --- progress events (GET /v1/lowerings/{id}/events) ------------------------------------

def _sse(job: dict[str, Any], event_id: str) -> str:
    return f"event: lowering\nid: {event_id}\ndata: {json.dumps(job)}\n\n"


class EventsService(FakeLoweringService):
    """The fake with an events route: each connection plays the next script, a list of
    job updates (applied to the job and sent as events), ": heartbeat" comments, or
    BREAK (the connection drops). A job whose scripts are used up answers 404."""

    BREAK = "break"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scripts: list[list[Any]] = []
        self.connections: list[httpx.Request] = []
        self.content_type = "text/event-stream; charset=utf-8"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        match = re.fullmatch(r"/v1/lowerings/([^/]+)/events", request.url.path)
        if match is None:
            return super().__call__(request)
        self.requests.append(request)
        self.connections.append(request)
        job = self.jobs.get(match.group(1))
        if job is None or not self.scripts:
            return _error(404, "not_found", "no such lowering")
        return httpx.Response(200, headers={"Content-Type": self.content_type},
                              content=self._play(job, self.scripts.pop(0)))

    def _play(self, job: dict[str, Any], script: list[Any]) -> Iterator[bytes]:
        yield b"retry: 2000\n\n"
        for step in script:
            if step == self.BREAK:
                raise httpx.ReadError("connection reset by peer")
            if isinstance(step, str):
                yield f"{step}\n\n".encode()
                continue
            job.update({key: value for key, value in step.items() if key != "queue_position"})
            state = f"{job['status']}.{job['phase'] or '-'}.{step.get('queue_position', '-')}"
            yield _sse({**job, "queue_position": step.get("queue_position")}, state).encode()


QUEUED_2 = {"status": "queued", "phase": None, "queue_position": 2}
QUEUED_0 = {"status": "queued", "phase": None, "queue_position": 0}
LOWER = {"status": "running", "phase": "lower"}
DONE = {"status": "succeeded", "phase": None,
        "artifact": {"sha256": hashlib.sha256(ARTIFACT).hexdigest(), "size_bytes": 1,
                     "url": "/v1/lowerings/x/artifact"}}


@pytest.fixture
def events_service() -> EventsService:
    return EventsService(polls_to_finish=3)


@pytest.fixture
def events_client(events_service: EventsService) -> Iterator[LoweringClient]:
    with LoweringClient(transport=httpx.MockTransport(events_service)) as lowering_client:
        yield lowering_client


def _polls(service: FakeLoweringService, job_id: str) -> int:
    return sum(1 for request in service.requests
               if (request.method, request.url.path) == ("GET", f"/v1/lowerings/{job_id}"))


def test_iter_sse_follows_the_standard() -> None:
    lines = ["\ufeff: a comment first", "retry: 1500", "", "event: lowering", "id: a",
             "data: {\"x\":", "data:1}", "", ": heartbeat", "", "data", "data:  two",
             "unknown: field", "", "id: b\0c", "event: lowering", "data: cut off"]
    assert list(iter_sse(lines)) == [
        ServerSentEvent("lowering", '{"x":\n1}', "a", 1500),
        ServerSentEvent("message", "\n two", "a", 1500),  # the id persists; \0 ignored
    ]


def test_wait_follows_the_events_without_polling(
    events_client: LoweringClient, events_service: EventsService, program: Path
) -> None:
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[QUEUED_2, ": heartbeat", QUEUED_0, LOWER, DONE]]
    seen: list[Any] = []
    job = events_client.wait(job_id, poll_s=0, on_update=lambda j: seen.append(
        (j["status"], j["phase"], j["queue_position"])))
    assert job["status"] == "succeeded" and job["artifact"]["size_bytes"] == 1
    assert seen == [("queued", None, 2), ("queued", None, 0), ("running", "lower", None),
                    ("succeeded", None, None)]
    assert _polls(events_service, job_id) == 0
    request = events_service.connections[0]
    assert request.headers["accept"] == "text/event-stream"
    assert "wait" not in request.url.params and "last-event-id" not in request.headers


def test_events_yields_each_job(events_client: LoweringClient,
                                events_service: EventsService, program: Path) -> None:
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[QUEUED_2, LOWER]]
    assert [(job["status"], job["queue_position"]) for job in events_client.events(job_id)] \
        == [("queued", 2), ("running", None)]
    with pytest.raises(LoweringAPIError) as caught:  # no more scripts: 404
        list(events_client.events(job_id))
    assert caught.value.status == 404


def test_a_stream_closed_early_is_reconnected_with_last_event_id(
    events_client: LoweringClient, events_service: EventsService, program: Path
) -> None:
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[QUEUED_0], [LOWER, DONE]]
    assert events_client.wait(job_id, poll_s=0, timeout_s=60)["status"] == "succeeded"
    first, second = events_service.connections
    assert "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == "queued.-.0"
    assert 0 < float(second.url.params["wait"]) <= 60
    assert _polls(events_service, job_id) == 0


@pytest.mark.parametrize("why", ["no route", "broken stream", "not an event stream"])
def test_wait_falls_back_to_polling(events_client: LoweringClient,
                                    events_service: EventsService, program: Path,
                                    why: str) -> None:
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = {"no route": [], "broken stream": [[QUEUED_2, EventsService.BREAK]],
                              "not an event stream": [[QUEUED_2]]}[why]
    if why == "not an event stream":
        events_service.content_type = "text/html"
    seen: list[Any] = []
    job = events_client.wait(job_id, poll_s=0, on_update=lambda j: seen.append(j["status"]))
    assert job["status"] == "succeeded"
    assert len(events_service.connections) == 1 and _polls(events_service, job_id) == 3
    assert seen[-3:] == ["running", "running", "succeeded"]


def test_wait_without_events_only_polls(events_client: LoweringClient,
                                        events_service: EventsService, program: Path) -> None:
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[DONE]]
    assert events_client.wait(job_id, poll_s=0, events=False)["status"] == "succeeded"
    assert events_service.connections == []


def test_wait_times_out_while_the_stream_stays_queued(
    events_client: LoweringClient, events_service: EventsService, program: Path
) -> None:
    events_service.polls_to_finish = 10**9
    job_id = events_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[QUEUED_2]] * 1000
    with pytest.raises(TimeoutError, match="still"):
        events_client.wait(job_id, timeout_s=0.2, poll_s=0.01)


@pytest.mark.parametrize(("job", "words"), [
    ({"status": "queued", "queue_position": 3}, "queued, 3 ahead"),
    ({"status": "queued", "queue_position": 0}, "queued, next"),
    ({"status": "queued", "queue_position": None, "phase": "waiting_for_host"},
     "queued, waiting for a worker host that serves its target"),
    ({"status": "queued", "queue_position": None, "coalesced_with": "abc",
      "leader": {"id": "abc", "status": "running", "phase": "verify"}},
     "queued, coalesced with abc (running: verify)"),
    ({"status": "queued", "coalesced_with": "abc"}, "queued, coalesced with abc"),
    ({"status": "queued"}, "queued"),  # polled: no position
    ({"status": "running", "phase": "lower"}, "running: lower"),
    ({"status": "failed"}, "failed"),
])
def test_describe_renders_progress(job: dict[str, Any], words: str) -> None:
    assert describe(job) == words


def test_cli_wait_prints_each_state_from_the_events(
    events_service: EventsService, capsys: pytest.CaptureFixture[str], program: Path
) -> None:
    transport = httpx.MockTransport(events_service)
    with LoweringClient(transport=transport) as lowering_client:
        job_id = lowering_client.submit(program, model_name="m")["id"]
    events_service.scripts = [[QUEUED_2, QUEUED_0, LOWER, {"status": "running",
                                                            "phase": "verify"}, DONE]]
    code = main(["wait", job_id], transport=transport)
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    lines = [line.split("  ")[1] for line in err.splitlines() if line.startswith(job_id)]
    assert lines == ["queued, 2 ahead", "queued, next", "running: lower", "running: verify"]
    assert f"job {job_id} succeeded after" in err
    assert _polls(events_service, job_id) == 0


def test_cli_no_events_polls(events_service: EventsService,
                             capsys: pytest.CaptureFixture[str], program: Path) -> None:
    transport = httpx.MockTransport(events_service)
    code = main(["submit", str(program), "--model-name", "m", "--wait", "--poll", "0",
                 "--no-events"], transport=transport)
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    assert events_service.connections == [] and "running: lower" in err


# --- several targets (the form's ``targets``) --------------------------------------------

class TargetsService:
    """Answers a submit as the service does: one job per target, through its own parser."""

    def __init__(self) -> None:
        self.fields: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        from app.api.submit import parse_targets

        fields, _ = _multipart(request)
        self.fields.append(fields)
        fields.pop("upload", None)
        try:
            forms = parse_targets(fields, settings=Settings(), cuda_devices=1)
        except ServiceError as exc:
            return _error(exc.status, exc.code, exc.message)
        jobs = [{"id": f"job{n}", "status": "queued", **form.as_fields()}
                for n, form in enumerate(forms)]
        return httpx.Response(202, json={"lowerings": jobs} if "targets" in fields else jobs[0])


def test_submit_with_targets_returns_the_list_of_jobs(program: Path) -> None:
    service = TargetsService()
    with LoweringClient(transport=httpx.MockTransport(service)) as client:
        jobs = client.submit(program, model_name="m", options={"freezing": True}, targets=[
            {"options": {"cpp.march": "x86-64-v2"}}, {"device": "cuda"}])
        assert [(job["device"], job["options"]) for job in jobs] == [
            ("cpu", {"freezing": True, "cpp.march": "x86-64-v2"}),
            ("cuda", {"freezing": True})]
        assert client.submit_upload("0" * 32, model_name="m", targets=[{"device": "cpu"}])[0][
            "id"] == "job0"
        assert client.submit(program, model_name="m")["id"] == "job0"  # no targets: the job
        assert "targets" not in service.fields[-1]
        with pytest.raises(LoweringAPIError) as refused:
            client.submit(program, model_name="m",
                          targets=[{"device": "cpu"}, {"device": "cpu"}])
    assert refused.value.code == "invalid_parameter"
    assert "targets[1] repeats targets[0]" in str(refused.value)


def test_cli_target_flags_become_the_targets_field(lowerctl: Run, program: Path) -> None:
    service = TargetsService()
    code, out, _ = lowerctl("submit", str(program), "--model-name", "m",
                            "--option", "freezing=true",
                            "--target", "cpu:cpp.march=x86-64-v2",
                            "--target", "cpu:cpp.march=x86-64-v3,max_autotune=true",
                            "--target", "cuda:0", "--target", "cuda",
                            transport=httpx.MockTransport(service))
    assert code == 0, out
    assert json.loads(service.fields[0]["targets"]) == [
        {"device": "cpu", "options": {"cpp.march": "x86-64-v2"}},
        {"device": "cpu", "options": {"cpp.march": "x86-64-v3", "max_autotune": True}},
        {"device": "cuda:0"}, {"device": "cuda"}]
    assert [job["device"] for job in json.loads(out)] == ["cpu", "cpu", "cuda:0", "cuda"]
    code, _, err = lowerctl("submit", str(program), "--model-name", "m", "--target", "cpu",
                            "--wait", transport=httpx.MockTransport(service))
    assert code != 0 and "one target" in err and len(service.fields) == 1
