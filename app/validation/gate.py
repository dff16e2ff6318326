"""The upload gate: admit a ``.pt2`` only if nothing in it can run code, then rebuild it.

Loading an untrusted ``.pt2`` with torch is code execution (pickled weights, sympy
``eval``, names pasted into generated code, compiled libraries, zip tricks). The gate
runs in the API process, never imports torch, never unpickles or evaluates anything,
and checks, in order:

1. zip framing (zipcheck.py): a zip, no encryption, unique safe names, members tiling
   the file with no gaps or overlaps, size, count and ratio caps;
2. layout (layout.py): only the members torch.export.save writes for one program
   (extra files included, plain names, UTF-8);
3. the graph JSON (graph.py, exprs.py, treespec.py, denylist.py), the weights/constants
   configs (payloads.py) and the example-inputs pickle (pickles.py), each member read
   under the cap for its type (fixed markers 64 bytes, configs ``max_config_bytes``,
   the graph ``max_json_bytes``, extra files ``max_extra_bytes``, ...) and every JSON
   document's value count bounded before it is parsed;
4. then writes a fresh zip of exactly those members' bytes (rebuild.py), CRC-checked,
   and on the way hashes the program's structure (``GateReport.structure_sha256``):
   every member except the raw weight files (``data/weights/weight_<i>``), the save's
   serialization id and the extra files. Two uploads with the same structure differ
   only in weight values, so they compile to the same code (cache_key.code_key).

Only the rebuilt file ever reaches a worker. Every refusal is one of the service's
4xx errors naming the member and the rule; running out of memory is
``upload_too_complex``; any other failure while reading the upload becomes
``not_a_pt2_archive``. The API runs this in a fresh, resource-limited child process
(isolated.py), so even a bomb the caps miss cannot take the API down.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from app.constants import SPACE_ERRNOS
from app.errors import ApiErrorCode, ServiceError, StorageFull, Unprocessable, UnsupportedMediaType
from app.validation.graph import check_graph
from app.validation.jsondoc import graph_error, load_json
from app.validation.layout import (
    FIXED_MEMBERS,
    Layout,
    check_extra,
    check_fixed,
    layout_error,
    plan_layout,
)
from app.validation.limits import ArchiveLimits
from app.validation.payloads import check_payload_config
from app.validation.pickles import check_example_inputs
from app.validation.rebuild import rebuild
from app.validation.zipcheck import Member, read_member, scan_zip

__all__ = ["ArchiveLimits", "GateReport", "admit_upload"]


@dataclass(frozen=True)
class GateReport:
    """What the gate admitted: the program's name, member count and sizes, time taken."""

    model: str
    members: int
    uncompressed_bytes: int
    rebuilt_bytes: int
    elapsed_s: float
    structure_sha256: str


def admit_upload(src: Path, dest: Path, limits: ArchiveLimits) -> GateReport:
    """Validate the upload at ``src`` and write the rebuilt archive to ``dest``.

    Raises only ServiceError subclasses: 415 ``not_a_pt2_archive``, 413
    ``archive_too_large``, 422 ``unsafe_member_name`` / ``unsupported_layout`` /
    ``unsafe_pickle`` / ``unsafe_graph`` / ``missing_example_inputs``; a plain
    ServiceError (500) if ``dest`` cannot be written. ``dest`` exists only on success.
    """
    started = time.monotonic()
    try:
        with src.open("rb") as fh:
            size = fh.seek(0, 2)
            archive, members = scan_zip(fh, size, limits)
            with archive:
                layout = plan_layout(members, limits.max_extra_files)
                _check_members(archive, layout, limits)
                rebuilt, structure = rebuild(archive, members, dest,
                                             digest=lambda m: shapes_code(m, layout))
    except ServiceError:
        raise
    except MemoryError as exc:
        raise Unprocessable("checking this upload needed more memory than the gate may use; "
                            "it is too complex to accept",
                            code=ApiErrorCode.UPLOAD_TOO_COMPLEX) from exc
    except OSError as exc:
        if exc.errno not in SPACE_ERRNOS:
            raise _unreadable(exc) from exc
        raise StorageFull("the service is out of disk space for uploads; retry later") from exc
    except RecursionError as exc:
        raise Unprocessable("upload is nested too deeply to check",
                            code=ApiErrorCode.UNSUPPORTED_LAYOUT) from exc
    except Exception as exc:  # anything a malformed zip makes zipfile or struct raise
        raise _unreadable(exc) from exc
    return GateReport(model=layout.model, members=len(members),
                      uncompressed_bytes=sum(m.size for m in members), rebuilt_bytes=rebuilt,
                      elapsed_s=round(time.monotonic() - started, 4),
                      structure_sha256=structure)


NOT_STRUCTURE = frozenset({".data/serialization_id"})


def shapes_code(member: Member, layout: Layout) -> bool:
    """Whether ``member`` is part of the program's structure: all that the compiled code
    can depend on, and all that torch parses beyond plain numbers and text. Left out:
    the raw bytes of parameters and buffers (their names, dtypes, shapes and strides are
    in the weights config, which is in), the serialization id (a fresh number on every
    save) and extra files (strings handed back as they are)."""
    name = member.rel.rsplit("/", 1)[-1]
    return not (layout.weights.get(name) is member or member.rel in NOT_STRUCTURE
                or member.rel in layout.extras)


def _unreadable(exc: Exception) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"program is not a readable .pt2 archive ({type(exc).__name__}: "
        f"{str(exc)[:120]}); upload the file torch.export.save wrote",
        code=ApiErrorCode.NOT_A_PT2_ARCHIVE)


def _check_members(archive: zipfile.ZipFile, layout: Layout, limits: ArchiveLimits) -> None:
    members = layout.members
    for rel in FIXED_MEMBERS:
        if rel in members:
            check_fixed(rel, members[rel], read_member(archive, members[rel], 64))
    for rel, files, prefix in ((layout.weights_config, layout.weights, "weight_"),
                               (layout.constants_config, layout.constants, "tensor_")):
        member = members[rel]
        doc = load_json(read_member(archive, member, limits.max_config_bytes),
                        where=member.name, max_depth=limits.max_json_depth, error=layout_error,
                        max_values=limits.max_json_values)
        check_payload_config(doc, member.name, files, prefix, limits)
    graph = members[layout.graph]
    doc = load_json(read_member(archive, graph, limits.max_json_bytes), where=graph.name,
                    max_depth=limits.max_json_depth, error=graph_error,
                    max_values=limits.max_json_values)
    check_graph(doc, graph.name, limits)
    del doc
    for member in layout.extras.values():
        check_extra(member, read_member(archive, member, limits.max_extra_bytes))
    inputs = members[layout.inputs]
    if inputs.size == 0:
        raise Unprocessable(f"member {inputs.name!r} is empty: the program was exported "
                            "without example inputs", code=ApiErrorCode.MISSING_EXAMPLE_INPUTS)
    check_example_inputs(read_member(archive, inputs, limits.max_inputs_bytes), inputs.name,
                         limits)
