"""Writing the NativeRT archive: the layout of package_nativert_with_aoti_delegate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.export import ExportedProgram
from torch.export.pt2_archive._package import package_pt2

PROVENANCE_FILE = "provenance.json"


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
) -> None:
    """Write models/{model}.json (original), models/{model}-{backend}.json (delegate),
    data/aotinductor/{model}-{backend}/ (compiled files) and extra/provenance.json.

    Callable twice with the same aoti_files: they are paths on disk plus a
    Weights object, so re-packaging never recompiles.
    """
    name = delegate_name(model_name, backend_id)
    extra = None
    if provenance is not None:
        extra = {PROVENANCE_FILE: json.dumps(provenance, indent=2, sort_keys=True, default=str)}
    package_pt2(
        str(path),
        exported_programs={model_name: original, name: delegate},
        aoti_files={name: aoti_files},
        extra_files=extra,
    )
