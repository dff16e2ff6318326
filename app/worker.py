"""The trusted supervisor of one job: ``run_job(job_id, child, ctx)``. Never imports torch.

The supervisor holds the job lifecycle and the stores; the sandboxed child holds
neither. It claims the job, hands the child the job's rebuilt upload (in the child's
scratch dir) and a spec, follows its phase events (each answered by the lifecycle with
"go on" or "stop": cancellation is cooperative), enforces the job and load time limits,
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
import socket
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app import __version__
from app.constants import ErrorCode, Phase
from app.errors import JobError, ObjectStoreUnavailable
from app.jobs import failures
from app.jobs.lifecycle import ArtifactLost, JobLifecycle
from app.jobs.store import JobRecord
from app.logs import job_context
from app.sandbox.child import ARTIFACT_NAME, INPUT_NAME
from app.sandbox.process import SandboxedChild
from app.settings import Settings
from app.storage.base import ArtifactRef, ArtifactStore, LogStore, UploadStore
from app.storage.compiled import COMPILED_DIR, NotReusable, take_compiled

log = logging.getLogger("app.worker")
MAX_MESSAGE_CHARS = 2000
MAX_DETAIL_CHARS = 64_000
EXIT_GRACE_S = 15.0
# How often a running job asks the lifecycle whether it is still wanted (cancel from
# another process); a local cancel also arrives at once through ``stop``.
PROGRESS_CHECK_S = 2.0
Ran = Literal["not_claimed", "stopped", "finished"]


@dataclass(frozen=True)
class JobContext:
    """What every supervisor needs: built once by the executor."""

    settings: Settings
    lifecycle: JobLifecycle
    uploads: UploadStore
    logs: LogStore
    artifacts: ArtifactStore
    worker: str = field(default_factory=lambda: f"local@{socket.gethostname()}")
    """The node name jobs run here are recorded under (job JSON ``worker``)."""


@dataclass
class Outcome:
    """What the child's run came to, before anything is stored."""

    result: dict[str, Any] | None = None
    error: JobError | None = None
    stopped: bool = False
    resources: dict[str, Any] | None = None
    donor: str | None = None


def run_job(job_id: str, child: SandboxedChild, ctx: JobContext, *,
            stop: threading.Event) -> Ran:
    """Claim ``job_id`` and run it in ``child`` to a final status.

    "not_claimed": it was not queued (cancelled or deleted while it waited) and the
    child was not touched. "stopped": it was cancelled, or ``stop`` was set, while it
    ran; the child is gone and the status was left to whoever stopped it.
    """
    with job_context(job_id):  # every log line of this supervisor names the job
        return _run_job(job_id, child, ctx, stop=stop)


def _run_job(job_id: str, child: SandboxedChild, ctx: JobContext, *,
             stop: threading.Event) -> Ran:
    job = ctx.lifecycle.claim(job_id, worker_pid=child.pid, worker=ctx.worker)
    if job is None:
        return "not_claimed"
    attempt = job["attempts"]  # every later write is fenced by it
    ctx.logs.adopt(job_id, child.log_path)  # the child keeps writing to the same file
    outcome = Outcome()
    try:
        donor = _hand_over(job, child, ctx)
        outcome = _follow(job, child, ctx, stop)
        outcome.donor = donor
    except JobError as exc:
        outcome.error = exc
    finally:
        ended = child.finish(grace_s=EXIT_GRACE_S if outcome.result is not None else 0.0)
        ctx.logs.seal(job_id)  # whole now; readable from every replica before it is final
    # The child's own account (it saw its compilers); the bwrap tree's if it said nothing.
    resources = outcome.resources or {"cpu_s": ended.cpu_s,
                                      "peak_rss_bytes": ended.peak_rss_bytes}
    if outcome.stopped:
        shutil.rmtree(child.scratch, ignore_errors=True)
        return "stopped"
    if outcome.error is None and outcome.result is None:
        outcome.error = failures.died(returncode=ended.returncode, signal=ended.signal)
    try:
        if outcome.error is None:
            assert outcome.result is not None
            _succeed(job, child.scratch, outcome.result, resources, ctx,
                     donor=outcome.donor if outcome.result["code_reused"] else None)
            return "finished"
    except JobError as exc:
        outcome.error = exc
    finally:
        # A success is committed from the scratch dir (the archive is copied out first);
        # a failure is recorded only once it is gone.
        shutil.rmtree(child.scratch, ignore_errors=True)
    assert outcome.error is not None
    ctx.lifecycle.fail(job_id, outcome.error, resources=resources, attempt=attempt)
    return "finished"


