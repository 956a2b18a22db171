"""One notation, three printers: Unicode text, LaTeX and presentation MathML.

Everything :mod:`symbp.read.explain`, :mod:`symbp.read.walkthrough` and :mod:`symbp.read.report` show is a
SymPy expression taken from a :class:`~symbp.derive.Derivation`; the printers here only
choose how it reads.  Each subclasses one of SymPy's printers and adds the same handful of
``_print_<Class>`` methods, so a symbol reads alike in all three:

=====================  ===================  ==========================  =========================
SymPy object           text                 LaTeX                       MathML
=====================  ===================  ==========================  =========================
``W1[i, j]``           ``W1[i,j]``          ``W^{(1)}_{ij}``            W with ⁽¹⁾ and ᵢⱼ
``delta2[n, p]``       ``δ2[n,p]``          ``\\delta^{(2)}_{np}``       δ with ⁽²⁾ and ₙₚ
``Sum(f, (j, 0, d-1))``  ``Σ_j f``          ``\\sum_{j=0}^{d_0-1} f``    ∑ with both limits
``KroneckerDelta(i,p)``  ``δ_ip``           ``\\delta_{ip}``             δ with ᵢₚ
``Heaviside(z, 0)``    ``H(z)``             ``H(z)``                    H(z)
``Partial(C, W[p,q])``   ``∂C/∂W[p,q]``     ``\\frac{\\partial C}{…}``    a fraction of ∂s
=====================  ===================  ==========================  =========================

The few nodes defined here (:class:`Partial`, :class:`Prime`, :class:`Pre`, :class:`Vec`,
:class:`MatVec`, :class:`Outer`) are labels and vector-form notation: they are printed,
never differentiated or evaluated.  :func:`arrange` orders the terms of sums and the
factors of products the way a textbook writes them (``Σ_j W[i,j]·x[n,j] + b[i]``,
``a·(1 − a)``, ``y − t``) without changing the expression's value.
"""

from __future__ import annotations

import re
from xml.dom.minidom import Element

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.mathml import MathMLPresentationPrinter
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.str import StrPrinter

from ..indices import nonnegative_gap
from ..spec import ops


def _basic(expr):
    """A SymPy object for a printer: formulas already are; a bare number becomes one.
    (Only internal objects reach the printers: no text is ever parsed here.)"""
    return expr if isinstance(expr, sp.Basic) else sp.Number(expr)

__all__ = [
    "MathMLPrinter", "LatexPrinter_", "MatVec", "Outer", "Partial", "Pre", "Prime", "TextPrinter", "Vec",
    "arrange", "latex", "mathml", "text",
]


# --------------------------------------------------------------------------------------------
# Notation nodes
# --------------------------------------------------------------------------------------------
class _Node(sp.Expr):
    """An unevaluated, commutative notation node (printed, never simplified)."""

    is_commutative = True

    def __new__(cls, *args, **kwargs):  # evaluate= and friends are accepted and ignored
        return sp.Expr.__new__(cls, *map(sp.sympify, args))

    def _eval_is_extended_real(self):
        return True


class Partial(_Node):
    """∂f/∂x as a label: ``Partial(C, W1[p, q])`` prints ∂C/∂W1[p,q]."""


class Prime(_Node):
    """f′(arg): ``Prime(Symbol("sigma"), z)`` prints σ′(z); the name is a Symbol."""


class Pre(_Node):
    """The pre-activation of a named unit: ``Pre(h_1)`` prints z_h₁."""


class Vec(_Node):
    """A layer's quantity as a whole vector or matrix (vector form): ``Vec(Symbol("delta1"))``
    prints δ1; with a sample index, ``Vec(Symbol("x"), n)`` prints x[n] (one sample's vector)."""

    @property
    def label(self) -> str:
        return self.args[0].name

    @property
    def sample(self):
        return self.args[1] if len(self.args) > 1 else None


class Iverson(_Node):
    """The Iverson bracket of an index range, ``Iverson(lo, x, hi)``: [lo ≤ x ≤ hi], 1 where it
    holds and 0 elsewhere (``-oo``/``oo`` for a missing bound).  :func:`arrange` writes a
    derivation's range guard ``Piecewise((e, cond), (0, True))`` as ``e·[…]·[…]``."""


class MatVec(_Node):
    """``MatVec(M, v, 1)`` prints Mᵀ·v (``0``: M·v)."""


class Outer(_Node):
    """``Outer(u, v)`` prints u·vᵀ."""


_TENSOR_NODES = (Vec, MatVec, Outer)


def is_tensor(expr) -> bool:
    """True for a vector/matrix-valued expression of the vector form."""
    return isinstance(expr, sp.Basic) and expr.has(*_TENSOR_NODES)


# --------------------------------------------------------------------------------------------
# Textbook order of terms and factors
# --------------------------------------------------------------------------------------------
_SCALAR_NAMES = re.compile(r"^(N|lambda|d_\d+|eta|lr)$")


