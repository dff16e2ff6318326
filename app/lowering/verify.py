"""Running the packaged AOTInductor runner against the original program.

The runner is loaded the way a consumer loads it (package.load_runner): when the
archive shares its weights, its constants come from the archive's data/weights/, not
from the program in memory. Cases: the example inputs, then for each dynamic
dimension symbol one other size inside its range (others kept at their example
sizes), so a runner that was specialised to the example sizes cannot pass.

The report never carries a value the compiled code computed (an out-of-bounds
read returns heap words): only which outputs (flat index) mismatched, shapes,
dtypes and a power-of-ten bucket of the error. The same holds for the log.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import re
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from app.lowering.lower import (
    affine_in_one_symbol,
    flat_example_inputs,
    symbol_ranges,
    symbolic_dims,
)
from app.lowering.package import load_runner
from app.lowering.profile import mutates, release_runner

log = logging.getLogger("app.lowering")

Case = tuple[str, dict[str, int], list[Any]]


def _example_sizes(ep: ExportedProgram, flat: list[Any]) -> dict[str, int]:
    """Each input symbol's size in the example: read off a dim that is the symbol, or
    solved from a derived dim a*s + b when no input carries the symbol alone."""
    sizes: dict[str, int] = {}
    derived: list[tuple[sympy.Expr, int]] = []
    for shape, value in zip(symbolic_dims(ep), flat, strict=False):
        if shape is None or not isinstance(value, torch.Tensor):
            continue
        for expr, actual in zip(shape, value.shape, strict=False):
            if isinstance(expr, sympy.Symbol):
                sizes[expr.name] = int(actual)
            elif isinstance(expr, sympy.Expr) and not expr.is_number:
                derived.append((expr, int(actual)))
    for expr, actual in derived:
        affine = affine_in_one_symbol(expr)
        if affine is None or affine[0].name in sizes:
            continue
        symbol, a, b = affine
        if (actual - b) % a == 0:
            sizes[symbol.name] = (actual - b) // a
    return sizes


def _candidates(example: int, lo: int, hi: int | None) -> list[int]:
    top = hi if hi is not None else max(example * 2, example + 8)
    picks = [example + 3, example - 1, example * 2, lo, top]
    return list(dict.fromkeys(v for v in picks if lo <= v <= top and v != example and v >= 0))


def _random_like(template: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if template.dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if template.is_floating_point() or template.is_complex():
        return torch.randn(shape, dtype=template.dtype)
    # Stay inside the values the example used: integer inputs are often indices.
    lo = int(template.min()) if template.numel() else 0
    hi = int(template.max()) if template.numel() else 1
    return torch.randint(lo, hi + 1, shape, dtype=template.dtype)


def _inputs_for(ep: ExportedProgram, flat: list[Any], sizes: dict[str, int]) -> list[Any]:
    out: list[Any] = []
    for shape, value in zip(symbolic_dims(ep), flat, strict=False):
        if shape is None or not isinstance(value, torch.Tensor):
            out.append(value)
            continue
        dims = []
        for expr, example in zip(shape, value.shape, strict=True):
            if isinstance(expr, int):
                dims.append(expr)
                continue
            named = {s: sizes[s.name] for s in expr.free_symbols if s.name in sizes}
            resolved = sympy.sympify(expr.xreplace(named))
            # A dim built from symbols no input carries alone keeps its example size.
            dims.append(int(resolved) if resolved.is_number else int(example))
        out.append(_random_like(value, dims))
    return out


MAX_ERROR_TEXT = 300
# Numbers that could carry memory: decimals, exponents, hex, long integers.
_DATA_LIKE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+[eE][-+]?\d+|0[xX][0-9a-fA-F]+|\d{6,})"
                        r"(?:[eE][-+]?\d+)?")


def error_bucket(error: float) -> str:
    """A power-of-ten bucket of an error, e.g. ``1e-3..1e-2``: coarse enough to carry no data.

    Compiled code that reads out of bounds returns heap words; reporting the
    error itself would hand them to the caller.
    """
    if not math.isfinite(error):
        return "non-finite"
    if error <= 0:
        return "0"
    if error < 1e-12:
        return "<1e-12"
    if error >= 1e3:
        return ">=1e3"
    k = math.floor(math.log10(error))
    if error < 10.0**k:  # log10 rounding at exact powers of ten
        k -= 1
    elif error >= 10.0 ** (k + 1):
        k += 1
    return f"1e{k}..1e{k + 1}"


def redact(text: str) -> str:
    """An error text with every number that could be data replaced by '...'."""
    return _DATA_LIKE.sub("...", text)[:MAX_ERROR_TEXT]


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return {"type": type(value).__name__}


def _compare(index: int, got: Any, exp: torch.Tensor, rtol: float, atol: float
             ) -> tuple[dict[str, Any], float | None]:
    """One output's report (no values in it) and its max abs error (kept internal;
    None when the output could not be compared at all)."""
    report: dict[str, Any] = {"index": index, "passed": False, "expected": _describe(exp),
                              "got": _describe(got)}
    if not isinstance(got, torch.Tensor):
        report["problem"] = "not a tensor"
        return report, None
    if tuple(got.shape) != tuple(exp.shape):
        report["problem"] = "shape"
        return report, None
    if got.dtype != exp.dtype:
        report["problem"] = "dtype"
        return report, None
    try:
        if got.is_complex() or exp.is_complex():
            got = torch.view_as_real(got.resolve_conj())
            exp = torch.view_as_real(exp.resolve_conj())
        g, e = got.detach().cpu().double(), exp.detach().cpu().double()
        both_nan = torch.isnan(g) & torch.isnan(e)
        diff = torch.where(both_nan, torch.zeros_like(g), (g - e).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        ok = bool((diff <= atol + rtol * e.abs().nan_to_num(nan=0.0)).all())
        worst = float(diff.max()) if diff.numel() else 0.0
    except Exception as exc:  # any failure to compare fails the output
        report["problem"] = f"could not compare ({type(exc).__name__})"
        return report, None
    report.update(passed=ok, error_magnitude=error_bucket(worst))
    return report, worst


def verify_archive(
    *,
    archive_path: Path,
    program: ExportedProgram,
    model_name: str,
    backend_id: str,
    device: str,
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    # The consumer's load path: load_pt2, then (weights shared) the runner's constants
    # bound from the archive's copy of the original's weights.
    runner = load_runner(archive_path, model_name=model_name, backend_id=backend_id,
                         device=device)
    try:
        return _verify(runner, program, device, rtol, atol)
    finally:
        # The runner holds the archive's weights (as big as the original's): free them
        # before profiling loads them again and the final archive is written.
        release_runner(runner)
        del runner
        gc.collect()


def _verify(runner: Any, program: ExportedProgram, device: str, rtol: float, atol: float
            ) -> dict[str, Any]:
    # Buffer-mutating programs change state on every call, so their reference is a
    # private copy that sees exactly the same call sequence as the runner. Any other
    # program runs as is: running it changes nothing, and a copy would double the
    # weights in memory.
    ref_program = copy.deepcopy(program) if mutates(program) else program
    reference = ref_program.module()
    in_spec = program.call_spec.in_spec

    def run_reference(flat: list[Any]) -> list[Any]:
        args, kwargs = pytree.tree_unflatten(_clone(flat), in_spec)
        return [o for o in pytree.tree_leaves(reference(*args, **kwargs))
                if isinstance(o, torch.Tensor)]

    def run_runner(flat: list[Any]) -> list[Any]:
        tensors = [x.to(device) for x in _clone(flat) if isinstance(x, torch.Tensor)]
        return [o.cpu() for o in runner.loader.run(tensors)]

    example = flat_example_inputs(program)
    base_sizes = _example_sizes(program, example)
    ranges = symbol_ranges(program)
    worst_errors: list[float] = []  # never stored or logged: only their bucket is
    cases: list[dict[str, Any]] = [_run_case("example", base_sizes, example, run_runner,
                                             run_reference(example), rtol, atol, worst_errors)]
    for sym, value in base_sizes.items():
        lo, hi = ranges.get(sym, (0, None))
        for size in _candidates(value, lo, hi):
            sizes = {**base_sizes, sym: size}
            flat = _inputs_for(program, example, sizes)
            try:
                expected = run_reference(flat)
            except Exception as exc:  # a guard the ranges did not show
                log.info("reference rejects %s=%d (%s); trying another size", sym, size, exc)
                continue
            cases.append(_run_case(f"{sym}={size}", sizes, flat, run_runner, expected, rtol, atol,
                                   worst_errors))
            break
    result: dict[str, Any] = {"passed": all(c["passed"] for c in cases), "rtol": rtol,
                              "atol": atol, "cases": cases}
    if worst_errors:  # over every output compared; absent when nothing could be
        result["error_magnitude"] = error_bucket(max(worst_errors))
    log.info("verification %s over %d cases, error magnitude %s",
             "passed" if result["passed"] else "FAILED", len(cases),
             result.get("error_magnitude", "n/a"))
    return result


def _clone(flat: list[Any]) -> list[Any]:
    # Programs may mutate their inputs in place; each side gets its own copy.
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]


def _run_case(name: str, sizes: dict[str, int], flat: list[Any], run_runner: Any,
              expected: list[torch.Tensor], rtol: float, atol: float,
              worst_errors: list[float]) -> dict[str, Any]:
    """One case's report: which outputs mismatched, their shapes/dtypes, error buckets."""
    case: dict[str, Any] = {
        "name": name,
        "sizes": dict(sizes),
        "input_shapes": [list(x.shape) for x in flat if isinstance(x, torch.Tensor)],
        "passed": False,
        "mismatched_outputs": [],
        "outputs": [],
    }
    try:
        got = run_runner(flat)
    except Exception as exc:  # a runner that rejects valid sizes fails the case
        # The message is the runner's; numbers in it could be memory, so they are cut.
        case["error"] = redact(f"the compiled runner raised {type(exc).__name__}: {exc}")
        log.info("case %s: sizes %s, runner raised %s", name, sizes, type(exc).__name__)
        return case
    if len(got) != len(expected):
        case["error"] = f"runner returned {len(got)} outputs, expected {len(expected)}"
        log.info("case %s: sizes %s, %s", name, sizes, case["error"])
        return case
    errors = []
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        report, error = _compare(index, g, e, rtol, atol)
        case["outputs"].append(report)
        if error is not None:
            errors.append(error)
    case["mismatched_outputs"] = [o["index"] for o in case["outputs"] if not o["passed"]]
    case["passed"] = not case["mismatched_outputs"]
    if errors:
        case["error_magnitude"] = error_bucket(max(errors))
        worst_errors.append(max(errors))
    log.info("case %s: sizes %s, error magnitude %s, %s", name, sizes,
             case.get("error_magnitude", "n/a"),
             "ok" if case["passed"] else f"MISMATCH in outputs {case['mismatched_outputs']}")
    return case
