"""Parse user-supplied formula strings into SymPy expressions, safely.

Custom activations and losses arrive as text, e.g. ``"z*tanh(log(1 + exp(z)))"``
or ``"log(cosh(y - t))"``.  SymPy's own string parser runs the text as Python
code, so untrusted input handed to it can execute anything.  Here the text is
only *parsed* with :func:`ast.parse` (which executes nothing) and the syntax
tree is walked against an explicit whitelist, building SymPy objects directly.
Every rejection is a :class:`FormulaError` (a ``ValueError``) that quotes the
text.  Limits on length, nesting depth and numeric exponents keep hostile
inputs such as ``2**10**10`` from exhausting the stack or hanging SymPy in
big-integer arithmetic.
"""

import ast
import contextlib
import inspect
import math
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType

import sympy
from sympy.printing.str import StrPrinter

__all__ = ["DEFAULT_FUNCTIONS", "FormulaError", "IndexFormula", "constant_problem", "constant_value", "parse_formula",
           "parse_index_formula"]

MAX_LENGTH = 2000
MAX_DEPTH = 100
# Any numeric exponent beyond this is certainly a typo or an attack in an
# activation/loss, and SymPy may otherwise expand it into a gigantic integer.
MAX_EXPONENT = 1000
# Bound on exact numbers (about 3000 digits): larger ones make SymPy slow
# and exceed Python's int-to-str limit when the expression is printed.
MAX_NUMBER_BITS = 10_000


class FormulaError(ValueError):
    """A formula string was rejected; the message names the problem and quotes the text."""


class _Reject(ValueError):
    """Internal: a problem description, prefixed with the quoted text by `parse_formula`."""


def _short(value: sympy.Expr) -> str:
    try:  # str() of a huge integer raises (int max str digits) or is unreadable
        text = str(value)
    except ValueError:
        return "<a very large number>"
    return text if len(text) <= 40 else text[:37] + "..."


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if base.is_number and not exponent.is_number and not _bits(base) > MAX_NUMBER_BITS:
        value = constant_value(base) if base.is_real is not False else complex(0, 1)
        if value.imag == 0 and value.real <= 0:
            # (−2)**z is complex for any z not an integer (PyTorch: NaN), and 0**z has the
            # derivative 0**z·log(0): neither is a real, differentiable function.
            raise _Reject(f"({_short(base)})**({_short(exponent)}): a zero or negative base to a variable "
                          f"power is not a real, differentiable function")
    if exponent.is_number:
        try:
            magnitude = float(abs(exponent))
        except (TypeError, ValueError, OverflowError):
            magnitude = float("inf")
        if not magnitude <= MAX_EXPONENT:  # also catches nan
            raise _Reject(f"exponent {_short(exponent)} is not allowed: numeric exponents "
                          f"must be finite and at most {MAX_EXPONENT} in absolute value")
        if base.is_number and _bits(base) * magnitude > MAX_NUMBER_BITS:
            raise _Reject(f"power {_short(base)}**{_short(exponent)} would produce a number "
                          f"of about {int(_bits(base) * magnitude * 0.30103)} digits")
    return base**exponent


def _bits(expr: sympy.Basic) -> int:
    return max((max(a.p.bit_length(), a.q.bit_length()) for a in expr.atoms(sympy.Rational)), default=0)


def _check_bits(bits: int) -> None:
    if bits > MAX_NUMBER_BITS:
        raise _Reject(f"produces a number of about {int(bits * 0.30103)} digits, "
                      f"more than the {int(MAX_NUMBER_BITS * 0.30103)} allowed")


def _check_size(expr: sympy.Expr) -> sympy.Expr:
    _check_bits(_bits(expr))
    return expr


def _one(fn: Callable[[sympy.Expr], sympy.Expr]) -> Callable[[sympy.Expr], sympy.Expr]:
    # A fixed one-argument signature gives the arity check something to read.
    def call(x: sympy.Expr) -> sympy.Expr:
        return fn(x)
    return call


