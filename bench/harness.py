"""Plumbing for the benchmark: a server subprocess, the plain way, an RSS sampler.

Nothing here measures a figure; ``figures.py`` does, with these pieces.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 900.0
SUBMIT_RETRIES = 60  # 429 (LOWERING_MAX_QUEUED) is retried this many times, 1 s apart
PLAIN = """
import sys, torch
from torch.nativert.backends._lower_utils import (
    lower_exported_program, package_nativert_with_aoti_delegate)
ep = torch.export.load(sys.argv[1])
delegate, files = lower_exported_program(ep, sys.argv[3], "aoti")
package_nativert_with_aoti_delegate(sys.argv[2], sys.argv[3], "aoti", ep, delegate, files)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate(out_dir: Path, specs: list[str]) -> None:
    """Write out_dir/{kind}_s{seed}.pt2 for each "kind:seed" (one torch process for all)."""
    if specs:
        subprocess.run([sys.executable, str(ROOT / "bench" / "gen_programs.py"), str(out_dir),
                        *specs], cwd=ROOT, check=True, capture_output=True, timeout=900)


def plain_once(program: Path, out: Path, cache_dir: Path) -> float:
    """The plain way: a fresh python imports torch, loads, lowers, packages. Seconds."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, str(program), str(out), program.stem],
                   env=env, check=True, capture_output=True, timeout=JOB_TIMEOUT_S)
    return time.perf_counter() - started


def plain_measured(program: Path, out: Path, cache_dir: Path) -> tuple[float, int]:
    """``plain_once`` with the plain process's peak RSS sampled: (seconds, bytes)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PLAIN, str(program), str(out), program.stem],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with RssSampler(proc.pid) as rss:
        _, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"plain way failed on {program.name}: {err.decode()[-500:]}")
    return time.perf_counter() - started, rss.peak


@dataclass
class Server:
    """A running service: its URL, its API process id and how long it took to be ready."""

    url: str
    pid: int
    ready_s: float
    data_dir: Path

    def client(self, timeout_s: float = JOB_TIMEOUT_S + 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s)


@contextmanager
def serve(data_dir: Path, *, workers: int, extra_env: dict[str, str] | None = None
          ) -> Iterator[Server]:
    """Start ``python -m app.main`` on a free loopback port; always stop it."""
    port = free_port()
    env = {**os.environ, "LOWERING_HOST": "127.0.0.1", "LOWERING_PORT": str(port),
           "LOWERING_DATA_DIR": str(data_dir), "LOWERING_WORKERS": str(workers),
           "LOWERING_LOG_LEVEL": "warning", "LOWERING_MAX_QUEUED": "64",
           "PYTHONPATH": str(ROOT), **(extra_env or {})}
    log = (data_dir.parent / f"server-{port}.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.main"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield Server(url, proc.pid, time.perf_counter() - started, data_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def submit(client: httpx.Client, program: Path, *, wait_s: float | None = None,
           bypass: bool = False) -> httpx.Response:
    """POST the program (model_name = file stem); retries 429 a bounded number of times."""
    params: dict[str, Any] = {}
    if wait_s is not None:
        params["wait"] = wait_s
    if bypass:
        params["cache"] = "bypass"
    # An open file, not its bytes: httpx then sends it in 64 KiB chunks. Given one
    # bytes object, httpcore's socket write re-slices the unsent rest after every
    # send() (buffer = buffer[n:]), which copies O(size^2 / send size) bytes: about a
    # minute of client CPU for a 1 GB upload, that the service would be charged with.
    with program.open("rb") as handle:
        for _ in range(SUBMIT_RETRIES):
            response = client.post("/v1/lowerings", params=params,
                                    data={"model_name": program.stem},
                                    files={"program": (program.name, handle)})
            if response.status_code != 429:
                break
            time.sleep(1.0)
    if response.status_code != (202 if wait_s is None else 200):
        raise RuntimeError(f"{program.name}: HTTP {response.status_code}: {_why(response)}")
    return response


def _why(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return response.text[:500]
    # A failed lowering's message ends with the log tail (g++ output): keep both ends.
    message = str(error.get("message", ""))
    if len(message) > 1600:
        message = message[:400] + " [...] " + message[-1200:]
    return f"{error.get('code')}: {message}"


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = JOB_TIMEOUT_S
               ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = client.get(f"/v1/lowerings/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.25)


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread; ``peak`` is the max seen."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = self.process.memory_info().rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:  # it ended between two samples
                return
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
