"""Resumable uploads: a program sent in parts, assembled, gated once, then named by submits.

    receiving ──complete──▶ assembling ──gate admits──▶ ready ──(TTL after last use)──▶ gone
        │                        └──size, sha256 or gate refuses──▶ failed ──(TTL)──▶ gone
        └──(TTL, never completed)──▶ gone (parts dropped, S3 multipart upload aborted)

The state is a row of the ``uploads`` table and the parts live in the data dir or in an S3
multipart upload (``UploadStore.parts``), so any API replica can take an upload on where
another left it. Every status change is a guarded UPDATE, as for jobs: of two replicas
asked to complete the same upload, one assembles it and the other answers 409.

Nothing but the gate's rebuilt copy is ever kept (``UploadStore.keep``), and a job's input
is a copy of it (``UploadStore.adopt``): a worker never sees bytes the gate has not read.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import re
import uuid
from pathlib import Path
from typing import Any, TypedDict, cast

from anyio import to_thread
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy import delete as sql_delete

from app.constants import SHA256_RE
from app.errors import ApiErrorCode, Conflict, NotFound, ServiceError, Unprocessable
from app.jobs.models import DEFAULT_TENANT
from app.jobs.models import uploads as uploads_table
from app.jobs.store import _as_service_errors, retry_busy, utcnow
from app.settings import Settings
from app.storage.base import UploadStore
from app.validation.gate import GateReport
from app.validation.isolated import run_gate

log = logging.getLogger("app.storage.resumable")
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
S3_MIN_PART_BYTES = 5 * 1024**2  # S3 refuses smaller parts, but the last
MAX_PARTS = 10_000
SWEEP_BATCH = 32


class UploadStatus(enum.StrEnum):
    """Where a resumable upload is."""

    RECEIVING = "receiving"
    """Created; parts may be sent (and sent again)."""
    ASSEMBLING = "assembling"
    """Complete was asked: the parts are joined, hashed and gated; no part is taken."""
    READY = "ready"
    """Gated: submits may name it by id or sha256."""
    FAILED = "failed"
    """Its size, sha256 or the gate refused it; ``error`` says why; nothing was kept."""


OPEN = (UploadStatus.RECEIVING, UploadStatus.ASSEMBLING)


class UploadRecord(TypedDict):
    """One row of the uploads table."""

    seq: int
    id: str
    status: str
    size_bytes: int
    part_size_bytes: int
    parts: int
    sha256: str | None
    structure_sha256: str | None
    multipart_id: str | None
    error: dict[str, Any] | None
    created_at: dt.datetime
    completed_at: dt.datetime | None
    expires_at: dt.datetime
    tenant: str
    assembling_since: dt.datetime | None


def unknown_upload(name: str) -> NotFound:
    return NotFound(f"no upload {name[:80]!r} (never created, expired or removed); create one "
                    "with POST /v1/uploads", code=ApiErrorCode.UNKNOWN_UPLOAD)


def known_shape(upload_id: str) -> str:
    """An id no upload can have never reaches the database (NUL bytes, ``..``, megabytes)."""
    if not UPLOAD_ID_RE.fullmatch(upload_id):
        raise unknown_upload(upload_id)
    return upload_id


def plan_parts(size_bytes: int, *, part_bytes: int, direct: bool) -> tuple[int, int]:
    """(part size, number of parts) of an upload of ``size_bytes``: never more than 10,000
    parts (S3's limit, and what keeps the answer that lists them small); an object store
    also needs parts of at least 5 MiB."""
    part_bytes = max(part_bytes, math.ceil(size_bytes / MAX_PARTS))
    if direct:
        part_bytes = max(part_bytes, S3_MIN_PART_BYTES)
    return part_bytes, max(1, math.ceil(size_bytes / part_bytes))


def part_bytes(upload: UploadRecord, number: int) -> int:
    """The size part ``number`` must have: the part size, but the last holds the rest."""
    if number < upload["parts"]:
        return upload["part_size_bytes"]
    return upload["size_bytes"] - upload["part_size_bytes"] * (upload["parts"] - 1)


def check_part_number(upload: UploadRecord, number: int) -> None:
    if not 1 <= number <= upload["parts"]:
        raise Unprocessable(f"part {number} is out of range: upload {upload['id']} has parts "
                            f"1..{upload['parts']}", code=ApiErrorCode.INVALID_PART)


def _as_upload(mapping: Any) -> UploadRecord:
    row = dict(mapping)
    for key in ("created_at", "completed_at", "expires_at", "assembling_since"):
        if row.get(key) is not None and row[key].tzinfo is None:  # SQLite: naive, UTC
            row[key] = row[key].replace(tzinfo=dt.UTC)
    return cast(UploadRecord, row)


class UploadRecords:
    """Reads and writes rows of the uploads table.

    :param engine: the job database's engine (``JobStore.engine``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @_as_service_errors
    @retry_busy
    def create(self, **fields: Any) -> UploadRecord:
        now = utcnow()
        row = {"id": uuid.uuid4().hex, "status": UploadStatus.RECEIVING.value,
               "created_at": now, "tenant": DEFAULT_TENANT, **fields}
        with self.engine.begin() as conn:
            conn.execute(insert(uploads_table).values(**row))
        made = self.get(row["id"])
        assert made is not None
        return made

    @_as_service_errors
    def get(self, upload_id: str, *, tenant: str | None = None) -> UploadRecord | None:
        """The upload; with ``tenant`` (every request), only if it is that tenant's."""
        query = select(uploads_table).where(uploads_table.c.id == upload_id)
        if tenant is not None:
            query = query.where(uploads_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _as_upload(row._mapping) if row is not None else None

    @_as_service_errors
    def find_ready(self, *, sha256: str, now: dt.datetime,
                   tenant: str) -> UploadRecord | None:
        """The newest ready, unexpired upload of these bytes made by ``tenant`` (knowing a
        sha256 never hands over another tenant's upload)."""
        query = (select(uploads_table).where(uploads_table.c.sha256 == sha256)
                 .where(uploads_table.c.tenant == tenant)
                 .where(uploads_table.c.status == UploadStatus.READY.value)
                 .where(uploads_table.c.expires_at > now)
                 .order_by(uploads_table.c.seq.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _as_upload(row._mapping) if row is not None else None

    @_as_service_errors
    def count_open(self, *, now: dt.datetime) -> int:
        query = (select(func.count()).where(uploads_table.c.status.in_([s.value for s in OPEN]))
                 .where(uploads_table.c.expires_at > now))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    @_as_service_errors
    @retry_busy
    def transition(self, upload_id: str, *, from_: UploadStatus, to: UploadStatus,
                   **fields: Any) -> bool:
        """Move an upload from ``from_`` to ``to``; True when it moved (no one else did)."""
        query = (update(uploads_table).where(uploads_table.c.id == upload_id)
                 .where(uploads_table.c.status == from_.value)
                 .values(status=to.value, **fields))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    @_as_service_errors
    @retry_busy
    def reopen_stale(self, *, began_before: dt.datetime) -> int:
        """Uploads whose complete began before ``began_before`` and never ended (the
        replica doing it died) go back to ``receiving``: the client's next complete does
        it again (and GET shows any part to send again). Returns how many."""
        query = (update(uploads_table)
                 .where(uploads_table.c.status == UploadStatus.ASSEMBLING.value)
                 .where(uploads_table.c.assembling_since < began_before)
                 .values(status=UploadStatus.RECEIVING.value, assembling_since=None))
        with self.engine.begin() as conn:
            return int(conn.execute(query).rowcount)

    @_as_service_errors
    @retry_busy
    def touch(self, upload_id: str, *, expires_at: dt.datetime) -> None:
        """A ready upload just used is kept a TTL from now."""
        with self.engine.begin() as conn:
            conn.execute(update(uploads_table).where(uploads_table.c.id == upload_id)
                         .where(uploads_table.c.expires_at < expires_at)
                         .values(expires_at=expires_at))

    @_as_service_errors
    def expired(self, *, now: dt.datetime, limit: int) -> list[UploadRecord]:
        query = (select(uploads_table).where(uploads_table.c.expires_at <= now)
                 .order_by(uploads_table.c.expires_at).limit(limit))
        with self.engine.connect() as conn:
            return [_as_upload(row._mapping) for row in conn.execute(query)]

    @_as_service_errors
    @retry_busy
    def delete(self, upload_id: str, *, status: str, expires_at: dt.datetime) -> bool:
        """Delete the row if nobody changed it since it was read; True when deleted."""
        query = (sql_delete(uploads_table).where(uploads_table.c.id == upload_id)
                 .where(uploads_table.c.status == status)
                 .where(uploads_table.c.expires_at == expires_at))
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1


def sweep(records: UploadRecords, store: UploadStore, *, now: dt.datetime) -> int:
    """Remove uploads past their expiry: the row first (guarded: one replica wins), then
    the parts or the kept copy. Returns how many were removed."""
    removed = 0
    for upload in records.expired(now=now, limit=SWEEP_BATCH):
        if not records.delete(upload["id"], status=upload["status"],
                              expires_at=upload["expires_at"]):
            continue
        removed += 1
        try:
            store.parts.abort(upload["id"], upload["multipart_id"])
            store.forget(upload["id"])
        except ServiceError as exc:  # the bucket's lifecycle rule catches what is left
            log.warning("could not remove expired upload %s: %s", upload["id"], exc.message)
    return removed


async def assemble_and_gate(upload: UploadRecord, *, records: UploadRecords,
                            store: UploadStore, settings: Settings) -> UploadRecord:
    """Join the parts of an upload now ``assembling``, check its size and sha256, run the
    gate on it and keep the gate's copy; the upload ends ``ready``, or ``failed`` with the
    4xx raised (the same a direct submit of these bytes gets). A failure to join the parts
    (the object store down, a full disk) puts it back to ``receiving``: complete again."""
    upload_id = upload["id"]
    numbers = list(range(1, upload["parts"] + 1))
    assembled, staged = store.staging_path(), store.staging_path()
    try:
        try:
            sha256 = await to_thread.run_sync(store.parts.assemble, upload_id,
                                              upload["multipart_id"], numbers, assembled)
        except BaseException:
            records.transition(upload_id, from_=UploadStatus.ASSEMBLING,
                               to=UploadStatus.RECEIVING, assembling_since=None)
            raise
        try:
            report = await _check(upload, assembled, staged, sha256, settings)
            await to_thread.run_sync(store.keep, upload_id, staged)
        except BaseException as exc:
            error = (exc if isinstance(exc, ServiceError) else
                     ServiceError("the upload could not be checked; create it again"))
            records.transition(upload_id, from_=UploadStatus.ASSEMBLING,
                               to=UploadStatus.FAILED, completed_at=utcnow(),
                               error={"code": error.code.value, "message": error.message})
            raise
    finally:
        assembled.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    now = utcnow()
    moved = records.transition(upload_id, from_=UploadStatus.ASSEMBLING, to=UploadStatus.READY,
                               sha256=sha256, structure_sha256=report.structure_sha256,
                               completed_at=now,
                               expires_at=now + dt.timedelta(seconds=settings.upload_ttl_s))
    if not moved:  # swept meanwhile (it outlived its TTL while being gated)
        await to_thread.run_sync(store.forget, upload_id)
        raise unknown_upload(upload_id)
    ready = records.get(upload_id)
    assert ready is not None
    return ready


async def _check(upload: UploadRecord, assembled: Path, staged: Path, sha256: str,
                 settings: Settings) -> GateReport:
    size = assembled.stat().st_size
    if size != upload["size_bytes"] or (upload["sha256"] and sha256 != upload["sha256"]):
        raise Unprocessable(
            f"upload {upload['id']} assembled to {size} bytes with sha256 {sha256}, but "
            f"{upload['size_bytes']} bytes with sha256 {upload['sha256'] or '-'} were "
            "declared; nothing was kept: create a new upload and send the parts again",
            code=ApiErrorCode.CHECKSUM_MISMATCH)
    return await run_gate(assembled, staged, settings.archive_limits(),
                          settings.gate_resources())


def resolve(records: UploadRecords, name: str, *, now: dt.datetime,
            tenant: str) -> UploadRecord:
    """The ready upload of ``tenant`` a submit names: an upload id or ``sha256:<hex>``."""
    if name.startswith("sha256:"):
        digest = name.removeprefix("sha256:").lower()
        if not SHA256_RE.fullmatch(digest):
            raise unknown_upload(name)
        found = records.find_ready(sha256=digest, now=now, tenant=tenant)
        if found is None:
            raise unknown_upload(name)
        return found
    upload = records.get(known_shape(name), tenant=tenant)
    if upload is None or upload["expires_at"] <= now:
        raise unknown_upload(name)
    if upload["status"] != UploadStatus.READY.value:
        why = (f": {upload['error']['message']}" if upload["error"] else
               "; complete it first (POST /v1/uploads/{id}/complete)")
        raise Conflict(f"upload {name} is {upload['status']}, not ready{why}",
                       code=ApiErrorCode.UPLOAD_NOT_READY)
    return upload


def take(records: UploadRecords, store: UploadStore, name: str, *, job_id: str,
         ttl_s: float, tenant: str) -> UploadRecord:
    """A copy of ``tenant``'s ready upload ``name`` becomes the input of ``job_id``; the
    upload is kept ``ttl_s`` from now."""
    now = utcnow()
    upload = resolve(records, name, now=now, tenant=tenant)
    try:
        store.adopt(job_id, upload["id"])
    except FileNotFoundError:
        raise unknown_upload(name) from None
    records.touch(upload["id"], expires_at=now + dt.timedelta(seconds=ttl_s))
    return upload
