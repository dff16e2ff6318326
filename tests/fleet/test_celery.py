"""The Celery executor over a real RabbitMQ, with real worker hosts and a real API.

Each test gets a fresh vhost and a fresh PostgreSQL database; the API
(LOWERING_EXECUTOR=celery) and the worker hosts share a data dir (uploads, logs and
archives on LOWERING_STORAGE=local), as hosts on a shared volume would.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Server
from tests.e2e.test_faults import _all_gone, _compiling_tree
from tests.factories import submit, wait_for
from tests.fleet.conftest import WorkerHost, wait_until

pytestmark = pytest.mark.slow
LEASE_S = 10  # short, so a silent host's job is taken back within seconds
BOOT_S = 900  # a host primes the shared inductor cache first when it is cold


@dataclass
class Fleet:
    server: Server
    hosts: list[WorkerHost]
    database_url: str
    broker_url: str


@pytest.fixture
def fleet(broker_url: str, fleet_db: str, start_worker: Callable[..., WorkerHost],
          start_server: Callable[..., Server], tmp_path: Path) -> Iterator[Fleet]:
    """host-a and an API on LOWERING_EXECUTOR=celery, sharing a data dir; the API stops
    with the test (before its database and vhost go), the hosts right after."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    host = start_worker("host-a", data_dir=data_dir, database_url=fleet_db,
                        broker_url=broker_url, lease_s=LEASE_S)
    server = start_server(data_dir, ready=False, executor="celery", database_url=fleet_db,
                          broker_url=broker_url, migrate_on_start="true", lease_s=LEASE_S)
    try:
        wait_live(server, "host-a", host)
        server.wait_ready(timeout_s=60)
        yield Fleet(server, [host], fleet_db, broker_url)
    finally:
        server.stop()


def wait_live(server: Server, name: str, host: WorkerHost) -> None:
    """Until the API lists the worker host ``name`` as live."""
    def live() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited:\n{server.log()[-4000:]}")
        try:
            executor = httpx.get(f"{server.url}/v1/info", timeout=10).json()["executor"]
        except (httpx.TransportError, ValueError):
            return False
        return any(h["name"].split("@")[0] == name for h in executor["hosts"])

    wait_until(live, timeout_s=BOOT_S, what=f"{name} live in /v1/info", host=host)


def test_a_lowering_runs_on_a_worker_host(fleet: Fleet, programs: Path) -> None:
    server = fleet.server
    node = f"host-a@{socket.gethostname()}"
    with httpx.Client(base_url=server.url, timeout=700) as http:
        info = http.get("/v1/info").json()
        classes = info["executor"]["host_classes"]
        assert [c["hosts"] for c in classes] == [[node]], classes
        assert "cpu" in classes[0]["queues"]
        assert info["toolchain"]["torch_version"], info["toolchain"]
        response = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        assert response.status_code == 200, response.text
        job = http.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
    assert job["status"] == "succeeded"
    assert job["worker"] == node, job
    assert response.content[:2] == b"PK"


def test_cancel_stops_the_compile_on_the_worker_host(fleet: Fleet, programs: Path) -> None:
    server, (host,) = fleet.server, fleet.hosts
    with server.client() as http:
        job_id = submit(http, programs / "slower.pt2", model_name="slow_cancel").json()["id"]
        running = wait_for(http, job_id, until={"running"}, phase="lower", timeout_s=300)
        assert running["worker"].startswith("host-a@")
        # The sandbox is a child of the host's Celery worker process, on this machine.
        assert running["worker_pid"] in {p.pid for p in
                                         psutil.Process(host.proc.pid).children(recursive=True)}
        tree = _compiling_tree(running["worker_pid"])
        response = http.post(f"/v1/lowerings/{job_id}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert _all_gone(tree, timeout_s=10) == [], "the cancelled job's compile outlived it"
        assert http.get(f"/v1/lowerings/{job_id}").json()["status"] == "cancelled"
        # The host is still serving: its process warmed a new sandbox for the next job.
        after = submit(http, programs / "linear.pt2", wait=600, model_name="after_cancel")
        assert after.status_code == 200, after.text
    assert host.proc.poll() is None


def test_a_host_killed_mid_job_is_taken_over_by_another(
    fleet: Fleet, start_worker: Callable[..., WorkerHost], programs: Path,
) -> None:
    server, (host_a,) = fleet.server, fleet.hosts
    with server.client() as http:
        job_id = submit(http, programs / "slow.pt2", model_name="slow_takeover").json()["id"]
        running = wait_for(http, job_id, until={"running"}, phase="lower", timeout_s=300)
        assert running["worker"].startswith("host-a@")
        tree = _compiling_tree(running["worker_pid"])
        host_b = start_worker("host-b", data_dir=server.data_dir, lease_s=LEASE_S,
                              database_url=fleet.database_url, broker_url=fleet.broker_url)
        wait_live(server, "host-b", host_b)
        host_a.kill(signal.SIGKILL)  # the whole host, silently: no status is written
        assert _all_gone(tree) == [], "the dead host's compile outlived it"
        # The lease runs out (LEASE_S), the reaper dispatches it again, host-b runs it.
        job = wait_for(http, job_id, until={"succeeded"}, timeout_s=600)
    assert job["worker"].startswith("host-b@"), job
    assert job["attempts"] == 2, job


def test_a_host_stopped_mid_job_hands_the_job_back_at_once(
    fleet: Fleet, start_worker: Callable[..., WorkerHost], programs: Path,
) -> None:
    server, (host_a,) = fleet.server, fleet.hosts
    with server.client() as http:
        job_id = submit(http, programs / "slow.pt2", model_name="slow_stop").json()["id"]
        running = wait_for(http, job_id, until={"running"}, phase="lower", timeout_s=300)
        tree = _compiling_tree(running["worker_pid"])
        host_b = start_worker("host-b", data_dir=server.data_dir, lease_s=LEASE_S,
                              database_url=fleet.database_url, broker_url=fleet.broker_url)
        wait_live(server, "host-b", host_b)
        host_a.kill(signal.SIGTERM)  # a host shut down (systemd: the whole cgroup)
        assert _all_gone(tree) == [], "the stopped host's compile outlived it"
        assert host_a.proc.wait(timeout=60) is not None
        # Put back in the queue, not counted, and taken by host-b at once: no lease to
        # wait out (60 s), unlike a host that died silently.
        wait_until(lambda: (http.get(f"/v1/lowerings/{job_id}").json()["worker"] or ""
                            ).startswith("host-b@"),
                   timeout_s=30, what="the job taken by host-b", host=host_b)
        job = wait_for(http, job_id, until={"succeeded"}, timeout_s=300)
    assert job["worker"].startswith("host-b@"), job
    assert job["attempts"] == 1, job
