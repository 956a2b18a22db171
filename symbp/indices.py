"""The index symbols every derivation shares, so formulas from different layers chain.

``n`` runs over the samples of a batch (``N`` of them); ``i, j`` over a layer's output and
input units in the forward formulas; ``p, q`` are the free indices of a derivative
(∂C/∂W[p, q]); ``k`` runs over the output units inside a loss.
"""

import sympy as sp

n, i, j, k, p, q = sp.symbols("n i j k p q", integer=True, nonnegative=True)
N = sp.Symbol("N", integer=True, positive=True)
#: λ, the l2 coefficient: C = (1/N) Σ_n ℓ_n + (λ/2) Σ ‖W‖²
l2 = sp.Symbol("lambda", nonnegative=True)


def width(layer: int) -> sp.Symbol:
    """The symbolic width d_l of layer l (d_0 is the input width)."""
    return sp.Symbol(f"d_{layer}", integer=True, positive=True)

# Image layers: ``c, u, v`` run over a filter's input channel and its rows and columns
# (summed); ``k, h, w`` over an output channel and position; ``r, s`` are free row/column
# indices of a derivative (∂C/∂x[n, q, r, s], ∂C/∂W[p, q, r, s]); ``e`` over Maxout pieces.
c, h, w, u, v, r, s, e = sp.symbols("c h w u v r s e", integer=True, nonnegative=True)

#: The sample index of a sum over the whole batch (BatchNorm's statistics): a name of its own,
#: so that ∂/∂x[n, q] of Σ_ν x[ν, i] sees the sample n it differentiates by as free.
nu = sp.Symbol("nu", integer=True, nonnegative=True)

#: The seed of a training step's random draws (Dropout's masks): a kernel argument.
seed = sp.Symbol("seed", integer=True, nonnegative=True)


def as_size(value) -> sp.Expr:
    """A size as a SymPy object: a size symbol or expression stays, a number becomes one."""
    return value if isinstance(value, sp.Basic) else sp.Integer(value)


def nonnegative_gap(rel) -> sp.Expr | None:
    """For an integer inequality, the expression g with ``rel`` ⇔ g ≥ 0 (a < b becomes
    b − a − 1 ≥ 0); None for anything that is not an inequality."""
    if isinstance(rel, (sp.GreaterThan, sp.StrictGreaterThan)):
        gap = rel.lhs - rel.rhs - (1 if isinstance(rel, sp.StrictGreaterThan) else 0)
    elif isinstance(rel, (sp.LessThan, sp.StrictLessThan)):
        gap = rel.rhs - rel.lhs - (1 if isinstance(rel, sp.StrictLessThan) else 0)
    else:
        return None
    return sp.expand(gap)
