"""Writing the NativeRT archive: the layout of package_nativert_with_aoti_delegate."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from torch.export import ExportedProgram
from torch.export.pt2_archive._package import package_pt2

PROVENANCE_FILE = "provenance.json"
RESERVED_EXTRA_FILES = frozenset({PROVENANCE_FILE})


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
) -> None:
    """Write models/{model}.json (original), models/{model}-{backend}.json (delegate),
    data/aotinductor/{model}-{backend}/ (compiled files), extra/provenance.json, and
    the uploaded program's own extra files unchanged (``extra_files``, as load_program
    returned them).

    Callable twice with the same aoti_files: they are paths on disk plus a
    Weights object, so re-packaging never recompiles.
    """
    name = delegate_name(model_name, backend_id)
    extra = dict(extra_files or {})
    clash = RESERVED_EXTRA_FILES & set(extra)
    if clash:  # load_program refuses these; a caller passing them is a bug
        raise ValueError(f"extra files {sorted(clash)} are the lowering's own")
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
