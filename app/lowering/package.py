"""Writing the NativeRT archive: the layout of package_nativert_with_aoti_delegate.

Weights are stored once by default ("shared"): the delegate's .so is compiled with
``aot_inductor.package_constants_in_so=False`` and carries no constants, and
``extra/aoti_constants.json`` maps each constant the runner asks for to the tensor of
the original program (``models/{model}.json``) that holds it, i.e. to its files under
``data/weights/`` (and ``data/constants/``). ``load_runner``/``bind_constants`` is the
load path for such an archive, and what verification uses.

Why not torch's own ``load_pt2(..., load_weights_from_disk=True)`` and a
``data/aotinductor/{delegate}/weights_config.json`` (torch 2.13,
torch/export/pt2_archive/_package.py, load_pt2): it ``torch.load``s EVERY member
under ``data/weights/``, but package_pt2 writes an exported program's weights there
as raw bytes (_save_raw_tensors) next to its JSON ``{model}_weights_config.json``,
so that load fails (UnpicklingError) on any archive that holds an exported program
with weights. And torch's own ``package_constants_on_disk_format="pickle_weights"``
writes a second, pickled copy (and numbers it ``weight_0``... again, clashing with
the program's files). A shared runner loaded with plain ``load_pt2`` has NO constants:
running it crashes the process (SIGSEGV), so consumers must bind them first.

"embedded" keeps torch's self-contained layout: constants inside the .so (the archive
then holds every weight twice) and no ``aoti_constants.json``.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive._package import PT2ArchiveContents, load_pt2, package_pt2

PROVENANCE_FILE = "provenance.json"
CONSTANTS_MAP_FILE = "aoti_constants.json"
RESERVED_EXTRA_FILES = frozenset({PROVENANCE_FILE, CONSTANTS_MAP_FILE})
WEIGHTS_MODES = ("shared", "embedded")
FOLDED_PREFIX = "_FOLDED_CONST_"
LOAD_HINT = (
    "weights shared with the original program: the delegate's .so holds no constants. "
    "Load with app.lowering.package.load_runner(path, model_name=..., backend_id=..., "
    "device=...), or after torch.export.pt2_archive._package.load_pt2(path) map each "
    "name in extra/aoti_constants.json 'constants' to "
    "{**ep.state_dict, **ep.constants} of exported_programs[<'program'>] and call "
    "runner.load_constants(..., check_full_update=True) before running; a runner run "
    "without its constants crashes the process"
)


def delegate_name(model_name: str, backend_id: str) -> str:
    return f"{model_name}-{backend_id}"


def write_archive(
    path: Path,
    *,
    model_name: str,
    backend_id: str,
    original: ExportedProgram,
    delegate: ExportedProgram,
    aoti_files: list[Any],
    provenance: dict[str, Any] | None = None,
    max_bytes: int | None = None,
    extra_files: dict[str, str] | None = None,
    constants_map: dict[str, str] | None = None,
) -> None:
    """Write models/{model}.json (original), models/{model}-{backend}.json (delegate),
    data/aotinductor/{model}-{backend}/ (compiled files), extra/provenance.json, and
    the uploaded program's own extra files unchanged (``extra_files``, as load_program
    returned them), and, for a delegate compiled without its constants
    (``constants_map``: runner constant name -> the original program's state_dict or
    constants name, see ``constant_sources``), extra/aoti_constants.json.

    Callable twice with the same aoti_files: they are paths on disk plus a
    Weights object, so re-packaging never recompiles.
    """
    name = delegate_name(model_name, backend_id)
    extra = dict(extra_files or {})
    clash = RESERVED_EXTRA_FILES & set(extra)
    if clash:  # load_program refuses these; a caller passing them is a bug
        raise ValueError(f"extra files {sorted(clash)} are the lowering's own")
    if constants_map is not None:
        extra[CONSTANTS_MAP_FILE] = json.dumps(
            {"program": model_name, "delegate": name, "constants": constants_map},
            indent=2, sort_keys=True)
    if provenance is not None:
        extra[PROVENANCE_FILE] = json.dumps(provenance, indent=2, sort_keys=True, default=str)
    with _CappedFile(path, max_bytes) as sink:
        package_pt2(
            sink,  # type: ignore[arg-type]
            exported_programs={model_name: original, name: delegate},
            aoti_files={name: aoti_files},
            extra_files=extra or None,
        )
    if sink.error is not None:
        path.unlink(missing_ok=True)
        raise sink.error


def bind_constants(contents: PT2ArchiveContents, *, model_name: str, backend_id: str,
                   device: str = "cpu") -> Any:
    """The delegate's runner, with its constants loaded from the original program's
    weights when the archive shares them (a self-contained runner is returned as is).

    Parameters are shared with the loaded program (user_managed: no copy on CPU);
    buffers are cloned, since a runner may update them in place. The tensors are kept
    alive on the runner object.
    """
    runner = contents.aoti_runners[delegate_name(model_name, backend_id)]
    raw = (getattr(contents, "extra_files", None) or {}).get(CONSTANTS_MAP_FILE)
    if raw is None:
        return runner
    spec = json.loads(raw)
    program = contents.exported_programs[spec["program"]]
    sources: dict[str, str] = spec["constants"]
    tensors = {**program.state_dict, **program.constants}
    parameters = set(program.graph_signature.parameters)
    # Constants that runtime constant folding computes from the others at load are
    # named "_FOLDED_CONST_<node>" (torch/_inductor/compile_fx.py); the runner's full-
    # update check does not ask for them.
    wanted = [fqn for fqn in runner.get_constant_fqns() if not fqn.startswith(FOLDED_PREFIX)]
    missing = [fqn for fqn in wanted if sources.get(fqn) not in tensors]
    if missing:
        raise ValueError(f"the runner's constants {missing[:5]} have no tensor in program "
                         f"{spec['program']!r} ({len(missing)} of {len(wanted)} missing)")
    constants: dict[str, torch.Tensor] = {}
    for fqn in wanted:
        source = sources[fqn]
        tensor = tensors[source].detach()
        if source not in parameters:
            tensor = tensor.clone()
        constants[fqn] = tensor.to(device)
    runner.load_constants(constants, check_full_update=True, user_managed=True)
    runner.shared_constants = constants  # type: ignore[attr-defined]  # user_managed: the runner holds only pointers
    return runner


def load_runner(archive_path: Path, *, model_name: str, backend_id: str, device: str) -> Any:
    """load_pt2 the archive and return its delegate's runner, ready to run."""
    index = torch.device(device).index
    contents = load_pt2(str(archive_path), device_index=index if index is not None else -1)
    return bind_constants(contents, model_name=model_name, backend_id=backend_id,
                          device=device)


class _CappedFile:
    """The file torch's zip writer writes through; it never sees a failed write.

    torch's writer aborts the whole process (std::terminate in a destructor) if a
    write comes up short, as on a full disk or a file over RLIMIT_FSIZE. So a write
    that would pass ``max_bytes`` or that the OS refuses is recorded, not raised,
    and ``write_archive`` raises it once torch has finished.
    """

    def __init__(self, path: Path, max_bytes: int | None) -> None:
        self.handle = path.open("wb")
        self.max_bytes = max_bytes
        self.written = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        size = len(data)
        if self.error is None:
            if self.max_bytes is not None and self.written + size > self.max_bytes:
                self.error = OSError(errno.EFBIG, "the archive exceeds LOWERING_MAX_ARTIFACT_"
                                     f"BYTES ({self.max_bytes} bytes)")
            else:
                try:
                    self.handle.write(data)
                except OSError as exc:
                    self.error = exc
        self.written += size
        return size

    def flush(self) -> None:
        if self.error is None:
            try:
                self.handle.flush()
            except OSError as exc:
                self.error = exc

    def __enter__(self) -> _CappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.handle.close()
        except OSError as error:
            self.error = self.error or error
