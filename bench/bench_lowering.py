"""Is the service fast? One run, one machine, plain way vs service, nine figures.

1. distinct:  a never-seen model, upload -> archive in hand (``POST ?wait=``) on a warm
              service vs the plain way (fresh ``python``: import torch, load,
              ``lower_exported_program``, ``package_nativert_with_aoti_delegate``) with its
              own warm TORCHINDUCTOR_CACHE_DIR. Interleaved. Target ratio <= 0.75.
2. identical: the same bytes and parameters again vs the plain median. Target <= 1/100.
3. parallel:  8 distinct models at once vs 8 others one by one, 2 workers. Target <= 0.65.
4. latency:   GET /v1/lowerings/{id} while every worker compiles. Target p99 < 50 ms.
5. upload:    API process RSS rise while a 1 GiB upload streams in. Target < 64 MB.
6. sandbox:   the same distinct models through LOWERING_SANDBOX=required and =off servers,
              alternating: what the sandbox costs per job (info, no target).
7. weights:   programs with ~10 MB, ~100 MB and ~1 GB of weights (--weights-mb), each
              through the plain way and the service: end-to-end time, worker peak RSS
              (target <= 2.5x the weights), API RSS rise (< 64 MB: it never holds an upload
              or an archive) and archive size (target <= 1.10x the upload).
8. reuse:     fine-tunes (the same structure, other weights: tests.models.FineTune) vs
              the first lowering of that structure, end to end, each submitted on warm
              slots (bench/reuse.py). Target <= 0.2x, every one reused and verified.
9. fleet:     ``make fleet`` started from here (bench/fleet.py): 8 distinct programs at once
              on two worker hosts vs on one (target <= 0.6x), and a cache hit through the
              fleet vs through this local service (target <= 2x).

Every upload is a program generated here with its own seed (bench/gen_programs.py), so no
two share a sha256 and the result cache can only hit where figure 2 asks it to.

    .venv/bin/python bench/bench_lowering.py [--quick] [--only distinct --only upload ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import figures
import fleet
import reuse
from figures import Distinct, Row
from gen_programs import KINDS
from harness import generate, plain_once, serve

FIGURES = ("distinct", "identical", "parallel", "latency", "upload", "sandbox", "weights",
           "reuse", "fleet")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run")
    parser.add_argument("--only", action="append", choices=FIGURES,
                        help="measure only this figure (repeatable)")
    parser.add_argument("--rounds", type=int, help="distinct-model rounds (3 models each)")
    parser.add_argument("--parallel", type=int, help="models in the parallel figure (8)")
    parser.add_argument("--requests", type=int, default=300, help="GETs in the latency figure")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="pin the run to this many cores")
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--weights-mb", help="weight sizes of the weights figure, MB "
                        "(default 10,100,1000; --quick 10,100)")
    parser.add_argument("--seed", type=int, help="first program seed (default: from the clock)")
    parser.add_argument("--plain-cache-dir", type=Path,
                        help="the plain way's inductor cache (default: a temp dir, warmed once)")
    args = parser.parse_args(argv)
    args.only = set(args.only or FIGURES)
    if "identical" in args.only:
        args.only.add("distinct")  # it compares with the plain median and reuses its uploads
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.parallel = args.parallel or (4 if args.quick else 8)
    args.weights_mb = [int(mb) for mb in (args.weights_mb
                                          or ("10,100" if args.quick else "10,100,1000")
                                          ).split(",")]
    return args


def _pin(cores: int) -> str:
    available = sorted(os.sched_getaffinity(0))
    if len(available) > cores:
        os.sched_setaffinity(0, available[:cores])  # children (server, workers, g++) inherit
    return f"{min(cores, len(available))} of {os.cpu_count()} cores"


class Programs:
    """Hands out distinct program paths; all are generated in one torch process."""

    def __init__(self, out_dir: Path, first_seed: int) -> None:
        self.out_dir, self.seed = out_dir, first_seed
        self.specs: list[str] = []

    def take(self, count: int, kinds: tuple[str, ...] = KINDS) -> list[Path]:
        paths = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            self.specs.append(f"{kind}:{self.seed}")
            paths.append(self.out_dir / f"{kind}_s{self.seed}.pt2")
            self.seed += 1
        return paths


def _guard(name: str, body: Callable[[], list[Row]]) -> list[Row]:
    print(f"\n[{name}]", flush=True)
    try:
        return body()
    except Exception as exc:  # one broken figure must not hide the others
        print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
        return [Row(name, f"error: {type(exc).__name__}", "", "n/a")]


def _info_rows(server_ready_s: float, state: Distinct) -> list[Row]:
    rows = [Row("service start -> /readyz 200", f"{server_ready_s:.1f} s", "info", "-")]
    resources = [job.get("resources") or {} for job in state.jobs]
    for key, scale, unit in (("cpu_s", 1.0, "s"), ("children_cpu_s", 1.0, "s"),
                             ("peak_rss_bytes", 1e6, "MB")):
        values = [r[key] / scale for r in resources if r.get(key) is not None]
        measured = f"{statistics.median(values):.1f} {unit}" if values else "n/a"
        if state.jobs:
            rows.append(Row(f"per-job resources.{key} (median)", measured, "info", "-"))
    return rows


def _table(rows: list[Row]) -> None:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("figure", "measured", "target")]
    print()
    print(f"{'figure':{widths[0]}}  {'measured':{widths[1]}}  {'target':{widths[2]}}  result")
    print("-" * (sum(widths) + 14))
    for r in rows:
        print(f"{r.figure:{widths[0]}}  {r.measured:{widths[1]}}  {r.target:{widths[2]}}  "
              f"{r.verdict}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(f"bench: {', '.join(f for f in FIGURES if f in args.only)} on {_pin(args.cores)}, "
          f"{args.workers} workers{' (quick)' if args.quick else ''}", flush=True)
    rows: list[Row] = []
    state = Distinct()
    with tempfile.TemporaryDirectory(prefix="lowering-bench-") as tmp_name:
        tmp = Path(tmp_name)
        programs = Programs(tmp / "programs", args.seed or int(time.time()) % 100_000 * 1000)
        warmup = programs.take(1) if args.only & {"distinct", "weights"} else []
        distinct = programs.take(args.rounds * len(KINDS)) if "distinct" in args.only else []
        busy = programs.take(2 * args.workers) if "latency" in args.only else []
        par = programs.take(2 * args.parallel) if "parallel" in args.only else []
        boxed = programs.take(args.rounds * len(KINDS)) if "sandbox" in args.only else []
        fleet_programs = programs.take(fleet.PARALLEL + 1) if "fleet" in args.only else []
        heavy = ([p for mb in args.weights_mb for p in programs.take(1, (f"w{mb}",))]
                 if "weights" in args.only else [])
        started = time.perf_counter()
        generate(programs.out_dir, programs.specs)
        print(f"generated {len(programs.specs)} programs in {time.perf_counter() - started:.0f} s",
              flush=True)
        plain_cache = args.plain_cache_dir or tmp / "plain-inductor"
        for program in warmup:
            print(f"plain way warm-up: {plain_once(program, tmp / 'warm.pt2', plain_cache):.1f} s",
                  flush=True)
        extra = {"LOWERING_MAX_UPLOAD_BYTES": str(max(args.upload_mib * 2**20 * 5 // 4,
                                                      int(1.1 * 2**30)))}
        with serve(tmp / "data", workers=args.workers, extra_env=extra) as server:
            print(f"service ready in {server.ready_s:.1f} s (pid {server.pid})", flush=True)
            if "distinct" in args.only:
                (tmp / "plain-out").mkdir()
                rows += _guard("distinct", lambda: figures.distinct(
                    server, distinct, plain_cache, tmp / "plain-out", state))
            if "identical" in args.only and state.done:
                rows += _guard("identical", lambda: figures.identical(server, state))
            if "latency" in args.only:
                rows += _guard("latency", lambda: figures.latency(
                    server, busy, args.workers, max(200, args.requests)))
            if "parallel" in args.only:
                half = len(par) // 2
                rows += _guard("parallel", lambda: figures.parallel(server, par[:half], par[half:]))
            if "upload" in args.only:
                rows += _guard("upload", lambda: figures.upload(server, args.upload_mib * 2**20))
            if "weights" in args.only:
                (tmp / "plain-heavy").mkdir()
                rows += _guard("weights", lambda: figures.weights(
                    server, heavy, plain_cache, tmp / "plain-heavy"))
            if "reuse" in args.only:
                tunes = reuse.generate_fine_tunes(
                    tmp / "fine-tunes", reuse.seeds(args.seed or int(time.time()) % 100_000,
                                                    3 if args.quick else 5))
                rows += _guard("reuse", lambda: reuse.reuse(server, tunes))
            if "fleet" in args.only:
                rows += _guard("fleet", lambda: fleet.fleet(
                    server, fleet_programs[:-1], fleet_programs[-1], tmp / "fleet",
                    tmp / "data" / "inductor"))
            if "sandbox" in args.only:
                off_env = {**extra, "LOWERING_SANDBOX": "off"}
                with serve(tmp / "data-off", workers=args.workers, extra_env=off_env) as off:
                    rows += _guard("sandbox", lambda: figures.sandbox_cost(server, off, boxed))
            rows += _info_rows(server.ready_s, state)
    _table(rows)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
