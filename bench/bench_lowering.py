"""Plain way vs. the service, same machine, same models, one run.

Plain way: a fresh ``python`` that imports torch, loads the .pt2, runs the stock
``lower_exported_program`` + ``package_nativert_with_aoti_delegate`` (FACTS.md).
Service: a warm server (started here), upload -> archive in the client's hands
(``POST /v1/lowerings?wait=``). Prints each side's median and the ratio.

    .venv/bin/python bench/bench_lowering.py [--models linear convnet dynamic] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PLAIN = """
import sys, torch
from torch.nativert.backends._lower_utils import (
    lower_exported_program, package_nativert_with_aoti_delegate)
ep = torch.export.load(sys.argv[1])
delegate, files = lower_exported_program(ep, sys.argv[3], "aoti")
package_nativert_with_aoti_delegate(sys.argv[2], sys.argv[3], "aoti", ep, delegate, files)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain_once(program: Path, out: Path, name: str, cache: Path) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN, str(program), str(out), name],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def service_once(url: str, program: Path, name: str) -> float:
    started = time.perf_counter()
    with program.open("rb") as handle:
        response = httpx.post(f"{url}/v1/lowerings", params={"wait": 900}, timeout=1000,
                              data={"model_name": name}, files={"program": handle})
    response.raise_for_status()
    assert response.headers["content-type"] == "application/zip", response.text[:500]
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["linear", "convnet", "dynamic"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lowering-bench-") as tmp_name:
        tmp = Path(tmp_name)
        programs = tmp / "programs"
        subprocess.run([sys.executable, "-m", "tests.models", str(programs), *args.models],
                       cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LOWERING_PORT": str(port), "LOWERING_DATA_DIR": str(tmp / "data"),
               "LOWERING_WORKERS": str(args.workers), "LOWERING_LOG_LEVEL": "warning",
               "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "app.main"], cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            plain: list[float] = []
            service: list[float] = []
            for rnd in range(args.rounds):
                for model in args.models:
                    # Interleave the two sides so machine noise hits both alike; a new
                    # model_name per round keeps every service lowering a distinct one.
                    program = programs / f"{model}.pt2"
                    name = f"{model}_r{rnd}"
                    plain.append(plain_once(program, tmp / f"{name}.pt2", name, tmp / "cache"))
                    service.append(service_once(url, program, name))
                    print(f"round {rnd} {model:10s} plain {plain[-1]:6.2f} s   "
                          f"service {service[-1]:6.2f} s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    plain_median, service_median = statistics.median(plain), statistics.median(service)
    print(f"\nplain way median   {plain_median:6.2f} s  (n={len(plain)})")
    print(f"service median     {service_median:6.2f} s  (n={len(service)})")
    print(f"ratio service/plain {service_median / plain_median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
