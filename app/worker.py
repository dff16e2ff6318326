"""The trusted supervisor of one job: ``run_job(job, child, ...)``. Never imports torch.

The supervisor holds the job DB and the stores; the sandboxed child holds neither. It
hands the child the job's rebuilt upload (in the child's scratch dir) and a spec,
follows its phase events, enforces the job and load time limits and cancellation,
then reads back only bytes: a JSON result it bounds and checks, and an artifact it
opens without following links, checks as a pt2 zip and copies into the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import stat
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import __version__
from app.constants import ErrorCode, JobStatus
from app.errors import JobError
from app.jobs.store import Job, JobStore
from app.sandbox import SPACE_ERRNOS
from app.sandbox.child import ARTIFACT_NAME, INPUT_NAME
from app.sandbox.process import Exit, SandboxedChild
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

log = logging.getLogger("app.worker")
LOG_TAIL_BYTES = 4000
MAX_MESSAGE_CHARS = 2000
MAX_DETAIL_CHARS = 64_000
EXIT_GRACE_S = 15.0
LIMIT_SIGNALS = {24, 25}  # SIGXCPU, SIGXFSZ: the kernel enforcing RLIMIT_CPU / RLIMIT_FSIZE
ACTIVE = [JobStatus.QUEUED, JobStatus.RUNNING]


@dataclass
class Outcome:
    """What the child's run came to, before anything is stored."""

    result: dict[str, Any] | None = None
    error: JobError | None = None
    cancelled: bool = False
    resources: dict[str, Any] | None = None


def run_job(job: Job, child: SandboxedChild, *, settings: Settings, store: JobStore,
            artifacts: ArtifactStore, cancelled: threading.Event) -> str:
    """Run a claimed (``running``) job in ``child`` to a final status; returns it."""
    job_id = job["id"]
    log_path = settings.logs_dir / f"{job_id}.log"
    with contextlib.suppress(OSError):
        os.replace(child.log_path, log_path)  # the child keeps writing to the same file
    outcome = Outcome()
    try:
        _hand_over(job, child, settings)
        outcome = _follow(job, child, settings, store, cancelled)
    except JobError as exc:
        outcome.error = exc
    finally:
        ended = child.finish(grace_s=EXIT_GRACE_S if outcome.result is not None else 0.0)
    # The child's own account (it saw its compilers); the bwrap tree's if it said nothing.
    resources = outcome.resources or {"cpu_s": ended.cpu_s,
                                      "peak_rss_bytes": ended.peak_rss_bytes}
    if outcome.cancelled:
        shutil.rmtree(child.scratch, ignore_errors=True)
        return JobStatus.CANCELLED.value
    if outcome.error is None and outcome.result is None:
        outcome.error = _died(ended, settings)
    stored: tuple[str, int] | None = None
    if outcome.error is None:
        try:
            stored = _collect(child.scratch, job, artifacts, settings)
        except JobError as exc:
            outcome.error = exc
    # Before the status changes: whoever sees the final status sees no leftovers.
    shutil.rmtree(child.scratch, ignore_errors=True)
    if outcome.error is not None:
        error = outcome.error.as_dict()
        if outcome.error.code in (ErrorCode.LOWERING_FAILED, ErrorCode.INTERNAL,
                                  ErrorCode.WORKER_CRASHED):
            error["detail"]["log_tail"] = read_log_tail(log_path)
        store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.FAILED, error=error,
                         resources=resources)
        return JobStatus.FAILED.value
    assert stored is not None and outcome.result is not None
    result = outcome.result
    done = store.transition(
        job_id, from_=[JobStatus.RUNNING], to=JobStatus.SUCCEEDED,
        artifact_sha256=stored[0], artifact_size_bytes=stored[1],
        timings={**(job["timings"] or {}), **result["timings"]},
        verification=result["verification"], toolchain=result["toolchain"],
        resources=resources,
    )
    return JobStatus.SUCCEEDED.value if done else "superseded"


def _hand_over(job: Job, child: SandboxedChild, settings: Settings) -> None:
    """Put the job's rebuilt upload into the child's scratch dir and send the spec."""
    upload = settings.uploads_dir / f"{job['id']}.pt2"
    target = child.scratch / INPUT_NAME
    try:
        if child.may_hardlink_inputs:
            upload.chmod(0o644)  # read by the sandbox user, written by nobody
            try:
                os.link(upload, target)
            except OSError:
                shutil.copyfile(upload, target)
        else:  # a job must never be able to change the upload a retry would run
            shutil.copyfile(upload, target)
    except OSError as exc:
        code = ErrorCode.STORAGE_FULL if exc.errno in SPACE_ERRNOS else ErrorCode.INTERNAL
        raise JobError(code, f"the upload could not be handed to the sandbox: {exc.strerror}"
                       ) from exc
    child.send({
        "job_id": job["id"], "model_name": job["model_name"], "backend_id": job["backend_id"],
        "device": job["device"], "options": job["options"], "verify": job["verify"],
        "rtol": job["rtol"], "atol": job["atol"],
        "max_artifact_bytes": settings.max_artifact_bytes, "cpu_s": settings.cpu_limit_s,
        "provenance": {"service": "lowering-service", "service_version": __version__,
                       "job_id": job["id"], "input_sha256": job["input_sha256"]},
    })


