"""What both Numba backends print alike: the SymPy → Numba printer, the table of scalar ops
and their helper functions, statements shared by CSE and stored in a safe order, loop
nests with accumulators and window scans, text made safe for generated source, and the
module header that lists the formulas a module was generated from.  Each backend's
``emit`` registers one printer per IR step and calls these for the parts they share."""

from __future__ import annotations

import functools
import math
import re

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .._version import __version__
from ..indices import as_size, n
from ..lower.chunk import N0
from ..lower.ir import Loop, Nest, WindowArgmax
from ..lower.windows import linear_bounds, numeric
from ..spec import ops
from ..spec.formula import constant_value


def one_line(text: str) -> str:
    """``text`` on one line: its line breaks shown as ``\\n`` (a user's formula may hold some)."""
    return text.replace("\r\n", "\\n").replace("\r", "\\r").replace("\n", "\\n")


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r"}


def docstring(text: str) -> str:
    """``text`` as a triple-quoted string literal whose value is exactly ``text``, whatever it
    holds (it carries users' formulas into generated modules' docstrings).

    A backslash is doubled (``\\x``, ``\\N{…}``, ``\\u12`` or a trailing ``\\`` would otherwise be
    an escape, often a SyntaxError); a quote before another quote or the end is escaped, so
    no ``\"\"\"`` closes the literal early; characters that are not printable (NUL, lone
    surrogates, other line separators) are written as escapes.  Printable text, newlines
    and single quotes stay as they are, readable in the source.
    """
    out = []
    for pos, ch in enumerate(text):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == '"':
            out.append('\\"' if pos + 1 == len(text) or text[pos + 1] == '"' else ch)
        elif ch == "\n" or ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"""' + "".join(out) + '"""'


_EMPTY_ARG = re.compile(r"(?<=[(,]) ?,|, (?=\))|\( (?=\w)")


def tidy_args(src: str) -> str:
    """The glue templates with an empty group of names (no parameters: a fixed feature
    extractor) left no ``f(X, , Z1)``: each empty slot and its comma removed."""
    while True:
        new = _EMPTY_ARG.sub(lambda m: "(" if m.group(0).startswith("(") else "", src)
        if new == src:
            return src
        src = new


def module_header(plan) -> str:
    """The docstring that opens a generated module: the formulas (SymPy) it was generated from."""
    d = plan.d
    lines = [f"symbp-generated module for {d.network.name} ({plan.dtype}); symbp {__version__}.",
             "Do not edit: regenerated from the network spec when it changes.", "", "Formulas (SymPy):"]
    for ld in d.layers:
        # describe() of a custom activation is the user's text, comments included.
        lines.append(f"  layer {ld.index} ({ld.layer.kind}, {one_line(ld.layer.activation.describe())}):")
        lines += [f"    {st.at(st.idx)} = {st.formula}" for st in ld.stages]
        lines += [f"    {ld.a[(n, *ld.out_idx)]} = {ld.output}", f"    {ld.delta[(n, *ld.delta_idx)]} = {ld.delta_formula}"]
        for key, g in ld.grads.items():
            lines.append(f"    dC/d{key}{ld.index} = {g}")
    lines += [f"  loss per sample: {d.loss.per_sample}", f"  dloss/dy[n, p] = {d.loss.grad}"]
    for base, definition in d.loss.definitions.items():
        lines.append(f"    where {base}[n, p] = {definition}")
    lines.append(f"  l2: lambda = {d.network.l2}")
    return docstring("\n".join(lines) + "\n")


