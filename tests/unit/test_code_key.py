"""The code key is sound: everything that changes code generation changes it.

Compiled code is reused between jobs with the same code key (worker._take_compiled), so a
change that could change the compiled code must change the key: the structure digest
the gate computes (graph, signature, shapes, dtypes, dynamic ranges, example inputs,
the weights' layout) and the job's names, device, options and toolchain. Weight values,
the save's serialization id and extra files must not change it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.export import Dim

from app.jobs.cache_key import VALUE_DEPENDENT_OPTIONS, cache_key, code_key
from app.validation.gate import admit_upload
from app.validation.limits import ArchiveLimits
from tests.models import FineTune, fine_tune

EXAMPLE = torch.linspace(-1.0, 1.0, 4 * 16).reshape(4, 16)


def structure(tmp_path: Path, program: torch.export.ExportedProgram | bytes,
              **save: Any) -> str:
    """The gate's structure digest of ``program`` (saved with torch.export.save)."""
    src = tmp_path / f"in-{len(list(tmp_path.iterdir()))}.pt2"
    if isinstance(program, bytes):
        src.write_bytes(program)
    else:
        torch.export.save(program, str(src), **save)
    return admit_upload(src, src.with_suffix(".rebuilt"), ArchiveLimits()).structure_sha256


class _Gelu(FineTune):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.body(x))) * self.scale


class _Named(FineTune):
    def forward(self, features: torch.Tensor) -> torch.Tensor:  # another input name
        return super().forward(features)


def _export(module: nn.Module, example: torch.Tensor = EXAMPLE, max_batch: int | None = 64
            ) -> torch.export.ExportedProgram:
    shapes = ({0: Dim("batch", min=1, max=max_batch)},) if max_batch else None
    return torch.export.export(module.eval(), (example,), dynamic_shapes=shapes)


def _wider() -> nn.Module:
    module = FineTune(0)
    module.body, module.head = nn.Linear(16, 64), nn.Linear(64, 8)
    return module


def test_other_weights_same_structure(tmp_path: Path) -> None:
    assert structure(tmp_path, fine_tune(0)) == structure(tmp_path, fine_tune(1))


def test_save_id_root_folder_and_extra_files_are_not_structure(tmp_path: Path) -> None:
    base = structure(tmp_path, fine_tune(0))
    saved = tmp_path / "renamed.pt2"
    torch.export.save(fine_tune(0), str(saved), extra_files={"note": "retrained on march data"})
    assert structure(tmp_path, saved.read_bytes()) == base
    # The same members under another root folder (torch names it after the file).
    torch.export.save(fine_tune(0), str(tmp_path / "other-name.pt2"))
    assert structure(tmp_path, (tmp_path / "other-name.pt2").read_bytes()) == base


CHANGES: dict[str, Callable[[], torch.export.ExportedProgram]] = {
    "an op": lambda: _export(_Gelu(0)),
    "a weight's shape": lambda: _export(_wider()),
    "a dtype": lambda: _export(FineTune(0).double(), EXAMPLE.double()),
    "a dynamic range": lambda: fine_tune(0, max_batch=128),
    "a static shape": lambda: _export(FineTune(0), max_batch=None),
    "the example inputs": lambda: _export(FineTune(0), EXAMPLE + 1),
    "the signature": lambda: _export(_Named(0)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_that_can_change_the_code_changes_the_structure(
        tmp_path: Path, change: str) -> None:
    assert structure(tmp_path, CHANGES[change]()) != structure(tmp_path, fine_tune(0))


PARAMS = {"model_name": "m", "backend_id": "aoti", "device": "cpu", "options": {},
          "verify": True, "rtol": 1e-4, "atol": 1e-4}
TOOLCHAIN = {"cpu_isa": "avx2", "cpp_march": "native", "compiler": "g++ 12.2",
             "torch_version": "2.13.0", "cuda_arch": None}


def _key(params: dict[str, Any] | None = None, toolchain: dict[str, Any] | None = None,
         structure_sha256: str = "a" * 64) -> str | None:
    return code_key(structure_sha256=structure_sha256, params=params or PARAMS,
                    toolchain=toolchain or TOOLCHAIN)


JOB_CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "structure": ({}, {}),
    "model_name": ({"model_name": "n"}, {}),
    "backend_id": ({"backend_id": "aoti2"}, {}),
    "device": ({"device": "cuda"}, {"cuda_arch": "sm_90"}),
    "an option": ({"options": {"max_autotune": True}}, {}),
    "cpp.march": ({"options": {"cpp.march": "x86-64-v2"}}, {}),
    "cpu_isa": ({}, {"cpu_isa": "avx512"}),
    "compiler": ({}, {"compiler": "g++ 13.1"}),
    "torch_version": ({}, {"torch_version": "2.14.0"}),
}


@pytest.mark.parametrize("change", sorted(JOB_CHANGES))
def test_a_job_change_that_can_change_the_code_changes_the_key(change: str) -> None:
    params, toolchain = JOB_CHANGES[change]
    other = _key({**PARAMS, **params}, {**TOOLCHAIN, **toolchain},
                 structure_sha256="b" * 64 if change == "structure" else "a" * 64)
    assert other is not None and other != _key()


def test_the_gpu_arch_is_in_a_cuda_key() -> None:
    cuda = {**PARAMS, "device": "cuda"}
    assert _key(cuda, {**TOOLCHAIN, "cuda_arch": "sm_80"}) != \
        _key(cuda, {**TOOLCHAIN, "cuda_arch": "sm_90"})


def test_verification_settings_share_code_but_not_archives() -> None:
    checked = {**PARAMS, "rtol": 1e-2, "verify": False}
    assert _key(checked) == _key()
    assert cache_key(input_sha256="c" * 64, params=checked, toolchain=TOOLCHAIN) != \
        cache_key(input_sha256="c" * 64, params=PARAMS, toolchain=TOOLCHAIN)


@pytest.mark.parametrize("option", VALUE_DEPENDENT_OPTIONS)
def test_code_that_depends_on_weight_values_has_no_key(option: str) -> None:
    assert _key({**PARAMS, "options": {option: True}}) is None
    assert _key({**PARAMS, "options": {option: False}}) is not None


def test_the_key_does_not_depend_on_dict_order() -> None:
    options = {"max_autotune": True, "cpp.simdlen": 256}
    flipped = dict(reversed(list(options.items())))
    assert _key({**PARAMS, "options": options}) == \
        _key({**copy.deepcopy(PARAMS), "options": flipped})
