"""/v1/lowerings: submit, inspect, download, cancel, delete; progress events."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)

from app import metrics
from app.api.deps import (
    ArtifactsDep,
    ExecutorDep,
    LifecycleDep,
    LogsDep,
    ReadDep,
    ServicesDep,
    SettingsDep,
    StoreDep,
    SubmitDep,
    UploadsDep,
)
from app.api.openapi import ERROR_RESPONSES, FORM_SCHEMA, SUBMIT_RESPONSES
from app.api.submit import parse_targets
from app.constants import NAME_PATTERN, JobStatus
from app.errors import (
    ApiErrorCode,
    ArtifactCorrupt,
    Conflict,
    Gone,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
)
from app.jobs.cache_key import cache_key, code_key
from app.jobs.failures import out_of_space
from app.jobs.lifecycle import (
    JobLifecycle,
    QueueFull,
    QuotaExceeded,
    check_active,
    unknown_job,
)
from app.jobs.retention import Expiry, mark_used
from app.jobs.store import JobFields, JobRecord, JobStore
from app.logs import JOB_ID
from app.schemas import LoweringPublic, LoweringsPublic
from app.settings import Settings
from app.storage.base import ArtifactStore, UploadStore
from app.storage.reserve import release_reserve
from app.storage.resumable import UploadRecords, take
from app.storage.uploads import receive_form
from app.validation.isolated import run_gate
from app.webhooks.targets import check_callback

router = APIRouter(prefix="/v1/lowerings", tags=["lowerings"])
log = logging.getLogger("app.api")
MULTIPART_OVERHEAD_BYTES = 1 << 20
POLL_S = 0.2
MAX_WAIT_QUERY_S = 86_400.0
JOB_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _retry_after_s(waiting: int, settings: Settings) -> int:
    # A rough drain time: each worker clears about one typical lowering per ~20 s.
    return max(5, min(600, int(20 * waiting / max(1, settings.workers))))


async def _stall_guard(request: Request, timeout_s: float) -> AsyncIterator[bytes]:
    """The request body, dropped (408) when the client sends nothing for ``timeout_s``."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(f"the upload sent nothing for {timeout_s:g} s "
                                 "(LOWERING_UPLOAD_STALL_TIMEOUT_S) and was dropped; "
                                 "send it again") from None
        yield chunk


def _queue_full(waiting: int, settings: Settings) -> TooManyRequests:
    return TooManyRequests(
        f"{waiting} lowerings are already queued (LOWERING_MAX_QUEUED={settings.max_queued}); "
        "retry later", retry_after_s=_retry_after_s(waiting, settings))


def _over_quota(exc: QuotaExceeded) -> TooManyRequests:
    return TooManyRequests(exc.message, retry_after_s=exc.retry_after_s,
                           code=ApiErrorCode.TENANT_QUOTA)


def _public(job: JobRecord) -> dict[str, Any]:
    return LoweringPublic.from_job(job).model_dump(mode="json")


def _known_shape(job_id: str) -> str:
    """An id that no job can have never reaches the database (NUL bytes, megabytes)."""
    if not JOB_ID_RE.fullmatch(job_id):
        raise unknown_job(job_id)
    return job_id


async def _get_or_404(store: JobStore, job_id: str, tenant: str) -> JobRecord:
    """The tenant's job; another tenant's is 404 exactly like an unknown id."""
    _known_shape(job_id)
    job = await to_thread.run_sync(lambda: store.get(job_id, tenant=tenant))
    if job is None:
        raise unknown_job(job_id)
    return job


@router.post("", status_code=202, response_model=LoweringPublic, openapi_extra=FORM_SCHEMA,
             responses=SUBMIT_RESPONSES)
