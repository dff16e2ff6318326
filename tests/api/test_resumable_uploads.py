"""Resumable uploads (/v1/uploads) in process, on local storage: parts, resume, complete,
the gate, reuse by sha256, submit by id, and every hostile or broken request."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.api.conftest import Api

PART = 1024


@pytest.fixture
def linear(programs: Path) -> bytes:
    return (programs / "linear.pt2").read_bytes()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api(upload_part_bytes=PART, max_open_uploads=4)


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return str(body["error"]["message"])


def _create(api: Api, data: bytes, *, sha256: bool = True) -> httpx.Response:
    body: dict[str, Any] = {"size_bytes": len(data)}
    if sha256:
        body["sha256"] = hashlib.sha256(data).hexdigest()
    return api.client.post("/v1/uploads", json=body)


def _put(api: Api, url: str, content: bytes | AsyncIterator[bytes]) -> httpx.Response:
    return api.client.request("PUT", url, content=content)


def _chunks(data: bytes) -> list[bytes]:
    return [data[i:i + PART] for i in range(0, len(data), PART)]


def _send_all(api: Api, data: bytes) -> dict[str, Any]:
    created = _create(api, data)
    assert created.status_code == 201, created.text
    upload = created.json()
    for target, chunk in zip(upload["parts"], _chunks(data), strict=True):
        assert _put(api, target["url"], chunk).status_code == 200
    return dict(upload)


def _submit(api: Api, upload: str, **fields: str) -> httpx.Response:
    """A multipart form without a file (as ``curl -F upload=ID -F model_name=M``)."""
    form = {"model_name": "hold_m", "upload": upload, **fields}
    return api.client.post("/v1/lowerings",
                           files={name: (None, value) for name, value in form.items()})


def test_parts_resume_complete_and_submit_by_id_and_sha256(api: Api, linear: bytes) -> None:
    sha256 = hashlib.sha256(linear).hexdigest()
    created = _create(api, linear)
    assert created.status_code == 201, created.text
    upload = created.json()
    assert created.headers["location"] == f"/v1/uploads/{upload['id']}"
    count = -(-len(linear) // PART)
    assert upload["status"] == "receiving" and upload["part_count"] == count > 2
    assert upload["part_size_bytes"] == PART and upload["parts_received"] == []
    assert [p["number"] for p in upload["parts"]] == list(range(1, count + 1))
    assert upload["parts"][0] == {"number": 1, "method": "PUT",
                                  "url": f"/v1/uploads/{upload['id']}/parts/1"}
    chunks = _chunks(linear)
    # Part 2 arrives damaged (same size, other bytes), part 3 not at all: resend both.
    for number, chunk in enumerate(chunks, 1):
        if number == 2:
            chunk = bytes(len(chunk))
        if number != 3:
            assert _put(api, f"/v1/uploads/{upload['id']}/parts/{number}", chunk).json() == {
                "number": number, "size_bytes": len(chunk)}
    state = api.client.get(f"/v1/uploads/{upload['id']}").json()
    assert state["parts_received"] == [n for n in range(1, count + 1) if n != 3]
    assert [p["number"] for p in state["parts"]] == [3]  # where to send what is missing
    message = _error(api.client.post(f"/v1/uploads/{upload['id']}/complete"), 409,
                     "parts_missing")
    assert f"lacks 1 of its {count} parts: 3;" in message
    for number in (2, 3):
        assert _put(api, f"/v1/uploads/{upload['id']}/parts/{number}",
                    chunks[number - 1]).status_code == 200
    done = api.client.post(f"/v1/uploads/{upload['id']}/complete")
    assert done.status_code == 200, done.text
    ready = done.json()
    assert ready["status"] == "ready" and ready["sha256"] == sha256 and ready["parts"] == []
    assert ready["completed_at"] is not None
    # Completing again (a client that lost the answer) answers the same.
    assert api.client.post(f"/v1/uploads/{upload['id']}/complete").json()["status"] == "ready"
    kept = api.settings.uploads_dir / ".kept" / f"{upload['id']}.pt2"
    assert kept.is_file() and not (api.settings.uploads_dir / ".parts" / upload["id"]).exists()

    by_id = _submit(api, upload["id"])
    by_sha = _submit(api, f"sha256:{sha256}", model_name="hold_n")
    for response in (by_id, by_sha):
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["input"] == {"sha256": sha256, "size_bytes": len(linear)}
        # The job's input is the gate's copy, its own: deleting the job keeps the upload.
        assert (api.settings.uploads_dir / f"{job['id']}.pt2").read_bytes() == kept.read_bytes()
    # The same program submitted directly has the same cache and code keys.
    direct = api.client.post("/v1/lowerings", data={"model_name": "hold_m"},
                             files={"program": ("p.pt2", linear)})
    assert direct.status_code == 202, direct.text
    jobs = [api.services.store.get(r.json()["id"]) for r in (by_id, direct)]
    assert jobs[0]["code_key"] and jobs[0]["code_key"] == jobs[1]["code_key"]
    assert jobs[0]["cache_key"] and jobs[0]["cache_key"] == jobs[1]["cache_key"]
    assert jobs[1]["parent_id"] == jobs[0]["id"]  # coalesced with the queued identical job

    # Announcing the same bytes again: nothing to send.
    again = _create(api, linear)
    assert again.status_code == 200 and again.json()["id"] == upload["id"]
    assert again.json()["status"] == "ready" and again.json()["parts"] == []


def test_size_over_the_upload_limit_is_413_at_create(make_api: Callable[..., Api]) -> None:
    api = make_api(max_upload_bytes=10_000)
    message = _error(api.client.post("/v1/uploads", json={"size_bytes": 10_001}), 413,
                     "upload_too_large")
    assert "LOWERING_MAX_UPLOAD_BYTES" in message
    for body in ({"size_bytes": 0}, {"size_bytes": 5, "sha256": "XYZ"}, {"size_bytes": "x"},
                 {"size_bytes": 5, "other": 1}, []):
        _error(api.client.post("/v1/uploads", json=body), 422, "invalid_parameter")


def test_part_numbers_and_sizes_are_checked(api: Api, linear: bytes) -> None:
    upload = _create(api, linear).json()
    base, count = f"/v1/uploads/{upload['id']}/parts", upload["part_count"]
    for number in (0, count + 1):
        assert "out of range" in _error(_put(api, f"{base}/{number}", b"x"), 422,
                                        "invalid_part")
    _error(_put(api, f"{base}/99999999999999999999", b"x"), 422, "invalid_parameter")
    _error(_put(api, f"{base}/-1", b"x"), 422, "invalid_parameter")
    _error(_put(api, f"{base}/1", bytes(PART + 1)), 413, "part_too_large")
    # No Content-Length (chunked): stopped while it streams, nothing kept.
    async def chunked() -> AsyncIterator[bytes]:
        yield bytes(PART)
        yield b"more"

    _error(_put(api, f"{base}/1", chunked()), 413, "part_too_large")
    last = len(linear) - PART * (count - 1)
    _error(_put(api, f"{base}/{count}", bytes(last + 1)), 413, "part_too_large")
    assert f"must be {last}" in _error(_put(api, f"{base}/{count}", bytes(last - 1)), 422,
                                       "invalid_part")
    assert f"must be {PART}" in _error(_put(api, f"{base}/1", bytes(10)), 422, "invalid_part")
    assert api.client.get(f"/v1/uploads/{upload['id']}").json()["parts_received"] == []
    assert list((api.settings.uploads_dir / ".parts" / upload["id"]).iterdir()) == []


def test_a_sha256_mismatch_keeps_nothing(api: Api, linear: bytes) -> None:
    wrong = "0" * 64
    upload = api.client.post("/v1/uploads", json={"size_bytes": len(linear),
                                                  "sha256": wrong}).json()
    for target, chunk in zip(upload["parts"], _chunks(linear), strict=True):
        _put(api, target["url"], chunk)
    complete = f"/v1/uploads/{upload['id']}/complete"
    message = _error(api.client.post(complete), 422, "checksum_mismatch")
    assert wrong in message and hashlib.sha256(linear).hexdigest() in message
    assert _error(api.client.post(complete), 422, "checksum_mismatch") == message
    state = api.client.get(f"/v1/uploads/{upload['id']}").json()
    assert state["status"] == "failed" and state["error"]["code"] == "checksum_mismatch"
    assert not list((api.settings.uploads_dir / ".kept").glob("*"))
    assert not (api.settings.uploads_dir / ".parts" / upload["id"]).exists()
    _error(_put(api, upload["parts"][0]["url"], _chunks(linear)[0]), 409, "upload_closed")
    assert "sha256" in _error(_submit(api, upload["id"]), 409, "upload_not_ready")


def test_the_gate_refuses_as_for_a_direct_submit(api: Api) -> None:
    junk = b"this is not a zip archive" * 100
    direct = api.client.post("/v1/lowerings", data={"model_name": "m"},
                             files={"program": ("p.pt2", junk)})
    upload = _send_all(api, junk)
    refused = api.client.post(f"/v1/uploads/{upload['id']}/complete")
    assert refused.status_code == direct.status_code == 415
    assert refused.json() == direct.json()
    assert not list((api.settings.uploads_dir / ".kept").glob("*"))
    _error(_submit(api, f"sha256:{hashlib.sha256(junk).hexdigest()}"), 404, "unknown_upload")


@pytest.mark.parametrize("upload_id", [
    "0" * 32, "..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a" * 5000, "abc%00def", "A" * 32])
def test_unknown_or_impossible_ids_are_404(api: Api, upload_id: str) -> None:
    for method, suffix in (("GET", ""), ("POST", "/complete"), ("PUT", "/parts/1")):
        response = api.client.request(method, f"/v1/uploads/{upload_id}{suffix}", content=b"x")
        # ".." is resolved before routing: no upload route is reached at all.
        code = "unknown_upload"
        if ".." in upload_id or "2e" in upload_id:
            code = response.json()["error"]["code"]
            assert code in ("unknown_upload", "not_found")
        _error(response, 404, code)
    _error(_submit(api, upload_id), 404, "unknown_upload")
    assert not list((api.settings.uploads_dir / ".parts").glob("*"))


def test_submit_names_only_a_ready_upload(api: Api, linear: bytes) -> None:
    upload = _create(api, linear).json()
    assert "complete it first" in _error(_submit(api, upload["id"]), 409, "upload_not_ready")
    _error(_submit(api, "sha256:" + "f" * 64), 404, "unknown_upload")
    _error(_submit(api, "sha256:nothex"), 404, "unknown_upload")
    both = api.client.post("/v1/lowerings", data={"model_name": "m", "upload": upload["id"]},
                           files={"program": ("p.pt2", linear)})
    assert "not both" in _error(both, 422, "invalid_parameter")
    neither = api.client.post("/v1/lowerings", files={"model_name": (None, "m")})
    assert "'upload'" in _error(neither, 422, "missing_field")


def test_too_many_open_uploads_is_429(api: Api) -> None:
    for _ in range(4):
        assert api.client.post("/v1/uploads", json={"size_bytes": 10}).status_code == 201
    refused = api.client.post("/v1/uploads", json={"size_bytes": 10})
    assert "LOWERING_MAX_OPEN_UPLOADS=4" in _error(refused, 429, "too_many_uploads")
    assert int(refused.headers["retry-after"]) > 0


def test_a_part_after_complete_is_409(api: Api, linear: bytes) -> None:
    upload = _send_all(api, linear)
    assert api.client.post(f"/v1/uploads/{upload['id']}/complete").status_code == 200
    message = _error(_put(api, upload["parts"][0]["url"], _chunks(linear)[0]), 409,
                     "upload_closed")
    assert "ready" in message


def test_expired_uploads_are_swept(make_api: Callable[..., Api], linear: bytes) -> None:
    api = make_api(upload_part_bytes=PART, upload_ttl_s=0.5, max_open_uploads=1)
    upload = _create(api, linear).json()
    _put(api, upload["parts"][0]["url"], _chunks(linear)[0])
    parts = api.settings.uploads_dir / ".parts" / upload["id"]
    assert parts.is_dir()
    time.sleep(0.6)
    _error(api.client.get(f"/v1/uploads/{upload['id']}"), 404, "unknown_upload")
    # The next create sweeps it (and it no longer counts as open).
    assert _create(api, b"another program").status_code == 201
    assert not parts.exists()
    assert api.services.store.engine.connect().exec_driver_sql(
        f"SELECT count(*) FROM uploads WHERE id = '{upload['id']}'").scalar() == 0


def test_never_more_than_10000_parts(make_api: Callable[..., Api]) -> None:
    api = make_api(upload_part_bytes=PART, max_upload_bytes=2 * 1024**3)
    upload = api.client.post("/v1/uploads", json={"size_bytes": 2 * 1024**3}).json()
    assert upload["part_count"] <= 10_000 and len(upload["parts"]) == upload["part_count"]
    assert upload["part_size_bytes"] * upload["part_count"] >= 2 * 1024**3


def test_two_completes_at_once_assemble_once(api: Api, linear: bytes) -> None:
    upload = _send_all(api, linear)
    url = f"/v1/uploads/{upload['id']}/complete"

    async def both() -> list[httpx.Response]:
        answers: list[httpx.Response] = []

        async def one() -> None:
            answers.append(await api.client.http.post(url))

        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)
        return answers

    answers = api.client.portal.call(both)
    statuses = sorted(response.status_code for response in answers)
    assert statuses in ([200, 200], [200, 409]), [r.text for r in answers]
    for response in answers:
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "upload_closed"
    assert len(list((api.settings.uploads_dir / ".kept").iterdir())) == 1
    assert api.client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "ready"


def test_a_complete_whose_replica_died_is_reopened_by_the_sweep(api: Api,
                                                                 linear: bytes) -> None:
    import datetime as dt

    from sqlalchemy import update

    from app.jobs.models import uploads
    from app.jobs.store import utcnow

    upload = _send_all(api, linear)
    url = f"/v1/uploads/{upload['id']}"
    # A replica took the complete a minute ago and died in it: the row says assembling.
    with api.services.store.engine.begin() as conn:
        conn.execute(update(uploads).where(uploads.c.id == upload["id"]).values(
            status="assembling", assembling_since=utcnow() - dt.timedelta(minutes=1)))
    _error(api.client.post(f"{url}/complete"), 409, "upload_closed")
    assert api.services.janitor.retention.sweep().uploads_reopened == 0  # within the gate's time

    later = utcnow() + dt.timedelta(seconds=api.settings.gate_timeout_s + 900)
    assert api.services.janitor.retention.sweep(now=later).uploads_reopened == 1
    assert api.client.get(url).json()["status"] == "receiving"
    done = api.client.post(f"{url}/complete")
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "ready"
