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
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload
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
EVENTS_READ_TIMEOUT_S = 45.0
"""The least read timeout of an events stream: the service sends a heartbeat every 15 s."""
MAX_EVENTS_WAIT_S = 86_400.0  # the largest ?wait= the events route takes
_NOT_EVENT_STREAM = "not_an_event_stream"


def _job_path(job_id: str, suffix: str = "") -> str:
    # Quote the id so a stray "/" or "?" cannot address another route.
    return f"/v1/lowerings/{quote(job_id, safe='')}{suffix}"


def _etag_sha256(response: httpx.Response) -> str | None:
    # The server sends the artifact's sha256 hex, quoted, as a strong ETag.
    value = response.headers.get("etag", "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def _form(*, model_name: str, backend_id: str, device: str, options: dict[str, Any] | None,
          verify: bool, rtol: float | None, atol: float | None,
          callback_url: str | None = None,
          targets: list[dict[str, Any]] | None = None) -> dict[str, str]:
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
    if targets is not None:
        fields["targets"] = json.dumps(targets)
    return fields


def _submitted(body: Job) -> Job | list[Job]:
    """A submit's answer: the job, or (a submit with targets) the list of its jobs."""
    return list(body["lowerings"]) if "lowerings" in body else body


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched Server-Sent Event: its type (``message`` unless named), its data
    (the data lines joined by newlines), the last event id seen so far in the stream, and
    the reconnect delay the server asked for (ms), if any."""

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Parse a text/event-stream, already split into lines, as the HTML standard says:
    comments (``:`` lines, the heartbeats) are skipped, a blank line dispatches the event
    (none when it has no data), and an event the stream cut off before its blank line is
    dropped."""
    event, data = "", list[str]()
    last_id: str | None = None
    retry: int | None = None
    for number, line in enumerate(lines):
        if number == 0:
            line = line.removeprefix("\ufeff")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id, retry)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(_DOWNLOAD_CHUNK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


API_KEY_ENV = "LOWERING_API_KEY"


class _BearerToOrigin(httpx.Auth):
    """``Authorization: Bearer <key>`` on requests to the service only: never on a part
    PUT to a presigned object-store URL (the key would leak, and S3 refuses two auths)."""

    def __init__(self, key: str, base_url: str) -> None:
        self.header = f"Bearer {key}"
        self.origin = httpx.URL(base_url)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        url = request.url
        if (url.scheme, url.host, url.port) == (self.origin.scheme, self.origin.host,
                                                self.origin.port):
            request.headers["Authorization"] = self.header
        yield request


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
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.resumable_threshold_bytes = resumable_threshold_bytes
        self.retry_pause_s = 0.5
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            headers={"User-Agent": f"lowerctl/{__version__}"},
            auth=_BearerToOrigin(api_key, self.base_url) if api_key else None,
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

    @overload
    def submit(
        self, path: str | os.PathLike[str], *, model_name: str, backend_id: str = ...,
        device: str = ..., options: dict[str, Any] | None = ..., verify: bool = ...,
        rtol: float | None = ..., atol: float | None = ..., callback_url: str | None = ...,
        targets: None = ...,
    ) -> Job: ...

    @overload
    def submit(
        self, path: str | os.PathLike[str], *, model_name: str, backend_id: str = ...,
        device: str = ..., options: dict[str, Any] | None = ..., verify: bool = ...,
        rtol: float | None = ..., atol: float | None = ..., callback_url: str | None = ...,
        targets: list[dict[str, Any]],
    ) -> list[Job]: ...

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
        targets: list[dict[str, Any]] | None = FORM["targets"].default,
    ) -> Job | list[Job]:
        """Upload a ``.pt2`` program and return the queued job (HTTP 202).

        The keywords are the form's fields (``app.schemas.LoweringCreate``); a tolerance
        left as None is the server's default (``/v1/info`` verification). A program of
        ``resumable_threshold_bytes`` or more goes as a resumable upload (``upload``).
        ``targets`` (each a dict of ``device`` and/or ``options``, merged over ``options``):
        one job per target, sharing the upload; the list of jobs is returned, in order.
        """
        fields = _form(model_name=model_name, backend_id=backend_id, device=device,
                       options=options, verify=verify, rtol=rtol, atol=atol,
                       callback_url=callback_url, targets=targets)
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
        return _submitted(response.json())

    @overload
    def submit_upload(
        self, upload: str, *, model_name: str, backend_id: str = ..., device: str = ...,
        options: dict[str, Any] | None = ..., verify: bool = ..., rtol: float | None = ...,
        atol: float | None = ..., callback_url: str | None = ..., targets: None = ...,
    ) -> Job: ...

    @overload
    def submit_upload(
        self, upload: str, *, model_name: str, backend_id: str = ..., device: str = ...,
        options: dict[str, Any] | None = ..., verify: bool = ..., rtol: float | None = ...,
        atol: float | None = ..., callback_url: str | None = ...,
        targets: list[dict[str, Any]],
    ) -> list[Job]: ...

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
        targets: list[dict[str, Any]] | None = FORM["targets"].default,
    ) -> Job | list[Job]:
        """Queue the lowering of a ready upload, named by its id or ``sha256:<hex>``
        (with ``targets``, one job per target, as ``submit``)."""
        return self._submit_form(_form(model_name=model_name, backend_id=backend_id,
                                       device=device, options=options, verify=verify,
                                       rtol=rtol, atol=atol, callback_url=callback_url,
                                       targets=targets),
                                  upload)

    def _submit_form(self, fields: dict[str, str], upload: str) -> Job | list[Job]:
        # A multipart body without a file, as the form is: (None, value) is a plain field.
        parts = {name: (None, value) for name, value in {**fields, "upload": upload}.items()}
        return _submitted(self._request("POST", "/v1/lowerings", files=parts).json())

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

    def events(self, job_id: str, *, wait_s: float | None = None,
               last_event_id: str | None = None) -> Iterator[Job]:
        """Yield the job from ``GET /v1/lowerings/{id}/events``: as it is on connect, then
        each time its status, phase or queue position changes. Each is the job as ``get``
        returns it plus ``queue_position`` (queued jobs ahead of it; None unless queued)
        and, for a coalesced job, ``leader`` ({id, status, phase} of the job it waits on).

        Ends after a final status, or when the service closes the stream first (after
        ``wait_s`` or its LOWERING_MAX_WAIT_S, or as it stops): call again to go on.
        Raises LoweringAPIError on an error answer (404 also when the service has no
        events route) or an answer that is not an event stream, httpx.TransportError
        when the connection breaks.
        """
        for event in self._event_stream(job_id, wait_s=wait_s, last_event_id=last_event_id):
            yield json.loads(event.data)

    def _event_stream(self, job_id: str, *, wait_s: float | None,
                      last_event_id: str | None) -> Generator[ServerSentEvent, None, None]:
        params = {} if wait_s is None else {"wait": repr(min(max(0.0, wait_s),
                                                             MAX_EVENTS_WAIT_S))}
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = self._http.timeout
        read = None if timeout.read is None else max(timeout.read, EVENTS_READ_TIMEOUT_S)
        with self._http.stream(
            "GET", _job_path(job_id, "/events"), params=params, headers=headers,
            timeout=httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write,
                                  pool=timeout.pool),
        ) as response:
            check(response)
            media_type = response.headers.get("content-type", "").partition(";")[0].strip()
            if media_type.lower() != "text/event-stream":
                raise LoweringAPIError(response.status_code, _NOT_EVENT_STREAM,
                                       f"the events route answered {media_type or 'nothing'}, "
                                       "not text/event-stream")
            for event in iter_sse(response.iter_lines()):
                if event.event == "lowering":
                    yield event

    def _follow(self, job_id: str, deadline: float | None, poll_s: float,
                on_update: Callable[[Job], None] | None) -> Job | None:
        """The job once final, followed through its events stream (reconnecting when the
        service closes it early); None to fall back to polling: the service has no events
        (an older release, a proxy in the way), the stream broke, or time ran out."""
        last_id: str | None = None
        while True:
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            with closing(self._event_stream(job_id, wait_s=None if deadline is None else left,
                                            last_event_id=last_id)) as stream:
                while True:
                    try:
                        event = next(stream, None)
                        job = None if event is None else json.loads(event.data)
                    except (LoweringAPIError, httpx.TransportError, httpx.StreamError,
                            ValueError):
                        # Polling answers what is really wrong (an unknown job's 404 too).
                        return None
                    if event is None:
                        break  # closed before the job ended: reconnect
                    if not isinstance(job, dict):
                        return None
                    last_id = event.id
                    if on_update is not None:
                        on_update(job)
                    if job.get("status") in _FINAL:
                        return job
            left = math.inf if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(poll_s, left)))  # closed early: reconnect

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 0.5,
        on_update: Callable[[Job], None] | None = None,
        events: bool = True,
    ) -> Job:
        """Wait until the job is succeeded, failed or cancelled; return it.

        Follows the job's progress events (``events``), and polls every ``poll_s`` instead
        when the service has no events route (404/405), the stream breaks, or
        ``events=False``. ``on_update(job)`` is called at each event (the job with
        ``queue_position``; see ``events``) or after every poll. Raises TimeoutError once
        ``timeout_s`` has passed with the job still queued or running.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if events:
            followed = self._follow(job_id, deadline, poll_s, on_update)
            if followed is not None:
                return followed
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
