"""Small grammars for the expression strings torch keeps in a program's JSON.

torch ``sympify``s size expressions (``expr_str``, written by ``sympy.srepr``, e.g.
``Mul(Integer(2), Symbol('s65', positive=True, integer=True))``) and pastes guard
strings (``L['x'].size()[0] <= 64``) into generated Python. Each string is parsed here
with :mod:`ast` (never evaluated) and every node must belong to a small grammar:
arithmetic, comparisons and boolean logic over symbol names and integers, calls only
to a fixed set of sympy / torch.utils._sympy function names, and for guards, the
``L['name'].size()[i]`` shape accessors.
"""

from __future__ import annotations

import ast
import re

# sympy classes srepr writes, and torch.utils._sympy.functions the deserializer knows.
SYMPY_FUNCS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min",
    "Abs", "And", "Or", "Not", "Equality", "Unequality", "GreaterThan", "LessThan",
    "StrictGreaterThan", "StrictLessThan", "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "floor",
    "ceiling", "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
    "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
})
SYMPY_NAMES = frozenset({"true", "false", "oo", "zoo", "nan", "pi", "E"})
ASSUMPTIONS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
    "zero", "nonzero", "even", "odd", "precision", "evaluate",
})
SHAPE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
GUARD_FUNCS = frozenset({"len"}) | SYMPY_FUNCS
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")
_GUARD_CHARS = re.compile(r"[A-Za-z0-9_ \[\]()'.<>=!+\-*/%,&|~]*")

_ARITH = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Load,
          ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub,
          ast.UAdd, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And,
          ast.Or, ast.BitAnd, ast.BitOr, ast.LShift, ast.RShift)


class GrammarError(ValueError):
    """The string is not in the grammar; the message says which part."""


def _parse(text: object, max_chars: int) -> ast.Expression:
    if not isinstance(text, str):
        raise GrammarError("not a string")
    if len(text) > max_chars:
        raise GrammarError(f"longer than {max_chars} characters")
    try:
        return ast.parse(text, mode="eval")
    except Exception as exc:  # SyntaxError, RecursionError, MemoryError, ValueError (NUL)
        raise GrammarError(f"does not parse ({type(exc).__name__})") from exc


def _constant(node: ast.Constant, strings: bool) -> None:
    value = node.value
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > 1 << 64:
            raise GrammarError("integer constant out of range")
        return
    if isinstance(value, float):
        return
    if strings and isinstance(value, str) and (
            IDENTIFIER.fullmatch(value) or _NUMBER.fullmatch(value)):
        return
    raise GrammarError(f"constant {value!r} is not allowed")


def check_sympy_repr(text: object, max_chars: int = 4096) -> None:
    """A ``sympy.srepr`` string: nested calls of known classes over ints and symbols."""
    for node in ast.walk(_parse(text, max_chars)):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in SYMPY_FUNCS):
                raise GrammarError("call of a function outside the allowed set")
            if node.func.id == "Symbol" and not (
                    node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and IDENTIFIER.fullmatch(node.args[0].value)):
                raise GrammarError("Symbol needs an identifier name")
        elif isinstance(node, ast.keyword):
            if node.arg not in ASSUMPTIONS or not isinstance(node.value, ast.Constant):
                raise GrammarError(f"keyword {node.arg!r} is not allowed")
        elif isinstance(node, ast.Name):
            if node.id not in SYMPY_FUNCS and node.id not in SYMPY_NAMES:
                raise GrammarError(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Constant):
            _constant(node, strings=True)
        elif not isinstance(node, (ast.Expression, ast.Load, ast.UnaryOp, ast.USub)):
            raise GrammarError(f"{type(node).__name__} is not allowed")


def check_arith(text: object, max_chars: int = 4096) -> None:
    """``str()`` of a sympy expression: arithmetic over symbol names and integers."""
    for node in ast.walk(_parse(text, max_chars)):
        _arith_node(node, SYMPY_FUNCS)


def _arith_node(node: ast.AST, funcs: frozenset[str]) -> None:
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in funcs) or node.keywords:
            raise GrammarError("call of a function outside the allowed set")
    elif isinstance(node, ast.Name):
        if not IDENTIFIER.fullmatch(node.id) or node.id.startswith("_"):
            raise GrammarError(f"name {node.id!r} is not allowed")
    elif isinstance(node, ast.Constant):
        _constant(node, strings=False)
    elif not isinstance(node, _ARITH):
        raise GrammarError(f"{type(node).__name__} is not allowed")


def check_guard(text: object, max_chars: int = 4096) -> None:
    """A guard: arithmetic and comparisons over ``L['arg']...size()[i]`` accessors."""
    if isinstance(text, str) and not _GUARD_CHARS.fullmatch(text):
        raise GrammarError("holds characters outside the guard grammar")
    tree = _parse(text, max_chars)
    keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key = node.slice
            if not isinstance(key, ast.Constant) or isinstance(key.value, bool) or not (
                    isinstance(key.value, int)
                    or (isinstance(key.value, str) and IDENTIFIER.fullmatch(key.value))):
                raise GrammarError("subscripts must be an int or an identifier string")
        elif isinstance(node, ast.Attribute):
            if node.attr not in SHAPE_METHODS:
                raise GrammarError(f"attribute {node.attr!r} is not allowed")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.keywords or len(node.args) > 1:
                raise GrammarError("shape accessors take at most one argument")
        elif isinstance(node, ast.Constant):
            if not (isinstance(node.value, str) and id(node) in keys):
                _constant(node, strings=False)
        else:
            _arith_node(node, GUARD_FUNCS)
