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

from app import worker
from app.constants import ErrorCode, JobStatus
from app.jobs.cache import settle_children
from app.jobs.store import JobStore
from app.sandbox.cache import publish_cache, toolchain_stamp
from app.sandbox.process import SandboxedChild
from app.sandbox.profile import SandboxStatus, from_settings
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

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

    :param settings: service settings.
    :param store: the job store; supervisors claim and finish jobs in it.
    :param artifacts: where verified archives are copied.
    """

    def __init__(self, settings: Settings, store: JobStore, artifacts: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.sandbox = from_settings(settings)
        self.sandbox_status: SandboxStatus | None = None
        self.toolchain: dict[str, Any] | None = None
        self.probe_error: str | None = None
        self.primed_s: float | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._running: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._booted = threading.Event()

    # -- start-up ---------------------------------------------------------------------

    def start(self) -> None:
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
            tail = worker.read_log_tail(child.log_path, 600).strip().splitlines()[-3:]
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
            tail = worker.read_log_tail(child.log_path, 600).strip().splitlines()[-2:]
            slot.state = "failing"
            slot.error = f"sandbox did not warm up (exit {ended.returncode}): {' | '.join(tail)}"
            log.error("slot %d: %s", slot.index, slot.error)
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
                        return None
                    continue
            if job_id is None or self._closing.is_set():
                child.finish()
                return None
            if not child.alive():
                child.finish()
                return job_id
            if self._run(slot, child, job_id):
                return None

    def _run(self, slot: _Slot, child: SandboxedChild, job_id: str) -> bool:
        """Claim and run ``job_id``; False if it was not ours to run (child kept warm)."""
        job = self.store.get(job_id)
        if job is None:
            return False
        slot.cancel = threading.Event()
        with self._lock:
            self._running[job_id] = slot
        try:
            claimed = self.store.transition(job_id, from_=[JobStatus.QUEUED],
                                            to=JobStatus.RUNNING, phase="load",
                                            worker_pid=child.pid, attempts=job["attempts"] + 1)
            if not claimed:  # cancelled or deleted while it waited
                return False
            slot.state, slot.job_id = "running", job_id
            try:
                worker.run_job({**job, "attempts": job["attempts"] + 1}, child,
                               settings=self.settings, store=self.store,
                               artifacts=self.artifacts, cancelled=slot.cancel)
            except Exception as exc:  # never let one job take the slot down
                log.exception("supervising job %s failed", job_id)
                child.finish()
                self._fail(job_id, ErrorCode.INTERNAL, f"the supervisor failed: "
                           f"{type(exc).__name__}", {})
            if self._closing.is_set():
                self._requeue_unfinished(job_id, attempts=job["attempts"])
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        if not self._closing.is_set():
            self.settle(job_id)
        return True

    def _requeue_unfinished(self, job_id: str, *, attempts: int) -> None:
        """A graceful stop interrupted this job: it runs again after the restart, and
        the interruption is not counted against it."""
        self.store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.QUEUED,
                              attempts=attempts, started_at=None, phase=None, worker_pid=None)

    def _fail(self, job_id: str, code: ErrorCode, message: str, detail: dict[str, Any]) -> None:
        try:
            self.store.transition(job_id, from_=[JobStatus.RUNNING], to=JobStatus.FAILED,
                                  error={"code": code.value, "message": message,
                                         "detail": detail})
        except Exception:
            log.exception("could not record the failure of job %s", job_id)

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
                running = set(self.store.ids_with_status(statuses=[JobStatus.RUNNING]))
            except Exception:
                log.exception("sweep: cannot read running jobs")
                continue
            with self._lock:
                orphans = running - set(self._running)
            for job_id in orphans & suspects:
                log.error("job %s is marked running but no supervisor runs it", job_id)
                self._fail(job_id, ErrorCode.INTERRUPTED, "the job's supervisor lost track "
                           "of it (its final status could not be written); resubmit it", {})
                self.settle(job_id)
            suspects = orphans

    # -- the Executor protocol ----------------------------------------------------------

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

    def settle(self, job_id: str) -> None:
        """Finish the identical jobs that waited on ``job_id``; submit a new leader."""
        try:
            successor = settle_children(self.store, job_id)
        except Exception:  # bookkeeping must not kill a slot thread
            log.exception("settling the followers of %s failed", job_id)
            return
        if successor is not None:
            self.submit(successor)

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