async def create_lowering(
    request: Request, settings: SettingsDep, store: StoreDep, executor: ExecutorDep,
    lifecycle: LifecycleDep, uploads: UploadsDep, artifacts: ArtifactsDep,
    principal: SubmitDep,
    wait: Annotated[float | None, Query(
        ge=0, le=MAX_WAIT_QUERY_S, allow_inf_nan=False,
        description="seconds to hold the request (capped by LOWERING_MAX_WAIT_S)")] = None,
    cache: Annotated[Literal["use", "bypass"], Query(
        description="bypass: lower afresh even if an identical result exists")] = "use",
) -> Response:
    """Upload a program and queue its lowering; with ?wait, answer with the outcome."""
    if executor.unavailable:
        raise ServiceUnavailable(f"no lowering can run on this service: "
                                 f"{executor.unavailable}", code=ApiErrorCode.SANDBOX_UNAVAILABLE)
    # Checked again at admission (the authoritative check); this one spares the upload.
    waiting = await to_thread.run_sync(store.count_waiting)
    if waiting >= settings.max_queued:
        raise _queue_full(waiting, settings)
    try:
        await to_thread.run_sync(lambda: check_active(
            store, lifecycle.quota_for(principal.tenant), tenant=principal.tenant))
    except QuotaExceeded as exc:
        raise _over_quota(exc) from None
    declared = request.headers.get("content-length")
    if declared and re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > (
        settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    ):
        raise PayloadTooLarge(f"upload exceeds the limit of {settings.max_upload_bytes} bytes "
                              "(LOWERING_MAX_UPLOAD_BYTES)")
    form = await receive_form(_stall_guard(request, settings.upload_stall_timeout_s),
                              request.headers.get("content-type"),
                              dest_dir=uploads.staging_dir,
                              max_file_bytes=settings.max_upload_bytes)
    if form.file_path is not None:
        metrics.record_upload_bytes(form.size_bytes, via="submit")
    started = time.monotonic()  # "validate" times the checks, not the client's upload
    job_ids: list[str] = []
    try:
        # A fleet queues a job for a target no live host serves (its phase says so); a
        # host that runs its own jobs refuses a device it does not have.
        # A ready resumable upload (POST /v1/uploads), by id or "sha256:<hex>".
        upload_name = form.fields.pop("upload", None)
        several = bool(form.fields.get("targets", "").strip())  # answered as a list
        cuda = executor.toolchain.get("cuda_devices", 0) if executor.toolchain else None
        targets = parse_targets(form.fields, settings=settings, cuda_devices=cuda,
                                check_device=executor.runs_jobs_here)
        if several and wait is not None:
            raise Unprocessable("?wait takes a submit without 'targets'; follow each of the "
                                "jobs instead (GET /v1/lowerings/{id}/events)")
        params = targets[0]
        await to_thread.run_sync(lambda: check_callback(
            params.callback_url, secret=settings.webhook_callback_secret,
            allow_private=settings.webhook_allow_private))
        job_ids = [uuid.uuid4().hex for _ in targets]  # one job, and one input, per target
        JOB_ID.set(job_ids[0])  # this request's log lines name the job (reset by the middleware)
        if upload_name is not None:
            if form.file_path is not None:
                raise Unprocessable("send the program file or name an upload, not both")
            # Gated when it was completed: a copy of its gate copy becomes each job's input.
            for job_id in job_ids:
                ready = await to_thread.run_sync(partial(
                    take, UploadRecords(store.engine), uploads, upload_name, job_id=job_id,
                    ttl_s=settings.upload_ttl_s, tenant=principal.tenant))
            input_sha256, input_size_bytes = str(ready["sha256"]), ready["size_bytes"]
            structure_sha256 = str(ready["structure_sha256"])
        elif form.file_path is None:
            raise Unprocessable("form field 'program' (the .pt2 file) or 'upload' (a ready "
                                "upload's id or sha256:<hex>) is required",
                                code=ApiErrorCode.MISSING_FIELD)
        else:
            # Only the gate's rebuilt copy of the validated members ever reaches a worker.
            # The gate runs in a fresh, resource-limited child process, a few at a time.
            staged = uploads.staging_path()
            try:
                report = await run_gate(form.file_path, staged, settings.archive_limits(),
                                        settings.gate_resources())
                await to_thread.run_sync(uploads.commit, job_ids[0], staged)
            finally:
                staged.unlink(missing_ok=True)
            await to_thread.run_sync(_copy_input, uploads, job_ids[0], job_ids[1:])
            input_sha256, input_size_bytes = form.sha256, form.size_bytes
            structure_sha256 = report.structure_sha256
    except BaseException:
        for job_id in job_ids:
            uploads.remove(job_id)
        raise
    finally:
        form.discard()
    validate_s = round(time.monotonic() - started, 4)
    batch: list[JobFields] = []
    for job_id, target in zip(job_ids, targets, strict=True):
        fields: JobFields = {
            "id": job_id, "tenant": principal.tenant, "input_sha256": input_sha256,
            "input_size_bytes": input_size_bytes, "timings": {"validate": validate_s},
            **target.as_fields(),  # type: ignore[typeddict-item]
        }
        # The toolchain of the host class that will build it: the keys' and the route's.
        toolchain = executor.toolchain_for(target.device)
        fields["toolchain"] = toolchain
        if settings.cache and toolchain is not None:
            fields["cache_key"] = cache_key(input_sha256=input_sha256,
                                            params=target.as_fields(), toolchain=toolchain)
            if cache == "use":  # bypass: compiled afresh, so it neither takes nor gives code
                fields["code_key"] = code_key(structure_sha256=structure_sha256,
                                              params=target.as_fields(), toolchain=toolchain)
        batch.append(fields)
    try:
        jobs = await to_thread.run_sync(lambda: _admit_all(
            lifecycle, uploads, batch, use_cache=cache == "use", max_waiting=settings.max_queued))
    except QueueFull as full:
        raise _queue_full(full.waiting, settings) from None
    except QuotaExceeded as exc:
        raise _over_quota(exc) from None
    if several:
        return JSONResponse({"lowerings": [_public(job) for job in jobs]}, status_code=202)
    job, job_id = jobs[0], job_ids[0]
    if wait is not None:
        job = await _wait_final(request, store, job_id, principal.tenant,
                                min(wait, settings.max_wait_s))
        if job["status"] == JobStatus.SUCCEEDED.value:
            return await _artifact_response(job, artifacts, request)
        if JobStatus(job["status"]).is_final:
            return _ended(job)
    return JSONResponse(_public(job), status_code=202,
                        headers={"Location": f"/v1/lowerings/{job_id}"})


