"""Example inputs (``data/sample_inputs/<name>.pt``): a torch.save zip, walked, never run.

The nested zip gets the same framing checks as the upload. Its ``data.pkl`` is read
opcode by opcode with :func:`pickletools.genops` while a symbolic stack is kept, so
that every import (GLOBAL / STACK_GLOBAL) is checked against a short allowlist of
tensor rebuild functions and storage types, every call (REDUCE) is of an allowed
rebuild function, and every persistent id is torch's own
``('storage', <StorageType>, key, location, numel)`` naming a ``data/<key>`` record.
Object-building opcodes (INST, OBJ, NEWOBJ, BUILD), extension registries and
out-of-band buffers are refused outright: plain tensors never need them.

Every tensor rebuild call is checked against what it will address:
``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` over a typed storage, or
``_rebuild_tensor_v3(..., dtype)`` over an untyped one (the dtypes without a legacy
storage class: complex32, uint16/32/64, float8 ...). Sizes, strides and the offset must be
non-negative integer literals, the view must lie inside its storage (no out-of-bounds
view), and numel x element size, computed from the sizes whatever the strides (a
stride-0 expansion counts in full), must stay within ``max_example_tensor_bytes`` per
tensor and ``max_example_bytes`` in all.
"""

from __future__ import annotations

import io
import pickletools
import re
from typing import Any

from app.errors import ApiErrorCode, Unprocessable, UnsupportedMediaType
from app.validation.limits import ArchiveLimits
from app.validation.zipcheck import drain_member, read_member, scan_zip

REBUILD_V2 = "torch._utils._rebuild_tensor_v2"
REBUILD_V3 = "torch._utils._rebuild_tensor_v3"
CALLABLE = frozenset({
    REBUILD_V2, REBUILD_V3, "torch._utils._rebuild_parameter", "collections.OrderedDict",
    "torch.Size", "torch.device",
})
_STORAGES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4,
             "Short": 2, "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16}
STORAGE_BYTES = {f"torch.{s}Storage": n for s, n in _STORAGES.items()} | {
    "torch.storage.UntypedStorage": 1, "torch.UntypedStorage": 1}
STORAGE_TYPES = frozenset(STORAGE_BYTES)
UNTYPED = frozenset({"torch.storage.UntypedStorage", "torch.UntypedStorage"})
# Every dtype an exported program's inputs may have (export schema ScalarType), with its
# element size; torch.save writes the ones without a legacy storage class through v3.
DTYPE_BYTES = {f"torch.{name}": size for name, size in {
    "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
    "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16, "bool": 1,
    "bfloat16": 2, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}.items()}
VALUES = STORAGE_TYPES | frozenset(DTYPE_BYTES)
MAX_DIMS = 64
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


class _Storage:
    """A stack item loaded by BINPERSID: a storage of ``numel`` elements of ``kind``."""

    def __init__(self, kind: str, key: str, numel: int) -> None:
        self.kind, self.key, self.numel = kind, key, numel


def pickle_error(message: str) -> Unprocessable:
    return Unprocessable(message, code=ApiErrorCode.UNSAFE_PICKLE)


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
                            code=ApiErrorCode.UNSUPPORTED_LAYOUT)
    by_rel = {m.rel: m for m in members}
    for rel, member in by_rel.items():
        if not _MEMBERS.fullmatch(rel):
            raise Unprocessable(f"member {where!r} holds {member.name!r}, which torch.save "
                                "does not write", code=ApiErrorCode.UNSUPPORTED_LAYOUT)
    if "data.pkl" not in by_rel:
        raise Unprocessable(f"member {where!r} has no data.pkl",
                            code=ApiErrorCode.MISSING_EXAMPLE_INPUTS)
    pkl = read_member(archive, by_rel["data.pkl"], limits.max_pickle_bytes, prefix)
    records = {rel[5:]: m.size for rel, m in by_rel.items() if rel.startswith("data/")}
    keys = walk_pickle(pkl, f"{where}/{by_rel['data.pkl'].name}", records, limits)
    for key in records:
        if key not in keys:
            raise Unprocessable(f"member {where!r}: record data/{key} is not used by data.pkl",
                                code=ApiErrorCode.UNSUPPORTED_LAYOUT)
    for member in members:  # read every record once so its CRC is checked
        drain_member(archive, member, limits.max_inputs_bytes, prefix)


