"""A small synchronous client for the lowering service (httpx; never imports torch).

Errors live in ``app.client.exceptions``; transport failures surface as httpx.TransportError
(ConnectError, ReadTimeout, ...), and ``wait`` raises the builtin TimeoutError when its
deadline passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from app import __version__
from app.client.exceptions import ChecksumMismatch, LoweringAPIError, check
from app.constants import FINAL_STATUSES, JobStatus
from app.schemas import LoweringCreate

Job = dict[str, Any]
# The submit form's fields, from the service's own model: names and defaults cannot drift.
FORM = LoweringCreate.model_fields
_FINAL = frozenset(status.value for status in FINAL_STATUSES)
_DOWNLOAD_CHUNK_BYTES = 1 << 20
RESUMABLE_THRESHOLD_BYTES = 256 * 1024**2
"""Programs at least this large are sent as resumable uploads (in parts) by ``submit``."""
PART_ATTEMPTS = 4  # tries of one part before it is left for the next round
UPLOAD_ROUNDS = 4  # rounds of (send what is missing, complete)


def _job_path(job_id: str, suffix: str = "") -> str:
    # Quote the id so a stray "/" or "?" cannot address another route.
    return f"/v1/lowerings/{quote(job_id, safe='')}{suffix}"


def _etag_sha256(response: httpx.Response) -> str | None:
    # The server sends the artifact's sha256 hex, quoted, as a strong ETag.
    value = response.headers.get("etag", "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def _form(*, model_name: str, backend_id: str, device: str, options: dict[str, Any] | None,
          verify: bool, rtol: float | None, atol: float | None,
          callback_url: str | None = None) -> dict[str, str]:
    fields = {
        "model_name": model_name,
        "backend_id": backend_id,
        "device": device,
        "options": json.dumps(options or {}),
        "verify": "true" if verify else "false",
    }
    # Only send tolerances the caller chose, so the server's defaults apply otherwise.
    if rtol is not None:
        fields["rtol"] = repr(float(rtol))
    if atol is not None:
        fields["atol"] = repr(float(atol))
    if callback_url is not None:
        fields["callback_url"] = callback_url
    return fields


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(_DOWNLOAD_CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class LoweringClient:
    """Client for one lowering service.

    :param base_url: where the service listens, e.g. ``http://127.0.0.1:8000``.
    :param timeout_s: per-request network timeout (connect, and each read/write);
        ``wait`` has its own deadline.
    :param transport: an httpx transport to use instead of the network
        (``httpx.MockTransport`` in tests).
    :param resumable_threshold_bytes: ``submit`` sends a program at least this large as a
        resumable upload (``upload``): in parts, each retried, skipped entirely when the
        service already holds the same bytes; 0 for every program, None for none.

    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        resumable_threshold_bytes: int | None = RESUMABLE_THRESHOLD_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.resumable_threshold_bytes = resumable_threshold_bytes
        self.retry_pause_s = 0.5
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            headers={"User-Agent": f"lowerctl/{__version__}"},
        )

    def __enter__(self) -> LoweringClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return check(self._http.request(method, url, **kwargs))

    def submit(
        self,
        path: str | os.PathLike[str],
        *,
        model_name: str,
        backend_id: str = FORM["backend_id"].default,
        device: str = FORM["device"].default,
        options: dict[str, Any] | None = None,
        verify: bool = FORM["verify"].default,
        rtol: float | None = FORM["rtol"].default,
        atol: float | None = FORM["atol"].default,
        callback_url: str | None = FORM["callback_url"].default,
    ) -> Job:
        """Upload a ``.pt2`` program and return the queued job (HTTP 202).

        The keywords are the form's fields (``app.schemas.LoweringCreate``); a tolerance
        left as None is the server's default (``/v1/info`` verification). A program of
        ``resumable_threshold_bytes`` or more goes as a resumable upload (``upload``).
        """
        fields = _form(model_name=model_name, backend_id=backend_id, device=device,
                       options=options, verify=verify, rtol=rtol, atol=atol,
                       callback_url=callback_url)
        path = Path(path)
        threshold = self.resumable_threshold_bytes
        if threshold is not None and path.stat().st_size >= threshold:
            ready = self.upload(path)
            if ready is not None:
                return self._submit_form(fields, ready["id"])
        # httpx reads an open file in chunks while encoding, so a large program is
        # never held in memory whole.
        with path.open("rb") as program:
            files = {"program": (path.name, program, "application/zip")}
            response = self._request("POST", "/v1/lowerings", data=fields, files=files)
        return response.json()

    def submit_upload(
        self,
        upload: str,
        *,
        model_name: str,
        backend_id: str = FORM["backend_id"].default,
        device: str = FORM["device"].default,
        options: dict[str, Any] | None = None,
        verify: bool = FORM["verify"].default,
        rtol: float | None = FORM["rtol"].default,
        atol: float | None = FORM["atol"].default,
        callback_url: str | None = FORM["callback_url"].default,
    ) -> Job:
        """Queue the lowering of a ready upload, named by its id or ``sha256:<hex>``."""
        return self._submit_form(_form(model_name=model_name, backend_id=backend_id,
                                       device=device, options=options, verify=verify,
                                       rtol=rtol, atol=atol, callback_url=callback_url),
                                  upload)

    def _submit_form(self, fields: dict[str, str], upload: str) -> Job:
        # A multipart body without a file, as the form is: (None, value) is a plain field.
        parts = {name: (None, value) for name, value in {**fields, "upload": upload}.items()}
        return self._request("POST", "/v1/lowerings", files=parts).json()

    def upload(self, path: str | os.PathLike[str], *,
               on_part: Callable[[int, int], None] | None = None) -> Job | None:
        """Send a program as a resumable upload and return it ready (gated), or None when
        the service has no resumable uploads (an older release).

        Nothing is sent when the service already holds these bytes (by sha256). Each part
        is retried after a dropped connection or a 5xx; parts still missing are sent again
        in the next round, as the service lists them. ``on_part(sent, count)`` is called
        after each part. A refusal (the gate's, a size or sha256 mismatch) raises
        LoweringAPIError, as a direct submit would.
        """
        path = Path(path)
        size, sha256 = _size_and_sha256(path)
        try:
            upload = self._request("POST", "/v1/uploads",
                                   json={"size_bytes": size, "sha256": sha256}).json()
        except LoweringAPIError as exc:
            if exc.status in (404, 405) and exc.code in ("not_found", "method_not_allowed",
                                                         "http_404", "http_405"):
                return None
            raise
        path_of = f"/v1/uploads/{quote(upload['id'], safe='')}"
        for _ in range(UPLOAD_ROUNDS):
            if upload["status"] == "ready":
                return upload
            sent = upload["part_count"] - len(upload["parts"])
            with path.open("rb") as program:
                for target in upload["parts"]:
                    self._send_part(program, upload, target)
                    sent += 1
                    if on_part is not None:
                        on_part(sent, upload["part_count"])
            try:
                return self._complete(path_of)
            except LoweringAPIError as exc:
                if exc.code not in ("parts_missing", "invalid_part"):
                    raise
            upload = self._request("GET", path_of).json()
        return self._complete(path_of)  # raises what is still wrong

    def _send_part(self, program: Any, upload: Job, target: Job) -> None:
        """PUT one part, retried; left for the next round when every try fails."""
        program.seek((target["number"] - 1) * upload["part_size_bytes"])
        body = program.read(upload["part_size_bytes"])
        for attempt in range(PART_ATTEMPTS):
            try:
                response = self._http.request(target.get("method", "PUT"), target["url"],
                                              content=body)
            except httpx.TransportError:
                pass
            else:
                if response.status_code < 500:
                    check(response)
                    return
            time.sleep(self.retry_pause_s * 2**attempt)

    def _complete(self, path_of: str) -> Job:
        """POST complete; a connection dropped while the gate runs is waited out."""
        for _ in range(PART_ATTEMPTS):
            try:
                return self._request("POST", f"{path_of}/complete").json()
            except httpx.TransportError:
                pass
            except LoweringAPIError as exc:
                if exc.code != "upload_closed" and exc.status < 500:
                    raise
            while (state := self._request("GET", path_of).json())["status"] == "assembling":
                time.sleep(self.retry_pause_s)
            if state["status"] == "ready":
                return state
        return self._request("POST", f"{path_of}/complete").json()

    def get_upload(self, upload: str) -> Job:
        """Return one resumable upload: its status and the parts still to send."""
        return self._request("GET", f"/v1/uploads/{quote(upload, safe='')}").json()

    def get(self, job_id: str) -> Job:
        """Return one job."""
        return self._request("GET", _job_path(job_id)).json()

    def list(
        self,
        *,
        status: JobStatus | str | None = None,
        model_name: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Return one page: ``{"items": [...], "next_cursor": str | None}``, newest first."""
        query = {
            "status": None if status is None else JobStatus(status).value,
            "model_name": model_name,
            "limit": limit,
            "cursor": cursor,
        }
        params = {key: str(value) for key, value in query.items() if value is not None}
        return self._request("GET", "/v1/lowerings", params=params).json()

    def iter_all(
        self,
        *,
        status: JobStatus | str | None = None,
        model_name: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """Yield every matching job, following ``next_cursor``; ``limit`` is the page size."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, model_name=model_name, limit=limit, cursor=cursor)
            yield from page.get("items", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.5,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled; return it.

        ``on_update(job)`` is called after every poll. Raises TimeoutError once
        ``timeout_s`` has passed with the job still queued or running.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.get("status") in _FINAL:
                return job
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout_s}s")
            time.sleep(min(poll_s, left))

    def download(self, job_id: str, out_path: str | os.PathLike[str]) -> Path:
        """Save the job's artifact to ``out_path`` (a directory keeps the server's file name).

        The bytes go to a temp file beside the target and are renamed into place only
        after their sha256 matches the ETag, so a partial or corrupt file never appears
        under the final name. Raises ChecksumMismatch otherwise.
        """
        out = Path(out_path)
        with self._http.stream("GET", _job_path(job_id, "/artifact")) as response:
            check(response)
            if out.is_dir():
                disposition = response.headers.get("content-disposition", "")
                match = re.search(r'filename="?([^";]+)"?', disposition)
                out = out / Path(match.group(1) if match else f"{job_id}.pt2").name
            expected = _etag_sha256(response)
            digest = hashlib.sha256()
            fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as tmp:
                    for chunk in response.iter_bytes(_DOWNLOAD_CHUNK_BYTES):
                        digest.update(chunk)
                        tmp.write(chunk)
                if expected is None:
                    # No usable ETag (e.g. stripped by a proxy): the job record has the hash.
                    expected = (self.get(job_id).get("artifact") or {}).get("sha256")
                if expected is not None and digest.hexdigest() != expected.lower():
                    raise ChecksumMismatch(job_id, expected, digest.hexdigest())
                os.replace(tmp_name, out)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        return out

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; return it."""
        return self._request("POST", _job_path(job_id, "/cancel")).json()

    def delete(self, job_id: str) -> None:
        """Delete a job with its upload, artifact and log."""
        self._request("DELETE", _job_path(job_id))

    def log(self, job_id: str) -> str:
        """Return the job's worker log as text."""
        return self._request("GET", _job_path(job_id, "/log")).text

    def info(self) -> dict[str, Any]:
        """Return ``/v1/info``: versions, backends and the options they accept."""
        return self._request("GET", "/v1/info").json()

    def health(self) -> dict[str, Any]:
        """Return ``/healthz``."""
        return self._request("GET", "/healthz").json()
