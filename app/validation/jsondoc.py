"""Bounded JSON parsing and the name and string rules shared by the graph and payload checks.

Names (parameters, buffers, constants, module paths) may hold anything torch allows,
non-ASCII letters, hyphens and spaces included, except what can end or escape the
string literal or the line they are pasted into (torch pastes them into generated
Python and AOTInductor C++): quotes, backslashes, control and format characters, line
and paragraph separators, the trigraph lead ``??``, and empty dotted parts.

String *arguments* of operators (``as_string``) are held to a narrower set: inductor
pastes them into C++ as ``"<value>"`` without escaping, and the strings torch's own
operators take (``"floor"``, ``"tanh"``, ``"ij,jk->ik"``, ``"reflect"``) need no more.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from app.errors import ApiErrorCode, PayloadTooLarge, Unprocessable

MAX_NAME_CHARS = 4096
# FX node and value names: torch.fx replaces every other character with "_".
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,4095}")
# Operator string arguments: no quote, backslash, brace, dollar, control character or newline.
SAFE_STRING = re.compile(r"[A-Za-z0-9 _.,:;=+\-*/()<>\[\]#@!?%]{0,1024}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BREAKOUT = frozenset("'\"\\")
MAX_JSON_INT = 1 << 64  # uint64 max + 1: the widest integer a tensor or a range may hold

ErrorFactory = Callable[[str], Unprocessable]


def json_values_bound(data: bytes) -> int:
    """An upper bound on the number of values in the JSON document ``data``.

    Every value but the root follows a comma or opens a container, so values <= 1 +
    commas + brackets (commas and brackets inside strings only make it looser).
    Counted on the raw bytes before parsing, so no document is ever built beyond it.
    """
    return 1 + data.count(b",") + data.count(b"[") + data.count(b"{")


def load_json(data: bytes, *, where: str, max_depth: int, error: ErrorFactory,
              max_values: int | None = None) -> Any:
    """Parse ``data`` (UTF-8 JSON), refusing more than ``max_values`` values or documents
    nested deeper than ``max_depth``."""
    if max_values is not None and json_values_bound(data) > max_values:
        raise PayloadTooLarge(f"member {where!r} holds more than {max_values} JSON values "
                              "(LOWERING_ARCHIVE_MAX_JSON_VALUES)",
                              code=ApiErrorCode.ARCHIVE_TOO_LARGE)
    try:
        doc = json.loads(data.decode("utf-8"))
    except MemoryError:
        raise
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
        elif isinstance(item, int) and not -MAX_JSON_INT <= item <= MAX_JSON_INT:
            raise error(f"member {where!r} holds an integer of {len(str(abs(item)))} digits; "
                        f"integers must lie within +-2**64")
    return doc


def check_text(value: str, where: str, error: ErrorFactory) -> None:
    """Free text (stack traces, messages) may not carry control characters."""
    if _CONTROL.search(value):
        raise error(f"member {where!r} holds a string with control characters: "
                    f"{value[:60]!r}")


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a parameter/buffer/constant name or module path (or None)."""
    if not isinstance(value, str):
        return "is not a string"
    if not value or len(value) > MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters"
    if "" in value.split("."):
        return "has an empty dotted part"
    if "??" in value:
        return "holds '??' (a C++ trigraph lead)"
    for char in value:
        if char in _BREAKOUT:
            return f"holds {char!r} (quotes and backslashes can end a string literal)"
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return (f"holds U+{ord(char):04X} (control, format, line-separator or "
                    "unassigned characters are not accepted in names)")
    return None


def need_name(value: object, what: str, where: str, error: ErrorFactory) -> str:
    """A state-dict style name: see :func:`name_problem`."""
    problem = name_problem(value)
    if problem:
        raise error(f"member {where!r}: {what} {str(value)[:80]!r} {problem}")
    return value  # type: ignore[return-value]


def need_identifier(value: object, what: str, where: str, error: ErrorFactory) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise error(f"member {where!r}: {what} {str(value)[:80]!r} is not an identifier")
    return value


def need_python_identifier(value: object, what: str, where: str, error: ErrorFactory) -> str:
    """A Python identifier (argument names may be non-ASCII, as Python allows)."""
    if not isinstance(value, str) or not value.isidentifier() or len(value) > MAX_NAME_CHARS:
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
    return Unprocessable(message, code=ApiErrorCode.UNSAFE_GRAPH)
