"""Running the packaged AOTInductor runner against the original program.

Cases: the example inputs, then for each dynamic dimension symbol one other
size inside its range (others kept at their example sizes), so a runner that
was specialised to the example sizes cannot pass.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import load_pt2

from app.lowering.lower import flat_example_inputs, symbol_ranges, symbolic_dims
from app.lowering.package import delegate_name

log = logging.getLogger("app.lowering")

Case = tuple[str, dict[str, int], list[Any]]


def _example_sizes(ep: ExportedProgram, flat: list[Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for shape, value in zip(symbolic_dims(ep), flat, strict=False):
        if shape is None or not isinstance(value, torch.Tensor):
            continue
        for expr, actual in zip(shape, value.shape, strict=False):
            if isinstance(expr, sympy.Symbol):
                sizes[expr.name] = int(actual)
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


def _compare(got: torch.Tensor, exp: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    if tuple(got.shape) != tuple(exp.shape):
        return math.inf, False
    if got.is_complex() or exp.is_complex():
        got, exp = torch.view_as_real(got.resolve_conj()), torch.view_as_real(exp.resolve_conj())
    g, e = got.detach().cpu().double(), exp.detach().cpu().double()
    both_nan = torch.isnan(g) & torch.isnan(e)
    diff = torch.where(both_nan, torch.zeros_like(g), (g - e).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    ok = bool((diff <= atol + rtol * e.abs().nan_to_num(nan=0.0)).all())
    return (float(diff.max()) if diff.numel() else 0.0), ok


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
    index = torch.device(device).index
    contents = load_pt2(str(archive_path), device_index=index if index is not None else -1)
    runner = contents.aoti_runners[delegate_name(model_name, backend_id)]
    # Buffer-mutating programs change state on every call, so the reference is
    # a private copy that sees exactly the same call sequence as the runner.
    ref_program = copy.deepcopy(program)
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
    cases: list[dict[str, Any]] = [_run_case("example", base_sizes, example, run_runner,
                                             run_reference(example), rtol, atol)]
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
            cases.append(_run_case(f"{sym}={size}", sizes, flat, run_runner, expected, rtol, atol))
            break
    result = {
        "passed": all(c["passed"] for c in cases),
        "max_abs_error": max(c["max_abs_error"] for c in cases),
        "rtol": rtol,
        "atol": atol,
        "cases": cases,
    }
    log.info("verification %s over %d cases, max abs error %.3g",
             "passed" if result["passed"] else "FAILED", len(cases), result["max_abs_error"])
    return result


def _clone(flat: list[Any]) -> list[Any]:
    # Programs may mutate their inputs in place; each side gets its own copy.
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]


def _run_case(name: str, sizes: dict[str, int], flat: list[Any], run_runner: Any,
              expected: list[torch.Tensor], rtol: float, atol: float) -> dict[str, Any]:
    case: dict[str, Any] = {
        "name": name,
        "sizes": dict(sizes),
        "input_shapes": [list(x.shape) for x in flat if isinstance(x, torch.Tensor)],
        "max_abs_error": 0.0,
        "passed": True,
        "worst_output": None,
    }
    try:
        got = run_runner(flat)
    except Exception as exc:  # a runner that rejects valid sizes fails the case
        error = f"{type(exc).__name__}: {exc}"[:500]
        case.update(passed=False, max_abs_error=math.inf, error=error)
        return case
    if len(got) != len(expected):
        case.update(passed=False, max_abs_error=math.inf,
                    error=f"runner returned {len(got)} outputs, expected {len(expected)}")
        return case
    results = [_compare(g, e, rtol, atol) for g, e in zip(got, expected, strict=True)]
    failing = [idx for idx, (_, ok) in enumerate(results) if not ok]
    if results:
        worst = max(range(len(results)), key=lambda i: results[i][0])
        case.update(max_abs_error=results[worst][0], passed=not failing,
                    worst_output=failing[0] if failing else worst,
                    output_errors=[err for err, _ in results])
    log.info("case %s: sizes %s, max abs error %.3g, %s", name, sizes, case["max_abs_error"],
             "ok" if case["passed"] else "MISMATCH")
    return case
