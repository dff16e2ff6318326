"""Distinct small exported programs for the benchmark: every seed gives new bytes.

Each program's widths depend on its seed and its weights are drawn from it, so two
seeds never share a sha256 (no result-cache hit) and rarely share kernels.

    python bench/gen_programs.py OUTDIR KIND:SEED [KIND:SEED ...]

writes OUTDIR/{KIND}_s{SEED}.pt2 for each. KIND: mlp, conv, dynamic (dynamic batch), or
wN: a stack of square Linear layers holding about N MB of float32 weights (w10, w100, w1000).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import Heavy  # noqa: E402  (the repository root, when run as a script)

KINDS = ("mlp", "conv", "dynamic")


def _width(seed: int) -> int:
    return 16 + (seed * 7) % 48


class _MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(16, width)
        self.down = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class _Conv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _mlp(seed: int) -> ExportedProgram:
    return torch.export.export(_MLP(_width(seed)).eval(), (torch.randn(4, 16),))


def _conv(seed: int) -> ExportedProgram:
    channels = 4 + seed % 13
    return torch.export.export(_Conv(channels).eval(), (torch.randn(2, 3, 8, 8),))


def _dynamic(seed: int) -> ExportedProgram:
    return torch.export.export(_MLP(_width(seed)).eval(), (torch.randn(4, 16),),
                               dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})


def weight_shape(megabytes: int) -> tuple[int, int]:
    """(width, layers) of a stack holding about ``megabytes`` MB of float32 weights: few
    wide layers, so the compile stays small while the weights grow."""
    layers = max(1, megabytes // 256)
    width = int((megabytes * 1_000_000 / 4 / layers) ** 0.5)
    return width, layers


def _weights(seed: int, megabytes: int) -> ExportedProgram:
    width, layers = weight_shape(megabytes)
    with torch.no_grad():
        module = Heavy(layers=layers, width=width + seed % 7).eval()
    return torch.export.export(module, (torch.randn(1, width + seed % 7),))


BUILDERS: dict[str, Callable[[int], ExportedProgram]] = {
    "mlp": _mlp, "conv": _conv, "dynamic": _dynamic,
}


def save_program(kind: str, seed: int, out_dir: Path) -> Path:
    torch.manual_seed(seed)
    path = out_dir / f"{kind}_s{seed}.pt2"
    if kind.startswith("w") and kind[1:].isdigit():
        program = _weights(seed, int(kind[1:]))
    else:
        program = BUILDERS[kind](seed)
    torch.export.save(program, str(path))
    return path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in argv[1:]:
        kind, _, seed = spec.partition(":")
        print(save_program(kind, int(seed), out_dir), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
