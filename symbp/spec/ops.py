"""Scalar operations that SymPy lacks, each with its forward rule and local gradient together.

SymPy already knows ``tanh`` (and differentiates it to ``1 - tanh(z)**2``).  The ops
below are the ones a network needs that SymPy would otherwise expand into less readable or
less stable formulas.  Each class gives the forward rule (``_eval_rewrite_as_exp`` or
``_eval_rewrite_as_Piecewise``, used to check it numerically) and ``fdiff``, the local
derivative, in the form a textbook writes it; SymPy's own ``diff`` then chains them.
How each op runs on a device is the backends' business (``symbp/backends``).
"""

from __future__ import annotations

import sympy as sp


def _numbers(*args) -> bool:
    """Whether every argument is a real number SymPy can compare with 0 (then the ops below
    evaluate to their defining formula: max(z, elu(1, 0.01)) needs elu(1, 0.01) = 1)."""
    return all(a.is_number and a.is_comparable for a in args)


class sigmoid(sp.Function):  # noqa: N801 - SymPy function classes print by class name
    """σ(z) = 1 / (1 + e^(-z)); σ′ = σ(1 − σ)."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        return 1 / (1 + sp.exp(-z)) if _numbers(z) else None

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return 1 / (1 + sp.exp(-z))

    def _latex(self, printer):
        return r"\sigma\left(%s\right)" % printer._print(self.args[0])

    def _pretty(self, printer):
        return printer._print_Function(self, func_name="σ")


class softplus(sp.Function):  # noqa: N801
    """softplus(z) = log(1 + e^z); softplus′ = σ."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        return sp.log(1 + sp.exp(z)) if _numbers(z) else None

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return sp.log(1 + sp.exp(z))


