"""Fixtures of the fleet tests: a fresh RabbitMQ vhost, a fresh PostgreSQL database, and
real ``lowering-service worker`` processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import pg_url  # noqa: F401  (a fixture used here)

BROKER = "127.0.0.1:5672"


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@contextlib.contextmanager
def fresh_vhost() -> Iterator[str]:
    """A fresh vhost on the local RabbitMQ (guest works on loopback), deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    vhost = f"lowering-test-{uuid.uuid4().hex[:12]}"
    added = _rabbitmqctl("add_vhost", vhost)
    if added.returncode != 0:
        pytest.skip(f"cannot add a RabbitMQ vhost: {added.stderr.strip()[-300:]}")
    try:
        perms = _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        assert perms.returncode == 0, perms.stderr
        yield f"amqp://guest:guest@{BROKER}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def vhost_of(broker_url: str) -> str:
    return broker_url.rsplit("/", 1)[1]


def drop_connections(broker_url: str) -> int:
    """Close every client connection of the vhost at the broker (as a broker restart or a
    network cut would); returns how many there were."""
    vhost = vhost_of(broker_url)
    listed = _rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost")
    count = sum(line.strip() == vhost for line in listed.stdout.splitlines())
    closed = _rabbitmqctl("close_all_connections", "--vhost", vhost, "test: connection dropped")
    assert closed.returncode == 0, closed.stderr
    return count


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A fresh vhost, deleted after the test."""
    with fresh_vhost() as url:
        yield url


@pytest.fixture
def fleet_db(pg_url: str) -> str:  # noqa: F811
    """The fresh PostgreSQL database, migrated to head."""
    from app.jobs import migrate

    migrate.upgrade(pg_url)
    return pg_url


@dataclass
class WorkerHost:
    """A running ``lowering-service worker`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole host: its Celery main process and its worker processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait()


class WorkerHosts:
    """Starts ``lowering-service worker --name NAME`` processes; stops them all at the end."""

    def __init__(self, inductor_cache: Path) -> None:
        self.inductor_cache = inductor_cache
        self.hosts: list[WorkerHost] = []

    def start(self, name: str, *, data_dir: Path, database_url: str, broker_url: str,
              **overrides: object) -> WorkerHost:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
        env.update({
            "LOWERING_DATA_DIR": str(data_dir),
            "LOWERING_DATABASE_URL": database_url,
            "LOWERING_BROKER_URL": broker_url,
            "LOWERING_WORKERS": "1",
            "LOWERING_INDUCTOR_CACHE_DIR": str(self.inductor_cache),
            "LOWERING_LOG_LEVEL": "info",
            "PYTHONPATH": str(ROOT),
        })
        env.update({f"LOWERING_{k.upper()}": str(v) for k, v in overrides.items()})
        log_path = data_dir.parent / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("ab") as log:
            # Its own session: the test can signal the host's whole process group.
            proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--name", name],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        host = WorkerHost(name, proc, log_path)
        self.hosts.append(host)
        return host

    def stop_all(self) -> None:
        for host in self.hosts:
            host.stop()


@pytest.fixture
def start_worker(inductor_cache: Path) -> Iterator[Callable[..., WorkerHost]]:
    """Factory: start ``lowering-service worker --name NAME`` with LOWERING_* overrides."""
    hosts = WorkerHosts(inductor_cache)
    yield hosts.start
    hosts.stop_all()


def wait_until(predicate: Callable[[], object], *, timeout_s: float, what: str,
               host: WorkerHost | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if host is not None and host.proc.poll() is not None:
            raise AssertionError(f"worker host {host.name} exited:\n{host.log()[-4000:]}")
        time.sleep(0.2)
    tail = f"\n{host.log()[-4000:]}" if host is not None else ""
    raise TimeoutError(f"not {what} in {timeout_s} s{tail}")
