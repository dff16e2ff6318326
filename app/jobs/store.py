"""Job records. Every status change is a guarded UPDATE, so two actors never both move a job."""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypedDict, TypeVar, Unpack, cast

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from app.constants import JobStatus
from app.errors import ApiErrorCode, ServiceError, ServiceUnavailable, StorageFull
from app.jobs.failures import out_of_space
from app.jobs.models import DEFAULT_TENANT, lowerings, tenants
from app.jobs.models import uploads as uploads_table
from app.webhooks import outbox

log = logging.getLogger("app.jobs")
F = TypeVar("F", bound=Callable[..., Any])
ADMISSION_LOCK_ID = 0x6C6F7765
"""PostgreSQL advisory lock key of admissions and deletions (one lock, every replica)."""


class JobFields(TypedDict, total=False):
    """Columns a write may set (all optional): what ``create`` and the transitions take."""

    id: str
    status: str
    phase: str | None
    model_name: str
    backend_id: str
    device: str
    options: dict[str, Any]
    verify: bool
    rtol: float
    atol: float
    input_sha256: str
    input_size_bytes: int
    artifact_sha256: str | None
    artifact_size_bytes: int | None
    verification: dict[str, Any] | None
    error: dict[str, Any] | None
    timings: dict[str, float]
    toolchain: dict[str, Any] | None
    worker_pid: int | None
    attempts: int
    resources: dict[str, Any] | None
    profile: dict[str, Any] | None
    cache_key: str | None
    cache_hit: bool
    parent_id: str | None
    code_key: str | None
    code_reused_from: str | None
    worker: str | None
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    callback_url: str | None
    tenant: str


class JobRecord(TypedDict):
    """One row of the job table, as every reader gets it."""

    seq: int
    id: str
    status: str
    phase: str | None
    model_name: str
    backend_id: str
    device: str
    options: dict[str, Any]
    verify: bool
    rtol: float
    atol: float
    input_sha256: str
    input_size_bytes: int
    artifact_sha256: str | None
    artifact_size_bytes: int | None
    verification: dict[str, Any] | None
    error: dict[str, Any] | None
    timings: dict[str, float]
    toolchain: dict[str, Any] | None
    worker_pid: int | None
    attempts: int
    resources: dict[str, Any] | None
    profile: dict[str, Any] | None
    cache_key: str | None
    cache_hit: bool
    parent_id: str | None
    code_key: str | None
    code_reused_from: str | None
    worker: str | None
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    callback_url: str | None
    tenant: str
    last_used_at: dt.datetime | None
    artifact_expired_at: dt.datetime | None
    artifact_expired_reason: str | None
    input_removed_at: dt.datetime | None
    log_removed_at: dt.datetime | None


Job = JobRecord


def is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text)


