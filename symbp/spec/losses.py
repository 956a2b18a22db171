"""Losses: the per-sample loss ℓ(y, t) over the network's output ``y`` (logits) and target ``t``.

A loss is written in index notation over the output units ``k`` of one sample ``n``; SymPy
differentiates it with respect to ``y[n, p]`` in :mod:`symbp.derive`.  Elementwise losses
(mse, binary cross-entropy, a user formula in ``y`` and ``t``) are the mean over output units
of a scalar formula; softmax cross-entropy is ``log Σ_j exp(y_j) − Σ_k t_k y_k``, whose
derivative SymPy finds to be ``exp(y_p)/Σ_j exp(y_j) − t_p``, the softmax minus the target.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@functools.cache
def _symbols():
    import sympy as sp

    return sp.Symbol("y", real=True), sp.Symbol("t", real=True)


def __getattr__(name: str):
    """``y_s`` and ``t_s``, the symbols of an elementwise loss e(y, t), made on first use."""
    if name in ("y_s", "t_s"):
        return _symbols()[name == "t_s"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _builtin_elementwise(name: str):
    """e(y, t) of a built-in elementwise loss (None for softmax cross-entropy)."""
    from .ops import softplus

    y, t = _symbols()
    # softplus(y) − t·y is −[t log σ(y) + (1 − t) log(1 − σ(y))] written so that it never
    # takes the log of a rounded-to-zero probability.
    return {"softmax_cross_entropy": None, "mse": (y - t) ** 2, "binary_cross_entropy": softplus(y) - t * y}[name]


# name -> the task it is for (its formula: _builtin_elementwise, None for softmax CE)
_BUILTINS = {"softmax_cross_entropy": "multiclass", "mse": "regression", "binary_cross_entropy": "binary"}
_ALIASES = {"cross_entropy": "softmax_cross_entropy", "ce": "softmax_cross_entropy", "bce": "binary_cross_entropy"}


class Loss:
    """A loss over logits ``y`` and targets ``t``; see the module docstring.

    Parameters
    ----------
    spec : str or sympy.Expr
        ``"softmax_cross_entropy"``, ``"mse"``, ``"binary_cross_entropy"``, or a per-element
        formula in ``y`` and ``t`` (string or SymPy expression), averaged over output units.
    """

    def __init__(self, spec: str | sp.Expr) -> None:
        if isinstance(spec, Loss):
            spec = spec.spec
        self.spec = spec
        name = _ALIASES.get(spec, spec) if isinstance(spec, str) else spec
        if isinstance(name, str) and name in _BUILTINS:
            self.name = name
            self.custom = False
            self.task = _BUILTINS[name]
        else:
            from .ops import canonicalize

            self.name = spec if isinstance(spec, str) else str(spec)
            self.custom = True
            self.elementwise, self.task = canonicalize(_custom_expr(spec)), "regression"

    @functools.cached_property
    def elementwise(self) -> sp.Expr | None:
        """e(y, t), averaged over the output units; None for softmax cross-entropy (a
        built-in's is made when first read; a custom one is parsed when declared)."""
        return _builtin_elementwise(self.name)

    @property
    def is_softmax(self) -> bool:
        return self.name == "softmax_cross_entropy" and not self.custom

    def per_sample(self, y: sp.IndexedBase, t: sp.IndexedBase, K: sp.Expr) -> sp.Expr:
        """ℓ_n as an index expression over the K output units of sample n."""
        import sympy as sp

        from ..indices import j, k, n

        y_s, t_s = _symbols()
        if self.is_softmax:
            return sp.log(sp.Sum(sp.exp(y[n, j]), (j, 0, K - 1))) - sp.Sum(t[n, k] * y[n, k], (k, 0, K - 1))
        e = self.elementwise.subs({y_s: y[n, k], t_s: t[n, k]})
        return sp.Sum(e, (k, 0, K - 1)) / K

    def to_config(self) -> str:
        if not self.custom or isinstance(self.spec, str):
            return self.name
        from .formula import formula_text

        return formula_text(self.spec)

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"


def _custom_expr(spec: object) -> sp.Expr:
    import sympy as sp

    from .formula import FormulaError, constant_problem, parse_formula
    from .ops import FORMULA_FUNCTIONS

    y_s, t_s = _symbols()
    if isinstance(spec, str):
        if spec.strip().isidentifier() and spec.strip() not in ("y", "t"):
            raise FormulaError(f"unknown loss {spec!r}; known: {', '.join(_BUILTINS)}, or a formula in y and t")
        return parse_formula(spec, {"y": y_s, "t": t_s}, FORMULA_FUNCTIONS, what="custom loss")
    if isinstance(spec, sp.Expr):
        by_name = {s.name: s for s in spec.free_symbols}
        extra = sorted(set(by_name) - {"y", "t"})
        if extra:
            raise ValueError(f"custom loss {spec}: free symbols may only be y and t, got {', '.join(extra)}")
        problem = constant_problem(spec)
        if problem:
            raise FormulaError(f"custom loss {spec}: {problem}")
        return spec.subs({s: {"y": y_s, "t": t_s}[name] for name, s in by_name.items()})
    raise TypeError(f"loss must be a name, a formula string or a SymPy expression, got {type(spec).__name__}")
