"""Example inputs (``data/sample_inputs/<name>.pt``): a torch.save zip, walked, never run.

The nested zip gets the same framing checks as the upload. Its ``data.pkl`` is read
opcode by opcode with :func:`pickletools.genops` while a symbolic stack is kept, so
that every import (GLOBAL / STACK_GLOBAL) is checked against a short allowlist of
tensor rebuild functions and storage types, every call (REDUCE) is of an allowed
rebuild function, and every persistent id is torch's own
``('storage', <StorageType>, key, location, numel)`` naming a ``data/<key>`` record.
Object-building opcodes (INST, OBJ, NEWOBJ, BUILD), extension registries and
out-of-band buffers are refused outright: plain tensors never need them.
"""

from __future__ import annotations

import io
import pickletools
import re
from typing import Any

from app.errors import Unprocessable, UnsupportedMediaType
from app.validation.limits import ArchiveLimits
from app.validation.zipcheck import read_member, scan_zip

CALLABLE = frozenset({
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "collections.OrderedDict", "torch.Size",
    "torch.device",
})
_STORAGES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4,
             "Short": 2, "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}
STORAGE_BYTES = {f"torch.{s}Storage": n for s, n in _STORAGES.items()} | {
    "torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1}
STORAGE_TYPES = frozenset(STORAGE_BYTES)
_DTYPES = ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
           "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "int16", "int32", "int64", "uint8",
           "float16", "float32", "float64", "bfloat16", "bool", "complex64", "complex128")
VALUES = STORAGE_TYPES | {f"torch.{d}" for d in _DTYPES}
REFUSED = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4",
                     "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"})
_MEMBERS = re.compile(r"data\.pkl|\.format_version|\.storage_alignment|byteorder|version|"
                      r"\.data/version|\.data/serialization_id|data/[0-9]{1,9}")
_LOCATION = re.compile(r"cpu|cuda(:[0-9]{1,2})?|meta")
_MARK = object()


class _Global(str):
    """A stack item that is an imported name."""


class _Tuple(tuple[Any, ...]):
    """A stack item built by a TUPLE opcode (kept to check persistent ids)."""


def pickle_error(message: str) -> Unprocessable:
    return Unprocessable(message, code="unsafe_pickle")


def check_example_inputs(data: bytes, where: str, limits: ArchiveLimits) -> None:
    """Validate the nested torch.save zip holding the example inputs."""
    prefix = f"{where}: "
    try:
        archive, members = scan_zip(io.BytesIO(data), len(data), limits, where=prefix)
    except UnsupportedMediaType as exc:  # torch would fall back to a plain unpickle
        raise pickle_error(f"member {where!r} is not a sound torch.save zip: {exc.message}"
                           ) from exc
    roots = {m.name.split("/", 1)[0] for m in members}
    if len(roots) != 1 or any("/" not in m.name for m in members):
        raise Unprocessable(f"member {where!r} must be a torch.save zip with one root folder",
                            code="unsupported_layout")
    by_rel = {m.rel: m for m in members}
    for rel, member in by_rel.items():
        if not _MEMBERS.fullmatch(rel):
            raise Unprocessable(f"member {where!r} holds {member.name!r}, which torch.save "
                                "does not write", code="unsupported_layout")
    if "data.pkl" not in by_rel:
        raise Unprocessable(f"member {where!r} has no data.pkl", code="missing_example_inputs")
    pkl = read_member(archive, by_rel["data.pkl"], limits.max_pickle_bytes, prefix)
    records = {rel[5:]: m.size for rel, m in by_rel.items() if rel.startswith("data/")}
    keys = walk_pickle(pkl, f"{where}/{by_rel['data.pkl'].name}", records)
    for key in records:
        if key not in keys:
            raise Unprocessable(f"member {where!r}: record data/{key} is not used by data.pkl",
                                code="unsupported_layout")
    for member in members:  # read every record once so its CRC is checked
        read_member(archive, member, limits.max_inputs_bytes, prefix)


