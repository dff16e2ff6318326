"""Small exported programs for the lowering tests.

Run ``python -m tests.models OUTDIR`` to write OUTDIR/{name}.pt2 for every model.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim, ExportedProgram


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class _DictIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        a = self.proj(inputs["a"])
        b = inputs["b"] * 2.0
        return {"sum": a + b, "parts": (a, [b])}


class _Kwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * scale


class _Counter(nn.Module):
    """Mutates a buffer in place each call, like a decode step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return x + self.steps


class _Slow(nn.Module):
    """Many distinct layers, so the compile takes noticeably longer than ``linear``."""

    def __init__(self, depth: int = 30) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = (torch.relu, torch.tanh, torch.sigmoid, nn.functional.gelu, nn.functional.silu)
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            h = acts[i % len(acts)](layer(x))
            # Varying shapes of the math keep inductor from fusing it all into one kernel.
            x = norm(h + x * (i + 1) / 10 if i % 2 else torch.cumsum(h, dim=-1) / 32 + x)
        return x


def _linear() -> ExportedProgram:
    return torch.export.export(_Linear().eval(), (torch.randn(4, 16),))


def _convnet() -> ExportedProgram:
    return torch.export.export(_ConvNet().eval(), (torch.randn(2, 3, 16, 16),))


def _dict_io() -> ExportedProgram:
    inputs = {"a": torch.randn(3, 8), "b": torch.randn(3, 8)}
    return torch.export.export(_DictIO().eval(), (inputs,))


def _dynamic() -> ExportedProgram:
    return torch.export.export(
        _Linear().eval(),
        (torch.randn(4, 16),),
        dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}},
    )


def _kwargs() -> ExportedProgram:
    return torch.export.export(
        _Kwargs().eval(), (torch.randn(4, 16),), {"scale": torch.tensor(0.5)}
    )


def _counter() -> ExportedProgram:
    return torch.export.export(_Counter().eval(), (torch.randn(2, 8),))


def _slow() -> ExportedProgram:
    return torch.export.export(_Slow().eval(), (torch.randn(4, 32),))


def _slower() -> ExportedProgram:
    """Long enough to compile that a short job timeout always lands inside g++."""
    return torch.export.export(_Slow(depth=90).eval(), (torch.randn(4, 32),))