class relu(sp.Function):  # noqa: N801
    """relu(z) = max(0, z); relu′ = H(z), the step with H(0) = 0 as PyTorch takes it."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        return (z if z > 0 else sp.S.Zero) if _numbers(z) else None

    def fdiff(self, argindex=1):
        return sp.Heaviside(self.args[0], 0)

    def _eval_rewrite_as_Piecewise(self, z, **kwargs):
        return sp.Piecewise((z, z > 0), (0, True))


class leaky_relu(sp.Function):  # noqa: N801
    """leaky_relu(z, s) = z for z > 0, s·z otherwise; derivative 1 or s."""

    nargs = 2

    @classmethod
    def eval(cls, z, s):
        return (z if z > 0 else s * z) if _numbers(z) else None

    def fdiff(self, argindex=1):
        z, s = self.args
        if argindex != 1:
            return sp.Piecewise((0, z > 0), (z, True))
        return sp.Piecewise((1, z > 0), (s, True))

    def _eval_rewrite_as_Piecewise(self, z, s, **kwargs):
        return sp.Piecewise((z, z > 0), (s * z, True))


class elu(sp.Function):  # noqa: N801
    """elu(z, α) = z for z > 0, α(e^z − 1) otherwise; derivative 1 or α·e^z."""

    nargs = 2

    @classmethod
    def eval(cls, z, alpha):
        return (z if z > 0 else alpha * (sp.exp(z) - 1)) if _numbers(z) else None

    def fdiff(self, argindex=1):
        z, alpha = self.args
        if argindex != 1:
            return sp.Piecewise((0, z > 0), (sp.exp(z) - 1, True))
        return sp.Piecewise((1, z > 0), (alpha * sp.exp(z), True))

    def _eval_rewrite_as_Piecewise(self, z, alpha, **kwargs):
        return sp.Piecewise((z, z > 0), (alpha * (sp.exp(z) - 1), True))


#: Functions a user formula may call by name, besides SymPy's elementary ones.
FORMULA_FUNCTIONS = {
    "sigmoid": sigmoid,
    "softplus": softplus,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "elu": elu,
}

def _one_plus_exp(e: sp.Basic) -> sp.Expr | None:
    """u when ``e`` is 1 + exp(u), else None."""
    if e.is_Add and len(e.args) == 2 and sp.S.One in e.args:
        other = e.args[1] if e.args[0] == 1 else e.args[0]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def _logistic(e: sp.Basic) -> sp.Expr | None:
    """σ(u) for a product exp(u)·(1 + exp(u))⁻¹·rest (keeping the rest), else None."""
    if not e.is_Mul:
        return None
    for f in e.args:
        u = _one_plus_exp(f.base) if f.is_Pow and f.exp == -1 else None
        if u is not None and sp.exp(u) in e.args:
            rest = list(e.args)
            rest.remove(f)
            rest.remove(sp.exp(u))
            return sp.Mul(*rest) * sigmoid(u)
    return None


def canonicalize(expr: sp.Expr) -> sp.Expr:
    """Recognise the textbook ops inside a user formula.

    ``log(1 + exp(x))`` becomes ``softplus(x)`` and ``1/(1 + exp(-x))`` or
    ``exp(x)/(1 + exp(x))`` becomes ``σ(x)``: the derivative then reads the way a textbook
    writes it, and the kernel evaluates the stable form instead of overflowing ``exp``.
    The shapes are checked node by node (not with SymPy's ``Wild`` patterns, whose matching
    of products took minutes on a derivative of exp nested 90 deep).
    """
    expr = expr.replace(lambda e: isinstance(e, sp.log) and _one_plus_exp(e.args[0]) is not None,
                        lambda e: softplus(_one_plus_exp(e.args[0])))
    expr = expr.replace(lambda e: _logistic(e) is not None, _logistic)
    return expr.replace(lambda e: e.is_Pow and e.exp == -1 and _one_plus_exp(e.base) is not None,
                        lambda e: sigmoid(-_one_plus_exp(e.base)))


def _pairs(expr: sp.Expr, match, fold) -> sp.Expr:
    """Replace, in every product, the first pair of factors ``match(f, factors)`` finds (it
    returns the partner of ``f``, or None) by ``fold(f)``."""
    def partner(e):
        return next(((f, g) for f in e.args if (g := match(f, e.args)) is not None), None) if e.is_Mul else None

    def value(e):
        f, g = partner(e)
        rest = list(e.args)
        rest.remove(f)
        rest.remove(g)
        return sp.Mul(*rest) * fold(f)

    return expr.replace(lambda e: partner(e) is not None, value)


def fold_identities(expr: sp.Expr) -> sp.Expr:
    """Two identities SymPy's ``simplify`` does not apply, so that a derivative reads the
    textbook way: x·sign(x) = |x| (softsign's derivative becomes 1/(1 + |x|)²) and
    eˣ·σ(−x) = σ(x) (Mish's), which also keeps the kernel off eˣ's overflow."""
    expr = _pairs(expr, lambda f, fs: f.args[0] if isinstance(f, sp.sign) and f.args[0] in fs else None,
                  lambda f: sp.Abs(f.args[0]))
    return _pairs(expr, lambda f, fs: sigmoid(-f.args[0]) if isinstance(f, sp.exp) and sigmoid(-f.args[0]) in fs else None,
                  lambda f: sigmoid(f.args[0]))


def drop_point_masses(expr: sp.Expr) -> sp.Expr:
    """``DiracDelta`` terms → 0.  SymPy differentiates sign(x) (and the step) to 2·δ(x), which
    no kernel can evaluate; it is 0 everywhere but at 0, and PyTorch's sign backward is 0 there
    too, so the gradient of sign is 0, as in every autograd library."""
    return expr.replace(sp.DiracDelta, lambda *args: sp.S.Zero)


#: ``simplest`` tries SymPy's ``simplify`` only on expressions of at most this many operations.
#: Its cost grows steeply with size and nesting (tanh nested 6 deep: 38 operations, 2.5 s;
#: 8 deep: about a minute; sigmoid 15 deep never finished), while the formulas it improves
#: (σ(1 − σ), Mish's and GELU's derivatives) are far smaller.  The cheap transforms
#: (``factor_terms``, ``together``) still run on larger ones.
SIMPLIFY_MAX_OPS = 30


def simplest(expr: sp.Expr) -> sp.Expr:
    """The shortest of a few equivalent forms: SymPy's ``simplify`` alone sometimes expands
    a textbook product (σ(1 − σ)) into something longer."""
    expr = drop_point_masses(expr)
    tidy = fold_identities(canonicalize(expr))
    candidates = [expr, tidy]
    small = sp.count_ops(expr) <= SIMPLIFY_MAX_OPS
    transforms = (sp.factor_terms, sp.simplify, sp.together) if small else (sp.factor_terms, sp.together)
    for start in (expr, tidy) if tidy != expr else (expr,):
        for transform in transforms:
            try:
                candidates.append(fold_identities(canonicalize(transform(start))))
            except Exception:  # noqa: BLE001 - a failed simplification just leaves a candidate out
                continue
    # Ties go to the earliest candidate: SymPy's own derivative is usually the textbook form.
    return min(candidates, key=lambda e: sp.count_ops(e))


class window_argmax(sp.Function):  # noqa: N801
    """argmax over a window: ``window_argmax(value, (u, 0, U-1), (v, 0, V-1))`` is the
    row-major position ``u·V + v`` of the largest ``value`` in the window.

    Ties: the **first** maximum in that scan order wins (row by row, left to right), the rule
    PyTorch's ``max_pool2d`` follows, so gradients are routed to the same entry.  The result
    is piecewise constant in the values: its derivative is 0 (``fdiff``), which is why the
    gradient of a max flows only through :class:`route`.
    """

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_derivative(self, s):
        return sp.S.Zero


class route(sp.Function):  # noqa: N801
    """route(m, j) = 1 if j == m else 0: the gradient router of a max.

    A max over a window is written ``Σ_j route(m, j)·x_j`` with ``m`` its
    :class:`window_argmax`; differentiating that sum sends δ to the arg-max entry only.
    """

    nargs = 2

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_rewrite_as_Piecewise(self, m, j, **kwargs):
        return sp.Piecewise((1, sp.Eq(m, j)), (0, True))


def dropout_counter(l, e):
    """The entry counter of ``dropout_draw``: the layer above the entry (a sample has fewer
    than 2³¹ entries, so no two (layer, entry) pairs meet)."""
    return l * 2**32 + e


class dropout_mask(sp.Function):  # noqa: N801
    """dropout_mask(keep, seed, l, n, e): inverted dropout's factor of layer l for entry e of
    sample n (the layer is part of the counter: two layers draw apart),
    1/keep with probability ``keep`` and 0 otherwise, from a counter-based generator (the
    same draw for the same seed, sample and entry on every target and in any loop order).
    The value depends on no input, so its derivative is 0 (the mask is a constant of the step)."""

    def fdiff(self, argindex=1):
        return sp.S.Zero
