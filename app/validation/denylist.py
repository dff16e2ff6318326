"""Operators a graph may not call even though torch registers them, each with the reason.

Honoured twice: ``gen_ops`` leaves them out of ``ops_allowlist.txt``, and the graph check
refuses them by name (with the reason) before it consults the allowlist, so a stale
allowlist cannot let one through. Keys are the serialized target (``torch.ops.<ns>.<op>.
<overload>``); a key without an overload (``torch.ops.<ns>.<op>``) denies every overload.

Checked against torch 2.13's inductor (``torch/_inductor/lowering.py``, ``ir.py``,
``codegen/cpp.py``, ``codegen/cpp_wrapper_cpu.py``).
"""

from __future__ import annotations

import re

_PASTED_MSG = ("its message string is pasted unescaped into the generated C++ "
               "(codegen/cpp.py device_assert_async writes "
               'throw std::runtime_error("<msg>"))')
_FALLBACK_STR = ("its free-form string argument reaches the AOTInductor C++ wrapper as an "
                 'unescaped "<value>" literal through a fallback kernel '
                 "(cpp_wrapper_cpu.val_to_arg_str_for_prim_type), and it is a debugging side "
                 "effect with no place in a served model")
_NO_BOUNDS = ("its inductor lowering indexes without bounds checks (lowering.py: "
              "index_impl/index_put_impl with check=False), so out-of-range indices read or "
              "write outside the tensor in the compiled code")
_SPARSE_UNSAFE = ("builds a sparse tensor without validating its indices "
                  "(check_invariants skipped), so later kernels index out of bounds")

DENIED_OPS: dict[str, str] = {
    # ---- strings pasted into generated code -------------------------------------------
    "torch.ops.aten._assert_async.msg": _PASTED_MSG,
    "torch.ops.aten._functional_assert_async.msg": _PASTED_MSG + " (lowered like "
    "_assert_async.msg)",
    "torch.ops.aten._functional_assert_scalar": _FALLBACK_STR,
    "torch.ops.aten._print": _FALLBACK_STR,
    # ---- test-only operators with string defaults full of quotes -----------------------
    "torch.ops.aten._test_string_default": "a test-only operator whose string defaults "
    "hold quotes and backslashes",
    "torch.ops.aten._test_ambiguous_defaults": "a test-only operator",
    # ---- indexing without bounds checks -------------------------------------------------
    "torch.ops.aten._unsafe_index": _NO_BOUNDS,
    "torch.ops.aten._unsafe_index_put": _NO_BOUNDS,
    "torch.ops.aten._unsafe_masked_index": _NO_BOUNDS + "; the mask does not bound the "
    "indices (index_impl_helper(check=False, wrap_neg=False))",
    "torch.ops.aten._unsafe_masked_index_put_accumulate": _NO_BOUNDS + "; indices are only "
    "clamped where the mask is set",
    "torch.ops.prims._unsafe_index_put_": _NO_BOUNDS + " (inductor's own prim)",
    "torch.ops.aten._index_put_impl": "takes an 'unsafe' flag that skips the index bounds "
    "checks; torch.export writes index_put instead",
    "torch.ops.aten._index_put_impl_": "takes an 'unsafe' flag that skips the index bounds "
    "checks; torch.export writes index_put_ instead",
    "torch.ops.aten._sparse_coo_tensor_unsafe": _SPARSE_UNSAFE,
    "torch.ops.aten._sparse_compressed_tensor_unsafe": _SPARSE_UNSAFE,
    "torch.ops.aten._sparse_csr_tensor_unsafe": _SPARSE_UNSAFE,
    "torch.ops.aten._sparse_csc_tensor_unsafe": _SPARSE_UNSAFE,
    "torch.ops.aten._sparse_bsr_tensor_unsafe": _SPARSE_UNSAFE,
    "torch.ops.aten._sparse_bsc_tensor_unsafe": _SPARSE_UNSAFE,
    # ---- reading outside the graph --------------------------------------------------------
    "torch.ops.aten.from_file": "reads a file named by the graph",
}

# Boolean arguments that switch a kernel's checks off (aten::segment_reduce(unsafe=True)
# skips validating lengths/offsets against the data); they must be absent or false.
UNSAFE_FLAGS = frozenset({"unsafe"})

# Arguments that must be absent or None. Given explicit scales, inductor computes source
# indices as output_index / scale without clamping them to the input (nearest:
# lowering.py upsample_nearestnd indexes with check=False; linear/cubic: the
# decompositions index with _unsafe_index), while ATen clamps. Scales that disagree with
# output_size then read outside the input: torch.compile of
# upsample_nearest2d.default(x, [8, 8], 0.05, 0.05) or upsample_bilinear2d.default(...)
# returned 1e35-sized garbage here. With scales None the scale comes from the sizes and
# stays in bounds; torch.export writes the .vec overloads, which derive one from the other.
_SCALES = ("given explicit scales, inductor indexes the input by output_index / scale "
           "without bounds checks or clamping, so scales that disagree with output_size read "
           "outside the input; pass output_size only (torch.export writes the .vec overload)")
_UPSAMPLE_SCALES = {
    "upsample_nearest1d": ("scales",), "_upsample_nearest_exact1d": ("scales",),
    "upsample_linear1d": ("scales",),
    "upsample_nearest2d": ("scales_h", "scales_w"),
    "_upsample_nearest_exact2d": ("scales_h", "scales_w"),
    "upsample_bilinear2d": ("scales_h", "scales_w"),
    "upsample_bicubic2d": ("scales_h", "scales_w"),
    "_upsample_bilinear2d_aa": ("scales_h", "scales_w"),
    "_upsample_bicubic2d_aa": ("scales_h", "scales_w"),
    "_upsample_lanczos2d_aa": ("scales_h", "scales_w"),
    "upsample_nearest3d": ("scales_d", "scales_h", "scales_w"),
    "_upsample_nearest_exact3d": ("scales_d", "scales_h", "scales_w"),
    "upsample_trilinear3d": ("scales_d", "scales_h", "scales_w"),
}
NONE_ARGS: dict[str, tuple[tuple[str, ...], str]] = {
    f"torch.ops.aten.{op}.default": (args, _SCALES) for op, args in _UPSAMPLE_SCALES.items()}

# String arguments held to a fixed form instead of SAFE_STRING. aten._assert_scalar's
# message is what torch.export writes for a runtime assert; inductor never emits it
# (ir.AssertScalar is built with f"{expr} to be True", graph.py), but torch's format puts
# the node name in single quotes, which SAFE_STRING refuses everywhere else.
_ASSERT_MSG = re.compile(r"Runtime assertion failed for expression "
                         r"([A-Za-z0-9 _.,:;=+\-*/()<>\[\]!%]{1,1024}) "
                         r"on node '([A-Za-z_][A-Za-z0-9_]{0,255})'")
STRING_FORMS: dict[tuple[str, str], re.Pattern[str]] = {
    ("torch.ops.aten._assert_scalar.default", "assert_msg"): _ASSERT_MSG,
}


def denied_reason(target: str) -> str | None:
    """Why ``target`` is denied, or None."""
    if target in DENIED_OPS:
        return DENIED_OPS[target]
    packet = target.rsplit(".", 1)[0]
    return DENIED_OPS.get(packet) if packet.startswith("torch.ops.") else None
