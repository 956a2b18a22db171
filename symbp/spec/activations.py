"""Activation functions: a formula in one symbol ``z``, and its derivative derived by SymPy.

Built-ins and user formulas go through the same path: :class:`Activation` holds ``f(z)``,
SymPy differentiates it, and the derivative is then written in terms of the layer's output
``a = f(z)`` where that removes ``z`` entirely (σ′ = a(1 − a), tanh′ = 1 − a²), which is both
the textbook form and the cheaper one to evaluate in the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

# SymPy is imported when a formula is first needed (a derivation, a custom activation's
# parse), not with symbp: a model loaded from the cache runs without it.
if TYPE_CHECKING:
    import sympy as sp


@functools.cache
def _symbols():
    import sympy as sp

    return sp.Symbol("z", real=True), sp.Symbol("a", real=True)


def __getattr__(name: str):
    """``z`` and ``a``, the symbols of f(z) and of its output, made on first use."""
    if name in ("z", "a"):
        return _symbols()[name == "a"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _builtin_expr(name: str, **params):
    """f(z) of a built-in activation, its parameters as exact rationals."""
    import sympy as sp

    from .ops import elu, leaky_relu, relu, sigmoid, softplus

    z = _symbols()[0]
    exact = {k: sp.nsimplify(v, rational=True) for k, v in params.items()}
    build = {"identity": lambda: z, "sigmoid": lambda: sigmoid(z), "tanh": lambda: sp.tanh(z),
             "relu": lambda: relu(z), "leaky_relu": lambda slope: leaky_relu(z, slope),
             "elu": lambda alpha: elu(z, alpha), "softplus": lambda: softplus(z)}[name]
    return build(**exact)


# name -> default parameters
_BUILTINS: dict[str, dict] = {
    "identity": {}, "sigmoid": {}, "tanh": {}, "relu": {}, "leaky_relu": {"slope": 0.01},
    "elu": {"alpha": 1.0}, "softplus": {},
}
_ALIASES = {None: "identity", "linear": "identity", "none": "identity"}


class Activation:
    """An elementwise activation ``a = f(z)`` with its SymPy-derived derivative.

    Parameters
    ----------
    spec : str, sympy.Expr or None
        A built-in name (``"tanh"``, ``"relu"``, ``"leaky_relu"``, ...), a formula string in
        ``z`` (``"z*tanh(softplus(z))"``), or a SymPy expression in a single symbol.
    **params
        Parameters of a built-in: ``slope`` for leaky_relu, ``alpha`` for elu.

    Examples
    --------
    >>> Activation("sigmoid").derivative_in_a
    a*(1 - a)
    """

    def __init__(self, spec: str | sp.Expr | None = None, **params: float) -> None:
        if isinstance(spec, Activation):
            spec, params = spec.spec, {**spec.params, **params}
        self.spec = spec
        name = _ALIASES.get(spec.lower() if isinstance(spec, str) else spec, spec) if _hashable(spec) else spec
        if isinstance(name, str) and name in _BUILTINS:
            defaults = _BUILTINS[name]
            unknown = set(params) - set(defaults)
            if unknown:
                raise ValueError(
                    f"activation {name!r} takes no parameter {sorted(unknown)[0]!r}"
                    + (f" (it takes {', '.join(defaults)})" if defaults else "")
                )
            self.params = {k: float(params.get(k, v)) for k, v in defaults.items()}
            for k, v in self.params.items():
                if not math.isfinite(v):
                    raise ValueError(f"activation {name!r}: parameter {k} must be finite, got {v}")
            self.name = name
            self.custom = False
        else:
            if params:
                raise ValueError(f"custom activation {spec!r} takes no parameters, got {sorted(params)}")
            from .ops import canonicalize

            self.name = spec if isinstance(spec, str) else str(spec)
            self.params = {}
            self.custom = True
            self.expr = canonicalize(_custom_expr(spec))

    @functools.cached_property
    def expr(self) -> sp.Expr:
        """f(z), a SymPy expression (a built-in's is made when first read: a model loaded
        from the cache never reads it; a custom one is parsed, and checked, when declared)."""
        return _builtin_expr(self.name, **self.params)

    @functools.cached_property
    def derivative(self) -> sp.Expr:
        """f′(z), derived by SymPy and simplified (computed when first needed: a model
        loaded from the cache never needs it)."""
        import sympy as sp

        from .ops import simplest

        return simplest(sp.diff(self.expr, _symbols()[0]))

    @functools.cached_property
    def derivative_in_a(self) -> sp.Expr | None:
        """f′ written with a = f(z) alone (σ′ = a(1 − a)), or None when z remains.

        Where it exists the backward pass needs only the stored output."""
        import sympy as sp

        from .ops import simplest

        z, a = _symbols()
        in_a = simplest(self.derivative.subs(self.expr, a)) if self.expr != z else sp.Integer(1)
        if z not in in_a.free_symbols:
            return in_a
        return self._step_in_a()

    def _step_in_a(self) -> sp.Expr | None:
        """f′ of a piecewise-constant derivative whose pieces f keeps apart (relu: H(z) = H(a),
        leaky relu's 1 or s by the sign of z, which a shares): f′ with z renamed a, when SymPy
        proves f′(f(z)) = f′(z) for every z, the kinks included."""
        import sympy as sp

        z, a = _symbols()
        try:
            pieces = self.derivative.rewrite(sp.Piecewise)
            if not isinstance(pieces, sp.Piecewise) or any(e.free_symbols for e, _ in pieces.args):
                return None
            gap = (self.derivative.subs(z, self.expr) - self.derivative).rewrite(sp.Piecewise)
            if sp.simplify(sp.piecewise_fold(gap)) != 0:
                return None
        except Exception:  # noqa: BLE001 - a form SymPy cannot decide keeps z
            return None
        return self.derivative.subs(z, a)

    @property
    def is_identity(self) -> bool:
        return self.name == "identity" if not self.custom else self.expr == _symbols()[0]

    def backward_formula(self) -> sp.Expr:
        """f′ as the backward kernel evaluates it: in ``a`` when possible, else in ``z``."""
        return self.derivative_in_a if self.derivative_in_a is not None else self.derivative

    def describe(self) -> str:
        if self.params:
            return f"{self.name}({', '.join(f'{k}={v:g}' for k, v in self.params.items())})"
        return self.name

    def layer_config(self) -> dict:
        """The ``activation`` (and ``activation_params``) keys of a layer's spec table;
        empty for the identity."""
        act = self.to_config()
        if isinstance(act, dict):
            return {"activation": act.pop("name"), "activation_params": act}
        return {"activation": act} if not self.is_identity or self.custom else {}

    def to_config(self) -> str | dict:
        if self.custom:
            from .formula import formula_text

            return formula_text(self.expr) if not isinstance(self.spec, str) else self.spec
        return {"name": self.name, **self.params} if self.params else self.name

    def __repr__(self) -> str:
        return f"Activation({self.describe()!r}: f(z) = {self.expr}, f'(z) = {self.derivative})"


def _hashable(spec: object) -> bool:
    try:
        hash(spec)
    except TypeError:
        return False
    return True


def _custom_expr(spec: object) -> sp.Expr:
    import sympy as sp

    from .formula import FormulaError, constant_problem, parse_formula
    from .ops import FORMULA_FUNCTIONS

    z = _symbols()[0]
    if isinstance(spec, str):
        if spec.strip().isidentifier() and spec.strip() != "z":
            known = ", ".join(sorted(_BUILTINS))
            raise FormulaError(f"unknown activation {spec!r}; known: {known}, or a formula in z")
        return parse_formula(spec, {"z": z}, FORMULA_FUNCTIONS, what="custom activation")
    if isinstance(spec, sp.Expr):
        free = sorted(spec.free_symbols, key=str)
        if len(free) != 1:
            names = ", ".join(map(str, free)) or "none"
            raise ValueError(f"custom activation {spec}: needs exactly one free symbol, got {names}")
        problem = constant_problem(spec)
        if problem:
            raise FormulaError(f"custom activation {spec}: {problem}")
        return spec.subs(free[0], z)
    raise TypeError(f"activation must be a name, a formula string or a SymPy expression, got {type(spec).__name__}")


def get(spec: str | sp.Expr | Activation | Mapping | None, **params: float) -> Activation:
    """An :class:`Activation` from a name, formula, expression, ``{"name": ..., **params}``."""
    if isinstance(spec, Activation) and not params:
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"activation table needs a 'name', got {sorted(spec)}")
        return Activation(spec.pop("name"), **spec, **params)
    return Activation(spec, **params)
