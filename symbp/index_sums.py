r"""Sums over Kronecker deltas, and the guards they leave, carried out on index formulas.

What comes in is a derived expression with ``Sum``\ s of δ's and ``Piecewise`` guards, and the
index ranges it is read over; what goes out is the same expression with every sum SymPy can
carry out done and every condition the ranges already guarantee dropped.  The derivation
(:mod:`symbp.derive`) resolves with it, and the planner prunes with it once sizes are numbers.
"""

from __future__ import annotations

import sympy as sp

from .indices import nonnegative_gap
from .spec.ops import drop_point_masses

try:  # SymPy's own steps of deltasummation (private: a SymPy without them leaves every sum to doit)
    from sympy.concrete.delta import _expand_delta, _extract_delta, _has_simple_delta
except ImportError:  # pragma: no cover
    _expand_delta = _extract_delta = _has_simple_delta = None


def resolve(expr: sp.Expr, ranges: dict | None = None) -> sp.Expr:
    """Carry out sums over Kronecker deltas until nothing changes.

    ``Sum.doit`` yields ``Piecewise((e, cond), (0, True))`` because it cannot know where the
    free indices lie.  ``ranges`` (index symbol → (first, last)) says that, and every Sum
    says it for its own dummies: a condition they imply (``q <= d - 1`` for q in 0..d−1) is
    dropped; one they do not imply (``0 <= r - S·h <= kh - 1`` from a strided window, the
    border of a zero padding) stays, as the guard it really is.
    """
    ranges = dict(ranges or {})
    # A point mass (d/dx sign(x) = 2·δ(x)) is zero almost everywhere, and no kernel has it.
    expr = delta_sums(sum_deltas(drop_point_masses(expr), ranges))
    for _ in range(20):
        new = prune_guards(expr.doit(), ranges)
        if new == expr:
            return new
        expr = new
    return expr


def delta_sums(expr: sp.Expr) -> sp.Expr:
    """The innermost Sums over a Kronecker δ carried out as ``Sum.doit`` carries them out
    (SymPy's ``eval_sum`` and ``deltasummation``: the summand at the δ's root, under the guard
    that the root lies within the limits), where every limit takes that path and every δ's
    root is linear with a unit coefficient; other Sums (and the limits of a Sum past the first
    that does not take that path) are left to ``doit``.

    Why not ``doit`` for these too: it finds the root with ``solve``, whose ``simplify`` imports
    ``sympy.physics.units`` (0.16 s of a cold start, measured) and simplifies an index
    expression that is already as simple as it gets.  Checked equal: the generated modules
    and ``explain()`` of every network the tests build, byte for byte, with and without.
    """
    def carry(s_):
        f = s_.function.doit()  # (as Sum.doit starts)
        for k, (i, a, b) in enumerate(s_.limits):
            new = _delta_sum(f, i, a, b)
            if new is None:  # the limits left, as doit leaves a sum it cannot carry out
                return s_ if k == 0 else sp.Sum(f, *s_.limits[k:])
            f = new
        return f

    return expr.replace(lambda e: isinstance(e, sp.Sum) and e.function.has(sp.KroneckerDelta)
                        and not e.function.has(sp.Sum), carry)


def _delta_sum(f, i, a, b):
    """``eval_sum(f, (i, a, b))`` where it is a sum over a simple δ (or a guard of such sums),
    None where SymPy would take another path."""
    if _expand_delta is None or a == b or (b - a).is_negative or b - a == -1:  # (an empty or reversed range: doit's own ways)
        return None
    if f.is_zero:
        return sp.S.Zero
    if i not in f.free_symbols:
        return f * (b - a + 1)
    if f.is_Mul and any(isinstance(x, sp.Piecewise) for x in f.args):
        f = sp.piecewise_fold(f)  # (a chain-rule factor times a guarded local derivative)
    if isinstance(f, sp.Piecewise):
        if any(i in arg.cond.free_symbols for arg in f.args):
            return None
        args = [(_delta_sum(arg.expr, i, a, b), arg.cond) for arg in f.args]
        return None if any(e is None for e, _ in args) else sp.Piecewise(*args)
    if not _has_simple_delta(f, i):
        return None
    g = _expand_delta(f, i)
    if g.is_Add:  # (a δ times a sum: doit sums term by term)
        return None
    delta, rest = _extract_delta(g, i)
    if delta is None or delta.delta_range is not None:
        return None
    diff = sp.expand(delta.args[0] - delta.args[1])
    coeff = diff.coeff(i)
    if coeff not in (1, -1) or sp.expand(diff - coeff * i).has(i):
        return None
    root = sp.expand(i - diff / coeff)
    return sp.Piecewise((rest.subs(i, root), sp.Interval(a, b).as_relational(root)), (0, True))


