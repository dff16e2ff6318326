"""AOTInductor lowering that keeps the program's dynamic dimensions.

Mirrors torch.nativert.backends._lower_utils.lower_exported_program, whose
re-export passes no ``dynamic_shapes``: the compiled runner then specialises to
the example sizes yet accepts other sizes and silently computes garbage.
Here every re-export gets dynamic_shapes rebuilt from the program's own input
placeholders and ``range_constraints``.

The stock helper also cannot export the delegate of a program with a data-dependent
size that stays inside the graph (``x[mask].mean(0)``): the delegate call's fake
implementation re-runs the whole graph, and the unbacked symbols that run creates
and does not return raise PendingUnbackedSymbolNotFound. ``_DelegateProgram`` tells
the shape env those symbols are discarded (see there).
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import (
    PendingUnbackedSymbolNotFound,
    free_unbacked_symbols,
)
from torch.nativert.backends._lowered_aoti_module import LoweredBackendModule
from torch.utils._sympy.numbers import int_oo

from app.constants import ErrorCode
from app.errors import JobError

log = logging.getLogger("app.lowering")

DimSpec = dict[int, Any] | None


def flat_example_inputs(ep: ExportedProgram) -> list[Any]:
    """The example inputs as the leaf list the runner takes, in the program's order."""
    args, kwargs = ep.example_inputs
    # Flatten by the program's in_spec, not by the example dict's own key order.
    return list(fx_pytree.tree_flatten_spec((args, kwargs), ep.call_spec.in_spec))


def symbolic_dims(ep: ExportedProgram) -> list[list[sympy.Expr | int] | None]:
    """Per flat user input: each dim as a sympy expression or int (None for non-tensors)."""
    names = {
        spec.arg.name
        for spec in ep.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and hasattr(spec.arg, "name")
    }
    out: list[list[sympy.Expr | int] | None] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        out.append(
            [s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        )
    return out


def symbol_ranges(ep: ExportedProgram) -> dict[str, tuple[int, int | None]]:
    """Input symbol name -> (min, max or None when unbounded)."""
    ranges: dict[str, tuple[int, int | None]] = {}
    for sym, vr in ep.range_constraints.items():
        if not isinstance(sym, sympy.Symbol):
            continue
        upper = None if vr.upper in (int_oo, sympy.oo) else int(vr.upper)
        ranges[sym.name] = (int(vr.lower), upper)
    return ranges


def affine_in_one_symbol(expr: sympy.Expr) -> tuple[sympy.Symbol, int, int] | None:
    """(symbol, a, b) when ``expr`` is a*symbol + b with integers a > 0 and b; else None.

    torch.export's derived dims (``2 * batch``, ``batch + 1``) are exactly these.
    """
    symbols = expr.free_symbols
    if len(symbols) != 1:
        return None
    (symbol,) = symbols
    if not isinstance(symbol, sympy.Symbol):
        return None
    try:
        poly = sympy.Poly(expr, symbol)
    except sympy.PolynomialError:
        return None
    if poly.degree() != 1:
        return None
    a, b = poly.all_coeffs()
    if not (a.is_integer and b.is_integer) or a <= 0:
        return None
    return symbol, int(a), int(b)


def flat_dynamic_shapes(ep: ExportedProgram) -> list[DimSpec]:
    """One dynamic_shapes entry per flat input leaf.

    One Dim object per symbol, shared by all dims carrying it, so equalities
    between inputs survive the re-export. A dim that is an affine expression of
    one symbol (a derived dim, e.g. ``2*s0`` or ``s0 + 1``) becomes the same
    expression of that symbol's Dim, even when no input carries the symbol alone.
    Other expressions are left to export to infer (Dim.AUTO).
    """
    ranges = symbol_ranges(ep)
    dims: dict[str, Any] = {}

    def root(symbol: sympy.Symbol) -> Any:
        name = symbol.name
        if name not in dims:
            lo, hi = ranges.get(name, (0, None))
            dims[name] = Dim(name, min=lo, max=hi) if hi is not None else Dim(name, min=lo)
        return dims[name]

    specs: list[DimSpec] = []
    for shape in symbolic_dims(ep):
        if shape is None:
            specs.append(None)
            continue
        spec: dict[int, Any] = {}
        for idx, expr in enumerate(shape):
            if isinstance(expr, sympy.Symbol):
                spec[idx] = root(expr)
            elif isinstance(expr, sympy.Expr) and not expr.is_number:
                affine = affine_in_one_symbol(expr)
                if affine is None:
                    spec[idx] = Dim.AUTO
                    continue
                symbol, a, b = affine
                derived = root(symbol) if a == 1 else root(symbol) * a
                spec[idx] = derived + b if b else derived
        specs.append(spec or None)
    if len(specs) != len(flat_example_inputs(ep)):
        # Should not happen for a program torch.export made; a static re-export
        # is still correct at the example sizes and verification will tell.
        log.warning("input placeholders do not match the flat inputs; exporting static")
        return [None] * len(flat_example_inputs(ep))
    return specs


FLAT_PREFIX = "original_module."
"""_FlattenedModule holds the program as ``original_module``, so the compiled runner
names each constant ``original_module.<the program's own name>``."""


def constant_sources(ep: ExportedProgram) -> dict[str, str]:
    """Runner constant name -> the name of the program's tensor that holds it, for every
    parameter, buffer and lifted tensor constant of ``ep`` (see package.bind_constants)."""
    tensors = {**ep.state_dict, **ep.constants}
    return {FLAT_PREFIX + name: name for name, value in tensors.items()
            if isinstance(value, torch.Tensor)}


class _FlattenedModule(torch.nn.Module):
    def __init__(self, ep: ExportedProgram) -> None:
        super().__init__()
        self.original_module = ep.module()
        self.in_spec = ep.call_spec.in_spec

    def forward(self, *flat_inputs: Any) -> tuple[Any, ...]:
        args, kwargs = pytree.tree_unflatten(list(flat_inputs), self.in_spec)
        return tuple(pytree.tree_leaves(self.original_module(*args, **kwargs)))


def _unbacked_in(value: Any) -> set[sympy.Symbol]:
    """The unbacked symbols in the sizes, strides and offsets of a tree's tensors/SymInts."""
    symbolic = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)
    return {symbol for leaf in pytree.tree_leaves(value) if isinstance(leaf, symbolic)
            for symbol in free_unbacked_symbols(leaf)}


