"""The API's side of the fleet (LOWERING_EXECUTOR=celery): publish jobs, watch hosts.

``submit`` publishes "run job X" to the queue of the job's target (cpu, or the compute
capability queue of a live GPU host). Nothing runs here. Every few seconds the
executor asks the worker hosts for their records (a Celery remote-control broadcast,
``lowering_host``): the live host classes make ``/v1/info``, readiness and the
toolchain the cache key is computed with. A cancel needs nothing from here: the job's
supervisor on whichever host runs it sees the status at its next progress check (2 s)
and kills the sandbox. A daemon thread runs the lifecycle's lease reaper: a job whose
host died silently is dispatched again once its lease expired.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from app.constants import JobStatus, Phase
from app.executors.celery_app import (
    HOST_COMMAND,
    TASK_NAME,
    make_celery,
    target_queue,
    time_limits,
)
from app.jobs.store import JobRecord
from app.worker import JobContext

log = logging.getLogger("app.executors.celery")
HOST_POLL_S = 5.0
HOST_REPLY_S = 1.0
HOST_LIVE_S = 20.0
"""A host that has not answered for this long is no longer listed."""
TOOLCHAIN_KEYS = ("torch_version", "compiler", "cpu_isa", "cuda_arch")


class CeleryExecutor:
    """Sends jobs to worker hosts over RabbitMQ; the same protocol as the local one."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.lifecycle = ctx.lifecycle
        self.app = make_celery(ctx.settings)
        self.toolchain: dict[str, Any] | None = None
        self.probe_error: str | None = None
        self.runs_jobs_here = False  # worker hosts hold leases on the jobs they run
        self._hosts: dict[str, tuple[float, dict[str, Any]]] = {}
        self._unsent: set[str] = set()
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._polled = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="fleet-hosts", daemon=True).start()
        if callable(getattr(self.lifecycle, "reap", None)):
            threading.Thread(target=self._reap, name="fleet-reaper", daemon=True).start()
        else:
            log.warning("this job lifecycle has no lease reaper: a job on a host that died "
                        "silently stays running")

    # -- hosts --------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                self.poll_hosts()
            except Exception as exc:  # the broker is down: hosts age out, nothing else
                log.warning("cannot ask the worker hosts: %s", exc)
            self._polled.set()
            try:
                self.mark_unserved()
            except Exception as exc:
                log.warning("cannot mark the jobs no host serves: %s", exc)
            self._closing.wait(HOST_POLL_S)

    def poll_hosts(self) -> None:
        replies = self.app.control.broadcast(HOST_COMMAND, reply=True, timeout=HOST_REPLY_S)
        now = time.monotonic()
        with self._lock:
            for reply in replies or []:
                for node, record in reply.items():
                    if isinstance(record, dict) and isinstance(record.get("queues"), list):
                        self._hosts[node] = (now, {**record, "name": node})
            for node, (seen, _) in list(self._hosts.items()):
                if now - seen > HOST_LIVE_S:
                    log.warning("worker host %s stopped answering", node)
                    del self._hosts[node]
            self.toolchain = self._toolchain()

    def live_hosts(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [{**record, "seen_s_ago": round(now - seen, 1)}
                    for _, (seen, record) in sorted(self._hosts.items())]

    def _toolchain(self) -> dict[str, Any] | None:
        """The toolchain of the cpu host class jobs go to, with the GPUs any live host
        has (``/v1/info``); None while no host answered."""
        toolchain = self.toolchain_for("cpu")
        if toolchain is None:
            return None
        with self._lock:
            gpus = [int((r.get("toolchain") or {}).get("cuda_devices") or 0)
                    for _, r in self._hosts.values()]
        return {**toolchain, "cuda_devices": max(gpus, default=0)}

    def toolchain_for(self, device: str) -> dict[str, Any] | None:
        """The toolchain of the host class that will build a job for ``device``: the one
        its cache key is computed with and whose queue it is sent to. Of several classes
        (CPU hosts of two ISA levels), the one with the most workers (then by queue name);
        None while no live host serves the device."""
        cuda = device.startswith("cuda")
        capacity: dict[str, int] = {}
        first: dict[str, dict[str, Any]] = {}
        with self._lock:
            records = [record for _, record in self._hosts.values()]
        for record in sorted(records, key=lambda record: record["name"]):
            toolchain = record.get("toolchain")
            if not isinstance(toolchain, dict) or (cuda and not toolchain.get("cuda_arch")):
                continue
            queue = target_queue(device, toolchain)
            if queue not in record["queues"]:
                continue  # a host started with --queues that leave this target out
            capacity[queue] = capacity.get(queue, 0) + int(record.get("workers") or 1)
            first.setdefault(queue, toolchain)
        if not capacity:
            return None
        best = min(capacity, key=lambda queue: (-capacity[queue], queue))
        return dict(first[best])

    def serves(self, queue: str) -> bool:
        """A live host consumes ``queue``."""
        with self._lock:
            return any(queue in record["queues"] for _, record in self._hosts.values())

    def host_classes(self) -> list[dict[str, Any]]:
        """Live hosts grouped by what they serve and build with."""
        classes: dict[str, dict[str, Any]] = {}
        for host in self.live_hosts():
            toolchain = host.get("toolchain") or {}
            facts = {key: toolchain.get(key) for key in TOOLCHAIN_KEYS}
            key = repr((sorted(host["queues"]), sorted(facts.items(), key=str)))
            entry = classes.setdefault(key, {"queues": host["queues"], "toolchain": facts,
                                             "hosts": [], "workers": 0, "jobs_running": 0})
            entry["hosts"].append(host["name"])
            entry["workers"] += int(host.get("workers") or 0)
            entry["jobs_running"] += int(host.get("jobs_running") or 0)
        return list(classes.values())

    @staticmethod
    def queue_for(job: JobRecord) -> str:
        """The queue of the host class the job was keyed for (its ``toolchain`` at
        admission), or the generic queue of its device when none was known."""
        return target_queue(job["device"], job["toolchain"])

    def mark_unserved(self) -> None:
        """Queued jobs whose queue no live host consumes say so in their phase
        (``waiting_for_host``), and stop saying it once one does."""
        store = self.lifecycle.store
        for job in store.list_page(status=JobStatus.QUEUED.value, limit=500):
            if job["parent_id"] is None:
                self._note_served(job)

    def _note_served(self, job: JobRecord) -> None:
        phase = None if self.serves(self.queue_for(job)) else Phase.WAITING_FOR_HOST.value
        if job["phase"] != phase:
            self.lifecycle.store.transition(job["id"], from_=[JobStatus.QUEUED],
                                            to=JobStatus.QUEUED, phase=phase)

    # -- the Executor protocol ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.live_hosts())  # a sandboxed worker host answered lately

    @property
    def unavailable(self) -> str | None:
        return None  # a worker host may join at any time; jobs wait in the queue

    def submit(self, job_id: str) -> None:
        job = self.lifecycle.store.get(job_id)
        if job is None:
            return
        try:
            self._publish(job)
        except Exception as exc:  # kept queued in the database; sent again by the reaper
            log.error("job %s: cannot publish to the broker (%s); trying again", job_id, exc)
            with self._lock:
                self._unsent.add(job_id)

    def _publish(self, job: JobRecord) -> None:
        self.app.send_task(TASK_NAME, args=[job["id"]], queue=self.queue_for(job))
        if self._polled.is_set():
            self._note_served(job)

    def cancel(self, job_id: str) -> bool:
        # The database says cancelled; the host running it stops within PROGRESS_CHECK_S.
        return False

    def job_finished(self, job: JobRecord) -> None:
        """Nothing to do here: hosts read the cancel from the job database."""

    def _reap(self) -> None:
        reap = self.lifecycle.reap  # type: ignore[attr-defined]
        period = max(1.0, self.lifecycle.lease_s / 3)
        while not self._closing.wait(period):
            with contextlib.suppress(Exception):
                with self._lock:
                    unsent, self._unsent = self._unsent, set()
                for job_id in unsent:
                    self.submit(job_id)
            try:
                taken = reap()
                if taken:
                    log.warning("%d job(s) whose host stopped renewing their lease were "
                                "dispatched again", taken)
            except Exception:
                log.exception("the lease reaper failed; trying again")

    def info(self) -> dict[str, Any]:
        hosts = self.live_hosts()
        soft, hard = time_limits(self.settings)
        sandboxes = [h.get("sandbox") or {} for h in hosts]
        errors = [] if hosts else [{"state": "waiting", "error": "no live worker host (start "
                                    "one: lowering-service worker --name NAME)"
                                    if self._polled.is_set() else None}]
        return {
            "kind": "celery",
            "broker": maybe_sanitize_url(self.settings.broker_url),
            "ready": self.ready,
            "host_classes": self.host_classes(),
            "hosts": [{key: h.get(key) for key in ("name", "queues", "workers",
                                                   "jobs_running", "started_at",
                                                   "seen_s_ago", "primed_s")}
                      for h in hosts],
            "jobs_waiting_to_publish": len(self._unsent),
            "time_limits_s": {"soft": soft, "hard": hard},
            "slots": errors,
            # Every live host runs jobs sandboxed (a host without a sandbox does not join).
            "sandbox": sandboxes[0] if sandboxes else None,
            "limits": hosts[0].get("limits") if hosts else None,
        }

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(Exception):
            self.app.close()
