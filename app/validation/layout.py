"""Layout: exactly the members ``torch.export.save`` writes for one program, nothing else.

For a program named M (torch names it ``model``) under one root folder, torch 2.13 writes::

    archive_format                       "pt2"
    archive_version                      "0"
    byteorder                            "little" | "big"
    .data/version                        the zip writer's format version ("6\\n")
    .data/serialization_id               decimal digits
    models/M.json                        the graph (checked by graph.py)
    data/weights/M_weights_config.json   raw weights: weight_<i> files
    data/constants/M_constants_config.json  raw tensor constants: tensor_<i> files
    data/sample_inputs/M.pt              example inputs, a torch.save zip (pickles.py)
    data/weights/weight_<i>, data/constants/tensor_<i>
    extra/<name>                         torch.export.save(extra_files=...): UTF-8 text
                                         that torch.export.load hands back as strings

Extra files are kept (and carried into the rebuilt archive) when their names are plain
(``[A-Za-z0-9_][A-Za-z0-9_.-]*`` parts, at most 8 deep), their number and sizes within
the caps and their bytes UTF-8. Everything else torch's loader would act on is refused:
compiled code (``data/aotinductor/``), pickled weights or constants, ``custom_obj_*`` /
``opaque_obj_*`` constants, legacy ``.pt`` weight files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from app.errors import ApiErrorCode, Unprocessable
from app.validation.zipcheck import Member

ARCHIVE_FORMAT = b"pt2"
ARCHIVE_VERSION = b"0"
_FIXED = {
    "archive_format": re.compile(rb"pt2"),
    "archive_version": re.compile(rb"0"),
    "byteorder": re.compile(rb"little|big"),
    ".data/version": re.compile(rb"[0-9]{1,3}\n?"),
    ".data/serialization_id": re.compile(rb"[0-9]{1,64}"),
}
_MODEL = re.compile(r"models/([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})\.json")
_WEIGHT = re.compile(r"data/weights/weight_[0-9]{1,9}")
_CONSTANT = re.compile(r"data/constants/tensor_[0-9]{1,9}")
EXTRA_DIR = "extra/"
_EXTRA = re.compile(r"extra/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
                    r"{0,7}")
REQUIRED = ("archive_format", "archive_version")


def layout_error(message: str) -> Unprocessable:
    return Unprocessable(message, code=ApiErrorCode.UNSUPPORTED_LAYOUT)


@dataclass
class Layout:
    """Where each part of the one program lives (names below the root folder)."""

    root: str
    model: str
    members: dict[str, Member]
    weights: dict[str, Member] = field(default_factory=dict)
    constants: dict[str, Member] = field(default_factory=dict)
    extras: dict[str, Member] = field(default_factory=dict)

    @property
    def graph(self) -> str:
        return f"models/{self.model}.json"

    @property
    def weights_config(self) -> str:
        return f"data/weights/{self.model}_weights_config.json"

    @property
    def constants_config(self) -> str:
        return f"data/constants/{self.model}_constants_config.json"

    @property
    def inputs(self) -> str:
        return f"data/sample_inputs/{self.model}.pt"


def _root(members: list[Member]) -> str:
    roots = {m.name.split("/", 1)[0] for m in members}
    if not members:
        raise layout_error("archive is empty: not written by torch.export.save")
    if len(roots) != 1 or any("/" not in m.name for m in members):
        raise layout_error("archive must hold exactly one root folder, as torch.export.save "
                           f"writes; found {sorted(roots)[:5]}")
    return roots.pop()


def _refuse(rel: str, full: str) -> None:
    if rel.startswith("data/aotinductor/"):
        raise layout_error(f"member {full!r}: archive already holds compiled AOTInductor code "
                           "(data/aotinductor/); upload the ExportedProgram from "
                           "torch.export.save")
    base = rel.rsplit("/", 1)[-1]
    if base.startswith(("custom_obj_", "opaque_obj_")):
        raise layout_error(f"member {full!r}: custom-object and opaque constants are pickled "
                           "objects; programs holding them are not accepted")
    if rel.endswith(".pt") and rel.startswith(("data/weights/", "data/constants/")):
        raise layout_error(f"member {full!r}: legacy pickled weights/constants are not "
                           "accepted; save again with torch.export.save")


def plan_layout(members: list[Member], max_extra_files: int = 32) -> Layout:
    """Sort the members into a Layout, refusing any that torch.export.save never writes."""
    root = _root(members)
    by_rel = {m.rel: m for m in members}
    for rel in REQUIRED:
        if rel not in by_rel:
            raise layout_error(f"archive has no {rel} member: not written by torch.export.save")
    models = [rel for rel in by_rel if rel.startswith("models/")]
    if len(models) != 1:
        raise layout_error(f"archive must hold exactly one program under models/, found "
                           f"{len(models)}")
    match = _MODEL.fullmatch(models[0])
    if not match:
        raise layout_error(f"member {by_rel[models[0]].name!r}: program names must look like "
                           "models/<name>.json")
    layout = Layout(root=root, model=match.group(1), members=by_rel)
    known = {layout.graph, layout.weights_config, layout.constants_config, layout.inputs,
             *_FIXED}
    for rel, member in by_rel.items():
        _refuse(rel, member.name)
        if rel in known:
            continue
        if _WEIGHT.fullmatch(rel):
            layout.weights[rel.rsplit("/", 1)[1]] = member
        elif _CONSTANT.fullmatch(rel):
            layout.constants[rel.rsplit("/", 1)[1]] = member
        elif rel.startswith(EXTRA_DIR):
            if not _EXTRA.fullmatch(rel):
                raise layout_error(f"member {member.name!r}: extra file names must be plain "
                                   "([A-Za-z0-9_][A-Za-z0-9_.-]* parts, at most 8 deep)")
            layout.extras[rel] = member
            if len(layout.extras) > max_extra_files:
                raise layout_error(f"archive holds more than {max_extra_files} extra files "
                                   "(LOWERING_ARCHIVE_MAX_EXTRA_FILES)")
        else:
            raise layout_error(f"member {member.name!r} is not one torch.export.save writes")
    if layout.inputs not in by_rel:
        raise Unprocessable(f"archive has no example inputs ({layout.inputs}); export with "
                            "example inputs and save with torch.export.save",
                            code=ApiErrorCode.MISSING_EXAMPLE_INPUTS)
    for rel in (layout.weights_config, layout.constants_config):
        if rel not in by_rel:
            raise layout_error(f"archive has no {rel} member: not written by torch.export.save")
    return layout


def check_extra(member: Member, data: bytes) -> None:
    """An extra file holds UTF-8 text: torch.export.load decodes it as such."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise layout_error(f"member {member.name!r} is not UTF-8 text; torch.export.save "
                           "writes extra files as UTF-8 strings") from exc


def check_fixed(rel: str, member: Member, data: bytes) -> None:
    """The small marker members hold exactly what torch writes in them."""
    if not _FIXED[rel].fullmatch(data):
        raise layout_error(f"member {member.name!r} holds {data[:32]!r}, not what this torch "
                           f"writes there (format pt2, archive version 0)")


FIXED_MEMBERS = tuple(_FIXED)
