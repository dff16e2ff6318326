"""The fleet's configuration and routing, in process: no broker, no host (fast tier)."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

from app.executors.celery_app import cuda_queue, make_celery, queues_for, time_limits
from app.executors.celery_executor import CeleryExecutor
from app.settings import Settings
from tests.conftest import ROOT


def _executor(settings: Settings) -> CeleryExecutor:
    ctx: Any = SimpleNamespace(settings=settings, lifecycle=SimpleNamespace(store=None))
    return CeleryExecutor(ctx)


def _host(executor: CeleryExecutor, name: str, queues: list[str], **toolchain: Any) -> None:
    record = {"name": name, "queues": queues, "workers": 2, "jobs_running": 0,
              "toolchain": {"torch_version": "2.13.0", "compiler": "g++ 12",
                            "cpu_isa": "AVX512", "cuda_arch": [], "cuda_devices": 0,
                            **toolchain}}
    executor._hosts[name] = (time.monotonic(), record)
    executor.toolchain = executor._toolchain()


def test_celery_config_follows_the_fleet_rules() -> None:
    settings = Settings(job_timeout_s=600, worker_max_jobs_per_process=7,
                        broker_url="amqp://u:secret@rabbit:5672/v")
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 7
    soft, hard = time_limits(settings)
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (soft, hard)
    assert 600 < soft < hard
    assert conf.result_backend is None and conf.task_ignore_result
    assert conf.broker_heartbeat


def test_queues_by_target() -> None:
    assert queues_for({"cuda_arch": []}) == ["cpu"]
    assert queues_for({"cuda_arch": ["sm_90"]}) == ["cpu", "cuda.sm90", "cuda"]
    assert cuda_queue("sm_80") == "cuda.sm80"
    executor = _executor(Settings())
    assert executor.queue_for("cpu") == "cpu"
    assert executor.queue_for("cuda") == "cuda"  # no GPU host live yet
    _host(executor, "a@x", ["cpu"])
    _host(executor, "g@y", ["cpu", "cuda.sm90", "cuda"], cuda_arch=["sm_90"], cuda_devices=1)
    assert executor.queue_for("cuda:0") == "cuda.sm90"
    assert executor.queue_for("cpu") == "cpu"


def test_info_lists_live_host_classes_and_the_broker_without_its_password() -> None:
    executor = _executor(Settings(broker_url="amqp://u:secret@rabbit:5672/v"))
    assert not executor.ready and executor.toolchain is None
    _host(executor, "a@x", ["cpu"])
    _host(executor, "b@x", ["cpu"])
    _host(executor, "g@y", ["cpu", "cuda.sm90", "cuda"], cuda_arch=["sm_90"], cuda_devices=2)
    info = executor.info()
    assert executor.ready and "secret" not in info["broker"]
    classes = sorted(info["host_classes"], key=lambda c: len(c["hosts"]))
    assert [c["hosts"] for c in classes] == [["g@y"], ["a@x", "b@x"]]
    assert classes[1]["workers"] == 4
    assert executor.toolchain is not None and executor.toolchain["cuda_devices"] == 2
    assert executor.toolchain["cuda_arch"] == []  # the cpu class's (first by name)


def test_fleet_modules_never_import_torch() -> None:
    code = ("import sys; import app.executors.celery_executor, app.executors.celery_worker, "
            "app.cli; from app.main import create_app; from app.settings import Settings; "
            "create_app(Settings(executor='celery')); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
