"""Prometheus metrics: ``GET /metrics`` on the API, and on each worker host that has
LOWERING_METRICS_PORT set.

Two kinds of numbers, kept apart so that no event is counted twice:

* **Events** (counters and the phase histogram) are counted once, by the process where
  the event happens. A job's final status is counted by the process whose guarded UPDATE
  moved it there (``JobLifecycle._notify``): the API for cache hits, cancels, followers
  settled there and the local executor's jobs; a worker host's Celery process for the
  fleet's jobs. Prometheus scrapes every API replica and every worker host and sums
  (``sum without (instance)``): each event sits in exactly one of those.
* **State** (queue depth, the oldest queued job's age, running jobs) is read from the job
  database, the one truth, when /metrics is scraped. Every API replica reports the same
  values: aggregate them with ``max``, never ``sum``. Worker hosts do not report it.

Processes. The API is one process: its children (the gate's checks, the sandboxes) get a
scrubbed environment and record nothing, so it counts in memory. If PROMETHEUS_MULTIPROC_DIR
is set (an API run under a multi-process server), its /metrics sums that directory instead.
A worker host records in its Celery prefork processes, which are replaced every
LOWERING_WORKER_MAX_JOBS_PER_PROCESS jobs: ``serve_worker_host`` gives the host a fresh
directory (prometheus_client's multiprocess mode) and serves the sum of its files from
the main process. Each prefork process writes the files of its pool slot, not of its pid:
a replacement continues its predecessor's counts, no count is lost with a recycled
process, and the directory holds one set of files per slot however long the host runs.

Labels take bounded values only: statuses, phases, error codes and words from the code,
never job ids or model names.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Select, func, select

from app.constants import FINAL_STATUSES, TIMING_KEYS, ErrorCode, JobStatus
from app.errors import ApiErrorCode
from app.jobs.models import lowerings

if TYPE_CHECKING:
    from app.jobs.store import JobRecord, JobStore

log = logging.getLogger("app.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What /metrics answers: the text format ``generate_latest`` writes."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                 1200.0, 1800.0, 3600.0)
"""From a gate check (well under a second) to a long compile (LOWERING_JOB_TIMEOUT_S: 30 min
by default)."""
CACHE_KINDS = ("result", "coalesced")
"""result: a submit answered from a stored archive; coalesced: a submit attached to an
identical job still queued or running (it ends with that job)."""
GATE_CODES = frozenset({
    ApiErrorCode.NOT_A_PT2_ARCHIVE, ApiErrorCode.ARCHIVE_TOO_LARGE,
    ApiErrorCode.UNSAFE_MEMBER_NAME, ApiErrorCode.UNSUPPORTED_LAYOUT,
    ApiErrorCode.MISSING_EXAMPLE_INPUTS, ApiErrorCode.UNSAFE_PICKLE,
    ApiErrorCode.UNSAFE_GRAPH, ApiErrorCode.UPLOAD_TOO_COMPLEX,
})
"""The codes the upload gate refuses an upload with (a submit's file or a resumable
upload's complete)."""
RECYCLE_REASONS = ("after_job", "died_idle", "warmup_failed", "max_jobs_per_process")
"""Why a worker's process was replaced: after_job, the sandbox that ran a job (each job
gets a fresh one); died_idle, a warm sandbox found dead before it got a job; warmup_failed,
a sandbox that did not warm up; max_jobs_per_process, a worker host's Celery process after
LOWERING_WORKER_MAX_JOBS_PER_PROCESS jobs."""
UPLOAD_VIAS = ("submit", "resumable")
"""submit: the program file of POST /v1/lowerings; resumable: a completed resumable upload."""
REMOVAL_KINDS = ("archive_ttl", "archive_budget", "archive_orphan", "input", "log", "upload")
_WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")


class _Metrics:
    """The service's metrics, created once per process, on first use: after
    ``use_directory`` has chosen where their values live."""

    def __init__(self) -> None:
        self.jobs = Counter(
            "lowering_jobs_total", "Jobs that reached a final status (cache hits and "
            "coalesced jobs included), by that status", ["status"])
        self.phase_seconds = Histogram(
            "lowering_phase_seconds", "Seconds a phase took (the job's timings: validate is "
            "the upload gate), for each job that succeeded or failed", ["phase"],
            buckets=PHASE_BUCKETS)
        self.cache_hits = Counter(
            "lowering_cache_hits_total", "Submits that needed no new lowering: answered from "
            "a stored archive (result) or attached to an identical active job (coalesced)",
            ["kind"])
        self.gate_refusals = Counter(
            "lowering_gate_refusals_total", "Uploads the upload gate refused, by error code",
            ["code"])
        self.worker_crashes = Counter(
            "lowering_worker_crashes_total", "Jobs that failed worker_crashed: the sandbox "
            "died while lowering, or the job's worker host stopped answering on every attempt")
        self.worker_recycles = Counter(
            "lowering_worker_recycles_total", "Worker processes replaced, by reason",
            ["reason"])
        self.webhook_deliveries = Counter(
            "lowering_webhook_deliveries_total", "Webhook delivery attempts, by outcome",
            ["outcome"])
        self.uploaded_bytes = Counter(
            "lowering_uploaded_bytes_total", "Program bytes received, by way of upload",
            ["via"])
        self.removals = Counter(
            "lowering_retention_removals_total", "What retention removed, by kind: "
            "archive_ttl, archive_budget (each an archive, whatever jobs shared it), "
            "archive_orphan (an archive no job referenced), input, log, upload (an expired "
            "resumable upload)", ["kind"])
        self.stored_bytes = Counter(
            "lowering_stored_bytes_total", "Archive bytes stored by jobs that ran and "
            "succeeded (an identical archive is kept once)")
        # Every bounded series exists from the start (at 0), so rates and alerts see it.
        for status in sorted(FINAL_STATUSES):
            self.jobs.labels(status=status.value)
        for phase in TIMING_KEYS:
            self.phase_seconds.labels(phase=phase)
        for kind in CACHE_KINDS:
            self.cache_hits.labels(kind=kind)
        for code in sorted(GATE_CODES):
            self.gate_refusals.labels(code=code.value)
        for reason in RECYCLE_REASONS:
            self.worker_recycles.labels(reason=reason)
        for via in UPLOAD_VIAS:
            self.uploaded_bytes.labels(via=via)
        for kind in REMOVAL_KINDS:
            self.removals.labels(kind=kind)


_METRICS: _Metrics | None = None
_LOCK = threading.Lock()


def _metrics() -> _Metrics:
    global _METRICS
    if _METRICS is None:
        with _LOCK:
            if _METRICS is None:
                if os.environ.get(MULTIPROC_ENV) and not _multiprocess_values():
                    # The directory was named after prometheus_client was imported.
                    prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
                # No *_created series: a multiprocess directory has none, so neither does
                # the API's in-memory exposition (the same series either way).
                disable_created_metrics()
                _METRICS = _Metrics()
    return _METRICS


def _multiprocess_values() -> bool:
    return bool(getattr(prometheus_values.ValueClass, "_multiprocess", False))


def _safely(record: Callable[[_Metrics], None]) -> None:
    """A metric never fails what it counts."""
    try:
        record(_metrics())
    except Exception:
        log.exception("could not record a metric")


# -- recording: each called where its event happens ------------------------------------


def job_finished(job: JobRecord) -> None:
    """A job reached a final status (called by the lifecycle once per terminal move, in
    the process that made it). A job that ran (not a cache hit, not a follower) also
    counts the archive it stored, or its crash."""

    def record(m: _Metrics) -> None:
        status = job["status"]
        if status not in {s.value for s in FINAL_STATUSES}:
            return
        m.jobs.labels(status=status).inc()
        if status == JobStatus.CANCELLED.value:
            return
        for phase, seconds in (job["timings"] or {}).items():
            if (phase in TIMING_KEYS and isinstance(seconds, int | float)
                    and not isinstance(seconds, bool) and math.isfinite(seconds)
                    and seconds >= 0):
                m.phase_seconds.labels(phase=phase).observe(seconds)
        if job["parent_id"] is not None or job["cache_hit"]:
            return
        if status == JobStatus.SUCCEEDED.value and job["artifact_size_bytes"]:
            m.stored_bytes.inc(job["artifact_size_bytes"])
        if (status == JobStatus.FAILED.value
                and (job["error"] or {}).get("code") == ErrorCode.WORKER_CRASHED.value):
            m.worker_crashes.inc()

    _safely(record)


def record_cache_hit(kind: str) -> None:
    """A submit admitted without new work: ``result`` or ``coalesced`` (CACHE_KINDS)."""
    if kind in CACHE_KINDS:
        _safely(lambda m: m.cache_hits.labels(kind=kind).inc())


def record_refusal(code: ApiErrorCode | str) -> None:
    """An error answered; counted when it is one of the upload gate's (GATE_CODES)."""
    if code in GATE_CODES:
        _safely(lambda m: m.gate_refusals.labels(code=str(code)).inc())


def record_upload_bytes(size_bytes: int, *, via: str) -> None:
    """Program bytes received: ``submit`` (a submit's file) or ``resumable`` (a resumable
    upload, counted at its complete)."""
    if via in UPLOAD_VIAS and size_bytes > 0:
        _safely(lambda m: m.uploaded_bytes.labels(via=via).inc(size_bytes))


def record_removal(kind: str, count: int = 1) -> None:
    """Retention removed ``count`` things of one of REMOVAL_KINDS."""
    if kind in REMOVAL_KINDS and count > 0:
        _safely(lambda m: m.removals.labels(kind=kind).inc(count))


def record_worker_recycle(reason: str) -> None:
    """A worker's process was replaced, for one of RECYCLE_REASONS."""
    if reason in RECYCLE_REASONS:
        _safely(lambda m: m.worker_recycles.labels(reason=reason).inc())


def record_webhook_delivery(outcome: str) -> None:
    """One webhook delivery attempt ended with ``outcome``: a short fixed word from the
    code (delivered, failed, disabled, refused), never a URL or an id; anything else is
    counted as ``other``."""
    word = outcome if isinstance(outcome, str) and _WORD.fullmatch(outcome) else "other"
    _safely(lambda m: m.webhook_deliveries.labels(outcome=word).inc())


# -- the job database's state, read at scrape time ---------------------------------------


class JobStateCollector:
    """Gauges read from the job table when scraped: one grouped query over the active
    rows (the status index), whatever the number of finished jobs."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lowering_database_up",
                               "1 when the job database answered this scrape's queries")
        try:
            rows = self._read()
        except Exception as exc:
            log.warning("metrics: the job database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth, running, oldest = 0, 0, None
        for status, leads, count, created in rows:
            if status == JobStatus.RUNNING.value:
                running += count
            elif leads:  # queued and needing a worker (a coalesced job rides along)
                depth += count
                oldest = created
        yield GaugeMetricFamily(
            "lowering_queue_depth", "Queued jobs that need a worker (coalesced jobs "
            "excluded): what LOWERING_MAX_QUEUED bounds", value=depth)
        yield GaugeMetricFamily("lowering_jobs_running", "Jobs running now", value=running)
        age = 0.0
        if oldest is not None:
            if oldest.tzinfo is None:  # SQLite hands back naive UTC
                oldest = oldest.replace(tzinfo=dt.UTC)
            age = max(0.0, (dt.datetime.now(dt.UTC) - oldest).total_seconds())
        yield GaugeMetricFamily(
            "lowering_queue_oldest_age_seconds", "Seconds since the oldest job that needs a "
            "worker was submitted (0 when none waits)", value=age)

    @staticmethod
    def query() -> Select[Any]:
        """(status, leads, count, oldest created_at) of the queued and running jobs;
        ``leads``: not attached to another job. Filtered by status alone, so the
        database takes the (status, seq) index and reads the active rows only."""
        leads = lowerings.c.parent_id.is_(None).label("leads")
        return (select(lowerings.c.status, leads, func.count(),
                       func.min(lowerings.c.created_at))
                .where(lowerings.c.status.in_([JobStatus.QUEUED.value,
                                               JobStatus.RUNNING.value]))
                .group_by(lowerings.c.status, leads))

    def _read(self) -> list[tuple[str, bool, int, dt.datetime | None]]:
        with self.store.engine.connect() as conn:
            return [(str(s), bool(lead), int(n), created)
                    for s, lead, n, created in conn.execute(self.query())]


# -- exposition -------------------------------------------------------------------------


class _Joined:
    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def directory_collector(directory: Path | str) -> Collector:
    """The sum of every process's files in a multiprocess directory."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


class StorageCollector:
    """What is stored, as this replica's latest retention sweep measured it (from the job
    database, so the same on every replica: aggregate with max).

    :param measured: returns (bytes by kind: archives, inputs, uploads; the budget), or
        None before the first sweep measured anything.
    """

    def __init__(self, measured: Callable[[], tuple[dict[str, int], int | None] | None]) -> None:
        self.measured = measured

    def collect(self) -> Iterator[Metric]:
        reading = self.measured()
        if reading is None:
            return
        stored, budget = reading
        gauge = GaugeMetricFamily("lowering_storage_bytes", "Bytes stored, by kind: archives "
                                  "(each once), inputs of jobs, resumable uploads; measured "
                                  "at the latest retention sweep", labels=["kind"])
        for kind, size in stored.items():
            gauge.add_metric([kind], size)
        yield gauge
        if budget is not None:
            yield GaugeMetricFamily("lowering_storage_budget_bytes",
                                    "LOWERING_STORAGE_BUDGET_BYTES", value=budget)


def exposition(store: JobStore | None = None, *extra: Collector) -> bytes:
    """What /metrics answers: this process's counts (or, with PROMETHEUS_MULTIPROC_DIR,
    those of every process writing there), the job database's state, and ``extra``."""
    _metrics()  # the zero series exist before the first event
    directory = os.environ.get(MULTIPROC_ENV)
    events: Collector = directory_collector(directory) if directory else REGISTRY
    collectors = [events] + ([JobStateCollector(store)] if store is not None else [])
    return generate_latest(_Joined([*collectors, *extra]))


# -- worker hosts: one directory per process set ------------------------------------------


def use_directory(directory: Path, *,
                  process_id: Callable[[], object] = os.getpid) -> None:
    """Multiprocess mode: this process, and those it forks from now on, write their values
    to files in ``directory``, named by ``process_id()`` (which live processes must never
    share; a process that takes a dead one's id continues its counts). Must come before
    this process records anything."""
    with _LOCK:
        if _METRICS is not None:
            raise RuntimeError("metrics were recorded in this process before use_directory")
        os.environ[MULTIPROC_ENV] = str(directory)
        prometheus_values.ValueClass = prometheus_values.MultiProcessValue(process_id)


def process_set_directory(name: str) -> Path:
    """A fresh, empty directory for this process and its children, removed when this
    process exits; those of dead process sets with this name are removed first."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "host"
    base = Path(tempfile.gettempdir()) / f"lowering-metrics-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    for stale in base.glob(f"{name}-*"):
        match = re.fullmatch(re.escape(name) + r"-([0-9]+)", stale.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    directory = base / f"{name}-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child that runs atexit handlers
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)
    return directory


def serve_worker_host(name: str, *, host: str, port: int,
                      process_id: Callable[[], object]) -> Path:
    """A worker host's /metrics on ``host:port``: the sum of its processes' files in a
    fresh directory (see ``process_set_directory``, ``use_directory``). Call it in the
    host's main process before anything is recorded or forked. Raises OSError when the
    port cannot be bound."""
    directory = process_set_directory(name)
    use_directory(directory, process_id=process_id)
    _metrics()  # the zero series, in this process's file
    start_http_server(port, addr=host, registry=directory_collector(directory))
    log.info("metrics of this host on http://%s:%d/metrics (%s)", host, port, directory)
    return directory


def _pid_alive(pid: int) -> bool:
    return bool(psutil.pid_exists(pid))