def _weight(term) -> int:
    """How many tensor quantities a term involves: more goes first (Σ W·x before b)."""
    count = 0
    for node in sp.preorder_traversal(term):
        if isinstance(node, (sp.Indexed, Vec, Pre, Partial)):
            count += 1
        elif isinstance(node, sp.Symbol) and not _SCALAR_NAMES.match(node.name):
            count += 1
    return count


def _natural(term) -> list:
    """w₉ before w₁₁: numbers in names compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(term)) if part]


def _negative(term) -> bool:
    if term.is_Number:
        return bool(term < 0)
    return bool(term.is_Mul and term.args[0].is_Number and term.args[0] < 0)


def _factor_rank(f) -> float:
    if f.is_Number:
        return 0
    if f.is_Pow and f.exp.is_Number and f.exp < 0:
        return 9  # denominators: printed below the line wherever they stand
    base = f.base if f.is_Pow else f
    if isinstance(base, sp.Symbol):
        if _SCALAR_NAMES.match(base.name):
            return 1
        return 1.9 if base.name.startswith("w_") else 2  # the scalar view's weights: w₅·h₁, as W·x
    if isinstance(base, (sp.Indexed, Vec, Pre)):
        return 2
    if isinstance(base, sp.KroneckerDelta):
        return 1.5  # δ_ip·x[n,q]: the selector first
    if isinstance(base, (Iverson, ops.route)):
        return 3.5  # a range guard or a max's router after the quantities it selects
    if isinstance(base, (Partial, Prime)):
        return 3
    if isinstance(base, sp.Function):
        return 3
    if isinstance(base, sp.Add):
        return 4
    return 5  # sums, matrix products: last, so that nothing follows them ambiguously


def _index_symbols() -> tuple:
    from .. import indices

    return tuple(getattr(indices, name) for name in "pqrsijnkchwuve")


def _range_brackets(cond) -> list | None:
    """``cond`` (a conjunction of linear inequalities in the index symbols) as Iverson
    brackets, the two bounds of one index expression merged: ``[0 ≤ r − S·h ≤ kh − 1]``.
    None when a part is not such an inequality."""
    order = _index_symbols()
    bounds: dict = {}
    for rel in sp.And.make_args(cond):
        gap = nonnegative_gap(rel)  # gap >= 0
        if gap is None:
            return None
        if not gap.free_symbols or not all(x.is_integer for x in gap.free_symbols):
            return None
        varying = sp.Add(*[t for t in sp.Add.make_args(gap) if t.has(*order)])
        if varying == 0:
            return None
        rest = gap - varying
        lead = next((x for x in order if varying.has(x)), None)
        sign = 1 if sp.expand(varying).coeff(lead).could_extract_minus_sign() is False else -1
        x = sp.expand(sign * varying)
        lo, hi = bounds.get(x, (-sp.oo, sp.oo))
        if sign == 1:  # x + rest >= 0
            lo = -rest if lo == -sp.oo else sp.Max(lo, -rest)
        else:  # rest - x >= 0
            hi = rest if hi == sp.oo else sp.Min(hi, rest)
        bounds[x] = (lo, hi)
    return [Iverson(lo, x, hi) for x, (lo, hi) in sorted(bounds.items(), key=lambda item: str(item[0]))]


def _guard_as_brackets(expr):
    """``Piecewise((e, cond), (0, True))`` over index ranges → ``e·[cond]`` (same value), or None."""
    if not (isinstance(expr, sp.Piecewise) and len(expr.args) == 2 and expr.args[1].cond == sp.true
            and expr.args[1].expr == 0):
        return None
    brackets = _range_brackets(expr.args[0].cond)
    if brackets is None:
        return None
    return sp.Mul(*sp.Mul.make_args(expr.args[0].expr), *brackets, evaluate=False)


def arrange(expr):
    """``expr`` with sums and products rebuilt, unevaluated, in textbook order.

    Terms: positive before negative, then the one with more tensor quantities first
    (``Σ_j W[i,j]·x[n,j] + b[i]``, ``1 − a²``, ``y − t``).  Factors: numbers, scalar
    symbols, quantities, functions, parenthesised sums, then Σs.  Ties keep SymPy's order.
    Print the result with ``order="none"`` (the printers here do).
    """
    if not isinstance(expr, sp.Basic) or expr.is_Atom or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    bracketed = _guard_as_brackets(expr)
    if bracketed is not None:
        expr = bracketed
    if isinstance(expr, sp.Add):
        terms = [arrange(t) for t in expr.as_ordered_terms()]
        return sp.Add._from_args(sorted(terms, key=lambda t: (_negative(t), -_weight(t), _natural(t))))
    args = [arrange(a) for a in expr.args]
    if isinstance(expr, sp.Mul):
        ordered = sorted(args, key=_factor_rank)
        return sp.Mul._from_args(ordered)
    try:
        return expr.func(*args, evaluate=False)
    except TypeError:
        return expr.func(*args)


def _signed_sum(printer, first: str, rest) -> str:
    """``first`` then each further term as ``+ t`` or ``- |t|`` (both printers write sums so)."""
    out = [first]
    for term in rest:
        if _negative(term):
            out.append("- " + printer.parenthesize(_negate(term), PRECEDENCE["Add"]))
        else:
            out.append("+ " + printer.parenthesize(term, PRECEDENCE["Add"], strict=True))
    return " ".join(out)


def _negate(term):
    """−term, keeping the arranged order of a product."""
    if term.is_Mul and term.args[0].is_Number:
        c, rest = -term.args[0], list(term.args[1:])
        if c == 1:
            return rest[0] if len(rest) == 1 else sp.Mul._from_args(rest)
        return sp.Mul._from_args([c] + rest)
    return -term


def _mul_parts(expr) -> tuple[bool, list, list]:
    """(negative, numerator factors, denominator factors) of a product, order kept.  A lone
    power with a negative exponent (SymPy keeps 1/x² a Pow, not a Mul) is a one-factor product."""
    factors = list(expr.args) if expr.is_Mul else [expr]
    negative = False
    if factors and factors[0].is_Number and factors[0] < 0:
        negative = True
        factors[0] = -factors[0]
    numer, denom = [], []
    for f in factors:
        if f is sp.S.One:
            continue
        if f.is_Rational and not f.is_Integer:
            if f.p != 1:
                numer.append(sp.Integer(f.p))
            denom.append(sp.Integer(f.q))
        elif f.is_Pow and f.exp.is_Number and f.exp < 0:
            denom.append(f.base if f.exp == -1 else sp.Pow(f.base, -f.exp, evaluate=False))
        else:
            numer.append(f)
    return negative, numer, denom


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
_LAYERED = re.compile(r"^(delta|W|b|z|a|xpad|gxpad|gy|y|m|g)(\d+)$")
_SUBSCRIPTED = re.compile(r"^([A-Za-z]+)_(\d+)$")
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
_SUP = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_UNICODE = {"delta": "δ", "lambda": "λ", "ell": "ℓ", "sigma": "σ", "eta": "η", "xpad": "x̃", "gxpad": "gx̃",
            "theta": "θ", "alpha": "α", "beta": "β", "gamma": "γ", "eps": "ε"}
_LATEX = {"delta": r"\delta", "lambda": r"\lambda", "ell": r"\ell", "sigma": r"\sigma", "eta": r"\eta", "eps": r"\epsilon",
          "xpad": r"\tilde{x}", "gxpad": r"{g_{\tilde{x}}}", "gy": r"{g_{y}}",
          "softmax": r"\operatorname{softmax}", "tanh": r"\tanh"}
_ACTIVATION_NAMES = {"sigmoid": "sigma"}  # activation name -> the letter its derivative reads with


_SYMPY_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
                "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"}
_GREEK_INDEXED = re.compile(r"^(theta|alpha|beta|gamma|eps)(\d+)$")  # an optimizer's beta1, beta2


def word_parts(name: str) -> tuple[str, str, str] | None:
    """How a multi-letter symbol name reads, as (head, separator, tail): ``beta1`` → β with
    subscript 1 (``"_"``), ``exp_avg`` → one upright word (``"word"``), ``theta_decayed`` →
    θ with the word ``decayed`` as subscript (``"_word"``); None for every other name (the
    printers' own rules: ``d_1``, single letters, names SymPy knows)."""
    m = _GREEK_INDEXED.match(name)
    if m:
        return _UNICODE[m.group(1)], "_", m.group(2)
    head, sep, tail = name.partition("_")
    if not sep or len(head) < 2 or tail.isdigit():
        return None
    if head in _UNICODE:
        return head, "_word", tail
    return name, "word", ""


def is_word(expr) -> bool:
    """A symbol whose name is a word of several letters (``lr``, ``exp_avg``, ``momentum``):
    next to another factor it needs a visible ·, or ``lr exp_avg`` reads ``lrexp_avg``."""
    if not isinstance(expr, sp.Symbol) or len(expr.name) < 2 or expr.name in _UNICODE or expr.name in _LATEX:
        return False
    parts = word_parts(expr.name)
    if parts is not None:
        return parts[1] == "word"
    return expr.name.isalpha() and expr.name.lower() not in _SYMPY_GREEK


def split_label(label: str) -> tuple[str, int | None]:
    """``"delta2"`` → ``("delta", 2)``; ``"x"`` → ``("x", None)``."""
    m = _LAYERED.match(label)
    return (m.group(1), int(m.group(2))) if m else (label, None)


def _label_of(base) -> str:
    return str(base.label) if isinstance(base, sp.IndexedBase) else str(base)


def _compound(expr) -> bool:
    """Whether ∂(expr)/∂x would need parentheses: write ∂/∂x (expr) instead."""
    return isinstance(expr, (sp.Add, sp.Mul, sp.Sum, sp.Pow))


def _has_superscript(expr) -> bool:
    """A layer quantity (a⁽¹⁾ₙₚ) already carries a superscript: a power needs parentheses."""
    if isinstance(expr, sp.Indexed):
        return split_label(_label_of(expr.base))[1] is not None
    return isinstance(expr, Vec) and split_label(expr.label)[1] is not None


# --------------------------------------------------------------------------------------------
# Unicode text
# --------------------------------------------------------------------------------------------
class TextPrinter(StrPrinter):
    """Compact Unicode: ``Σ_j W1[i,j]·x[n,j] + b1[i]``, ``δ2[n,p]``, ``d₁``, ``a1[n,p]²``."""

    printmethod = "_symbp_text"  # not _sympystr: Indexed's own would bypass the methods below
    _default_settings = {**StrPrinter._default_settings, "order": "none"}

    def doprint(self, expr):
        return super().doprint(arrange(_basic(expr)))

    def _print_Symbol(self, expr):
        name = expr.name
        if name in _UNICODE:
            return _UNICODE[name]
        m = _SUBSCRIPTED.match(name)
        if m:
            return _UNICODE.get(m.group(1), m.group(1)) + m.group(2).translate(_SUB)
        parts = word_parts(name)
        if parts is not None:
            head, kind, tail = parts
            if kind == "_":
                return head + tail.translate(_SUB)
            return _UNICODE[head] + "_" + tail if kind == "_word" else head
        return name

    def _print_IndexedBase(self, expr):
        name, layer = split_label(_label_of(expr))
        return _UNICODE.get(name, name) + ("" if layer is None else str(layer))

    def _print_Indexed(self, expr):
        base = self._print(expr.base)
        if _label_of(expr.base) == "ell" and len(expr.indices) == 1:
            return "%s_%s" % (base, self._print(expr.indices[0]))
        return "%s[%s]" % (base, ",".join(self._print(i) for i in expr.indices))

    def _print_Sum(self, expr):
        idx = ",".join(self._print(lim[0]) for lim in reversed(expr.limits))
        return "Σ_%s %s" % (idx, self.parenthesize(expr.function, PRECEDENCE["Mul"], strict=True))

    def _print_Add(self, expr, order=None):
        terms = list(expr.args)
        return _signed_sum(self, self.parenthesize(terms[0], PRECEDENCE["Add"], strict=True), terms[1:])

    def _product(self, factors) -> str:
        scalars = [f for f in factors if not is_tensor(f)]
        tensors = [f for f in factors if is_tensor(f)]
        parts = [self.parenthesize(f, PRECEDENCE["Mul"], strict=True) for f in scalars]
        if len(tensors) > 1:
            parts.append(" ⊙ ".join(self._hadamard_factor(f) for f in tensors))
        else:
            parts += [self.parenthesize(f, PRECEDENCE["Mul"], strict=True) for f in tensors]
        return "·".join(parts)

    def _hadamard_factor(self, f) -> str:
        if isinstance(f, (MatVec, Outer)):
            return "(%s)" % self._print(f)
        return self.parenthesize(f, PRECEDENCE["Mul"])

    def _print_Mul(self, expr):
        negative, numer, denom = _mul_parts(expr)
        text = self._product(numer) if numer else "1"
        if denom:
            below = self._product(denom)
            if len(denom) > 1 or denom[0].is_Mul:
                below = "(" + below + ")"  # a sum is already in parentheses
            text = text + "/" + below
        return ("-" if negative else "") + text

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if e.is_Number and e < 0:
            return self._print_Mul(sp.Mul._from_args([expr]))
        b = self.parenthesize(base, PRECEDENCE["Pow"], strict=False)
        if isinstance(base, (sp.Function, sp.Indexed)) or base.is_Atom:
            b = self._print(base)
        if e.is_Integer and 1 < int(e) < 10:
            return b + str(int(e)).translate(_SUP)
        if e == sp.S.Half:
            return ("√%s" if base.is_Atom else "√(%s)") % self._print(base)
        return "%s^%s" % (b, self.parenthesize(e, PRECEDENCE["Pow"], strict=False))

    def _print_sigmoid(self, expr):
        return "σ(%s)" % self._print(expr.args[0])

    def _print_Abs(self, expr):
        return "|%s|" % self._print(expr.args[0])

    def _print_Pi(self, expr):
        return "π"

    def _print_Max(self, expr):
        return "max(%s)" % ", ".join(self._print(a) for a in expr.args)

    def _print_Min(self, expr):
        return "min(%s)" % ", ".join(self._print(a) for a in expr.args)

    def _print_Heaviside(self, expr):
        return "H(%s)" % self._print(expr.args[0])

    def _print_KroneckerDelta(self, expr):
        if all(isinstance(a, sp.Symbol) for a in expr.args):
            return "δ_%s%s" % tuple(self._print(a) for a in expr.args)
        return "δ(%s, %s)" % tuple(self._print(a) for a in expr.args)

    def _print_Iverson(self, expr):
        lo, x, hi = expr.args
        parts = ([self._print(lo)] if lo != -sp.oo else []) + [self._print(x)] + ([self._print(hi)] if hi != sp.oo else [])
        return "[%s]" % " ≤ ".join(parts)

    def _print_route(self, expr):
        m, j = expr.args
        return "[%s = %s]" % (self._print(j), self._print(m))

    def _print_window_argmax(self, expr):
        value, *limits = expr.args
        return "argmax_%s %s" % (",".join(self._print(lim[0]) for lim in limits), self._print(value))

    def _print_Piecewise(self, expr):
        parts = [f"{self._print(e)} if {self._print(c)}" for e, c in expr.args[:-1]]
        return "{" + "; ".join(parts + [f"{self._print(expr.args[-1].expr)} otherwise"]) + "}"

    def _print_Partial(self, expr):
        f, x = expr.args
        if _compound(f):
            return "∂/∂%s (%s)" % (self._print(x), self._print(f))
        return "∂%s/∂%s" % (self._print(f), self._print(x))

    def _print_Prime(self, expr):
        name, arg = expr.args
        return "%s′(%s)" % (self._print(name), self._print(arg))

    def _print_Pre(self, expr):
        return "z_" + self._print(expr.args[0])

    def _print_Vec(self, expr):
        name = self._print_IndexedBase(sp.IndexedBase(expr.label))
        return name if expr.sample is None else "%s[%s]" % (name, self._print(expr.sample))

    def _print_MatVec(self, expr):
        m, v, t = expr.args
        return "%s%s·%s" % (self._print(m), "ᵀ" if t else "", self.parenthesize(v, PRECEDENCE["Mul"], strict=True))

    def _print_Outer(self, expr):
        u, v = expr.args
        return "%s·%sᵀ" % (self._print(u), self._print(v))


# --------------------------------------------------------------------------------------------
# LaTeX
# --------------------------------------------------------------------------------------------
def _latex_name(name: str) -> str:
    if name in _LATEX:
        return _LATEX[name]
    if len(name) == 1:
        return name
    return r"\operatorname{%s}" % name.replace("_", r"\_")


class LatexPrinter_(LatexPrinter):  # noqa: N801 - SymPy's LatexPrinter, with symbp's notation
    r"""LaTeX in textbook notation: ``W^{(1)}_{ij}``, ``\delta^{(2)}_{np}``, ``\sigma'(z)``."""

    _default_settings = {**LatexPrinter._default_settings, "order": "none"}

    def doprint(self, expr):
        return super().doprint(arrange(_basic(expr)))

    def _indices(self, indices) -> str:
        printed = [self._print(i) for i in indices]
        single = all(isinstance(i, sp.Symbol) and len(i.name) == 1 for i in indices)
        return ("" if single else ",").join(printed)

    def _print_IndexedBase(self, expr, sample=None):
        name, layer = split_label(_label_of(expr))
        out = _latex_name(name)
        return out if layer is None else "%s^{(%d)}" % (out, layer)

    def _print_Indexed(self, expr):
        base = self._print_IndexedBase(expr.base)
        return "%s_{%s}" % (base, self._indices(expr.indices))

    def _print_Symbol(self, expr, style="plain"):
        if expr.name in _LATEX:
            return _LATEX[expr.name]
        parts = word_parts(expr.name)
        if parts is not None and parts[1] != "_":  # beta1: SymPy's own \beta_{1}
            head, kind, tail = parts
            word = r"\mathrm{%s}" % (tail if kind == "_word" else head).replace("_", r"\_")
            return r"\%s_{%s}" % (head, word) if kind == "_word" else word
        if is_word(expr):  # lr: one upright word, not the product l·r
            return r"\mathrm{%s}" % expr.name
        return super()._print_Symbol(expr, style=style)

    def _print_Add(self, expr, order=None):
        terms = list(expr.args)
        return _signed_sum(self, self._print(terms[0]), terms[1:])

    def _product(self, factors) -> str:
        scalars = [f for f in factors if not is_tensor(f)]
        tensors = [f for f in factors if is_tensor(f)]
        parts = []
        for pos, f in enumerate(scalars):
            text = self.parenthesize(f, PRECEDENCE["Mul"], strict=True)
            if pos and (f.is_Number or is_word(f) or is_word(scalars[pos - 1])):
                parts.append(r"\cdot")
            parts.append(text)
        if len(tensors) > 1:
            parts.append(r" \odot ".join(
                r"\left(%s\right)" % self._print(f) if isinstance(f, (MatVec, Outer)) else self.parenthesize(f, PRECEDENCE["Mul"])
                for f in tensors))
        else:
            parts += [self.parenthesize(f, PRECEDENCE["Mul"], strict=True) for f in tensors]
        return " ".join(parts)

    def _print_Mul(self, expr):
        negative, numer, denom = _mul_parts(expr)
        text = self._product(numer) if numer else "1"
        if denom:
            below = self._print(denom[0]) if len(denom) == 1 else self._product(denom)
            if any(isinstance(f, Partial) for f in numer):  # no fraction inside a fraction: 1/N in front
                text = r"\frac{1}{%s} %s" % (below, text)
            else:
                if len(numer) == 1:
                    text = self._print(numer[0])
                text = r"\frac{%s}{%s}" % (text, below)
        return ("- " if negative else "") + text

    def _print_Pow(self, expr):
        base, e = expr.args
        if e.is_Number and e < 0:
            return self._print_Mul(sp.Mul._from_args([expr]))
        if isinstance(base, sp.Function) and e.is_Integer:
            return r"%s^{%s}" % (self.parenthesize(base, PRECEDENCE["Pow"], strict=True), self._print(e))
        if _has_superscript(base):
            return r"\left(%s\right)^{%s}" % (self._print(base), self._print(e))
        return super()._print_Pow(expr)

    def _print_Sum(self, expr):
        tex = ""
        for var, lo, hi in reversed(expr.limits):
            tex += r"\sum_{%s=%s}^{%s} " % (self._print(var), self._print(lo), self._print(hi))
        return tex + self.parenthesize(expr.function, PRECEDENCE["Mul"], strict=True)

    def _print_sigmoid(self, expr, exp=None):
        tex = r"\sigma\left(%s\right)" % self._print(expr.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)

    def _print_Heaviside(self, expr, exp=None):
        tex = r"H\left(%s\right)" % self._print(expr.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)

    def _print_Function(self, expr, exp=None):
        name = type(expr).__name__
        if hasattr(self, "_print_" + name) or name in ("exp", "log", "tanh", "cosh", "sinh", "sin", "cos", "tan"):
            return super()._print_Function(expr, exp)
        args = ", ".join(self._print(a) for a in expr.args)
        tex = r"%s\left(%s\right)" % (_latex_name(name), args)
        return tex if exp is None else r"%s^{%s}" % (tex, exp)

    def _print_KroneckerDelta(self, expr, exp=None):
        return r"\delta_{%s}" % self._indices(expr.args)

    def _print_Iverson(self, expr):
        lo, x, hi = expr.args
        parts = ([self._print(lo)] if lo != -sp.oo else []) + [self._print(x)] + ([self._print(hi)] if hi != sp.oo else [])
        return r"\left[%s\right]" % r" \le ".join(parts)

    def _print_route(self, expr, exp=None):
        m, j = expr.args
        return r"\left[%s = %s\right]" % (self._print(j), self._print(m))

    def _print_window_argmax(self, expr, exp=None):
        value, *limits = expr.args
        idx = ",".join(self._print(lim[0]) for lim in limits)
        return r"\operatorname*{argmax}_{%s} %s" % (idx, self._print(value))

    def _print_Piecewise(self, expr):
        rows = [r"%s & \text{if } %s" % (self._print(e), self._print(c)) for e, c in expr.args[:-1]]
        rows.append(r"%s & \text{otherwise}" % self._print(expr.args[-1].expr))
        return r"\begin{cases} %s \end{cases}" % r" \\ ".join(rows)

    def _print_Partial(self, expr):
        f, x = expr.args
        if _compound(f):
            return r"\frac{\partial}{\partial %s} \left(%s\right)" % (self._print(x), self._print(f))
        return r"\frac{\partial %s}{\partial %s}" % (self._print(f), self._print(x))

    def _print_Prime(self, expr):
        name, arg = expr.args
        return r"%s'\left(%s\right)" % (_latex_name(name.name), self._print(arg))

    def _print_Pre(self, expr):
        return "z_{%s}" % self._print(expr.args[0])

    def _print_Vec(self, expr, transpose=False):
        name, layer = split_label(expr.label)
        sup = ([f"({layer})"] if layer is not None else []) + ([r"\top"] if transpose else [])
        out = _latex_name(name)
        if expr.sample is not None:
            out += "_{%s}" % self._print(expr.sample)
        return out + ("^{%s}" % " ".join(sup) if sup else "")

    def _print_MatVec(self, expr):
        m, v, t = expr.args
        left = self._print_Vec(m, transpose=bool(t)) if isinstance(m, Vec) else self._print(m)
        return "%s %s" % (left, self.parenthesize(v, PRECEDENCE["Mul"], strict=True))

    def _print_Outer(self, expr):
        u, v = expr.args
        right = self._print_Vec(v, transpose=True) if isinstance(v, Vec) else r"\left(%s\right)^{\top}" % self._print(v)
        return "%s %s" % (self._print(u), right)


# --------------------------------------------------------------------------------------------
# Presentation MathML
# --------------------------------------------------------------------------------------------
class MathMLPrinter(MathMLPresentationPrinter):
    """Presentation MathML (browsers render it natively) in the same notation as
    :class:`LatexPrinter_`: ``<msubsup>`` for W⁽¹⁾ᵢⱼ, ``<munderover>`` for Σ with limits."""

    _default_settings = {**MathMLPresentationPrinter._default_settings, "order": "none"}

    def doprint(self, expr):
        return super().doprint(arrange(_basic(expr)))

    # -- helpers -----------------------------------------------------------------------
    def _el(self, tag: str, *children, text: str | None = None, **attrs) -> Element:
        el = self.dom.createElement(tag)
        for key, value in attrs.items():
            el.setAttribute(key, value)
        if text is not None:
            el.appendChild(self.dom.createTextNode(text))
        for child in children:
            el.appendChild(child)
        return el

    def _row(self, *children) -> Element:
        return self._el("mrow", *children)

    def _mo(self, text: str, **attrs) -> Element:
        return self._el("mo", text=text, **attrs)

    def _mi(self, text: str, **attrs) -> Element:
        return self._el("mi", text=text, **attrs)

    def _parens(self, inner: Element) -> Element:
        return self._row(self._mo("("), inner, self._mo(")"))

    def _name(self, name: str) -> Element:
        if name in _UNICODE:
            return self._mi(_UNICODE[name])
        if len(name) == 1:
            return self._mi(name)
        return self._mi(name, mathvariant="normal")

    def _layered(self, label: str, sub: Element | None = None, extra_sup: str | None = None) -> Element:
        name, layer = split_label(label)
        base = self._name(name)
        sup = None
        if layer is not None or extra_sup:
            sup_children = []
            if layer is not None:
                sup_children.append(self._row(self._mo("("), self._el("mn", text=str(layer)), self._mo(")")))
            if extra_sup:
                sup_children.append(self._mo(extra_sup))
            sup = self._row(*sup_children)
        if sub is not None and sup is not None:
            return self._el("msubsup", base, sub, sup)
        if sub is not None:
            return self._el("msub", base, sub)
        if sup is not None:
            return self._el("msup", base, sup)
        return base

    def _indices(self, indices) -> Element:
        single = all(isinstance(i, sp.Symbol) and len(i.name) == 1 for i in indices)
        children = []
        for pos, i in enumerate(indices):
            if pos and not single:
                children.append(self._mo(",", separator="true"))
            children.append(self._print(i))
        return children[0] if len(children) == 1 else self._row(*children)

    def _paren(self, expr, level: int, strict: bool = True) -> Element:
        prec = precedence(expr)
        if prec < level or (not strict and prec <= level):
            return self._parens(self._print(expr))
        return self._print(expr)

    # -- symbols and indexed quantities ------------------------------------------------
    def _print_Symbol(self, sym, style="plain"):
        m = _SUBSCRIPTED.match(sym.name)
        if m:
            return self._el("msub", self._name(m.group(1)), self._el("mn", text=m.group(2)))
        if sym.name in _UNICODE:
            return self._mi(_UNICODE[sym.name])
        parts = word_parts(sym.name)
        if parts is not None:
            head, kind, tail = parts
            if kind == "_":
                return self._el("msub", self._mi(head), self._el("mn", text=tail))
            if kind == "_word":
                return self._el("msub", self._mi(_UNICODE[head]), self._mi(tail, mathvariant="normal"))
            return self._mi(head, mathvariant="normal")
        return super()._print_Symbol(sym, style=style)

    def _print_IndexedBase(self, expr):
        return self._layered(_label_of(expr))

    def _print_Indexed(self, expr):
        return self._layered(_label_of(expr.base), sub=self._indices(expr.indices))

    # -- arithmetic --------------------------------------------------------------------
    def _print_Add(self, expr, order=None):
        terms = list(expr.args)
        row = self._row(self._print(terms[0]))
        for term in terms[1:]:
            if _negative(term):
                row.appendChild(self._mo("−"))
                row.appendChild(self._paren(_negate(term), PRECEDENCE["Add"], strict=False))
            else:
                row.appendChild(self._mo("+"))
                row.appendChild(self._paren(term, PRECEDENCE["Add"]))
        return row

    def _product(self, factors) -> Element:
        scalars = [f for f in factors if not is_tensor(f)]
        tensors = [f for f in factors if is_tensor(f)]
        row = self._row()
        for pos, f in enumerate(scalars):
            if pos:
                visible = f.is_Number or is_word(f) or is_word(scalars[pos - 1])
                row.appendChild(self._mo("·" if visible else "\u2062"))
            row.appendChild(self._paren(f, PRECEDENCE["Mul"]))
        for pos, f in enumerate(tensors):
            if pos or scalars:
                row.appendChild(self._mo("⊙" if pos else "\u2062"))
            if len(tensors) > 1 and isinstance(f, (MatVec, Outer)):
                row.appendChild(self._parens(self._print(f)))
            else:
                row.appendChild(self._paren(f, PRECEDENCE["Mul"], strict=len(tensors) == 1))
        return row

    def _print_Mul(self, expr):
        negative, numer, denom = _mul_parts(expr)
        body = self._product(numer) if numer else self._el("mn", text="1")
        if denom:
            below = self._print(denom[0]) if len(denom) == 1 else self._product(denom)
            if any(isinstance(f, Partial) for f in numer):  # no fraction inside a fraction: 1/N in front
                body = self._row(self._el("mfrac", self._el("mn", text="1"), below), self._mo("\u2062"), body)
            else:
                if len(numer) == 1:
                    body = self._print(numer[0])
                body = self._el("mfrac", body, below)
        return self._row(self._mo("−"), body) if negative else body

    def _print_Pow(self, e):
        base, exp = e.args
        if exp.is_Number and exp < 0:
            return self._print_Mul(sp.Mul._from_args([e]))
        if exp == sp.S.Half:
            return self._el("msqrt", self._print(base))
        inner = self._parens(self._print(base)) if _has_superscript(base) else self._paren(base, PRECEDENCE["Pow"], strict=False)
        return self._el("msup", inner, self._print(exp))

    def _print_Rational(self, e):
        if e.q == 1:
            return self._el("mn", text=str(e.p))
        frac = self._el("mfrac", self._el("mn", text=str(abs(e.p))), self._el("mn", text=str(e.q)))
        return self._row(self._mo("−"), frac) if e.p < 0 else frac

    def _print_Sum(self, e):
        row = self._row()
        for var, lo, hi in reversed(e.limits):
            under = self._row(self._print(var), self._mo("="), self._print(lo))
            row.appendChild(self._el("munderover", self._mo("∑"), under, self._print(hi)))
        row.appendChild(self._paren(e.function, PRECEDENCE["Mul"]))
        return row

    # -- functions ---------------------------------------------------------------------
    def _call(self, name: Element, *args) -> Element:
        inner = self._row()
        for pos, a in enumerate(args):
            if pos:
                inner.appendChild(self._mo(",", separator="true"))
            inner.appendChild(self._print(a))
        return self._row(name, self._mo("\u2061"), self._parens(inner))

    def _print_Function(self, e):
        return self._call(self._name(type(e).__name__), *e.args)

    def _print_exp(self, e):
        return self._el("msup", self._mi("e"), self._print(e.args[0]))

    def _print_sigmoid(self, e):
        return self._call(self._mi("σ"), e.args[0])

    def _print_Heaviside(self, e):
        return self._call(self._mi("H"), e.args[0])

    def _print_KroneckerDelta(self, e):
        return self._el("msub", self._mi("δ"), self._indices(e.args))

    def _bracket(self, *parts: Element) -> Element:
        return self._row(self._mo("["), *parts, self._mo("]"))

    def _print_Iverson(self, e):
        lo, x, hi = e.args
        row = []
        for pos, part in enumerate(a for a in (lo, x, hi) if a not in (-sp.oo, sp.oo)):
            if pos:
                row.append(self._mo("≤"))
            row.append(self._print(part))
        return self._bracket(*row)

    def _print_route(self, e):
        m, j = e.args
        return self._bracket(self._print(j), self._mo("="), self._print(m))

    def _print_window_argmax(self, e):
        value, *limits = e.args
        under = self._row(*[self._print(lim[0]) for lim in limits])
        return self._row(self._el("munder", self._mi("argmax", mathvariant="normal"), under), self._mo("\u2061"),
                         self._print(value))

    def _print_Piecewise(self, e):
        table = self._el("mtable", columnalign="left")
        for value, cond in e.args:
            when = self._mi("otherwise", mathvariant="normal") if cond == sp.true else self._row(
                self._mi("if", mathvariant="normal"), self._mo("\u2003"), self._print(cond))
            table.appendChild(self._el("mtr", self._el("mtd", self._print(value)), self._el("mtd", when)))
        return self._row(self._mo("{", stretchy="true"), table)

    # -- notation nodes ----------------------------------------------------------------
    def _print_Partial(self, e):
        f, x = e.args
        if _compound(f):
            frac = self._el("mfrac", self._mo("∂"), self._row(self._mo("∂"), self._print(x)))
            return self._row(frac, self._parens(self._print(f)))
        return self._el("mfrac", self._row(self._mo("∂"), self._print(f)), self._row(self._mo("∂"), self._print(x)))

    def _print_Prime(self, e):
        name, arg = e.args
        return self._call(self._row(self._name(name.name), self._mo("′")), arg)

    def _print_Pre(self, e):
        return self._el("msub", self._mi("z"), self._print(e.args[0]))

    def _print_Vec(self, e, transpose=False):
        sub = self._print(e.sample) if e.sample is not None else None
        return self._layered(e.label, sub=sub, extra_sup="⊤" if transpose else None)

    def _print_MatVec(self, e):
        m, v, t = e.args
        left = self._print_Vec(m, transpose=bool(t)) if isinstance(m, Vec) else self._print(m)
        return self._row(left, self._mo("\u2062"), self._paren(v, PRECEDENCE["Mul"]))

    def _print_Outer(self, e):
        u, v = e.args
        right = self._print_Vec(v, transpose=True) if isinstance(v, Vec) else self._el(
            "msup", self._parens(self._print(v)), self._mo("⊤"))
        return self._row(self._print(u), self._mo("\u2062"), right)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def text(expr) -> str:
    """``expr`` in compact Unicode text."""
    return TextPrinter().doprint(expr)


def latex(expr) -> str:
    """``expr`` as LaTeX (math mode, ASCII only)."""
    return LatexPrinter_().doprint(expr)


def mathml(expr, display: str | None = None) -> str:
    """``expr`` as presentation MathML; with ``display`` ("block" or "inline"), wrapped in
    a ``<math>`` element ready for an HTML page."""
    inner = MathMLPrinter().doprint(expr)
    if display is None:
        return inner
    return f'<math xmlns="http://www.w3.org/1998/Math/MathML" display="{display}">{inner}</math>'


def activation_letter(activation) -> sp.Symbol:
    """The name f′ reads with: σ for sigmoid, tanh, relu, …; f for a custom formula."""
    if getattr(activation, "custom", True) or activation.is_identity:
        return sp.Symbol("f")
    return sp.Symbol(_ACTIVATION_NAMES.get(activation.name, activation.name))