# Helpers are written with ``ONE``/``ZERO``/``HALF`` so the same text is float32 in a float32
# module and float64 in a float64 one (a bare 1.0 would promote float32 maths to float64).
# The CUDA backend reuses their text under its own decorator (see HELPER_DECORATOR).
HELPER_DECORATOR = '@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")'
HELPERS = {
    "sigmoid": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def sigmoid(x):
    """σ(x) = 1/(1 + e^-x), evaluated so that e^x never overflows."""
    if x >= ZERO:
        return ONE / (ONE + math.exp(-x))
    e = math.exp(x)
    return e / (ONE + e)
''',
    "tanh32": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def tanh32(x):
    """tanh in float32 as XLA and Eigen compute it: a 13/6-degree rational approximation
    on [-7.905, 7.905] (a few ulp; exactly ±1 beyond), x itself near 0.  It is plain
    arithmetic, so loops over it vectorize, where math.tanh is a scalar libm call."""
    c = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    c2 = c * c
    p = c2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = c2 * p + np.float32(-8.60467152213735e-11)
    p = c2 * p + np.float32(5.12229709037114e-08)
    p = c2 * p + np.float32(1.48572235717979e-05)
    p = c2 * p + np.float32(6.37261928875436e-04)
    p = c2 * p + np.float32(4.89352455891786e-03)
    q = c2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = c2 * q + np.float32(2.26843463243900e-03)
    q = c2 * q + np.float32(4.89352518554385e-03)
    return x if abs(x) < np.float32(0.0004) else c * p / q
''',
    "softplus": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), finite for any x."""
    return max(x, ZERO) + math.log1p(math.exp(-abs(x)))
''',
    "dropout_draw": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def dropout_draw(seed, n, e):
    """A uniform number in [0, 1) for entry e of sample n under ``seed``: SplitMix64's
    finaliser of a counter, the same on every target and in any loop order."""
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(n) * np.uint64(0xD1B54A32D192ED03) + np.uint64(e)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return np.float64(x >> np.uint64(11)) * 1.1102230246251565e-16
''',
    "row_argmax": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def row_argmax(x):
    """np.argmax of a row (its first maximum, or its first NaN), as a loop: a cold start
    compiles it in milliseconds, NumPy's argmax in Numba in a tenth of a second."""
    best, at = x[0], 0
    for i in range(1, x.shape[0]):
        if x[i] > best or (x[i] != x[i] and best == best):
            best, at = x[i], i
    return at
''',
    "relu": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def relu(x):
    """max(x, 0) with a NaN passed on, as PyTorch's relu (x > 0 would make it 0)."""
    return ZERO if x <= ZERO else x
''',
    "maximum": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def maximum(x, y):
    """The larger of x and y, NaN if either is (torch.maximum, np.maximum); Python's max
    keeps whichever argument a comparison with NaN leaves it."""
    return x if x > y or x != x else y
''',
    "minimum": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def minimum(x, y):
    """The smaller of x and y, NaN if either is (torch.minimum, np.minimum)."""
    return x if x < y or x != x else y
''',
    "leaky_relu": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def leaky_relu(x, slope):
    return x if x > ZERO else slope * x
''',
    "elu": '''
@njit(cache=True, inline="always", fastmath=FASTMATH, error_model="numpy")
def elu(x, alpha):
    return x if x > ZERO else alpha * math.expm1(x)
