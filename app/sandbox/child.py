"""The process that runs inside the sandbox: ``python -m app.sandbox.child {prime|job}``.

It talks to its supervisor over stdin/stdout, one JSON object a line; stdout is moved
off fd 1 at start, so g++ and torch print into the log (stderr), never into the
protocol. Everything it says is untrusted once a job's data is loaded: the supervisor
bounds and checks it.

- ``prime`` (trusted: it never sees an upload) lowers a built-in model in a private
  inductor cache; the supervisor then copies what it built (precompiled headers, ISA
  probes) into the shared cache, which jobs only read. It says ``primed`` and exits.
- ``job`` warms up before any job data exists: a private inductor cache in /job that
  mirrors the read-only shared one, torch and the lowering code imported, the CPU ISA
  picked, preload modules imported. It says ``{"event": "ready", "toolchain": ...}``,
  reads one job spec from stdin, lowers /job/input.pt2 into /job/artifact.pt2 and says
  ``phase`` events, then ``done`` (with result) or ``failed`` (with error), and exits.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

INPUT_NAME = "input.pt2"
LINK_MIN_BYTES = 16 << 20
ARTIFACT_NAME = "artifact.pt2"
log = logging.getLogger("app.sandbox.child")


def _channel() -> IO[str]:
    """The protocol stream (the original stdout); fd 1 becomes the log from now on."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _say(channel: IO[str], event: str, **fields: Any) -> None:
    channel.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    channel.flush()


def _mirror_cache(shared: Path, private: Path) -> int:
    """Mirror the read-only shared cache into ``private``; returns the files mirrored.

    Inductor finds the trusted precompiled headers and ISA probes there and skips
    rebuilding them. Small files are copied, since inductor may rewrite one in place
    (it opens some outputs for writing when their content-addressed name exists);
    big ones (the ~140 MB precompiled headers, which it only ever reads once they
    exist) are symlinked. Nothing a job writes can reach the shared cache.
    """
    count = 0
    for root, dirs, files in os.walk(shared):
        dirs[:] = [d for d in dirs if d != "locks"]
        rel = Path(root).relative_to(shared)
        (private / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dest = Path(root) / name, private / rel / name
            if name.endswith((".lock", ".tmp")) or src.is_symlink() or not src.is_file():
                continue
            if src.stat().st_size >= LINK_MIN_BYTES:
                dest.symlink_to(src)
            else:
                shutil.copy2(src, dest)
            count += 1
    return count


def _toolchain() -> dict[str, Any]:
    from app.lowering import probe_toolchain

    return json.loads(json.dumps(probe_toolchain(), default=str))


def prime(channel: IO[str], cache: Path, job_dir: Path) -> None:
    """Warm up like a job, then lower our own model; the supervisor publishes the cache."""
    started = time.monotonic()
    toolchain, _ = warm(cache, job_dir, [])
    importlib.import_module("app.lowering").prime(job_dir / "prime")
    _say(channel, "primed", primed_s=round(time.monotonic() - started, 2), toolchain=toolchain)


def warm(cache: Path, job_dir: Path, preload: list[str]) -> tuple[dict[str, Any], float]:
    """Everything a job needs that does not depend on the job; returns toolchain, seconds."""
    started = time.monotonic()
    private = job_dir / "inductor"
    mirrored = _mirror_cache(cache, private)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(private)
    (job_dir / "tmp").mkdir(exist_ok=True)
    errors: dict[str, str] = {}
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # jobs that need it fail with unknown_pytree_type
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"preload of {name!r} failed: {exc}", file=sys.stderr)
    lowering = importlib.import_module("app.lowering")
    lowering.use_cache_dir(private, lock_dir=private / "locks")
    lowering.warm_up()
    toolchain = _toolchain()
    toolchain["preload_errors"] = errors
    log.info("warm in %.2f s (%d cache files mirrored)", time.monotonic() - started, mirrored)
    return toolchain, round(time.monotonic() - started, 2)


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


_JOB_START_CPU = (0.0, 0.0)


def _resources() -> dict[str, Any]:
    """The job's CPU (this process and the compilers it waited for), its peak RSS."""
    own, kids = _cpu()
    peak = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {"cpu_s": round(own - _JOB_START_CPU[0], 3),
            "children_cpu_s": round(kids - _JOB_START_CPU[1], 3), "peak_rss_bytes": peak}