def _follow(job: Job, child: SandboxedChild, settings: Settings, store: JobStore,
            cancelled: threading.Event) -> Outcome:
    """Relay phases until the child says done/failed, dies, overruns or is cancelled."""
    started = time.monotonic()
    deadline = started + settings.job_timeout_s
    phase = "load"
    while True:
        if cancelled.is_set():
            child.kill()
            return Outcome(cancelled=True)
        now = time.monotonic()
        if now >= deadline:
            child.kill()
            raise JobError(ErrorCode.TIMEOUT, f"lowering took longer than "
                           f"{settings.job_timeout_s:g} s (LOWERING_JOB_TIMEOUT_S); the "
                           "sandbox was stopped", {"timeout_s": settings.job_timeout_s,
                                                   "phase": phase})
        if phase == "load" and now >= started + settings.load_timeout_s:
            child.kill()
            raise JobError(ErrorCode.TIMEOUT, f"loading the program took longer than "
                           f"{settings.load_timeout_s:g} s (LOWERING_LOAD_TIMEOUT_S); the "
                           "sandbox was stopped", {"timeout_s": settings.load_timeout_s,
                                                   "phase": "load"})
        try:
            event = child.next_event(min(0.5, deadline - now))
        except queue.Empty:
            continue
        if event is None:
            return Outcome()  # died without a word: _died says how
        kind = event["event"]
        if kind == "phase" and isinstance(event.get("phase"), str):
            phase = event["phase"][:32]
            store.update_running(job["id"], phase=phase)
        elif kind == "done":
            return Outcome(result=_checked_result(event.get("result")),
                           resources=_checked_resources(event.get("resources")))
        elif kind == "failed":
            return Outcome(error=_checked_error(event.get("error")),
                           resources=_checked_resources(event.get("resources")))


def _died(ended: Exit, settings: Settings) -> JobError:
    detail = {"exitcode": ended.returncode, "signal": ended.signal}
    if ended.signal in LIMIT_SIGNALS:
        return JobError(ErrorCode.RESOURCE_LIMIT, "the job hit a resource limit (CPU time or "
                        "file size: LOWERING_JOB_MAX_CPU_S, LOWERING_JOB_MAX_FILE_BYTES) and "
                        "was stopped", detail)
    return JobError(ErrorCode.WORKER_CRASHED, f"the sandboxed process died (exit code "
                    f"{ended.returncode}) while lowering", detail)


def _checked_result(raw: Any) -> dict[str, Any]:
    """The child's result, reduced to the fields and types we store, or a JobError."""
    if not isinstance(raw, dict):
        raise JobError(ErrorCode.INTERNAL, "the sandbox returned a malformed result")
    timings = raw.get("timings")
    if not isinstance(timings, dict):
        timings = {}
    clean = {str(k)[:32]: round(float(v), 4) for k, v in list(timings.items())[:16]
             if isinstance(v, int | float) and math.isfinite(v)}
    return {"timings": clean, "verification": _bounded(finite(raw.get("verification"))),
            "toolchain": _bounded(finite(raw.get("toolchain")))}


def _checked_resources(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    return {key: raw[key] for key in ("cpu_s", "children_cpu_s", "peak_rss_bytes")
            if isinstance(raw.get(key), int | float) and math.isfinite(raw[key])
            and 0 <= raw[key] < 1e15}


def _checked_error(raw: Any) -> JobError:
    if not isinstance(raw, dict):
        return JobError(ErrorCode.INTERNAL, "the sandbox reported a malformed error")
    code = raw.get("code")
    if code not in {c.value for c in ErrorCode}:
        code = ErrorCode.INTERNAL.value
    message = str(raw.get("message", ""))[:MAX_MESSAGE_CHARS]
    detail = _bounded(finite(raw.get("detail")))
    return JobError(str(code), message, detail if isinstance(detail, dict) else {})


def _bounded(value: Any) -> Any:
    """JSON-able and small: a child's oversized answer is dropped, not stored."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value if len(text) <= MAX_DETAIL_CHARS else {"truncated": True}


def _collect(scratch: Path, job: Job, artifacts: ArtifactStore,
             settings: Settings) -> tuple[str, int]:
    """Open the child's archive without following links, check it, copy it into the store."""
    try:
        dir_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fd = os.open(ARTIFACT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                         dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise JobError(ErrorCode.INTERNAL, "the sandbox reported success but left no "
                       f"archive ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise JobError(ErrorCode.INTERNAL, "the sandbox's archive is not a regular file")
        if info.st_size > settings.max_artifact_bytes:
            raise JobError(ErrorCode.STORAGE_FULL, f"the archive is {info.st_size} bytes, over "
                           f"LOWERING_MAX_ARTIFACT_BYTES={settings.max_artifact_bytes}")
        _check_archive(handle, job["model_name"], job["backend_id"])
        handle.seek(0)
        try:
            return artifacts.put_stream(handle)
        except OSError as exc:
            code = (ErrorCode.STORAGE_FULL if exc.errno in SPACE_ERRNOS
                    else ErrorCode.INTERNAL)
            raise JobError(code, f"the archive could not be stored: {exc.strerror}") from exc


def _check_archive(handle: Any, model_name: str, backend_id: str) -> None:
    """A pt2 zip with both programs and our provenance, and only plain member names."""
    try:
        with zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise JobError(ErrorCode.INTERNAL, f"the sandbox's archive is not a zip: {exc}") from exc
    required = {f"archive/models/{model_name}.json",
                f"archive/models/{model_name}-{backend_id}.json",
                "archive/extra/provenance.json"}
    unsafe = [n for n in names if not n.startswith("archive/") or ".." in n.split("/")
              or "\\" in n or "\x00" in n]
    if unsafe or not required <= set(names):
        raise JobError(ErrorCode.INTERNAL, "the sandbox's archive does not have the pt2 "
                       "layout", {"missing": sorted(required - set(names)),
                                  "unsafe_names": unsafe[:5]})


def finite(value: Any) -> Any:
    """JSON has no inf/NaN: such values from the sandbox are stored as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
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
