"""In-process tests of app.lowering with real torch and AOTInductor.

Each lowering costs 6-20 s here, so the few that run are shared through
module-scoped fixtures.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.pt2_archive._package import load_pt2

from app.constants import ErrorCode
from app.errors import JobError
from app.lowering import LoweringResult, probe_toolchain, run_lowering, verify_archive
from app.lowering.package import bind_constants, load_runner
from tests.leaks import assert_no_values, leaked_numbers
from tests.models import export_model, save_model

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    # Raised from torch internals via copyreg while inductor deep-copies a graph,
    # so pyproject's "ignore::FutureWarning:torch.*" does not match it.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


def _lower(tmp: Path, name: str, **overrides: Any) -> tuple[Path, LoweringResult, list[str]]:
    program = save_model(name, tmp / f"{name}.pt2")
    out = tmp / f"{name}-lowered.pt2"
    phases: list[str] = []
    kwargs: dict[str, Any] = {
        "model_name": name, "backend_id": "aoti", "device": "cpu", "options": {},
        "verify": True, "rtol": 1e-4, "atol": 1e-5, "provenance": {"lowering_id": "t-" + name},
        **overrides,
    }
    result = run_lowering(program_path=program, out_path=out, on_phase=phases.append, **kwargs)
    return out, result, phases


@pytest.fixture(scope="module")
def dynamic_lowered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoweringResult,
                                                                         list[str]]:
    return _lower(tmp_path_factory.mktemp("dynamic"), "dynamic")


@pytest.fixture(scope="module")
def counter_lowered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoweringResult,
                                                                         list[str]]:
    return _lower(tmp_path_factory.mktemp("counter"), "counter")


def test_probe_toolchain_reports_compiler_and_march() -> None:
    info = probe_toolchain({"cpp.march": "x86-64-v2"})
    assert info["torch_version"] == torch.__version__
    assert info["compiler"]
    assert info["cpp_march"] == "x86-64-v2"
    assert probe_toolchain()["cpp_march"] == "native"
    assert info["cuda_available"] is torch.cuda.is_available()
    assert isinstance(info["cuda_arch"], list)


@pytest.mark.slow
def test_dynamic_model_keeps_its_batch_dimension(dynamic_lowered) -> None:
    out, result, phases = dynamic_lowered
    assert phases == ["load", "lower", "package", "verify", "profile"]
    assert set(result.timings) == {"load", "lower", "package", "verify", "profile"}
    assert result.toolchain["device"] == "cpu"
    verification = result.verification
    assert verification is not None and verification["passed"]
    assert len(verification["cases"]) >= 2
    assert {tuple(c["sizes"].values()) for c in verification["cases"]} >= {(4,), (7,)}

    contents = load_pt2(str(out))
    assert set(contents.exported_programs) == {"dynamic", "dynamic-aoti"}
    delegate = contents.exported_programs["dynamic-aoti"]
    (vr,) = delegate.range_constraints.values()
    assert (int(vr.lower), int(vr.upper)) == (1, 64)
    runner = bind_constants(contents, model_name="dynamic", backend_id="aoti")
    reference = export_model("dynamic").module()
    for batch in (4, 7):
        x = torch.randn(batch, 16)
        (got,) = runner.loader.run([x])
        torch.testing.assert_close(got, reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_archive_carries_provenance_with_verification(dynamic_lowered) -> None:
    out, result, _ = dynamic_lowered
    provenance = json.loads(load_pt2(str(out)).extra_files["provenance.json"])
    assert provenance["lowering_id"] == "t-dynamic"
    assert provenance["device"] == "cpu"
    assert provenance["options"] == {}
    assert provenance["toolchain"]["torch_version"] == torch.__version__
    assert provenance["verification"] == result.verification
    assert_no_values(provenance["verification"], allowed=(1e-4, 1e-5))
    assert not list(out.parent.glob(".*unverified*")), "draft archive left behind"
    assert provenance["profile"] == result.profile


@pytest.mark.slow
def test_a_verified_lowering_is_profiled(dynamic_lowered) -> None:
    _, result, _ = dynamic_lowered
    profile = result.profile
    assert profile is not None and set(profile) == {"eager_ms", "compiled_ms", "speedup", "runs"}
    assert profile["eager_ms"] > 0 and profile["compiled_ms"] > 0
    assert profile["speedup"] == pytest.approx(profile["eager_ms"] / profile["compiled_ms"],
                                               rel=1e-2)
    assert 3 <= profile["runs"] <= 25
    assert result.timings["profile"] > 0


@pytest.mark.slow
def test_verify_archive_catches_the_stock_helpers_specialised_runner(tmp_path: Path) -> None:
    from torch.nativert.backends._lower_utils import (
        lower_exported_program,
        package_nativert_with_aoti_delegate,
    )

    ep = export_model("dynamic")
    delegate, files = lower_exported_program(ep, "m", "aoti")
    archive = tmp_path / "stock.pt2"
    package_nativert_with_aoti_delegate(str(archive), "m", "aoti", ep, delegate, files)

    verification = verify_archive(
        archive_path=archive, program=export_model("dynamic"), model_name="m",
        backend_id="aoti", device="cpu", rtol=1e-4, atol=1e-5,
    )
    assert verification["passed"] is False
    example, *others = verification["cases"]
    assert example["passed"] is True
    assert any(not case["passed"] for case in others)


@pytest.mark.slow
def test_derived_dims_lower_and_verify_at_other_sizes(tmp_path: Path) -> None:
    # x: batch, pairs: 2*batch, halves: 2*seq with seq carried by no input alone.
    out, result, _ = _lower(tmp_path, "derived")
    verification = result.verification
    assert verification is not None and verification["passed"], verification
    cases = verification["cases"]
    assert sorted(cases[0]["sizes"].values()) == [3, 5]  # seq solved from halves' 10 rows
    varied = {sym for case in cases[1:] for sym, size in case["sizes"].items()
              if size != cases[0]["sizes"][sym]}
    assert varied == set(cases[0]["sizes"]), cases  # both roots, the hidden one included
    for case in cases:
        x_rows, pair_rows, half_rows = (shape[0] for shape in case["input_shapes"])
        assert pair_rows == 2 * x_rows and half_rows % 2 == 0

    contents = load_pt2(str(out))
    delegate = contents.exported_programs["derived-aoti"]
    def ranges(ep: Any) -> list[tuple[int, int]]:  # symbol names differ between exports
        return sorted((int(vr.lower), int(vr.upper)) for sym, vr in ep.range_constraints.items()
                      if sym.is_Symbol)

    assert ranges(delegate) == ranges(export_model("derived"))
    runner = bind_constants(contents, model_name="derived", backend_id="aoti")
    reference = export_model("derived").module()
    for batch, seq in [(1, 2), (7, 9), (32, 16), (3, 5)]:
        inputs = [torch.randn(batch, 8), torch.randn(2 * batch, 8), torch.randn(2 * seq, 8)]
        got = runner.loader.run(inputs)
        expected = pytree.tree_leaves(reference(*inputs))
        assert [tuple(g.shape) for g in got] == [(2 * batch, 8), (seq, 8)]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


class _TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, y + 1


@pytest.mark.parametrize(
    "derive",
    [lambda b: (b, b + 1), lambda b: (2 * b + 1, 3 * b - 2), lambda b: (b, 4 * b),
     lambda b: (b - 1, b + 7)],
    ids=["b,b+1", "2b+1,3b-2 (no bare root)", "b,4b", "b-1,b+7"],
)
def test_reexport_rebuilds_any_affine_derived_dim(derive: Any) -> None:
    from app.lowering.lower import _FlattenedModule, flat_dynamic_shapes, flat_example_inputs
    from app.lowering.verify import _example_sizes, _inputs_for

    batch = Dim("batch", min=3, max=20)
    x_dim, y_dim = derive(batch)
    x_rows, y_rows = derive(5)  # the same expressions at batch = 5
    ep = torch.export.export(_TwoInputs(), (torch.randn(x_rows, 2), torch.randn(y_rows, 2)),
                             dynamic_shapes={"x": {0: x_dim}, "y": {0: y_dim}})
    flat = flat_example_inputs(ep)
    sizes = _example_sizes(ep, flat)  # the root torch chose, solved from the example
    assert len(sizes) == 1
    assert [list(t.shape) for t in _inputs_for(ep, flat, sizes)] == [[x_rows, 2], [y_rows, 2]]
    again = torch.export.export(_FlattenedModule(ep), tuple(flat),
                                dynamic_shapes={"flat_inputs": tuple(flat_dynamic_shapes(ep))})

    def ranges(program: Any) -> list[tuple[int, int]]:
        return sorted((int(vr.lower), int(vr.upper))
                      for vr in program.range_constraints.values())

    assert ranges(again) == ranges(ep)


@pytest.mark.slow
def test_counter_original_is_packaged_untouched(counter_lowered) -> None:
    out, result, _ = counter_lowered
    assert result.verification is not None and result.verification["passed"]
    contents = load_pt2(str(out))
    packaged = contents.exported_programs["counter"]
    fresh = export_model("counter")
    torch.testing.assert_close(packaged.state_dict["steps"], fresh.state_dict["steps"])
    assert not packaged.state_dict["steps"].requires_grad
    # The runner starts from the same state: its first call adds 1.
    x = torch.zeros(2, 8)
    (got,) = bind_constants(contents, model_name="counter",
                            backend_id="aoti").loader.run([x])
    torch.testing.assert_close(got, torch.ones(2, 8))


@pytest.mark.slow
def test_verification_failure_names_output_case_and_tolerance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A negative atol cannot be met, which fails verification of a correct
    # lowering; the kwargs model also covers keyword-only tensor inputs.
    caplog.set_level(logging.INFO, logger="app.lowering")
    with pytest.raises(JobError) as info:
        _lower(tmp_path, "kwargs", atol=-1.0)
    err = info.value
    assert err.code == ErrorCode.VERIFICATION_FAILED
    assert "output 0" in err.message and "example" in err.message and "atol -1.0" in err.message
    assert err.detail["passed"] is False
    # Neither the message, the detail (the job record) nor the log carries a value
    # the compiled code returned: outputs, shapes, dtypes and an error bucket only.
    assert_no_values(err.detail, allowed=(1e-4, -1.0))
    assert not leaked_numbers(err.message, allowed=(1e-4, -1.0)), err.message
    case = err.detail["cases"][0]
    assert case["mismatched_outputs"] == [0]
    assert case["outputs"][0]["expected"] == {"shape": [4, 8], "dtype": "float32"}
    assert case["outputs"][0]["got"] == {"shape": [4, 8], "dtype": "float32"}
    ep = export_model("kwargs")
    args, kwargs = ep.example_inputs
    outputs = ep.module()(*args, **kwargs).flatten().tolist()
    verify_log = "\n".join(r.getMessage() for r in caplog.records if "case " in r.getMessage()
                           or "verification" in r.getMessage())
    assert verify_log and not leaked_numbers(verify_log, allowed=(1e-4, -1.0)), verify_log
    text = json.dumps(err.as_dict()) + caplog.text
    assert not [v for v in outputs if v and (repr(v) in text or f"{v:.4g}" in text)]
    assert not (tmp_path / "kwargs-lowered.pt2").exists()
    assert not list(tmp_path.glob(".*unverified*"))


@pytest.mark.slow
def test_nested_dict_io_without_verification(tmp_path: Path) -> None:
    out, result, phases = _lower(tmp_path, "dict_io", verify=False)
    assert phases == ["load", "lower", "package"]
    assert result.verification is None and "verify" not in result.timings
    contents = load_pt2(str(out))
    assert json.loads(contents.extra_files["provenance.json"])["verification"] is None
    ep = export_model("dict_io")
    args, kwargs = ep.example_inputs
    got = bind_constants(contents, model_name="dict_io",
                         backend_id="aoti").loader.run(pytree.tree_leaves((args, kwargs)))
    expected = pytree.tree_leaves(ep.module()(*args, **kwargs))
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


EXTRAS = {"notes.txt": "trained on 2024-05-01\r\nünïcödé ✓ \ufeff\n", "cfg/run.json": '{"lr": 0.1}',
          "empty": ""}


def _extra_members(path: Path) -> dict[str, bytes]:
    """extra/<name> -> bytes, read as raw zip members (not through torch)."""
    with zipfile.ZipFile(path) as archive:
        return {name.split("/extra/", 1)[1]: archive.read(name) for name in archive.namelist()
                if "/extra/" in name}


@pytest.mark.slow
def test_extra_files_are_carried_into_the_archive_unchanged(tmp_path: Path) -> None:
    from app.errors import ServiceError
    from app.validation.gate import ArchiveLimits, admit_upload

    saved = tmp_path / "with_extras.pt2"
    torch.export.save(export_model("linear"), str(saved), extra_files=EXTRAS)
    admitted = tmp_path / "admitted.pt2"  # what the gate hands a worker
    try:
        admit_upload(saved, admitted, ArchiveLimits())
    except ServiceError as exc:
        pytest.skip(f"the upload gate still refuses extra files: {exc.message}")
    out = tmp_path / "out.pt2"
    run_lowering(program_path=admitted, out_path=out, model_name="m", backend_id="aoti",
                 device="cpu", options={}, verify=True, rtol=1e-4, atol=1e-5,
                 provenance={"lowering_id": "t-extras"})
    carried = _extra_members(out)
    provenance = json.loads(carried.pop("provenance.json"))
    assert provenance["lowering_id"] == "t-extras"
    # The lowering's own second file: how the runner's constants map onto the weights.
    assert json.loads(carried.pop("aoti_constants.json"))["program"] == "m"
    assert carried == _extra_members(saved) == {k: v.encode() for k, v in EXTRAS.items()}
    contents = load_pt2(str(out))
    ours = {"provenance.json", "aoti_constants.json"}
    assert {k: v for k, v in contents.extra_files.items() if k not in ours} == EXTRAS


def test_extra_file_named_like_the_provenance_is_refused(tmp_path: Path) -> None:
    program = tmp_path / "clash.pt2"
    torch.export.save(export_model("linear"), str(program),
                      extra_files={"provenance.json": "{}"})
    with pytest.raises(JobError) as info:
        run_lowering(program_path=program, out_path=tmp_path / "out.pt2", model_name="m",
                     backend_id="aoti", device="cpu", options={}, verify=False, rtol=1e-4,
                     atol=1e-5, provenance={})
    assert info.value.code == ErrorCode.INVALID_PROGRAM
    assert "provenance.json" in info.value.message and "rename" in info.value.message


def test_program_without_example_inputs_is_invalid(tmp_path: Path) -> None:
    ep = export_model("linear")
    ep.example_inputs = None
    program = tmp_path / "noexample.pt2"
    torch.export.save(ep, str(program))
    with pytest.raises(JobError) as info:
        run_lowering(program_path=program, out_path=tmp_path / "out.pt2", model_name="m",
                     backend_id="aoti", device="cpu", options={}, verify=True, rtol=1e-4,
                     atol=1e-5, provenance={})
    assert info.value.code == ErrorCode.INVALID_PROGRAM
    assert "example inputs" in info.value.message


def test_garbage_file_is_invalid_program(tmp_path: Path) -> None:
    program = tmp_path / "garbage.pt2"
    program.write_bytes(b"not a zip at all")
    with pytest.raises(JobError) as info:
        run_lowering(program_path=program, out_path=tmp_path / "out.pt2", model_name="m",
                     backend_id="aoti", device="cpu", options={}, verify=False, rtol=1e-4,
                     atol=1e-5, provenance={})
    assert info.value.code == ErrorCode.INVALID_PROGRAM


_LOAD_IN_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from app.errors import JobError
from app.lowering import run_lowering
try:
    run_lowering(program_path=Path(sys.argv[1]), out_path=Path(sys.argv[2]), model_name="m",
                 backend_id="aoti", device="cpu", options={}, verify=False, rtol=1e-4,
                 atol=1e-5, provenance={})
except JobError as exc:
    assert "tests.pytree_types" not in sys.modules
    print(json.dumps(exc.as_dict()))
"""


