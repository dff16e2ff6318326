"""The one job body every executor calls: ``run_job(job_id)`` in a worker process.

Workers are spawned, long-lived processes. ``init_worker`` runs once in each: it points
inductor at the shared cache, imports the operator's preload modules and torch, so a
job pays only for its own lowering. The API process imports this module too (to hand
its functions to the pool) but never calls anything here that imports torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app import __version__, sandbox
from app.constants import ErrorCode, JobStatus
from app.errors import JobError
from app.jobs.store import JobStore
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

log = logging.getLogger("app.worker")
LOG_TAIL_BYTES = 4000

_settings: Settings | None = None
_store: JobStore | None = None
_preload_errors: dict[str, str] = {}
_worker_info: dict[str, Any] = {}


def init_worker(settings_data: dict[str, Any]) -> None:
    """Pool initializer: guards, shared inductor cache, preloads, torch, priming."""
    global _settings, _store
    _settings = Settings(**settings_data)
    sandbox.die_with_parent()
    sandbox.limit_address_space(_settings.job_max_memory_bytes)
    if _settings.isolate_network and _settings.db_url.startswith("sqlite"):
        _worker_info["network_isolated"] = sandbox.drop_network()
    # Before torch is imported, so nothing in it can settle on another cache dir.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_settings.inductor_dir)
    # Defence in depth: any torch.load torch does on our behalf refuses pickled code.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    _store = JobStore(_settings.db_url)
    for name in _settings.preload_modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a bad preload must not stop the worker; jobs say why
            _preload_errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"preload of {name!r} failed: {exc}", file=sys.stderr)
    lowering = importlib.import_module("app.lowering")
    lowering.use_cache_dir(_settings.inductor_dir)
    if _settings.prime_workers:
        scratch = _settings.scratch_dir / f"prime-{os.getpid()}"
        try:
            with sandbox.private_tmpdir(scratch / "tmp"):
                _worker_info["primed_s"] = round(lowering.prime(scratch), 2)
        except Exception as exc:  # a worker that cannot prime can still try real jobs
            _worker_info["prime_error"] = f"{type(exc).__name__}: {exc}"
            print(f"priming failed: {exc}", file=sys.stderr)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def probe() -> dict[str, Any]:
    """What this worker can do: torch version, compiler, ISA, CUDA devices."""
    from app.lowering import probe_toolchain

    info = probe_toolchain()
    info["pid"] = os.getpid()
    info["preload_errors"] = dict(_preload_errors)
    info.update(_worker_info)
    # Plain JSON types only: torch.__version__ is a torch class, and unpickling it in
    # the API process would import torch there.
    return json.loads(json.dumps(info, default=str))


def run_job(job_id: str) -> str:
    """Run one lowering job to a final status; returns that status."""
    assert _settings is not None and _store is not None, "init_worker has not run"
    settings, store = _settings, _store
    job = store.get(job_id)
    if job is None:
        return "gone"
    moved = store.transition(
        job_id, from_=[JobStatus.QUEUED], to=JobStatus.RUNNING,
        worker_pid=os.getpid(), attempts=job["attempts"] + 1, phase="load",
    )
    if not moved:  # cancelled or deleted while it waited
        return "skipped"
    scratch = settings.scratch_dir / job_id
    before = sandbox.Usage.now()
    sandbox.reset_peak_rss()
    failure: JobError | None = None
    try:
        with _job_log(settings.logs_dir / f"{job_id}.log"), \
                sandbox.private_tmpdir(scratch / "tmp"), \
                sandbox.cpu_time_limit(settings.cpu_limit_s), \
                sandbox.file_size_limit(settings.job_max_file_bytes):
            result, sha256, size = _produce(job, settings, store, scratch)
    except JobError as exc:
        failure = exc
    finally:
        # Before the status changes: whoever sees the final status sees no leftovers.
        shutil.rmtree(scratch, ignore_errors=True)
    if failure is not None:
        error = failure.as_dict()
        if failure.code in (ErrorCode.LOWERING_FAILED, ErrorCode.INTERNAL):
            error["detail"]["log_tail"] = read_log_tail(settings.logs_dir / f"{job_id}.log")
        store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.FAILED, error=error,
                         resources=sandbox.job_resources(before))
        return JobStatus.FAILED.value
    timings = {**(job["timings"] or {}), **result.timings}
    done = store.transition(
        job_id, from_=[JobStatus.RUNNING], to=JobStatus.SUCCEEDED,
        artifact_sha256=sha256, artifact_size_bytes=size, timings=timings,
        verification=finite(result.verification), toolchain=result.toolchain,
        resources=sandbox.job_resources(before),
    )
    return JobStatus.SUCCEEDED.value if done else "superseded"


def _produce(job: dict[str, Any], settings: Settings, store: JobStore,
             scratch: Path) -> tuple[Any, str, int]:
    """Lower the job's upload and store the archive; every failure is a JobError."""
    from app.lowering import run_lowering

    log.info("lowering job %s: model_name=%s backend_id=%s device=%s options=%s",
             job["id"], job["model_name"], job["backend_id"], job["device"], job["options"])
    provenance = {
        "service": "lowering-service",
        "service_version": __version__,
        "job_id": job["id"],
        "input_sha256": job["input_sha256"],
    }
    out_path = scratch / "artifact.pt2"
    try:
        result = run_lowering(
            program_path=settings.uploads_dir / f"{job['id']}.pt2",
            out_path=out_path,
            model_name=job["model_name"],
            backend_id=job["backend_id"],
            device=job["device"],
            options=job["options"],
            verify=job["verify"],
            rtol=job["rtol"],
            atol=job["atol"],
            provenance=provenance,
            on_phase=lambda phase: _set_phase(store, job["id"], phase),
            max_artifact_bytes=settings.max_artifact_bytes,
        )
        sha256, size = ArtifactStore(settings.artifacts_dir).put(out_path)
    except JobError as exc:
        log.error("job failed: %s", exc)
        raise
    except MemoryError as exc:
        raise JobError(ErrorCode.RESOURCE_LIMIT, "the job ran out of its memory allowance "
                       "(LOWERING_JOB_MAX_MEMORY_BYTES)") from exc
    except OSError as exc:
        log.exception("storage error")
        code = ErrorCode.STORAGE_FULL if exc.errno in sandbox.SPACE_ERRNOS else ErrorCode.INTERNAL
        raise JobError(code, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        log.exception("unexpected error")
        raise JobError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
    return result, sha256, size


def _set_phase(store: JobStore, job_id: str, phase: str) -> None:
    store.update_running(job_id, phase=phase)


@contextlib.contextmanager
def _job_log(path: Path) -> Iterator[None]:
    """Send this process's fds 1/2 (g++ output included) and logging to the job's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab", buffering=0) as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        level = root.level
        root.setLevel(logging.INFO)
        started = time.monotonic()
        try:
            yield
        finally:
            log.info("job finished in %.1f s", time.monotonic() - started)
            root.removeHandler(handler)
            root.setLevel(level)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def finite(value: Any) -> Any:
    """JSON has no inf/NaN (a runner that crashed reports an infinite error): use None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def read_log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


