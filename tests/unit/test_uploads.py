"""The streaming multipart parser: caps while reading, cleans up on every failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from app.storage.uploads import receive_form
from tests.strategies import RawMultipart, multipart_bodies

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


def _framed(boundary: str, parts: list[bytes], close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


_NAME_PART = b'Content-Disposition: form-data; name="model_name"\r\n\r\nm'
_FILE_PART = b'Content-Disposition: form-data; name="program"; filename="m.pt2"\r\n\r\nPK'


@pytest.mark.parametrize("length", [1, 2, 40, 69, 70, 71, 100, 255, 256, 257, 300, 5000])
def test_boundary_of_any_length_is_parsed_or_400(tmp_path: Path, length: int) -> None:
    boundary = ("ab0'()+_,-./:=?" * 400)[:length]
    body = _framed(boundary, [_NAME_PART, _FILE_PART])
    ctype = f'multipart/form-data; boundary="{boundary}"'
    if length <= 70:  # RFC 2046: 1-70 characters
        form = _receive(_chunks(body), tmp_path, ctype=ctype)
        assert form.fields == {"model_name": "m"} and form.size_bytes == 2
        form.discard()
    else:
        with pytest.raises(BadRequest, match="boundary"):
            _receive(_chunks(body), tmp_path, ctype=ctype)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("boundary", ["a b ", "a\x7fb", "a\u00e9b", "a;b\"", "a\\b", "a{b}"])
def test_boundary_with_characters_outside_rfc2046_is_400(tmp_path: Path, boundary: str) -> None:
    body = _framed(boundary, [_NAME_PART, _FILE_PART])
    with pytest.raises((BadRequest, UnsupportedMediaType)):
        _receive(_chunks(body), tmp_path,
                 ctype=f'multipart/form-data; boundary="{boundary}"')


@pytest.mark.parametrize(
    ("parts", "says"),
    [
        ([_NAME_PART, _NAME_PART, _FILE_PART], "more than once"),
        ([b"Content-Type: text/plain\r\n\r\nm", _FILE_PART], "name"),
        ([b'Content-Disposition: form-data; name=""\r\n\r\nm', _FILE_PART], "name"),
        ([b'Content-Disposition: attachment; name="model_name"\r\n\r\nm', _FILE_PART],
         "form-data"),
        ([_NAME_PART, b"\r\n\r\n"], "name"),
        ([_NAME_PART, b"X-Nothing\r\n\r\nabc"], "header"),
        ([_NAME_PART] + [b"X-H: v\r\n" * 20 + b"\r\n" + _FILE_PART], "header"),
    ],
)
def test_bad_parts_are_400(tmp_path: Path, parts: list[bytes], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        _receive(_chunks(_framed(BOUNDARY, parts)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_program_sent_as_a_text_part_is_still_the_program(tmp_path: Path) -> None:
    # curl -F "program=<file" sends the file without a filename.
    part = b'Content-Disposition: form-data; name="program"\r\n\r\nPK\x03\x04'
    form = _receive(_chunks(_framed(BOUNDARY, [_NAME_PART, part])), tmp_path)
    assert form.fields == {"model_name": "m"}
    assert form.file_path is not None and form.file_path.read_bytes() == b"PK\x03\x04"
    form.discard()


@pytest.mark.parametrize("cut", [3, 10, 30, 60, 90, 120, 150])
def test_truncated_body_is_400(tmp_path: Path, cut: int) -> None:
    body = _framed(BOUNDARY, [_NAME_PART, _FILE_PART])
    with pytest.raises(BadRequest):
        _receive(_chunks(body[:-cut], size=7), tmp_path)
    assert list(tmp_path.iterdir()) == []


@given(raw=multipart_bodies(), chunk=st.integers(1, 5000))
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_fuzzed_multipart_is_parsed_or_a_4xx(tmp_path: Path, raw: RawMultipart,
                                              chunk: int) -> None:
    try:
        form = _receive(_chunks(raw.body, size=chunk), tmp_path,
                        ctype=raw.content_type.decode("latin-1"))
    except ServiceError as exc:
        assert 400 <= exc.status < 500, exc
        assert exc.message
    else:
        assert all(isinstance(v, str) for v in form.fields.values())
        form.discard()
    assert list(tmp_path.iterdir()) == []
