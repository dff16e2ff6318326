"""Does lowering pay? The archive's runner against the program run eagerly, same inputs.

Both sides run the example inputs on the job's device, in the job's sandbox, after a
warm-up; each side's figure is the median of ``runs`` timed calls (inputs are cloned
before the clock starts, so a program that mutates its inputs costs the same every call).
The number of runs adapts to the program: as many as fit a small time budget, within
[MIN_RUNS, MAX_RUNS]. Only timings leave this module, never a value the compiled code
computed.
"""

from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from app.lowering.lower import flat_example_inputs, to_device
from app.lowering.package import load_runner

log = logging.getLogger("app.lowering")
WARMUP_RUNS = 2
MIN_RUNS = 3
MAX_RUNS = 25
BUDGET_S = 2.0  # per side, after the warm-up


def _clone(flat: list[Any]) -> list[Any]:
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]


def _timer(device: str) -> Callable[[], None]:
    """What makes a timing honest on this device: CUDA work is asynchronous."""
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _median_ms(call: Callable[[list[Any]], Any], flat: list[Any], runs: int,
               sync: Callable[[], None]) -> float:
    times = []
    for _ in range(runs):
        inputs = _clone(flat)
        sync()
        start = time.perf_counter()
        call(inputs)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def mutates(program: ExportedProgram) -> bool:
    """Might running the program change its state? (torch 2.13 graphs keep in-place ops, so
    the signature's mutation lists are not enough.) Anything unknown counts as yes."""
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        return True
    for node in program.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__module__", "") == "_operator":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None or schema.is_mutable:
            return True
    return False


def release_runner(runner: Any) -> None:
    """Free the weights bound to a runner that will not run again (package.bind_constants).

    torch 2.13's AOTInductor container never drops its reference to a user-managed
    constant (MaybeOwningAtenTensorHandle makes a tensor handle it does not own and
    never frees; fixed upstream by pytorch/pytorch#194480), so without this every
    load_runner would keep one more copy of the weights (the archive's) alive for
    the life of the process. Their storages are emptied here: the leaked handles
    then point at zero bytes. Nothing else holds these storages: parameters are the
    archive's own (load_pt2's), buffers are clones.
    """
    constants = getattr(runner, "shared_constants", None) or {}
    emptied: set[int] = set()
    for tensor in constants.values():
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in emptied:  # views of one storage: empty it once
            continue
        emptied.add(key)
        storage._swap_data_ptr_(torch.UntypedStorage(0, device=storage.device))
    if constants:
        runner.shared_constants = {}


def profile_archive(*, archive_path: Path, program: ExportedProgram, model_name: str,
                    backend_id: str, device: str) -> dict[str, Any]:
    """``{eager_ms, compiled_ms, speedup, runs}`` on the example inputs."""
    # As a consumer loads it: a runner whose weights live in the original program gets
    # them bound first (package.load_runner), a self-contained one is used as is.
    runner = load_runner(archive_path, model_name=model_name, backend_id=backend_id,
                         device=device)
    try:
        return _profile(runner, program, device)
    finally:
        # The runner holds the archive's weights: free them before the final archive
        # is written.
        release_runner(runner)
        del runner
        gc.collect()


def working_copy(program: ExportedProgram, device: str) -> ExportedProgram:
    """A program to run (and move to ``device``) that leaves ``program`` as it was, e.g.
    the original that is packaged afterwards: for a program that mutates its buffers, a
    private copy; for any other, the program itself, sharing its weights (no second
    copy in memory). Off the CPU, lower.to_device moves the program in place (torch's
    move_to_device_pass replaces its tensors and rewrites its graph), so it then gets a
    copy of everything but its weights, which the move replaces but never changes."""
    if mutates(program):
        return copy.deepcopy(program)
    if device == "cpu":  # lower.to_device moves nothing
        return program
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return copy.deepcopy(program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})


def _profile(runner: Any, program: ExportedProgram, device: str) -> dict[str, Any]:
    moved, flat = to_device(working_copy(program, device), flat_example_inputs(program),
                            device)
    module = moved.module()
    in_spec = program.call_spec.in_spec

    def eager(inputs: list[Any]) -> Any:
        args, kwargs = pytree.tree_unflatten(inputs, in_spec)
        return module(*args, **kwargs)

    def compiled(inputs: list[Any]) -> Any:
        return runner.loader.run([x for x in inputs if isinstance(x, torch.Tensor)])

    sync = _timer(device)
    with torch.no_grad():
        for _ in range(WARMUP_RUNS):
            eager(_clone(flat))
            compiled(_clone(flat))
        one_call_s = max(_median_ms(eager, flat, 1, sync), _median_ms(compiled, flat, 1, sync))
        runs = max(MIN_RUNS, min(MAX_RUNS, int(BUDGET_S * 1000.0 / max(one_call_s, 1e-3))))
        eager_ms = _median_ms(eager, flat, runs, sync)
        compiled_ms = _median_ms(compiled, flat, runs, sync)
    # Significant digits, not decimals: a small program's compiled call takes microseconds.
    profile = {"eager_ms": float(f"{eager_ms:.4g}"), "compiled_ms": float(f"{compiled_ms:.4g}"),
               "speedup": float(f"{eager_ms / compiled_ms:.4g}") if compiled_ms > 0 else None,
               "runs": runs}
    log.info("profile: eager %.3f ms, compiled %.3f ms (median of %d)", eager_ms,
             compiled_ms, runs)
    return profile
