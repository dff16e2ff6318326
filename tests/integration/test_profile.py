"""Profiling and verification share the original's weights only when running it cannot
change them, and free the weights a runner was given once they are done with it."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.lowering import package as package_module
from app.lowering import verify as verify_module
from app.lowering.lower import flat_example_inputs, to_device
from app.lowering.profile import mutates, release_runner, working_copy
from app.lowering.verify import verify_archive
from tests.models import export_model


@pytest.mark.parametrize(("name", "expected"), [
    ("linear", False), ("convnet", False), ("dynamic", False), ("dict_io", False),
    ("counter", True),  # steps.add_(1): in place, and torch 2.13's signature does not say so
])
def test_mutation_is_seen_in_the_graph(name: str, expected: bool) -> None:
    assert mutates(export_model(name)) is expected


class _EagerLoader:
    """Stands in for the compiled runner: the program's own module, run on a copy."""

    def __init__(self, program: Any) -> None:
        self.module = copy.deepcopy(program).module()

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.module(*tensors)
        return list(out) if isinstance(out, tuple | list) else [out]


@pytest.mark.parametrize(("name", "copies"), [("linear", 0), ("dynamic", 0), ("counter", 1)])
def test_verification_copies_only_a_program_that_mutates(
    monkeypatch: pytest.MonkeyPatch, name: str, copies: int
) -> None:
    program = export_model(name)
    runner = SimpleNamespace(loader=_EagerLoader(program))
    monkeypatch.setattr(package_module, "load_pt2",
                        lambda *a, **k: SimpleNamespace(aoti_runners={"m-aoti": runner}))
    made: list[Any] = []
    real_deepcopy = copy.deepcopy

    def counting(value: Any, *args: Any) -> Any:
        made.append(value)
        return real_deepcopy(value, *args)

    monkeypatch.setattr(verify_module.copy, "deepcopy", counting)
    before = {k: v.clone() for k, v in {**program.state_dict, **program.constants}.items()}
    verification = verify_archive(archive_path=Path("unused.pt2"), program=program,
                                  model_name="m", backend_id="aoti", device="cpu",
                                  rtol=1e-4, atol=1e-5)
    assert verification["passed"] is True, verification
    assert sum(value is program for value in made) == copies
    after = {**program.state_dict, **program.constants}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched


def test_released_runner_keeps_no_weights() -> None:
    weight = torch.randn(64, 64)
    buffer = torch.zeros(8)
    runner = SimpleNamespace(shared_constants={"w": weight, "w_t": weight.t(), "b": buffer})
    release_runner(runner)
    assert weight.untyped_storage().nbytes() == 0  # emptied once, through either view
    assert buffer.untyped_storage().nbytes() == 0
    assert runner.shared_constants == {}
    release_runner(SimpleNamespace())  # a self-contained runner has nothing to release


@pytest.mark.parametrize("name", ["linear", "convnet"])
def test_moving_the_eager_side_off_the_cpu_leaves_the_original_as_it_was(name: str) -> None:
    # "meta" stands in for an accelerator: torch's move_to_device_pass works in place.
    program = export_model(name)
    before = dict(program.state_dict)
    graph = str(program.graph)
    source = working_copy(program, "meta")
    assert source is not program
    assert all(source.state_dict[k] is v for k, v in before.items())  # weights not copied
    moved, _ = to_device(source, flat_example_inputs(program), "meta")
    assert all(t.device.type == "meta" for t in moved.state_dict.values())
    assert all(program.state_dict[k] is v and v.device.type == "cpu" for k, v in before.items())
    assert str(program.graph) == graph


def test_the_eager_side_shares_or_copies_as_the_program_needs() -> None:
    linear = export_model("linear")
    assert working_copy(linear, "cpu") is linear
    counter = export_model("counter")
    private = working_copy(counter, "cpu")
    assert all(private.state_dict[k] is not v for k, v in counter.state_dict.items())
