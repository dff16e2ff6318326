"""Loading the uploaded program, with failures turned into job errors."""

from __future__ import annotations

import re
from pathlib import Path

import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import load_pt2

from app.constants import ErrorCode
from app.errors import JobError
from app.lowering.package import RESERVED_EXTRA_FILES

# torch's messages for a pytree node type nobody registered in this process.
_UNKNOWN_TYPE = re.compile(
    r"(?:Deserializing|Serializing) (?P<type>\S+) in pytree is not registered"
    r"|No registered serialization name for (?P<type2>\S+)"
)


def _unknown_pytree_type(exc: BaseException) -> str | None:
    match = _UNKNOWN_TYPE.search(str(exc))
    if match is None:
        return None
    return (match.group("type") or match.group("type2")).strip("<>'\"").removeprefix("class '")


def load_program(path: Path) -> tuple[ExportedProgram, dict[str, str]]:
    """Load the single program of a ``torch.export.save`` archive, and its extra files
    (``torch.export.save(..., extra_files=...)``: name -> text), carried into the output.

    ``load_pt2`` is called directly instead of ``torch.export.load``: the latter
    swallows RuntimeError (NotImplementedError included, which is how an unknown
    pytree type surfaces) and retries with a legacy reader that unpickles.
    """
    try:
        contents = load_pt2(str(path))
        programs = contents.exported_programs
    except Exception as exc:
        type_name = _unknown_pytree_type(exc)
        if type_name is not None:
            module = type_name.rpartition(".")[0] or type_name
            raise JobError(
                ErrorCode.UNKNOWN_PYTREE_TYPE,
                f"the program uses the pytree type {type_name!r}, which is not registered "
                f"in the worker; add {module!r} to LOWERING_PRELOAD_MODULES",
                detail={"type": type_name, "module": module},
            ) from exc
        raise JobError(
            ErrorCode.INVALID_PROGRAM, f"{type(exc).__name__}: {exc}"[:2000]
        ) from exc
    if "model" not in programs:
        raise JobError(
            ErrorCode.INVALID_PROGRAM,
            f"the archive holds no program named 'model' (found: {sorted(programs)}); "
            "save it with torch.export.save",
        )
    ep = programs["model"]
    _check_example_inputs(ep)
    extras = dict(contents.extra_files or {})
    clash = sorted(RESERVED_EXTRA_FILES & set(extras))
    if clash:
        raise JobError(
            ErrorCode.INVALID_PROGRAM,
            f"the program's extra file(s) {', '.join(clash)} would be overwritten by the "
            "lowering's own; rename them in torch.export.save(extra_files=...)",
            detail={"extra_files": clash},
        )
    return ep, extras


def _check_example_inputs(ep: ExportedProgram) -> None:
    # Lowering re-exports and compiles with the example inputs; without them
    # there is nothing to trace with and nothing to verify against.
    n_user_inputs = len(ep.graph_signature.user_inputs)
    example = ep.example_inputs
    leaves = pytree.tree_leaves(example) if example is not None else []
    if example is None or (n_user_inputs > 0 and not leaves):
        raise JobError(
            ErrorCode.INVALID_PROGRAM,
            "the program carries no example inputs; export it with example inputs "
            "(torch.export.export(model, args, kwargs)) and save it with torch.export.save",
        )