def _log(x: sympy.Expr, base: sympy.Expr | None = None) -> sympy.Expr:
    return sympy.log(x) if base is None else sympy.log(x, base)


def _sqrt(x: sympy.Expr) -> sympy.Expr:
    # Routed through _power so the size guard also covers roots of huge numbers.
    return _power(x, sympy.Rational(1, 2))


def _log1p(x: sympy.Expr) -> sympy.Expr:
    # SymPy has no log1p that prints to code cleanly, so spell it out.
    return sympy.log(1 + x)


def _max(a: sympy.Expr, b: sympy.Expr, *rest: sympy.Expr) -> sympy.Expr:
    return sympy.Max(a, b, *rest)


def _min(a: sympy.Expr, b: sympy.Expr, *rest: sympy.Expr) -> sympy.Expr:
    return sympy.Min(a, b, *rest)


_UNARY = ("exp", "tanh", "sinh", "cosh", "sin", "cos", "tan", "atan", "asinh", "erf", "sign")
DEFAULT_FUNCTIONS: Mapping[str, Callable[..., sympy.Expr]] = MappingProxyType({
    **{name: _one(getattr(sympy, name)) for name in _UNARY},
    "abs": _one(sympy.Abs), "log": _log, "sqrt": _sqrt, "log1p": _log1p,
    "max": _max, "min": _min, "pow": _power,
})
_CONSTANTS = {"pi": sympy.pi, "e": sympy.E}

