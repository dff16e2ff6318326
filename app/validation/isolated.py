"""Run the upload gate in a fresh, resource-limited child process, a few at a time.

The gate reads hostile bytes; however tight its caps, a bomb they miss must not take
the API process down. So each check runs in its own ``python -S -m
app.validation.child`` (stdlib and this package only, never torch) that sets
RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE and RLIMIT_CORE on itself before reading the
upload, runs :func:`admit_upload`, and prints one JSON object on stdout: the
GateReport, or the refusal (status, code, message). An ``asyncio.Semaphore`` per event
loop bounds how many run at once (``LOWERING_GATE_CONCURRENCY``).

A child stopped by its limits (out of memory, out of CPU seconds, past the wall-clock
timeout) is answered with 422 ``upload_too_complex`` naming the limit; a child that
fails any other way is a 500 and its stderr goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import weakref
from pathlib import Path

from app.errors import ApiErrorCode, ServiceError, StorageFull, Unprocessable, error_class
from app.validation.child import MAX_OUTPUT_BYTES
from app.validation.gate import GateReport
from app.validation.limits import ArchiveLimits, GateResources

__all__ = ["GateResources", "run_gate"]
log = logging.getLogger(__name__)
MODULE = "app.validation.child"
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the ``app`` package


_SEMAPHORES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]]
_SEMAPHORES = weakref.WeakKeyDictionary()


def _semaphore(concurrency: int) -> asyncio.Semaphore:
    per_loop = _SEMAPHORES.setdefault(asyncio.get_running_loop(), {})
    if concurrency not in per_loop:
        per_loop[concurrency] = asyncio.Semaphore(concurrency)
    return per_loop[concurrency]


def _too_complex(what: str) -> Unprocessable:
    return Unprocessable(f"checking this upload {what}; it is too complex to accept",
                         code=ApiErrorCode.UPLOAD_TOO_COMPLEX)


async def run_gate(src: Path, dest: Path, limits: ArchiveLimits,
                   resources: GateResources) -> GateReport:
    """:func:`admit_upload` in a child process; raises the same ServiceErrors it would,
    or 422 ``upload_too_complex`` when the child hits its memory, CPU or time limit."""
    request = {"src": str(src), "dest": str(dest), "limits": limits.as_dict(),
               "max_memory_bytes": resources.max_memory_bytes,
               "max_cpu_s": resources.max_cpu_s,
               "max_file_bytes": limits.max_total_bytes + limits.max_members * 4096 + (64 << 20)}
    async with _semaphore(resources.concurrency):
        try:
            returncode, out, err = await _run_child(json.dumps(request).encode(),
                                                    resources.timeout_s)
        except TimeoutError:
            _discard(dest)
            raise _too_complex(f"took longer than {resources.timeout_s:g} s "
                               "(LOWERING_GATE_TIMEOUT_S)") from None
    try:
        return _outcome(returncode, out, err, resources)
    except BaseException:
        _discard(dest)
        raise


async def _run_child(request: bytes, timeout_s: float) -> tuple[int, bytes, bytes]:
    """Start the child, hand it ``request``; (returncode, stdout, stderr). Kills it and
    raises TimeoutError past ``timeout_s``, and kills it if this task is cancelled."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-m", MODULE, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    try:
        out, err = await asyncio.wait_for(proc.communicate(request), timeout_s)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out[:MAX_OUTPUT_BYTES], err[-MAX_OUTPUT_BYTES:]


def _outcome(returncode: int, out: bytes, err: bytes, resources: GateResources) -> GateReport:
    if returncode == -signal.SIGXCPU:
        raise _too_complex(f"needed more than {resources.max_cpu_s:g} CPU seconds "
                           "(LOWERING_GATE_MAX_CPU_S)")
    if returncode == -signal.SIGXFSZ:
        raise _too_complex("would write a rebuilt archive larger than the upload caps allow")
    if returncode < 0 or (returncode and b"MemoryError" in err):
        # SIGKILL (the kernel's OOM killer), SIGSEGV/SIGABRT (an allocation failing where
        # Python cannot raise MemoryError): the address-space cap is what stops a bomb.
        raise _too_complex(f"needed more than {resources.max_memory_bytes} bytes of memory "
                           "(LOWERING_GATE_MAX_MEMORY_BYTES)")
    try:
        result = json.loads(out)
        if "report" in result:
            return GateReport(**result["report"])
        error = result["error"]
        code, message = ApiErrorCode(error["code"]), str(error["message"])
    except Exception:  # no JSON at all: the child died without saying why
        log.error("upload gate child exited %s without a result: %s", returncode,
                  err.decode(errors="replace")[-4000:])
        raise ServiceError("the upload gate failed") from None
    cls = error_class(code)
    if cls.status >= 500 and cls is not StorageFull:
        log.error("upload gate child failed: %s", err.decode(errors="replace")[-4000:])
        raise ServiceError("the upload gate failed")
    raise cls(message, code=code)


def _discard(dest: Path) -> None:
    """Remove what a killed child may have left: the archive or its temporary file."""
    dest.unlink(missing_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
