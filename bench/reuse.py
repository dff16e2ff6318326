"""The compiled-code reuse figure: a fine-tune (same structure, other weights) against the
first lowering of its structure, end to end through the service, in one run.

Target (issue 9): a re-lowering that differs only in weight values takes <= 0.2x the first
lowering's end-to-end time, and its archive is verified with its own weights.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from figures import Row, _breakdown, _timed_submit, _verdict
from harness import ROOT, Server

GENERATE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.models import fine_tune
for seed in sys.argv[3:]:
    torch.export.save(fine_tune(int(seed)), f"{sys.argv[2]}/s{seed}/finetune.pt2")
"""


def generate_fine_tunes(out_dir: Path, seeds: list[int]) -> list[Path]:
    """One torch process writes out_dir/s{seed}/finetune.pt2 for each seed (the service's
    model_name is the file's stem, and it is part of the code key)."""
    for seed in seeds:
        (out_dir / f"s{seed}").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", GENERATE, str(ROOT), str(out_dir),
                    *map(str, seeds)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return [out_dir / f"s{seed}" / "finetune.pt2" for seed in seeds]


def _wait_warm(client: httpx.Client, timeout_s: float = 120) -> None:
    """Until every slot holds a warmed-up sandbox, as on a service that is not saturated
    (each job's sandbox is fresh: a slot warms a new one, ~5 s, after every job)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        slots = client.get("/v1/info").json()["executor"].get("slots") or []
        if slots and all(slot["state"] == "ready" for slot in slots):
            return
        time.sleep(0.2)


def reuse(server: Server, programs: list[Path]) -> list[Row]:
    """The first program compiles (its structure is new to this service); each later one,
    the same structure with other weights, should take the first one's compiled code.
    Each is submitted once the slots are warm, the first one too."""
    first, *tunes = programs
    with server.client() as client:
        _wait_warm(client)
        first_s, response = _timed_submit(client, first)
        base = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
        times, reused, verified = [], 0, 0
        for program in tunes:
            _wait_warm(client)
            elapsed, response = _timed_submit(client, program)
            job = client.get(f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
            times.append(elapsed)
            reused += job.get("code_reused_from") is not None
            verified += bool((job.get("verification") or {}).get("passed"))
            print(f"  {program.parent.name}/{program.name}: {elapsed:.2f} s, reused from "
                  f"{job.get('code_reused_from')}: {_breakdown(job, elapsed)}", flush=True)
    median = statistics.median(times)
    print(f"  first lowering {first_s:.2f} s: {_breakdown(base, first_s)}", flush=True)
    return [
        Row("reuse: fine-tune / first lowering, end to end",
            f"{median / first_s:.2f} ({median:.2f} s median of {len(times)} / {first_s:.2f} s)",
            "<= 0.2", _verdict(median / first_s <= 0.2)),
        Row("reuse: fine-tunes that reused the code and verified",
            f"{min(reused, verified)} of {len(tunes)}", "all", _verdict(
                reused == verified == len(tunes))),
    ]


def seeds(first_seed: int, count: int) -> list[int]:
    return [first_seed + i for i in range(count)]


if __name__ == "__main__":  # a quick stand-alone run: python bench/reuse.py
    import tempfile

    from harness import serve

    with tempfile.TemporaryDirectory(prefix="reuse-bench-") as tmp_name:
        tmp = Path(tmp_name)
        made = generate_fine_tunes(tmp / "programs", seeds(int(time.time()) % 100_000, 4))
        with serve(tmp / "data", workers=1) as running:
            for row in reuse(running, made):
                print(f"{row.figure}: {row.measured} (target {row.target}) {row.verdict}")