_SYNTAX_NAMES = {
    ast.Attribute: "attribute access", ast.Subscript: "subscripts", ast.Slice: "slices",
    ast.Lambda: "lambda expressions", ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions", ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators", ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions (:=)", ast.JoinedStr: "f-strings",
    ast.Tuple: "tuples", ast.List: "lists", ast.Dict: "dicts", ast.Set: "sets",
    ast.Starred: "starred arguments", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_OPERATOR_NAMES = {
    ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>",
    ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^", ast.Not: "not", ast.Invert: "~",
}
_LITERAL_NAMES = {str: "string literals", bytes: "bytes literals", bool: "booleans",
                  complex: "complex numbers", type(None): "None", type(...): "Ellipsis"}


def _arity(fn: Callable[..., object]) -> tuple[int, int | None]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0, None
    low, high = 0, 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            high = None
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            low += p.default is p.empty
            high = None if high is None else high + 1
    return low, high


def _arity_problem(name: str, low: int, high: int | None, got: int) -> str | None:
    if low <= got and (high is None or got <= high):
        return None
    if high == low:
        expected = f"{low} argument{'' if low == 1 else 's'}"
    elif high is None:
        expected = f"at least {low} arguments"
    else:
        expected = f"{low} to {high} arguments"
    return f"{name}() takes {expected}, got {got}"


class _Builder:
    def __init__(self, source: str, variables: Mapping[str, sympy.Expr],
                 functions: Mapping[str, Callable[..., sympy.Expr]]) -> None:
        self.source, self.variables, self.functions = source, variables, functions

    def build(self, node: ast.AST, depth: int = 0) -> sympy.Expr:
        if depth > MAX_DEPTH:
            raise _Reject(f"nesting is deeper than {MAX_DEPTH} levels")
        if isinstance(node, ast.Constant):
            return self.number(node)
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            operand = self.build(node.operand, depth + 1)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return _check_size(_power(self.build(node.left, depth + 1), self.build(node.right, depth + 1)))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            return _check_size(self.chain(node, depth))
        if isinstance(node, ast.Call):
            return _check_size(self.call(node, depth))
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            raise _Reject(f"unsupported syntax: operator '{_OPERATOR_NAMES.get(type(node.op), '?')}'")
        raise _Reject(f"unsupported syntax: {_SYNTAX_NAMES.get(type(node), type(node).__name__)}")

    def chain(self, node: ast.BinOp, depth: int) -> sympy.Expr:
        # Walk the left spine iteratively so that a long flat sum or product
        # (z + z + ... + z) does not count as deep nesting.
        additive = isinstance(node.op, (ast.Add, ast.Sub))
        group = (ast.Add, ast.Sub) if additive else (ast.Mult, ast.Div)
        rights: list[tuple[ast.operator, ast.expr]] = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, group):
            rights.append((node.op, node.right))
            node = node.left
        terms = [self.build(node, depth + 1)]
        for op, right in reversed(rights):
            value = self.build(right, depth + 1)
            if isinstance(op, ast.Sub):
                value = -value
            elif isinstance(op, ast.Div):
                value = sympy.Pow(value, -1)
            terms.append(value)
        # Exact products, and sums of fractions, can grow to the combined size
        # of their parts; refuse before SymPy multiplies huge integers.
        _check_bits(sum(map(_bits, terms)))
        return sympy.Add(*terms) if additive else sympy.Mul(*terms)

    def number(self, node: ast.Constant) -> sympy.Expr:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Reject(f"unsupported syntax: {_LITERAL_NAMES.get(type(value), 'literals')}")
        if isinstance(value, int):
            return sympy.Integer(value)
        # Use the digits the user typed, so "0.01" is exactly 1/100 rather
        # than the nearest binary double.
        literal = ast.get_source_segment(self.source, node) or repr(value)
        try:
            decimal = Decimal(literal)
        except InvalidOperation:
            decimal = Decimal(repr(value))
        if not decimal.is_finite() or abs(decimal.adjusted()) > MAX_EXPONENT:
            raise _Reject(f"numeric literal {literal[:40]} is out of range")
        return sympy.Rational(*decimal.as_integer_ratio())

    def name(self, ident: str) -> sympy.Expr:
        if ident in self.variables:
            return self.variables[ident]
        if ident in _CONSTANTS:
            return _CONSTANTS[ident]
        if ident in self.functions:
            raise _Reject(f"'{ident}' is a function; call it as {ident}(...)")
        allowed = ", ".join(sorted(self.variables))
        hint = f"the formula may only use {allowed}" if allowed else "the formula may not use any symbols"
        raise _Reject(f"unknown symbol '{ident}'; {hint}")

    def call(self, node: ast.Call, depth: int) -> sympy.Expr:
        if not isinstance(node.func, ast.Name):
            raise _Reject("unsupported syntax: calling something other than a function name")
        name = node.func.id
        if node.keywords:
            raise _Reject(f"unsupported syntax: keyword arguments in {name}()")
        fn = self.functions.get(name)
        if fn is None:
            if name in self.variables or name in _CONSTANTS:
                raise _Reject(f"'{name}' is not a function")
            raise _Reject(f"unknown function '{name}' (known: {', '.join(sorted(self.functions))})")
        problem = _arity_problem(name, *_arity(fn), len(node.args))
        if problem:
            raise _Reject(problem)
        args = [self.build(arg, depth + 1) for arg in node.args]
        try:
            result = fn(*args)
        except _Reject:
            raise
        except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. Max of a non-comparable number
            raise _Reject(f"{name}() rejected its arguments: {exc}") from exc
        if not isinstance(result, sympy.Basic):
            raise TypeError(f"function {name!r} returned {type(result).__name__}, not a SymPy expression")
        return result


def _source(text: str, what: str) -> tuple[str, str]:
    """The text stripped, and how messages quote it; refuses a non-string, empty or too long text."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    source = text.strip()  # leading whitespace would be an IndentationError
    quoted = f'{what} "{source if len(source) <= 80 else source[:77] + "..."}"'
    if not source:
        raise FormulaError(f'{what} "{text}" is empty')
    if len(source) > MAX_LENGTH:
        raise FormulaError(f"{quoted} is too long ({len(source)} characters; the limit is {MAX_LENGTH})")
    return source, quoted


@contextlib.contextmanager
def _rejections(quoted: str):
    """A builder's refusal (or too deep a nesting) as a FormulaError quoting the text."""
    try:
        yield
    except _Reject as exc:
        raise FormulaError(f"{quoted}: {exc}") from None
    except RecursionError:
        raise FormulaError(f"{quoted} is nested too deeply") from None


