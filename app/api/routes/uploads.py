"""/v1/uploads: a program sent in parts (resumable), gated once, then named by submits."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import asdict
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from app import metrics
from app.api.deps import LifecycleDep, ReadDep, SettingsDep, StoreDep, SubmitDep, UploadsDep
from app.api.openapi import ERROR_RESPONSES
from app.api.routes.lowerings import _stall_guard
from app.errors import (
    ApiErrorCode,
    Conflict,
    PayloadTooLarge,
    ServiceError,
    TooManyRequests,
    Unprocessable,
    error_class,
)
from app.jobs.lifecycle import Quota, QuotaExceeded, check_storage
from app.jobs.store import JobStore, utcnow
from app.schemas import UploadCreate, UploadPublic
from app.settings import Settings
from app.storage.base import PartTarget, UploadStore
from app.storage.resumable import (
    UploadRecord,
    UploadRecords,
    UploadStatus,
    assemble_and_gate,
    check_part_number,
    known_shape,
    part_bytes,
    plan_parts,
    sweep,
    unknown_upload,
)

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
MAX_PRESIGN_S = 7 * 86_400  # S3's longest presigned URL
MAX_PART_NUMBER = 1_000_000  # larger numbers are out of range of any upload, not a 500


def _records(store: StoreDep) -> UploadRecords:
    return UploadRecords(store.engine)


RecordsDep = Annotated[UploadRecords, Depends(_records)]
PartNumber = Annotated[int, Path(ge=0, le=MAX_PART_NUMBER)]


def _public(upload: UploadRecord, received: dict[int, int] | None = None,
            targets: list[PartTarget] | None = None) -> dict[str, Any]:
    return UploadPublic(
        id=upload["id"], status=upload["status"], size_bytes=upload["size_bytes"],
        sha256=upload["sha256"], part_size_bytes=upload["part_size_bytes"],
        part_count=upload["parts"], parts_received=sorted(received or {}),
        parts=[asdict(target) for target in targets or []], error=upload["error"],
        created_at=upload["created_at"], completed_at=upload["completed_at"],
        expires_at=upload["expires_at"],
    ).model_dump(mode="json")


def _open(records: UploadRecords, upload_id: str, tenant: str) -> UploadRecord:
    """The tenant's upload, unless its id cannot exist, it is unknown (or another
    tenant's), or it has expired."""
    upload = records.get(known_shape(upload_id), tenant=tenant)
    if upload is None or upload["expires_at"] <= utcnow():
        raise unknown_upload(upload_id)
    return upload


def _receiving(upload: UploadRecord) -> None:
    if upload["status"] != UploadStatus.RECEIVING.value:
        raise Conflict(f"upload {upload['id']} is {upload['status']} and takes no more parts "
                       "or completes", code=ApiErrorCode.UPLOAD_CLOSED)


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] as "1-3, 7", at most 20 runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs[:20])
    return shown + (", ..." if len(runs) > 20 else "")


def _state(records: UploadRecords, uploads: UploadStore, upload: UploadRecord,
           settings: Settings) -> dict[str, Any]:
    """The upload with the parts received and, while receiving, where to send the rest."""
    if upload["status"] != UploadStatus.RECEIVING.value:
        return _public(upload)
    received = uploads.parts.received(upload["id"], upload["multipart_id"])
    missing = [n for n in range(1, upload["parts"] + 1)
               if received.get(n) != part_bytes(upload, n)]
    expires_s = int(min(MAX_PRESIGN_S, max(1.0, (upload["expires_at"] - utcnow())
                                          .total_seconds())))
    targets = uploads.parts.targets(upload["id"], upload["multipart_id"], missing, expires_s)
    return _public(upload, received, targets)


def _create(records: UploadRecords, store: JobStore, uploads: UploadStore,
            settings: Settings, body: UploadCreate, *, tenant: str,
            quota: Quota) -> tuple[int, dict[str, Any]]:
    now = utcnow()
    sweep(records, uploads, now=now)
    if body.sha256 is not None:
        ready = records.find_ready(sha256=body.sha256, now=now, tenant=tenant)
        if ready is not None and ready["size_bytes"] == body.size_bytes:
            records.touch(ready["id"], expires_at=now + dt.timedelta(seconds=settings.upload_ttl_s))
            return 200, _public(records.get(ready["id"]) or ready)
    part_size, count = plan_parts(body.size_bytes, part_bytes=settings.upload_part_bytes,
                                  direct=uploads.parts.direct)
    with store.admission_lock():  # the cap holds across replicas
        open_now = records.count_open(now=now)
        if open_now >= settings.max_open_uploads:
            raise TooManyRequests(
                f"{open_now} uploads are already open (LOWERING_MAX_OPEN_UPLOADS="
                f"{settings.max_open_uploads}); complete them or retry later",
                retry_after_s=60, code=ApiErrorCode.TOO_MANY_UPLOADS)
        try:
            check_storage(store, quota, tenant=tenant, adding_bytes=body.size_bytes)
        except QuotaExceeded as exc:
            raise TooManyRequests(exc.message, retry_after_s=exc.retry_after_s,
                                  code=ApiErrorCode.TENANT_QUOTA) from None
        upload_id = uuid.uuid4().hex
        multipart_id = uploads.parts.begin(upload_id)
        upload = records.create(
            id=upload_id, size_bytes=body.size_bytes, sha256=body.sha256,
            part_size_bytes=part_size, parts=count, multipart_id=multipart_id, tenant=tenant,
            expires_at=now + dt.timedelta(seconds=settings.upload_ttl_s))
    return 201, _state(records, uploads, upload, settings)


