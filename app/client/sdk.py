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
from app.client.exceptions import ChecksumMismatch, check
from app.constants import FINAL_STATUSES, JobStatus
from app.schemas import LoweringCreate

Job = dict[str, Any]
# The submit form's fields, from the service's own model: names and defaults cannot drift.
FORM = LoweringCreate.model_fields
_FINAL = frozenset(status.value for status in FINAL_STATUSES)
_DOWNLOAD_CHUNK_BYTES = 1 << 20


def _job_path(job_id: str, suffix: str = "") -> str:
    # Quote the id so a stray "/" or "?" cannot address another route.
    return f"/v1/lowerings/{quote(job_id, safe='')}{suffix}"


def _etag_sha256(response: httpx.Response) -> str | None:
    # The server sends the artifact's sha256 hex, quoted, as a strong ETag.
    value = response.headers.get("etag", "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


class LoweringClient:
    """Client for one lowering service.

    :param base_url: where the service listens, e.g. ``http://127.0.0.1:8000``.
    :param timeout_s: per-request network timeout (connect, and each read/write);
        ``wait`` has its own deadline.
    :param transport: an httpx transport to use instead of the network
        (``httpx.MockTransport`` in tests).

    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
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
    ) -> Job:
        """Upload a ``.pt2`` program and return the queued job (HTTP 202).

        The keywords are the form's fields (``app.schemas.LoweringCreate``); a tolerance
        left as None is the server's default (``/v1/info`` verification).
        """
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
        path = Path(path)
        # httpx reads an open file in chunks while encoding, so a large program is
        # never held in memory whole.
        with path.open("rb") as program:
            files = {"program": (path.name, program, "application/zip")}
            response = self._request("POST", "/v1/lowerings", data=fields, files=files)
        return response.json()

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
