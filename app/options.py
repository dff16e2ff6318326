"""The AOTInductor settings a caller may pass in ``options``, and their checks.

Only keys listed here reach ``torch._inductor.config``; anything else is a 422. Every
refusal is a 422: ``unknown_option``, ``invalid_option`` for one key's value, and
``invalid_parameter`` for the field as a whole (not JSON, not an object, over a limit).
This module never imports torch: the API validates with it, the worker applies it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from app.errors import ApiErrorCode, Unprocessable


@dataclass(frozen=True)
class OptionSpec:
    """One allowed option: its type, the values it takes, and what it does."""

    type: type
    description: str
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.__name__, "description": self.description}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.pattern is not None:
            out["pattern"] = self.pattern
        return out


EMBED_OPTION = "aot_inductor.package_constants_in_so"
ALLOWED_OPTIONS: dict[str, OptionSpec] = {
    "cpp.march": OptionSpec(
        str,
        "CPU target for generated C++ (-march=); e.g. x86-64-v2 for portable artifacts. "
        "Default: the host's own (native).",
        pattern=r"^[a-z0-9][a-z0-9_.+-]{0,63}$",
    ),
    "cpp.simdlen": OptionSpec(int, "Vector width in bits for CPU kernels.", (128, 256, 512)),
    "max_autotune": OptionSpec(bool, "Benchmark kernel choices while compiling (slower)."),
    "freezing": OptionSpec(bool, "Fold weights into the graph as constants."),
    "epilogue_fusion": OptionSpec(bool, "Fuse pointwise ops into matmul epilogues."),
    "aot_inductor.debug_compile": OptionSpec(bool, "Compile with debug info (-g)."),
    EMBED_OPTION: OptionSpec(
        bool, "Also compile the weights into the delegate's .so: a self-contained runner, "
        "an archive about twice the weights. Default false: weights stored once, bound "
        "to the runner at load (see provenance.json weights.load)."),
    "aot_inductor.compile_wrapper_opt_level": OptionSpec(
        str, "Optimisation level of the C++ wrapper.", ("O0", "O1", "O2", "O3")
    ),
    "aot_inductor.use_runtime_constant_folding": OptionSpec(
        bool, "Fold constants when the model loads instead of at compile time."
    ),
}


MAX_OPTIONS_BYTES = 4096
"""The ``options`` field is a flat object of a few settings; anything bigger is a mistake."""
MAX_OPTIONS_DEPTH = 8
"""Arrays/objects nested deeper than this are refused before json.loads recurses."""
MAX_NUMBER_CHARS = 32
"""A number token longer than this is refused (Python's int() stops at 4300 digits)."""


def parse_options(raw: str | None) -> dict[str, Any]:
    """Parse the ``options`` form field and return it normalised (sorted keys).

    The JSON is parsed with bounds (size, nesting, number length, finite numbers,
    no duplicate keys), so hostile input is a 4xx naming the limit, never a crash.
    """
    if raw is None or raw.strip() == "":
        return {}
    value = parse_bounded_json(raw, what="options")
    if not isinstance(value, dict):
        raise Unprocessable("options must be a JSON object of AOTInductor settings")
    out: dict[str, Any] = {}
    for key in sorted(value):
        spec = ALLOWED_OPTIONS.get(key)
        if spec is None:
            raise Unprocessable(
                f"option {key[:80]!r} is not allowed; "
                f"allowed: {', '.join(sorted(ALLOWED_OPTIONS))}",
                code=ApiErrorCode.UNKNOWN_OPTION,
            )
        out[key] = _check(key, spec, value[key])
    return out


def parse_bounded_json(
    raw: str,
    *,
    what: str,
    max_bytes: int = MAX_OPTIONS_BYTES,
    max_depth: int = MAX_OPTIONS_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
) -> Any:
    """json.loads with limits; every refusal is Unprocessable (``invalid_parameter``)."""
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise Unprocessable(f"{what} is {size} bytes of JSON; at most {max_bytes} bytes allowed")
    depth = _max_depth(raw)
    if depth > max_depth:
        raise Unprocessable(
            f"{what} nests arrays/objects {depth} levels deep; at most {max_depth} allowed "
            "(options is a flat JSON object)"
        )

    def number(token: str) -> str:
        if len(token) > max_number_chars:
            raise Unprocessable(
                f"{what} holds a number of {len(token)} digits/characters; numbers may have "
                f"at most {max_number_chars}"
            )
        return token

    def as_int(token: str) -> int:
        return int(number(token))

    def as_float(token: str) -> float:
        result = float(number(token))
        if not math.isfinite(result):
            raise Unprocessable(f"{what} holds the number {token!r}, which is not finite")
        return result

    def constant(token: str) -> Any:
        raise Unprocessable(f"{what} is not valid JSON: {token} is not allowed (JSON has no "
                            "NaN or Infinity)")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, item in items:
            if key in out:
                raise Unprocessable(f"{what} gives the key {key[:80]!r} twice")
            out[key] = item
        return out

    try:
        return json.loads(raw, parse_int=as_int, parse_float=as_float,
                          parse_constant=constant, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"{what} is not valid JSON: {exc.msg} at position {exc.pos}"
                            ) from exc
    except (RecursionError, ValueError) as exc:  # belt and braces: the limits above prevent these
        raise Unprocessable(f"{what} could not be parsed within limits: {type(exc).__name__}"
                            ) from exc


def _max_depth(raw: str) -> int:
    """How deep ``[``/``{`` nest outside string literals (a scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


def _check(key: str, spec: OptionSpec, item: Any) -> Any:
    # bool is a subclass of int in Python; keep them apart.
    if type(item) is not spec.type:
        raise Unprocessable(
            f"option {key!r} must be of type {spec.type.__name__}", code=ApiErrorCode.INVALID_OPTION
        )
    if spec.choices is not None and item not in spec.choices:
        raise Unprocessable(
            f"option {key!r} must be one of {list(spec.choices)}", code=ApiErrorCode.INVALID_OPTION
        )
    if spec.pattern is not None and not re.fullmatch(spec.pattern, str(item)):
        raise Unprocessable(
            f"option {key!r} must match {spec.pattern}", code=ApiErrorCode.INVALID_OPTION
        )
    return item
