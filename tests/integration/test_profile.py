"""Profiling shares the original's weights only when running it cannot change them."""

from __future__ import annotations

import pytest

from app.lowering.profile import _mutates
from tests.models import export_model


@pytest.mark.parametrize(("name", "mutates"), [
    ("linear", False), ("convnet", False), ("dynamic", False), ("dict_io", False),
    ("counter", True),  # steps.add_(1): in place, and torch 2.13's signature does not say so
])
def test_mutation_is_seen_in_the_graph(name: str, mutates: bool) -> None:
    assert _mutates(export_model(name)) is mutates