def _defined(expr: sympy.Expr, quoted: str) -> sympy.Expr:
    """``expr``, refused when it is undefined or holds a constant no float can be."""
    if expr.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise FormulaError(f"{quoted} is undefined (division by zero or similar)")
    problem = constant_problem(expr)
    if problem:
        raise FormulaError(f"{quoted}: {problem}")
    return expr


class _IndexBuilder(_Builder):
    """The formula language with arrays: ``W[k, j]`` reads an array at plain index names,
    ``Sum(body, j)`` or ``Sum(body, (i, j))`` sums over index names.  An index is a name
    used inside brackets; it may not be used as a number.  A sum's bounds are left as
    ``extent(index) − 1`` placeholders: the layer fixes them from where the index is used."""

    def __init__(self, source: str, arrays: Mapping[str, int], functions: Mapping[str, Callable]) -> None:
        super().__init__(source, {}, {**DEFAULT_FUNCTIONS, **functions})
        self.arrays = dict(arrays)
        self.bases = {name: sympy.IndexedBase(name, real=True) for name in arrays}
        self.reads: list[tuple[str, tuple[str, ...]]] = []  # every array read, in order
        self.summed: list[str] = []  # every index some Sum runs over, once
        self.active: set[str] = set()  # the indices of the Sums being built

    @staticmethod
    def index(name: str) -> sympy.Symbol:
        return sympy.Symbol(name, integer=True, nonnegative=True)

    @staticmethod
    def extent(name: str) -> sympy.Symbol:
        return sympy.Symbol(f"extent_{name}", integer=True, positive=True)

    def index_names(self, node: ast.AST, what: str) -> tuple[str, ...]:
        items = node.elts if isinstance(node, ast.Tuple) else [node]
        names = []
        for item in items:
            if not isinstance(item, ast.Name):
                raise _Reject(f"{what} must be plain index names such as [n, k], not an expression "
                              f"({ast.get_source_segment(self.source, item) or '?'})")
            if item.id in self.arrays or item.id in self.functions or item.id in _CONSTANTS:
                raise _Reject(f"'{item.id}' cannot be an index: it names an array, a function or a constant")
            names.append(item.id)
        if len(set(names)) != len(names):
            raise _Reject(f"{what} repeat an index: [{', '.join(names)}]")
        return tuple(names)

    def build(self, node: ast.AST, depth: int = 0) -> sympy.Expr:
        if isinstance(node, ast.Subscript):
            if not isinstance(node.value, ast.Name):
                raise _Reject("unsupported syntax: only a named array can be indexed, as W[k, j]")
            name = node.value.id
            if name not in self.arrays:
                known = ", ".join(sorted(self.arrays))
                raise _Reject(f"unknown array '{name}' (the formula may read {known}; declare a parameter in params=)")
            idx = self.index_names(node.slice, f"the indices of {name}")
            if len(idx) != self.arrays[name]:
                raise _Reject(f"{name} has {self.arrays[name]} ind{'ex' if self.arrays[name] == 1 else 'ices'}, "
                              f"it is read as {name}[{', '.join(idx)}]")
            self.reads.append((name, idx))
            return self.bases[name][tuple(self.index(i_) for i_ in idx)]
        return super().build(node, depth)

    def name(self, ident: str) -> sympy.Expr:
        if ident in self.arrays:
            raise _Reject(f"'{ident}' is an array: read it at indices, as {ident}[...]")
        if ident not in _CONSTANTS and ident not in self.functions:
            raise _Reject(f"unknown symbol '{ident}': a value is an array read (x[n, j], W[k, j]), a number, "
                          "pi or e; an index name is only used inside brackets or as Sum's second argument")
        return super().name(ident)

    def call(self, node: ast.Call, depth: int) -> sympy.Expr:
        if isinstance(node.func, ast.Name) and node.func.id == "Sum":
            if node.keywords or len(node.args) != 2:
                raise _Reject("Sum takes two arguments: Sum(body, j) or Sum(body, (i, j))")
            over = self.index_names(node.args[1], "Sum's indices")
            nested = [name for name in over if name in self.active]
            if nested:
                raise _Reject(f"a Sum over {nested[0]} inside another Sum over {nested[0]}: give the inner one "
                              "its own index name")
            self.active |= set(over)
            try:
                body = self.build(node.args[0], depth + 1)
            finally:
                self.active -= set(over)
            used = {str(s_) for s_ in body.free_symbols}
            for name in over:
                if name not in used:
                    raise _Reject(f"Sum over {name}, which its body does not read at: {name} has no bounds there")
            self.summed += [name for name in over if name not in self.summed]
            return sympy.Sum(body, *[(self.index(i_), 0, self.extent(i_) - 1) for i_ in over])
        return super().call(node, depth)


