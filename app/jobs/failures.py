"""Why a job failed, decided once: every exception, death and overrun becomes a JobError here.

The sandboxed child classifies what its lowering raised (``error_for``), the supervisor
classifies how the child ended (``died``, ``timed_out``) and what its own steps raised
(``error_for`` again). Nothing else builds a job's error. No torch, no database: the
sandbox imports this module too.
"""

from __future__ import annotations

from app.constants import SPACE_ERRNOS, ErrorCode
from app.errors import JobError

MAX_MESSAGE_CHARS = 2000
# SIGXCPU, SIGXFSZ: the kernel enforcing RLIMIT_CPU / RLIMIT_FSIZE.
LIMIT_SIGNALS = frozenset({24, 25})
# Failures whose log tail helps the submitter (the others say all there is to say).
LOGGED_CODES = frozenset({ErrorCode.LOWERING_FAILED, ErrorCode.INTERNAL,
                          ErrorCode.WORKER_CRASHED})


def out_of_space(exc: BaseException) -> bool:
    """Disk full, a file over its size limit or a quota, as the OS, SQLite or torch (which
    wraps the OSError in its own exceptions) says it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in SPACE_ERRNOS:
            return True
        text = str(seen).lower()
        if "no space left" in text or "disk is full" in text or "file too large" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_for(exc: BaseException, *, phase: str | None = None,
              default: ErrorCode = ErrorCode.INTERNAL) -> JobError:
    """The job error an exception means. A JobError stands as raised; running out of disk
    or memory is named as such whatever raised it; anything else is ``default`` (the
    lowering's own phases pass lowering_failed or verification_failed)."""
    if isinstance(exc, JobError):
        return exc
    if out_of_space(exc):
        code = ErrorCode.STORAGE_FULL
    elif isinstance(exc, MemoryError):
        code = ErrorCode.RESOURCE_LIMIT
    else:
        code = default
    detail: dict[str, object] = {"exception_type": type(exc).__name__}
    if phase is not None:
        detail["phase"] = phase
    text = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
    message = f"{type(exc).__name__}: {text or exc}"[:MAX_MESSAGE_CHARS]
    return JobError(code, message, detail)


def died(*, returncode: int | None, signal: int | None) -> JobError:
    """The sandboxed process ended without reporting a result."""
    detail = {"exitcode": returncode, "signal": signal}
    if signal in LIMIT_SIGNALS:
        return JobError(ErrorCode.RESOURCE_LIMIT, "the job hit a resource limit (CPU time or "
                        "file size: LOWERING_JOB_MAX_CPU_S, LOWERING_JOB_MAX_FILE_BYTES) and "
                        "was stopped", detail)
    return JobError(ErrorCode.WORKER_CRASHED, f"the sandboxed process died (exit code "
                    f"{returncode}) while lowering", detail)


def timed_out(*, limit_s: float, setting: str, phase: str | None) -> JobError:
    """The job (or its load phase) ran past its limit and was stopped."""
    what = "loading the program" if setting == "LOWERING_LOAD_TIMEOUT_S" else "lowering"
    return JobError(ErrorCode.TIMEOUT, f"{what} took longer than {limit_s:g} s ({setting}); "
                    "the sandbox was stopped", {"timeout_s": limit_s, "phase": phase})


def interrupted(message: str) -> JobError:
    """The service lost the job: stopped too often while it ran, or its supervisor died."""
    return JobError(ErrorCode.INTERRUPTED, message)


def lease_lost(*, attempts: int, worker: str | None) -> JobError:
    """A job whose worker stopped renewing its claim on every attempt."""
    return JobError(ErrorCode.WORKER_CRASHED,
                    f"the job's worker ({worker or 'unknown'}) stopped answering while it "
                    f"ran, {attempts} times (a host died or hung on it); resubmit it",
                    {"attempts": attempts})