def _copy_input(uploads: UploadStore, source_id: str, job_ids: list[str]) -> None:
    """Each of ``job_ids`` gets its own copy of ``source_id``'s input (deleting one job
    never touches another's)."""
    for job_id in job_ids:
        staged = uploads.staging_path()
        try:
            uploads.materialize(source_id, staged, share=False)
            uploads.commit(job_id, staged)
        finally:
            staged.unlink(missing_ok=True)


def _admit_all(lifecycle: JobLifecycle, uploads: UploadStore, batch: list[JobFields], *,
               use_cache: bool, max_waiting: int) -> list[JobRecord]:
    """Admit each job in order, all or none: when one is refused (queue full, quota), the
    ones admitted before it are cancelled and deleted, and the inputs of the rest removed."""
    jobs: list[JobRecord] = []
    try:
        for fields in batch:
            jobs.append(lifecycle.admit(fields, use_cache=use_cache,
                                        max_waiting=max_waiting).job)
    except BaseException:
        for job in jobs:
            with contextlib.suppress(ServiceError):  # a cache hit is final already
                lifecycle.cancel(job["id"])
            with contextlib.suppress(ServiceError):
                lifecycle.delete(job["id"])
        for fields in batch[len(jobs):]:
            uploads.remove(fields["id"])
        raise
    return jobs