class IndexFormula:
    """A parsed ``target[n, k] = …`` (see :func:`parse_index_formula`)."""

    def __init__(self, target: str, indices: tuple[str, ...], body: sympy.Expr,
                 reads: list[tuple[str, tuple[str, ...]]], summed: list[str]) -> None:
        self.target, self.indices, self.body = target, indices, body
        self.reads, self.summed = reads, summed


def parse_index_formula(text: str, arrays: Mapping[str, int], functions: Mapping[str, Callable] | None = None,
                        *, what: str = "layer formula") -> IndexFormula:
    """Parse ``"z[n, k] = Sum(W[k, j]*x[n, j], j) + b[k]"`` without executing it.

    ``arrays`` maps each name the right-hand side may read to its number of indices
    (``functions``: more callables by name, as for :func:`parse_formula`).  The
    right-hand side is :func:`parse_formula`'s language plus array reads at index names and
    ``Sum(body, j)`` / ``Sum(body, (i, j))``; the left-hand side is one array at distinct
    index names.  Every rejection is a :class:`FormulaError` quoting the text.
    """
    source, quoted = _source(text, what)
    rewritten = source.replace("^", "**")
    try:
        tree = ast.parse(rewritten, mode="exec")
    except SyntaxError as exc:
        raise FormulaError(f"{quoted} does not parse: {exc.msg}"
                           + (f" at column {exc.offset}" if exc.offset else "")) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise FormulaError(f"{quoted} does not parse: {type(exc).__name__}") from None
    if (len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assign) or len(tree.body[0].targets) != 1
            or not isinstance(tree.body[0].targets[0], ast.Subscript)
            or not isinstance(tree.body[0].targets[0].value, ast.Name)):
        raise FormulaError(f"{quoted} must be one assignment to an indexed name, as z[n, k] = …")
    assign = tree.body[0]
    builder = _IndexBuilder(rewritten, arrays, functions or {})
    with _rejections(quoted):
        target = assign.targets[0].value.id
        if target in arrays:
            raise _Reject(f"the left-hand side {target} is also an array the formula reads")
        indices = builder.index_names(assign.targets[0].slice, "the left-hand side's indices")
        body = builder.build(assign.value)
    return IndexFormula(target, indices, _defined(body, quoted), builder.reads, builder.summed)


def _original_column(line: str, offset: int) -> int:
    # Map a 1-based column in the '^' -> '**' rewritten line back to the text as typed.
    position = 0
    for column, char in enumerate(line, start=1):
        position += 2 if char == "^" else 1
        if position >= offset:
            return column
    return len(line) + 1