def _as_service_errors(method: F) -> F:
    """The database's own failures, as the service's errors: callers (the API's handlers
    among them) never see SQLAlchemy. Busy past the retries is 503 with a Retry-After, a
    full disk 507, an unreachable database 503."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OperationalError as exc:
            raise _service_error(exc) from exc

    return cast(F, wrapper)


def _service_error(exc: OperationalError) -> ServiceError:
    if out_of_space(exc):
        return StorageFull("the job database is out of disk space; delete finished "
                           "lowerings or free space, then retry")
    if is_busy(exc):
        return ServiceUnavailable("the job database is busy; retry soon",
                                  code=ApiErrorCode.DATABASE_BUSY, retry_after_s=5)
    log.error("job database error: %s", exc)
    return ServiceUnavailable("the job database cannot be reached; retry soon",
                              retry_after_s=5)


# SQLite answers "database is locked" when writers collide past its busy timeout;
# such a write is retried, never turned into a 500.
retry_busy = retry(retry=retry_if_exception(is_busy), stop=stop_after_delay(60),
                   wait=wait_random_exponential(multiplier=0.05, max=1.0), reraise=True)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a long busy timeout (workers write too)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    """Reads and writes job rows.

    :param url: SQLAlchemy database URL.
    """

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._local_lock = threading.Lock()
        database = self.engine.url.database
        self._lock_file = (f"{database}.admission-lock" if self.engine.dialect.name == "sqlite"
                           and database and database != ":memory:" else None)

    @contextmanager
    def admission_lock(self) -> Iterator[None]:
        """Held by every process using this database while an admission looks for an
        identical job and records its own, and while a deletion counts an archive's
        references: so coalescing, cache hits and garbage collection hold across API
        replicas and worker hosts, not just within one process. PostgreSQL: an advisory
        lock on a connection held meanwhile; SQLite: an flock next to the database file."""
        with self._local_lock:
            if self.engine.dialect.name == "postgresql":
                try:
                    conn = self.engine.connect()
                    conn.execute(text("SELECT pg_advisory_lock(:key)"),
                                 {"key": ADMISSION_LOCK_ID})
                except OperationalError as exc:
                    raise _service_error(exc) from exc
                try:
                    yield
                finally:
                    try:
                        conn.execute(text("SELECT pg_advisory_unlock(:key)"),
                                     {"key": ADMISSION_LOCK_ID})
                    except OperationalError:  # the session is gone, and its lock with it
                        log.warning("could not release the admission lock cleanly")
                    finally:
                        conn.close()
            elif self._lock_file is not None:
                with open(self._lock_file, "a+b") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
                    yield
            else:
                yield

    def close(self) -> None:
        self.engine.dispose()

    @_as_service_errors
    def ping(self) -> None:
        """Raises when the database cannot answer a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @_as_service_errors
    @retry_busy
    def create(self, **fields: Unpack[JobFields]) -> JobRecord:
        row: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "status": JobStatus.QUEUED.value,
            "timings": {},
            "attempts": 0,
            "cache_hit": False,
            "created_at": utcnow(),
            "tenant": DEFAULT_TENANT,
            **fields,
        }
        with self.engine.begin() as conn:
            conn.execute(insert(lowerings).values(**row))
            if JobStatus(row["status"]).is_final:  # a cache hit: its event commits with it
                self._enqueue_events(conn, row["id"])
        job = self.get(row["id"])
        assert job is not None
        return job

    @_as_service_errors
    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord | None:
        """The job; with ``tenant`` (every request), only if it is that tenant's: another
        tenant's job is as unknown as one that never existed."""
        query = _of(select(lowerings).where(lowerings.c.id == job_id), tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _as_job(row._mapping) if row is not None else None

    @_as_service_errors
    def list_page(
        self,
        *,
        status: str | None = None,
        model_name: str | None = None,
        limit: int = 50,
        before: tuple[dt.datetime, str] | None = None,
        tenant: str | None = None,
    ) -> list[JobRecord]:
        """Newest first by (created_at, id); ``before`` is the paging cursor, the last
        row's (created_at, id); only ``tenant``'s jobs if given."""
        query = _of(select(lowerings).order_by(lowerings.c.created_at.desc(),
                                               lowerings.c.id.desc()).limit(limit), tenant)
        if status is not None:
            query = query.where(lowerings.c.status == status)
        if model_name is not None:
            query = query.where(lowerings.c.model_name == model_name)
        if before is not None:
            at, job_id = before
            query = query.where(or_(lowerings.c.created_at < at,
                                    and_(lowerings.c.created_at == at,
                                         lowerings.c.id < job_id)))
        with self.engine.connect() as conn:
            return [_as_job(row._mapping) for row in conn.execute(query)]

    @_as_service_errors
    def ids_with_status(self, *, statuses: Iterable[JobStatus]) -> list[str]:
        values = [s.value for s in statuses]
        query = select(lowerings.c.id).where(lowerings.c.status.in_(values))
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(query.order_by(lowerings.c.seq))]

    @_as_service_errors
    @retry_busy
    def transition(
        self, job_id: str, *, from_: Iterable[JobStatus], to: JobStatus,
        attempt: int | None = None, lease_expired_at: dt.datetime | None = None,
        **fields: Unpack[JobFields],
    ) -> bool:
        """Move a job to ``to`` only if it is in one of ``from_`` (and, if given, still in
        its ``attempt``, or its lease expired by ``lease_expired_at``); True when it moved."""
        values: dict[str, Any] = {"status": to.value, **fields}
        if to is JobStatus.RUNNING:
            values.setdefault("started_at", utcnow())
        if to.is_final or to is JobStatus.QUEUED:
            values.setdefault("lease_expires_at", None)
        if to.is_final:
            values.setdefault("finished_at", utcnow())
            values.setdefault("phase", None)
        query = _guarded(update(lowerings).where(lowerings.c.id == job_id), attempt,
                         lease_expired_at).where(
            lowerings.c.status.in_([s.value for s in from_])).values(**values)
        with self.engine.begin() as conn:
            moved = conn.execute(query).rowcount == 1
            if moved and to.is_final:  # the outbox: the event commits with the status
                self._enqueue_events(conn, job_id)
            return moved

    def _enqueue_events(self, conn: Connection, job_id: str) -> None:
        row = conn.execute(select(lowerings).where(lowerings.c.id == job_id)).first()
        if row is not None:
            outbox.enqueue(conn, _as_job(row._mapping), now=utcnow())

    @_as_service_errors
    def expired_leases(self, *, now: dt.datetime) -> list[JobRecord]:
        """Running jobs whose worker stopped renewing its lease before ``now``."""
        query = (select(lowerings).where(lowerings.c.status == JobStatus.RUNNING.value)
                 .where(lowerings.c.lease_expires_at < now).order_by(lowerings.c.seq))
        with self.engine.connect() as conn:
            return [_as_job(row._mapping) for row in conn.execute(query)]

    @_as_service_errors
    @retry_busy
    def update_running(self, job_id: str, *, attempt: int | None = None,
                       **fields: Unpack[JobFields]) -> bool:
        """Record progress (phase, lease) of a job that is still running (in ``attempt``,
        if given: a worker whose job was taken over must not write to it)."""
        query = (
            _guarded(update(lowerings).where(lowerings.c.id == job_id), attempt, None)
            .where(lowerings.c.status == JobStatus.RUNNING.value)
            .values(**fields)
        )
        with self.engine.begin() as conn:
            return conn.execute(query).rowcount == 1

    @_as_service_errors
    @retry_busy
    def delete(self, job_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(sql_delete(lowerings).where(lowerings.c.id == job_id)).rowcount == 1

    @_as_service_errors
    def count_artifact_refs(self, *, sha256: str) -> int:
        """Jobs whose archive is this one and has not expired (app.jobs.retention): while
        any is left, the bytes stay."""
        return self._count((lowerings.c.artifact_sha256 == sha256)
                           & lowerings.c.artifact_expired_at.is_(None))

    @_as_service_errors
    def count_waiting(self) -> int:
        """Queued jobs that will need a worker (coalesced ones ride along)."""
        return self._count((lowerings.c.status == JobStatus.QUEUED.value)
                           & lowerings.c.parent_id.is_(None))

    @_as_service_errors
    def count_waiting_before(self, *, seq: int) -> int:
        """Queued jobs that need a worker admitted before ``seq``: the queue position of
        the job with that seq (0: next). A range scan of ix_lowerings_status_seq, so it
        stays cheap for the events stream that asks every half second."""
        return self._count((lowerings.c.status == JobStatus.QUEUED.value)
                           & (lowerings.c.seq < seq) & lowerings.c.parent_id.is_(None))

    @_as_service_errors
    def count_active(self, *, tenant: str) -> int:
        """The tenant's queued and running jobs (its quota; followers count too)."""
        return self._count((lowerings.c.tenant == tenant) & lowerings.c.status.in_(
            [JobStatus.QUEUED.value, JobStatus.RUNNING.value]))

    @_as_service_errors
    def stored_bytes(self, *, tenant: str) -> int:
        """What the tenant keeps: its jobs' inputs and archives (an archive shared by
        several jobs counts for each: it is what deleting them all would free) and its
        resumable uploads that are not failed or expired (one still receiving counts its
        declared size: the room it will take). What retention removed no longer counts."""
        held_input = case((lowerings.c.input_removed_at.is_(None),
                           lowerings.c.input_size_bytes), else_=0)
        held_archive = case((lowerings.c.artifact_expired_at.is_(None),
                             lowerings.c.artifact_size_bytes), else_=0)
        jobs = select(func.coalesce(func.sum(held_input), 0)
                      + func.coalesce(func.sum(held_archive), 0)
                      ).where(lowerings.c.tenant == tenant)
        kept = (select(func.coalesce(func.sum(uploads_table.c.size_bytes), 0))
                .where(uploads_table.c.tenant == tenant)
                .where(uploads_table.c.status != "failed")
                .where(uploads_table.c.expires_at > utcnow()))
        with self.engine.connect() as conn:
            return int(conn.execute(jobs).scalar_one()) + int(conn.execute(kept).scalar_one())

    @_as_service_errors
    def tenant_limits(self, *, tenant: str) -> tuple[int | None, int | None]:
        """The tenant's quota overrides (max active jobs, max storage bytes); None: the
        global default."""
        query = (select(tenants.c.max_active_jobs, tenants.c.max_storage_bytes)
                 .where(tenants.c.name == tenant))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row[0], row[1]) if row is not None else (None, None)

    @_as_service_errors
    @retry_busy
    def set_tenant_limits(self, *, tenant: str, max_active_jobs: int | None,
                          max_storage_bytes: int | None) -> None:
        """Set (or, with both None, clear) the tenant's quota overrides."""
        values = {"max_active_jobs": max_active_jobs, "max_storage_bytes": max_storage_bytes,
                  "updated_at": utcnow()}
        with self.engine.begin() as conn:
            if conn.execute(update(tenants).where(tenants.c.name == tenant)
                            .values(**values)).rowcount == 0:
                conn.execute(insert(tenants).values(name=tenant, **values))

    @_as_service_errors
    def all_tenant_limits(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(tenants).order_by(tenants.c.name)).all()
        return [dict(row._mapping) for row in rows]

    def _count(self, where: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).where(where)).scalar_one())

    @_as_service_errors
    def find_by_key(self, *, cache_key: str, statuses: Iterable[JobStatus],
                    tenant: str | None = None) -> JobRecord | None:
        """The newest job with this cache key in one of ``statuses`` that does the work
        (``tenant``'s, if given)."""
        query = _of(
            select(lowerings)
            .where(lowerings.c.cache_key == cache_key)
            .where(lowerings.c.status.in_([s.value for s in statuses]))
            .where(lowerings.c.parent_id.is_(None))
            .where(lowerings.c.artifact_expired_at.is_(None))
            .order_by(lowerings.c.seq.desc())
            .limit(1), tenant
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return _as_job(row._mapping) if row is not None else None

    @_as_service_errors
    def find_code_donors(self, *, code_key: str, exclude_id: str, tenant: str,
                         limit: int = 3) -> list[JobRecord]:
        """The newest succeeded jobs of ``tenant`` with this code key and an archive,
        other than ``exclude_id``: whose compiled files a job with the same key may take."""
        query = _of(
            select(lowerings)
            .where(lowerings.c.code_key == code_key)
            .where(lowerings.c.status == JobStatus.SUCCEEDED.value)
            .where(lowerings.c.artifact_sha256.is_not(None))
            .where(lowerings.c.artifact_expired_at.is_(None))
            .where(lowerings.c.id != exclude_id)
            .order_by(lowerings.c.seq.desc())
            .limit(limit), tenant
        )
        with self.engine.connect() as conn:
            return [_as_job(row._mapping) for row in conn.execute(query)]

    @_as_service_errors
    def children_of(self, parent_id: str) -> list[JobRecord]:
        query = select(lowerings).where(lowerings.c.parent_id == parent_id)
        with self.engine.connect() as conn:
            return [_as_job(row._mapping) for row in conn.execute(query.order_by(lowerings.c.seq))]

    @_as_service_errors
    @retry_busy
    def reparent(self, job_ids: Iterable[str], *, parent_id: str | None) -> None:
        ids = list(job_ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(update(lowerings).where(lowerings.c.id.in_(ids))
                         .values(parent_id=parent_id))


def _of(query: Any, tenant: str | None) -> Any:
    """Only ``tenant``'s rows (None: every tenant's, for the service's own work)."""
    return query if tenant is None else query.where(lowerings.c.tenant == tenant)


def _guarded(query: Any, attempt: int | None, lease_expired_at: dt.datetime | None) -> Any:
    """The fencing guards of a write: the claim it belongs to, an expired lease."""
    if attempt is not None:
        query = query.where(lowerings.c.attempts == attempt)
    if lease_expired_at is not None:
        query = query.where(lowerings.c.lease_expires_at < lease_expired_at)
    return query


def _as_job(mapping: Any) -> JobRecord:
    job = dict(mapping)
    for key in ("created_at", "started_at", "finished_at", "lease_expires_at", "last_used_at",
                "artifact_expired_at", "input_removed_at", "log_removed_at"):
        value = job.get(key)
        # SQLite hands back naive datetimes; everything we store is UTC.
        if value is not None and value.tzinfo is None:
            job[key] = value.replace(tzinfo=dt.UTC)
    return cast(JobRecord, job)
