"""A worker host of the fleet: ``lowering-service worker --name host-a``.

The main process checks the sandbox, primes the shared inductor cache (trusted work, as
the local executor does), learns the host's toolchain from a sandbox's warm-up, then
runs a Celery worker (prefork, LOWERING_WORKERS processes) on the queues the host can
serve. It answers the ``lowering_host`` control command with its record, which is how
the API lists live host classes.

Each Celery worker process keeps one sandboxed child warming up (torch imported,
nothing of any job's) and runs each job in a fresh one through ``worker.run_job``, the
same supervisor as the local executor: it claims the job in the database (a duplicate
delivery is a no-op), renews its lease, and stops the child when the job is cancelled
anywhere (its progress check, every 2 s). The sandbox is its own PID namespace
(``SandboxedChild.kill``), so the compile dies on cancel, on the soft time limit and on
SIGTERM (shutdown, the hard time limit), which a Celery task kill alone would not do.
The child's environment is built from scratch: no broker, database or S3 credentials.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from billiard import process as billiard_process
from billiard.pool import EX_RECYCLE
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.control import control_command

from app import metrics, worker
from app.errors import JobError
from app.executors.celery_app import TASK_NAME, make_celery, queues_for, time_limits
from app.jobs import failures
from app.logs import configure as configure_logging
from app.sandbox.cache import publish_cache, toolchain_stamp
from app.sandbox.process import SandboxedChild
from app.sandbox.profile import Sandbox, from_settings
from app.settings import Settings
from app.storage.files import tail_text

log = logging.getLogger("app.executors.celery")
READY_TIMEOUT_S = 300.0
PRIME_TIMEOUT_S = 900.0
SIGTERM_KILL_AFTER_S = 2.0

# The host's record, filled by the main process before the worker starts; forked
# worker processes inherit it. Answered to the lowering_host control command.
HOST: dict[str, Any] = {}


# -- the main process: boot the host, then run the Celery worker ------------------------


class HostUnavailable(Exception):
    """The host cannot run jobs (no sandbox, priming failed): it does not join."""


def boot_host(settings: Settings) -> dict[str, Any]:
    """Check the sandbox, prime the shared cache, probe the toolchain; the host record."""
    settings.ensure_dirs()
    for leftover in settings.scratch_dir.glob(f"celery@{socket.gethostname()}@*"):
        # Sandboxes of this machine's dead worker processes (a crash); a data dir shared
        # with other machines holds theirs under their own hostname.
        match = re.fullmatch(r"celery@.*@([0-9]+)\b.*", leftover.name)
        if match and not _pid_alive(int(match.group(1))):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    sandbox = from_settings(settings)
    status = sandbox.check(settings.scratch_dir / f"sandbox-check-{os.getpid()}")
    if settings.sandbox == "off":
        for line in ("LOWERING_SANDBOX=off: uploaded programs run UNSANDBOXED, with this "
                     "host's files and network in reach.",
                     "Use this only when every upload comes from a trusted source."):
            log.warning("!!! %s", line)
    elif not status.available:
        raise HostUnavailable(f"sandbox unavailable: {status.missing}")
    with contextlib.suppress(OSError):
        settings.inductor_dir.chmod(0o755)
    toolchain: dict[str, Any] | None = None
    primed_s = None
    if settings.prime_workers:
        toolchain, primed_s = _prime(settings, sandbox)
    if toolchain is None:
        toolchain = _probe(settings, sandbox)
    return {"toolchain": toolchain, "primed_s": primed_s, "sandbox": status.as_dict(),
            "limits": sandbox.limits.as_dict(), "workers": settings.workers,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def _prime(settings: Settings, sandbox: Sandbox) -> tuple[dict[str, Any] | None, Any]:
    """The local executor's priming run: our own tiny model, its compiled files published
    to the shared cache; skipped when the cache says it was primed for this toolchain."""
    marker = settings.inductor_dir / f"primed-{toolchain_stamp()}.json"
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(marker.read_text())
            return record.get("toolchain"), record.get("primed_s")
        return None, None
    scratch = settings.scratch_dir / _scratch_name("-prime")
    child = SandboxedChild(sandbox, scratch=scratch, args=["prime"],
                           log_path=settings.logs_dir / "prime.log")
    event = child.expect("primed", PRIME_TIMEOUT_S)
    ended = child.finish()
    if event is None:
        tail = tail_text(child.log_path, 600).strip().splitlines()[-3:]
        raise HostUnavailable(f"priming failed (exit {ended.returncode}): "
                              f"{' | '.join(tail) or 'no output'}")
    publish_cache(scratch / "inductor", settings.inductor_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    toolchain, primed_s = event.get("toolchain"), event.get("primed_s")
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"primed_s": primed_s, "toolchain": toolchain}))
    os.replace(tmp, marker)
    log.info("shared inductor cache primed in %s s", primed_s)
    return toolchain, primed_s


def _probe(settings: Settings, sandbox: Sandbox) -> dict[str, Any]:
    """The toolchain a job's sandbox reports when it warms up."""
    scratch = settings.scratch_dir / _scratch_name("-probe")
    child = SandboxedChild(sandbox, scratch=scratch, args=["job", ""],
                           log_path=settings.scratch_dir / _scratch_name("-probe.log"))
    event = child.expect("ready", READY_TIMEOUT_S)
    ended = child.finish()
    shutil.rmtree(scratch, ignore_errors=True)
    if event is None or not isinstance(event.get("toolchain"), dict):
        tail = tail_text(child.log_path, 600).strip().splitlines()[-2:]
        raise HostUnavailable(f"the sandbox did not warm up (exit {ended.returncode}): "
                              f"{' | '.join(tail)}")
    child.log_path.unlink(missing_ok=True)
    return dict(event["toolchain"])


