"""Caps the upload gate enforces and what its child process may use; built from Settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ArchiveLimits:
    """Every cap the gate applies to one upload.

    Parameters:
        max_members: zip entries in the upload (and in the nested example-inputs zip).
        max_member_bytes: uncompressed size of any one member.
        max_total_bytes: uncompressed size of all members together.
        max_ratio: uncompressed/compressed size of a member (torch stores, ratio 1).
        max_json_bytes: size of the graph JSON (``models/<name>.json``).
        max_json_depth: nesting depth of a JSON member.
        max_inputs_bytes: size of the example-inputs member (a zip itself).
        max_pickle_bytes: size of the pickle inside the example inputs.
        max_tensor_bytes: bytes one declared tensor may address.
        max_expr_chars: length of one size expression or guard string.
        max_config_bytes: size of a weights/constants config JSON (~300 bytes a tensor).
        max_json_values: values in one JSON member, bounded before it is parsed.
        max_extra_files: ``extra/`` files (``torch.export.save(extra_files=...)``).
        max_extra_bytes: size of one extra file.
        max_example_tensor_bytes: numel x element size of one example-input tensor
            (from its sizes, whatever its strides: a stride-0 view counts in full).
        max_example_bytes: the same, summed over all example-input tensors.
    """

    max_members: int = 100_000
    max_member_bytes: int = 4 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_ratio: int = 100
    max_json_bytes: int = 256 * 1024**2
    max_json_depth: int = 200
    max_inputs_bytes: int = 256 * 1024**2
    max_pickle_bytes: int = 16 * 1024**2
    max_tensor_bytes: int = 4 * 1024**3
    max_expr_chars: int = 4096
    max_config_bytes: int = 8 * 1024**2
    max_json_values: int = 4_000_000
    max_extra_files: int = 32
    max_extra_bytes: int = 1024**2
    max_example_tensor_bytes: int = 256 * 1024**2
    max_example_bytes: int = 1024**3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateResources:
    """What one gate child may use, and how many run at once.

    Parameters:
        concurrency: checks running at the same time (the rest wait their turn).
        max_memory_bytes: the child's address space (RLIMIT_AS).
        max_cpu_s: the child's CPU seconds (RLIMIT_CPU).
        timeout_s: wall-clock seconds before the child is killed.
    """

    concurrency: int = 2
    max_memory_bytes: int = 1024**3
    max_cpu_s: float = 60.0
    timeout_s: float = 120.0
