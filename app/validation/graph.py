"""The program's graph JSON (``models/<name>.json``): what it calls and what it names.

Every node target must be in ``ops_allowlist.txt`` (written offline by ``gen_ops``
from the torch the workers run) and not in ``denylist.py``; every string argument inside
``SAFE_STRING`` (inductor pastes them into C++ unescaped) or, for the few torch writes in
a fixed form, that form; no ``unsafe`` flag set; value and node names identifiers;
parameter, buffer and constant names and module paths within the name rules of
``jsondoc.py``; every size expression and guard string inside the grammars of
``exprs.py``; every pytree spec in torch's own form (``treespec.py``); and every
declared tensor within the byte cap.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.validation import exprs
from app.validation.denylist import NONE_ARGS, STRING_FORMS, UNSAFE_FLAGS, denied_reason
from app.validation.jsondoc import (
    IDENTIFIER,
    SAFE_STRING,
    check_text,
    graph_error,
    need_dict,
    need_identifier,
    need_int,
    need_name,
    need_python_identifier,
)
from app.validation.limits import ArchiveLimits
from app.validation.payloads import tensor_bytes
from app.validation.treespec import SpecError, check_namedtuple_fields, check_treespec

ALLOWLIST_PATH = Path(__file__).with_name("ops_allowlist.txt")
SCHEMA_MAJOR = 8  # torch 2.13 reads export schema 8.x
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # cpu, cuda, meta, privateuseone...
_VALUE_TABLES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")
_FORBIDDEN_KEYS = ("as_custom_obj", "as_custom_objs", "custom_obj", "as_opaque")
# Keys naming parameters, buffers, constants, inputs: state-dict style names.
_NAME_KEYS = ("parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
              "user_input_name")


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
    module = root.get("graph_module")
    if isinstance(module, dict) and "treespec_namedtuple_fields" in module:
        try:
            check_namedtuple_fields(module["treespec_namedtuple_fields"])
        except SpecError as exc:
            raise graph_error(f"member {where!r}: pytree namedtuple fields: {exc}") from exc
    _Walker(where, limits).walk(root)


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


class _Walker:
    def __init__(self, where: str, limits: ArchiveLimits) -> None:
        self.where, self.limits, self.ops = where, limits, allowed_ops()
        self.formatted: set[int] = set()  # as_string args already held to a fixed form

    def walk(self, root: dict[str, Any]) -> None:
        stack: list[Any] = [root]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
                continue
            if isinstance(item, str):
                check_text(item, self.where, graph_error)
                continue
            if not isinstance(item, dict):
                continue
            if "target" in item and "inputs" in item:
                self._node(item)
            for key, value in item.items():
                self._entry(item, key, value)
                stack.append(value)

    def _node(self, node: dict[str, Any]) -> None:
        target = node["target"]
        for named in _list(node["inputs"], self.where):
            if not isinstance(named, dict) or not isinstance(named.get("arg"), dict):
                continue
            name, arg = named.get("name"), named["arg"]
            if not isinstance(name, str):  # torch matches arguments to the schema by name
                raise graph_error(f"member {self.where!r}: an argument of "
                                  f"{str(target)[:120]} has no name")
            if name in UNSAFE_FLAGS and arg.get("as_bool") not in (None, False):
                raise graph_error(f"member {self.where!r}: {str(target)[:120]} sets "
                                  f"{name}=True, which switches its bounds checks off")
            names, why = NONE_ARGS.get(target, ((), "")) if isinstance(target, str) else (
                (), "")
            if name in names and arg != {"as_none": True}:
                raise graph_error(f"member {self.where!r}: {target} with {name} given is "
                                  f"refused: {why}")
            form = STRING_FORMS.get((target, name)) if isinstance(target, str) else None
            if form is not None and "as_string" in arg:
                value = arg["as_string"]
                if not (isinstance(value, str) and form.fullmatch(value)):
                    raise graph_error(f"member {self.where!r}: {target} {name} "
                                      f"{str(value)[:80]!r} is not the assert message torch "
                                      "writes (Runtime assertion failed for expression ... "
                                      "on node '...')")
                self.formatted.add(id(arg))

    def _string_arg(self, value: object, what: str) -> None:
        if not (isinstance(value, str) and SAFE_STRING.fullmatch(value)) or "??" in value:
            raise graph_error(
                f"member {self.where!r}: {what} {str(value)[:80]!r} holds characters outside "
                "[A-Za-z0-9 _.,:;=+-*/()<>[]#@!?%] (no quotes, backslashes, braces, control "
                "characters or newlines): inductor pastes string arguments into C++ unescaped")

    def _entry(self, item: dict[str, Any], key: str, value: Any) -> None:
        where, limits = self.where, self.limits
        if key in _FORBIDDEN_KEYS or (key == "custom_obj_values" and value):
            raise graph_error(f"member {where!r}: custom objects ({key}) are not accepted")
        if key in ("target", "as_operator") and ("inputs" in item or key == "as_operator"):
            reason = denied_reason(value) if isinstance(value, str) else None
            if reason:
                raise graph_error(f"member {where!r}: operator {value} is denied: {reason}")
            if not isinstance(value, str) or value not in self.ops:
                raise graph_error(f"member {where!r}: operator {str(value)[:120]!r} is not in "
                                  "the allowlist of torch operators")
        elif key == "as_string":
            if id(item) not in self.formatted:
                self._string_arg(value, "string argument")
        elif key == "as_strings":
            for text in _list(value, where):
                self._string_arg(text, "string argument")
        elif key == "as_string_to_argument":
            for text in need_dict(value, key, where, graph_error):
                self._string_arg(text, "string-keyed argument")
        elif key == "stack_trace" and isinstance(value, str) and ')"' in value:
            # cpp_wrapper_cpu pastes stack traces into C++ raw strings R"(...)" when kernel
            # profiling is on; ')"' would end the literal.
            raise graph_error(f"member {where!r}: a node's stack_trace holds ')\"', which "
                              "would end the C++ raw string inductor pastes it into")
        elif key in ("as_device", "device") and isinstance(value, dict):
            kind, index = value.get("type"), value.get("index")
            if not (isinstance(kind, str) and _DEVICE.fullmatch(kind)) or not (
                    index is None or (isinstance(index, int) and 0 <= index < 1024)):
                raise graph_error(f"member {where!r}: device {str(value)[:80]!r} is not a "
                                  "device type and index")
        elif key == "expr_str":
            _grammar(exprs.check_sympy_repr, value, "size expression", where, limits)
        elif key == "name" or key == "as_name":
            if not (value == "" and "arg" in item):
                need_identifier(value, "name", where, graph_error)
        elif key in _NAME_KEYS:
            need_name(value, key, where, graph_error)
        elif key == "fqn":
            if value != "":
                need_name(value, "module path", where, graph_error)
        elif key == "forward_arg_names":
            for name in _list(value, where):
                need_python_identifier(name, "argument name", where, graph_error)
        elif key in _VALUE_TABLES or key == "custom_obj_values":
            for name in need_dict(value, key, where, graph_error):
                need_identifier(name, "value name", where, graph_error)
            if key == "tensor_values":
                for name, meta in value.items():
                    _check_tensor_meta(name, meta, where, limits)
        elif key in ("in_spec", "out_spec") and value is not None:
            try:
                check_treespec(value, limits=limits)
            except SpecError as exc:
                raise graph_error(f"member {where!r}: pytree spec {key} {exc}") from exc


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


__all__ = ["allowed_ops", "check_graph", "IDENTIFIER"]