def _ended(job: JobRecord) -> JSONResponse:
    """A ?wait= that saw the job fail or be cancelled: an error (so `curl -f` and
    `raise_for_status` stop), whose body carries the job."""
    if job["status"] == JobStatus.CANCELLED.value:
        code, message = ApiErrorCode.JOB_CANCELLED, f"lowering {job['id']} was cancelled"
    else:
        reason = (job["error"] or {}).get("message") or "no reason recorded"
        code, message = ApiErrorCode.JOB_FAILED, f"lowering {job['id']} failed: {reason}"
    body = {"error": {"code": code.value, "message": message, "lowering": _public(job)}}
    return JSONResponse(body, status_code=code.status)


async def _wait_final(request: Request, store: JobStore, job_id: str, tenant: str,
                      wait_s: float) -> JobRecord:
    """The job once final, or as it is when the wait runs out, the client leaves or the
    service begins to stop (the caller then answers 202 with the job and its Location)."""
    deadline = time.monotonic() + wait_s
    stopping = request.app.state.stopping
    while True:
        job = await _get_or_404(store, job_id, tenant)
        if (JobStatus(job["status"]).is_final or time.monotonic() >= deadline
                or stopping.is_set() or await request.is_disconnected()):
            return job
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


@router.get("", response_model=LoweringsPublic, responses=ERROR_RESPONSES)
async def list_lowerings(
    store: StoreDep,
    principal: ReadDep,
    status: JobStatus | None = None,
    model_name: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(
        pattern=CURSOR_PATTERN, description="next_cursor from the previous page")] = None,
) -> dict[str, Any]:
    """The caller's tenant's jobs, newest first, paged by cursor."""
    before = _cursor_key(cursor) if cursor is not None else None
    rows = await to_thread.run_sync(lambda: store.list_page(
        status=status.value if status else None, model_name=model_name, limit=limit + 1,
        before=before, tenant=principal.tenant))
    next_cursor = _cursor(rows[limit - 1]) if len(rows) > limit else None
    return {"items": [_public(job) for job in rows[:limit]], "next_cursor": next_cursor}


# A page ends at a job; the cursor names it by what the job already shows (created_at in
# microseconds since the epoch, and id), never by the global sequence, whose gaps would
# tell a tenant how many jobs other tenants submitted in between.
CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f]{32}$"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_US = dt.timedelta(microseconds=1)


def _cursor(job: JobRecord) -> str:
    return f"{(job['created_at'] - _EPOCH) // _ONE_US}.{job['id']}"


def _cursor_key(cursor: str) -> tuple[dt.datetime, str]:
    micros, job_id = cursor.split(".")  # CURSOR_PATTERN: at most 17 digits, before 5138
    return _EPOCH + int(micros) * _ONE_US, job_id


@router.get("/{job_id}", response_model=LoweringPublic, responses=ERROR_RESPONSES)
async def get_lowering(job_id: str, store: StoreDep, principal: ReadDep) -> dict[str, Any]:
    """One job: status, phase, timings, verification, error."""
    return _public(await _get_or_404(store, job_id, principal.tenant))


@router.head("/{job_id}/artifact", response_class=FileResponse, responses=ERROR_RESPONSES,
             operation_id="head_artifact", summary="The archive's headers only")
@router.get("/{job_id}/artifact", response_class=FileResponse, responses=ERROR_RESPONSES)
async def get_artifact(
    job_id: str, request: Request, store: StoreDep, artifacts: ArtifactsDep,
    settings: SettingsDep, principal: ReadDep,
) -> Response:
    """The packaged pt2 archive (Range and If-None-Match supported)."""
    job = await _get_or_404(store, job_id, principal.tenant)
    if job["status"] != JobStatus.SUCCEEDED.value:
        raise Conflict(f"lowering {job_id} is {job['status']}; the artifact exists once it "
                       "has succeeded", code=ApiErrorCode.ARTIFACT_NOT_READY)
    _check_not_expired(job, settings)
    # Its use keeps the archive from expiring or eviction; recorded before the archive is
    # checked, so a sweep that comes after sees it and one that came first is seen below.
    await to_thread.run_sync(lambda: mark_used(store, job))
    try:
        return await _artifact_response(job, artifacts, request)
    except ArtifactCorrupt:
        again = await to_thread.run_sync(lambda: store.get(job_id))
        if again is not None:
            _check_not_expired(again, settings)  # removed by a sweep meanwhile: 410
        raise


