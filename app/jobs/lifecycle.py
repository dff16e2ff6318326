"""The job lifecycle: the one owner of every status change.

    queued ──claim──► running ──succeed──► succeeded
      │  ▲              │  └──────fail───► failed
      │  └──requeue─────┘          cancel ► cancelled  (from queued or running)
      └─ a follower (coalesced job) goes straight to its leader's final status

``TRANSITIONS`` is the table; every write goes through ``_move``, which refuses a move the
table does not allow, and is a guarded UPDATE, so two actors never both move a job.
Every terminal change settles the followers (coalesced identical jobs) and notifies the
listeners: the seam metrics and webhooks use, and the way an executor hears that a job it
runs was cancelled. Executors only claim a job, report its progress (which answers
whether to go on) and its end; why a job failed is decided in ``failures.py``.

Admission (cache hit, follower, or new work) and artifact deletion take the same lock, so
a cache hit can never be admitted against an archive a concurrent delete is removing.
The lock is per process: one API process owns admission on a host.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app import metrics
from app.constants import JobStatus, Phase
from app.errors import ApiErrorCode, Conflict, JobError, NotFound
from app.jobs import failures
from app.jobs.cache_key import build_target
from app.jobs.models import DEFAULT_TENANT
from app.jobs.store import JobFields, JobRecord, JobStore, utcnow
from app.storage.base import ArtifactRef, ArtifactStore, LogStore, UploadStore

log = logging.getLogger("app.jobs")

Q, R = JobStatus.QUEUED, JobStatus.RUNNING
S, F, C = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    # queued -> succeeded/failed: a follower settling with its leader, or recovery.
    Q: frozenset({R, C, S, F}),
    # running -> queued: put back by a graceful stop or a restart, to run again.
    R: frozenset({S, F, C, Q}),
    S: frozenset(), F: frozenset(), C: frozenset(),
}
ACTIVE = (Q, R)
MAX_ATTEMPTS = 2
DEFAULT_LEASE_S = 60.0
"""How long a claim holds without renewal; run_job renews it every 2 s."""
LOG_TAIL_BYTES = 4000
# What a finished job hands on to the jobs that waited on it.
INHERITED = ("artifact_sha256", "artifact_size_bytes", "verification", "toolchain", "profile",
             "error")


class JobListener(Protocol):
    """Told about every job that reaches a final status (after the write)."""

    def job_finished(self, job: JobRecord) -> None: ...


def _keys_if_built_elsewhere(job: JobRecord | None,
                             built_with: dict[str, Any] | None) -> dict[str, Any]:
    """A job keyed for one toolchain (its host class's, at admission) but built with
    another (a fleet mid-upgrade: two torch versions behind one ISA queue) keeps its
    archive but loses its cache and code keys: no later submit keyed for the first
    toolchain may be answered with it, nor take its compiled code."""
    if job is None or not job["toolchain"] or not built_with:
        return {}
    if build_target(job, job["toolchain"]) == build_target(job, built_with):
        return {}
    log.warning("job %s was keyed for %s but built with %s: it is not a cache entry",
                job["id"], build_target(job, job["toolchain"]), build_target(job, built_with))
    return {"cache_key": None, "code_key": None}


def unknown_job(job_id: str) -> NotFound:
    """The 404 for an id no job has (quoted and cut short: ids come from URLs)."""
    return NotFound(f"no lowering with id {job_id[:80]!r}")


class QueueFull(Exception):
    """Admitting one more job that needs a worker would exceed the queue bound."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} lowerings are waiting")
        self.waiting = waiting


@dataclass(frozen=True)
class Quota:
    """What one tenant may hold (None: no limit); checked at admission, under the
    admission lock, so it holds across replicas and before anything is dispatched."""

    max_active_jobs: int | None = None
    max_storage_bytes: int | None = None