def _succeed(job: JobRecord, scratch: Path, result: dict[str, Any],
             resources: dict[str, Any], ctx: JobContext, *, donor: str | None) -> None:
    """Store the archive and commit the success; once more if a concurrent delete took
    the identical archive between the two."""
    for _ in range(2):
        ref = _collect(scratch, job, ctx)
        try:
            ctx.lifecycle.succeed(job["id"], artifact=ref, timings=result["timings"],
                                  verification=result["verification"],
                                  toolchain=result["toolchain"], profile=result["profile"],
                                  resources=resources, code_reused_from=donor,
                                  attempt=job["attempts"])
            return
        except ArtifactLost:
            continue
    raise JobError(ErrorCode.INTERNAL, "the archive was removed as it was stored; resubmit")


def _hand_over(job: JobRecord, child: SandboxedChild, ctx: JobContext) -> str | None:
    """Put the job's rebuilt upload into the child's scratch dir, and the compiled files
    of an earlier job with the same code key if there is one, and send the spec; returns
    that earlier job's id."""
    settings = ctx.settings
    try:
        ctx.uploads.materialize(job["id"], child.scratch / INPUT_NAME,
                                share=child.may_hardlink_inputs)
    except OSError as exc:
        error = failures.error_for(exc)
        raise JobError(error.code, f"the upload could not be handed to the sandbox: "
                       f"{exc.strerror}") from exc
    except ObjectStoreUnavailable as exc:
        raise JobError(ErrorCode.STORAGE_UNAVAILABLE, "the upload could not be fetched from "
                       f"the object store: {exc.message}") from exc
    donor, compiled = _take_compiled(job, child.scratch, ctx)
    child.send({
        "job_id": job["id"], "model_name": job["model_name"], "backend_id": job["backend_id"],
        "device": job["device"], "options": job["options"], "verify": job["verify"],
        "rtol": job["rtol"], "atol": job["atol"],
        "max_artifact_bytes": settings.max_artifact_bytes, "cpu_s": settings.cpu_limit_s,
        "compiled": compiled,
        "provenance": {"service": "lowering-service", "service_version": __version__,
                       "job_id": job["id"], "input_sha256": job["input_sha256"],
                       "code_key": job["code_key"]},
    })
    return donor


def _take_compiled(job: JobRecord, scratch: Path,
                   ctx: JobContext) -> tuple[str | None, list[str] | None]:
    """(donor job id, file names under scratch/compiled/) from the newest earlier job with
    this job's code key whose archive can give them; (None, None): compile afresh."""
    for donor in ctx.lifecycle.code_donors(job):
        sha = donor["artifact_sha256"]
        if not sha:
            continue
        dest = scratch / COMPILED_DIR
        try:
            with _donor_archive(sha, ctx) as archive:
                names = take_compiled(archive, delegate=f"{job['model_name']}-"
                                      f"{job['backend_id']}", dest=dest,
                                      max_bytes=ctx.settings.max_artifact_bytes)
        except (NotReusable, OSError, ObjectStoreUnavailable) as exc:
            log.warning("job %s: compiled code of job %s not taken: %s", job["id"],
                        donor["id"], exc)
            shutil.rmtree(dest, ignore_errors=True)
            continue
        log.info("job %s: reusing the compiled code of job %s (%d files)", job["id"],
                 donor["id"], len(names))
        return donor["id"], names
    return None, None


