"""The fleet's configuration and routing, in process: no broker, no host (fast tier)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.constants import JobStatus
from app.executors.celery_app import (
    cuda_queue,
    make_celery,
    queues_for,
    target_queue,
    time_limits,
)
from app.executors.celery_executor import CeleryExecutor
from app.jobs import migrate
from app.jobs.store import JobStore
from app.settings import Settings
from tests.conftest import ROOT
from tests.unit.test_lifecycle import PARAMS


def _executor(settings: Settings) -> CeleryExecutor:
    ctx: Any = SimpleNamespace(settings=settings, lifecycle=SimpleNamespace(store=None))
    return CeleryExecutor(ctx)


def _host(executor: CeleryExecutor, name: str, queues: list[str], *, workers: int = 2,
          **toolchain: Any) -> None:
    record = {"name": name, "queues": queues, "workers": workers, "jobs_running": 0,
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
    assert queues_for({"cpu_isa": "AVX512", "cuda_arch": []}) == ["cpu", "cpu.avx512"]
    assert queues_for({"cpu_isa": "AVX2", "cuda_arch": ["sm_90"]}) == [
        "cpu", "cpu.avx2", "cuda.sm90", "cuda"]
    assert queues_for(None) == ["cpu"]
    assert cuda_queue("sm_80") == "cuda.sm80"
    assert target_queue("cpu", None) == "cpu" and target_queue("cuda:1", None) == "cuda"
    assert target_queue("cpu", {"cpu_isa": "AVX2", "cuda_arch": ["sm_90"]}) == "cpu.avx2"
    assert target_queue("cuda:0", {"cpu_isa": "AVX2", "cuda_arch": ["sm_90"]}) == "cuda.sm90"


def test_a_job_is_keyed_and_sent_for_one_host_class() -> None:
    executor = _executor(Settings())
    assert executor.toolchain_for("cpu") is None and executor.toolchain_for("cuda") is None
    _host(executor, "a@x", ["cpu", "cpu.avx2"], cpu_isa="AVX2")
    _host(executor, "b@x", ["cpu", "cpu.avx512"], workers=1)
    _host(executor, "g@y", ["cpu", "cpu.avx512", "cuda.sm90", "cuda"], cuda_arch=["sm_90"],
          cuda_devices=1, workers=1)
    # Two cpu classes: avx512 has 2 workers on two hosts, avx2 has 2 on one: a tie goes by
    # queue name; one more avx512 worker decides it.
    assert executor.toolchain_for("cpu")["cpu_isa"] == "AVX2"  # type: ignore[index]
    _host(executor, "c@x", ["cpu", "cpu.avx512"], workers=1)
    cpu = executor.toolchain_for("cpu")
    assert cpu is not None and cpu["cpu_isa"] == "AVX512"
    gpu = executor.toolchain_for("cuda:0")
    assert gpu is not None and gpu["cuda_arch"] == ["sm_90"]
    job: Any = {"device": "cuda:0", "toolchain": gpu}
    assert executor.queue_for(job) == "cuda.sm90"
    assert executor.queue_for({**job, "device": "cpu", "toolchain": cpu}) == "cpu.avx512"
    # A host started with --queues that leave its ISA queue out does not build for it.
    only = _executor(Settings())
    _host(only, "a@x", ["cpu"])
    assert only.toolchain_for("cpu") is None


def test_a_job_no_live_host_serves_says_so_in_its_phase(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    store = JobStore(url)
    try:
        executor = _executor(Settings())
        executor.lifecycle = SimpleNamespace(store=store)  # type: ignore[assignment]
        gpu = {"torch_version": "2.13.0", "cpu_isa": "AVX512", "cuda_arch": ["sm_90"]}
        for job_id, device, toolchain in (("c1", "cpu", None), ("g1", "cuda:0", gpu)):
            store.create(**{**PARAMS, "id": job_id, "device": device,  # type: ignore[typeddict-item]
                            "toolchain": toolchain, "input_sha256": "a" * 64,
                            "input_size_bytes": 1})
        executor.mark_unserved()
        assert [store.get(i)["phase"] for i in ("c1", "g1")] == [  # type: ignore[index]
            "waiting_for_host", "waiting_for_host"]
        _host(executor, "a@x", ["cpu", "cpu.avx512"])
        executor.mark_unserved()
        assert [store.get(i)["phase"] for i in ("c1", "g1")] == [  # type: ignore[index]
            None, "waiting_for_host"]
        _host(executor, "g@y", ["cpu", "cpu.avx512", "cuda.sm90", "cuda"], cuda_arch=["sm_90"])
        executor.mark_unserved()
        assert store.get("g1")["phase"] is None  # type: ignore[index]
    finally:
        store.close()


def test_info_lists_live_host_classes_and_the_broker_without_its_password() -> None:
    executor = _executor(Settings(broker_url="amqp://u:secret@rabbit:5672/v"))
    assert not executor.ready and executor.toolchain is None
    _host(executor, "a@x", ["cpu", "cpu.avx512"])
    _host(executor, "b@x", ["cpu", "cpu.avx512"])
    _host(executor, "g@y", ["cpu", "cpu.avx512", "cuda.sm90", "cuda"], cuda_arch=["sm_90"],
          cuda_devices=2)
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


def test_a_stuck_process_writes_nothing_over_the_run_that_took_its_job_over(
        tmp_path: Path) -> None:
    """After a failure or a SIGTERM a worker process writes the job's status only while
    its own sandbox still holds the run (the attempt fences the write)."""
    from app.executors.celery_worker import _own_attempt

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate.upgrade(url)
    store = JobStore(url)
    try:
        store.create(**{**PARAMS, "id": "j1", "input_sha256": "a" * 64,  # type: ignore[typeddict-item]
                        "input_size_bytes": 1})
        ctx: Any = SimpleNamespace(lifecycle=SimpleNamespace(store=store), worker="host-a@x")
        child: Any = SimpleNamespace(pid=123)
        assert _own_attempt(ctx, "j1", child) is None  # queued: nobody's run
        store.transition("j1", from_=[JobStatus.QUEUED], to=JobStatus.RUNNING, attempts=1,
                         worker="host-a@x", worker_pid=123)
        assert _own_attempt(ctx, "j1", child) == 1
        # Its lease ran out: host-b runs it now, attempt 2.
        store.transition("j1", from_=[JobStatus.RUNNING], to=JobStatus.RUNNING, attempts=2,
                         worker="host-b@y", worker_pid=456)
        assert _own_attempt(ctx, "j1", child) is None
    finally:
        store.close()