class QuotaExceeded(Exception):
    """The tenant is over its quota; ``message`` says which, ``retry_after_s`` when to
    try again."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


ACTIVE_QUOTA_RETRY_S = 30
STORAGE_QUOTA_RETRY_S = 300


def check_storage(store: JobStore, quota: Quota, *, tenant: str, adding_bytes: int) -> None:
    """QuotaExceeded when storing ``adding_bytes`` more would pass the tenant's cap."""
    if quota.max_storage_bytes is None:
        return
    used = store.stored_bytes(tenant=tenant)
    if used + adding_bytes > quota.max_storage_bytes:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {used} bytes; {adding_bytes} more would pass its "
            f"quota of {quota.max_storage_bytes} (LOWERING_TENANT_MAX_STORAGE_BYTES): delete "
            "finished lowerings (DELETE /v1/lowerings/{id}) or let uploads expire",
            retry_after_s=STORAGE_QUOTA_RETRY_S)


def check_active(store: JobStore, quota: Quota, *, tenant: str) -> None:
    """QuotaExceeded when the tenant already has its cap of queued and running jobs."""
    if quota.max_active_jobs is None:
        return
    active = store.count_active(tenant=tenant)
    if active >= quota.max_active_jobs:
        raise QuotaExceeded(
            f"tenant {tenant!r} has {active} queued or running lowerings, its quota "
            f"(LOWERING_TENANT_MAX_ACTIVE_JOBS={quota.max_active_jobs}); retry when some "
            "have finished, or cancel some", retry_after_s=ACTIVE_QUOTA_RETRY_S)


class ArtifactLost(Exception):
    """The archive a job was about to succeed with was removed before the commit."""


@dataclass(frozen=True)
class Admission:
    job: JobRecord
    must_run: bool
    """True when the job was handed to the executor (not a cache hit, not a follower)."""


