"""The client's resumable upload (LoweringClient.upload, lowerctl submit --resumable / upload)
against the real routes in process: a dropped part is sent again, bytes the service holds
are not sent at all, and a refusal is the service's."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.client.cli import main
from app.client.exceptions import LoweringAPIError
from app.client.sdk import LoweringClient
from tests.api.conftest import Api

PART = 1024


class AppTransport(httpx.BaseTransport):
    """The in-process app behind a sync transport; ``drop`` lists requests ("PUT 2") whose
    first try loses its connection; ``seen`` records every request."""

    def __init__(self, api: Api, drop: set[str] | None = None) -> None:
        self.api = api
        self.drop = set(drop or ())
        self.seen: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        name = f"{request.method} {path.rsplit('/', 1)[-1]}" if "/parts/" in path else ""
        self.seen.append(f"{request.method} {path}")
        if name in self.drop:
            self.drop.discard(name)
            raise httpx.WriteError("connection reset by peer")
        response = self.api.client.request(request.method, str(request.url.raw_path.decode()),
                                           headers=dict(request.headers),
                                           content=request.read())
        return httpx.Response(response.status_code, headers=response.headers,
                              content=response.content)


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api(upload_part_bytes=PART)


@pytest.fixture
def linear(programs: Path) -> Path:
    return programs / "linear.pt2"


def _client(transport: AppTransport, **kwargs: object) -> LoweringClient:
    client = LoweringClient("http://api", transport=transport, **kwargs)  # type: ignore[arg-type]
    client.retry_pause_s = 0.01
    return client


def test_a_dropped_part_is_sent_again_and_known_bytes_not_at_all(api: Api,
                                                                  linear: Path) -> None:
    transport = AppTransport(api, drop={"PUT 2"})
    parts: list[tuple[int, int]] = []
    with _client(transport, resumable_threshold_bytes=0) as client:
        ready = client.upload(linear, on_part=lambda sent, count: parts.append((sent, count)))
        assert ready is not None and ready["status"] == "ready"
        assert ready["sha256"] == hashlib.sha256(linear.read_bytes()).hexdigest()
        puts = [line for line in transport.seen if line.startswith("PUT")]
        count = ready["part_count"]
        assert len(puts) == count + 1 and puts.count(f"PUT /v1/uploads/{ready['id']}/parts/2") == 2
        assert parts[-1] == (count, count)

        transport.seen.clear()
        job = client.submit(linear, model_name="hold_m")  # over the threshold (0): resumable
        assert job["input"]["sha256"] == ready["sha256"] and job["status"] == "queued"
        assert not [line for line in transport.seen if line.startswith("PUT")]
        assert transport.seen[0] == "POST /v1/uploads"


def test_a_refused_upload_raises_the_services_error(api: Api, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip" * 500)
    with _client(AppTransport(api)) as client, pytest.raises(LoweringAPIError) as caught:
        client.upload(junk)
    assert caught.value.status == 415 and caught.value.code == "not_a_pt2_archive"


def test_a_service_without_uploads_gets_a_direct_submit(linear: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/uploads":
            return httpx.Response(404, json={"error": {"code": "not_found",
                                                       "message": "Not Found"}})
        assert b'name="program"' in request.read()
        return httpx.Response(202, json={"id": "j1", "status": "queued"})

    with LoweringClient("http://old", transport=httpx.MockTransport(handler),
                        resumable_threshold_bytes=0) as client:
        assert client.submit(linear, model_name="m")["id"] == "j1"


def test_lowerctl_upload_then_submit_by_id_and_sha256(api: Api, linear: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    transport = AppTransport(api, drop={"PUT 1"})
    assert main(["--url", "http://api", "upload", str(linear)], transport=transport) == 0
    ready = json.loads(capsys.readouterr().out)
    assert ready["status"] == "ready"
    for name in (ready["id"], f"sha256:{ready['sha256']}"):
        assert main(["--url", "http://api", "submit", "--upload", name, "--model-name",
                     "hold_m"], transport=transport) == 0
        assert json.loads(capsys.readouterr().out)["input"]["sha256"] == ready["sha256"]
    assert main(["--url", "http://api", "submit", str(linear), "--resumable", "--model-name",
                 "hold_m"], transport=transport) == 0
    assert json.loads(capsys.readouterr().out)["input"]["sha256"] == ready["sha256"]
    assert main(["--url", "http://api", "submit", "--model-name", "m"],
                transport=transport) == 2
    assert "give FILE or --upload ID" in capsys.readouterr().err
    assert main(["--url", "http://api", "submit", "--upload", "0" * 32, "--model-name", "m"],
                transport=transport) == 2
    assert "unknown_upload" in capsys.readouterr().err