def _check_not_expired(job: JobRecord, settings: Settings) -> None:
    """410 artifact_expired, saying when and why, once retention removed the archive."""
    at, reason = job["artifact_expired_at"], job["artifact_expired_reason"]
    if at is None:
        return
    why = Expiry(reason).explain(settings) if reason in set(Expiry) else str(reason)
    raise Gone(f"the archive of lowering {job['id']} was removed on {at:%Y-%m-%d %H:%M} UTC: "
               f"{why}. Submit the program again to build it anew (no cache hit remains)",
               code=ApiErrorCode.ARTIFACT_EXPIRED)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a list of (possibly weak) entity tags."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def _artifact_response(job: JobRecord, artifacts: ArtifactStore,
                             request: Request) -> Response:
    sha256 = job["artifact_sha256"]
    assert sha256 is not None
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "X-Lowering-Id": job["id"], "Cache-Control": "private, max-age=0"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    corrupt = ArtifactCorrupt(
        f"the stored artifact of lowering {job['id']} is missing or no longer matches its "
        "sha256 and will not be served; submit the program again with ?cache=bypass")
    if not await to_thread.run_sync(artifacts.is_intact, sha256):
        raise corrupt
    where = await to_thread.run_sync(artifacts.location, sha256)
    if isinstance(where, str):  # an object store: the client fetches it from there
        return RedirectResponse(where, status_code=307, headers=headers)
    filename = f"{job['model_name']}-{job['backend_id']}.pt2"
    if where is None:  # an object store the client cannot reach: relayed (no Range)
        headers.update({"Content-Length": str(job["artifact_size_bytes"]),
                        "Content-Disposition": f'attachment; filename="{filename}"'})
        if request.method == "HEAD":
            return Response(media_type="application/zip", headers=headers)
        try:
            chunks = await to_thread.run_sync(artifacts.open_chunks, sha256)
        except FileNotFoundError:  # removed since is_intact
            raise corrupt from None
        return StreamingResponse(chunks, media_type="application/zip", headers=headers)
    return FileResponse(where, media_type="application/zip", headers=headers,
                        filename=filename)


