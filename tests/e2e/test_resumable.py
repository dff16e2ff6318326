"""A resumable upload through a real server: parts (one dropped mid-send and sent again),
complete (the gate), then lowerings submitted by upload id, by sha256 and by lowerctl,
verified. One server, one lowering; the rest are cache hits."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.client.cli import main
from tests.conftest import Server

PART = 4096


def _dropped(chunk: bytes) -> Iterator[bytes]:
    """Half a part, then the connection goes (the client dies mid-send)."""
    yield chunk[:len(chunk) // 2]
    raise ConnectionResetError("the connection dropped")


def _missing(http: httpx.Client, upload_id: str, expected: list[int]) -> dict[str, object]:
    deadline = time.monotonic() + 10  # the server notices the dropped part when it reads
    while True:
        state = http.get(f"/v1/uploads/{upload_id}").json()
        if [part["number"] for part in state["parts"]] == expected:
            return dict(state)
        assert time.monotonic() < deadline, state
        time.sleep(0.1)


def test_parts_resume_complete_and_lower_by_id_sha256_and_lowerctl(
    start_server: Callable[..., Server], programs: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(upload_part_bytes=PART)
    program = programs / "convnet.pt2"
    data = program.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    chunks = [data[i:i + PART] for i in range(0, len(data), PART)]
    with httpx.Client(base_url=server.url, timeout=600) as http:
        created = http.post("/v1/uploads", json={"size_bytes": len(data), "sha256": sha256})
        assert created.status_code == 201, created.text
        upload = created.json()
        assert upload["part_count"] == len(chunks) > 3
        for target, chunk in zip(upload["parts"], chunks, strict=True):
            if target["number"] == 3:
                with pytest.raises((httpx.TransportError, ConnectionResetError)):
                    http.put(target["url"], content=_dropped(chunk))
                continue
            assert http.put(target["url"], content=chunk).status_code == 200
        state = _missing(http, upload["id"], [3])
        assert 3 not in state["parts_received"]  # type: ignore[operator]
        assert http.post(f"/v1/uploads/{upload['id']}/complete").json()["error"]["code"] == (
            "parts_missing")
        assert http.put(f"/v1/uploads/{upload['id']}/parts/3", content=chunks[2]).status_code == 200
        ready = http.post(f"/v1/uploads/{upload['id']}/complete")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready" and ready.json()["sha256"] == sha256

        lowered = http.post("/v1/lowerings", params={"wait": 600}, files={
            "model_name": (None, "convnet"), "upload": (None, upload["id"])})
        assert lowered.status_code == 200, lowered.text
        job = http.get(f"/v1/lowerings/{lowered.headers['x-lowering-id']}").json()
        assert job["status"] == "succeeded" and job["verification"]["passed"] is True
        assert job["input"] == {"sha256": sha256, "size_bytes": len(data)}
        with zipfile.ZipFile(io.BytesIO(lowered.content)) as archive:
            assert any(name.endswith("convnet-aoti.json") for name in archive.namelist())

        by_sha = http.post("/v1/lowerings", params={"wait": 600}, files={
            "model_name": (None, "convnet"), "upload": (None, f"sha256:{sha256}")})
        assert by_sha.status_code == 200 and by_sha.content == lowered.content
        hit = http.get(f"/v1/lowerings/{by_sha.headers['x-lowering-id']}").json()
        assert hit["cache_hit"] is True

    # lowerctl finds the bytes on the server by sha256 and sends none of them.
    assert main(["--url", server.url, "submit", str(program), "--resumable", "--model-name",
                 "convnet", "--wait"]) == 0
    assert '"cache_hit": true' in capsys.readouterr().out
