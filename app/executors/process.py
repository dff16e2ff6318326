"""Local executor: a pebble process pool of spawned, long-lived workers.

pebble gives what a lowering pool needs and concurrent.futures does not: a per-task
timeout that kills the worker, cancelling a running task (kills and replaces the
worker), ``ProcessExpired`` when a worker dies, and recycling after ``max_tasks``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import shutil
import signal
import threading
from typing import Any

from pebble import ProcessExpired, ProcessFuture, ProcessPool

from app import worker
from app.constants import ErrorCode, JobStatus
from app.jobs.cache import settle_children
from app.jobs.store import JobStore
from app.settings import Settings

log = logging.getLogger("app.executors")
ACTIVE = [JobStatus.QUEUED, JobStatus.RUNNING]
# A worker killed by the kernel for exceeding RLIMIT_CPU / RLIMIT_FSIZE exits with these.
LIMIT_SIGNALS = {-signal.SIGXCPU, -signal.SIGXFSZ}


class ProcessExecutor:
    """Runs jobs in ``settings.workers`` spawned processes.

    :param settings: service settings (passed whole to each worker's initializer).
    :param store: the job store the API uses; crashes and timeouts are recorded here.
    """

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.toolchain: dict[str, Any] | None = None
        self.probe_error: str | None = None
        self._futures: dict[str, ProcessFuture[Any]] = {}
        self._lock = threading.Lock()
        self._pool: ProcessPool | None = None
        self._closing = False

    def start(self) -> None:
        self._pool = ProcessPool(
            max_workers=self.settings.workers,
            max_tasks=self.settings.max_jobs_per_worker,
            initializer=worker.init_worker,
            initargs=(self.settings.model_dump(mode="json"),),
            context=multiprocessing.get_context("spawn"),
        )
        # The probe runs in a worker: it is how the torch-free API learns the toolchain,
        # and it makes readiness wait until a worker has imported torch.
        probe = self._pool.schedule(worker.probe, timeout=300)
        probe.add_done_callback(self._probe_done)

    def _probe_done(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            self.toolchain = future.result()
        except BaseException as exc:  # reported by /readyz and /v1/info
            self.probe_error = f"{type(exc).__name__}: {exc}"
            log.error("worker probe failed: %s", self.probe_error)

    @property
    def ready(self) -> bool:
        return self.toolchain is not None

    def submit(self, job_id: str) -> None:
        assert self._pool is not None, "executor not started"
        future = self._pool.schedule(
            worker.run_job, args=(job_id,), timeout=self.settings.job_timeout_s
        )
        with self._lock:
            self._futures[job_id] = future
        future.add_done_callback(lambda f: self._job_done(job_id, f))

    def _job_done(self, job_id: str, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.pop(job_id, None)
        if self._closing:
            return  # the job stays "running"; the next start re-runs it (recover_jobs)
        if not future.cancelled() and future.exception() is not None:
            self._record_failure(job_id, future.exception())  # type: ignore[arg-type]
        if future.cancelled() or future.exception() is not None:
            # The worker was killed: nothing else will clear its job's scratch dir.
            shutil.rmtree(self.settings.scratch_dir / job_id, ignore_errors=True)
        if not future.cancelled():
            self.settle(job_id)  # a cancel is settled by the route that recorded it

    def settle(self, job_id: str) -> None:
        """Finish the identical jobs that waited on ``job_id``; submit a new leader."""
        try:
            successor = settle_children(self.store, job_id)
        except Exception:  # never let bookkeeping kill pebble's callback thread
            log.exception("settling the followers of %s failed", job_id)
            return
        if successor is not None:
            self.submit(successor)

    def _record_failure(self, job_id: str, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            error = {
                "code": ErrorCode.TIMEOUT.value,
                "message": f"lowering took longer than {self.settings.job_timeout_s:g} s "
                "(LOWERING_JOB_TIMEOUT_S); the worker was stopped",
                "detail": {"timeout_s": self.settings.job_timeout_s},
            }
        elif isinstance(exc, ProcessExpired) and exc.exitcode in LIMIT_SIGNALS:
            error = {
                "code": ErrorCode.RESOURCE_LIMIT.value,
                "message": "the worker hit a resource limit (CPU time or file size: "
                "LOWERING_JOB_MAX_CPU_S, LOWERING_JOB_MAX_FILE_BYTES) and was replaced",
                "detail": {"exitcode": exc.exitcode, "pid": exc.pid},
            }
        elif isinstance(exc, ProcessExpired):
            error = {
                "code": ErrorCode.WORKER_CRASHED.value,
                "message": f"the worker process died (exit code {exc.exitcode}) while "
                "lowering; it has been replaced",
                "detail": {"exitcode": exc.exitcode, "pid": exc.pid},
            }
        else:
            log.error("job %s raised in the worker: %r", job_id, exc)
            error = {
                "code": ErrorCode.INTERNAL.value,
                "message": "the worker failed unexpectedly; see the job log",
                "detail": {"exception_type": type(exc).__name__},
            }
        self.store.transition(job_id, from_=ACTIVE, to=JobStatus.FAILED, error=error)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            future = self._futures.get(job_id)
        # pebble stops (and replaces) the worker if the task is already running.
        return future.cancel() if future is not None else False

    def info(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._futures)
        return {
            "kind": "process",
            "workers": self.settings.workers,
            "max_jobs_per_worker": self.settings.max_jobs_per_worker,
            "jobs_in_pool": pending,
            "ready": self.ready,
        }

    def close(self) -> None:
        self._closing = True
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
