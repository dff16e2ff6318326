"""Process-level guards for worker processes: limits, isolation, per-job accounting.

Everything here is best effort where the host does not allow it (no root, no
namespaces), and says so in the worker's log; none of it imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# errnos that mean "no room": disk full, file over RLIMIT_FSIZE, quota.
SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (no orphan compiles)."""
    try:
        return _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def drop_network() -> bool:
    """Move this process into an empty network namespace (needs CAP_SYS_ADMIN)."""
    try:
        return _libc().unshare(CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def limit_address_space(max_bytes: int) -> None:
    """Cap virtual memory: a bomb gets MemoryError instead of taking the host."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        max_bytes = min(max_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past ``max_bytes`` in one file fail with EFBIG (SIGXFSZ is ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (_capped(max_bytes, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def cpu_time_limit(seconds: float) -> Iterator[None]:
    """The kernel stops this process (SIGXCPU) after ``seconds`` more CPU time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    resource.setrlimit(resource.RLIMIT_CPU, (_capped(int(used + seconds) + 1, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _capped(value: int, hard: int) -> int:
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


@contextlib.contextmanager
def private_tmpdir(path: Path) -> Iterator[Path]:
    """TMPDIR (and ``tempfile``) point at ``path`` for the job; restored after."""
    path.mkdir(parents=True, exist_ok=True)
    saved_env, saved_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_default
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env


@dataclass
class Usage:
    """CPU seconds of this process and of its waited-for children (g++), peak RSS."""

    cpu_s: float
    children_cpu_s: float

    @classmethod
    def now(cls) -> Usage:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime)


def reset_peak_rss() -> None:
    """Restart this process's VmHWM, so the next reading is this job's own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def job_resources(before: Usage) -> dict[str, float | int | None]:
    after = Usage.now()
    return {
        "cpu_s": round(after.cpu_s - before.cpu_s, 3),
        "children_cpu_s": round(after.children_cpu_s - before.children_cpu_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
