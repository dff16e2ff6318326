"""Checks that a report carries no number computed by compiled code (torch-free)."""

from __future__ import annotations

import json
import re
from typing import Any

# Values a leaking runner would return: heap pointers as float64, a neighbour's data.
PLANTED = [94_613_258_437_520.0, 1234.5678, -0.000123456, 6.02e23, 3.3e-39]
BUCKET = re.compile(r"(?:<|>=)?1e[-+]?\d+(?:\.\.1e[-+]?\d+)?")
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+[eE][-+]?\d+|0x[0-9a-fA-F]+|\d{6,})")


def leaked_numbers(text: str, *, allowed: tuple[float, ...] = ()) -> list[str]:
    """Float-looking tokens in ``text`` other than error buckets and the tolerances."""
    scrubbed = BUCKET.sub("<bucket>", text)
    found = []
    for token in NUMBER.findall(scrubbed):
        hexadecimal = token.lower().lstrip("+-").startswith("0x")
        value = float(int(token, 16)) if hexadecimal else float(token)
        if value not in allowed:
            found.append(token)
    return found


def assert_no_values(record: Any, *, allowed: tuple[float, ...]) -> None:
    """No float in ``record`` but the tolerances; no float-looking text in its strings."""

    def walk(node: Any) -> None:
        if isinstance(node, float):
            assert node in allowed, f"float {node!r} in {record!r:.2000}"
        elif isinstance(node, str):
            assert not leaked_numbers(node, allowed=allowed), (node, record)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list | tuple):
            for value in node:
                walk(value)

    walk(record)
    text = json.dumps(record, default=str)
    for value in PLANTED:  # in case a planted value was turned into text some other way
        for form in (repr(value), f"{value:.3g}", f"{value:.4g}", f"{value:g}", f"{value:.6e}"):
            assert form not in text, (form, text[:2000])
