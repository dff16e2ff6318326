"""Verification never hands back a value the compiled code computed.

Compiled code that reads out of bounds returns heap words (pointers, other
tensors' data) as its outputs. Whatever verification reports (the job's
``verification``, the ``verification_failed`` message and detail, provenance.json,
the job log) may name outputs, shapes, dtypes and a power-of-ten bucket of the
error, never a number taken from the outputs or their difference to the reference.

A fake runner stands in for the compiled one here, so no compile is needed: it
returns planted values that must not come back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.lowering import package as package_module
from app.lowering.pipeline import _failure_message
from app.lowering.verify import error_bucket, verify_archive
from tests.leaks import PLANTED, assert_no_values, leaked_numbers
from tests.models import export_model


class _Loader:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (x,) = tensors
        batch = x.shape[0]
        if self.mode == "raise":
            raise RuntimeError(f"bad read at 0x7ffd12345678: value {PLANTED[1]} and {PLANTED[0]}")
        if self.mode == "shape":
            return [torch.full((batch, 9), PLANTED[1])]
        if self.mode == "dtype":
            return [torch.full((batch, 8), 12345678, dtype=torch.int64)]
        if self.mode == "nan":
            return [torch.full((batch, 8), float("nan"))]
        if self.mode == "close":  # right but for a tiny error: passes loose tolerances
            return [self.reference(x) + 3.3e-7]
        out = torch.tensor(PLANTED * 20)[: batch * 8].reshape(batch, 8)
        return [out]

    reference: Any = None


@pytest.fixture
def program() -> Any:
    return export_model("dynamic")


def _verify(monkeypatch: pytest.MonkeyPatch, program: Any, mode: str, rtol: float = 1e-4,
            atol: float = 1e-5) -> dict[str, Any]:
    loader = _Loader(mode)
    loader.reference = program.module()
    runner = SimpleNamespace(loader=loader)
    monkeypatch.setattr(package_module, "load_pt2",
                        lambda *a, **k: SimpleNamespace(aoti_runners={"m-aoti": runner}))
    return verify_archive(archive_path=Path("unused.pt2"), program=program, model_name="m",
                          backend_id="aoti", device="cpu", rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["garbage", "shape", "dtype", "nan", "raise"])
def test_failed_verification_reports_no_output_values(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, program: Any, mode: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.lowering")
    verification = _verify(monkeypatch, program, mode)
    assert verification["passed"] is False
    allowed = (1e-4, 1e-5)
    assert_no_values(verification, allowed=allowed)
    message = _failure_message(verification)
    assert not leaked_numbers(message, allowed=allowed), message
    assert "output 0" in message or "runner" in message
    assert not leaked_numbers(caplog.text, allowed=allowed), caplog.text[-3000:]
    bad = next(c for c in verification["cases"] if not c["passed"])
    if mode != "raise":
        assert bad["mismatched_outputs"] == [0]
        (out,) = bad["outputs"]
        assert out["index"] == 0 and out["passed"] is False
        assert out["expected"]["shape"][1] == 8 and out["expected"]["dtype"] == "float32"
    if mode == "shape":
        assert bad["outputs"][0]["got"]["shape"][1] == 9
        assert "error_magnitude" not in bad["outputs"][0]
        assert "shape" in message
    if mode == "dtype":
        assert bad["outputs"][0]["got"]["dtype"] == "int64"
    if mode == "nan":
        assert bad["outputs"][0]["error_magnitude"] == "non-finite"
    if mode == "garbage":
        assert bad["outputs"][0]["error_magnitude"] == ">=1e3"


def test_passed_verification_reports_a_bucket_not_a_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, program: Any
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.lowering")
    verification = _verify(monkeypatch, program, "close", rtol=1e-3, atol=1e-3)
    assert verification["passed"] is True, verification
    assert_no_values(verification, allowed=(1e-3,))
    assert verification["error_magnitude"] == "1e-7..1e-6"
    assert "3.3e-07" not in caplog.text and not leaked_numbers(caplog.text, allowed=(1e-3,))


@pytest.mark.parametrize(
    ("error", "bucket"),
    [(0.0, "0"), (1e-15, "<1e-12"), (3e-7, "1e-7..1e-6"), (0.5, "1e-1..1e0"),
     (1.0, "1e0..1e1"), (999.0, "1e2..1e3"), (1000.0, ">=1e3"), (1e300, ">=1e3"),
     (float("inf"), "non-finite"), (float("nan"), "non-finite")],
)
def test_error_bucket(error: float, bucket: str) -> None:
    assert error_bucket(error) == bucket