def parse_formula(text: str, variables: Mapping[str, sympy.Symbol],
                  functions: Mapping[str, Callable[..., sympy.Expr]] | None = None,
                  *, what: str = "formula") -> sympy.Expr:
    """Turn a formula string into a SymPy expression without executing it.

    Accepted: int/float literals (floats become exact rationals, ``0.01`` is
    ``1/100``), the names in `variables`, the constants ``pi`` and ``e``
    (unless shadowed by a variable), unary ``+``/``-``, binary ``+ - * / **``,
    parentheses and calls of whitelisted functions with positional arguments.
    ``^`` is read as exponentiation (``**``), never as XOR, with ``**``'s
    precedence.  Everything else is rejected.

    Parameters
    ----------
    text : str
        The formula, at most ``MAX_LENGTH`` characters.
    variables : Mapping[str, sympy.Symbol]
        The only names allowed as free symbols.
    functions : Mapping[str, Callable], optional
        Extra callables by name, merged over `DEFAULT_FUNCTIONS` (exp, log,
        log1p, sqrt, tanh, sinh, cosh, sin, cos, tan, atan, asinh, abs, erf,
        sign, max, min, pow).  Each must return a SymPy expression.
    what : str
        Noun that starts error messages, e.g. ``"custom activation"``.

    Returns
    -------
    sympy.Expr
        The evaluated expression; it may contain none of the variables.

    Raises
    ------
    TypeError
        If `text` is not a string.
    FormulaError
        (a ``ValueError``) if the text is empty, too long, too deeply nested,
        does not parse, or uses anything outside the whitelist.

    Examples
    --------
    >>> z = sympy.Symbol("z")
    >>> parse_formula("z*tanh(log(1 + exp(z)))", {"z": z})
    z*tanh(log(exp(z) + 1))
    >>> parse_formula("0.5*z^2", {"z": z})
    z**2/2
    """
    source, quoted = _source(text, what)
    rewritten = source.replace("^", "**")  # safe: string literals are rejected anyway
    try:
        tree = ast.parse(rewritten, mode="eval")
    except SyntaxError as exc:
        lineno, lines = exc.lineno or 1, source.splitlines() or [source]
        where = ""
        if exc.offset == 0:  # CPython's way of saying the text ended too early
            where = " at the end"
        elif exc.offset:
            column = _original_column(lines[min(lineno, len(lines)) - 1], exc.offset)
            where = f" at line {lineno}, column {column}" if lineno > 1 else f" at column {column}"
        raise FormulaError(f"{quoted} does not parse: {exc.msg}{where}") from None
    except (RecursionError, MemoryError):
        raise FormulaError(f"{quoted} is nested too deeply to parse") from None
    except ValueError as exc:  # e.g. null bytes
        raise FormulaError(f"{quoted} does not parse: {exc}") from None
    builder = _Builder(rewritten, variables, {**DEFAULT_FUNCTIONS, **(functions or {})})
    with _rejections(quoted):
        expr = builder.build(tree.body)
    return _defined(expr, quoted)


def constant_value(expr: sympy.Expr) -> complex:
    """The value of a constant subexpression to 30 digits, as Python's complex (infinite
    components where it is beyond the float range)."""
    value = expr.evalf(30)
    re, im = value.as_real_imag()

    def part(x: sympy.Expr) -> float:
        try:
            return float(x)
        except OverflowError:
            return math.copysign(math.inf, float(sympy.sign(x)))
        except TypeError:  # not a number at all (zoo, nan)
            return math.nan

    return complex(part(re), part(im))


def _constant_parts(expr: sympy.Basic):
    """The largest subexpressions without a variable (a product's or sum's constant factor
    or term taken together: I·π, not I and π), outermost first."""
    if not isinstance(expr, sympy.Expr) or isinstance(expr, sympy.Rational):
        return
    if expr.is_number:
        yield expr
        return
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        const, _ = expr.as_independent(*expr.free_symbols, as_Add=isinstance(expr, sympy.Add))
        if const.is_number and not isinstance(const, sympy.Rational):
            yield const
    for arg in expr.args:
        if not (isinstance(arg, sympy.Expr) and arg.is_number):
            yield from _constant_parts(arg)
        elif not isinstance(expr, (sympy.Add, sympy.Mul)):
            yield arg


