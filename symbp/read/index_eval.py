"""Index formulas evaluated with NumPy: the small interpreter the readers share.

:func:`evaluate` takes an index expression (``Indexed``, ``Sum`` and elementwise functions)
and arrays by label, and returns its values with one axis per free index, in the order
asked.  The worked example (:mod:`symbp.read.walkthrough`) and the gates picture
(:mod:`symbp.read.graph_draw`) evaluate the derivation's own formulas with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import sympy as sp

from ..spec.ops import dropout_counter, window_argmax

__all__ = ["NUMPY_FUNCTIONS", "evaluate"]

#: NumPy versions of the functions symbp's formulas use beyond NumPy's own.
NUMPY_FUNCTIONS = {
    "sigmoid": lambda x: _expit(x),
    "softplus": lambda x: np.logaddexp(0.0, x),
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x, s: np.where(x > 0, x, s * x),
    "elu": lambda x, alpha: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
    "dropout_mask": lambda keep, seed, l, n, e: fixed_mask(keep, seed, n, dropout_counter(l, e)),
}


def fixed_mask(keep, seed, n, e):
    """Dropout's mask as the kernels draw it (``dropout_draw``, SplitMix64 of the seed, the
    sample and the entry), for arrays of samples and entries."""
    n, e = np.broadcast_arrays(np.asarray(n), np.asarray(e))
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as the kernels' uint64
        x = (np.uint64(int(seed)) * np.uint64(0x9E3779B97F4A7C15) + n.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
             + e.astype(np.uint64))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    u = (x >> np.uint64(11)).astype(np.float64) * 1.1102230246251565e-16
    return np.where(u < float(keep), 1.0 / float(keep), 0.0)


def _expit(x):
    # SciPy's special functions take a quarter of a second to import: only when used.
    from scipy.special import expit

    return expit(x)


# --------------------------------------------------------------------------------------------
# Evaluating index expressions
# --------------------------------------------------------------------------------------------
_PLANS: dict = {}


class kdelta(sp.Function):  # noqa: N801 - printed by name for NUMPY_FUNCTIONS
    """KroneckerDelta for arrays (SymPy's NumPy printer writes a scalar ``1 if a == b else 0``)."""

    nargs = 2


NUMPY_FUNCTIONS.update({
    "kdelta": lambda a, b: np.equal(a, b).astype(np.float64),
    # route(m, j): 1 where j is the arg-max position m (see symbp.spec.ops.route)
    "route": lambda m, j: np.equal(m, j).astype(np.float64),
})


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


def _read(env, label: str, rank: int, e) -> np.ndarray:
    if label not in env:
        raise KeyError(f"no value for {label} (needed by {e})")
    arr = env[label]
    if arr.ndim != rank:
        if rank == 2 and arr.ndim > 2:  # an image read flat, a[n, p], as the kernels store it
            return arr.reshape(arr.shape[0], -1)
        raise ValueError(f"{label} has {arr.ndim} axes but is indexed as {e}")
    return arr


def _plan(e, ranges: dict):
    """A function env → (array, axes) evaluating ``e``, built once per expression.

    ``ranges`` gives the extent (values 0 … extent − 1) of the index symbols in scope: the
    free indices asked for and the summation indices of the enclosing sums.  An index that
    is an expression (``S·h + u``, ``H·W·p + W·r + s``) is gathered; a position outside the
    array reads NaN, which only a Piecewise guard that excludes it can discard."""
    key = (e, tuple(sorted(ranges.items(), key=lambda kv: str(kv[0]))))
    if key in _PLANS:
        return _PLANS[key]
    if isinstance(e, sp.Indexed):
        run = _plan_indexed(e, ranges)
    elif isinstance(e, sp.Sum):
        run = _plan_sum(e, ranges)
    elif isinstance(e, window_argmax):
        run = _plan_argmax(e, ranges)
    elif isinstance(e, sp.Symbol) and e in ranges:
        axis = (np.arange(ranges[e], dtype=np.float64), (e,))

        def run(env):
            return axis
    elif not e.has(sp.Indexed) and not (e.free_symbols & set(ranges)):
        free = e.free_symbols
        if free:
            raise ValueError(f"cannot evaluate {e}: no value for {', '.join(sorted(map(str, free)))}")
        const = (np.asarray(float(e)), ())

        def run(env):
            return const
    else:
        run = _plan_elementwise(e, ranges)
    _PLANS[key] = run
    return run


def _plan_indexed(e, ranges: dict):
    label, rank = str(e.base.label), len(e.indices)
    if all(ix.is_Integer or isinstance(ix, sp.Symbol) for ix in e.indices) and \
            len({ix for ix in e.indices if isinstance(ix, sp.Symbol)}) == sum(isinstance(ix, sp.Symbol) for ix in e.indices):
        sl = tuple(int(ix) if ix.is_Integer else slice(None) for ix in e.indices)
        axes = tuple(ix for ix in e.indices if isinstance(ix, sp.Symbol))
        ranged = [(d, ix) for d, ix in enumerate(e.indices) if isinstance(ix, sp.Symbol) and ix in ranges]
        gathered = _plan_gather(e, ranges) if ranged else None

        def run(env):
            arr = _read(env, label, rank, e)
            if any(arr.shape[d] != ranges[ix] for d, ix in ranged):
                return gathered(env)  # read over a range other than the array's (Concat's z over the inputs)
            return arr[sl], axes
        return run
    return _plan_gather(e, ranges)


def _plan_gather(e, ranges: dict):
    """Read ``e`` at every point of its indices' ranges (NaN outside the array)."""
    label, rank = str(e.base.label), len(e.indices)
    syms: list = []
    for ix in e.indices:
        for sym in sorted(ix.free_symbols, key=str):
            if sym not in syms:
                syms.append(sym)
    # an index with no range given that stands alone somewhere (n in x[n, c, S·h + u, …])
    # runs over that axis of the array
    plain = {ix: d for d, ix in enumerate(e.indices) if isinstance(ix, sp.Symbol)}
    missing = [str(sym) for sym in syms if sym not in ranges and sym not in plain]
    if missing:
        raise ValueError(f"cannot evaluate {e}: no range for the index {', '.join(missing)}")
    fns = [sp.lambdify(syms, ix, modules="numpy") for ix in e.indices]
    axes = tuple(syms)
    cache: dict = {}

    def gather(arr_shape):
        shape = [ranges[sym] if sym in ranges else arr_shape[plain[sym]] for sym in syms]
        grids = [np.arange(ext).reshape([ext if a == b else 1 for b in range(len(syms))]) for a, ext in enumerate(shape)]
        positions = [np.broadcast_to(np.asarray(fn(*grids), dtype=np.int64), shape) for fn in fns]
        valid = np.ones(shape, dtype=bool)
        for pos, size in zip(positions, arr_shape):
            valid &= (pos >= 0) & (pos < size)
        clipped = tuple(np.clip(pos, 0, size - 1) for pos, size in zip(positions, arr_shape))
        return clipped, (None if valid.all() else valid)

    def run(env):
        arr = _read(env, label, rank, e)
        if arr.shape not in cache:
            cache[arr.shape] = gather(arr.shape)
        clipped, valid = cache[arr.shape]
        out = np.asarray(arr[clipped], dtype=np.float64)
        if valid is not None:
            out = np.where(valid, out, np.nan)
        return out, axes
    return run


def _limits(e) -> list:
    out = []
    for limit in e.limits if isinstance(e, sp.Sum) else e.args[1:]:
        sym, lo, hi = limit
        if (lo.free_symbols | hi.free_symbols) if isinstance(lo, sp.Basic) else set():
            raise ValueError(f"cannot evaluate {e}: no value for "
                             f"{', '.join(sorted(map(str, lo.free_symbols | hi.free_symbols)))}")
        if int(lo) < 0:
            raise NotImplementedError(f"cannot evaluate {e}: a range starting below 0")
        out.append((sym, int(lo), int(hi)))
    return out


def _plan_sum(e, ranges: dict):
    limits = _limits(e)
    body = _plan(e.function, {**ranges, **{s: hi + 1 for s, _, hi in limits}})

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
    return run


def _plan_argmax(e, ranges: dict):
    """window_argmax(value, (u, 0, U−1), (v, 0, V−1)): the row-major position of the first
    maximum over the window, as :class:`symbp.spec.ops.window_argmax` defines it."""
    limits = _limits(e)
    body = _plan(e.args[0], {**ranges, **{s: hi + 1 for s, _, hi in limits}})
    window = [s for s, _, _ in limits]

    def run(env):
        val, axes = body(env)
        for s, _lo, hi in limits:
            if s not in axes:
                val, axes = np.repeat(val[..., None], hi + 1, axis=-1), axes + (s,)
        rest = [a for a in axes if a not in window]
        val = np.transpose(val, [axes.index(a) for a in rest] + [axes.index(s) for s in window])
        val = val[(Ellipsis, *[slice(lo, hi + 1) for _, lo, hi in limits])]
        flat = val.reshape(val.shape[: len(rest)] + (-1,))
        return np.argmax(flat, axis=-1).astype(np.float64), tuple(rest)
    return run


def _plan_elementwise(e, ranges: dict):
    subs, parts = {}, []

    def strip(x):
        if isinstance(x, (sp.Indexed, sp.Sum, window_argmax)) or (isinstance(x, sp.Symbol) and x in ranges):
            if x not in subs:
                subs[x] = sp.Dummy(f"v{len(subs)}")
                parts.append(x)
            return subs[x]
        if isinstance(x, sp.KroneckerDelta):
            return kdelta(*[strip(a) for a in x.args])
        if not x.args:
            return x
        return x.func(*[strip(a) for a in x.args])

    skeleton = strip(e)
    unknown = skeleton.free_symbols - set(subs.values())
    if unknown:
        raise ValueError(f"cannot evaluate {e}: no value for {', '.join(sorted(map(str, unknown)))}")
    fn = sp.lambdify([subs[x] for x in parts], skeleton, modules=[NUMPY_FUNCTIONS, "numpy"])
    children = [_plan(x, ranges) for x in parts]
    guarded = skeleton.has(sp.Piecewise)

    def run(env):
        arrays, axes = _align([c(env) for c in children])
        if guarded:  # NumPy's select needs its choices and conditions of one shape
            arrays = np.broadcast_arrays(*arrays)
        with np.errstate(invalid="ignore"):
            return np.asarray(fn(*arrays), dtype=np.float64), axes
    return run


def _ev(e, env: Mapping[str, np.ndarray], ranges: Mapping | None = None) -> tuple[np.ndarray, tuple]:
    return _plan(e, dict(ranges or {}))(env)


def evaluate(expr: sp.Expr, env: Mapping[str, np.ndarray], order: tuple = (), values: Mapping | None = None,
             ranges: Mapping | None = None) -> np.ndarray:
    """Evaluate an index expression with NumPy.

    Parameters
    ----------
    expr : sympy.Expr
        Built from ``Indexed`` quantities (indices may be affine expressions of index
        symbols: ``x[n, c, S*h + u, S*w + v]``), ``Sum`` over index ranges, elementwise
        functions, ``KroneckerDelta``, ``Piecewise`` guards and the arg-max ops of
        :mod:`symbp.spec.ops` (``window_argmax``, ``route``).
    env : mapping of str to numpy.ndarray
        Arrays by indexed-base label (``"W1"``, ``"x"``, ``"delta2"``).
    order : tuple of index symbols
        The free indices of the result, in the order of its axes.
    values : mapping, optional
        Numbers for the remaining symbols (widths ``d_l``, ``N``, ``lambda``).
    ranges : mapping, optional
        Extents of the free indices (symbol -> count, values 0 … count − 1); needed where an
        index appears inside an expression or as a value, else taken from the arrays.

    Examples
    --------
    >>> import numpy as np, sympy as sp
    >>> from symbp.indices import i, j
    >>> W, x = sp.IndexedBase("W"), sp.IndexedBase("x")
    >>> evaluate(sp.Sum(W[i, j] * x[j], (j, 0, 1)), {"W": np.eye(2), "x": np.array([3.0, 4.0])}, (i,))
    array([3., 4.])
    """
    e = expr.subs(values) if values else expr
    val, axes = _ev(e, env, ranges)
    missing = [a for a in axes if a not in order]
    if missing:
        raise ValueError(f"{expr} has free indices {missing} beyond {order}")
    present = [a for a in order if a in axes]
    val = np.transpose(val, [axes.index(a) for a in present]) if axes else val
    if len(present) == len(order):
        return np.asarray(val, np.float64)
    # constant along some output index (a bias has no n): give it that axis
    shape = [val.shape[present.index(a)] if a in present else 1 for a in order]
    val = np.asarray(val, np.float64).reshape(shape)
    if ranges and all(a in ranges for a in order if a not in present):  # spread it over their ranges
        val = np.broadcast_to(val, [ranges[a] if a not in present else val.shape[k] for k, a in enumerate(order)]).copy()
    return val
