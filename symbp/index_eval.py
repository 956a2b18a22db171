"""Index formulas evaluated with NumPy: the small interpreter the readers share.

:func:`evaluate` takes an index expression (``Indexed``, ``Sum`` and elementwise functions)
and arrays by label, and returns its values with one axis per free index, in the order
asked.  The worked example (:mod:`symbp.walkthrough`) and the gates picture
(:mod:`symbp.graph_draw`) evaluate the derivation's own formulas with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import sympy as sp

__all__ = ["NUMPY_FUNCTIONS", "evaluate"]

#: NumPy versions of the functions symbp's formulas use beyond NumPy's own.
NUMPY_FUNCTIONS = {
    "sigmoid": lambda x: _expit(x),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x, s: np.where(x > 0, x, s * x),
    "elu": lambda x, alpha: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
}

def _expit(x):
    # SciPy's special functions take a quarter of a second to import: only when used.
    from scipy.special import expit

    return expit(x)


# --------------------------------------------------------------------------------------------
# Evaluating index expressions
# --------------------------------------------------------------------------------------------
_PLANS: dict = {}


def _align(values: list[tuple[np.ndarray, tuple]]) -> tuple[list[np.ndarray], tuple]:
    """Broadcast labelled arrays against each other: one axis per distinct index."""
    axes: list = []
    for _, ax in values:
        for a in ax:
            if a not in axes:
                axes.append(a)
    out = []
    for arr, ax in values:
        arr = np.asarray(arr, dtype=np.float64)
        if not ax:
            out.append(arr)
            continue
        present = [a for a in axes if a in ax]
        arr = np.transpose(arr, [ax.index(a) for a in present])
        out.append(arr.reshape([arr.shape[present.index(a)] if a in ax else 1 for a in axes]))
    return out, tuple(axes)


def _plan(e):
    """A function env → (array, axes) evaluating ``e``, built once per expression."""
    if e in _PLANS:
        return _PLANS[e]
    if isinstance(e, sp.Indexed):
        label = str(e.base.label)
        sl, axes = [], []
        for ix in e.indices:
            if ix.is_Integer:
                sl.append(int(ix))
            elif isinstance(ix, sp.Symbol) and ix not in axes:
                sl.append(slice(None))
                axes.append(ix)
            else:
                raise NotImplementedError(f"cannot evaluate the index {ix} in {e}")
        sl, axes, rank = tuple(sl), tuple(axes), len(e.indices)

        def run(env):
            if label not in env:
                raise KeyError(f"no value for {label} (needed by {e})")
            arr = env[label]
            if arr.ndim != rank:
                raise ValueError(f"{label} has {arr.ndim} axes but is indexed as {e}")
            return arr[sl], axes
    elif isinstance(e, sp.Sum):
        body = _plan(e.function)
        for _, lo, hi in e.limits:
            free = (lo.free_symbols | hi.free_symbols) if isinstance(lo, sp.Basic) else set()
            if free:
                raise ValueError(f"cannot evaluate {e}: no value for {', '.join(sorted(map(str, free)))}")
        limits = [(s, int(lo), int(hi)) for s, lo, hi in e.limits]

        def run(env):
            val, axes = body(env)
            for s, lo, hi in limits:
                if s in axes:
                    ax = axes.index(s)
                    val = np.take(val, np.arange(lo, hi + 1), axis=ax).sum(axis=ax)
                    axes = axes[:ax] + axes[ax + 1:]
                else:
                    val = val * (hi - lo + 1)
            return val, axes
    elif not e.has(sp.Indexed):
        free = e.free_symbols
        if free:
            raise ValueError(f"cannot evaluate {e}: no value for {', '.join(sorted(map(str, free)))}")
        const = (np.asarray(float(e)), ())

        def run(env):
            return const
    else:
        subs, parts = {}, []

        def strip(x):
            if isinstance(x, (sp.Indexed, sp.Sum)):
                if x not in subs:
                    subs[x] = sp.Dummy(f"v{len(subs)}")
                    parts.append(x)
                return subs[x]
            if not x.args:
                return x
            return x.func(*[strip(a) for a in x.args])

        skeleton = strip(e)
        fn = sp.lambdify([subs[x] for x in parts], skeleton, modules=[NUMPY_FUNCTIONS, "numpy"])
        children = [_plan(x) for x in parts]

        def run(env):
            arrays, axes = _align([c(env) for c in children])
            return np.asarray(fn(*arrays), dtype=np.float64), axes
    _PLANS[e] = run
    return run


def _ev(e, env: Mapping[str, np.ndarray]) -> tuple[np.ndarray, tuple]:
    return _plan(e)(env)


def evaluate(expr: sp.Expr, env: Mapping[str, np.ndarray], order: tuple = (), values: Mapping | None = None) -> np.ndarray:
    """Evaluate an index expression with NumPy.

    Parameters
    ----------
    expr : sympy.Expr
        Built from ``Indexed`` quantities, ``Sum`` over index ranges and elementwise functions.
    env : mapping of str to numpy.ndarray
        Arrays by indexed-base label (``"W1"``, ``"x"``, ``"delta2"``).
    order : tuple of index symbols
        The free indices of the result, in the order of its axes.
    values : mapping, optional
        Numbers for the remaining symbols (widths ``d_l``, ``N``, ``lambda``).

    Examples
    --------
    >>> import numpy as np, sympy as sp
    >>> from symbp.indices import i, j
    >>> W, x = sp.IndexedBase("W"), sp.IndexedBase("x")
    >>> evaluate(sp.Sum(W[i, j] * x[j], (j, 0, 1)), {"W": np.eye(2), "x": np.array([3.0, 4.0])}, (i,))
    array([3., 4.])
    """
    e = expr.subs(values) if values else expr
    val, axes = _ev(e, env)
    missing = [a for a in axes if a not in order]
    if missing:
        raise ValueError(f"{expr} has free indices {missing} beyond {order}")
    present = [a for a in order if a in axes]
    val = np.transpose(val, [axes.index(a) for a in present]) if axes else val
    if len(present) == len(order):
        return np.asarray(val, np.float64)
    # constant along some output index (a bias has no n): give it that axis
    shape = [val.shape[present.index(a)] if a in present else 1 for a in order]
    return np.asarray(val, np.float64).reshape(shape)
