"""The Celery executor over a real RabbitMQ, with real worker hosts and a real API.

Each test gets a fresh vhost and a fresh PostgreSQL database; the API
(LOWERING_EXECUTOR=celery) and the worker hosts share a data dir (uploads, logs and
archives on LOWERING_STORAGE=local), as hosts on a shared volume would.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Server
from tests.e2e.test_faults import _all_gone, _compiling_tree
from tests.factories import submit, wait_for
from tests.fleet.conftest import (
    WorkerHost,
    WorkerHosts,
    drop_connections,
    fresh_vhost,
    wait_until,
)
from tests.integration.conftest import fresh_pg_database

pytestmark = pytest.mark.slow
LEASE_S = 10  # short, so a silent host's job is taken back within seconds
BOOT_S = 900  # a host primes the shared inductor cache first when it is cold


@dataclass
class Fleet:
    server: Server
    hosts: list[WorkerHost]
    database_url: str
    broker_url: str

    def api_settings(self) -> dict[str, object]:
        """LOWERING_* overrides of an API replica of this fleet."""
        return {"executor": "celery", "database_url": self.database_url,
                "broker_url": self.broker_url, "lease_s": LEASE_S}


def _start_fleet(start_worker: Callable[..., WorkerHost], start_server: Callable[..., Server],
                 data_dir: Path, database_url: str, broker_url: str) -> Fleet:
    host = start_worker("host-a", data_dir=data_dir, database_url=database_url,
                        broker_url=broker_url, lease_s=LEASE_S)
    fleet = Fleet(None, [host], database_url, broker_url)  # type: ignore[arg-type]
    fleet.server = start_server(data_dir, ready=False, migrate_on_start="true",
                                **fleet.api_settings())
    wait_live(fleet.server, "host-a", host)
    fleet.server.wait_ready(timeout_s=60)
    return fleet


@pytest.fixture
def fleet(broker_url: str, fleet_db: str, start_worker: Callable[..., WorkerHost],
          start_server: Callable[..., Server], tmp_path: Path) -> Iterator[Fleet]:
    """host-a and an API on LOWERING_EXECUTOR=celery, sharing a data dir, for a test that
    kills the host; the API stops with the test (before its database and vhost go)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    fleet = None
    try:
        fleet = _start_fleet(start_worker, start_server, data_dir, fleet_db, broker_url)
        yield fleet
    finally:
        if fleet is not None and fleet.server is not None:
            fleet.server.stop()


