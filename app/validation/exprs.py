"""Small grammars for the expression strings torch keeps in a program's JSON.

torch ``sympify``s size expressions (``expr_str``, written by ``sympy.srepr``, e.g.
``Mul(Integer(2), Symbol('s65', positive=True, integer=True))``) and pastes guard
strings (``L['x'].size()[0] <= 64``) into generated Python. Each string is parsed here
with :mod:`ast` (never evaluated) and every node must belong to a small grammar:
arithmetic, comparisons and boolean logic over symbol names and integers, calls only
to a fixed set of sympy / torch.utils._sympy function names, and for guards, the
``L['name'].size()[i]`` shape accessors.

sympy evaluates as it builds (``Pow(Integer(10), Integer(2**64-1))`` computes the
power; ``Rational('1e999999999')`` builds the integer), so the grammar also bounds the
work: every integer within +-2**63 (20 digits), every numeric string a plain number with
a small exponent, every power and shift amount a literal of at most 64 (and no power or
shift inside the base of another, which would multiply the exponents), float precision
at most 1024 bits, and each expression at most 1000 nodes, 100 levels deep, 64 arguments
per call.
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
# Numeric strings sympy accepts in Integer('...') / Float('...') / Rational('...').
_NUMBER = re.compile(r"[-+]?[0-9]{1,20}(\.[0-9]{0,20})?([eE][-+]?[0-9]{1,3})?|[-+]?(inf|nan)")
# \w: argument names may be any Python identifier (L['données']).
_GUARD_CHARS = re.compile(r"[\w \[\]()'.<>=!+\-*/%,&|~]*")

MAX_INT = 1 << 63          # any integer literal
MAX_EXPONENT = 64          # a power's exponent, a shift's amount
MAX_DECIMAL_EXPONENT = 308  # the e in a numeric string
MAX_PRECISION = 1024       # Float(..., precision=) in bits
MAX_NODES = 1000
MAX_DEPTH = 100
MAX_ARGS = 64
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_LITERALS = frozenset({"Integer", "Float", "Rational"})

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
        tree = ast.parse(text, mode="eval")
    except Exception as exc:  # SyntaxError, RecursionError, MemoryError, ValueError (NUL)
        raise GrammarError(f"does not parse ({type(exc).__name__})") from exc
    _check_size(tree)
    return tree


def _check_size(tree: ast.Expression) -> None:
    """At most MAX_NODES nodes, MAX_DEPTH levels, MAX_ARGS arguments per call/operator."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise GrammarError(f"more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise GrammarError(f"nested deeper than {MAX_DEPTH} levels")
        width = len(node.args) + len(node.keywords) if isinstance(node, ast.Call) else len(
            node.values) if isinstance(node, ast.BoolOp) else len(node.comparators) if (
            isinstance(node, ast.Compare)) else 0
        if width > MAX_ARGS:
            raise GrammarError(f"more than {MAX_ARGS} arguments in one call")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _int(value: int) -> None:
    if not -MAX_INT <= value <= MAX_INT:
        raise GrammarError(f"integer {str(value)[:24]}... is outside +-2**63")


def _number_string(value: str) -> None:
    match = _NUMBER.fullmatch(value)
    if not match:
        raise GrammarError(f"numeric string {value[:40]!r} is not a plain number of at most "
                           "20 digits")
    exponent = match.group(2)
    if exponent and abs(int(exponent[1:])) > MAX_DECIMAL_EXPONENT:
        raise GrammarError(f"numeric string {value[:40]!r} has an exponent beyond "
                           f"{MAX_DECIMAL_EXPONENT}")
    digits = value.split(".")[0].lstrip("+-")
    if digits.isdigit() and not exponent:
        _int(int(digits))


def _constant(node: ast.Constant, strings: bool) -> None:
    value = node.value
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        _int(value)
        return
    if isinstance(value, float):
        return
    if strings and isinstance(value, str):
        if IDENTIFIER.fullmatch(value) and value not in ("inf", "nan"):
            return
        _number_string(value)
        return
    raise GrammarError(f"constant {value!r} is not allowed")


def _small_literal(node: ast.AST, what: str) -> None:
    """A power's exponent or a shift's amount: a number literal of magnitude <= 64."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
            node.func.id in _LITERALS) and not node.keywords and node.args:
        for arg in node.args:
            _small_literal(arg, what)
        return
    if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
        value = node.value
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            try:
                value = float(value)
            except ValueError:
                value = None
        if isinstance(value, (int, float)) and abs(value) <= MAX_EXPONENT:
            return
    raise GrammarError(f"{what} must be a number literal of at most {MAX_EXPONENT}")


def _is_power(node: ast.AST) -> bool:
    return (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift,
                                                                 ast.RShift))) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id in _POWERS)


def _power(base: ast.AST, amount: ast.AST, what: str) -> None:
    """One power or shift: a small literal amount and no power nested in its base
    (``Pow(Pow(2, 64), 64)`` is 2**4096; a hundred levels would never finish)."""
    _small_literal(amount, what)
    if any(_is_power(inner) for inner in ast.walk(base)):
        raise GrammarError("a power or shift inside the base of another one is not allowed")


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
            if node.func.id in _POWERS:
                if len(node.args) != 2:
                    raise GrammarError(f"{node.func.id} takes two arguments")
                _power(node.args[0], node.args[1], f"the exponent/shift of {node.func.id}")
        elif isinstance(node, ast.keyword):
            _keyword(node)
        elif isinstance(node, ast.Name):
            if node.id not in SYMPY_FUNCS and node.id not in SYMPY_NAMES:
                raise GrammarError(f"name {node.id!r} is not allowed")
        elif isinstance(node, ast.Constant):
            _constant(node, strings=True)
        elif not isinstance(node, (ast.Expression, ast.Load, ast.UnaryOp, ast.USub)):
            raise GrammarError(f"{type(node).__name__} is not allowed")


def _keyword(node: ast.keyword) -> None:
    if node.arg not in ASSUMPTIONS or not isinstance(node.value, ast.Constant):
        raise GrammarError(f"keyword {node.arg!r} is not allowed")
    value = node.value.value
    if node.arg == "precision":
        if isinstance(value, bool) or not isinstance(value, int) or not (
                1 <= value <= MAX_PRECISION):
            raise GrammarError(f"precision must be an integer in [1, {MAX_PRECISION}]")
    elif not isinstance(value, bool):
        raise GrammarError(f"assumption {node.arg!r} must be True or False")


def check_arith(text: object, max_chars: int = 4096) -> None:
    """``str()`` of a sympy expression: arithmetic over symbol names and integers."""
    for node in ast.walk(_parse(text, max_chars)):
        _arith_node(node, SYMPY_FUNCS)


def _arith_node(node: ast.AST, funcs: frozenset[str]) -> None:
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in funcs) or node.keywords:
            raise GrammarError("call of a function outside the allowed set")
        if node.func.id in _POWERS:
            if len(node.args) != 2:
                raise GrammarError(f"{node.func.id} takes two arguments")
            _power(node.args[0], node.args[1], f"the exponent/shift of {node.func.id}")
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift,
                                                              ast.RShift)):
        _power(node.left, node.right, "an exponent or shift amount")
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
                    isinstance(key.value, int) or (isinstance(key.value, str) and (
                        key.value.isidentifier() and len(key.value) <= 4096))):
                raise GrammarError("subscripts must be an int or an identifier string")
            if isinstance(key.value, int):
                _int(key.value)
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