def _common_delta(e) -> sp.KroneckerDelta | None:
    """A Kronecker δ that is a factor of every term of every non-zero branch of a Piecewise."""
    if not isinstance(e, sp.Piecewise) or not e.has(sp.KroneckerDelta):
        return None
    common = None
    for arg in e.args:
        for term in sp.Add.make_args(sp.expand_mul(arg.expr)) if arg.expr != 0 else ():
            factors = {f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta)}
            common = factors if common is None else common & factors
    return min(common, key=str) if common else None


def sum_deltas(expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Σ_k Piecewise((δ(k, p)·u, c), (δ(k, p)·v, True)) → Piecewise((u, c), (v, True)) at k = p.

    d/dy of a piecewise function (leaky_relu, elu, max) puts the δ into each branch, where
    ``Sum.doit`` does not look (and SymPy folds any factor pulled out straight back in).
    Done only where the ranges say that p lies within the sum's limits."""
    def collapsed(e):
        if not isinstance(e, sp.Sum) or len(e.limits) != 1:
            return None
        k, lo, hi = e.limits[0]
        delta = _common_delta(e.function)
        if delta is None or k not in delta.args:
            return None
        other = delta.args[1] if delta.args[0] == k else delta.args[0]
        if other.has(k) or not (implied(lo <= other, ranges) and implied(other <= hi, ranges)):
            return None
        return sp.Piecewise(*[(arg.expr.xreplace({delta: sp.S.One}).xreplace({k: other}), arg.cond.xreplace({k: other}))
                              for arg in e.function.args])

    return expr.replace(lambda e: collapsed(e) is not None, collapsed)


def _is_guard(e) -> bool:
    return isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].expr == 0 and e.args[1].cond == sp.true


def prune_guards(expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Drop the conditions of ``Piecewise((e, cond), (0, True))`` that the index ranges
    imply, merging nested guards; see :func:`resolve`."""
    if not isinstance(expr, sp.Basic) or expr.is_Atom or not expr.has(sp.Piecewise):
        return expr
    if isinstance(expr, sp.Sum):
        inner = dict(ranges)
        for sym, lo, hi in expr.limits:
            inner[sym] = (lo, hi)
        body = prune_guards(expr.function, inner)
        return expr if body == expr.function else sp.Sum(body, *expr.limits)
    if _is_guard(expr):
        body, cond = expr.args[0].expr, expr.args[0].cond
        body = prune_guards(body, ranges)
        conds = list(sp.And.make_args(cond))
        if _is_guard(body):
            conds += list(sp.And.make_args(body.args[0].cond))
            body = body.args[0].expr
        # A factor δ(a, b) of the body makes it zero unless a = b: judge the conditions there.
        eqs = [f_.args[0] - f_.args[1] for f_ in sp.Mul.make_args(body) if isinstance(f_, sp.KroneckerDelta)]
        kept = [c_ for c_ in conds if not (implied(c_, ranges) or implied(_on(c_, eqs), ranges))]
        if not kept:
            return body
        return sp.Piecewise((body, sp.And(*kept)), (0, True))
    return expr.func(*[prune_guards(a, ranges) for a in expr.args])


def _on(cond, eqs: list):
    """``cond`` with each equation ``diff = 0`` solved for one of its unit-coefficient symbols."""
    for diff in eqs:
        for sym in sorted(diff.free_symbols & cond.free_symbols, key=str):
            coeff = sp.expand(diff).coeff(sym)
            if coeff in (1, -1):
                cond = cond.subs(sym, sp.expand(sym - diff / coeff))
                break
    return cond


def implied(cond, ranges: dict) -> bool:
    """True when the integer index ranges guarantee ``cond`` (a linear inequality)."""
    if cond == sp.true:
        return True
    gap = nonnegative_gap(cond)
    if gap is None:
        return False
    low = {}
    for sym, (lo, hi) in ranges.items():
        if not gap.has(sym):
            continue
        coeff = gap.coeff(sym)
        if coeff.free_symbols & set(ranges) or sp.expand(gap - coeff * sym).has(sym):
            return False  # not linear in the indices: do not guess
        if coeff.is_nonnegative:
            low[sym] = lo
        elif coeff.is_nonpositive:
            low[sym] = hi
        else:
            return False
    bound = sp.expand(gap.xreplace(low))
    return bool(bound.is_nonnegative)