@pytest.fixture(scope="module")
def shared(inductor_cache: Path, start_server: Callable[..., Server],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet (host-a, an API) for the tests that leave it standing: a host boot and a
    vhost, database and API less per test."""
    data_dir = tmp_path_factory.mktemp("fleet") / "data"
    data_dir.mkdir()
    hosts = WorkerHosts(inductor_cache)
    fleet = None
    with fresh_vhost() as broker, fresh_pg_database() as database:
        try:
            fleet = _start_fleet(hosts.start, start_server, data_dir, database, broker)
            yield fleet
        finally:
            if fleet is not None and fleet.server is not None:
                fleet.server.stop()
            hosts.stop_all()


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


def test_a_lowering_runs_on_a_worker_host(shared: Fleet, programs: Path) -> None:
    server = shared.server
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


def test_cancel_stops_the_compile_on_the_worker_host(shared: Fleet, programs: Path) -> None:
    server, (host,) = shared.server, shared.hosts
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


def test_a_host_stopped_or_killed_mid_job_hands_the_job_to_another(
    fleet: Fleet, start_worker: Callable[..., WorkerHost], programs: Path,
) -> None:
    """A host stopped with SIGTERM puts its job back at once (not an attempt); a host that
    dies silently (SIGKILL) loses it to the lease reaper (an attempt). One fleet, hosts
    rotating: host-a stops, host-b takes over and is killed, host-c takes over."""
    server, (host_a,) = fleet.server, fleet.hosts

    def join(name: str) -> WorkerHost:
        host = start_worker(name, data_dir=server.data_dir, lease_s=LEASE_S,
                            database_url=fleet.database_url, broker_url=fleet.broker_url)
        wait_live(server, name, host)
        return host

    with server.client() as http:
        stopped_id = submit(http, programs / "slow.pt2", model_name="slow_stop").json()["id"]
        running = wait_for(http, stopped_id, until={"running"}, phase="lower", timeout_s=300)
        assert running["worker"].startswith("host-a@")
        tree = _compiling_tree(running["worker_pid"])
        host_b = join("host-b")
        host_a.kill(signal.SIGTERM)  # a host shut down (systemd: the whole cgroup)
        assert _all_gone(tree) == [], "the stopped host's compile outlived it"
        assert host_a.proc.wait(timeout=60) is not None
        # Put back in the queue, not counted, and taken by host-b at once: no lease to
        # wait out, unlike a host that died silently.
        wait_until(lambda: (http.get(f"/v1/lowerings/{stopped_id}").json()["worker"] or ""
                            ).startswith("host-b@"),
                   timeout_s=30, what="the job taken by host-b", host=host_b)
        stopped = wait_for(http, stopped_id, until={"succeeded"}, timeout_s=300)
        assert stopped["worker"].startswith("host-b@") and stopped["attempts"] == 1, stopped

        killed_id = submit(http, programs / "slow.pt2", model_name="slow_kill").json()["id"]
        running = wait_for(http, killed_id, until={"running"}, phase="lower", timeout_s=300)
        assert running["worker"].startswith("host-b@")
        tree = _compiling_tree(running["worker_pid"])
        join("host-c")
        host_b.kill(signal.SIGKILL)  # the whole host, silently: no status is written
        assert _all_gone(tree) == [], "the dead host's compile outlived it"
        # The lease runs out (LEASE_S), the reaper dispatches it again, host-c runs it.
        killed = wait_for(http, killed_id, until={"succeeded"}, timeout_s=600)
    assert killed["worker"].startswith("host-c@") and killed["attempts"] == 2, killed


def test_a_dropped_broker_connection_loses_no_job(shared: Fleet, programs: Path) -> None:
    """Every connection of the vhost is closed at the broker while a job compiles (a
    broker restart, a network cut): the compile goes on and finishes once, and both the
    API (publishing) and the host (consuming) reconnect for the next job."""
    server = shared.server
    with httpx.Client(base_url=server.url, timeout=700) as http:
        job_id = submit(http, programs / "slow.pt2", model_name="slow_drop").json()["id"]
        wait_for(http, job_id, until={"running"}, phase="lower", timeout_s=300)
        assert drop_connections(shared.broker_url) >= 2  # the API's and the host's
        job = wait_for(http, job_id, until={"succeeded", "failed"}, timeout_s=600)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        after = submit(http, programs / "linear.pt2", wait=600, model_name="after_drop")
        assert after.status_code == 200, after.text
    assert shared.hosts[0].proc.poll() is None


def test_replicas_compile_once_and_a_dead_replica_loses_no_job(
    shared: Fleet, start_server: Callable[..., Server], programs: Path,
) -> None:
    """Two replicas get the same program at once: one compile. The replica holding a
    ?wait dies: the client sends it again to the other, which finds the same job."""
    first = shared.server
    second = start_server(first.data_dir, **shared.api_settings())
    program = programs / "slow.pt2"
    answers: dict[str, httpx.Response | Exception] = {}

    def post(name: str, server: Server) -> None:
        with httpx.Client(base_url=server.url, timeout=700) as http:
            try:
                answers[name] = submit(http, program, wait=600, model_name="replicated")
            except httpx.TransportError as exc:
                answers[name] = exc

    threads = [threading.Thread(target=post, args=(name, server))
               for name, server in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    with first.client() as http:
        def both_recorded_one_running() -> bool:
            items = http.get("/v1/lowerings", params={"model_name": "replicated"}).json()
            return len(items["items"]) == 2 and any(
                job["status"] == "running" for job in items["items"])

        wait_until(both_recorded_one_running, timeout_s=300, what="both submits recorded")
        second.proc.kill()  # mid-wait, the job compiling on host-a
        threads[1].join(timeout=60)
        assert isinstance(answers["second"], httpx.TransportError), answers
        # The client retries the same request on the other replica.
        retry = submit(http, program, wait=600, model_name="replicated")
        threads[0].join(timeout=600)
        assert retry.status_code == 200, retry.text
        done = answers["first"]
        assert isinstance(done, httpx.Response) and done.status_code == 200, done
        assert retry.content == done.content
        jobs = http.get("/v1/lowerings", params={"model_name": "replicated"}).json()["items"]
    assert len(jobs) == 3 and {job["status"] for job in jobs} == {"succeeded"}, jobs
    compiled = [job for job in jobs if not job["cache_hit"] and not job["coalesced_with"]]
    assert len(compiled) == 1, jobs
    assert {job["coalesced_with"] for job in jobs} - {None} <= {compiled[0]["id"]}
