"""The AOTInductor settings a caller may pass in ``options``, and their checks.

Only keys listed here reach ``torch._inductor.config``; anything else is a 422.
This module never imports torch: the API validates with it, the worker applies it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.errors import BadRequest, Unprocessable


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
    "aot_inductor.compile_wrapper_opt_level": OptionSpec(
        str, "Optimisation level of the C++ wrapper.", ("O0", "O1", "O2", "O3")
    ),
    "aot_inductor.use_runtime_constant_folding": OptionSpec(
        bool, "Fold constants when the model loads instead of at compile time."
    ),
}


def parse_options(raw: str | None) -> dict[str, Any]:
    """Parse the ``options`` form field and return it normalised (sorted keys)."""
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"options is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(value, dict):
        raise Unprocessable("options must be a JSON object of AOTInductor settings")
    out: dict[str, Any] = {}
    for key in sorted(value):
        spec = ALLOWED_OPTIONS.get(key)
        if spec is None:
            raise Unprocessable(
                f"option {key!r} is not allowed; allowed: {', '.join(sorted(ALLOWED_OPTIONS))}",
                code="unknown_option",
            )
        out[key] = _check(key, spec, value[key])
    return out


def _check(key: str, spec: OptionSpec, item: Any) -> Any:
    # bool is a subclass of int in Python; keep them apart.
    if type(item) is not spec.type:
        raise Unprocessable(
            f"option {key!r} must be of type {spec.type.__name__}", code="invalid_option"
        )
    if spec.choices is not None and item not in spec.choices:
        raise Unprocessable(
            f"option {key!r} must be one of {list(spec.choices)}", code="invalid_option"
        )
    if spec.pattern is not None and not re.fullmatch(spec.pattern, str(item)):
        raise Unprocessable(
            f"option {key!r} must match {spec.pattern}", code="invalid_option"
        )
    return item
