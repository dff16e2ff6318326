"""Pytree specs (``in_spec`` / ``out_spec``): parsed fully, admitted only in torch's own form.

torch.export.save writes each spec with ``torch.utils._pytree.treespec_dumps``: the
JSON text ``[1, node]`` where a node is ``{"type", "context", "children_spec"}``. On load,
``_json_to_treespec`` looks ``type`` up among registered pytree types and decodes
``context``; for types without their own decoder that is ``json.loads(context,
object_hook=enum_object_hook)``, and an object with an ``"__enum__"`` key there makes
torch ``importlib.import_module`` any module and walk a ``getattr`` chain.
``collections.defaultdict``'s decoder imports ``default_factory_module`` and fetches
``default_factory_name`` from it. So every node is checked here:

* leaf: ``type`` and ``context`` null, no children;
* ``builtins.tuple`` / ``builtins.list``: context ``"null"``;
* ``builtins.dict`` / ``collections.OrderedDict``: context a JSON list of distinct keys,
  each a str (name rules) or an int, one per child;
* ``collections.namedtuple``: context the type's serialized name (a plain dotted name);
* ``collections.deque``: context ``"null"`` or an int (its maxlen);
* ``collections.defaultdict``: context ``{default_factory_module: "builtins",
  default_factory_name: <a builtin container or number type>, dict_context: [keys]}``;
* any other type (a registered dataclass or pytree node: torch's serialized name, plain
  dotted): its context is plain data, JSON text or a JSON value made of lists, str
  (name rules), bounded ints, floats, bools, null, and objects with name keys, never an
  ``"__enum__"`` key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.validation.jsondoc import MAX_JSON_INT, name_problem
from app.validation.limits import ArchiveLimits

PROTOCOL = 1
# A serialized type name: dotted Python identifiers (ASCII, as torch's own are).
TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}(\.[A-Za-z_][A-Za-z0-9_]{0,127}){0,31}")
FACTORIES = frozenset({"list", "dict", "tuple", "set", "frozenset", "int", "float",
                       "complex", "bool", "str", "bytes"})
_NODE_KEYS = {"type", "context", "children_spec"}
_SEQUENCES = {"builtins.tuple", "builtins.list"}
_MAPPINGS = {"builtins.dict", "collections.OrderedDict"}


class SpecError(ValueError):
    """The spec is not one torch.export.save writes; the message says which part."""


def check_treespec(text: object, *, limits: ArchiveLimits) -> None:
    """Raise SpecError unless ``text`` is a treespec string in torch's own form."""
    if not isinstance(text, str) or len(text) > limits.max_json_bytes:
        raise SpecError("is not a string of bounded length")
    doc = _json(text, "the spec", limits)
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == PROTOCOL
            and not isinstance(doc[0], bool)):
        raise SpecError(f"must be [{PROTOCOL}, <node>] (treespec protocol {PROTOCOL})")
    stack: list[tuple[Any, int]] = [(doc[1], 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > limits.max_json_depth or nodes > limits.max_json_values:
            raise SpecError("nests too deeply or has too many nodes")
        children = _check_node(node, limits)
        stack.extend((child, depth + 1) for child in children)


def _json(text: str, what: str, limits: ArchiveLimits) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except SpecError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # JSONDecodeError, RecursionError
        raise SpecError(f"{what} is not JSON ({type(exc).__name__})") from exc


def _no_constant(name: str) -> None:
    raise SpecError(f"holds the non-JSON constant {name}")


def _check_node(node: Any, limits: ArchiveLimits) -> list[Any]:
    if not isinstance(node, dict) or set(node) != _NODE_KEYS:
        raise SpecError("has a node that is not {type, context, children_spec}")
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if not isinstance(children, list):
        raise SpecError("has children_spec that is not a list")
    if kind is None:
        if context is not None or children:
            raise SpecError("has a leaf with a context or children")
        return []
    if not isinstance(kind, str) or not TYPE_NAME.fullmatch(kind):
        raise SpecError(f"names the type {str(kind)[:80]!r}, not a plain dotted name")
    if kind in _SEQUENCES:
        if context != "null":
            raise SpecError(f"gives {kind} the context {str(context)[:80]!r}, not null")
    elif kind in _MAPPINGS:
        keys = _json(_need_str(context, kind), f"the context of {kind}", limits)
        _check_keys(keys, kind, len(children))
    elif kind == "collections.namedtuple":
        if not isinstance(context, str) or not TYPE_NAME.fullmatch(context):
            raise SpecError(f"names the namedtuple {str(context)[:80]!r}, not a plain dotted "
                            "name")
    elif kind == "collections.deque":
        maxlen = _json(_need_str(context, kind), "the context of a deque", limits)
        if maxlen is not None and not (isinstance(maxlen, int) and not isinstance(maxlen, bool)
                                       and 0 <= maxlen <= MAX_JSON_INT):
            raise SpecError("gives a deque a maxlen that is not null or a count")
    elif kind == "collections.defaultdict":
        _check_defaultdict(context, len(children))
    else:  # a registered dataclass or pytree type: its context must be plain data
        _check_plain(_registered_context(context, kind, limits), kind)
    return children


def _registered_context(context: Any, kind: str, limits: ArchiveLimits) -> Any:
    """The context as torch's decoder sees it: JSON text, a JSON value from a type's own
    serializer, or (for such a serializer) a plain string, checked as a name."""
    if not isinstance(context, str):
        return context
    try:
        return _json(context, f"the context of {kind}", limits)
    except SpecError:
        if name_problem(context):
            raise
        return context


def _need_str(context: object, kind: str) -> str:
    if not isinstance(context, str):
        raise SpecError(f"gives {kind} a context that is not JSON text")
    return context


def _check_keys(keys: Any, kind: str, children: int) -> None:
    if not isinstance(keys, list) or len(keys) != children:
        raise SpecError(f"gives {kind} a context that is not a list of one key per child")
    seen = set()
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise SpecError(f"gives {kind} the key {str(key)[:80]!r}: keys are str or int")
        if isinstance(key, int) and not -MAX_JSON_INT <= key <= MAX_JSON_INT:
            raise SpecError(f"gives {kind} an integer key out of range")
        if isinstance(key, str) and (problem := name_problem(key)):
            raise SpecError(f"gives {kind} the key {key[:80]!r}, which {problem}")
        if key in seen:
            raise SpecError(f"gives {kind} the key {str(key)[:80]!r} twice")
        seen.add(key)


def _check_defaultdict(context: Any, children: int) -> None:
    expected = {"default_factory_module", "default_factory_name", "dict_context"}
    if not isinstance(context, dict) or set(context) != expected:
        raise SpecError("gives collections.defaultdict a context torch does not write")
    if context["default_factory_module"] != "builtins" or (
            context["default_factory_name"] not in FACTORIES):
        raise SpecError(
            "names the defaultdict factory "
            f"{str(context['default_factory_module'])[:40]}."
            f"{str(context['default_factory_name'])[:40]}; torch would import and call it, "
            f"so only builtins {sorted(FACTORIES)} are accepted")
    _check_keys(context["dict_context"], "collections.defaultdict", children)


def _check_plain(value: Any, kind: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, (bool, float)):
            continue
        if isinstance(item, int):
            if not -MAX_JSON_INT <= item <= MAX_JSON_INT:
                raise SpecError(f"gives {kind} an integer out of range in its context")
        elif isinstance(item, str):
            if problem := name_problem(item):
                raise SpecError(f"gives {kind} the context string {item[:80]!r}, which "
                                f"{problem}")
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "__enum__" in item:
                raise SpecError(f"gives {kind} an enum in its context: torch would import "
                                f"{str(item.get('fqn'))[:80]!r} and walk its attributes")
            stack.extend(item)  # keys follow the string rule
            stack.extend(item.values())
        else:
            raise SpecError(f"gives {kind} a context that is not plain data")


def check_namedtuple_fields(value: Any) -> None:
    """``treespec_namedtuple_fields``: {type name: {"field_names": [identifiers]}}."""
    if not isinstance(value, dict):
        raise SpecError("treespec_namedtuple_fields is not an object")
    for name, fields in value.items():
        if not TYPE_NAME.fullmatch(name):
            raise SpecError(f"names the namedtuple {name[:80]!r}, not a plain dotted name")
        names = fields.get("field_names") if isinstance(fields, dict) else None
        if not isinstance(fields, dict) or set(fields) != {"field_names"} or not isinstance(
                names, list) or not all(isinstance(n, str) and n.isidentifier() and len(n) < 256
                                        for n in names):
            raise SpecError(f"gives the namedtuple {name[:80]!r} field names that are not "
                            "identifiers")
