"""Weights and constants configs: raw tensor records only, each inside its file.

torch reads a record as ``as_strided(file_as_flat_tensor, sizes, strides, offset)``,
builds ``torch.zeros(sizes)`` for a 0-byte file and ``torch.load``s anything marked
``use_pickle``. So a record must be raw (never pickled), of a known dtype and strided
layout, address only bytes its file holds, and a 0-byte file may back only empty
tensors.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import ApiErrorCode, Unprocessable
from app.validation.jsondoc import need_dict, need_int, need_name
from app.validation.limits import ArchiveLimits
from app.validation.zipcheck import Member

# torch._export.serde.schema.ScalarType -> element size in bytes.
ELEMENT_BYTES = {
    1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
    28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8,
}
STRIDED = 7
_DEVICES = re.compile(r"cpu|cuda|meta")


def tensor_bytes(dtype: object, sizes: list[int]) -> int | None:
    """Bytes a dense tensor of ``sizes`` takes, or None for an unknown dtype."""
    if isinstance(dtype, bool) or not isinstance(dtype, int) or dtype not in ELEMENT_BYTES:
        return None
    return math.prod(sizes) * ELEMENT_BYTES[dtype]


def _layout_error(message: str) -> Unprocessable:
    return Unprocessable(message, code=ApiErrorCode.UNSUPPORTED_LAYOUT)


def _ints(values: object, what: str, where: str) -> list[int]:
    if not isinstance(values, list) or len(values) > 64:
        raise _layout_error(f"member {where!r}: {what} must be a list of at most 64 ints")
    out = []
    for value in values:
        entry = need_dict(value, what, where, _layout_error)
        if set(entry) != {"as_int"}:
            raise _layout_error(f"member {where!r}: {what} of a stored tensor must be plain "
                                "integers")
        out.append(need_int(entry["as_int"], what, where, _layout_error))
    return out


def check_payload_config(doc: Any, where: str, files: dict[str, Member], prefix: str,
                         limits: ArchiveLimits) -> None:
    """Check a ``*_weights_config.json`` / ``*_constants_config.json`` document.

    ``files`` maps the record files present (``weight_0``...) to their members; every
    one must be referenced and every reference must exist.
    """
    root = need_dict(doc, "the config", where, _layout_error)
    if set(root) != {"config"}:
        raise _layout_error(f"member {where!r} must hold only a 'config' object")
    used: set[str] = set()
    for fqn, meta in need_dict(root["config"], "config", where, _layout_error).items():
        need_name(fqn, "name", where, _layout_error)
        meta = need_dict(meta, fqn, where, _layout_error)
        path = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise Unprocessable(f"member {where!r}: {fqn!r} is stored as a pickle "
                                "(use_pickle); only raw tensor records are accepted",
                                code=ApiErrorCode.UNSAFE_PICKLE)
        if not isinstance(path, str) or not path.startswith(prefix) or path not in files:
            raise _layout_error(f"member {where!r}: {fqn!r} points at {str(path)[:80]!r}, "
                                "which is not a tensor record in this archive")
        used.add(path)
        _check_record(fqn, meta.get("tensor_meta"), files[path], where, limits)
    unused = sorted(set(files) - used)
    if unused:
        raise _layout_error(f"member {files[unused[0]].name!r} is not referenced by {where!r}")


def _check_record(fqn: str, meta: Any, member: Member, where: str,
                  limits: ArchiveLimits) -> None:
    meta = need_dict(meta, f"tensor_meta of {fqn!r}", where, _layout_error)
    dtype = meta.get("dtype")
    sizes = _ints(meta.get("sizes"), f"sizes of {fqn!r}", where)
    strides = _ints(meta.get("strides"), f"strides of {fqn!r}", where)
    offset = _ints([meta.get("storage_offset")], f"storage_offset of {fqn!r}", where)[0]
    device = need_dict(meta.get("device"), f"device of {fqn!r}", where, _layout_error)
    if meta.get("layout") != STRIDED or len(sizes) != len(strides) or not (
            isinstance(device.get("type"), str) and _DEVICES.fullmatch(device["type"])):
        raise _layout_error(f"member {where!r}: {fqn!r} is not a strided tensor on cpu/cuda")
    nbytes = tensor_bytes(dtype, sizes)
    if nbytes is None or nbytes > limits.max_tensor_bytes:
        raise _layout_error(f"member {where!r}: {fqn!r} declares {sizes} of dtype {dtype!r}, "
                            f"over the {limits.max_tensor_bytes}-byte cap or not a known dtype")
    element = ELEMENT_BYTES[int(dtype)]  # type: ignore[arg-type]
    if member.size % element:
        raise _layout_error(f"member {member.name!r}: {member.size} bytes is not a whole "
                            f"number of {element}-byte elements ({fqn!r})")
    numel = math.prod(sizes)
    extent = 0 if numel == 0 else (offset + sum((n - 1) * s for n, s in zip(sizes, strides,
                                                                             strict=True)) + 1)
    if extent * element > member.size:
        raise _layout_error(f"member {member.name!r} holds {member.size} bytes but {fqn!r} "
                            f"declares {sizes} (strides {strides}, offset {offset}) needing "
                            f"{extent * element}")
