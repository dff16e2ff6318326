"""Multipart uploads streamed to disk while hashed; never held whole in memory.

Starlette's own form parser spools files without a size cap, so the body is fed
to python-multipart's push parser here: the cap is enforced while bytes arrive
and a partial file is removed on any failure (too large, bad framing, client gone).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TypeVar

from anyio import to_thread
from python_multipart.multipart import MultipartParser, parse_options_header

from app.constants import CHUNK_BYTES
from app.errors import ApiErrorCode, BadRequest, PayloadTooLarge, UnsupportedMediaType

_T = TypeVar("_T")
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
# RFC 2046 5.1.1: 1-70 of these characters, the last not a space.
BOUNDARY_RE = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
BOUNDARY_RULE = ("a multipart boundary is 1-70 characters from A-Z a-z 0-9 ' ( ) + _ , - . / : = ? "
                 "and space, not ending in a space (RFC 2046)")


def _malformed(message: str) -> BadRequest:
    return BadRequest(f"malformed multipart body: {message}", code=ApiErrorCode.MALFORMED_MULTIPART)


@dataclass
class ReceivedForm:
    """What a multipart body held: text fields and at most one file, already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    file_path: Path | None = None
    filename: str | None = None
    sha256: str = ""
    size_bytes: int = 0

    def discard(self) -> None:
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


class _FormSink:
    """Callback target for MultipartParser; collects fields, buffers file bytes."""

    def __init__(self, *, file_field: str, dest_dir: Path, max_file_bytes: int) -> None:
        self.file_field = file_field
        self.dest_dir = dest_dir
        self.max_file_bytes = max_file_bytes
        self.form = ReceivedForm()
        self.hasher = hashlib.sha256()
        self.handle: IO[bytes] | None = None
        self.pending = bytearray()
        self._header_field = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._is_file = False
        self._value = bytearray()
        self.complete = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_cb,
            "on_header_value": self._header_value_cb,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.complete = True

    def _part_begin(self) -> None:
        self._headers, self._header_field, self._value = {}, b"", bytearray()

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field = data[start:end].lower()

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        key = self._header_field
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or not params.get(b"name"):
            raise _malformed("every part needs a 'Content-Disposition: form-data; name=...' "
                             "header with a non-empty name")
        self._name = params[b"name"].decode("utf-8", "replace")
        # The program is the file part, with or without a filename (curl -F 'program=<f').
        self._is_file = b"filename" in params or self._name == self.file_field
        if self._is_file:
            if self._name != self.file_field:
                raise BadRequest(f"unexpected file field {self._name[:80]!r}; send the program "
                                 f"as {self.file_field!r}")
            if self.handle is not None:
                raise BadRequest(f"send exactly one {self.file_field!r} file")
            self.form.filename = params.get(b"filename", b"").decode("utf-8", "replace")
            self.form.file_path = self.dest_dir / f".upload-{uuid.uuid4().hex}.part"
            self.handle = self.form.file_path.open("wb")
        elif self._name in self.form.fields:
            raise BadRequest(f"form field {self._name[:80]!r} appears more than once; send it once",
                             code=ApiErrorCode.DUPLICATE_FIELD)
        elif len(self.form.fields) >= MAX_FIELDS:
            raise BadRequest("too many form fields")
        else:
            self.form.fields[self._name] = ""  # claimed now, so a repeat is caught above

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]  # copied once, into the pending block
        if self._is_file:
            self.form.size_bytes += len(chunk)
            if self.form.size_bytes > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"upload exceeds the limit of {self.max_file_bytes} bytes "
                    "(LOWERING_MAX_UPLOAD_BYTES)"
                )
            self.pending += chunk
        else:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(
                    f"form field {self._name[:80]!r} exceeds {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if not self._is_file:
            try:
                self.form.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"form field {self._name[:80]!r} is not UTF-8 text") from exc

    async def flush(self, *, force: bool = False) -> None:
        # Disk writes and hashing run off the event loop; batching keeps the hops few.
        if self.handle is None or not self.pending:
            return
        if len(self.pending) < CHUNK_BYTES and not force:
            return
        block, self.pending = self.pending, bytearray()  # handed over, not copied
        await to_thread.run_sync(self._write, block)

    def _write(self, block: bytearray) -> None:
        assert self.handle is not None
        self.hasher.update(block)
        self.handle.write(block)


async def receive_form(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    *,
    dest_dir: Path,
    max_file_bytes: int,
    file_field: str = "program",
) -> ReceivedForm:
    """Parse a multipart body from ``chunks``; the file lands in ``dest_dir``."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UnsupportedMediaType(
            "send multipart/form-data with the program file in the field 'program'",
            code=ApiErrorCode.NOT_MULTIPART,
        )
    boundary = params[b"boundary"]
    if not BOUNDARY_RE.fullmatch(boundary):
        raise _malformed(f"the boundary in Content-Type is not valid: {BOUNDARY_RULE}")
    sink = _FormSink(file_field=file_field, dest_dir=dest_dir, max_file_bytes=max_file_bytes)
    try:
        parser = _framing(lambda: MultipartParser(boundary, sink.callbacks()))  # type: ignore[arg-type]
        async for chunk in chunks:
            _framing(partial(parser.write, chunk))
            await sink.flush()
        _framing(parser.finalize)
        if not sink.complete:
            raise _malformed("the body ended before its closing boundary (truncated upload)")
        await sink.flush(force=True)
        if sink.handle is not None:
            await to_thread.run_sync(sink.handle.close)
    except BaseException:
        if sink.handle is not None:
            sink.handle.close()
        sink.form.discard()
        raise
    sink.form.sha256 = sink.hasher.hexdigest() if sink.handle is not None else ""
    return sink.form


def _framing(step: Callable[[], _T]) -> _T:
    """Run one parser step; python-multipart's own errors become a 400 saying why."""
    try:
        return step()
    except (BadRequest, PayloadTooLarge):
        raise
    except Exception as exc:  # FormParserError, MultipartParseError, and anything alike
        raise _malformed(str(exc)[:300] or type(exc).__name__) from exc
