"""Pre-flight checks of an uploaded program, in the API process, without torch.

These are structural checks of the zip that ``torch.export.save`` writes; they turn
the common mistakes (a checkpoint instead of an export, an already-lowered archive,
a program saved without example inputs) into a clear 4xx before anything is queued.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from app.errors import Unprocessable, UnsupportedMediaType

MAX_MEMBERS = 100_000


def check_program_archive(path: Path) -> None:
    """Raise a 4xx error naming what is wrong with the archive at ``path``."""
    if not zipfile.is_zipfile(path):
        raise UnsupportedMediaType(
            "program is not a .pt2 archive (a zip written by torch.export.save)",
            code="not_a_pt2_archive",
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnsupportedMediaType(
            f"program is not a readable zip archive: {exc}", code="not_a_pt2_archive"
        ) from exc
    if len(names) > MAX_MEMBERS:
        raise Unprocessable(f"archive has {len(names)} members", code="unsupported_layout")
    roots = {PurePosixPath(name).parts[0] for name in names if name}
    if len(roots) != 1:
        raise Unprocessable(
            "archive must hold exactly one root folder, as torch.export.save writes",
            code="unsupported_layout",
        )
    rel = [name.split("/", 1)[1] if "/" in name else "" for name in names]
    if "archive_format" not in rel:
        raise Unprocessable(
            "archive has no archive_format member: not written by torch.export.save",
            code="unsupported_layout",
        )
    if any(name.startswith("data/aotinductor/") for name in rel):
        raise Unprocessable(
            "archive already holds compiled AOTInductor code (data/aotinductor/); "
            "upload the ExportedProgram from torch.export.save",
            code="unsupported_layout",
        )
    models = [name for name in rel if name.startswith("models/") and name.endswith(".json")]
    if len(models) != 1:
        raise Unprocessable(
            f"archive must hold exactly one program under models/, found {len(models)}",
            code="unsupported_layout",
        )
    if not any(name.startswith("data/sample_inputs/") for name in rel):
        raise Unprocessable(
            "archive has no example inputs (data/sample_inputs/); export with example "
            "inputs and save with torch.export.save",
            code="missing_example_inputs",
        )