@router.get("/{job_id}/log", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
async def get_log(job_id: str, store: StoreDep, logs: LogsDep,
                  principal: ReadDep) -> Response:
    """The worker's log of this job (empty until a worker starts it)."""
    job = await _get_or_404(store, job_id, principal.tenant)
    if job["log_removed_at"] is not None:
        raise Gone(f"the log of lowering {job_id} was removed on "
                   f"{job['log_removed_at']:%Y-%m-%d %H:%M} UTC, LOWERING_LOG_TTL_S after the "
                   "job ended; the job's error (if any) keeps the log's tail",
                   code=ApiErrorCode.LOG_EXPIRED)
    chunks = await to_thread.run_sync(logs.chunks, job_id)
    if chunks is None:
        return PlainTextResponse("")
    return StreamingResponse(chunks, media_type="text/plain; charset=utf-8")


@router.post("/{job_id}/cancel", response_model=LoweringPublic, responses=ERROR_RESPONSES)
async def cancel_lowering(job_id: str, lifecycle: LifecycleDep,
                          principal: SubmitDep) -> dict[str, Any]:
    """Cancel a queued or running job; a running job's sandbox is stopped."""
    _known_shape(job_id)
    return _public(await to_thread.run_sync(
        lambda: lifecycle.cancel(job_id, tenant=principal.tenant)))


@router.delete("/{job_id}", status_code=204, responses=ERROR_RESPONSES)
async def delete_lowering(job_id: str, settings: SettingsDep,
                          lifecycle: LifecycleDep, principal: SubmitDep) -> Response:
    """Remove a finished job's record, upload, log and (if unshared) artifact."""
    _known_shape(job_id)

    def delete() -> None:
        lifecycle.delete(job_id, tenant=principal.tenant)

    try:
        await to_thread.run_sync(delete)
    except Exception as exc:
        # A full disk is when deleting matters most: spend the reserve and try again.
        if not (out_of_space(exc) and release_reserve(settings.data_dir)):
            raise
        await to_thread.run_sync(delete)
    return Response(status_code=204)


# -- progress events (Server-Sent Events) -------------------------------------------------
# A plain StreamingResponse, not sse-starlette: the framing is a few lines, the stream is
# driven by the same DB poll as ?wait= (the job table is the truth across replicas), and its
# heartbeat, disconnect, stop and duration checks all belong to that one loop; sse-starlette
# would add a dependency whose own ping task and uvicorn-signal shutdown hook duplicate them.

EVENTS_POLL_S = 0.5
"""How often an open stream reads its job (one query by id; one more, indexed, while it
is queued)."""
EVENTS_HEARTBEAT_S = 15.0
"""A comment line after this long without an event, so proxies keep the stream open."""
EVENTS_RETRY_MS = 2000
"""The reconnect delay the stream asks of EventSource clients (its ``retry:`` field)."""
EVENTS_DB_PATIENCE_S = 10.0
"""A stream whose job cannot be read for this long ends (cleanly: the client reconnects)."""
EVENTS_KEY_CHECK_S = 5.0
"""How often an open stream checks that its API key still holds (a revoke ends it)."""
EVENTS_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _event_state(store: JobStore, job_id: str,
                       tenant: str) -> tuple[str, dict[str, Any]] | None:
    """The job as one ``lowering`` event: its id (the state it names) and its data (the
    public job plus ``queue_position``, and ``leader`` for a follower); None once the
    job is gone."""

    def read() -> tuple[str, dict[str, Any]] | None:
        job = store.get(job_id, tenant=tenant)
        if job is None:
            return None
        data = _public(job)
        position: int | None = None
        key = [job["status"], job["phase"] or "-"]
        if job["status"] == JobStatus.QUEUED.value:
            # A follower (coalesced) waits where its leader waits.
            leader = (store.get(job["parent_id"], tenant=tenant) if job["parent_id"]
                      else job)
            if leader is not None and leader["status"] == JobStatus.QUEUED.value:
                position = store.count_waiting_before(seq=leader["seq"])
            if leader is not None and leader is not job:
                data["leader"] = {"id": leader["id"], "status": leader["status"],
                                  "phase": leader["phase"]}
                key += [leader["status"], leader["phase"] or "-"]
        data["queue_position"] = position
        key.append("-" if position is None else str(position))
        return ".".join(key), data

    return await to_thread.run_sync(read)


def _event_frame(event_id: str, data: dict[str, Any]) -> str:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=True)  # one line
    return f"event: lowering\nid: {event_id}\ndata: {body}\n\n"