@contextlib.contextmanager
def _donor_archive(sha256: str, ctx: JobContext) -> Iterator[Path]:
    """The stored archive as a local file: the file itself, or (an object store) a private
    copy fetched outside the job's scratch dir, so the sandbox never sees the earlier job's
    weights; removed once its compiled files are taken."""
    location = ctx.artifacts.location(sha256)
    if isinstance(location, Path):
        yield location
        return
    with tempfile.TemporaryDirectory(dir=ctx.settings.scratch_dir, prefix="donor-") as held:
        copy = Path(held) / "donor.pt2"
        ctx.artifacts.fetch(sha256, copy)
        yield copy


def _follow(job: JobRecord, child: SandboxedChild, ctx: JobContext,
            stop: threading.Event) -> Outcome:
    """Relay phases until the child says done/failed, dies, overruns or is stopped."""
    settings, lifecycle = ctx.settings, ctx.lifecycle
    started = time.monotonic()
    deadline = started + settings.job_timeout_s
    next_check = started + PROGRESS_CHECK_S
    phase = Phase.LOAD
    while True:
        now = time.monotonic()
        if now >= next_check:
            next_check = now + PROGRESS_CHECK_S
            if not lifecycle.progress(job["id"], attempt=job["attempts"]):
                stop.set()
        if stop.is_set():
            child.kill()
            return Outcome(stopped=True)
        if now >= deadline:
            child.kill()
            raise failures.timed_out(limit_s=settings.job_timeout_s,
                                     setting="LOWERING_JOB_TIMEOUT_S", phase=phase)
        if phase is Phase.LOAD and now >= started + settings.load_timeout_s:
            child.kill()
            raise failures.timed_out(limit_s=settings.load_timeout_s,
                                     setting="LOWERING_LOAD_TIMEOUT_S", phase=phase)
        try:
            event = child.next_event(min(0.5, deadline - now))
        except queue.Empty:
            continue
        if event is None:
            return Outcome()  # died without a word: failures.died says how
        kind = event["event"]
        if kind == "phase" and event.get("phase") in Phase.__members__.values():
            phase = Phase(event["phase"])
            if not lifecycle.progress(job["id"], phase=phase, attempt=job["attempts"]):
                stop.set()
        elif kind == "done":
            return Outcome(result=_checked_result(event.get("result")),
                           resources=_checked_resources(event.get("resources")))
        elif kind == "failed":
            return Outcome(error=_checked_error(event.get("error")),
                           resources=_checked_resources(event.get("resources")))


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
            "toolchain": _bounded(finite(raw.get("toolchain"))),
            "profile": _checked_profile(raw.get("profile")),
            "code_reused": raw.get("code_reused") is True}


def _checked_profile(raw: Any) -> dict[str, Any] | None:
    """Four numbers in plausible ranges, or no profile at all."""
    if not isinstance(raw, dict):
        return None
    times: dict[str, Any] = {key: raw.get(key) for key in ("eager_ms", "compiled_ms", "speedup")}
    runs = raw.get("runs")
    plausible = all(isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v) and 0 <= v < 1e9 for v in times.values())
    if not plausible or not isinstance(runs, int) or isinstance(runs, bool) \
            or not 1 <= runs <= 1000:
        return None
    return {**{k: float(v) for k, v in times.items()}, "runs": runs}


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


def _collect(scratch: Path, job: JobRecord, ctx: JobContext) -> ArtifactRef:
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
    limit = ctx.settings.max_artifact_bytes
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise JobError(ErrorCode.INTERNAL, "the sandbox's archive is not a regular file")
        if info.st_size > limit:
            raise JobError(ErrorCode.STORAGE_FULL, f"the archive is {info.st_size} bytes, over "
                           f"LOWERING_MAX_ARTIFACT_BYTES={limit}")
        _check_archive(handle, job["model_name"], job["backend_id"])
        handle.seek(0)
        try:
            return ctx.artifacts.put_stream(handle)
        except OSError as exc:
            error = failures.error_for(exc)
            raise JobError(error.code, f"the archive could not be stored: {exc.strerror}"
                           ) from exc
        except ObjectStoreUnavailable as exc:  # nothing is stored: S3 puts are atomic
            raise JobError(ErrorCode.STORAGE_UNAVAILABLE, "the archive could not be stored "
                           f"in the object store: {exc.message}") from exc


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
