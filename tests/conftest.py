"""Shared fixtures: exported test programs and real uvicorn servers on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tiers by directory. unit/ and api/ are the fast tier: in process, no server, no compile.
# e2e/ starts real servers whose workers prime with an AOTInductor compile; integration/
# lowers in process. Both are `slow`, so `pytest -m "not slow"` never compiles.
SLOW_DIRS = (ROOT / "tests" / "e2e", ROOT / "tests" / "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under SLOW_DIRS, and any test that starts a server, `slow`."""
    for item in items:
        in_slow_dir = any(item.path.is_relative_to(folder) for folder in SLOW_DIRS)
        if in_slow_dir or "start_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ``python -m app.main`` process and how to reach it."""

    url: str
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, **kwargs: object) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One inductor cache for every server in the run: later lowerings reuse headers."""
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture(scope="session")
def start_server(
    tmp_path_factory: pytest.TempPathFactory, inductor_cache: Path
) -> Iterator[Callable[..., Server]]:
    """Factory: start a server with LOWERING_* overrides; all are stopped at the end."""
    servers: list[Server] = []

    def start(data_dir: Path | None = None, *, ready: bool = True,
              env_extra: dict[str, str] | None = None, **overrides: object) -> Server:
        data_dir = data_dir or tmp_path_factory.mktemp("data")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
        env.update({
            "LOWERING_HOST": "127.0.0.1",
            "LOWERING_PORT": str(port),
            "LOWERING_DATA_DIR": str(data_dir),
            "LOWERING_WORKERS": "2",
            "LOWERING_INDUCTOR_CACHE_DIR": str(inductor_cache),
            "LOWERING_LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
        })
        env.update({f"LOWERING_{k.upper()}": str(v) for k, v in overrides.items()})
        env.update(env_extra or {})
        log_path = data_dir.parent / f"server-{port}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "app.main"], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", data_dir, env, proc, log_path)
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., Server]) -> Server:
    """The shared server: 2 workers, an 8 MiB upload cap."""
    return start_server(max_upload_bytes=8 * 1024 * 1024)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as http:
        yield http


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test program from tests/models.py, exported once, in a child process."""
    out = tmp_path_factory.mktemp("programs")
    subprocess.run([sys.executable, "-m", "tests.models", str(out)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return out


@pytest.fixture(scope="session")
def linear(server: Server, programs: Path) -> dict[str, Any]:
    """One lowering of the linear model on the shared server, for tests that only read it."""
    from tests.factories import submit

    with httpx.Client(base_url=server.url, timeout=600) as http:
        response = submit(http, programs / "linear.pt2", wait=600, model_name="linear")
        assert response.status_code == 200, response.text
        job = http.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
    return {"response": response, "job": job, "archive": response.content}


# -- an S3 server (moto), for the object-store tests -----------------------------------

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """A moto S3 server on a free port; yields its endpoint URL."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    with (log_dir / f"moto-{port}.log").open("ab") as log:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log_dir}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(key, raising=False)
        with moto_server(tmp_path_factory.mktemp("moto")) as url:
            yield url
