"""A custom output type registered as a pytree node.

A program returning it can only be loaded where this module has been imported,
which is how the lowering's UNKNOWN_PYTREE_TYPE error is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram


@dataclass
class CustomOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


pytree.register_dataclass(CustomOutput, serialized_type_name="tests.pytree_types.CustomOutput")


class CustomOutputModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> CustomOutput:
        hidden = torch.relu(x)
        return CustomOutput(logits=self.linear(hidden), hidden=hidden)


def export_custom_output() -> ExportedProgram:
    return torch.export.export(CustomOutputModel().eval(), (torch.randn(2, 8),))
