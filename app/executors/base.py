"""What the API needs from an executor; ``local.LocalExecutor`` is the local one.

An executor runs jobs and nothing else: it takes ids from ``JobLifecycle.dispatch``,
runs ``worker.run_job`` for each, and reports deaths and overruns back to the
lifecycle, which owns every status change.
"""

from __future__ import annotations

from typing import Any, Protocol

from app.jobs.store import JobRecord


class Executor(Protocol):
    """Runs each job in a fresh sandbox somewhere.

    ``toolchain`` is what a worker reported (torch version, compiler, ISA, CUDA
    devices), None until one has started; ``probe_error`` says why it is missing.
    """

    toolchain: dict[str, Any] | None
    probe_error: str | None
    runs_jobs_here: bool
    """True when jobs run in this process (a local pool): at start, every job the database
    calls running was this process's predecessor's. False when worker hosts elsewhere run
    them under leases (lifecycle.recover)."""

    def toolchain_for(self, device: str) -> dict[str, Any] | None:
        """The toolchain a job for ``device`` will be built with (its cache key's): this
        host's, or in a fleet the host class's the job is sent to; None while unknown."""

    @property
    def ready(self) -> bool:
        """A job submitted now will run: sandbox works, cache primed, a slot is warm."""

    @property
    def unavailable(self) -> str | None:
        """Why no job can run at all (e.g. the sandbox is missing), else None."""

    def start(self) -> None:
        """Start workers; returns at once."""

    def submit(self, job_id: str) -> None:
        """Run a job that is recorded as ``queued`` (the lifecycle's dispatch)."""

    def cancel(self, job_id: str) -> bool:
        """Stop a running job's process now; True if it was running here."""

    def job_finished(self, job: JobRecord) -> None:
        """Lifecycle listener: stop a job cancelled elsewhere if it runs here."""

    def info(self) -> dict[str, Any]:
        """Workers, queue depth and the toolchain the workers reported."""

    def close(self) -> None:
        """Stop all workers; jobs they were running go back to the queue."""