async def _event_stream(request: Request, store: JobStore, job_id: str, tenant: str,
                        first: tuple[str, dict[str, Any]], last_event_id: str | None,
                        stream_s: float,
                        key_valid: Callable[[], bool] | None = None) -> AsyncIterator[str]:
    """The job on connect, then at every change of its status, phase or queue position
    (or its leader's), until it is final, gone, the client leaves, the service begins to
    stop or ``stream_s`` runs out (a client reconnects: it starts from the current
    state). A reconnect whose Last-Event-ID names the current state is not sent it
    again, unless it is final: a stream that ends with the job final ends with that
    event. ``key_valid`` is asked every EVENTS_KEY_CHECK_S: a key revoked meanwhile ends
    the stream with an ``error`` event (401 unauthorized, as a new request would get)."""
    deadline = time.monotonic() + stream_s
    key_checked = time.monotonic()
    stopping = request.app.state.stopping
    yield f"retry: {EVENTS_RETRY_MS}\n\n"
    sent, state = last_event_id, first
    last_write = last_read = time.monotonic()
    while True:
        event_id, data = state
        final = JobStatus(data["status"]).is_final
        if event_id != sent or final:
            yield _event_frame(event_id, data)
            sent, last_write = event_id, time.monotonic()
        now = time.monotonic()
        if (final or now >= deadline or stopping.is_set()
                or await request.is_disconnected()):
            return
        if now - last_write >= EVENTS_HEARTBEAT_S:
            yield ": heartbeat\n\n"
            last_write = now
        await asyncio.sleep(max(0.0, min(EVENTS_POLL_S, deadline - now,
                                         last_write + EVENTS_HEARTBEAT_S - now)))
        try:
            read = await _event_state(store, job_id, tenant)
        except ServiceError as exc:  # the database busy or away: try again, for a while
            if time.monotonic() - last_read > EVENTS_DB_PATIENCE_S:
                log.warning("events of %s: ended, the job database fails: %s", job_id,
                            exc.message)
                return  # a clean end: the client reconnects, or polls
            continue
        if read is None:  # deleted since (only a final job can be)
            return
        state, last_read = read, time.monotonic()
        if key_valid is not None and last_read - key_checked >= EVENTS_KEY_CHECK_S:
            key_checked = last_read
            if not await to_thread.run_sync(key_valid):
                yield _error_frame(Unauthorized(
                    "the API key of this stream was revoked; reconnect with a valid key"))
                return


def _error_frame(exc: ServiceError) -> str:
    body = {"error": {"code": exc.code.value, "message": exc.message}}
    return f"event: error\ndata: {json.dumps(body)}\n\n"


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "text/event-stream of `lowering` events: each one the job as GET "
          "/v1/lowerings/{id} answers it plus queue_position (queued jobs that need a "
          "worker ahead of it, its leader's for a coalesced job; null unless queued) and, "
          "for a coalesced job, leader {id, status, phase}. Sent on connect and at each "
          "change; a comment heartbeat every 15 s; the stream ends after a final status "
          "or after LOWERING_MAX_WAIT_S (reconnect: it starts from the current state, and a "
          "Last-Event-ID naming that state skips it)",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **ERROR_RESPONSES})
async def lowering_events(
    job_id: str, request: Request, store: StoreDep, settings: SettingsDep,
    services: ServicesDep, principal: ReadDep,
    wait: Annotated[float | None, Query(
        ge=0, le=MAX_WAIT_QUERY_S, allow_inf_nan=False,
        description="seconds to keep the stream open (capped by LOWERING_MAX_WAIT_S)")] = None,
) -> Response:
    """Progress without polling: the job's status, phase and queue position as they change."""
    first = await _event_state(store, _known_shape(job_id), principal.tenant)
    if first is None:
        raise unknown_job(job_id)
    stream_s = settings.max_wait_s if wait is None else min(wait, settings.max_wait_s)
    last_event_id = request.headers.get("last-event-id")
    keys, authorization = services.keys, request.headers.get("authorization")

    def key_valid() -> bool:
        try:
            return keys is not None and keys.authenticate(authorization) == principal
        except Unauthorized:
            return False
        except ServiceError:  # the database away: the stream's own reads will tell
            return True

    return StreamingResponse(
        _event_stream(request, store, job_id, principal.tenant, first, last_event_id,
                      stream_s, key_valid if keys is not None else None),
        media_type="text/event-stream", headers=EVENTS_HEADERS)
