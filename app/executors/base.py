"""What the API needs from an executor; ``local.LocalExecutor`` is the local one."""

from __future__ import annotations

from typing import Any, Protocol


class Executor(Protocol):
    """Runs each job in a fresh sandbox somewhere and records crashes/timeouts.

    ``toolchain`` is what a worker reported (torch version, compiler, ISA, CUDA
    devices), None until one has started; ``probe_error`` says why it is missing.
    """

    toolchain: dict[str, Any] | None
    probe_error: str | None

    @property
    def ready(self) -> bool:
        """A job submitted now will run: sandbox works, cache primed, a slot is warm."""

    @property
    def unavailable(self) -> str | None:
        """Why no job can run at all (e.g. the sandbox is missing), else None."""

    def start(self) -> None:
        """Start workers; returns at once."""

    def submit(self, job_id: str) -> None:
        """Queue a job that is recorded as ``queued``."""

    def cancel(self, job_id: str) -> bool:
        """Stop a queued or running job; True if it was known here."""

    def settle(self, job_id: str) -> None:
        """Finish the identical jobs that waited on a finished ``job_id``."""

    def info(self) -> dict[str, Any]:
        """Workers, queue depth and the toolchain the workers reported."""

    def close(self) -> None:
        """Stop all workers."""