def main(*, name: str, queues: list[str] | None, metrics_port: int | None = None) -> int:
    """``lowering-service worker``: boot this host and consume its queues until stopped;
    with a metrics port (or LOWERING_METRICS_PORT), serve its processes' /metrics."""
    settings = Settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if "@" in name or not name.strip():
        print("lowering-service worker: --name is a plain name (host-a); the node name "
              "is NAME@<hostname>", file=sys.stderr)
        return 2
    port = metrics_port or settings.metrics_port
    if port is not None:  # before anything is recorded or forked
        try:
            metrics.serve_worker_host(name, host=settings.host, port=port,
                                      process_id=_pool_slot)
        except OSError as exc:
            print(f"lowering-service worker: cannot serve metrics on {settings.host}:{port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        record = boot_host(settings)
    except HostUnavailable as exc:
        print(f"lowering-service worker: cannot start: {exc}", file=sys.stderr)
        return 2
    served = queues or queues_for(record["toolchain"])
    record.update(name=f"{name}@{socket.gethostname()}", queues=served)
    HOST.update(record)
    app = _celery(settings)
    log.info("worker host %s serving %s", record["name"], ",".join(served))
    app.worker_main([
        "worker", f"--hostname={name}@%h", f"--concurrency={settings.workers}",
        "--pool=prefork", f"--queues={','.join(served)}",
        f"--loglevel={settings.log_level.upper()}", "--without-gossip", "--without-mingle",
        f"--max-tasks-per-child={settings.worker_max_jobs_per_process}",
    ])
    return 0


@control_command()
def lowering_host(state: Any) -> dict[str, Any]:
    """This host's record, with the jobs its processes run now."""
    return {**HOST, "name": getattr(state.consumer, "hostname", HOST.get("name")),
            "jobs_running": len(worker_state.active_requests)}


# -- a worker process: one warm sandbox, one job at a time ------------------------------


@dataclass
class _Running:
    job_id: str
    child: SandboxedChild
    started: float
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Process:
    """What one Celery worker process holds between jobs."""

    settings: Settings
    sandbox: Sandbox
    ctx: worker.JobContext | None = None
    warm: SandboxedChild | None = None
    warm_ready: bool = False
    running: _Running | None = None
    terminating: bool = False

    @property
    def scratch(self) -> Path:
        return self.settings.scratch_dir / _scratch_name()

    def spawn(self) -> None:
        """Start the next child warming up now; the next job takes it."""
        if self.warm is not None or self.terminating:
            return
        self.warm = SandboxedChild(
            self.sandbox, scratch=self.scratch,
            log_path=self.settings.scratch_dir / _scratch_name(".log"),
            args=["job", ",".join(self.settings.preload_modules)])
        self.warm_ready = False

    def take(self) -> SandboxedChild | None:
        """A warm child (two tries); None if the sandbox would not warm up."""
        for _ in range(2):
            self.spawn()
            child, ready = self.warm, self.warm_ready
            assert child is not None
            if ready and child.alive():
                self.warm = None
                return child
            if not ready and child.expect("ready", READY_TIMEOUT_S) is not None \
                    and child.alive():
                self.warm = None
                return child
            child.finish()
            self.warm = None
            metrics.record_worker_recycle("died_idle" if ready else "warmup_failed")
            log.error("a sandbox did not warm up: %s",
                      " | ".join(tail_text(child.log_path, 400).strip().splitlines()[-2:]))
        return None

    def keep(self, child: SandboxedChild) -> None:
        """A child a job did not touch (not claimed): it stays the warm one."""
        self.warm, self.warm_ready = child, True

    def context(self, nodename: str) -> worker.JobContext:
        if self.ctx is None:
            self.ctx = _job_context(self.settings, nodename)
        return self.ctx

    def kill_children(self) -> None:
        if self.running is not None:
            self.running.stop.set()
            self.running.child.kill()
        if self.warm is not None:
            self.warm.kill()


_PROCESS: _Process | None = None


def _job_context(settings: Settings, nodename: str) -> worker.JobContext:
    """The stores and lifecycle of this process (opened after the fork: its own pool of
    database connections)."""
    from app.jobs.lifecycle import JobLifecycle
    from app.jobs.store import JobStore
    from app.main import _open_stores
    from app.storage.joblogs import open_log_store

    uploads, artifacts = _open_stores(settings)
    logs = open_log_store(settings)
    lifecycle = JobLifecycle(JobStore(settings.db_url), uploads=uploads, logs=logs,
                             artifacts=artifacts, lease_s=settings.lease_s)
    lifecycle.dispatch = _redispatch
    return worker.JobContext(settings, lifecycle, uploads, logs, artifacts, worker=nodename)


def _redispatch(job_id: str) -> None:
    """The lifecycle's dispatch on a worker host (a job put back in the queue): to the
    queue the running task came from."""
    app = _celery()
    info = getattr(app.tasks[TASK_NAME].request, "delivery_info", None) or {}
    app.send_task(TASK_NAME, args=[job_id], queue=info.get("routing_key") or None)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Shutdown or the hard time limit: the sandbox dies now. Idle, this process ends as
    billiard would have it; running, the job's supervisor returns within half a second
    and the task puts the job back (or fails it, past the soft limit) before the process
    exits."""
    state = _PROCESS
    if state is not None:
        state.terminating = True
        running = state.running
        if running is not None:
            # The supervisor kills the child when it sees ``stop`` (within 0.5 s): killed
            # from here, the child's silence could be read as its crash first.
            running.stop.set()
            killer = threading.Timer(SIGTERM_KILL_AFTER_S, running.child.kill)
            killer.daemon = True
            killer.start()
            if state.warm is not None:
                state.warm.kill()
            return
        state.kill_children()
    _exit_as_terminated(signum, frame)


_BILLIARD_TERM: Any = None


def _exit_as_terminated(signum: int, frame: Any) -> None:
    previous = _BILLIARD_TERM
    if callable(previous):
        previous(signum, frame)  # billiard's: reports the death, exits
    os._exit(0)


def _take_sigterm() -> None:
    """Handle SIGTERM here. Billiard sets its own after ``worker_process_init`` (it exits
    at once, which would leave the job running in the database until its lease runs
    out), so this runs when a task starts."""
    global _BILLIARD_TERM
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _BILLIARD_TERM = current
        signal.signal(signal.SIGTERM, _on_sigterm)


@signals.worker_process_init.connect
def _process_init(**_: Any) -> None:
    global _PROCESS
    settings = Settings()
    _PROCESS = _Process(settings, from_settings(settings))
    atexit.register(_process_exit)
    _PROCESS.spawn()


@signals.worker_process_shutdown.connect
def _process_shutdown(exitcode: Any = None, **_: Any) -> None:
    if exitcode == EX_RECYCLE:  # its LOWERING_WORKER_MAX_JOBS_PER_PROCESS jobs are done
        metrics.record_worker_recycle("max_jobs_per_process")
    _process_exit()


def _process_exit() -> None:
    """A recycled or stopping process leaves no sandbox behind."""
    state = _PROCESS
    if state is None:
        return
    state.terminating = True
    state.kill_children()
    if state.warm is not None:
        state.warm.finish()
        state.warm = None
    shutil.rmtree(state.scratch, ignore_errors=True)


def _run(task: Task, job_id: str) -> str:
    state = _PROCESS
    if state is None:  # not a prefork worker process (e.g. a solo pool): set up here
        _process_init()
        state = _PROCESS
    assert state is not None
    _take_sigterm()
    nodename = str(task.request.hostname or HOST.get("name") or "unknown")
    ctx = state.context(nodename)
    child = state.take()
    if child is None:
        # Left queued in the database: another try in a while (this host or another).
        raise task.retry(countdown=30, max_retries=10)
    running = _Running(job_id, child, time.monotonic())
    state.running = running
    ran: str = "finished"
    try:
        ran = worker.run_job(job_id, child, ctx, stop=running.stop)
    except SoftTimeLimitExceeded:
        child.finish()
        soft, _ = time_limits(state.settings)
        log.error("job %s: the task's soft time limit (%g s) passed", job_id, soft)
        with contextlib.suppress(Exception):
            if (attempt := _own_attempt(ctx, job_id, child)) is not None:
                ctx.lifecycle.fail(job_id, failures.timed_out(
                    limit_s=soft, setting="LOWERING_JOB_TIMEOUT_S", phase=None),
                    attempt=attempt)
    except Exception as exc:  # one job never takes the process down
        log.exception("supervising job %s failed", job_id)
        child.finish()
        code = failures.error_for(exc).code
        with contextlib.suppress(Exception):
            if (attempt := _own_attempt(ctx, job_id, child)) is not None:
                ctx.lifecycle.fail(job_id, JobError(
                    code, f"the job's supervisor failed ({type(exc).__name__})"),
                    attempt=attempt)
    finally:
        state.running = None
    if ran == "not_claimed":
        state.keep(child)  # a duplicate delivery, or a job cancelled while queued
    elif not state.terminating:
        metrics.record_worker_recycle("after_job")  # the next job gets a fresh sandbox
    if state.terminating:
        _after_sigterm(job_id, ran, running, ctx)
    else:
        state.spawn()
    return ran


def _after_sigterm(job_id: str, ran: str, running: _Running, ctx: worker.JobContext) -> None:
    """The job was stopped by SIGTERM: past the soft limit it was the hard time limit (it
    fails); otherwise a shutdown: it goes back to the queue, not counted, and runs on
    another process or host. Then this process ends as SIGTERM asked."""
    if ran == "stopped":
        soft, _ = time_limits(ctx.settings)
        with contextlib.suppress(Exception):
            attempt = _own_attempt(ctx, job_id, running.child)
            if attempt is None:
                pass  # ended, or taken over by another host after its lease ran out
            elif time.monotonic() - running.started >= soft:
                ctx.lifecycle.fail(job_id, failures.timed_out(
                    limit_s=soft, setting="LOWERING_JOB_TIMEOUT_S", phase=None),
                    attempt=attempt)
            elif ctx.lifecycle.requeue(job_id, attempt=attempt):
                _redispatch(job_id)
    _process_exit()
    os._exit(0)


def _own_attempt(ctx: worker.JobContext, job_id: str, child: SandboxedChild) -> int | None:
    """The attempt of the job's run while this process's sandbox still holds it: every
    status this process writes after a failure is fenced by it. None when the job ended or
    another worker took it over (its lease ran out while this one was stuck)."""
    job = ctx.lifecycle.store.get(job_id)
    if (job is None or job["status"] != "running" or job["worker"] != ctx.worker
            or job["worker_pid"] != child.pid):
        return None
    return int(job["attempts"])


_APP: Any = None


def _celery(settings: Settings | None = None) -> Any:
    """This host's Celery app, with the job task registered (one per process)."""
    global _APP
    if _APP is None:
        _APP = make_celery(settings or Settings())
        _APP.task(name=TASK_NAME, bind=True)(_task_body)
    return _APP


def _task_body(task: Task, job_id: str) -> str:
    return _run(task, job_id)


def _scratch_name(suffix: str = "") -> str:
    """Scratch dirs and logs of this process's sandboxes, unique on a shared data dir."""
    return f"celery@{socket.gethostname()}@{os.getpid()}{suffix}"


def _pool_slot() -> str:
    """Whose files a process writes in the host's metrics directory: a prefork process
    its pool slot's (the process that replaces it continues its counts), any other its
    own pid's."""
    index = getattr(billiard_process.current_process(), "index", None)
    return f"slot{index}" if index is not None else f"pid{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    return bool(psutil.pid_exists(pid))