def walk_pickle(data: bytes, where: str, records: dict[str, int],
                limits: ArchiveLimits | None = None) -> set[str]:
    """Walk ``data`` without running it; return the storage keys it references."""
    try:
        return _walk(data, where, records, limits or ArchiveLimits())
    except (Unprocessable, MemoryError):
        raise
    except Exception as exc:  # truncated or malformed opcode stream, stack underflow
        raise pickle_error(f"member {where!r} is not a pickle this service accepts "
                           f"({type(exc).__name__}: {str(exc)[:80]})") from exc


def _walk(data: bytes, where: str, records: dict[str, int], limits: ArchiveLimits) -> set[str]:
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    keys: set[str] = set()
    stopped = False
    total = 0
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
            args = stack.pop()
            func = stack.pop()
            if not isinstance(func, _Global) or func not in CALLABLE:
                raise pickle_error(f"member {where!r}: REDUCE at byte {pos} calls "
                                   f"{str(func)[:60]!r}, not an allowed rebuild function")
            if func in (REBUILD_V2, REBUILD_V3):
                total += _tensor_bytes(str(func), args, f"{where!r} at byte {pos}", limits)
                if total > limits.max_example_bytes:
                    raise pickle_error(
                        f"member {where!r}: example inputs take more than "
                        f"{limits.max_example_bytes} bytes in all (counting each tensor's "
                        "numel x element size; LOWERING_ARCHIVE_MAX_EXAMPLE_BYTES)")
            stack.append(None)
        elif name == "BINPERSID":
            storage = _persistent_id(stack.pop(), where, records)
            keys.add(storage.key)
            stack.append(storage)
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


def _tensor_bytes(func: str, args: Any, where: str, limits: ArchiveLimits) -> int:
    """Check one rebuild call's view against its storage; return numel x element size."""
    v3 = func == REBUILD_V3
    if not isinstance(args, _Tuple) or len(args) not in ((7, 8) if v3 else (6, 7)):
        raise pickle_error(f"member {where}: {func} called with arguments torch.save never "
                           "writes")
    storage, offset, sizes, strides = args[0], args[1], args[2], args[3]
    if not isinstance(storage, _Storage) or (storage.kind in UNTYPED) != v3:
        raise pickle_error(f"member {where}: {func} needs a "
                           f"{'untyped' if v3 else 'typed'} storage reference")
    if v3:
        dtype = args[6]
        if not isinstance(dtype, _Global) or dtype not in DTYPE_BYTES:
            raise pickle_error(f"member {where}: {func} dtype {str(dtype)[:40]!r} is not a "
                               "torch dtype")
        element = DTYPE_BYTES[dtype]
        available = storage.numel // element  # an untyped storage counts bytes
    else:
        element, available = STORAGE_BYTES[storage.kind], storage.numel
    if not (_naturals(sizes) and _naturals(strides) and len(sizes) == len(strides)
            and _natural(offset)):
        raise pickle_error(f"member {where}: a tensor's sizes, strides and offset must be "
                           f"non-negative integers, at most {MAX_DIMS} dimensions")
    numel = 1
    for size in sizes:
        numel *= size
    nbytes = numel * element
    if nbytes > limits.max_example_tensor_bytes:
        raise pickle_error(
            f"member {where}: an example-input tensor of sizes {list(sizes)[:8]} takes "
            f"{nbytes} bytes (numel x element size, whatever its strides), over the "
            f"{limits.max_example_tensor_bytes}-byte cap "
            "(LOWERING_ARCHIVE_MAX_EXAMPLE_TENSOR_BYTES)")
    if numel:
        extent = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
        if extent > available:
            raise pickle_error(
                f"member {where}: an example-input view (sizes {list(sizes)[:8]}, strides "
                f"{list(strides)[:8]}, offset {offset}) reaches element {extent} of a storage "
                f"holding {available}: out of bounds")
    elif offset > available:
        raise pickle_error(f"member {where}: an empty example-input view starts past its "
                           "storage")
    return nbytes


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _naturals(values: Any) -> bool:
    return isinstance(values, _Tuple) and len(values) <= MAX_DIMS and all(
        _natural(v) for v in values)


def _persistent_id(pid: Any, where: str, records: dict[str, int]) -> _Storage:
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
    return _Storage(str(pid[1]), str(pid[2]), pid[4])
