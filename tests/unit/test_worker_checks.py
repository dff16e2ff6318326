"""The supervisor trusts nothing the sandboxed child says: its result is reduced to the
fields and types we store. Hostile values first, then what a real child sends."""

from __future__ import annotations

import math
from typing import Any

import pytest

from app.worker import _checked_profile, _checked_result

GOOD = {"eager_ms": 0.05, "compiled_ms": 0.003, "speedup": 16.6, "runs": 25}


@pytest.mark.parametrize("bad", [
    None, [], "fast", {}, {**GOOD, "runs": 0}, {**GOOD, "runs": 10**6}, {**GOOD, "runs": True},
    {**GOOD, "runs": 2.5}, {**GOOD, "eager_ms": math.nan}, {**GOOD, "compiled_ms": math.inf},
    {**GOOD, "speedup": -1.0}, {**GOOD, "speedup": 1e12}, {**GOOD, "eager_ms": "1"},
    {**GOOD, "compiled_ms": False}, {k: v for k, v in GOOD.items() if k != "speedup"},
])
def test_an_implausible_profile_is_dropped(bad: Any) -> None:
    assert _checked_profile(bad) is None


def test_a_profile_keeps_only_its_four_numbers() -> None:
    sent = {**GOOD, "note": "x" * 10_000, "eager_ms": 1}
    assert _checked_profile(sent) == {**GOOD, "eager_ms": 1.0}


def test_the_result_carries_a_checked_profile() -> None:
    result = _checked_result({"timings": {"lower": 1.0}, "verification": {"passed": True},
                              "toolchain": {}, "profile": {**GOOD, "runs": -3}})
    assert result["profile"] is None and result["timings"] == {"lower": 1.0}
    assert _checked_result({"timings": {}, "profile": GOOD})["profile"] == GOOD
