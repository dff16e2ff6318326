"""Metrics across processes (app.metrics): every process's counts in one directory are
summed once; a worker host's recycled processes continue their slot's counts, its files
stay one set per slot, its directory goes with it; a Celery process recycled after
LOWERING_WORKER_MAX_JOBS_PER_PROCESS jobs is counted. Each process runs in a subprocess:
multiprocess mode is chosen per process, and never in this one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from tests.conftest import ROOT

# A finished job as the lifecycle hands it to app.metrics.job_finished.
JOB = ("{'id': 'j', 'status': 'succeeded', 'timings': {'validate': 0.2, 'lower': 7.0}, "
       "'parent_id': None, 'cache_hit': False, 'artifact_size_bytes': 1000, 'error': None}")


def _python(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "PYTHONPATH": str(ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _samples(exposition: str | bytes) -> dict[str, float]:
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}"
            assert key not in out, f"{key} twice"
            out[key] = sample.value
    return out


def test_two_processes_counters_are_summed_once(tmp_path: Path) -> None:
    """Two processes (an API under a multi-process server) count into one
    PROMETHEUS_MULTIPROC_DIR; /metrics of a third sums them, its own zeros adding nothing."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    record = ("from app import metrics\n"
              "for _ in range({n}): metrics.job_finished({job})\n"
              "metrics.record_cache_hit('result')\n"
              "metrics.record_refusal('unsafe_pickle')\n")
    _python(record.format(n=3, job=JOB), env)
    _python(record.format(n=2, job=JOB), env)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # one file per process

    scraped = _samples(_python(
        "import sys; from app import metrics; sys.stdout.write(metrics.exposition().decode())",
        env))
    assert scraped == _samples(generate_latest(metrics.directory_collector(tmp_path)))
    assert scraped["lowering_jobs_total{status=succeeded}"] == 5
    assert scraped["lowering_jobs_total{status=failed}"] == 0
    assert scraped["lowering_cache_hits_total{kind=result}"] == 2
    assert scraped["lowering_gate_refusals_total{code=unsafe_pickle}"] == 2
    assert scraped["lowering_stored_bytes_total{}"] == 5000
    assert scraped["lowering_phase_seconds_count{phase=lower}"] == 5
    assert scraped["lowering_phase_seconds_sum{phase=lower}"] == 35.0
    assert scraped["lowering_phase_seconds_bucket{le=5.0,phase=lower}"] == 0
    assert scraped["lowering_phase_seconds_bucket{le=10.0,phase=lower}"] == 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HOST = """
import json, os, sys, urllib.request
from billiard.pool import Pool
from app import metrics
from app.executors.celery_worker import _pool_slot

port = int(sys.argv[1])
directory = metrics.serve_worker_host("host-t", host="127.0.0.1", port=port,
                                      process_id=_pool_slot)

def job(_):  # a task in a prefork process: one job lowered, its sandbox replaced
    metrics.job_finished(JOB)
    metrics.record_worker_recycle("after_job")
    return os.getpid()

pool = Pool(2, maxtasksperchild=1)  # a new process for every task, two slots
pids = set(pool.map(job, range(6), chunksize=1))
pool.close()
pool.join()
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
print(json.dumps({"pids": len(pids), "directory": str(directory), "main": os.getpid(),
                  "files": sorted(os.listdir(directory)), "metrics": body.decode()}))
"""


def test_a_worker_host_serves_the_sum_of_its_recycled_processes(tmp_path: Path) -> None:
    stale = tmp_path / f"lowering-metrics-{os.getuid()}" / "host-t-999999999"
    stale.mkdir(parents=True)  # a dead host's directory (no such pid)
    (stale / "counter_slot0.db").write_bytes(b"")
    code = HOST.replace("JOB)", f"{JOB})").replace("int(sys.argv[1])", str(_free_port()))
    out = _python(code, {"TMPDIR": str(tmp_path)})
    result = json.loads(out.strip().splitlines()[-1])
    main_pid = result["main"]
    assert result["pids"] == 6  # six processes ran the six jobs
    scraped = _samples(result["metrics"])
    assert scraped["lowering_jobs_total{status=succeeded}"] == 6
    assert scraped["lowering_worker_recycles_total{reason=after_job}"] == 6
    assert scraped["lowering_phase_seconds_count{phase=validate}"] == 6
    # One set of files per pool slot, however many processes held it, and the main one's.
    files = [name.split("_") for name in result["files"]]
    assert sorted(owner for kind, owner in files if kind == "counter") == [
        f"pid{main_pid}.db", "slot0.db", "slot1.db"], result["files"]
    assert sorted(owner for kind, owner in files if kind == "histogram") == [
        f"pid{main_pid}.db", "slot0.db", "slot1.db"], result["files"]
    assert not Path(result["directory"]).exists()  # removed when the host exited
    assert not stale.exists()


def test_a_celery_process_recycled_after_its_jobs_is_counted() -> None:
    from billiard.pool import EX_RECYCLE

    from app.executors import celery_worker

    def recycles(reason: str) -> float:
        key = f"lowering_worker_recycles_total{{reason={reason}}}"
        return _samples(metrics.exposition())[key]

    before = recycles("max_jobs_per_process")
    celery_worker._process_shutdown(pid=1, exitcode=0)  # a stop, not a recycle
    celery_worker._process_shutdown(pid=1, exitcode=EX_RECYCLE)
    assert recycles("max_jobs_per_process") == before + 1
