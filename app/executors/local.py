"""Local executor: one supervisor thread per worker slot, one fresh sandbox per job.

Each slot keeps one sandboxed child warm (torch imported, caches mirrored, ISA picked:
nothing of any job's) and hands it the next job; after the job the child is killed
with its whole PID namespace and a new one warms up. No process that ran job A's
code ever runs job B's, a dead idle child is simply replaced, and there is no pool
that can break. At start a trusted priming run fills the shared inductor cache that
jobs read but cannot write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any

from app import metrics, worker
from app.constants import JobStatus
from app.errors import JobError
from app.jobs import failures
from app.jobs.store import JobRecord
from app.sandbox.cache import publish_cache, toolchain_stamp
from app.sandbox.process import SandboxedChild
from app.sandbox.profile import SandboxStatus, from_settings
from app.storage.files import tail_text

log = logging.getLogger("app.executors")
READY_TIMEOUT_S = 300.0
PRIME_TIMEOUT_S = 900.0
SWEEP_INTERVAL_S = 10.0
IDLE_CHECK_S = 1.0


@dataclass
class _Slot:
    index: int
    state: str = "starting"  # starting | warming | ready | running | failing
    job_id: str | None = None
    child_pid: int | None = None
    warm_s: float | None = None
    error: str | None = None
    thread: threading.Thread | None = None
    child: SandboxedChild | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class LocalExecutor:
    """Runs jobs on this host, each in a fresh sandboxed child.

    It is also a lifecycle listener: a cancel recorded anywhere stops the job's child
    here at once (the supervisor would see it at its next progress check anyway).

    :param ctx: settings, the job lifecycle and the stores the supervisors use.
    """

    def __init__(self, ctx: worker.JobContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.settings = settings
        self.lifecycle = ctx.lifecycle
        self.sandbox = from_settings(settings)
        self.sandbox_status: SandboxStatus | None = None
        self.toolchain: dict[str, Any] | None = None
        self.probe_error: str | None = None
        self.runs_jobs_here = True
        self.primed_s: float | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._running: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._booted = threading.Event()

    # -- start-up ---------------------------------------------------------------------

    def start(self) -> None:
        # No job runs yet: scratch dirs here are left over from a crash.
        for leftover in self.settings.scratch_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        threading.Thread(target=self._boot, name="executor-boot", daemon=True).start()
        threading.Thread(target=self._sweep, name="executor-sweep", daemon=True).start()

    def _boot(self) -> None:
        status = self.sandbox.check(self.settings.scratch_dir / "sandbox-check")
        self.sandbox_status = status
        if self.settings.sandbox == "off":
            for line in ("LOWERING_SANDBOX=off: uploaded programs run UNSANDBOXED, with this "
                         "service's files and network in reach.",
                         "Use this only when every upload comes from a trusted source."):
                log.warning("!!! %s", line)
        elif not status.available:
            self.probe_error = f"sandbox unavailable: {status.missing}"
            log.error("no job will run: %s", self.probe_error)
            return
        # The sandbox user reads the shared cache as "other": a 0700 dir (a restrictive
        # umask, a tmp dir) would leave every job to rebuild headers and probes alone.
        with contextlib.suppress(OSError):
            self.settings.inductor_dir.chmod(0o755)
        if self.settings.prime_workers and not self._prime():
            return
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._slot_loop, args=(slot,),
                                           name=f"slot-{slot.index}", daemon=True)
            slot.thread.start()
        self._booted.set()

    def _prime(self) -> bool:
        """Trusted work only: lower our own tiny model, then publish what it compiled.

        Skipped when the shared cache already says it was primed for this toolchain
        (torch, compiler, service version): a restart does not pay for it again.
        """
        marker = self.settings.inductor_dir / f"primed-{toolchain_stamp()}.json"
        if marker.is_file():
            log.info("shared inductor cache already primed (%s)", marker.name)
            with contextlib.suppress(OSError, ValueError):
                self.primed_s = json.loads(marker.read_text()).get("primed_s")
            return True
        scratch = self.settings.scratch_dir / "prime"
        child = SandboxedChild(self.sandbox, scratch=scratch, args=["prime"],
                               log_path=self.settings.logs_dir / "prime.log")
        event = child.expect("primed", PRIME_TIMEOUT_S)
        ended = child.finish()
        if event is None:
            tail = tail_text(child.log_path, 600).strip().splitlines()[-3:]
            self.probe_error = (f"priming failed (exit {ended.returncode}): "
                                f"{' | '.join(tail) or 'no output'}")
            log.error("%s; see %s", self.probe_error, child.log_path)
            return False
        published = publish_cache(scratch / "inductor", self.settings.inductor_dir)
        shutil.rmtree(scratch, ignore_errors=True)
        self.primed_s = event.get("primed_s")
        self.toolchain = event.get("toolchain")
        log.info("shared inductor cache primed in %s s (%d new files)", self.primed_s,
                 published)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"primed_s": self.primed_s, "toolchain": self.toolchain}))
        os.replace(tmp, marker)
        return True

    # -- the slots ----------------------------------------------------------------------

    def _warm_child(self, slot: _Slot) -> SandboxedChild | None:
        slot.state, slot.job_id, slot.error = "warming", None, None
        scratch = self.settings.scratch_dir / f"slot-{slot.index}"
        child = SandboxedChild(self.sandbox, scratch=scratch,
                               log_path=self.settings.scratch_dir / f"slot-{slot.index}.log",
                               args=["job", ",".join(self.settings.preload_modules)])
        slot.child, slot.child_pid = child, child.pid
        event = child.expect("ready", READY_TIMEOUT_S)
        if event is None:
            ended = child.finish()
            tail = tail_text(child.log_path, 600).strip().splitlines()[-2:]
            slot.state = "failing"
            slot.error = f"sandbox did not warm up (exit {ended.returncode}): {' | '.join(tail)}"
            log.error("slot %d: %s", slot.index, slot.error)
            metrics.record_worker_recycle("warmup_failed")
            return None
        slot.warm_s = event.get("warm_s")
        if self.toolchain is None:
            self.toolchain = event.get("toolchain")
        slot.state = "ready"
        return child

    def _slot_loop(self, slot: _Slot) -> None:
        failures = 0
        held: str | None = None  # a job taken just as its child turned out dead
        while not self._closing.is_set():
            try:
                child = self._warm_child(slot)
                if child is not None:
                    failures = 0
                    held = self._serve_one(slot, child, held)
                    continue
            except Exception as exc:  # e.g. bwrap vanished: keep the slot, say why
                log.exception("slot %d failed", slot.index)
                slot.state, slot.error = "failing", f"{type(exc).__name__}: {exc}"
            failures += 1
            self._closing.wait(min(60.0, 2.0 ** failures))

    def _serve_one(self, slot: _Slot, child: SandboxedChild, held: str | None) -> str | None:
        """Wait for a job this warm child can take, run it, and let the child go.

        Returns a job that was taken while the child had died idle (not yet noticed):
        it goes to the next child of this slot instead of failing.
        """
        while True:
            if held is not None:
                job_id: str | None = held
                held = None
            else:
                try:
                    job_id = self._queue.get(timeout=IDLE_CHECK_S)
                except queue.Empty:
                    if self._closing.is_set() or not child.alive():
                        child.finish()  # died idle (OOM killer, kill -9): warm a new one
                        if not self._closing.is_set():
                            metrics.record_worker_recycle("died_idle")
                        return None
                    continue
            if job_id is None or self._closing.is_set():
                child.finish()
                return None
            if not child.alive():
                child.finish()
                metrics.record_worker_recycle("died_idle")
                return job_id
            if self._run(slot, child, job_id):
                if not self._closing.is_set():  # a fresh sandbox for the next job
                    metrics.record_worker_recycle("after_job")
                return None

    def _run(self, slot: _Slot, child: SandboxedChild, job_id: str) -> bool:
        """Run ``job_id`` in ``child``; False if it was not ours to run (child kept warm)."""
        slot.cancel = threading.Event()
        with self._lock:
            self._running[job_id] = slot
        try:
            slot.state, slot.job_id = "running", job_id
            try:
                ran = worker.run_job(job_id, child, self.ctx, stop=slot.cancel)
            except Exception as exc:  # never let one job take the slot down
                log.exception("supervising job %s failed", job_id)
                child.finish()
                code = failures.error_for(exc).code  # a full disk is still named so
                with contextlib.suppress(Exception):  # else the sweep fails it later
                    self.lifecycle.fail(job_id, JobError(
                        code, f"the job's supervisor failed ({type(exc).__name__})"))
                ran = "finished"
            if ran == "not_claimed":
                slot.state, slot.job_id = "ready", None
                return False
            if ran == "stopped" and self._closing.is_set():
                self.lifecycle.requeue(job_id)
            return True
        finally:
            with self._lock:
                self._running.pop(job_id, None)

    def _sweep(self) -> None:
        """Every job marked running that no slot runs reaches a final state.

        A job is only failed when seen orphaned twice in a row, so a slot between its
        claim and its registration is never mistaken for a lost one.
        """
        suspects: set[str] = set()
        while not self._closing.wait(SWEEP_INTERVAL_S):
            if not self._booted.is_set():
                continue
            try:
                running = set(self.lifecycle.store.ids_with_status(statuses=[JobStatus.RUNNING]))
            except Exception:
                log.exception("sweep: cannot read running jobs")
                continue
            with self._lock:
                orphans = running - set(self._running)
            for job_id in orphans & suspects:
                log.error("job %s is marked running but no supervisor runs it", job_id)
                with contextlib.suppress(Exception):  # tried again at the next sweep
                    self.lifecycle.lost(job_id, "the job's supervisor lost track of it (its "
                                        "final status could not be written); resubmit it")
            suspects = orphans

    # -- the Executor protocol ----------------------------------------------------------

    def toolchain_for(self, device: str) -> dict[str, Any] | None:
        return self.toolchain  # every job runs on this host

    @property
    def ready(self) -> bool:
        """A job submitted now will run: every slot alive, one not failing, and a sandbox
        has warmed up here before. A slot warming its next child after a job is normal
        (the job waits seconds), so readiness does not flap with every job."""
        alive = all(s.thread is not None and s.thread.is_alive() for s in self._slots)
        serving = any(s.state in ("warming", "ready", "running") for s in self._slots)
        return self._booted.is_set() and alive and serving and self.toolchain is not None

    @property
    def unavailable(self) -> str | None:
        """Why no job can run at all (sandbox missing, priming failed), else None."""
        return self.probe_error

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            slot = self._running.get(job_id)
        if slot is None:
            return False  # still queued: the slot that dequeues it will not claim it
        slot.cancel.set()
        return True

    def job_finished(self, job: JobRecord) -> None:
        """Lifecycle listener: a job cancelled while it runs here stops now."""
        if job["status"] == JobStatus.CANCELLED.value:
            self.cancel(job["id"])

    def info(self) -> dict[str, Any]:
        with self._lock:
            running = len(self._running)
        return {
            "kind": "local",
            "workers": self.settings.workers,
            "ready": self.ready,
            "jobs_running": running,
            "jobs_waiting_for_a_slot": self._queue.qsize(),
            "primed_s": self.primed_s,
            "slots": [{"state": s.state, "job_id": s.job_id, "pid": s.child_pid,
                       "warm_s": s.warm_s, "error": s.error} for s in self._slots],
            "sandbox": self.sandbox_status.as_dict() if self.sandbox_status else None,
            "limits": self.sandbox.limits.as_dict(),
        }

    def close(self) -> None:
        """Stop: running jobs are put back in the queue for the next start."""
        self._closing.set()
        with self._lock:
            slots = list(self._running.values())
        for slot in slots:
            slot.cancel.set()
        for _ in self._slots:
            self._queue.put(None)
        for slot in self._slots:  # a child still warming up is not waited for
            if slot.child is not None and slot.state == "warming":
                slot.child.kill()
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(timeout=30)