class _MaskedMean(nn.Module):
    """A data-dependent row count that stays inside the graph: lowering fails (FACTS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x[:, 0] > 0].mean(0)


def _masked_mean() -> ExportedProgram:
    return torch.export.export(_MaskedMean().eval(), (torch.randn(6, 4),))


def _custom_output() -> ExportedProgram:
    from tests.pytree_types import export_custom_output

    return export_custom_output()


BUILDERS: dict[str, Callable[[], ExportedProgram]] = {
    "linear": _linear,
    "convnet": _convnet,
    "dict_io": _dict_io,
    "dynamic": _dynamic,
    "kwargs": _kwargs,
    "counter": _counter,
    "slow": _slow,
    "slower": _slower,
    "custom_output": _custom_output,
    "masked_mean": _masked_mean,
}
MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)


def export_model(name: str) -> ExportedProgram:
    # Fixed seed so two exports of one model carry the same weights.
    torch.manual_seed(0)
    return BUILDERS[name]()


def save_model(name: str, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_model(name), str(path))
    return path


# ---- programs the upload gate must admit (tests/unit/test_gate_*.py) ----------------------

class _OddNames(nn.Module):
    """ModuleDict keys and buffer names with hyphens; non-ASCII parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"layer-1": nn.Linear(4, 4), "layer-2": nn.Linear(4, 4)})
        self.register_buffer("running-scale", torch.full((4,), 2.0))
        self.register_parameter("poids_é", nn.Parameter(torch.ones(4)))
        self.register_parameter("权重", nn.Parameter(torch.full((4,), 0.5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks["layer-2"](self.blocks["layer-1"](x))
        return h * getattr(self, "running-scale") + self.poids_é * self.权重


class _Deep(nn.Module):
    """A module path ``inner.inner....linear`` deeper than 65 levels."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner: nn.Module = _Deep(depth - 1) if depth else nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Complex32(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.complex64) * 2


# Every dtype an exported program can take (schema ScalarType; quantized ones need a quantizer).
SAVED_DTYPES = (
    "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)


class _AllDtypes(nn.Module):
    """Example inputs of every saved dtype; the graph only reads their shapes."""

    def forward(self, x: torch.Tensor, others: dict[str, torch.Tensor]) -> torch.Tensor:
        return x * len(others)


def _all_dtypes_inputs() -> dict[str, torch.Tensor]:
    out = {}
    for name in SAVED_DTYPES:
        dtype = getattr(torch, name)
        out[name] = torch.zeros(2, 3, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 \
            else torch.zeros(2, 3).to(dtype) if dtype.is_floating_point or dtype.is_complex \
            else torch.zeros(2, 3, dtype=dtype)
    return out


class _StringArgs(nn.Module):
    """Ops with string arguments torch.export keeps (and inductor pastes as literals)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.div(x, 2, rounding_mode="floor") + nn.functional.gelu(x, approximate="tanh")
        return y + torch.einsum("ij,jk->ik", x, x.t())


class _Checked(nn.Module):
    """A data-dependent size: torch.export adds aten._assert_scalar nodes with messages."""

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        k = n.item()
        torch._check(k >= 1)
        torch._check(k <= 6)
        return x[:k] * 2


GatePoint = collections.namedtuple("GatePoint", ["left", "right"])


@dataclasses.dataclass
class GatePair:
    first: torch.Tensor
    second: torch.Tensor


pytree._register_namedtuple(GatePoint, serialized_type_name="tests.models.GatePoint")
pytree.register_dataclass(GatePair, serialized_type_name="tests.models.GatePair")


class _Pytrees(nn.Module):
    """Builtin containers in, registered namedtuple and dataclass out (example inputs are
    pickled, and only builtin containers may be unpickled by the gate)."""

    def forward(self, t: torch.Tensor, seq: list[torch.Tensor], table: dict[Any, torch.Tensor],
                ordered: collections.OrderedDict[str, torch.Tensor], nothing: None = None,
                ) -> Any:
        total = t + seq[0] + table["k"] + table[1] + ordered["z"]
        return total, [seq[1]], {"out": ordered["z"]}, None, GatePoint(t, total), \
            GatePair(t, total)


def _pytree_inputs() -> tuple[Any, ...]:
    r = torch.randn
    return (r(2), [r(2), r(2)], {"k": r(2), 1: r(2)}, collections.OrderedDict(z=r(2)), None)


class _UnicodeArgs(nn.Module):
    """Non-ASCII argument names, dynamic: torch's guards name them (L['données'])."""

    def forward(self, données: torch.Tensor, 权重: torch.Tensor) -> torch.Tensor:
        return données * 2 + 权重


def _unicode_args() -> ExportedProgram:
    batch = Dim("batch", min=2, max=64)
    return torch.export.export(_UnicodeArgs().eval(), (torch.randn(4, 3), torch.randn(4, 3)),
                               dynamic_shapes={"données": {0: batch}, "权重": {0: batch}})


GATE_BUILDERS: dict[str, Callable[[], ExportedProgram]] = {
    "odd_names": lambda: torch.export.export(_OddNames().eval(), (torch.randn(2, 4),)),
    "deep": lambda: torch.export.export(_Deep(70).eval(), (torch.randn(2, 4),)),
    "complex32": lambda: torch.export.export(
        _Complex32().eval(), (torch.randn(2, 4).to(torch.complex32),)),
    "all_dtypes": lambda: torch.export.export(
        _AllDtypes().eval(), (torch.randn(2), _all_dtypes_inputs())),
    "string_args": lambda: torch.export.export(_StringArgs().eval(), (torch.randn(4, 4),)),
    "checked": lambda: torch.export.export(
        _Checked().eval(), (torch.randn(8, 4), torch.tensor(3))),
    "pytrees": lambda: torch.export.export(_Pytrees().eval(), _pytree_inputs()),
    "extra_files": _linear,
    "unicode_args": _unicode_args,
}
GATE_EXTRA_FILES = {"extra_files": {"notes.txt": "trained on 2024-05-01\n", "cfg/run.json": "{}"}}


def save_gate_model(name: str, path: Path | str) -> Path:
    """Export and save one of GATE_BUILDERS (with its extra files, if any)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # complex32 is "experimental"
        warnings.simplefilter("ignore")
        ep = GATE_BUILDERS[name]()
    torch.export.save(ep, str(path), extra_files=GATE_EXTRA_FILES.get(name))
    return path


# ---- lowering models added later -----------------------------------------------------------

class _Derived(nn.Module):
    """Derived dynamic dims: ``pairs`` has twice ``x``'s rows (2*batch, batch used directly);
    ``halves`` has 2*seq rows where no input carries ``seq`` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, pairs: torch.Tensor, halves: torch.Tensor) -> Any:
        doubled = self.linear(torch.cat([x, x * 2], dim=0)) + pairs
        return doubled, halves.reshape(-1, 2, 8).sum(dim=1)


def _derived() -> ExportedProgram:
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=1, max=16)
    return torch.export.export(
        _Derived().eval(), (torch.randn(3, 8), torch.randn(6, 8), torch.randn(10, 8)),
        dynamic_shapes={"x": {0: batch}, "pairs": {0: 2 * batch}, "halves": {0: 2 * seq}},
    )


BUILDERS["derived"] = _derived
MODEL_NAMES = tuple(BUILDERS)


class _NonzeroSum(nn.Module):
    """A data-dependent size (the nonzero count) used only inside the graph; the output is
    static. Its delegate export used to fail with PendingUnbackedSymbolNotFound."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x.nonzero()
        return (x[idx[:, 0], idx[:, 1]] ** 2).sum().reshape(1) + self.w


def nonzero_sum_input(zeros: int) -> torch.Tensor:
    """A 6x4 input with exactly ``zeros`` zero entries (the rest nonzero)."""
    x = torch.rand(6, 4) + 0.5
    x.view(-1)[torch.randperm(24)[:zeros]] = 0.0
    return x


def _nonzero_sum() -> ExportedProgram:
    return torch.export.export(_NonzeroSum().eval(), (nonzero_sum_input(7),))


class _MaskedRows(nn.Module):
    """One output whose row count depends on the data, and one data-dependent size that
    stays inside (the count of entries above 1)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[x[:, 0] > 0] * 2, x[x > 1].sum()


class _MaskedOuter(nn.Module):
    """An output with rows = (data-dependent count) * (another one): export cannot bind a
    product of unbacked sizes to the delegate's output, so lowering must fail clearly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[x[:, 0] > 0], x[x[:, 1] > 0]
        return (a[:, None, :] * b[None, :, :]).reshape(-1, 4)


def _masked_rows() -> ExportedProgram:
    x = torch.randn(6, 4)
    x[:3, 0] = -x[:3, 0].abs()  # 3 of 6 rows selected
    x[3:, 0] = x[3:, 0].abs() + 0.1
    return torch.export.export(_MaskedRows().eval(), (x,))


def _masked_outer() -> ExportedProgram:
    return torch.export.export(_MaskedOuter().eval(), (torch.randn(6, 4),))


BUILDERS["nonzero_sum"] = _nonzero_sum
BUILDERS["masked_rows"] = _masked_rows
BUILDERS["masked_outer"] = _masked_outer
MODEL_NAMES = tuple(BUILDERS)


class Heavy(nn.Module):
    """~32 MB of float32 weights over little compute: what issue 9's archive size is about."""

    def __init__(self, layers: int = 8, width: int = 1024) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _heavy() -> ExportedProgram:
    return torch.export.export(Heavy().eval(), (torch.randn(2, 1024),),
                               dynamic_shapes=({0: Dim("batch", min=1, max=64)},))


BUILDERS["heavy"] = _heavy


class FineTune(nn.Module):
    """What a registry re-lowers with new weights: the same structure, other values.

    Its small tensors are the trap for compiled-code reuse: inductor pastes the values of
    a 0-d tensor and of a 1-d one with at most 8 elements into the code unless told not
    to, and here the head's bias has 8 elements and ``scale`` is 0-d.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 8)
        self.register_buffer("scale", torch.tensor(1.0))
        with torch.no_grad():
            for tensor in (*self.parameters(), self.scale):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x))) * self.scale


def fine_tune(seed: int, *, max_batch: int = 64) -> ExportedProgram:
    """FineTune with weights from ``seed``; the example input is the same for every seed
    (the structure includes it), and the batch is dynamic up to ``max_batch``."""
    example = torch.linspace(-1.0, 1.0, 4 * 16).reshape(4, 16)
    return torch.export.export(FineTune(seed).eval(), (example,),
                               dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},))


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print("usage: python -m tests.models OUTDIR [NAME...]", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for name in argv[1:] or MODEL_NAMES:
        print(save_model(name, out / f"{name}.pt2"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
