"""The streaming multipart parser: caps while reading, cleans up on every failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.storage.uploads import receive_form

BOUNDARY = "b0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _body(payload: bytes, **fields: str) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="program"; '
                 f'filename="m.pt2"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                 + payload + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def _chunks(body: bytes, size: int = 7000, fail_after: int | None = None
                  ) -> AsyncIterator[bytes]:
    for i, start in enumerate(range(0, len(body), size)):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("client went away")
        yield body[start:start + size]


def _receive(body_iter: AsyncIterator[bytes], dest: Path, ctype: str = CTYPE,
             max_bytes: int = 10**7):  # type: ignore[no-untyped-def]
    return asyncio.run(receive_form(body_iter, ctype, dest_dir=dest, max_file_bytes=max_bytes))


def test_fields_and_file_are_received_and_hashed(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 9000  # > 2 MiB: several flushes
    form = _receive(_chunks(_body(payload, model_name="m", device="cpu")), tmp_path)
    assert form.fields == {"model_name": "m", "device": "cpu"}
    assert form.file_path is not None and form.file_path.read_bytes() == payload
    assert form.sha256 == hashlib.sha256(payload).hexdigest()
    assert form.size_bytes == len(payload)


def test_over_cap_stops_and_removes_partial_file(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        _receive(_chunks(_body(b"x" * 50_000)), tmp_path, max_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_disconnect_mid_upload_removes_partial_file(tmp_path: Path) -> None:
    with pytest.raises(ConnectionResetError):
        _receive(_chunks(_body(b"y" * 3_000_000), size=65536, fail_after=20), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_not_multipart_and_two_files(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedMediaType):
        _receive(_chunks(b"{}"), tmp_path, ctype="application/json")
    twice = _body(b"a").replace(f"--{BOUNDARY}--\r\n".encode(), b"") + _body(b"b")
    with pytest.raises(BadRequest):
        _receive(_chunks(twice), tmp_path)
    assert list(tmp_path.iterdir()) == []