''',
}

#: In float32 modules these replace the entries of SCALAR_OPS (measured: math.tanh costs
#: ~10 ns an element as a libm call; the vectorized tanh32 a small fraction of that).
FLOAT32_OPS = {sp.tanh: "tanh32"}

#: SymPy function -> name in generated code (a ``math`` function or a helper above).
SCALAR_OPS = {
    sp.exp: "math.exp",
    sp.log: "math.log",
    sp.tanh: "math.tanh",
    sp.sinh: "math.sinh",
    sp.cosh: "math.cosh",
    sp.sin: "math.sin",
    sp.cos: "math.cos",
    sp.tan: "math.tan",
    sp.atan: "math.atan",
    sp.asinh: "math.asinh",
    sp.erf: "math.erf",
    sp.Abs: "abs",
    ops.sigmoid: "sigmoid",
    ops.softplus: "softplus",
    ops.relu: "relu",
    ops.leaky_relu: "leaky_relu",
    ops.elu: "elu",
}


FLOAT32_MAX = 3.4028234663852886e38


class NumbaPrinter(PythonCodePrinter):
    """SymPy → Numba scalar code, with literals in the module's float type.

    ``names`` maps SymPy symbols and indexed bases to the code's variable names.
    """

    printmethod = "_numbacode"

    def __init__(self, dtype: str, names: dict, settings=None) -> None:
        super().__init__(settings or {})
        self.dtype = dtype
        self.names = names
        self.helpers_used: set[str] = set()
        self.extents: dict = {}
        self.counter = 0  # numbers the hoisted loop invariants

    def lit(self, value) -> str:
        number = float(value)
        if self.dtype == "float32" and math.isfinite(number) and abs(number) > FLOAT32_MAX:
            shown = str(value) if len(str(value)) <= 24 else f"{number:.6g}"
            raise ValueError(f"the constant {shown} is beyond the float32 range (about 3.4e38): "
                             f"compile the model with dtype='float64'")
        text = repr(number)
        return f"np.float32({text})" if self.dtype == "float32" else text

    def _print(self, expr, **kwargs):
        # A constant formula (sin(10**300), sqrt(2)/2, exp(-1)) is one literal, the value
        # SymPy computes to 30 digits, correctly rounded: the kernel then evaluates the very
        # formula a user prints, not sin of the nearest double of 10**300.
        if isinstance(expr, sp.Expr) and not expr.is_Atom and expr.is_number:
            value = constant_value(expr)
            if value.imag != 0 or not math.isfinite(value.real):
                raise ValueError(f"the constant {expr} is not a finite real number ({value})")
            return self.lit(value.real)
        return super()._print(expr, **kwargs)

    def _print_Integer(self, expr):
        return self.lit(int(expr))

    def _print_Float(self, expr):
        # A Float a user wrote into a SymPy activation (0.3*z**2): its value, never int(0.3).
        return self.lit(float(expr))

    def _print_Rational(self, expr):
        return self.lit(float(expr))

    def _print_NegativeOne(self, expr):
        return self.lit(-1)

    def _print_Half(self, expr):
        return "HALF"

    def _print_One(self, expr):
        return "ONE"

    def _print_Zero(self, expr):
        return "ZERO"

    def _print_Exp1(self, expr):
        return self.lit(float(sp.E))

    def _print_Pi(self, expr):
        return self.lit(float(sp.pi))

    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        return super()._print_Symbol(expr)

    def array(self, base: sp.IndexedBase) -> str:
        """The code name of an indexed base (keyed by label: SymPy may rebuild a base
        without its shape while differentiating)."""
        return self.names.get(str(base.label), str(base.label))

    def _print_Indexed(self, expr):
        # Buffers of images are stored (batch, C·H·W): x[n, c, h, w] reads X[n, (c·H + h)·W + w].
        flat = _flat_index(self, expr)
        if flat is not None:
            return flat
        return "%s[%s]" % (self.array(expr.base), ", ".join(str(i) for i in expr.indices))

    def _print_route(self, expr):
        m, j = expr.args
        return f"(ONE if {self._print(m)} == {j} else ZERO)"

    def _print_dropout_mask(self, expr):
        keep, seed_, l_, n_, e_ = expr.args
        self.helpers_used.add("dropout_draw")
        # Integer arithmetic, printed as such: a target that types constants as floats
        # (the CUDA printer's FT) would round a float32 counter and draw other masks.
        counter = sp.expand(ops.dropout_counter(l_, e_))
        draw = f"dropout_draw({seed_}, {n_}, {counter})"
        return f"({self._print(1 / keep)} if {draw} < {float(keep)!r} else ZERO)"

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if e.is_Integer and 0 < abs(int(e)) <= 4:
            b = self.parenthesize(base, 100)  # atoms stay bare, anything else in parentheses
            prod = "*".join([b] * abs(int(e)))
            if abs(int(e)) > 1:
                prod = f"({prod})"  # x/y**2 must not print as x/y*y
            return prod if e > 0 else f"ONE / {prod}"
        if e == sp.Rational(1, 2):
            return f"math.sqrt({self._print(base)})"
        return "%s ** %s" % (self.parenthesize(base, 100), self.parenthesize(e, 100))

    def _print_Heaviside(self, expr):
        # H(x) is 1 above 0 and 0 below; at 0 it is its second argument: 0 for relu (as
        # PyTorch's relu gradient), ½ from SymPy's d/dx max(x, y) (PyTorch's maximum splits
        # a tie evenly).  Only the exact 0 takes that value.
        x = self._print(expr.args[0])
        at0 = expr.args[1] if len(expr.args) > 1 else sp.S.Half
        if at0 == 0:
            return f"(ONE if {x} > ZERO else ZERO)"
        return f"(ONE if {x} > ZERO else ({self._print(at0)} if {x} == ZERO else ZERO))"

    def _print_Piecewise(self, expr):
        out = self._print(expr.args[-1].expr)
        for e, c in reversed(expr.args[:-1]):
            out = f"({self._print(e)} if {self._print(c)} else {out})"
        return out

    def _print_Relational(self, expr):
        return f"{self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)}"

    def _print_Max(self, expr):
        self.helpers_used.add("maximum")  # NaN-propagating, as PyTorch's max of tensors
        return functools.reduce(lambda a, b: f"maximum({a}, {b})", map(self._print, expr.args))

    def _print_Min(self, expr):
        self.helpers_used.add("minimum")
        return functools.reduce(lambda a, b: f"minimum({a}, {b})", map(self._print, expr.args))

    target = "CPU"
    helpers = HELPERS  # the helper functions this target can emit, by name

    def function_name(self, func) -> str | None:
        """The code name of a SymPy function on this target, or None."""
        return (FLOAT32_OPS.get(func) if self.dtype == "float32" else None) or SCALAR_OPS.get(func)

    def _print_Function(self, expr):
        name = self.function_name(expr.func)
        if name is None:
            raise NotImplementedError(f"no {self.target} kernel for the function {expr.func.__name__} (in {expr})")
        if name in self.helpers:
            self.helpers_used.add(name)
        return "%s(%s)" % (name, ", ".join(self._print(a) for a in expr.args))

    _print_Abs = _print_Function

    def _print_tanh(self, expr):
        # PythonCodePrinter prints known functions itself (math.tanh); float32 modules
        # take the vectorizable helper instead.
        if self.dtype == "float32":
            self.helpers_used.add(FLOAT32_OPS[sp.tanh])
            return f"{FLOAT32_OPS[sp.tanh]}({self._print(expr.args[0])})"
        return f"math.tanh({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(ONE if {x} > ZERO else (-ONE if {x} < ZERO else ZERO))"

    def _print_Sum(self, expr):
        raise NotImplementedError(f"a Sum reached the scalar printer unlowered: {expr}")


def helper_source(names: set[str], helpers: dict | None = None) -> str:
    """The source of the named helpers (this backend's unless ``helpers`` is given)."""
    table = HELPERS if helpers is None else helpers
    return "".join(table[n] for n in sorted(names))


def cse_lines(printer: NumbaPrinter, exprs: list[sp.Expr]) -> tuple[list[str], list[str], list[sp.Expr]]:
    """Print ``exprs`` sharing common subexpressions as named temporaries; also returns
    the reduced expressions (what each printed text reads after the temporaries)."""
    # Real temporaries, as every value in a kernel is: SymPy rebuilds each expression around
    # them, and a function of an argument of unknown sign asks its real and imaginary parts
    # at every level (tanh nested 9 deep: 22 s to rebuild, against milliseconds).
    temps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("t", real=True))
    lines = []
    for sym, value in temps:
        printer.names[sym] = str(sym)
        lines.append(f"{sym} = {printer.doprint(value)}")
    return lines, [printer.doprint(e) for e in reduced], reduced


def bind_statements(stmts: list) -> list[tuple]:
    """The stored statements of a loop nest as ``(target, value)``.

    Every value is a formula in memory as it was when the nest began (running sums see old
    values, as an update's penalty must): a later statement that reads an earlier target sees
    that target's formula (CSE shares it), and :func:`store_lines` writes each array only after
    the last value that reads it.  (Dense stores z = Z + b in the GEMM's own buffer Z; SymPy
    may distribute 2·(Z + b) into 2·Z + 2·b, and Z read after the store counted b twice.)
    (No named local for a read target: one read by a CSE temporary would be printed after it —
    the long fuzz run found ``t0 = elu(v0, ONE)`` before ``v0``.)  Targets that are plain
    symbols are named intermediates: inlined, never stored.
    """
    value_of, stored = {}, []
    for target, expr in stmts:
        expr = expr.xreplace(value_of)
        value_of[target] = expr
        if isinstance(target, sp.Indexed):
            stored.append((target, expr))
    return stored


def store_lines(printer: NumbaPrinter, stored: list, printed: list[str], reduced: list[sp.Expr]) -> list[str]:
    """The lines of the stored statements (from :func:`bind_statements`), in order: each value
    a later one reads goes to its local first, and every array is written only after the
    last value that reads it (an entry of the same array elsewhere) has been computed."""
    arrays = [{str(x.base.label) for x in e.atoms(sp.Indexed)} for e in reduced]
    lines, late = [], []
    for pos, ((target, _), text) in enumerate(zip(stored, printed)):
        label = str(target.base.label)
        if any(label in later for later in arrays[pos + 1:]):
            name = f"v{pos}"
            lines.append(f"{name} = {text}")
            late.append(f"{printer._print(target)} = {name}")
        else:
            lines.append(f"{printer._print(target)} = {text}")
    return lines + late


def extent_text(printer: NumbaPrinter, extent: sp.Expr) -> str:
    """A loop bound: a width constant (D1), the batch size (nb) or a number."""
    return printer.extents.get(extent, str(extent))


def hoist_invariants(exprs: list[sp.Expr], indices: set, printer: NumbaPrinter) -> tuple[list[str], list[sp.Expr]]:
    """Move the loop-invariant parts (lr/(1 − β₁ᵗ), …) out of a loop nest.

    Each maximal subexpression that reads no array and no loop index is computed once,
    before the loops, in the module's float type.
    """
    found: dict = {}

    def visit(e):
        if e.is_Atom or isinstance(e, (sp.Indexed, sp.Idx)):
            return e
        hoistable = isinstance(e, sp.Expr) and not isinstance(e, sp.logic.boolalg.Boolean)
        if hoistable and not (e.free_symbols & indices) and not e.atoms(sp.Indexed):
            if e not in found:
                found[e] = sp.Symbol(f"c{printer.counter}", real=True)
                printer.counter += 1
            return found[e]
        return e.func(*[visit(arg) for arg in e.args])

    out = [visit(e) for e in exprs]
    ft = "np.float32" if printer.dtype == "float32" else "np.float64"
    return [f"{sym} = {ft}({printer.doprint(e)})" for e, sym in found.items()], out


def row_reduction_lines(step, printer: NumbaPrinter, minus_infinity: str) -> list[str]:
    """The per-sample reductions of a :class:`~symbp.lower.ir.RowLoop` (log-sum-exp or plain
    sums over the units) and its running sums, for every target's printer."""
    body = []
    for acc, kind, expr, k, extent in step.reductions:
        printer.names[acc] = str(acc)
        term, ext = printer.doprint(expr), extent_text(printer, extent)
        if kind == "logsumexp":
            # log Σ exp(u) = m + log Σ exp(u − m), m = max u: no overflow for any logits.
            # (max(m, u) written out, as Python computes it: an overload Numba would compile.)
            body += [f"m = {minus_infinity}", f"for {k} in range({ext}):", f"    m = {term} if {term} > m else m",
                     f"{acc} = ZERO", f"for {k} in range({ext}):", f"    {acc} += math.exp({term} - m)",
                     f"{acc} = m + math.log({acc})"]
        else:
            body += [f"{acc} = ZERO", f"for {k} in range({ext}):", f"    {acc} += {term}"]
    for acc, expr in step.row_sums:
        body.append(f"{acc} += {printer.doprint(expr)}")
    return body


def loop_lines(step: Loop, printer: NumbaPrinter) -> list[str]:
    """A :class:`~symbp.lower.ir.Loop` as sequential loops (``prange`` outermost when the step
    asks for threads): its statements bound, hoisted, shared by CSE and stored in order."""
    stored = bind_statements(step.stmts)
    # a running sum over the batch reads each written entry's new value (its formula, shared by CSE)
    value_of = dict(stored)
    adds = [(t, e.xreplace(value_of)) for t, e in step.adds]
    indices = {idx for idx, _ in step.ranges}
    hoisted, exprs = hoist_invariants([e for _, e in step.sums] + [e for _, e in stored] + [e for _, e in adds],
                                      indices, printer)
    lines, printed, reduced = cse_lines(printer, exprs)
    body = list(lines)
    for (acc, _), text in zip(step.sums, printed):
        body.append(f"{acc} += {text}")
    ns, nst = len(step.sums), len(stored)
    body += store_lines(printer, stored, printed[ns:ns + nst], reduced[ns:ns + nst])
    body += [f"{printer._print(t)} += {text}" for (t, _), text in zip(adds, printed[ns + nst:])]
    out, indent = list(hoisted), ""
    for pos, (idx, extent) in enumerate(step.ranges):
        loop = "prange" if step.parallel and pos == 0 else "range"
        out.append(f"{indent}for {idx} in {loop}({extent_text(printer, extent)}):")
        indent += "    "
    return out + [indent + line for line in body]


def _flat_index(printer: NumbaPrinter, expr: sp.Indexed):
    """Buffers of image layers are (batch, C·H·W): x[n, c, h, w] reads X[n, (c·H + h)·W + w]."""
    label = str(expr.base.label)
    shape = printer.flat.get(label) if hasattr(printer, "flat") else None
    if shape is None or len(expr.indices) != len(shape) + 1:
        return None
    if label in getattr(printer, "inner", ()):
        return _inner_index(printer, expr, shape)
    flat = sp.Integer(0)
    for idx, ext in zip(expr.indices[1:], shape):
        flat = flat * ext + idx
    return "%s[%s, %s]" % (printer.array(expr.base), expr.indices[0], sp.expand(flat))


def _inner_index(printer: NumbaPrinter, expr: sp.Indexed, shape: tuple) -> str:
    """A buffer with the batch inside (see :func:`inner_view`): b[n, …, h, w] of a (…, H, W)
    image stored as the rows (…) of a (…, nb·H·W) matrix, entry ((…)·nb + n)·H·W + h·W + w of
    its flat view.  The run's nb is part of the index: a short batch uses the buffer's first
    rows·nb·H·W entries, which its [:nb] slice holds."""
    *outer, h_, w_ = expr.indices[1:]
    row = sp.Integer(0)
    for idx, ext in zip(outer, shape[:-2]):
        row = row * ext + idx
    H, W = shape[-2:]
    n_ = expr.indices[0]
    # a chunk of samples at the head of the buffer (lower/chunk.py): cn of them, from n0 on
    count, at = ("cn", sp.expand(n_ - N0)) if str(expr.base.label) in getattr(printer, "chunked", ()) else ("nb", n_)
    return f"{inner_view(printer.array(expr.base))}[(({sp.expand(row)})*{count} + {at})*{H * W} + {sp.expand(h_ * W + w_)}]"


def inner_view(name: str) -> str:
    """The flat view of a work buffer stored with the batch inside, ``flat(name)`` (its reshape):
    the steps that index it entry by entry bind it first (its GEMMs take the buffer itself)."""
    return f"{name}_flat"


LANES_MAX = 4096  # the most partial sums one accumulator keeps (a row of a large image)


def _sum_loops(printer: NumbaPrinter, expr: sp.Expr, ranges: dict) -> tuple[list[str], sp.Expr]:
    """Each Sum of ``expr`` as an accumulator filled by loops (guards tighten the bounds)."""

    lines = []
    outer = [s_ for s_ in expr.atoms(sp.Sum) if not any(s_ != o and o.has(s_) for o in expr.atoms(sp.Sum))]
    for s_ in sorted(outer, key=str):
        acc = sp.Symbol(f"acc{printer.counter}")
        printer.counter += 1
        printer.names[acc] = str(acc)
        body = s_.function
        cond = sp.true
        inner_ranges = dict(ranges)
        for sym, lo, hi in s_.limits:
            inner_ranges[sym] = (lo, hi)
        body = numeric(body, {}, inner_ranges)
        if isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].expr == 0:
            body, cond = body.args[0].expr, body.args[0].cond
        loops, indent = [], ""
        # sorted: And keeps its arguments in hash order, which differs from process to process
        conds = sorted(sp.And.make_args(cond), key=str) if cond != sp.true else []
        # The batch index outermost: buffers are (batch, …), so the other loops then read
        # each sample's row in order (n innermost strides a whole row per step).
        limits = sorted(s_.limits, key=lambda lim: str(lim[0]) != "n")
        limit_syms = [lim[0] for lim in limits]
        for pos, (sym, lo, hi) in enumerate(limits):
            hi = as_size(hi).xreplace({s2: sp.Symbol("nb") for s2 in hi.free_symbols if s2.name == "N"})
            later = set(limit_syms[pos + 1:])
            usable = [c_ for c_ in conds if sym in c_.free_symbols and not (c_.free_symbols & later)]
            low, high, left = linear_bounds(sym, lo, hi, sp.And(*usable)) if usable else (str(lo), str(hi), [])
            conds = [c_ for c_ in conds if c_ not in usable] + left
            loops.append(f"{indent}for {sym} in range({low}, {high} + 1):")
            indent += "    "
        pre, inner = _sum_loops(printer, body, inner_ranges)
        # (guards tighten the loops above; the lanes take the limits as they are, so no guard)
        lanes_sum = _lane_sum(printer, acc, limits, inner) if not pre and cond == sp.true else None
        if lanes_sum is not None:
            lines += lanes_sum
        else:
            body_lines = pre + [f"{acc} += {printer.doprint(inner)}"]
            if conds:
                body_lines = [f"if {' and '.join(f'({c_})' for c_ in conds)}:"] + ["    " + b_ for b_ in body_lines]
            lines += [f"{acc} = ZERO"] + loops + [indent + b_ for b_ in body_lines]
        expr = expr.xreplace({s_: acc})
    return lines, expr


def _lane_sum(printer: NumbaPrinter, acc: sp.Symbol, limits: list, body: sp.Expr) -> list[str] | None:
    """``acc = Σ body`` over ``limits`` (all from 0, no guard) with one partial sum per value
    of the innermost index (or of the (h, w) pair, run as one index when the buffers read are
    rows): that loop then has no dependency from one step to the next and vectorizes, where
    one running float sum is a chain of adds (fastmath leaves out reassociation) — and the
    partial sums round less.  Measured on the CNN bench's conv bias gradient (8 channels,
    64·24·24 terms each): 0.25 ms one chain, 0.08 ms 24 lanes, 0.026 ms 576 lanes.
    None where this does not apply (the CUDA printer, symbolic or short extents)."""
    if printer.target != "CPU" or any(lo != 0 for _, lo, _ in limits) or not as_size(limits[-1][2]).is_Integer:
        return None
    limits = list(limits)
    if (len(limits) >= 2 and as_size(limits[-2][2]).is_Integer
            and (limits[-2][2] + 1) * (limits[-1][2] + 1) <= LANES_MAX
            and reads_rows(printer, [body], limits[-2][0], limits[-1][0], limits[-1][2] + 1)):
        (h_, _, hh), (w_, _, hw) = limits[-2:]
        limits[-2:] = [(w_, 0, (hh + 1) * (hw + 1) - 1)]
        body = body.xreplace({h_: 0})
    sym, _, hi = limits[-1]
    if not 4 <= int(hi) + 1 <= LANES_MAX:
        return None
    vec, dtype = f"{acc}_lanes", "np.float32" if printer.dtype == "float32" else "np.float64"
    # Zeroed and summed by loops, not np.zeros and .sum(): the same values in the same order,
    # and a cold start does not compile those two NumPy functions (0.1-0.2 s) for them.
    out, indent = [f"{vec} = empty({hi + 1}, {dtype})", f"for {sym} in range({hi + 1}):", f"    {vec}[{sym}] = ZERO"], ""
    for s_, _, h_ in limits:
        extent = as_size(h_) + 1
        extent = extent.xreplace({x: sp.Symbol("nb") for x in extent.free_symbols if x.name == "N"})
        out.append(f"{indent}for {s_} in range({extent}):")
        indent += "    "
    return out + [f"{indent}{vec}[{sym}] += {printer.doprint(body)}", f"{acc} = ZERO",
                  f"for {sym} in range({hi + 1}):", f"    {acc} += {vec}[{sym}]"]


def reads_rows(printer: NumbaPrinter, exprs: list, h_, w_, ew) -> bool:
    """Whether ``exprs`` use h, w only as the last two indices ``[…, h, w]`` of flat buffers
    with rows of ``ew`` entries, so that the pair can run as one index over H·W."""
    accesses = set().union(*(x_.atoms(sp.Indexed) for x_ in exprs))
    for t in accesses:
        if not ({h_, w_} & t.free_symbols):
            continue
        shape = printer.flat.get(str(t.base.label)) if hasattr(printer, "flat") else None
        if shape is None or len(t.indices) != len(shape) + 1 or t.indices[-1] != w_ or t.indices[-2] != h_ or shape[-1] != ew:
            return False
    # (the accesses become a fresh symbol, not 0: a guard or Sum around them must not
    # simplify away and hide its own use of h, w)
    bare = [x_.xreplace({t: sp.Dummy(real=True) for t in accesses}) for x_ in exprs]
    return not any(x_.has(sp.Sum, sp.Piecewise) or b_.has(h_, w_) for x_, b_ in zip(exprs, bare))


def nest_statements(step: Nest, printer: NumbaPrinter) -> list[str]:
    """The statements of one entry of a Nest (its Sums as accumulator loops, a zero-else
    guard as a conditional expression), for every target's printer."""
    ranges = {idx: (0, ext - 1) for idx, ext in step.ranges}
    body = []
    for target, expr in step.stmts:
        pre, expr = _sum_loops(printer, expr, ranges)
        body += pre
        if isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].expr == 0:
            test = " and ".join(f"({c_})" for c_ in sorted(sp.And.make_args(expr.args[0].cond), key=str))
            value = f"({printer.doprint(expr.args[0].expr)} if {test} else ZERO)"
        else:
            value = printer.doprint(expr)
        body.append(f"{printer._print(target)} {'+=' if step.accumulate else '='} {value}")
    return body


#: A window of at most this many entries is scanned unrolled on the CPU (see window_scan).
UNROLL_WINDOW = 16


def window_entry(pre: list, value: sp.Expr, at: dict, printer: NumbaPrinter, indent: str, poison: str | None) -> list[str]:
    """The lines that visit one window entry (its indices fixed by ``at``): each stage
    computed there (``pre``) into a local and stored, then ``val``, the entry's value, read
    from those locals, and ``poison`` (if named) += 0·val."""
    lines, local = [], {}
    for k, (target, expr) in enumerate(pre):
        name, here = f"pre{k}", target.xreplace(at)
        lines += [f"{indent}{name} = {printer.doprint(expr.xreplace(at).xreplace(local))}",
                  f"{indent}{printer._print(here)} = {name}"]
        local[here] = sp.Symbol(name)
        printer.names[local[here]] = name
    lines += [f"{indent}val = {printer.doprint(value.xreplace(at).xreplace(local))}"]
    return lines + ([f"{indent}{poison} += ZERO * val"] if poison else [])


def window_scan(step: WindowArgmax, printer: NumbaPrinter, minus_infinity: str) -> list[str]:
    """The scan of one output entry's window (every target prints it this way).

    ``minus_infinity`` must be a constant of the kernels' float type: a float64 ``-np.inf``
    makes ``best`` float64 and every comparison a conversion (measured 12× slower on a 2×2
    max pool, float32).

    Strictly greater: on ties the first maximum in row-major window order keeps the gradient,
    as in PyTorch.  The maximum gets Σ 0·val added, 0 unless the window holds a NaN or an
    infinity, then NaN, as the route-sum Σ route·val it replaces gave: a NaN anywhere in the
    window reaches the loss, whose check stops the step.  (``or val != val`` in the test would
    say so too, but its branch measured 9× slower than this.)  A stage computed in the scan
    (``step.pre``, see lower/elide.py): each entry's value in a local, stored, and the
    window's value read from the local, not memory.  On the CPU a small window is unrolled,
    its positions constants: no loops of two, no counter (LLVM then turns the tests into
    selects)."""
    keep = step.max_target is not None
    entries = 1
    for _, extent in step.window:
        entries *= int(extent)
    unroll = printer.target == "CPU" and entries <= UNROLL_WINDOW
    body = [f"best = {minus_infinity}", "arg = 0"] + ([] if unroll else ["pos = 0"]) + (["poison = ZERO"] if keep else [])

    def entry(indent: str, at: dict, pos: str) -> list[str]:
        lines = window_entry(step.pre, step.value, at, printer, indent, "poison" if keep else None)
        return lines + [f"{indent}if val > best:", f"{indent}    best = val", f"{indent}    arg = {pos}"]

    if unroll:
        positions = [{}]
        for idx, extent in step.window:  # row-major: the last index fastest
            positions = [{**p, idx: sp.Integer(v)} for p in positions for v in range(int(extent))]
        for pos, at in enumerate(positions):
            body += entry("", at, str(pos))
    else:
        inner = ""
        for idx, extent in step.window:
            body.append(f"{inner}for {idx} in range({extent}):")
            inner += "    "
        body += entry(inner, {}, "pos") + [f"{inner}pos += 1"]
    body.append(f"{printer._print(step.target)} = arg")
    if keep:
        body.append(f"{printer._print(step.max_target)} = best + poison")
    return body
