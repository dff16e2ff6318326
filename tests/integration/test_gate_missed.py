"""Assume the gate will miss: a program that injects C++ into the compiled code.

``aten._assert_async.msg`` pastes its message into generated C++ unescaped. The gate
refuses such messages (tests/unit/test_gate*.py); here the gate is bypassed on
purpose and the program goes straight to the lowering inside the job sandbox. The
injected code does run (its marker is printed) and then finds it can touch nothing:
it is uid 65534, cannot write the host's files and cannot reach the job DB.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RUN_LOWERING = """
import sys
from pathlib import Path
from app.sandbox.child import warm
Path("input.pt2").write_bytes(sys.stdin.buffer.read())
warm(Path("/cache"), Path("/job"), [])
from app.lowering import run_lowering
try:
    run_lowering(program_path=Path("input.pt2"), out_path=Path("out.pt2"), model_name="m",
                 backend_id="aoti", device="cpu", options={}, verify=True, rtol=1e-4,
                 atol=1e-4, provenance={})
    print("LOWERED")
except Exception as exc:
    print("FAILED", type(exc).__name__)
"""


class _Asserts(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert_async(x.sum() > -1e30, "PLACEHOLDER")
        return x * 2


def _hostile_program(path: Path, shell: str) -> None:
    """A real export whose assert message closes the C++ string and calls system()."""
    clean = path.with_name("clean.pt2")
    torch.export.save(torch.export.export(_Asserts(), (torch.randn(4),)), str(clean))
    escaped = shell.replace("\\", "\\\\").replace('"', '\\"')
    message = f'x"), 0)); system("{escaped}"); (true ? 0 : (throw std::runtime_error("y'
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if b"PLACEHOLDER" in data:
                data = data.replace(b"PLACEHOLDER", json.dumps(message)[1:-1].encode())
            dst.writestr(info, data)


def test_injected_code_runs_but_reaches_nothing(tmp_path: Path,
                                                inductor_cache: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True)
    (data_dir / "jobs.db").write_text("the job database")
    marker = data_dir / "uploads" / "pwned"
    db_reachable = True
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        db_reachable = False
    probe_db = ("python -c 'import socket; socket.create_connection((\"127.0.0.1\", 5432), 5)'"
                " && echo DB-REACHED || echo DB-BLOCKED")
    shell = (f"echo INJECTED uid=$(id -u); touch {marker} && echo HOST-WRITTEN; "
             f"cat {data_dir}/jobs.db && echo DB-READ; {probe_db}")
    program = tmp_path / "hostile.pt2"
    _hostile_program(program, shell)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWERING_")}
    env.update({"LOWERING_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
                "LOWERING_INDUCTOR_CACHE_DIR": str(inductor_cache)})
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "sandbox-run", "--", "python", "-c", RUN_LOWERING],
        input=program.read_bytes(), capture_output=True, cwd=ROOT, env=env, timeout=600)
    out = result.stdout.decode(errors="replace")
    assert "INJECTED uid=65534" in out, (out, result.stderr.decode(errors="replace")[-3000:])
    assert "HOST-WRITTEN" not in out and not marker.exists()
    assert "DB-READ" not in out
    if db_reachable:  # the host's PostgreSQL answers; the sandbox cannot reach it
        assert "DB-BLOCKED" in out and "DB-REACHED" not in out, out
