"""Warm a fresh worker: one tiny lowering so inductor's headers and caches exist."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from app.lowering.pipeline import run_lowering

log = logging.getLogger("app.lowering")


def prime(scratch: Path) -> float:
    """Lower and verify a Linear model end to end; returns the seconds it took."""
    started = time.monotonic()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prime-", dir=scratch) as tmp:
        program = Path(tmp) / "prime.pt2"
        model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()).eval()
        torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(program))
        run_lowering(program_path=program, out_path=Path(tmp) / "prime-aoti.pt2",
                     model_name="prime", backend_id="aoti", device="cpu", options={},
                     verify=True, rtol=1e-4, atol=1e-4, provenance={})
    elapsed = time.monotonic() - started
    log.info("worker primed in %.1f s", elapsed)
    return elapsed