def _cpu_watchdog(limit_s: float) -> None:
    """SIGXCPU (what RLIMIT_CPU sends) once this process has used ``limit_s`` CPU seconds.

    Not a soft RLIMIT_CPU: that is an absolute number of seconds which every compiler this
    process starts inherits and counts from zero, so each g++ would get this process's
    warm-up CPU plus the budget, not a budget of its own. The compilers run under the
    sandbox's per-process hard limit instead (sandbox.profile: the job budget + warm-up).
    """
    def watch() -> None:
        while time.process_time() < limit_s:
            time.sleep(0.2)
        log.error("the job used its CPU allowance (LOWERING_JOB_MAX_CPU_S)")
        os.kill(os.getpid(), signal.SIGXCPU)

    threading.Thread(target=watch, name="cpu-watchdog", daemon=True).start()


def run_job(channel: IO[str], spec: dict[str, Any], job_dir: Path) -> None:
    from app.errors import JobError
    from app.lowering import run_lowering
    from app.storage.compiled import COMPILED_DIR

    logging.getLogger().setLevel(logging.INFO)
    # The job's CPU budget and accounting count from here, not from the warm-up (the
    # hard limit, set by the supervisor, stays the ceiling); so does its peak RSS.
    global _JOB_START_CPU
    _JOB_START_CPU = _cpu()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if spec.get("cpu_s"):
        _cpu_watchdog(_JOB_START_CPU[0] + float(spec["cpu_s"]))
    log.info("lowering job %s: model_name=%s backend_id=%s device=%s options=%s",
             spec["job_id"], spec["model_name"], spec["backend_id"], spec["device"],
             spec["options"])
    try:
        result = run_lowering(
            program_path=job_dir / INPUT_NAME, out_path=job_dir / ARTIFACT_NAME,
            model_name=spec["model_name"], backend_id=spec["backend_id"],
            device=spec["device"], options=spec["options"], verify=spec["verify"],
            rtol=spec["rtol"], atol=spec["atol"], provenance=spec["provenance"],
            on_phase=lambda phase: _say(channel, "phase", phase=phase),
            max_artifact_bytes=spec["max_artifact_bytes"],
            compiled=[job_dir / COMPILED_DIR / name for name in spec["compiled"]]
            if spec.get("compiled") else None,
        )
    except JobError as exc:
        log.error("job failed: %s", exc)
        _say(channel, "failed", error=exc.as_dict(), resources=_resources())
        return
    except MemoryError:
        _say(channel, "failed", error={"code": "resource_limit", "detail": {},
                                       "message": "the job ran out of its memory allowance "
                                       "(LOWERING_JOB_MAX_MEMORY_BYTES)"},
             resources=_resources())
        return
    except Exception as exc:  # a bug of ours, not the program's: say so, with the type
        log.exception("unexpected error")
        _say(channel, "failed", error={"code": "internal_error",
                                       "message": f"{type(exc).__name__}: {exc}"[:2000],
                                       "detail": {"exception_type": type(exc).__name__}},
             resources=_resources())
        return
    _say(channel, "done", result={"timings": result.timings,
                                  "verification": result.verification,
                                  "toolchain": result.toolchain,
                                  "profile": result.profile,
                                  "code_reused": result.code_reused},
         resources=_resources())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    channel = _channel()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_dir = Path(os.environ.get("LOWERING_JOB_DIR", os.getcwd()))
    cache = Path(os.environ.get("LOWERING_SHARED_CACHE", job_dir / "cache"))
    if args[:1] == ["prime"]:
        prime(channel, cache, job_dir)
        return 0
    preload = [m for m in (args[1] if len(args) > 1 else "").split(",") if m]
    toolchain, warm_s = warm(cache, job_dir, preload)
    _say(channel, "ready", toolchain=toolchain, warm_s=warm_s, pid=os.getpid())
    line = sys.stdin.readline()
    if not line:
        return 0  # the supervisor let this sandbox go unused
    run_job(channel, json.loads(line), job_dir)
    # Everything the job leaves is written and closed; the interpreter's own teardown
    # (unloading runners, inductor's worker pools, torch's atexit hooks) took ~2 s after
    # every job, which the supervisor waited out before storing the archive.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
