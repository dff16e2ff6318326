"""``make fleet`` (python -m app.devfleet) as a developer runs it: real RabbitMQ, PostgreSQL,
moto, worker hosts and API replicas, on ports, a vhost and a database of this test's own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from app.devfleet import FleetConfig, delete_vhost, drop_database
from tests.conftest import ROOT, free_port
from tests.e2e.test_faults import _all_gone
from tests.factories import submit

pytestmark = pytest.mark.slow
READY_S = 600  # a cold shared inductor cache is primed first


@dataclass
class Launcher:
    """A running ``python -m app.devfleet`` and what it was told."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    config: FleetConfig

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while "fleet ready" not in self.out():
            if self.proc.poll() is not None:
                raise AssertionError(f"the launcher exited {self.proc.returncode}:\n"
                                     f"{self.out()[-4000:]}")
            assert time.monotonic() < deadline, f"not ready in {READY_S} s:\n{self.out()}"
            time.sleep(0.2)


@pytest.fixture
def launch(tmp_path: Path, inductor_cache: Path) -> Iterator[Callable[..., Launcher]]:
    """Factory: start the launcher on free ports with a fresh vhost and database; whatever
    it left (it should leave nothing) is killed, and the vhost and database dropped."""
    started: list[Launcher] = []

    def start(*, hosts: int = 2, api_ports: tuple[int, ...] | None = None,
              s3_port: int | None = None) -> Launcher:
        tag = uuid.uuid4().hex[:10]
        config = FleetConfig(hosts=hosts, api_ports=api_ports or (free_port(), free_port()),
                             s3_port=s3_port or free_port(), vhost=f"lowering-mkfleet-{tag}",
                             database=f"mkfleet_{tag}", run_dir=tmp_path / f"run-{tag}",
                             inductor_cache_dir=inductor_cache)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
        env.update(PYTHONPATH=str(ROOT), LOWERING_LEASE_S="10")
        argv = [sys.executable, "-m", "app.devfleet", "--hosts", str(hosts),
                "--api-ports", ",".join(map(str, config.api_ports)),
                "--s3-port", str(config.s3_port), "--vhost", config.vhost,
                "--database", config.database, "--run-dir", str(config.run_dir),
                "--inductor-cache-dir", str(inductor_cache)]
        out_path = tmp_path / f"launcher-{tag}.out"
        with out_path.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        launcher = Launcher(proc, out_path, config)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        with contextlib.suppress(psutil.Error):
            leftovers = launcher.tree()
            launcher.proc.send_signal(signal.SIGTERM)
            launcher.proc.wait(timeout=60)
            for proc in leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        delete_vhost(launcher.config.vhost)
        drop_database(launcher.config.pg_admin_url, launcher.config.database)


def test_make_fleet_lowers_through_one_replica_reads_through_the_other(
        launch: Callable[..., Launcher], programs: Path) -> None:
    launcher = launch()
    launcher.wait_ready()
    out = launcher.out()
    first, second = launcher.config.api_urls
    assert first in out and second in out and str(launcher.config.run_dir / "logs") in out
    processes = launcher.tree()
    # moto, host-a and host-b (each with its pool process), two APIs: all under the launcher.
    assert sum(p.name() == "bwrap" for p in processes) >= 2, [p.name() for p in processes]

    with httpx.Client(base_url=second, timeout=700) as http:
        response = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        assert response.status_code == 307, response.text  # to the presigned S3 object
        assert response.headers["location"].startswith(launcher.config.s3_endpoint)
        job_id = response.headers["x-lowering-id"]
    job = httpx.get(f"{first}/v1/lowerings/{job_id}", timeout=30).json()
    assert job["status"] == "succeeded", job
    assert job["worker"].split("@")[0] in ("host-a", "host-b"), job
    archive = httpx.get(f"{first}/v1/lowerings/{job_id}/artifact", timeout=60,
                        follow_redirects=True)
    assert archive.status_code == 200 and archive.content[:2] == b"PK"

    processes = launcher.tree()  # the sandboxes warmed up for the next jobs, too
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.proc.wait(timeout=60) == 0, launcher.out()[-3000:]
    assert _all_gone(processes) == []
    assert "fleet: stopped" in launcher.out()


def test_a_port_already_taken_is_named_and_nothing_starts(
        launch: Callable[..., Launcher]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launcher = launch(api_ports=(free_port(), port))
        assert launcher.proc.wait(timeout=60) == 1
    out = launcher.out()
    assert f"port {port} (API) is already in use" in out, out
    assert not (launcher.config.run_dir / "logs").exists()  # no child was started


def test_a_part_that_dies_is_named_and_the_rest_are_stopped(
        launch: Callable[..., Launcher]) -> None:
    launcher = launch(hosts=1, api_ports=(free_port(),))
    launcher.wait_ready()
    processes = launcher.tree()
    moto = next(p for p in processes if p.name() == "moto_server")
    moto.kill()
    assert launcher.proc.wait(timeout=60) == 1
    assert "moto exited with status -9" in launcher.out(), launcher.out()[-3000:]
    assert _all_gone(processes) == []


def test_a_launcher_killed_outright_takes_its_children_along(
        launch: Callable[..., Launcher]) -> None:
    launcher = launch(hosts=1, api_ports=(free_port(),))
    launcher.wait_ready()
    processes = launcher.tree()
    launcher.proc.kill()  # no handler runs: each child's parent-death signal stops it
    launcher.proc.wait(timeout=10)
    assert _all_gone(processes, timeout_s=60) == []


def test_the_job_timeout_fits_under_the_brokers_consumer_timeout() -> None:
    """A hard time limit over RabbitMQ's consumer timeout redelivers a long job forever:
    the default is lowered to fit, a job timeout the caller chose is warned about."""
    from app.devfleet import fit_job_timeout

    assert fit_job_timeout({}, None) is None and fit_job_timeout({}, 7200.0) is None
    env: dict[str, str] = {}
    note = fit_job_timeout(env, 1800.0)  # RabbitMQ's default, 30 min
    assert note is not None and "consumer_timeout" in note
    assert float(env["LOWERING_JOB_TIMEOUT_S"]) + 480 < 1800
    chosen = {"LOWERING_JOB_TIMEOUT_S": "3600"}
    warned = fit_job_timeout(chosen, 1800.0)
    assert warned is not None and warned.startswith("warning") and "set_env" in warned
    assert chosen == {"LOWERING_JOB_TIMEOUT_S": "3600"}
