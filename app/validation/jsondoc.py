"""Bounded JSON parsing and the name rules shared by the graph and payload checks."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from app.errors import Unprocessable

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# Module paths: "layers.0.weight", "0.bias" (an nn.Sequential at the root).
DOTTED = re.compile(r"[A-Za-z0-9_]{1,256}(\.[A-Za-z0-9_]{1,256}){0,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

ErrorFactory = Callable[[str], Unprocessable]


def load_json(data: bytes, *, where: str, max_depth: int, error: ErrorFactory) -> Any:
    """Parse ``data`` (UTF-8 JSON), refusing documents nested deeper than ``max_depth``."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, RecursionError, ...
        raise error(f"member {where!r} is not valid JSON ({type(exc).__name__})") from exc
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise error(f"member {where!r} nests deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
    return doc


def check_text(value: str, where: str, error: ErrorFactory) -> None:
    """Free text (stack traces, messages) may not carry control characters."""
    if _CONTROL.search(value):
        raise error(f"member {where!r} holds a string with control characters: "
                    f"{value[:60]!r}")


def need_dotted(value: object, what: str, where: str, error: ErrorFactory) -> str:
    if not isinstance(value, str) or not DOTTED.fullmatch(value):
        raise error(f"member {where!r}: {what} {str(value)[:80]!r} is not a dotted "
                    "identifier")
    return value


def need_identifier(value: object, what: str, where: str, error: ErrorFactory) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise error(f"member {where!r}: {what} {str(value)[:80]!r} is not an identifier")
    return value


def need_dict(value: object, what: str, where: str, error: ErrorFactory) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"member {where!r}: {what} must be a JSON object")
    return value


def need_int(value: object, what: str, where: str, error: ErrorFactory, *,
             low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"member {where!r}: {what} must be an integer in [{low}, {high}]")
    return value


def graph_error(message: str) -> Unprocessable:
    return Unprocessable(message, code="unsafe_graph")
