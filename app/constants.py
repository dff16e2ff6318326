"""Literals shared by the API, the store and the workers."""

from __future__ import annotations

import enum
import errno
import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
DEVICE_PATTERN = r"^(cpu|cuda|cuda:[0-9]{1,2})$"
CHUNK_BYTES = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
"""A sha256 hex digest as every store and route names content."""
# errnos that mean "no room": disk full, file over RLIMIT_FSIZE, quota.
SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class Phase(enum.StrEnum):
    """The step a running job is in (``phase``); each is also a key of ``timings``."""

    LOAD = "load"
    """The sandbox reads the rebuilt upload into an ExportedProgram."""
    LOWER = "lower"
    """AOTInductor compiles the program (the long one)."""
    PACKAGE = "package"
    """The two programs and provenance are written into one pt2 archive."""
    VERIFY = "verify"
    """The archive's runner is compared with the original program."""
    PROFILE = "profile"
    """A verified archive's runner is timed against the program run eagerly."""
    WAITING_FOR_HOST = "waiting_for_host"
    """Still queued: no live worker host of the fleet serves the job's target (its device
    and host class); it runs when one joins."""


# Keys of a job's ``timings``: the API's own "validate" (the upload gate), then the phases
# a job runs through.
TIMING_KEYS = ("validate",
               *(phase.value for phase in Phase if phase is not Phase.WAITING_FOR_HOST))


class JobStatus(enum.StrEnum):
    """Where a lowering job is; the last three are final."""

    QUEUED = "queued"
    """Recorded and handed to the executor; no worker has started it."""
    RUNNING = "running"
    """A worker has taken it; ``phase`` says which step it is in."""
    SUCCEEDED = "succeeded"
    """The artifact is stored (and verified unless verify=false)."""
    FAILED = "failed"
    """It ended with an error; ``error`` says why."""
    CANCELLED = "cancelled"
    """A caller cancelled it; a running worker was killed and replaced."""

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class ErrorCode(enum.StrEnum):
    """Codes a failed job can carry in ``error.code``."""

    INVALID_PROGRAM = "invalid_program"
    UNKNOWN_PYTREE_TYPE = "unknown_pytree_type"
    LOWERING_FAILED = "lowering_failed"
    VERIFICATION_FAILED = "verification_failed"
    TIMEOUT = "timeout"
    WORKER_CRASHED = "worker_crashed"
    INTERRUPTED = "interrupted"
    STORAGE_FULL = "storage_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    RESOURCE_LIMIT = "resource_limit"
    INTERNAL = "internal_error"

# Bump when the lowering code changes what an artifact contains: it is part of the
# cache key, so old results stop being served as hits.
LOWERING_VERSION = "2"  # 2: weights stored once (shared) by default