@router.post("", status_code=201, response_model=UploadPublic, responses=ERROR_RESPONSES)
async def create_upload(body: UploadCreate, settings: SettingsDep, store: StoreDep,
                        records: RecordsDep, uploads: UploadsDep, lifecycle: LifecycleDep,
                        principal: SubmitDep) -> JSONResponse:
    """Announce a program to send in parts; 200 with a ready upload of the same sha256."""
    if body.size_bytes > settings.max_upload_bytes:
        raise PayloadTooLarge(f"an upload of {body.size_bytes} bytes exceeds the limit of "
                              f"{settings.max_upload_bytes} bytes (LOWERING_MAX_UPLOAD_BYTES)")
    status, public = await to_thread.run_sync(
        lambda: _create(records, store, uploads, settings, body, tenant=principal.tenant,
                        quota=lifecycle.quota_for(principal.tenant)))
    headers = {"Location": f"/v1/uploads/{public['id']}"}
    return JSONResponse(public, status_code=status, headers=headers)


@router.get("/{upload_id}", response_model=UploadPublic, responses=ERROR_RESPONSES)
async def get_upload(upload_id: str, settings: SettingsDep, records: RecordsDep,
                     uploads: UploadsDep, principal: ReadDep) -> dict[str, Any]:
    """The upload: its status, the parts received and where to send the others."""
    def read() -> dict[str, Any]:
        return _state(records, uploads, _open(records, upload_id, principal.tenant), settings)

    return await to_thread.run_sync(read)


@router.put("/{upload_id}/parts/{number}", responses=ERROR_RESPONSES)
async def put_part(upload_id: str, number: PartNumber, request: Request,
                   settings: SettingsDep, records: RecordsDep,
                   uploads: UploadsDep, principal: SubmitDep) -> dict[str, Any]:
    """Receive one part (local storage); sending a part again replaces it."""
    upload = await to_thread.run_sync(_open, records, upload_id, principal.tenant)
    _receiving(upload)
    check_part_number(upload, number)
    if uploads.parts.direct:
        raise Unprocessable("parts of this upload go straight to the object store: PUT them "
                            f"to the URLs of GET /v1/uploads/{upload_id}",
                            code=ApiErrorCode.INVALID_PART)
    expected = part_bytes(upload, number)
    declared = request.headers.get("content-length")
    if declared and re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > expected:
        raise PayloadTooLarge(f"part {number} is longer than its {expected} bytes",
                              code=ApiErrorCode.PART_TOO_LARGE)
    try:
        await uploads.parts.write(upload_id, number,
                                  _stall_guard(request, settings.upload_stall_timeout_s),
                                  size_bytes=expected)
    except FileNotFoundError:  # completed (its parts joined) while this one arrived
        raise Conflict(f"upload {upload_id} was completed while part {number} arrived",
                       code=ApiErrorCode.UPLOAD_CLOSED) from None
    return {"number": number, "size_bytes": expected}


def _refused_again(upload: UploadRecord) -> ServiceError:
    """A failed upload completed again: the refusal it got the first time."""
    error = upload["error"] or {}
    try:
        code = ApiErrorCode(str(error.get("code")))
    except ValueError:
        code = ApiErrorCode.UPLOAD_CLOSED
    cls = error_class(code)
    if cls.__init__ is not ServiceError.__init__:  # classes with extra arguments
        return Conflict(f"upload {upload['id']} failed: {error.get('message')}",
                        code=ApiErrorCode.UPLOAD_CLOSED)
    return cls(str(error.get("message") or "the upload was refused"), code=code)


@router.post("/{upload_id}/complete", response_model=UploadPublic, responses=ERROR_RESPONSES)
async def complete_upload(upload_id: str, settings: SettingsDep, records: RecordsDep,
                          uploads: UploadsDep, principal: SubmitDep) -> dict[str, Any]:
    """Assemble the parts, check size and sha256, run the gate; ready, or the gate's 4xx."""
    def claim() -> UploadRecord | None:
        upload = _open(records, upload_id, principal.tenant)
        if upload["status"] == UploadStatus.READY.value:
            return None  # completed before (a client retrying a lost answer)
        if upload["status"] == UploadStatus.FAILED.value:
            raise _refused_again(upload)
        _receiving(upload)
        received = uploads.parts.received(upload_id, upload["multipart_id"])
        numbers = range(1, upload["parts"] + 1)
        missing = [n for n in numbers if n not in received]
        if missing:
            raise Conflict(f"upload {upload_id} lacks {len(missing)} of its {upload['parts']} "
                           f"parts: {_ranges(missing)}; send them, then complete again",
                           code=ApiErrorCode.PARTS_MISSING)
        wrong = [n for n in numbers if received[n] != part_bytes(upload, n)]
        if wrong:
            raise Unprocessable(
                f"parts {_ranges(wrong)} of upload {upload_id} do not have their size (every "
                f"part is {upload['part_size_bytes']} bytes but the last, which is the rest); "
                "send them again, then complete again", code=ApiErrorCode.INVALID_PART)
        if not records.transition(upload_id, from_=UploadStatus.RECEIVING,
                                  to=UploadStatus.ASSEMBLING, assembling_since=utcnow()):
            raise Conflict(f"upload {upload_id} is already being completed; GET it to see "
                           "when it is ready (a complete cut short by a replica's death is "
                           "reopened within LOWERING_GATE_TIMEOUT_S plus 15 min)",
                           code=ApiErrorCode.UPLOAD_CLOSED)
        return upload

    upload = await to_thread.run_sync(claim)
    if upload is None:
        return _public(await to_thread.run_sync(_open, records, upload_id, principal.tenant))
    metrics.record_upload_bytes(upload["size_bytes"], via="resumable")  # once: it is claimed
    ready = await assemble_and_gate(upload, records=records, store=uploads, settings=settings)
    return _public(ready)