def constant_problem(expr: sympy.Expr) -> str | None:
    """Why a constant part of ``expr`` cannot be a float, or None.

    Every subexpression without a variable (``sin(10**300)``, ``sqrt(2)``, ``log(-1)``) is
    evaluated by SymPy exactly, as the kernels print it (one correctly rounded literal), so it
    must be a real number within the float range: ``sqrt(-1)``, ``log(-1)`` and
    ``(-8)**(1/3)`` (SymPy's principal root, 1 + 1.73i) are complex, ``exp(710)`` overflows.
    """
    for node in _constant_parts(expr):
        try:
            value = constant_value(node)
        except (ValueError, TypeError, ArithmeticError, RecursionError):
            return f"the constant {_short(node)} cannot be evaluated to a number"
        if value.imag != 0 and not math.isnan(value.imag):
            return (f"the constant {_short(node)} is not a real number (it is {value.real:.6g}"
                    f"{'+' if value.imag >= 0 else '-'}{abs(value.imag):.6g}i)")
        if math.isnan(value.real) or math.isnan(value.imag):
            return f"the constant {_short(node)} is undefined"
        if not math.isfinite(value.real):
            return f"the constant {_short(node)} is beyond the largest float (about 1.8e308)"
    for number in expr.atoms(sympy.Number):
        try:
            finite = math.isfinite(float(number))
        except OverflowError:
            finite = False
        if not finite:  # exact in SymPy, but no kernel can hold it
            return f"the number {_short(number)} is beyond the largest float (about 1.8e308)"
    return None


class _FormulaText(StrPrinter):
    """SymPy's text with the functions spelled as the formula language spells them."""

    def _print_Max(self, expr):
        return "max(%s)" % ", ".join(self._print(a) for a in expr.args)

    def _print_Min(self, expr):
        return "min(%s)" % ", ".join(self._print(a) for a in expr.args)

    def _print_Abs(self, expr):
        return "abs(%s)" % self._print(expr.args[0])


def formula_text(expr: sympy.Expr) -> str:
    """``expr`` as text :func:`parse_formula` reads back (a spec stores a SymPy activation or
    loss that way); a function outside the formula language keeps SymPy's name, which the
    parser then refuses by name."""
    return _FormulaText().doprint(expr)


class _IndexFormulaText(_FormulaText):
    """Text of an index formula: ``W[k, j]``, ``Sum(body, j)``."""

    def _print_Indexed(self, expr):
        return f"{expr.base.label}[{', '.join(self._print(i_) for i_ in expr.indices)}]"

    def _print_Sum(self, expr):
        names = []
        for limit in expr.limits:
            if len(limit) != 3 or limit[1] != 0:
                raise FormulaError(f"Sum({expr.function}, {limit}): a sum runs over a whole index, from 0 to its "
                                   "extent − 1 (the layer fixes the extent from where the index is used)")
            names.append(self._print(limit[0]))
        over = names[0] if len(names) == 1 else f"({', '.join(names)})"
        return f"Sum({self._print(expr.function)}, {over})"


def index_formula_text(equation: sympy.Eq) -> str:
    """``Eq(z[n, k], …)`` (SymPy) as the text :func:`parse_index_formula` reads; each Sum must
    run from 0 (its upper bound is not kept: the layer takes it from the index's use)."""
    if not isinstance(equation, sympy.Eq) or not isinstance(equation.lhs, sympy.Indexed):
        raise TypeError("a layer formula is text such as 'z[n, k] = Sum(W[k, j]*x[n, j], j) + b[k]', or "
                        f"sympy.Eq(z[n, k], …) with an indexed left-hand side; got {type(equation).__name__}")
    printer = _IndexFormulaText()
    return f"{printer.doprint(equation.lhs)} = {printer.doprint(equation.rhs)}"
