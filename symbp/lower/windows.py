"""Patterns of index formulas with windows: loop bounds from guards, and convolutions.

A Sum whose body is a guard ``Piecewise((e, cond), (0, True))`` gets its loop bounds
tightened from the linear conditions on its own index (the strided-window test
``0 ≤ r − S·h ≤ kh − 1`` becomes ``h in range(ceil((r − kh + 1)/S), r//S + 1)``): a
transposed convolution or pooling backward pass costs what the forward pass costs, not
that times the image size.  :func:`match_conv` finds ``Σ_{c,u,v} W[k,c,u,v]·x̃[…]`` (im2col +
GEMM).  Nothing here knows a particular layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..index_sums import prune_guards
from ..indices import n


def linear_bounds(sym: sp.Symbol, lo, hi, cond) -> tuple:
    """Tighten ``lo ≤ sym ≤ hi`` with the conjuncts of ``cond`` that are linear in ``sym``
    with a constant integer coefficient; returns (lo_text, hi_text, remaining conds).

    ``a·sym + rest ≥ 0`` gives ``sym ≥ ceil(−rest/a) = −(rest // a)`` for a > 0 and
    ``sym ≤ rest // −a`` for a < 0 (Python's ``//`` floors, also for negatives).
    """
    lows, highs, rest_conds = [str(lo)], [str(hi)], []
    for c_ in sp.And.make_args(cond):
        gap = None
        if isinstance(c_, (sp.GreaterThan, sp.StrictGreaterThan)):
            gap = c_.lhs - c_.rhs - (1 if isinstance(c_, sp.StrictGreaterThan) else 0)
        elif isinstance(c_, (sp.LessThan, sp.StrictLessThan)):
            gap = c_.rhs - c_.lhs - (1 if isinstance(c_, sp.StrictLessThan) else 0)
        if gap is not None:
            gap = sp.expand(gap)
            a = gap.coeff(sym)
            rest = sp.expand(gap - a * sym)
            if a.is_Integer and a != 0 and not rest.has(sym):
                a = int(a)
                if a > 0:
                    lows.append(f"-(({rest}) // {a})" if a != 1 else f"{-rest}")
                else:
                    highs.append(f"({rest}) // {-a}" if a != -1 else f"{rest}")
                continue
        rest_conds.append(c_)
    low = lows[0] if len(lows) == 1 else f"max({', '.join(lows)})"
    high = highs[0] if len(highs) == 1 else f"min({', '.join(highs)})"
    return low, high, rest_conds


def numeric(expr: sp.Expr, sizes: dict, ranges: dict) -> sp.Expr:
    """Sizes fixed to numbers, then the guards those numbers make redundant dropped."""
    return prune_guards(expr.xreplace(sizes), {k: (lo, hi) for k, (lo, hi) in ranges.items()})


@dataclass
class ConvMatch:
    """``Σ_{c,u,v} W[k, c, u, v]·x̃[n, c, S·h + u, S′·w + v]`` found in a derived formula."""

    sum: sp.Sum
    weight: sp.IndexedBase
    source: sp.Indexed  # x̃[n, c, S·h + u, S′·w + v]: one column entry of im2col
    dummies: tuple  # (c, u, v)
    extents: tuple  # (C, kh, kw)
    # how im2col lays out its columns (see symbp.lower.stages._col_ranges): "sample" (a GEMM
    # per sample), "stacked" (output positions as rows, one GEMM over the batch) or "inner"
    # (the batch inside the rows of every matrix, one GEMM over the batch)
    layout: str = "sample"


def match_conv(formula: sp.Expr, idx: tuple) -> ConvMatch | None:
    """The convolution sum of ``formula`` (a stage ``z[n, k, h, w]``), if it has one: a Sum
    over three indices (c, u, v) of a weight ``W[k, c, u, v]`` times a source read at
    ``[n, c, a(h) + u, b(w) + v]``, a(h), b(w) free of the summed indices."""
    k, h, w = idx
    for s_ in formula.atoms(sp.Sum):
        dummies = tuple(lim[0] for lim in s_.limits)
        factors = sp.Mul.make_args(s_.function)
        if len(dummies) != 3 or any(lim[1] != 0 for lim in s_.limits) or len(factors) != 2:
            continue
        if not all(isinstance(f_, sp.Indexed) for f_ in factors):
            continue
        weight = next((f_ for f_ in factors if f_.indices == (k, *dummies)), None)
        source = next((f_ for f_ in factors if f_ is not weight), None)
        if weight is None or source is None or len(source.indices) != 4 or source.indices[1] != dummies[0]:
            continue
        c_, u_, v_ = dummies
        rows, cols = sp.expand(source.indices[2] - u_), sp.expand(source.indices[3] - v_)
        if rows.free_symbols - {h} or cols.free_symbols - {w} or source.indices[0] != n:
            continue
        return ConvMatch(s_, weight.base, source, dummies, tuple(lim[2] + 1 for lim in s_.limits))
    return None
