"""Retention: what the service keeps, for how long, and what it evicts when space is short.

What grows with use: archives (content-addressed: the jobs that made or were served the
same bytes share one), job inputs (the gate's copy of each upload), job logs, resumable
uploads, and the webhook delivery log. A sweep (``Janitor``, in every API replica, every
LOWERING_RETENTION_INTERVAL_S) removes:

- a finished job's input LOWERING_INPUT_TTL_S after it ended, and its log after
  LOWERING_LOG_TTL_S (then its log is 410 log_expired);
- an archive nobody used (made, downloaded, served as a cache hit) for
  LOWERING_ARTIFACT_TTL_S: reason ``ttl``;
- while what is stored (archives, inputs, resumable uploads) is over
  LOWERING_STORAGE_BUDGET_BYTES, archives least recently used first, down to
  BUDGET_LOW_WATER of it: reason ``budget``;
- resumable uploads past their expiry, and delivered or failed webhook deliveries older
  than LOWERING_WEBHOOK_DELIVERY_TTL_S;
- hourly, stored archives no job references (orphans of a crash or a cancel).

An archive is one cache entry however many jobs reference it: its last use is the latest
of theirs, and when it goes every job referencing it is marked expired, with the reason,
in one update under the admission lock, before the bytes are removed. So no cache hit can
take it meanwhile, and a worker about to succeed with the same bytes finds them gone
(ArtifactLost) and stores them again. Nothing a live job references goes: never an
active job's input, never an archive a queued or running job may take compiled code from
(same code key, same tenant), and for the budget never one used in the last
LOWERING_EVICT_GRACE_S (its client is likely still fetching it). Job rows stay: an expired
job still says what it was, and its archive answers 410 artifact_expired with the reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, case, delete, exists, func, select, update

from app import metrics
from app.constants import JobStatus
from app.errors import ServiceError
from app.jobs.models import lowerings, webhook_deliveries
from app.jobs.models import uploads as uploads_table
from app.jobs.store import JobRecord, JobStore, _as_service_errors, retry_busy, utcnow
from app.settings import Settings
from app.storage import resumable
from app.storage.base import ArtifactStore, LogStore, UploadStore
from app.webhooks.outbox import DeliveryStatus

log = logging.getLogger("app.retention")

BUDGET_LOW_WATER = 0.9
"""Eviction for the budget stops at this fraction of it, so one new archive does not
start another round at once."""
BATCH = 200
"""Rows (or archives) one step of a sweep handles before it reads again."""
USE_EVERY_S = 60.0
"""A download records its use at most this often per job (no write per request)."""
ASSEMBLY_MARGIN_S = 900.0
"""A resumable upload's complete (joining the parts, then the gate) that has not ended
LOWERING_GATE_TIMEOUT_S plus this after it began is taken for dead."""
ORPHANS_EVERY_S = 3600.0
"""How often a replica lists the stored archives to find those no job references (on S3
a listing of the bucket's archives); only archives older than the job timeout plus this
are taken, so a worker's archive not yet committed to its job is left alone."""

FINAL = [s.value for s in JobStatus if s.is_final]
ACTIVE = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
LAST_USE = func.coalesce(lowerings.c.last_used_at, lowerings.c.finished_at)
HELD = ((lowerings.c.status == JobStatus.SUCCEEDED.value)
        & lowerings.c.artifact_sha256.is_not(None)
        & lowerings.c.artifact_expired_at.is_(None))
"""The jobs whose archive is still stored."""


class Expiry(enum.StrEnum):
    """Why an archive was removed (the job's ``artifact_expired_reason``)."""

    TTL = "ttl"
    BUDGET = "budget"

    def explain(self, settings: Settings) -> str:
        if self is Expiry.TTL:
            return (f"nobody downloaded it or was served it for "
                    f"{_duration(settings.artifact_ttl_s or 0)} (LOWERING_ARTIFACT_TTL_S)")
        return ("it was the least recently used archive when the service's storage was "
                f"over its budget of {settings.storage_budget_bytes} bytes "
                "(LOWERING_STORAGE_BUDGET_BYTES)")


def _duration(seconds: float) -> str:
    if seconds >= 86_400 and seconds % 86_400 == 0:
        return f"{int(seconds // 86_400)} d"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    return f"{seconds:g} s"


@dataclass
class Sweep:
    """What one sweep removed (counts; ``freed_bytes``: archives and inputs)."""

    at: dt.datetime = field(default_factory=utcnow)
    inputs: int = 0
    logs: int = 0
    archives_ttl: int = 0
    archives_budget: int = 0
    archives_orphaned: int = 0
    """Stored archives no job references (a job cancelled between storing its archive
    and its commit, a sweep that died between its update and the delete)."""
    uploads: int = 0
    uploads_reopened: int = 0
    deliveries: int = 0
    freed_bytes: int = 0
    over_budget_bytes: int = 0
    """What the budget could not free: everything left was live or too recently used."""
    errors: list[str] = field(default_factory=list)
    stored: Usage | None = None
    """What is stored after the sweep (None if it could not be read)."""

    def as_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("stored")
        return {**fields, "at": self.at.isoformat()}


@dataclass(frozen=True)
class Usage:
    """What is stored now, from the job database (the same on every replica)."""

    archives: int
    archive_bytes: int
    inputs: int
    input_bytes: int
    uploads: int
    upload_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.archive_bytes + self.input_bytes + self.upload_bytes


class Retention:
    """The retention rules over the job table and the stores.

    :param store: the job table (and its admission lock).
    :param uploads: job inputs and resumable uploads.
    :param logs: job logs.
    :param artifacts: archives.
    :param settings: the TTLs, the budget and its grace.
    """

    def __init__(self, store: JobStore, *, uploads: UploadStore, logs: LogStore,
                 artifacts: ArtifactStore, settings: Settings) -> None:
        self.store = store
        self.engine = store.engine
        self.uploads = uploads
        self.logs = logs
        self.artifacts = artifacts
        self.settings = settings
        self._orphans_at: dt.datetime | None = None

    # -- reading ------------------------------------------------------------------------

    @_as_service_errors
    def usage(self, *, now: dt.datetime | None = None) -> Usage:
        """Archives (each stored once, whatever number of jobs share it), inputs not yet
        removed (active jobs' included), resumable uploads receiving or kept."""
        now = now or utcnow()
        archives = (select(lowerings.c.artifact_sha256,
                           func.max(lowerings.c.artifact_size_bytes).label("size"))
                    .where(HELD).group_by(lowerings.c.artifact_sha256).subquery())
        with self.engine.connect() as conn:
            n_arch, arch = conn.execute(select(func.count(),
                                               func.coalesce(func.sum(archives.c.size), 0))
                                        ).one()
            n_in, inputs = conn.execute(
                select(func.count(), func.coalesce(func.sum(lowerings.c.input_size_bytes), 0))
                .where(lowerings.c.input_removed_at.is_(None))).one()
            n_up, ups = conn.execute(
                select(func.count(), func.coalesce(func.sum(uploads_table.c.size_bytes), 0))
                .where(uploads_table.c.status != resumable.UploadStatus.FAILED.value)
                .where(uploads_table.c.expires_at > now)).one()
        return Usage(int(n_arch), int(arch), int(n_in), int(inputs), int(n_up), int(ups))

    def _lru(self, conn: Connection, *, used_before: dt.datetime,
             skip: Iterable[str]) -> list[tuple[str, int]]:
        """Up to BATCH stored archives last used before ``used_before``, least recently
        used first, as (sha256, size); none of ``skip``."""
        query = (select(lowerings.c.artifact_sha256, func.max(lowerings.c.artifact_size_bytes))
                 .where(HELD).group_by(lowerings.c.artifact_sha256)
                 .having(func.max(LAST_USE) < used_before)
                 .order_by(func.max(LAST_USE), lowerings.c.artifact_sha256))
        skipped = set(skip)
        if skipped:
            query = query.where(lowerings.c.artifact_sha256.not_in(skipped))
        return [(str(sha), int(size or 0)) for sha, size in conn.execute(query.limit(BATCH))]

    @staticmethod
    def _live(conn: Connection, sha256: str | None = None) -> set[str]:
        """Stored archives a queued or running job may take compiled code from: their job
        has that job's code key and tenant (``JobLifecycle.code_donors``)."""
        active = lowerings.alias("active")
        query = (select(lowerings.c.artifact_sha256).distinct().where(HELD)
                 .where(exists().where(active.c.status.in_(ACTIVE))
                        .where(active.c.code_key == lowerings.c.code_key)
                        .where(active.c.tenant == lowerings.c.tenant)))
        if sha256 is not None:
            query = query.where(lowerings.c.artifact_sha256 == sha256)
        return {str(sha) for (sha,) in conn.execute(query)}

    # -- removing -------------------------------------------------------------------------

    @_as_service_errors
    @retry_busy
    def _expire(self, sha256: str, *, reason: Expiry, used_before: dt.datetime,
                now: dt.datetime) -> int:
        """Mark every job holding this archive expired and remove the bytes, unless it
        was used since ``used_before`` or became live; returns how many jobs it marked."""
        with self.store.admission_lock():
            with self.engine.begin() as conn:
                last = conn.execute(select(func.max(LAST_USE)).where(HELD)
                                    .where(lowerings.c.artifact_sha256 == sha256)).scalar()
                if last is None or _utc(last) >= used_before or self._live(conn, sha256):
                    return 0
                marked = conn.execute(
                    update(lowerings).where(HELD).where(lowerings.c.artifact_sha256 == sha256)
                    .values(artifact_expired_at=now, artifact_expired_reason=reason.value)
                ).rowcount
            # Marked first: a failure from here on leaves stray bytes, never a job whose
            # archive is missing; no new job can reference it (hits skip expired jobs).
            self.artifacts.remove(sha256)
        log.info("archive %s removed (%s): %d lowering(s) now answer 410", sha256, reason,
                 marked)
        metrics.record_removal(f"archive_{reason.value}")
        return int(marked)

    def expire_unused(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """Archives unused for LOWERING_ARTIFACT_TTL_S."""
        ttl = self.settings.artifact_ttl_s
        if ttl is None:
            return
        used_before = now - dt.timedelta(seconds=ttl)
        passed: set[str] = set()
        while True:
            with self.engine.connect() as conn:
                live = self._live(conn)
                batch = self._lru(conn, used_before=used_before, skip=passed | live)
            if not batch:
                return
            for sha, size in batch:
                if self._expire(sha, reason=Expiry.TTL, used_before=used_before, now=now):
                    sweep.archives_ttl += 1
                    sweep.freed_bytes += size
                else:  # used or live since it was read: not asked again this sweep
                    passed.add(sha)

    def evict_for_budget(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """While over LOWERING_STORAGE_BUDGET_BYTES, the least recently used archives no
        live job references, down to BUDGET_LOW_WATER of the budget."""
        budget = self.settings.storage_budget_bytes
        if budget is None:
            return
        total = self.usage(now=now).total_bytes
        if total <= budget:
            return
        target = int(budget * BUDGET_LOW_WATER)
        used_before = now - dt.timedelta(seconds=self.settings.evict_grace_s)
        passed: set[str] = set()
        while total > target:
            with self.engine.connect() as conn:
                live = self._live(conn)
                batch = self._lru(conn, used_before=used_before, skip=passed | live)
            if not batch:
                break
            for sha, size in batch:
                if not self._expire(sha, reason=Expiry.BUDGET, used_before=used_before,
                                    now=now):
                    passed.add(sha)
                    continue
                sweep.archives_budget += 1
                sweep.freed_bytes += size
                total -= size
                if total <= target:
                    break
        if total > budget:
            sweep.over_budget_bytes = total - budget
            log.warning("stored bytes stay %d over LOWERING_STORAGE_BUDGET_BYTES: what is "
                        "left is live (inputs, uploads, archives active jobs may reuse) or "
                        "used in the last %gs", total - budget, self.settings.evict_grace_s)

    def remove_orphans(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """Stored archives no unexpired job references, once every ORPHANS_EVERY_S."""
        if self._orphans_at is not None and (
                (now - self._orphans_at).total_seconds() < ORPHANS_EVERY_S):
            return
        self._orphans_at = now
        cutoff = (now - dt.timedelta(seconds=self.settings.job_timeout_s
                                     + ORPHANS_EVERY_S)).timestamp()
        old = [(sha, size) for sha, size, modified in self.artifacts.stored()
               if modified < cutoff]
        for start in range(0, len(old), BATCH):
            chunk = dict(old[start:start + BATCH])
            with self.engine.connect() as conn:
                held = {str(sha) for (sha,) in conn.execute(
                    select(lowerings.c.artifact_sha256).distinct()
                    .where(lowerings.c.artifact_sha256.in_(list(chunk)))
                    .where(lowerings.c.artifact_expired_at.is_(None)))}
            for sha, size in chunk.items():
                if sha not in held and self._remove_orphan(sha):
                    sweep.archives_orphaned += 1
                    sweep.freed_bytes += size

    @_as_service_errors
    def _remove_orphan(self, sha256: str) -> bool:
        with self.store.admission_lock():  # as a deletion: no hit is admitted meanwhile
            if self.store.count_artifact_refs(sha256=sha256):
                return False
            self.artifacts.remove(sha256)
        log.info("archive %s removed: no lowering references it", sha256)
        metrics.record_removal("archive_orphan")
        return True

    def remove_inputs(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """Inputs of jobs that ended LOWERING_INPUT_TTL_S ago (never an active job's)."""
        count, size = self._remove_ended(lowerings.c.input_removed_at, self.uploads.remove,
                                         kind="input", ttl_s=self.settings.input_ttl_s,
                                         now=now)
        sweep.inputs += count
        sweep.freed_bytes += size

    def remove_logs(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """Logs of jobs that ended LOWERING_LOG_TTL_S ago."""
        if self.settings.log_ttl_s is not None:
            sweep.logs += self._remove_ended(lowerings.c.log_removed_at, self.logs.remove,
                                             kind="log", ttl_s=self.settings.log_ttl_s,
                                             now=now)[0]

    def _remove_ended(self, stamp: Any, remove: Callable[[str], None], *, kind: str,
                      ttl_s: float, now: dt.datetime) -> tuple[int, int]:
        """``remove`` the file of every finished job that ended ``ttl_s`` ago and has no
        ``stamp`` yet, then stamp it; returns how many, and their inputs' bytes."""
        ended_before = now - dt.timedelta(seconds=ttl_s)
        count = size = 0
        while rows := self._ended(stamp, ended_before):
            for job_id, _ in rows:
                remove(job_id)
            count += self._stamp(stamp, [job_id for job_id, _ in rows], now)
            size += sum(input_bytes for _, input_bytes in rows)
            metrics.record_removal(kind, len(rows))
            if len(rows) < BATCH:
                break
        return count, size

    @_as_service_errors
    def _ended(self, stamp: Any, ended_before: dt.datetime) -> list[tuple[str, int]]:
        query = (select(lowerings.c.id, lowerings.c.input_size_bytes)
                 .where(stamp.is_(None)).where(lowerings.c.status.in_(FINAL))
                 .where(lowerings.c.finished_at < ended_before)
                 .order_by(lowerings.c.finished_at).limit(BATCH))
        with self.engine.connect() as conn:
            return [(str(job_id), int(size)) for job_id, size in conn.execute(query)]

    @_as_service_errors
    @retry_busy
    def _stamp(self, stamp: Any, job_ids: list[str], now: dt.datetime) -> int:
        # Removed first, stamped after: a crash between leaves the job to the next sweep.
        with self.engine.begin() as conn:
            return int(conn.execute(update(lowerings).where(lowerings.c.id.in_(job_ids))
                                    .where(stamp.is_(None)).values({stamp.name: now})).rowcount)

    def remove_uploads(self, sweep: Sweep, *, now: dt.datetime) -> None:
        """Expired resumable uploads; and completes that outlived the gate's time by
        ASSEMBLY_MARGIN_S (their replica died) are reopened for the client to retry."""
        records = resumable.UploadRecords(self.engine)
        sweep.uploads_reopened += records.reopen_stale(began_before=now - dt.timedelta(
            seconds=self.settings.gate_timeout_s + ASSEMBLY_MARGIN_S))
        while (removed := resumable.sweep(records, self.uploads, now=now)) > 0:
            sweep.uploads += removed
            metrics.record_removal("upload", removed)
            if removed < resumable.SWEEP_BATCH:
                return

    @_as_service_errors
    @retry_busy
    def prune_deliveries(self, sweep: Sweep, *, now: dt.datetime) -> None:
        made_before = now - dt.timedelta(seconds=self.settings.webhook_delivery_ttl_s)
        done = [DeliveryStatus.DELIVERED.value, DeliveryStatus.FAILED.value]
        with self.engine.begin() as conn:
            sweep.deliveries += int(conn.execute(
                delete(webhook_deliveries).where(webhook_deliveries.c.status.in_(done))
                .where(webhook_deliveries.c.created_at < made_before)).rowcount)

    def sweep(self, *, now: dt.datetime | None = None) -> Sweep:
        """One pass of every rule; a rule that fails (the database or the bucket does not
        answer) is logged and left to the next pass, the others still run."""
        now = now or utcnow()
        sweep = Sweep(at=now)
        rules: list[tuple[str, Callable[..., None]]] = [
            ("inputs", self.remove_inputs), ("logs", self.remove_logs),
            ("archive ttl", self.expire_unused), ("storage budget", self.evict_for_budget),
            ("orphaned archives", self.remove_orphans), ("uploads", self.remove_uploads),
            ("webhook deliveries", self.prune_deliveries)]
        for name, rule in rules:
            try:
                rule(sweep, now=now)
            except (ServiceError, OSError) as exc:
                message = exc.message if isinstance(exc, ServiceError) else str(exc)
                sweep.errors.append(f"{name}: {message}")
                log.warning("retention: %s failed, the next sweep retries: %s", name, message)
        with contextlib.suppress(ServiceError):
            sweep.stored = self.usage(now=now)
        return sweep

    def describe(self) -> dict[str, Any]:
        """The rules, for /v1/info."""
        s = self.settings
        return {"artifact_ttl_s": s.artifact_ttl_s, "input_ttl_s": s.input_ttl_s,
                "log_ttl_s": s.log_ttl_s, "upload_ttl_s": s.upload_ttl_s,
                "webhook_delivery_ttl_s": s.webhook_delivery_ttl_s,
                "storage_budget_bytes": s.storage_budget_bytes,
                "evict_grace_s": s.evict_grace_s, "interval_s": s.retention_interval_s}


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def mark_used(store: JobStore, job: JobRecord, *, now: dt.datetime | None = None) -> None:
    """Record a download of the job's archive as its archive's latest use (at most once a
    USE_EVERY_S per job: a job read with a recent use costs no write); bookkeeping, so a
    failure is logged, never raised."""
    now = now or utcnow()
    recent = now - dt.timedelta(seconds=USE_EVERY_S)
    if job["last_used_at"] is not None and job["last_used_at"] >= recent:
        return
    stale = case((lowerings.c.last_used_at.is_(None), True),  # another replica's, meanwhile
                 else_=lowerings.c.last_used_at < recent)
    try:
        with store.engine.begin() as conn:
            conn.execute(update(lowerings).where(lowerings.c.id == job["id"]).where(stale)
                         .values(last_used_at=now))
    except Exception as exc:
        log.warning("could not record the use of %s's archive: %s", job["id"], exc)


class Janitor:
    """Runs ``Retention.sweep`` every LOWERING_RETENTION_INTERVAL_S in a daemon thread;
    the first sweep runs at start. ``last`` is the latest sweep (for /v1/info)."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self.last: Sweep | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def measured(self) -> tuple[dict[str, int], int | None] | None:
        """What the latest sweep found stored, for /metrics (StorageCollector)."""
        stored = self.last.stored if self.last is not None else None
        if stored is None:
            return None
        return ({"archives": stored.archive_bytes, "inputs": stored.input_bytes,
                 "uploads": stored.upload_bytes}, self.retention.settings.storage_budget_bytes)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = self.retention.sweep()
            except Exception:  # never let the thread die: the next interval retries
                log.exception("retention sweep failed")
            self._stop.wait(self.retention.settings.retention_interval_s)
