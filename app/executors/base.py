"""What the API needs from an executor: submit a job id, cancel it, close."""

from __future__ import annotations

from typing import Any, Protocol


class Executor(Protocol):
    """Runs ``app.worker.run_job(job_id)`` somewhere and records crashes/timeouts."""

    def start(self) -> None:
        """Start workers; returns at once."""

    def submit(self, job_id: str) -> None:
        """Queue a job that is recorded as ``queued``."""

    def cancel(self, job_id: str) -> bool:
        """Stop a queued or running job; True if it was known here."""

    def info(self) -> dict[str, Any]:
        """Workers, queue depth and the toolchain the workers reported."""

    def close(self) -> None:
        """Stop all workers."""
