"""Small exported programs for the lowering tests.

Run ``python -m tests.models OUTDIR`` to write OUTDIR/{name}.pt2 for every model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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