def test_unknown_pytree_type_names_the_module_to_preload(tmp_path: Path) -> None:
    program = save_model("custom_output", tmp_path / "custom.pt2")
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(program), str(tmp_path / "o.pt2")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["code"] == ErrorCode.UNKNOWN_PYTREE_TYPE.value
    assert error["detail"] == {"type": "tests.pytree_types.CustomOutput",
                               "module": "tests.pytree_types"}
    assert "LOWERING_PRELOAD_MODULES" in error["message"]
    assert "tests.pytree_types" in error["message"]


# ---- data-dependent sizes (issue 9): inside the graph, in the outputs, unbindable ---------

def _delegate_matches_original(out: Path, name: str, inputs: list[list[torch.Tensor]]) -> None:
    """The packaged runner equals the original program on every input list (new data)."""
    runner = load_runner(out, model_name=name, backend_id="aoti", device="cpu")
    reference = export_model(name).module()
    for flat in inputs:
        got = runner.loader.run(flat)
        expected = pytree.tree_leaves(reference(*flat))
        assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_size_from_the_data_inside_the_graph_lowers_and_verifies(tmp_path: Path) -> None:
    from tests.models import nonzero_sum_input

    # x.nonzero() then a sum: the nonzero count is an unbacked size the outputs never
    # carry; the delegate export raised PendingUnbackedSymbolNotFound before.
    out, result, phases = _lower(tmp_path, "nonzero_sum")
    assert {"lower", "package", "verify"} <= set(phases)
    assert result.verification is not None and result.verification["passed"]
    delegate = load_pt2(str(out)).exported_programs["nonzero_sum-aoti"]
    calls = [n for n in delegate.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.higher_order.executorch_call_delegate]
    assert len(calls) == 1
    torch.manual_seed(1)
    # Other counts of nonzeros than the example's 17 (of 24), none and all included.
    _delegate_matches_original(out, "nonzero_sum",
                               [[nonzero_sum_input(zeros)] for zeros in (0, 3, 7, 20, 24)])