class _DelegateProgram:
    """What the delegate module holds as its ``original_module``: the flat program, whose
    ``module()`` runs its graph the way executorch_call_delegate's implementations do
    (torch/_higher_order_ops/executorch_call_delegate.py, call_delegate_cpu:
    ``lowered_module.original_module.module()(*args)``), and then, under a fake mode,
    marks the unbacked symbols the run created but did not return as ignorable.

    Why: when export traces the delegate call, trace_call_delegate fake-runs the graph
    and then track_tensor_tree -> _set_unbacked_bindings -> compute_unbacked_bindings
    (torch/fx/experimental/symbolic_shapes.py) requires every symbol still pending in
    the shape env to appear in the call's outputs, else PendingUnbackedSymbolNotFound.
    A data-dependent size used only inside the graph (``x[x > 0].sum()``) never appears
    there. This is sound because the compiled delegate is one opaque call: the outer
    graph sees only its outputs, so a symbol absent from every output's sizes, strides
    and offset is nothing the outer graph can refer to or guard on, and needs no binding
    (the inner graph and its runtime asserts were compiled with it). It is what torch's
    own higher-order ops do with fresh symbols their fake implementations discard
    (cond's fake mode impl and invoke_subgraph use ShapeEnv.ignore_fresh_unbacked_symbols;
    ``ignorable_fresh_unbacked_symbols`` is the per-symbol form, used by
    torch/distributed/_ops/device_mesh.py). Symbols that DO reach the outputs stay
    pending, so compute_unbacked_bindings binds them to the delegate node's outputs
    exactly as without this class (or fails if it cannot, which lower_program reports).
    """

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep

    def module(self) -> Callable[..., Any]:
        # A fresh module per call, like the stock call_delegate_cpu.
        graph_module = self.ep.module()

        def run(*args: Any) -> Any:
            fake_mode = torch._guards.detect_fake_mode(args)
            shape_env = fake_mode.shape_env if fake_mode is not None else None
            if shape_env is None:
                return graph_module(*args)
            before = len(shape_env.pending_fresh_unbacked_symbols)
            outs = graph_module(*args)
            fresh = shape_env.pending_fresh_unbacked_symbols[before:]
            returned = _unbacked_in(outs)
            internal = [s for s in fresh if s not in returned]
            if internal:
                log.info("delegate call: data-dependent sizes %s stay inside the compiled "
                         "graph; not bound in the delegate program", internal)
                shape_env.ignorable_fresh_unbacked_symbols.extend(internal)
            return outs

        return run


def _drop_internal_symbols(ep: ExportedProgram) -> None:
    """Forget the ranges of data-dependent sizes that stay inside the delegate call.

    Export records a range for every unbacked symbol it met, the discarded ones too
    (see _DelegateProgram); no node of the delegate graph carries them, and loading the
    program would warn "Symbol u0 did not appear in the graph" for each.
    """
    used: set[sympy.Symbol] = set()
    for node in ep.graph.nodes:
        used |= _unbacked_in(node.meta.get("val"))
    for symbol in list(ep.range_constraints):
        if symbol not in used and symbol in free_unbacked_symbols(symbol):
            del ep.range_constraints[symbol]


def _bind_shapes(sig: inspect.Signature, tree: Any) -> dict[str, Any]:
    # torch.export matches a dict of dynamic_shapes against
    # signature.bind(*args, **kwargs).arguments, so binding the shapes tree
    # (same structure as (args, kwargs)) to the same signature lines them up.
    shape_args, shape_kwargs = tree
    return dict(sig.bind(*shape_args, **shape_kwargs).arguments)


