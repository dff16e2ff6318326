"""Weights stored once (issue 9 part 1): the delegate's .so without its constants,
bound at load from the original program's data/weights/ (package.load_runner).

Each lowering of the weight-heavy model costs ~10 s here; the two modes are shared
through module-scoped fixtures.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.export.pt2_archive._package import load_pt2

from app.constants import ErrorCode
from app.errors import JobError
from app.lowering import LoweringResult, run_lowering
from app.lowering.package import CONSTANTS_MAP_FILE, load_runner
from tests.models import export_model, save_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]

Lowered = tuple[Path, Path, LoweringResult]


def _lower(tmp: Path, name: str, weights: str) -> Lowered:
    program = save_model(name, tmp / f"{name}.pt2")
    out = tmp / f"{name}-{weights}.pt2"
    result = run_lowering(program_path=program, out_path=out, model_name=name,
                          backend_id="aoti", device="cpu", options={}, verify=True,
                          rtol=1e-4, atol=1e-5, provenance={}, weights=weights)
    return program, out, result


@pytest.fixture(scope="module")
def heavy_shared(tmp_path_factory: pytest.TempPathFactory) -> Lowered:
    return _lower(tmp_path_factory.mktemp("shared"), "heavy", "shared")


@pytest.fixture(scope="module")
def heavy_embedded(tmp_path_factory: pytest.TempPathFactory) -> Lowered:
    return _lower(tmp_path_factory.mktemp("embedded"), "heavy", "embedded")


def _members(path: Path) -> dict[str, int]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename.split("/", 1)[1]: info.file_size for info in archive.infolist()}


def _run(runner: Any, x: torch.Tensor) -> torch.Tensor:
    (out,) = runner.loader.run([x])
    return out


@pytest.mark.slow
def test_shared_weights_are_stored_once(heavy_shared: Lowered) -> None:
    program, out, result = heavy_shared
    assert result.verification is not None and result.verification["passed"]
    ratio = out.stat().st_size / program.stat().st_size
    assert ratio <= 1.10, f"archive is {ratio:.2f}x the upload"
    members = _members(out)
    weights = sorted(m for m in members if m.startswith("data/weights/weight_"))
    assert weights == sorted(m for m in _members(program) if m.startswith("data/weights/weight_"))
    so = [size for m, size in members.items() if m.endswith(".so")]
    assert so and max(so) < 4 << 20, f".so sizes {so}: the weights are still inside"


@pytest.mark.slow
def test_shared_archive_names_each_constants_source(heavy_shared: Lowered) -> None:
    _, out, _ = heavy_shared
    contents = load_pt2(str(out))
    spec = json.loads(contents.extra_files[CONSTANTS_MAP_FILE])
    assert spec["program"] == "heavy" and spec["delegate"] == "heavy-aoti"
    runner = contents.aoti_runners["heavy-aoti"]
    state = contents.exported_programs["heavy"].state_dict
    assert set(runner.get_constant_fqns()) <= set(spec["constants"])
    assert {spec["constants"][f] for f in runner.get_constant_fqns()} == set(state)
    provenance = json.loads(contents.extra_files["provenance.json"])
    assert provenance["weights"]["mode"] == "shared"
    assert "load_constants" in provenance["weights"]["load"]


@pytest.mark.slow
def test_shared_runner_matches_the_original_at_another_batch(heavy_shared: Lowered) -> None:
    _, out, _ = heavy_shared
    runner = load_runner(out, model_name="heavy", backend_id="aoti", device="cpu")
    x = torch.randn(5, 1024)
    torch.testing.assert_close(_run(runner, x), export_model("heavy").module()(x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_consumer_code_from_the_hint_loads_the_runner(heavy_shared: Lowered) -> None:
    """The steps the provenance and README describe, with torch's API only."""
    _, out, _ = heavy_shared
    contents = load_pt2(str(out))
    spec = json.loads(contents.extra_files["aoti_constants.json"])
    ep = contents.exported_programs[spec["program"]]
    tensors = {**ep.state_dict, **ep.constants}
    runner = contents.aoti_runners[spec["delegate"]]
    runner.load_constants({fqn: tensors[spec["constants"][fqn]]
                           for fqn in runner.get_constant_fqns()}, check_full_update=True)
    x = torch.randn(3, 1024)
    torch.testing.assert_close(_run(runner, x), export_model("heavy").module()(x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_embedded_weights_give_a_self_contained_runner(heavy_embedded: Lowered) -> None:
    program, out, result = heavy_embedded
    assert result.verification is not None and result.verification["passed"]
    assert result.profile is not None
    assert out.stat().st_size / program.stat().st_size > 1.8
    contents = load_pt2(str(out))  # no constants bound: the .so carries them
    assert CONSTANTS_MAP_FILE not in contents.extra_files
    assert json.loads(contents.extra_files["provenance.json"])["weights"] == {"mode": "embedded"}
    x = torch.randn(4, 1024)
    torch.testing.assert_close(_run(contents.aoti_runners["heavy-aoti"], x),
                               export_model("heavy").module()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_shared_buffers_that_the_runner_updates_stay_private(tmp_path: Path) -> None:
    _, out, result = _lower(tmp_path, "counter", "shared")
    assert result.verification is not None and result.verification["passed"]
    contents = load_pt2(str(out))
    from app.lowering.package import bind_constants

    runner = bind_constants(contents, model_name="counter", backend_id="aoti")
    program = contents.exported_programs["counter"]
    before = {k: v.clone() for k, v in program.state_dict.items()}
    reference = export_model("counter").module()
    for _ in range(3):
        x = torch.randn(2, 8)
        args, kwargs = pytree.tree_unflatten([x], program.call_spec.in_spec)
        torch.testing.assert_close(_run(runner, x.clone()), reference(*args, **kwargs))
    for name, value in program.state_dict.items():
        assert torch.equal(value, before[name]), f"{name} changed under the loaded program"


@pytest.mark.slow
def test_shared_weights_with_runtime_constant_folding(tmp_path: Path) -> None:
    """Folded constants are computed by the runner at load, not bound from the program."""
    program = save_model("convnet", tmp_path / "convnet.pt2")
    out = tmp_path / "out.pt2"
    result = run_lowering(program_path=program, out_path=out, model_name="convnet",
                          backend_id="aoti", device="cpu",
                          options={"aot_inductor.use_runtime_constant_folding": True},
                          verify=True, rtol=1e-4, atol=1e-5, provenance={}, weights="shared")
    assert result.verification is not None and result.verification["passed"]
    runner = load_runner(out, model_name="convnet", backend_id="aoti", device="cpu")
    assert any(f.startswith("_FOLDED_CONST_") for f in runner.get_constant_fqns())


def test_unknown_weights_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        run_lowering(program_path=tmp_path / "none.pt2", out_path=tmp_path / "out.pt2",
                     model_name="m", backend_id="aoti", device="cpu", options={},
                     verify=False, rtol=1e-4, atol=1e-5, provenance={}, weights="copied")


def test_extra_file_named_like_the_constants_map_is_refused(tmp_path: Path) -> None:
    program = tmp_path / "clash.pt2"
    torch.export.save(export_model("linear"), str(program),
                      extra_files={CONSTANTS_MAP_FILE: "{}"})
    with pytest.raises(JobError) as info:
        run_lowering(program_path=program, out_path=tmp_path / "out.pt2", model_name="m",
                     backend_id="aoti", device="cpu", options={}, verify=False, rtol=1e-4,
                     atol=1e-5, provenance={})
    assert info.value.code == ErrorCode.INVALID_PROGRAM
    assert CONSTANTS_MAP_FILE in info.value.message