def walk_pickle(data: bytes, where: str, records: dict[str, int]) -> set[str]:
    """Walk ``data`` without running it; return the storage keys it references."""
    try:
        return _walk(data, where, records)
    except Unprocessable:
        raise
    except Exception as exc:  # truncated or malformed opcode stream, stack underflow
        raise pickle_error(f"member {where!r} is not a pickle this service accepts "
                           f"({type(exc).__name__}: {str(exc)[:80]})") from exc


def _walk(data: bytes, where: str, records: dict[str, int]) -> set[str]:
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    keys: set[str] = set()
    stopped = False
    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if stopped:
            raise pickle_error(f"member {where!r}: data after STOP at byte {pos}")
        if name in REFUSED:
            raise pickle_error(f"member {where!r}: opcode {name} at byte {pos} is not allowed")
        if name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
            else:
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise pickle_error(f"member {where!r}: STACK_GLOBAL of non-strings")
            dotted = f"{module}.{attr}"
            if dotted not in CALLABLE and dotted not in VALUES:
                raise pickle_error(f"member {where!r}: import of {dotted!r} at byte {pos} is "
                                   "not in the allowlist of tensor rebuild functions")
            stack.append(_Global(dotted))
        elif name == "REDUCE":
            stack.pop()  # the arguments tuple
            func = stack.pop()
            if not isinstance(func, _Global) or func not in CALLABLE:
                raise pickle_error(f"member {where!r}: REDUCE at byte {pos} calls "
                                   f"{str(func)[:60]!r}, not an allowed rebuild function")
            stack.append(None)
        elif name == "BINPERSID":
            keys.add(_persistent_id(stack.pop(), where, records))
            stack.append(None)
        elif name in ("MARK",):
            stack.append(_MARK)
        elif name.startswith("TUPLE") or name == "EMPTY_TUPLE":
            count = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name)
            items = _pop_mark(stack) if count is None else [stack.pop() for _ in range(count)][::-1]
            stack.append(_Tuple(items))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else int(arg or 0)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[int(arg or 0)])
        elif arg is not None and not op.stack_before and len(op.stack_after) == 1:
            stack.append(arg)  # a literal: string, int, float, bytes
        else:
            _generic(op, stack)
        if name == "STOP":
            stopped = True
        if len(stack) > 100_000 or len(memo) > 1_000_000:
            raise pickle_error(f"member {where!r}: pickle stack or memo too large")
    if not stopped:
        raise pickle_error(f"member {where!r}: pickle has no STOP")
    return keys


def _pop_mark(stack: list[Any]) -> list[Any]:
    items: list[Any] = []
    while True:
        item = stack.pop()
        if item is _MARK:
            return items[::-1]
        items.append(item)


def _generic(op: pickletools.OpcodeInfo, stack: list[Any]) -> None:
    before = op.stack_before
    if pickletools.markobject in before:
        _pop_mark(stack)
        for _ in range(before.index(pickletools.markobject)):
            stack.pop()
    else:
        for _ in before:
            stack.pop()
    stack.extend(None for _ in op.stack_after)


def _persistent_id(pid: Any, where: str, records: dict[str, int]) -> str:
    if not (isinstance(pid, _Tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _Global) and pid[1] in STORAGE_TYPES
            and isinstance(pid[2], str) and isinstance(pid[3], str)
            and _LOCATION.fullmatch(pid[3]) and isinstance(pid[4], int)):
        raise pickle_error(f"member {where!r}: persistent id {str(pid)[:80]!r} is not a torch "
                           "storage reference")
    if pid[2] not in records:
        raise pickle_error(f"member {where!r}: storage {pid[2]!r} has no data/{pid[2]} record")
    if pid[4] < 0 or pid[4] * STORAGE_BYTES[pid[1]] > records[pid[2]]:
        raise pickle_error(f"member {where!r}: storage {pid[2]!r} claims {pid[4]} elements of "
                           f"{pid[1]} but its record holds {records[pid[2]]} bytes")
    return str(pid[2])