def to_device(
    ep: ExportedProgram, inputs: list[Any], device: str
) -> tuple[ExportedProgram, list[Any]]:
    if device == "cpu":
        return ep, inputs
    from torch.export.passes import move_to_device_pass

    moved = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
    return move_to_device_pass(ep, device), moved


def compile_options(options: dict[str, Any], *, package_constants_in_so: bool
                    ) -> dict[str, Any]:
    """The inductor settings a lowering compiles with: the job's options and ours.

    Weights left out of the .so are also kept out of the code: inductor otherwise pastes
    the values of small constants (0-d, or 1-d with at most 8 elements, e.g. a small
    bias) into the kernels as literals (torch/_inductor/graph.py, get_attr), so the
    code would change with the weights and could not be reused for other weights.
    """
    return {**options, "aot_inductor.package": True,
            "aot_inductor.package_constants_in_so": package_constants_in_so,
            **({} if package_constants_in_so else {"always_keep_tensor_constants": True})}


def lower_program(
    ep: ExportedProgram, *, model_name: str, backend_id: str, device: str, options: dict[str, Any],
    package_constants_in_so: bool = False, compiled: list[Path] | None = None,
) -> tuple[ExportedProgram, list[Any]]:
    """Compile ``ep`` (which this mutates: pass a copy) and build its delegate program.

    ``package_constants_in_so=False`` (the default) leaves the weights out of the .so:
    the runner then takes them from the original program (package.bind_constants).
    ``compiled``: the files an earlier lowering of the same structure compiled
    (cache_key.code_key); they are packaged instead of compiling again.
    """
    out_spec = ep.call_spec.out_spec
    in_spec = ep.call_spec.in_spec
    flat_shapes = flat_dynamic_shapes(ep)
    flat_inputs = flat_example_inputs(ep)
    ep, flat_inputs = to_device(ep, flat_inputs, device)
    args, kwargs = pytree.tree_unflatten(flat_inputs, in_spec)

    log.info("re-exporting with flat inputs/outputs; dynamic dims: %s", flat_shapes)
    flat_module = _FlattenedModule(ep)
    flat_ep = torch.export.export(
        flat_module,
        tuple(flat_inputs),
        dynamic_shapes={"flat_inputs": tuple(flat_shapes)},
    )
    log.info("flat program range_constraints: %s", flat_ep.range_constraints)

    aoti_files: Any
    if compiled is not None:
        log.info("reusing %d compiled files, not compiling", len(compiled))
        aoti_files = [str(path) for path in compiled]
    else:
        log.info("compiling with AOTInductor, options %s", options)
        aoti_files = torch._inductor.aot_compile(
            flat_ep.module(), tuple(flat_inputs),
            options=compile_options(options, package_constants_in_so=package_constants_in_so),
        )
    if not isinstance(aoti_files, list):
        raise TypeError(f"aot_compile returned {type(aoti_files).__name__}, expected a list")
    log.info("compiled %d files", len(aoti_files))

    delegate = LoweredBackendModule(flat_ep, backend_id, module_name=model_name)
    # Only the fake implementation reads it; serialisation writes just the name and backend.
    delegate._original_exported_program = _DelegateProgram(flat_ep)  # type: ignore[assignment]

    def forward(self: LoweredBackendModule, *a: Any, **kw: Any) -> Any:
        flat = fx_pytree.tree_flatten_spec((a, kw), in_spec)
        outs = torch._higher_order_ops.executorch_call_delegate(self, *flat)
        if out_spec is not None and outs is not None:
            return pytree.tree_unflatten(outs, out_spec)
        return outs

    # A bare `forward(*args, **kwargs)` cannot be exported with dynamic_shapes
    # when kwargs are passed (torch 2.13 appends the kwargs to the bound
    # arguments a second time and the shapes can match neither form), so the
    # delegate's forward advertises the original module's signature instead.
    sig = inspect.signature(flat_module.original_module.forward)
    forward.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                    *sig.parameters.values()]
    )
    delegate.forward = types.MethodType(forward, delegate)  # type: ignore[method-assign]
    shapes = _bind_shapes(sig, pytree.tree_unflatten(flat_shapes, in_spec))
    try:
        delegate_ep = torch.export.export(delegate, tuple(args), kwargs, dynamic_shapes=shapes)
    except PendingUnbackedSymbolNotFound as exc:
        # A data-dependent size reaches an output in a form export cannot bind (e.g. a
        # product of two such sizes). Nothing is packaged: say why instead of a trace.
        log.warning("delegate export failed: %s: %s", type(exc).__name__,
                    str(exc).splitlines()[0])
        raise JobError(
            ErrorCode.LOWERING_FAILED,
            "an output's shape depends on the input data in a form the delegate program "
            f"cannot express (PendingUnbackedSymbolNotFound: {str(exc).splitlines()[0]}); "
            "return sizes that are plain data-dependent counts, or make the output shape "
            "static (e.g. pad to a maximum)",
            detail={"exception_type": type(exc).__name__, "phase": "lower"},
        ) from exc
    _drop_internal_symbols(delegate_ep)
    log.info("delegate program range_constraints: %s", delegate_ep.range_constraints)
    return delegate_ep, aoti_files
