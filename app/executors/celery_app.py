"""The fleet's Celery app over RabbitMQ: configuration and routing shared by both sides.

The API (``celery_executor.CeleryExecutor``) only publishes task messages and asks the
worker hosts about themselves; worker hosts (``lowering-service worker``, see
``celery_worker``) consume them. There is no result backend: the job database is the
truth, and a message only says "run job X". Nothing here imports torch.

Delivery is at least once: late acks, prefetch 1, a message of a worker process that
died is requeued by RabbitMQ, and ``JobLifecycle.claim`` makes a duplicate a no-op.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.settings import Settings

TASK_NAME = "lowering.run_job"
HOST_COMMAND = "lowering_host"
"""Remote-control command each worker host answers with its record (name, queues,
toolchain, sandbox): how the API learns which host classes are live."""
CPU_QUEUE = "cpu"
CUDA_QUEUE = "cuda"
# What a task may take beyond LOWERING_JOB_TIMEOUT_S (which the supervisor enforces on
# the sandbox itself): waiting for a warm sandbox (up to 300 s), handing the upload
# over, storing the archive. The soft limit is a backstop for a stuck supervisor.
SOFT_LIMIT_MARGIN_S = 420.0
HARD_LIMIT_MARGIN_S = 60.0
BROKER_HEARTBEAT_S = 10


def time_limits(settings: Settings) -> tuple[float, float]:
    """(soft, hard) Celery time limits of one job. RabbitMQ's consumer_timeout must
    exceed the hard one, or the broker closes the channel of a worker on a long job."""
    soft = settings.job_timeout_s + SOFT_LIMIT_MARGIN_S
    return soft, soft + HARD_LIMIT_MARGIN_S


def cuda_queue(arch: str) -> str:
    """``sm_90`` -> ``cuda.sm90``: AOTInductor compiles for the GPU type it runs on."""
    return f"{CUDA_QUEUE}.{arch.replace('_', '')}"


def cpu_queue(isa: str) -> str:
    """``AVX512`` -> ``cpu.avx512``: inductor's CPU kernels use the ISA of the host that
    compiles them (``-march=native`` unless cpp.march says otherwise)."""
    return f"{CPU_QUEUE}.{isa.lower()}"


def queues_for(toolchain: dict[str, Any] | None) -> list[str]:
    """The queues a host with this toolchain can serve: cpu and its ISA's cpu queue, and
    with GPUs one queue per compute capability plus the generic cuda queue. The generic
    queues carry jobs sent while no host of their kind was known (no cache key)."""
    toolchain = toolchain or {}
    queues = [CPU_QUEUE]
    if toolchain.get("cpu_isa"):
        queues.append(cpu_queue(str(toolchain["cpu_isa"])))
    archs = [str(a) for a in toolchain.get("cuda_arch") or []]
    if archs:
        queues += [cuda_queue(a) for a in archs] + [CUDA_QUEUE]
    return queues


def target_queue(device: str, toolchain: dict[str, Any] | None) -> str:
    """The queue of a job for ``device`` whose cache key was computed with ``toolchain``
    (a host class's): only hosts of that class build it, so the key holds. The generic
    queue when the toolchain is unknown."""
    toolchain = toolchain or {}
    if device.startswith("cuda"):
        archs = [str(a) for a in toolchain.get("cuda_arch") or []]
        return cuda_queue(archs[0]) if archs else CUDA_QUEUE
    return cpu_queue(str(toolchain["cpu_isa"])) if toolchain.get("cpu_isa") else CPU_QUEUE


def make_celery(settings: Settings) -> Celery:
    """The Celery app of the fleet; the same configuration on the API and the hosts."""
    soft, hard = time_limits(settings)
    app = Celery("lowering", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # No result backend: the job database says how a job ended.
        result_backend=None,
        task_ignore_result=True,
        # At least once: a message is acked after the job ran, one job per worker process
        # at a time, and a process that died takes its message back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=settings.worker_max_jobs_per_process,
        task_soft_time_limit=soft,
        task_time_limit=hard,
        broker_heartbeat=BROKER_HEARTBEAT_S,
        broker_connection_retry_on_startup=True,
        task_default_queue=CPU_QUEUE,
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        # A lost broker connection does not stop a running compile; the job database
        # fences the old run out if another host took the job over meanwhile.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
