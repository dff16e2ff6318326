"""The CUDA path, end to end on one GPU host: export, lower, package, verify, and a table.

Run from the repository root on a machine whose ``python3`` has a CUDA build of torch
(``bench/gpu_check.sh`` does). It runs what a job's sandbox runs
(``app.lowering.pipeline.run_lowering``) in process, with ``device=cuda``, on a few test
programs exported here (a .pt2 saved by another torch may not load in this one), and
verifies each archive on the GPU against the original program. A same-run CPU lowering of
each program is the baseline. Nothing here needs the service's web stack, bwrap or a
database.

    python3 bench/gpu_check.py [--device cuda] [--models linear,dynamic] [--json OUT.json]

Each lowering runs in a child process, so one that crashes torch (a segfault in its
loader, say) is a row of the table, not the end of the check.

Exit status: 0 when every program lowered and verified on the device, 1 when some did
not, 2 when this torch cannot lower at all (no CUDA, no torch.nativert backends).

Seen on an H100 with torch 2.11.0+cu130 (2026-11-27): lowering and packaging for cuda
work (linear in 6.9 s, a .cubin in the archive, compute capability 90), but torch 2.11's
``AOTIModelPackageLoader`` segfaults on every archive, CPU or CUDA, the stock
``package_nativert_with_aoti_delegate``'s included: verification needs the loader of the
torch the service pins (2.13).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("linear", "convnet", "dynamic", "dict_io", "kwargs", "counter")


def _environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "g++": shutil.which("g++"), "nvcc": shutil.which("nvcc"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(index)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
    if env["nvcc"]:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        env["nvcc_version"] = out.strip().splitlines()[-1] if out.strip() else None
    try:
        import torch.nativert.backends._lower_utils  # noqa: F401

        env["nativert_backends"] = True
    except ImportError as exc:
        env["nativert_backends"] = f"missing: {exc}"
    return env


def _lower_one(name: str, device: str, work: Path) -> dict[str, Any]:
    from app.errors import JobError
    from app.lowering.pipeline import run_lowering
    from tests.models import save_model

    row: dict[str, Any] = {"model": name, "device": device}
    program = save_model(name, work / f"{name}.pt2")
    out = work / f"{name}-{device.replace(':', '')}.pt2"
    started = time.perf_counter()
    try:
        result = run_lowering(
            program_path=program, out_path=out, model_name=name, backend_id="aoti",
            device=device, options={}, verify=True, rtol=1e-3, atol=1e-3,
            provenance={"check": "bench/gpu_check.py"})
    except JobError as exc:
        row.update(ok=False, error=f"{exc.code}: {exc.message}"[:300])
        return row
    except Exception as exc:  # the table must still print
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300],
                   trace=traceback.format_exc()[-2000:])
        return row
    finally:
        row["wall_s"] = round(time.perf_counter() - started, 2)
    verification = result.verification or {}
    row.update(
        ok=bool(verification.get("passed")), cases=len(verification.get("cases", [])),
        error_magnitude=verification.get("error_magnitude"),
        phases_s={k: round(v, 2) for k, v in result.timings.items()},
        archive_mb=round(out.stat().st_size / 1e6, 2),
    )
    return row


def _isolated(name: str, device: str, work: Path) -> dict[str, Any]:
    """``_lower_one`` in a child process; a crash becomes a row saying where it died."""
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", __file__, "--one", name, "--device", device,
         "--work", str(work)], capture_output=True, text=True, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        row: dict[str, Any] = json.loads(lines[-1])
        return row
    # faulthandler lists the crashing thread after "Current thread", innermost frame first;
    # a traceback lists its innermost frame last.
    err = proc.stderr
    crashed = "Current thread" in err
    err = err[err.find("Current thread"):] if crashed else err
    frames = [line.strip() for line in err.splitlines() if line.strip().startswith("File ")]
    where = (frames[0] if crashed else frames[-1]) if frames else "no Python frame"
    return {"model": name, "device": device, "ok": False,
            "error": f"child died (exit {proc.returncode}) in {where}"}


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<10} {'device':<7} {'ok':<5} {'wall s':>7} {'lower s':>8} " \
           f"{'verify s':>9} {'cases':>5} {'max err':<12} {'MB':>6}  error"
    lines = [head, "-" * len(head)]
    for row in rows:
        phases = row.get("phases_s", {})
        lines.append(
            f"{row['model']:<10} {row['device']:<7} {str(row.get('ok')):<5} "
            f"{row.get('wall_s', 0):>7} {phases.get('lower', ''):>8} "
            f"{phases.get('verify', ''):>9} {row.get('cases', ''):>5} "
            f"{str(row.get('error_magnitude') or ''):<12} {row.get('archive_mb', ''):>6}  "
            f"{row.get('error', '')[:120]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--no-baseline", action="store_true", help="skip the CPU lowerings")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one lowering
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_lower_one(args.one, args.device, args.work)), flush=True)
        return 0

    env = _environment(args.device)
    print(json.dumps(env, indent=1), flush=True)
    if env["nativert_backends"] is not True:
        print(f"cannot lower with torch {env['torch']}: torch.nativert.backends is "
              f"{env['nativert_backends']}", flush=True)
        return 2
    if args.device.startswith("cuda") and not env["cuda_available"]:
        print("no usable CUDA device", flush=True)
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.models.split(","):
            devices = [args.device] if args.no_baseline or args.device == "cpu" else [
                "cpu", args.device]
            for device in devices:
                work = Path(tmp) / device.replace(":", "")
                work.mkdir(exist_ok=True)
                row = _isolated(name, device, work)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
                if "trace" in row:
                    print(row["trace"], flush=True)
    print("\n" + _table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    on_device = [row for row in rows if row["device"] == args.device]
    return 0 if on_device and all(row["ok"] for row in on_device) else 1


if __name__ == "__main__":
    sys.exit(main())
