"""Patterns: where a derived formula holds a contraction, a column sum or a per-row reduction.

A ``Sum`` of a product of two indexed factors is a :class:`~symbp.lower.ir.Gemm` (which
operand is transposed follows from where the summed index sits); a sum over the batch of
one array a :class:`~symbp.lower.ir.ColSum`; sums over a sample's units in a loss become
per-row reductions (a stable log-sum-exp for a sum of exponentials).  Nothing here knows a
particular layer or loss: it reads the expressions :mod:`symbp.derive` produced.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from .ir import ColSum, Gemm


def _indexed_factors(expr: sp.Expr) -> list[sp.Indexed] | None:
    factors = sp.Mul.make_args(expr)
    if len(factors) == 2 and all(isinstance(f, sp.Indexed) for f in factors):
        return list(factors)
    return None


def contraction(sum_expr: sp.Sum, out: sp.IndexedBase, r: sp.Symbol, c: sp.Symbol) -> Gemm:
    """A :class:`Gemm` for ``out[r, c] = Sum(A[..]·B[..], (s, 0, S-1))``."""
    if len(sum_expr.limits) != 1:
        raise NotImplementedError(f"cannot lower a multi-index sum as one contraction: {sum_expr}")
    s = sum_expr.limits[0][0]
    factors = _indexed_factors(sum_expr.function)
    if factors is None:
        raise NotImplementedError(f"cannot lower {sum_expr}: not a product of two indexed factors")
    left = next((f for f in factors if r in f.indices), None)
    right = next((f for f in factors if c in f.indices and f is not left), None)
    if left is None or right is None or len(left.indices) != 2 or len(right.indices) != 2:
        raise NotImplementedError(f"cannot lower {sum_expr} to out[{r}, {c}]")
    if set(left.indices) != {r, s} or set(right.indices) != {s, c}:
        raise NotImplementedError(f"cannot lower {sum_expr}: indices do not form a matrix product")
    return Gemm(out, left.base, left.indices == (s, r), right.base, right.indices == (c, s), sum_expr)


def split_sums(expr: sp.Expr, out: sp.IndexedBase, idx: tuple, temp_for, extents: dict | None = None) -> tuple[list, sp.Expr]:
    """Hoist every contraction or column sum out of ``expr`` (assigned to ``out[idx]``).

    ``temp_for(sum)`` names the buffer a hoisted sum is written to; ``extents`` gives the
    range of each index of ``idx`` (needed for column sums).  Returns the steps and the
    expression with each sum replaced by its buffer, ready for a fused :class:`Loop`.
    """
    steps, groups = [], {}
    for s in sorted(expr.atoms(sp.Sum), key=str):
        groups.setdefault(temp_for(s), []).append(s)
    for buf, shared in groups.items():
        if len(shared) < 2:
            continue
        # Sums that share a buffer must be one sum of contractions (δ of an input that two
        # stages read): GEMM, then GEMM with β = 1 on top.  Anything else would overwrite.
        total = sp.Add(*shared)
        joined = expr.subs(total, buf[idx])
        if len(idx) != 2 or any(joined.has(s) for s in shared):
            raise NotImplementedError(f"{expr} holds sums that would share the buffer {buf}")
        steps += [replace(contraction(s, buf, *idx), beta=sp.Integer(1 if k else 0)) for k, s in enumerate(shared)]
        expr = joined
    for s in sorted(expr.atoms(sp.Sum), key=str):
        buf = temp_for(s)
        if len(idx) == 2:
            steps.append(contraction(s, buf, *idx))
            expr = expr.subs(s, buf[idx])
        elif len(idx) == 1 and isinstance(s.function, sp.Indexed) and len(s.limits) == 1:
            (row, lo, hi), src = s.limits[0], s.function
            if src.indices != (row, idx[0]) or lo != 0:
                raise NotImplementedError(f"cannot lower {s} as a column sum")
            steps.append(ColSum(buf, src.base, hi + 1, (extents or {})[idx[0]]))
            expr = expr.subs(s, buf[idx])
        else:
            raise NotImplementedError(f"cannot lower {s} inside {expr}")
    return steps, expr


def row_reductions(exprs: list[sp.Expr], row: sp.Symbol) -> tuple[list, list[sp.Expr]]:
    """Turn the sums over a sample's units into per-row reductions.

    A ``Sum(exp(u))`` becomes a stable log-sum-exp ``m``: ``log(S) → m`` and ``S → exp(m)``,
    so ``exp(y_p)/S`` is evaluated as ``exp(y_p − m)`` and never overflows.  Other sums
    become plain running sums.
    """
    reductions, subs = [], {}
    for pos, s in enumerate(sorted(set().union(*(e.atoms(sp.Sum) for e in exprs)), key=str)):
        (dummy, _, hi), body = s.limits[0], s.function
        if isinstance(body, sp.exp):
            m = sp.Symbol(f"lse{pos}", real=True)
            reductions.append((m, "logsumexp", body.args[0], dummy, hi + 1))
            subs[s] = sp.exp(m)
        else:
            acc = sp.Symbol(f"sum{pos}", real=True)
            reductions.append((acc, "sum", body, dummy, hi + 1))
            subs[s] = acc
    # log(exp(m)) is m by itself (m is real); exp(y_p)/exp(m) combines into exp(y_p − m).
    # Nothing more general: expand_log(force=True) split a user's log(−y) into log(y) + iπ,
    # and combining bases (√x·√y → √(xy)) would be wrong for negative x and y.
    out = [sp.powsimp(e.xreplace(subs), combine="exp") for e in exprs]
    return reductions, out


def fuse_update(gemm: Gemm, update: sp.Expr, target: sp.Indexed, temp: sp.Indexed) -> Gemm | None:
    """Fold an elementwise update of ``target`` that is linear in the GEMM result into the
    GEMM itself: ``θ − η(G + λθ)`` is ``(1 − ηλ)·θ + (−η)·G``, i.e. β = 1 − ηλ, α = −η.

    Returns the fused GEMM writing ``target``, or None when ``update`` is not of that form.
    """
    expanded = sp.expand(update)
    alpha = expanded.coeff(temp)
    rest = sp.expand(expanded - alpha * temp)
    beta = rest.coeff(target)
    if sp.expand(rest - beta * target) != 0 or (alpha.atoms(sp.Indexed) | beta.atoms(sp.Indexed)):
        return None
    return replace(gemm, out=target.base, alpha=alpha, beta=beta)  # keeps a BlockGemm's layout
