"""The job as clients see it: verification goes out through an allowlist."""

from __future__ import annotations

import datetime as dt
from typing import Any

from app.schemas import LoweringPublic
from tests.leaks import assert_no_values

# A report as verification wrote it before it stopped recording raw errors.
OLD_STYLE = {
    "passed": False, "max_abs_error": 94613258437520.0, "rtol": 1e-4, "atol": 1e-5,
    "cases": [{"name": "example", "sizes": {"s0": 4}, "input_shapes": [[4, 16]],
               "max_abs_error": 94613258437520.0, "passed": False, "worst_output": 0,
               "output_errors": [94613258437520.0, 1234.5678]}],
}
NEW_STYLE = {
    "passed": False, "error_magnitude": ">=1e3", "rtol": 1e-4, "atol": 1e-5,
    "cases": [{"name": "example", "sizes": {"s0": 4}, "input_shapes": [[4, 16]],
               "passed": False, "error_magnitude": ">=1e3", "mismatched_outputs": [0],
               "outputs": [{"index": 0, "passed": False, "error_magnitude": ">=1e3",
                            "expected": {"shape": [4, 8], "dtype": "float32"},
                            "got": {"shape": [4, 8], "dtype": "float32"}}]}],
}


def _job(**fields: Any) -> dict[str, Any]:
    return {"id": "a" * 32, "status": "failed", "model_name": "m", "backend_id": "aoti",
            "device": "cpu", "options": {}, "verify": True, "rtol": 1e-4, "atol": 1e-5,
            "input_sha256": "0" * 64, "input_size_bytes": 1, "artifact_sha256": None,
            "artifact_size_bytes": None, "timings": {}, "created_at": dt.datetime.now(dt.UTC),
            **fields}


def _public(**fields: Any) -> dict[str, Any]:
    return LoweringPublic.from_job(_job(**fields)).model_dump(mode="json")


def test_new_reports_go_out_unchanged() -> None:
    error = {"code": "verification_failed", "message": "m", "detail": NEW_STYLE}
    job = _public(verification=NEW_STYLE, error=error)
    assert job["verification"] == NEW_STYLE
    assert job["error"]["detail"] == NEW_STYLE


def test_raw_error_values_of_old_records_are_dropped() -> None:
    error = {"code": "verification_failed", "message": "m", "detail": OLD_STYLE}
    job = _public(verification=OLD_STYLE, error=error)
    for report in (job["verification"], job["error"]["detail"]):
        assert_no_values(report, allowed=(1e-4, 1e-5))
        assert report["cases"][0]["passed"] is False


def test_other_verification_failed_details_keep_only_type_and_phase() -> None:
    detail = {"exception_type": "RuntimeError", "phase": "verify", "log_tail": "x 1234.5678"}
    error = {"code": "verification_failed", "message": "m", "detail": detail}
    assert _public(error=error)["error"]["detail"] == {"exception_type": "RuntimeError",
                                                       "phase": "verify"}
    lowering = {"code": "lowering_failed", "message": "m", "detail": detail}
    assert _public(error=lowering)["error"]["detail"] == detail
