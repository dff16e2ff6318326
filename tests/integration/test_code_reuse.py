"""Compiled code reused when only the weights change (issue 9 part 2), at the pipeline.

The premise, checked here: with weights shared, the compiled code of a structure does not
depend on its weight values (a fresh compile for other weights gives the same .so, with
inductor's caches off), so packaging an earlier lowering's files with new weights is the
same archive a compile would give; and it is verified in full with the new weights.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch._inductor import config as inductor_config

from app.lowering import LoweringResult, run_lowering
from app.lowering.package import load_runner
from app.storage.compiled import take_compiled
from tests.models import FineTune, fine_tune, save_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]
DELEGATE = "m-aoti"


def _lower(tmp: Path, program: Path, name: str,
           compiled: list[Path] | None = None) -> tuple[Path, LoweringResult]:
    out = tmp / f"{name}-aoti.pt2"
    result = run_lowering(program_path=program, out_path=out, model_name="m",
                          backend_id="aoti", device="cpu", options={}, verify=True,
                          rtol=1e-4, atol=1e-5, provenance={}, compiled=compiled)
    return out, result


def _save(tmp: Path, seed: int) -> Path:
    path = tmp / f"seed{seed}.pt2"
    torch.export.save(fine_tune(seed), str(path))
    return path


def _compiled(archive: Path) -> dict[str, bytes]:
    prefix = f"archive/data/aotinductor/{DELEGATE}/"
    with zipfile.ZipFile(archive) as zipped:
        return {n[len(prefix):]: zipped.read(n) for n in zipped.namelist() if n.startswith(prefix)}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FineTune(0), lowered and compiled."""
    tmp = tmp_path_factory.mktemp("first")
    archive, result = _lower(tmp, _save(tmp, 0), "first")
    assert not result.code_reused
    return archive


def _taken(tmp: Path, archive: Path) -> list[Path]:
    dest = tmp / "compiled"
    names = take_compiled(archive, delegate=DELEGATE, dest=dest, max_bytes=1 << 30)
    return [dest / name for name in names]


def test_other_weights_reuse_the_code_and_verify_with_their_own(
        first: Path, tmp_path: Path) -> None:
    archive, result = _lower(tmp_path, _save(tmp_path, 1), "second", _taken(tmp_path, first))
    assert result.code_reused
    assert result.verification is not None and result.verification["passed"]
    assert _compiled(archive).keys() == _compiled(first).keys()
    # The runner computes FineTune(1), not the model whose lowering compiled the code.
    runner = load_runner(archive, model_name="m", backend_id="aoti", device="cpu")
    x = torch.randn(7, 16)  # another batch than the example's: the dynamic dim holds
    (got,) = runner.loader.run([x])
    with torch.no_grad():
        torch.testing.assert_close(got, FineTune(1).eval()(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, FineTune(0).eval()(x), rtol=1e-2, atol=1e-2)


def _sources(archive: Path) -> dict[str, list[bytes]]:
    """Each compiled file by kind ("kernel.cpp", "wrapper.so", ...; inductor names them
    by a hash of their text, comments with build paths included) and, for the C++
    sources, their lines less those comments (and blank lines: inductor appends the
    build commands to a cached source each time it builds it)."""
    return {name.split(".", 1)[1]: [line for line in body.splitlines()
                                    if line.strip() and not line.lstrip().startswith(b"//")]
            if name.endswith(".cpp") else [] for name, body in _compiled(archive).items()}


def test_a_fresh_compile_for_other_weights_gives_the_same_code(
        first: Path, tmp_path: Path) -> None:
    """Without always_keep_tensor_constants, FineTune's 8-element bias and 0-d scale are
    pasted into the kernels as literals and this fails."""
    with inductor_config.patch(force_disable_caches=True):
        archive, result = _lower(tmp_path, _save(tmp_path, 2), "fresh")
    assert not result.code_reused
    fresh = _sources(archive)
    assert any(name.endswith(".so") for name in fresh)
    assert fresh == _sources(first)


def test_code_that_does_not_fit_is_compiled_afresh(first: Path, tmp_path: Path) -> None:
    """Only a broken key could hand a job code of another structure; should it happen,
    the job still ends with a verified archive of its own code."""
    program = save_model("linear", tmp_path / "linear.pt2")
    archive, result = _lower(tmp_path, program, "linear", _taken(tmp_path, first))
    assert not result.code_reused
    assert result.verification is not None and result.verification["passed"]
    assert _compiled(archive).keys() != _compiled(first).keys()