class JobLifecycle:
    """Admits, moves, settles and deletes jobs.

    :param store: the job table.
    :param uploads: job inputs (removed with the job).
    :param logs: job logs (tails go into failures; removed with the job).
    :param artifacts: archives (removed when no job references them any more).
    :param listeners: told about every terminal change.
    :param dispatch: hands a job id to the executor; set once the executor exists.
    :param lease_s: how long a worker's claim on a job holds unless renewed.
    :param quota: what each tenant may hold unless its row in ``tenants`` says otherwise,
        checked at admission.
    :param share_cache: a cache hit may take another tenant's archive (its bytes only);
        coalescing and compiled-code reuse stay within a tenant regardless.
    """

    def __init__(self, store: JobStore, *, uploads: UploadStore, logs: LogStore,
                 artifacts: ArtifactStore, listeners: Sequence[JobListener] = (),
                 dispatch: Callable[[str], None] | None = None,
                 lease_s: float = DEFAULT_LEASE_S, quota: Quota | None = None,
                 share_cache: bool = False) -> None:
        self.lease_s = lease_s
        self.quota = quota or Quota()
        self.share_cache = share_cache
        self.store = store
        self.uploads = uploads
        self.logs = logs
        self.artifacts = artifacts
        self.listeners = list(listeners)
        self.dispatch = dispatch

    # -- moves ------------------------------------------------------------------------

    def quota_for(self, tenant: str) -> Quota:
        """The tenant's quota: its overrides (`lowering-service tenants set`), else the
        global defaults."""
        active, storage = self.store.tenant_limits(tenant=tenant)
        return Quota(max_active_jobs=self.quota.max_active_jobs if active is None else active,
                     max_storage_bytes=(self.quota.max_storage_bytes if storage is None
                                        else storage))

    def _move(self, job_id: str, *, from_: Sequence[JobStatus], to: JobStatus,
              **fields: Any) -> bool:
        illegal = [s for s in from_ if to not in TRANSITIONS[s]]
        if illegal:
            raise ValueError(f"no transition {illegal} -> {to} in TRANSITIONS")
        return self.store.transition(job_id, from_=from_, to=to, **fields)

    def admit(self, fields: JobFields, *, use_cache: bool,
              max_waiting: int | None = None) -> Admission:
        """Record a submission: a cache hit (final at once), a follower of an identical
        active job, or new work handed to the executor.

        The queue bound and the tenant's quota (``fields["tenant"]``) are checked here,
        where the counts and the insert cannot interleave with another admission; hits and
        followers never count against the queue, but do against the tenant's storage,
        and followers against its active jobs. Raises QueueFull or QuotaExceeded.

        A hit or a follower is found among the tenant's own jobs; with ``share_cache`` a
        hit may take another tenant's archive, but nothing else of that job (not its id,
        timings or profile).
        """
        key = fields.get("cache_key")
        tenant = fields.get("tenant", DEFAULT_TENANT)
        with self.store.admission_lock():
            quota = self.quota_for(tenant)
            check_storage(self.store, quota, tenant=tenant,
                          adding_bytes=int(fields.get("input_size_bytes") or 0))
            if use_cache and key:
                hit = self.store.find_by_key(cache_key=key, statuses=[S],
                                             tenant=None if self.share_cache else tenant)
                sha = hit["artifact_sha256"] if hit else None
                if hit is not None and sha and self.artifacts.is_intact(sha):
                    own = hit["tenant"] == tenant
                    now = utcnow()
                    job = self.store.create(**{
                        **fields, "status": S.value, "cache_hit": True, "created_at": now,
                        "started_at": now, "finished_at": now,
                        "artifact_sha256": sha, "artifact_size_bytes": hit["artifact_size_bytes"],
                        "verification": hit["verification"], "toolchain": hit["toolchain"],
                        "profile": hit["profile"] if own else None})
                    self._notify(job)
                    metrics.record_cache_hit("result")
                    return Admission(job, must_run=False)
            check_active(self.store, quota, tenant=tenant)  # a follower is active too
            if use_cache and key:
                leader = self.store.find_by_key(cache_key=key, statuses=ACTIVE, tenant=tenant)
                if leader is not None:
                    follower = self.store.create(**fields, parent_id=leader["id"])
                    metrics.record_cache_hit("coalesced")
                    return Admission(follower, must_run=False)
            if max_waiting is not None:
                waiting = self.store.count_waiting()
                if waiting >= max_waiting:
                    raise QueueFull(waiting)
            job = self.store.create(**fields)
        self._dispatch(job["id"])
        return Admission(job, must_run=True)

    def claim(self, job_id: str, *, worker_pid: int | None,
              worker: str | None = None) -> JobRecord | None:
        """queued -> running for ``worker`` (a worker host's node name), under a lease it
        renews through ``progress``. A job left running whose lease expired (its host
        died or hung) is taken over, its attempt counted: at MAX_ATTEMPTS it fails
        ``worker_crashed`` instead. None when there is nothing to run: the job is final,
        deleted, a follower, or running under a live lease (a duplicate delivery)."""
        job = self.store.get(job_id)
        if job is None or job["parent_id"] is not None:
            return None
        # Taking an expired lease back re-queues the job without touching its attempts.
        if job["status"] == R.value and not self._requeue_expired(job, dispatch=False):
            return None
        if not self._move(job_id, from_=[Q], to=R, phase=Phase.LOAD.value,
                          worker_pid=worker_pid, worker=worker,
                          attempts=job["attempts"] + 1,
                          lease_expires_at=self._lease_end()):
            return None
        return self.store.get(job_id)

    def reap(self, *, dispatch: bool = True) -> int:
        """Running jobs whose lease expired go back to the queue and are dispatched again
        (or fail ``worker_crashed`` at MAX_ATTEMPTS); returns how many were re-queued.
        Safe to run from every process: each move is guarded by the expired lease and the
        attempt it belonged to."""
        return sum(self._requeue_expired(job, dispatch=dispatch)
                   for job in self.store.expired_leases(now=utcnow()))

    def _requeue_expired(self, job: JobRecord, *, dispatch: bool) -> bool:
        now = utcnow()
        expires = job["lease_expires_at"]
        if expires is None or expires >= now:
            return False
        guard = {"attempt": job["attempts"], "lease_expired_at": now}
        if job["attempts"] < MAX_ATTEMPTS:
            log.warning("job %s: the lease of %s expired; running it again", job["id"],
                        job["worker"])
            moved = self._move(job["id"], from_=[R], to=Q, started_at=None, phase=None,
                               worker_pid=None, worker=None, **guard)
            if moved and dispatch:
                self._dispatch(job["id"])
            return moved
        error = failures.lease_lost(attempts=job["attempts"], worker=job["worker"])
        if self._move(job["id"], from_=[R], to=F, error=error.as_dict(), **guard):
            self._finished(job["id"])
        return False

    def _lease_end(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.lease_s)

    def code_donors(self, job: JobRecord) -> list[JobRecord]:
        """Succeeded jobs whose compiled files ``job`` may take instead of compiling (the
        same code key, the same tenant: a donor's id is shown as code_reused_from), newest
        first; none when its code depends on weight values."""
        key = job["code_key"]
        if not key:
            return []
        return self.store.find_code_donors(code_key=key, exclude_id=job["id"],
                                           tenant=job["tenant"])

    def progress(self, job_id: str, *, phase: Phase | None = None,
                 attempt: int | None = None) -> bool:
        """Renew the lease of a running job (and record the phase it reached); False
        means stop: it is no longer running in ``attempt`` (cancelled, deleted, failed by a
        sweep, or taken over by another worker after its lease expired)."""
        fields: JobFields = {"lease_expires_at": self._lease_end()}
        if phase is not None:
            fields["phase"] = phase.value
        return self.store.update_running(job_id, attempt=attempt, **fields)

    def succeed(self, job_id: str, *, artifact: ArtifactRef, timings: dict[str, float],
                verification: dict[str, Any] | None, toolchain: dict[str, Any] | None,
                resources: dict[str, Any] | None,
                profile: dict[str, Any] | None = None,
                code_reused_from: str | None = None, attempt: int | None = None) -> bool:
        """running -> succeeded with its stored archive. Raises ArtifactLost when a
        concurrent delete removed that archive first (the worker stores it again)."""
        with self.store.admission_lock():
            if not self.artifacts.exists(artifact.sha256):
                raise ArtifactLost(artifact.sha256)
            job = self.store.get(job_id)
            moved = job is not None and self._move(
                job_id, from_=[R], to=S, artifact_sha256=artifact.sha256,
                artifact_size_bytes=artifact.size_bytes,
                timings={**(job["timings"] or {}), **timings},
                verification=verification, toolchain=toolchain, profile=profile,
                resources=resources, code_reused_from=code_reused_from, attempt=attempt,
                **_keys_if_built_elsewhere(job, toolchain))
        if moved:
            self._finished(job_id)
        return moved

    def fail(self, job_id: str, error: JobError, *,
             resources: dict[str, Any] | None = None, attempt: int | None = None) -> bool:
        """running -> failed; the log tail goes with errors it helps explain."""
        record = error.as_dict()
        if error.code in failures.LOGGED_CODES:
            record["detail"] = {**record["detail"],
                                "log_tail": self.logs.tail(job_id, LOG_TAIL_BYTES)}
        moved = self._move(job_id, from_=[R], to=F, error=record, resources=resources,
                           attempt=attempt)
        if moved:
            self._finished(job_id)
        return moved

    def cancel(self, job_id: str, *, tenant: str | None = None) -> JobRecord:
        """queued|running -> cancelled. A running job's worker hears it from progress()
        (and its executor, a listener, at once); a follower takes over the work. With
        ``tenant``, another tenant's job is unknown."""
        job = self.store.get(job_id, tenant=tenant)
        if job is None:
            raise unknown_job(job_id)
        if not self._move(job_id, from_=ACTIVE, to=C):
            current = self.store.get(job_id)
            status = current["status"] if current else "deleted"
            raise Conflict(f"lowering {job_id} is {status} and can no longer be cancelled",
                           code=ApiErrorCode.NOT_CANCELLABLE)
        self._finished(job_id)
        final = self.store.get(job_id)
        assert final is not None
        return final

    def requeue(self, job_id: str, *, attempt: int | None = None) -> bool:
        """running -> queued: a graceful stop interrupted it; it runs again after the
        restart, and the interruption is not counted against it. ``attempt``: only if the
        job is still in that run (not taken over by another host meanwhile)."""
        job = self.store.get(job_id)
        if job is None:
            return False
        return self._move(job_id, from_=[R], to=Q, attempts=max(0, job["attempts"] - 1),
                          started_at=None, phase=None, worker_pid=None, worker=None,
                          attempt=job["attempts"] if attempt is None else attempt)

    def lost(self, job_id: str, message: str) -> bool:
        """A job marked running that nothing runs any more (its supervisor died)."""
        return self.fail(job_id, failures.interrupted(message))

    def recover(self, *, requeue_running: bool = True) -> None:
        """At start: queued work is dispatched and followers settle with their leader.
        Jobs left running: with ``requeue_running`` (a local pool: nothing runs yet, they
        were this process's predecessor's) each runs again once more, or fails as
        interrupted; without it (worker hosts elsewhere hold leases on them) only those
        whose lease expired are taken back (``reap``)."""
        if not requeue_running:
            self.reap(dispatch=False)  # dispatched below with the rest of the queue
        for job_id in self.store.ids_with_status(statuses=[R]) if requeue_running else []:
            job = self.store.get(job_id)
            if job is not None and job["attempts"] < MAX_ATTEMPTS:
                self._move(job_id, from_=[R], to=Q, started_at=None, worker_pid=None,
                           worker=None, phase=None)
            else:
                self.lost(job_id, "the service stopped twice while this job ran; resubmit it")
        for job_id in self.store.ids_with_status(statuses=[Q]):
            job = self.store.get(job_id)
            if job is None:
                continue
            if job["parent_id"] is None:
                self._dispatch(job_id)
            else:  # attached to another job: settles with it (now, if that one is done)
                self._settle_followers(job["parent_id"])

    # -- deletion ---------------------------------------------------------------------

    def delete(self, job_id: str, *, tenant: str | None = None) -> None:
        """Remove a final job's record, input and log, and its archive once no other job
        (of any tenant) references it (under the admission lock: no cache hit can take it
        meanwhile). With ``tenant``, another tenant's job is unknown."""
        job = self.store.get(job_id, tenant=tenant)
        if job is None:
            raise unknown_job(job_id)
        if not JobStatus(job["status"]).is_final:
            raise Conflict(f"lowering {job_id} is {job['status']}; cancel it before deleting",
                           code=ApiErrorCode.JOB_ACTIVE)
        with self.store.admission_lock():
            self.store.delete(job_id)
            self.uploads.remove(job_id)
            self.logs.remove(job_id)
            sha = job["artifact_sha256"]
            if sha and self.store.count_artifact_refs(sha256=sha) == 0:
                self.artifacts.remove(sha)

    # -- settlement and notification ----------------------------------------------------

    def _finished(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        self._notify(job)
        self._settle_followers(job_id)

    def _settle_followers(self, leader_id: str) -> None:
        """Finish the jobs attached to a finished leader. A cancelled leader hands the
        work to its oldest follower; the others attach to that one."""
        leader = self.store.get(leader_id)
        if leader is None or not JobStatus(leader["status"]).is_final:
            return
        followers = [f for f in self.store.children_of(leader_id) if f["status"] in ACTIVE]
        if not followers:
            return
        if leader["status"] == C.value:
            heir, rest = followers[0], followers[1:]
            self.store.reparent([heir["id"]], parent_id=None)
            self.store.reparent([f["id"] for f in rest], parent_id=heir["id"])
            self._dispatch(heir["id"])
            return
        status = JobStatus(leader["status"])
        inherited: dict[str, Any] = {name: leader[name] for name in INHERITED}  # type: ignore[literal-required]
        if status is F and leader["error"]:
            error = leader["error"]
            inherited["error"] = {**error, "detail": {**(error.get("detail") or {}),
                                                      "coalesced_with": leader_id}}
        for follower in followers:
            if self._move(follower["id"], from_=ACTIVE, to=status, cache_hit=status is S,
                          started_at=leader["started_at"], **inherited):
                settled = self.store.get(follower["id"])
                if settled is not None:
                    self._notify(settled)

    def _notify(self, job: JobRecord) -> None:
        metrics.job_finished(job)  # counted here, once: by the process that moved the job
        for listener in self.listeners:
            try:
                listener.job_finished(job)
            except Exception:  # a listener must never undo or block a status change
                log.exception("listener %r failed on job %s", listener, job["id"])

    def _dispatch(self, job_id: str) -> None:
        if self.dispatch is None:
            raise RuntimeError("JobLifecycle.dispatch is not set: no executor to run jobs")
        self.dispatch(job_id)