@pytest.mark.slow
def test_rows_chosen_by_the_data_reach_the_output_and_lower(tmp_path: Path) -> None:
    # One output's row count is data-dependent (bound to the delegate's output), and a
    # second data-dependent size stays inside (discarded): both in one delegate call.
    out, result, _ = _lower(tmp_path, "masked_rows")
    assert result.verification is not None and result.verification["passed"]
    torch.manual_seed(2)
    inputs = []
    for selected in (0, 1, 5, 6):
        x = torch.randn(6, 4)
        x[:, 0] = x[:, 0].abs() + 0.1
        x[selected:, 0] *= -1
        inputs.append([x])
    _delegate_matches_original(out, "masked_rows", inputs)
    rows = [tuple(load_runner(out, model_name="masked_rows", backend_id="aoti",
                                     device="cpu").loader.run(flat)[0].shape)
            for flat in inputs]
    assert rows == [(0, 4), (1, 4), (5, 4), (6, 4)]


@pytest.mark.slow
def test_output_size_export_cannot_bind_is_a_clear_lowering_failure(tmp_path: Path) -> None:
    # rows = count_a * count_b: no delegate program can bind that product, so nothing is
    # packaged and the error says why (never a wrong archive).
    with pytest.raises(JobError) as info:
        _lower(tmp_path, "masked_outer")
    err = info.value
    assert err.code == ErrorCode.LOWERING_FAILED
    assert "depends on the input data" in err.message
    assert err.detail["exception_type"] == "PendingUnbackedSymbolNotFound"
    assert err.detail["exception_type"] in err.message
    assert not (tmp_path / "masked_outer-lowered.pt2").exists()
    assert not list(tmp_path.glob(".*unverified*"))
