"""The program's graph JSON (``models/<name>.json``): what it calls and what it names.

Every node target must be in ``ops_allowlist.txt`` (written offline by ``gen_ops``
from the torch the workers run), every value, parameter, buffer and constant name an
identifier, every size expression and guard string inside the grammars of
``exprs.py``, and every declared tensor within the byte cap.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.validation import exprs
from app.validation.jsondoc import (
    DOTTED,
    IDENTIFIER,
    check_text,
    graph_error,
    need_dict,
    need_identifier,
    need_int,
)
from app.validation.limits import ArchiveLimits
from app.validation.payloads import tensor_bytes

ALLOWLIST_PATH = Path(__file__).with_name("ops_allowlist.txt")
SCHEMA_MAJOR = 8  # torch 2.13 reads export schema 8.x
_VALUE_TABLES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")
_FORBIDDEN_KEYS = ("as_custom_obj", "as_custom_objs", "custom_obj", "as_opaque")


@lru_cache(maxsize=1)
def allowed_ops() -> frozenset[str]:
    """Operator names a graph may call (read once; the file is generated offline)."""
    lines = ALLOWLIST_PATH.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and line[0] != "#")


def check_graph(doc: Any, where: str, limits: ArchiveLimits) -> None:
    """Raise ``unsafe_graph`` naming ``where`` and the first rule ``doc`` breaks."""
    root = need_dict(doc, "the program", where, graph_error)
    version = root.get("schema_version")
    if not isinstance(version, dict) or version.get("major") != SCHEMA_MAJOR:
        raise graph_error(f"member {where!r}: export schema {version!r} is not the one this "
                          f"service's torch reads (major {SCHEMA_MAJOR})")
    for guard in _list(root.get("guards_code"), where):
        _grammar(exprs.check_guard, guard, "guard", where, limits)
    ranges = need_dict(root.get("range_constraints", {}), "range_constraints", where,
                       graph_error)
    for key, bounds in ranges.items():
        _grammar(exprs.check_arith, key, "range constraint", where, limits)
        for bound in ("min_val", "max_val"):
            value = need_dict(bounds, "a range", where, graph_error).get(bound)
            if value is not None:
                need_int(value, f"range bound of {key!r}", where, graph_error,
                         low=-(1 << 63), high=1 << 63)
    _walk(root, where, limits)


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise graph_error(f"member {where!r}: expected a list, got {type(value).__name__}")
    return value


def _grammar(check: Any, text: object, what: str, where: str, limits: ArchiveLimits) -> None:
    try:
        check(text, limits.max_expr_chars)
    except exprs.GrammarError as exc:
        raise graph_error(f"member {where!r}: {what} {str(text)[:80]!r} is refused: {exc}") from exc


def _walk(root: dict[str, Any], where: str, limits: ArchiveLimits) -> None:
    ops = allowed_ops()
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if isinstance(item, str):
            check_text(item, where, graph_error)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            _check_entry(item, key, value, where, limits, ops)
            stack.append(value)


def _check_entry(item: dict[str, Any], key: str, value: Any, where: str,
                 limits: ArchiveLimits, ops: frozenset[str]) -> None:
    if key in _FORBIDDEN_KEYS or (key == "custom_obj_values" and value):
        raise graph_error(f"member {where!r}: custom objects ({key}) are not accepted")
    if key in ("target", "as_operator") and ("inputs" in item or key == "as_operator"):
        if not isinstance(value, str) or value not in ops:
            raise graph_error(f"member {where!r}: operator {str(value)[:120]!r} is not in the "
                              "allowlist of torch operators")
    elif key == "expr_str":
        _grammar(exprs.check_sympy_repr, value, "size expression", where, limits)
    elif key == "name" or key == "as_name":
        if not (value == "" and "arg" in item):
            need_identifier(value, "name", where, graph_error)
    elif key.endswith("_name") and isinstance(value, str):
        if not DOTTED.fullmatch(value):
            raise graph_error(f"member {where!r}: {key} {value[:80]!r} is not a dotted "
                              "identifier")
    elif key == "fqn":
        if value != "" and not (isinstance(value, str) and DOTTED.fullmatch(value)):
            raise graph_error(f"member {where!r}: module path {str(value)[:80]!r} is not a "
                              "dotted identifier")
    elif key == "forward_arg_names":
        for name in _list(value, where):
            need_identifier(name, "argument name", where, graph_error)
    elif key in _VALUE_TABLES or key == "custom_obj_values":
        for name in need_dict(value, key, where, graph_error):
            need_identifier(name, "value name", where, graph_error)
        if key == "tensor_values":
            for name, meta in value.items():
                _check_tensor_meta(name, meta, where, limits)
    elif key in ("in_spec", "out_spec") and value is not None:
        _check_spec(value, where, limits)


def _check_tensor_meta(name: str, meta: Any, where: str, limits: ArchiveLimits) -> None:
    meta = need_dict(meta, f"tensor {name!r}", where, graph_error)
    raw = [s.get("as_int") for s in _list(meta.get("sizes"), where) if isinstance(s, dict)]
    sizes = [s for s in raw if isinstance(s, int) and not isinstance(s, bool) and s >= 0]
    if len(sizes) == len(raw):
        nbytes = tensor_bytes(meta.get("dtype"), sizes)
        if nbytes is None or nbytes > limits.max_tensor_bytes:
            raise graph_error(f"member {where!r}: tensor {name!r} declares {sizes} of dtype "
                              f"{meta.get('dtype')!r}, over the {limits.max_tensor_bytes}-byte "
                              "cap or not a known dtype")


def _check_spec(value: Any, where: str, limits: ArchiveLimits) -> None:
    if not isinstance(value, str) or len(value) > limits.max_json_bytes:
        raise graph_error(f"member {where!r}: a pytree spec is not a string")
    try:
        spec = json.loads(value)
    except Exception as exc:
        raise graph_error(f"member {where!r}: a pytree spec is not JSON") from exc
    stack: list[Any] = [spec]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            kind = item.get("type")
            if kind is not None and not (isinstance(kind, str) and DOTTED.fullmatch(kind)):
                raise graph_error(f"member {where!r}: pytree type {str(kind)[:80]!r} is not a "
                                  "dotted name")
            stack.extend(item.values())
        elif isinstance(item, str):
            check_text(item, where, graph_error)


__all__ = ["allowed_ops", "check_graph", "IDENTIFIER"]
