"""A worked example: one sample through the network, every number checked.

:func:`walkthrough` evaluates the derivation's own index formulas — the forward pass, the
loss, δ for every unit from the output layer back, and every parameter gradient — on one
sample, and checks each δ and each gradient against finite differences of the cost
(perturbing the unit's z, or the parameter, and running the forward formulas again).
Given a compiled :class:`~symbp.train.model.Model`, it also compares the outputs, the loss and the
gradients with what the generated kernels compute.

:func:`~symbp.read.index_eval.evaluate` (re-exported here) is the small interpreter underneath.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..derive import Derivation, derive
from ..indices import N, n, p
from ..indices import l2 as l2_symbol
from ..indices import seed as SEED
from ..spec.network import Network
from ..spec.ops import window_argmax
from .html_tables import MARK as _MARK
from .html_tables import err as _err
from .html_tables import num as _num
from .index_eval import NUMPY_FUNCTIONS, evaluate  # noqa: F401 - NUMPY_FUNCTIONS: part of this module's API

__all__ = ["Check", "Walkthrough", "evaluate", "walkthrough"]

_NON_SMOOTH = (sp.Heaviside, sp.Piecewise, sp.Abs, sp.sign, sp.Max, sp.Min)


# --------------------------------------------------------------------------------------------
# The worked example
# --------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One derived number next to its finite-difference estimate (and the kernels' value)."""

    label: str  # "δ o₁", "∂C/∂w₅"
    entry: str  # "delta2[0]", "W2[0,0]"
    value: float  # from the derivation's formula
    numeric: float  # finite differences
    error: float  # relative difference
    kernel: float | None = None  # the generated kernels' value, when a model was given
    kernel_error: float | None = None
    status: str = "ok"  # "ok", "FAILED", "kink" (at a non-differentiable point), "unchecked"
    theta: float | None = None  # the parameter's value (gradients only)


@dataclass
class Walkthrough:
    """One sample's forward values, δs and gradients, each checked; ``print(w)`` shows the tables.

    Attributes
    ----------
    x, t : numpy.ndarray
        The sample and its target row (one-hot for softmax cross-entropy).
    params : dict of str to numpy.ndarray
        The parameters used (float64).
    z, a, delta : list of numpy.ndarray
        Per layer (index 0 is layer 1), one value per unit (an image's entries flat, in
        (channel, row, column) order; ``network.shapes`` has their shapes).
    loss : float
        C for this sample, l2 term included.
    grads : dict of str to numpy.ndarray
        ∂C/∂θ from the derivation's formulas, keys as in ``params``.
    checks : list of Check
        Every δ and every gradient entry against finite differences (and the kernels).
    """

    network: Network
    derivation: Derivation
    x: np.ndarray
    t: np.ndarray
    params: dict
    z: list
    a: list
    delta: list
    loss: float
    grads: dict
    checks: list = field(default_factory=list)
    unit_names: list = field(default_factory=list)  # per layer (0: inputs), per unit
    #: per layer, the values of its stages before z (the padded input, a window's arg-max, …),
    #: by stage name, one sample's shape
    stages: list = field(default_factory=list)
    #: every array the derivation's formulas filled for the sample (a batch of one), by
    #: label: stages, a, δ, the stage gradients (gxpad1, gy2, …), the loss's definitions
    values: dict = field(default_factory=dict, repr=False)
    param_names: dict = field(default_factory=dict)  # (name, flat index) -> "w₅"
    kernel_loss: float | None = None
    kernel_output: np.ndarray | None = None
    tolerance: float = 1e-6
    max_rows: int = 16

    @property
    def max_error(self) -> float:
        """The largest relative difference of any checked number."""
        errs = [c.error for c in self.checks if c.status in ("ok", "FAILED")]
        errs += [c.kernel_error for c in self.checks if c.kernel_error is not None]
        return max(errs, default=0.0)

    @property
    def ok(self) -> bool:
        """True when every checked number agreed (kinks excepted)."""
        return all(c.status != "FAILED" for c in self.checks)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()

    def table(self, fmt: str = "text") -> str:
        """The worked example as tables: ``fmt="text"`` (aligned columns) or ``"markdown"``."""
        if fmt not in ("text", "markdown"):
            raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
        return _render(self, fmt)

    def to_markdown(self) -> str:
        return self.table("markdown")

    def _repr_html_(self) -> str:
        """Jupyter's rich display: the tables as HTML, each number with its ✓ (or ✗) mark."""
        from .html_tables import walkthrough_html

        return walkthrough_html(self)

    def graph(self, collapse: bool | None = None):
        """The computational graph of this sample, edges labelled with its values and
        gradients (see :mod:`symbp.read.graph`)."""
        from .graph_draw import draw

        return draw(self, collapse)


def _as_network(obj):
    from ..train.model import Model

    if isinstance(obj, Model):
        return obj.network, obj
    if isinstance(obj, Network):
        return obj, None
    raise TypeError(f"walkthrough() takes a symbp Network or a compiled Model, got {type(obj).__name__}")


def _numeric_array(value) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _vector(value, size: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be numbers, got {value!r}") from None
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 0 and size == 1:
        arr = arr.reshape(1)
    if arr.shape != (size,):
        raise ValueError(f"{what} must hold {size} number{'s' if size != 1 else ''} (one sample), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    return arr


def _target(net: Network, t) -> np.ndarray:
    K = net.outputs
    if net.loss.task == "multiclass":
        arr = np.asarray(t)
        if arr.ndim == 0 or (arr.ndim == 1 and arr.size == 1 and K != 1):
            if not np.issubdtype(arr.dtype, np.integer) and not float(arr.reshape(-1)[0]).is_integer():
                raise ValueError(f"t must be a class label 0..{K - 1} or a one-hot row of {K}, got {t!r}")
            label = int(arr.reshape(-1)[0])
            if not 0 <= label < K:
                raise ValueError(f"t = {label} is not a class label 0..{K - 1}")
            return np.eye(K)[label]
        return _vector(t, K, "t (the target row)")
    row = _vector(t, K, "t (the target)")
    if net.loss.task == "binary" and (np.any(row < 0) or np.any(row > 1)):
        raise ValueError(f"binary cross-entropy targets must lie in [0, 1], got {row.tolist()}")
    return row


def check_params(net: Network, params) -> dict[str, np.ndarray]:
    """``params`` as float64 arrays with the network's shapes; errors name the parameter."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of name -> array (keys {', '.join(net.param_shapes())}), "
                        f"got {type(params).__name__}")
    shapes = net.param_shapes()
    unknown = sorted(set(params) - set(shapes))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; this network has {', '.join(shapes)}")
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"params is missing {', '.join(missing)} (give every parameter: {', '.join(shapes)})")
    out = {}
    for name, shape in shapes.items():
        try:
            arr = np.array(params[name], dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"params[{name!r}] must be numbers, got {params[name]!r}") from None
        if arr.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {arr.shape}, expected {shape}"
                             + (" (W is (out, in))" if name.startswith("W") else ""))
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"params[{name!r}] must be finite")
        out[name] = arr
    return out


class _Evaluator:
    """The derivation's formulas on one sample: every stage, the loss, δs, stage gradients and
    parameter gradients, each evaluated as SymPy derived it (sizes fixed to numbers)."""

    def __init__(self, d: Derivation) -> None:
        self.d = d
        net = d.network
        # (seed 0: Dropout's masks as loss_and_grads draws them, so the kernels compare)
        self.values = {N: 1, l2_symbol: net.l2, SEED: 0, **{d.dims[l]: w for l, w in enumerate(net.widths)}, **d.sizes}
        fixed = lambda e: sp.sympify(e).subs(self.values)  # noqa: E731
        extents = lambda idx, dims: {s_: int(fixed(ext)) for s_, ext in zip(idx, dims)}  # noqa: E731
        self.stages, self.outputs, self.deltas, self.stage_grads, self.grads = {}, {}, {}, {}, {}
        #: stages that pick a window's arg-max: piecewise constant, a perturbation that
        #: changes one of them crosses a kink of the cost
        self.switches = []
        for ld in d.layers:
            l = ld.index
            # a batch stage (BatchNorm's mean) is one value for the batch: no sample axis
            # (n over the one sample: a formula that reads no array, Dropout's mask, needs it)
            self.stages[l] = [(str(st.target.label), fixed(st.formula), st.at(st.idx).indices,
                               {**({} if st.batch else {n: 1}), **extents(st.idx, st.dims)}) for st in ld.stages]
            self.switches += [st[0] for st, raw in zip(self.stages[l], ld.stages) if raw.formula.has(window_argmax)]
            shape = net.shapes[l]
            self.outputs[l] = (fixed(ld.output), (n, *ld.out_idx), dict(zip(ld.out_idx, shape)))
            self.deltas[l] = (fixed(ld.delta_formula), (n, *ld.delta_idx), dict(zip(ld.delta_idx, shape)))
            stage_of = {str(st.target.label): st for st in ld.stages}
            self.stage_grads[l] = [(str(gb.label), fixed(g), stage_of[label].at(free).indices,
                                    extents(free, stage_of[label].dims))
                                   for label, (gb, free, g) in ld.stage_grads.items()]
            for key, g in ld.grads.items():
                idx = ld.param_idx[key]
                self.grads[(key, l)] = (fixed(g), idx, extents(idx, ld.param_dims[key]))
        self.per_sample = fixed(d.loss.per_sample)
        self.definitions = {str(b.label): fixed(e) for b, e in d.loss.definitions.items()}
        self.decayed = [str(ld.params[key].label) for ld in d.layers for key in ld.decay]
        self.base: dict | None = None  # the arg-max stages of the unperturbed sample
        self.switched = False

    def run_forward(self, env: dict, start: int = 1, z_start: np.ndarray | None = None) -> float:
        """Fill every stage and a from layer ``start`` on (with ``z_start`` as that layer's z
        if given) and return the cost C of the sample."""
        for ld in self.d.layers[start - 1:]:
            l = ld.index
            stages = self.stages[l]
            if l == start and z_start is not None:
                env[stages[-1][0]] = z_start
                stages = []
            for label, formula, order, ranges in stages:
                env[label] = evaluate(formula, env, order, ranges=ranges)
            out, order, ranges = self.outputs[l]
            env[f"a{l}"] = evaluate(out, env, order, ranges=ranges)
        if self.base is not None:
            self.switched = any(not np.array_equal(env[s_], self.base[s_]) for s_ in self.switches if s_ in env)
        env["y"] = env[f"a{len(self.d.layers)}"]
        ell = evaluate(self.per_sample, env, (n,))
        penalty = 0.5 * self.d.network.l2 * sum(float(np.sum(env[name] ** 2)) for name in self.decayed)
        return float(np.mean(ell)) + penalty

    def run_backward(self, env: dict) -> None:
        for name, definition in self.definitions.items():
            env[name] = evaluate(definition, env, (n, p))
        for ld in reversed(self.d.layers):
            formula, order, ranges = self.deltas[ld.index]
            env[f"delta{ld.index}"] = evaluate(formula, env, order, ranges=ranges)
            for label, formula, order, ranges in self.stage_grads[ld.index]:
                env[label] = evaluate(formula, env, order, ranges=ranges)

    def gradient(self, env: dict, key: str, l: int) -> np.ndarray:
        formula, order, ranges = self.grads[(key, l)]
        return evaluate(formula, env, order, ranges=ranges)


def _numeric(f, h: float, analytic: float, scale: float, tolerance: float) -> float:
    """The five-point derivative at step h; where that misses the tolerance, the one at h/4
    instead (a fixed rule, whatever either says): the stencil's truncation error is O(h⁴), a
    sharply curved cost (a BatchNorm over few values, whose σ is small) needs the smaller
    step, and its rounding error grows only fourfold."""
    num = _five_point(f, h)
    return _five_point(f, h / 4) if _rel(analytic, num, scale) > tolerance else num


def _five_point(f, h: float) -> float:
    return (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h)


def _rel(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(a) + abs(b), scale)


def walkthrough(
    net,
    x=None,
    t=None,
    params: Mapping | None = None,
    seed: int | None = 0,
    h: float = 1e-3,
    tolerance: float = 1e-6,
    max_checks: int | None = None,
) -> Walkthrough:
    """One sample's forward values, δ per unit and every parameter gradient, each checked.

    Parameters
    ----------
    net : Network or Model
        With a compiled :class:`~symbp.train.model.Model` the kernels' outputs, loss and gradients
        are compared too, and its parameters are the default.
    x, t : array-like, optional
        The sample (``inputs`` numbers) and its target (a class label or one-hot row for
        softmax cross-entropy, ``outputs`` numbers otherwise); random with ``seed`` if None.
    params : dict, optional
        Every parameter (``W1, b1, …``; ``W`` is (out, in)); the default initialisation with
        ``seed`` if None.
    h : float
        Finite-difference step of the five-point stencil (float64 throughout).
    tolerance : float
        Largest accepted relative difference.
    max_checks : int, optional
        Entries of each parameter checked by finite differences; all of them by default for
        networks of up to 500 parameters, else 64 per parameter, chosen with ``seed``.

    Returns
    -------
    Walkthrough
        ``print(w)`` shows the tables; ``w.ok`` says whether every check passed.

    Examples
    --------
    The classic 2-2-2 sigmoid network with the MSE loss:

    >>> import symbp as sb
    >>> from symbp.read.walkthrough import walkthrough
    >>> net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2, activation="sigmoid")],
    ...                  loss="mse")
    >>> w = walkthrough(net, x=[0.05, 0.10], t=[0.01, 0.99],
    ...                 params={"W1": [[0.15, 0.20], [0.25, 0.30]], "b1": [0.35, 0.35],
    ...                         "W2": [[0.40, 0.45], [0.50, 0.55]], "b2": [0.60, 0.60]})
    >>> round(w.loss, 9), round(float(w.grads["W2"][0, 0]), 9), w.ok
    (0.298371109, 0.082167041, True)
    """
    net, model = _as_network(net)
    for pos, layer in enumerate(net.layers, 1):
        if layer.running_keys and math.prod(net.in_shape(pos)[1:]) < 2:
            # fit refuses such a batch; one sample through BatchNorm1d is its own mean: z = β
            warnings.warn(f"layer {pos} ({layer!r}) normalises one sample by its own statistics: its output is "
                          "β and every gradient below it 0, so this walkthrough's checks below it hold trivially; "
                          "a batch of two or more rows (fit, loss_and_grads) is what it trains on", stacklevel=2)
    for name, value in (("h", h), ("tolerance", tolerance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if max_checks is not None and (isinstance(max_checks, bool) or not isinstance(max_checks, int) or max_checks < 1):
        raise ValueError(f"max_checks must be a whole number >= 1, got {max_checks!r}")
    rng = np.random.default_rng(seed)
    width = net.widths[0]
    if x is not None and np.shape(x) in (net.input_shape, (1, *net.input_shape)):
        x = np.reshape(np.asarray(x, dtype=np.float64) if _numeric_array(x) else x, -1)
    x = rng.normal(0.0, 1.0, width) if x is None else _vector(x, width, "x (one sample's inputs)")
    if t is None:
        K = net.outputs
        t = {"multiclass": lambda: np.eye(K)[rng.integers(0, K)], "binary": lambda: rng.integers(0, 2, K).astype(float)
             }.get(net.loss.task, lambda: rng.normal(0.0, 1.0, K))()
    else:
        t = _target(net, t)
    if params is None:
        source = model.params if model is not None else net.init_params(seed, np.dtype(np.float64))
        params = {k: np.asarray(v, np.float64).copy() for k, v in source.items()}
    params = check_params(net, params)
    d = model.derivation if model is not None else derive(net)
    ev = _Evaluator(d)
    env = {"x": x.reshape(1, *net.input_shape), "t": t[None, :], **params}
    loss = ev.run_forward(env)
    ev.run_backward(env)
    ev.base = {s_: env[s_].copy() for s_ in ev.switches}
    # one value per unit, flat (C order, as the kernels store an image); the shapes are net.shapes
    z = [env[str(ld.z.label)][0].reshape(-1).copy() for ld in d.layers]
    a = [env[f"a{ld.index}"][0].reshape(-1).copy() for ld in d.layers]
    delta = [env[f"delta{ld.index}"][0].reshape(-1).copy() for ld in d.layers]
    # a batch stage (BatchNorm's mean) has no sample axis: kept whole
    stages = [{str(st.target.label): env[str(st.target.label)].copy() if st.batch else env[str(st.target.label)][0].copy()
               for st in ld.stages[:-1]} for ld in d.layers]
    grads = {}
    for ld in d.layers:
        for key in ld.grads:
            grads[f"{key}{ld.index}"] = ev.gradient(env, key, ld.index)

    names, pnames = _names(d)
    w = Walkthrough(net, d, x, t, params, z, a, delta, loss, grads, unit_names=names, param_names=pnames,
                    tolerance=tolerance, stages=stages, values={k: v.copy() for k, v in env.items()})
    scale = 1e-5 * max(1.0, abs(loss))  # a δ or gradient far below the cost is judged against this
    kinks = _kinks(d, z, h)

    switched = []  # whether some perturbation of the current check moved a window's arg-max

    def cost_with(mutate) -> float:
        trial = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in env.items()}
        start, z_start = mutate(trial)
        cost = ev.run_forward(trial, start, z_start)
        switched.append(ev.switched)
        return cost

    for ld in reversed(d.layers):
        l = ld.index
        for u in range(net.widths[l]):
            def shifted(s, l=l, u=u):
                def mutate(trial):
                    zz = env[str(d.layers[l - 1].z.label)].copy()
                    zz.reshape(-1)[u] += s
                    return l, zz
                return cost_with(mutate)

            switched.clear()
            val = float(delta[l - 1][u])
            num = _numeric(shifted, h * max(1.0, abs(z[l - 1][u])), val, scale, tolerance)
            err = _rel(val, num, scale)
            status = "ok" if err <= tolerance else ("kink" if (l, u) in kinks or any(switched) else "FAILED")
            w.checks.append(Check(f"δ {names[l][u]}", _entry(f"delta{l}", net.shapes[l], u), val, num, err,
                                  status=status))
    total = sum(v.size for v in params.values())
    limit = max_checks if max_checks is not None else (None if total <= 500 else 64)
    for name, value in params.items():
        if name not in grads:
            continue  # running statistics (BatchNorm's): kept, not trained, no gradient
        flat_idx = np.arange(value.size)
        if limit is not None and value.size > limit:
            flat_idx = np.sort(rng.choice(value.size, limit, replace=False))
        checked = set(flat_idx.tolist())
        for k in range(value.size):
            entry = _entry(name, value.shape, k)
            val = float(grads[name].reshape(-1)[k])
            theta = float(value.reshape(-1)[k])
            if k not in checked:
                w.checks.append(Check(f"∂C/∂{pnames.get((name, k), entry)}", entry, val, float("nan"), float("nan"),
                                      status="unchecked", theta=theta))
                continue

            def shifted(s, name=name, k=k):
                def mutate(trial):
                    arr = trial[name].copy()
                    arr.reshape(-1)[k] += s
                    trial[name] = arr
                    return 1, None
                return cost_with(mutate)

            switched.clear()
            num = _numeric(shifted, h * max(1.0, abs(theta)), val, scale, tolerance)
            err = _rel(val, num, scale)
            status = "ok" if err <= tolerance else ("kink" if kinks or any(switched) else "FAILED")
            w.checks.append(Check(f"∂C/∂{pnames.get((name, k), entry)}", entry, val, num, err, status=status, theta=theta))
    if model is not None:
        _compare_kernels(w, model)
    return w


def _compare_kernels(w: Walkthrough, model) -> None:
    """The generated kernels on the same sample: outputs, loss and every gradient."""
    net = w.network
    saved = model.params
    model.params = {k: v.astype(model.dtype) for k, v in w.params.items()}
    try:
        X = w.x[None, :]
        T = w.t[None, :]
        w.kernel_output = np.asarray(model.decision_function(X), np.float64)[0]
        kloss, kgrads = model.loss_and_grads(X, T)
    finally:
        model.params = saved
    w.kernel_loss = float(kloss)
    tol = 1e-4 if model.dtype == np.float32 else 1e-9
    scale = (1e-6 if model.dtype == np.float32 else 1e-12) * max(1.0, abs(w.loss))
    shapes = net.param_shapes()
    for c in w.checks:
        name = c.entry.split("[")[0]
        if name in shapes:
            idx = _unentry(c.entry, shapes[name])
            c.kernel = float(np.asarray(kgrads[name], np.float64)[idx])
            c.kernel_error = _rel(c.value, c.kernel, scale)
            if c.kernel_error > tol:
                c.status = "FAILED"
    w.kernel_tolerance = tol


def _entry(name: str, shape: tuple, k: int) -> str:
    idx = np.unravel_index(k, shape)
    return f"{name}[{','.join(str(int(v)) for v in idx)}]"


def _unentry(entry: str, shape: tuple) -> tuple:
    inside = entry[entry.index("[") + 1 : -1]
    return tuple(int(v) for v in inside.split(","))


def _kinks(d: Derivation, z: list, h: float) -> set:
    """Units whose activation has a kink within reach of the finite-difference stencil."""
    out = set()
    for ld in d.layers:
        deriv = ld.layer.activation.derivative
        if any(deriv.has(f) for f in _NON_SMOOTH):
            for u, value in enumerate(z[ld.index - 1]):
                if abs(value) <= 4 * h * max(1.0, abs(value)):
                    out.add((ld.index, u))
    return out


def _names(d: Derivation) -> tuple[list, dict]:
    """Unit and parameter names: the scalar view's (x₁, h₁, w₅) for small networks of affine
    layers, indexed otherwise (a1[3], W1[3,2]; an image's entries by their indices,
    z1[k=0, h=1, w=2])."""
    from .explain import MAX_SCALAR_UNITS, scalar_names
    from .printing import text

    net = d.network
    dense = all(ld.affine for ld in d.layers)
    if dense and max(net.widths) <= MAX_SCALAR_UNITS:
        sn = scalar_names(d)
        units = [[text(u) for u in layer] for layer in sn.units]
        pnames = {}
        keys = {ld.index: ld.affine for ld in d.layers}  # (weight, bias): W and b for Dense
        for (l, u, j), sym in sn.weights.items():
            pnames[(f"{keys[l][0]}{l}", u * net.widths[l - 1] + j)] = text(sym)
        for (l, u), sym in sn.biases.items():
            pnames[(f"{keys[l][1]}{l}", u)] = text(sym)
        return units, pnames
    if dense:
        units = [[f"x[{u}]" for u in range(net.widths[0])]]
        units += [[f"a{l}[{u}]" for u in range(w)] for l, w in enumerate(net.widths[1:], 1)]
        return units, {}
    in_idx = ("c", "h", "w") if len(net.shapes[0]) == 3 else ("j",)
    units = [unit_names("x", in_idx, net.shapes[0])]
    units += [unit_names(str(ld.z.label), tuple(map(str, ld.out_idx)), net.shapes[ld.index]) for ld in d.layers]
    return units, {}


def unit_names(label: str, idx: tuple, shape: tuple) -> list[str]:
    """Every entry of a one-sample array, flat in C order: ``z1[k=0, h=1, w=2]`` for several
    indices, ``z4[3]`` for one."""
    if len(shape) == 1:
        return [f"{label}[{u}]" for u in range(shape[0])]
    return [f"{label}[" + ", ".join(f"{name}={int(v)}" for name, v in zip(idx, np.unravel_index(u, shape))) + "]"
            for u in range(int(np.prod(shape)))]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _grid(rows: list[list[str]], fmt: str, right: set) -> list[str]:
    if fmt == "markdown":
        head = "| " + " | ".join(rows[0]) + " |"
        rule = "|" + "|".join("---:" if c in right else "---" for c in range(len(rows[0]))) + "|"
        return [head, rule] + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [cell.rjust(widths[c]) if c in right else cell.ljust(widths[c]) for c, cell in enumerate(r)]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _render(w: Walkthrough, fmt: str) -> str:
    net = w.network
    L = len(w.derivation.layers)
    md = fmt == "markdown"
    h = (lambda s: f"**{s}**") if md else (lambda s: s)
    vec = lambda v: _bounded_vector(v, 4 * w.max_rows)  # noqa: E731
    out = [h(f"Worked example: {net.name} ({' → '.join(map(str, net.widths))}, loss {net.loss.name}), one sample"),
           ""]
    out.append(f"{'  ' if not md else ''}x = {vec(w.x)}    t = {vec(w.t)}" + (f"    λ = {net.l2:g}" if net.l2 else ""))
    out += ["", h("Forward pass")]
    rows = [["layer", "unit", "z", "a = f(z)"]]
    for l in range(1, L + 1):
        units = range(len(w.z[l - 1]))
        for u in list(units)[: w.max_rows]:
            rows.append([str(l), w.unit_names[l][u], _num(float(w.z[l - 1][u])), _num(float(w.a[l - 1][u]))])
        if len(units) > w.max_rows:
            rows.append([str(l), f"… {len(units) - w.max_rows} more", "", ""])
    out += _grid(rows, fmt, {2, 3})
    out.append("")
    if any(w.stages):
        out += [h("Intermediate stages (each layer's formulas before z)")]
        rows = [["layer", "entry", "value"]]
        for l, stages in enumerate(w.stages, 1):
            ld = w.derivation.layers[l - 1]
            for label, value in stages.items():
                st = next(s_ for s_ in ld.stages if str(s_.target.label) == label)
                names = unit_names(label, tuple(map(str, st.idx)), value.shape)
                flat = value.reshape(-1)
                for u in range(min(flat.size, w.max_rows)):
                    rows.append([str(l), names[u], _num(float(flat[u]))])
                if flat.size > w.max_rows:
                    rows.append([str(l), f"… {flat.size - w.max_rows} more of {label}", ""])
        out += _grid(rows, fmt, {2})
        out.append("")
    loss_line = f"cost C = {_num(w.loss)}" + (" (l2 term included)" if net.l2 else "")
    if w.kernel_loss is not None:
        loss_line += f"; generated kernels: {_num(w.kernel_loss)}"
    if w.kernel_output is not None:
        diff = float(np.max(np.abs(w.kernel_output - w.a[-1])))
        loss_line += f"; kernels' outputs differ by at most {diff:.1e}"
    out += [("  " if not md else "") + loss_line, ""]
    out.append(h("Backward pass: δ = ∂C/∂z per unit, from the output layer back, against finite differences of C"))
    rows = [["layer", "unit", "δ", "finite difference", "rel. error", ""]]
    deltas = [c for c in w.checks if c.entry.startswith("delta")]
    per_layer: dict = {}
    for c in deltas:
        l = int(c.entry[5 : c.entry.index("[")])
        per_layer.setdefault(l, []).append(c)
    for l in sorted(per_layer, reverse=True):
        cs = per_layer[l]
        for c in cs[: w.max_rows]:
            rows.append([str(l), c.label[2:], _num(c.value), _num(c.numeric), _err(c.error), _MARK[c.status]])
        if len(cs) > w.max_rows:
            rest = cs[w.max_rows:]
            rows.append([str(l), f"… {len(rest)} more", "", "", _err(max(c.error for c in rest)), _summary(rest)])
    out += _grid(rows, fmt, {2, 3, 4})
    out += ["", h("Parameter gradients ∂C/∂θ against finite differences"
                  + (" and the generated kernels" if w.kernel_loss is not None else ""))]
    head = ["θ", "entry", "value", "∂C/∂θ", "finite difference", "rel. error"]
    if w.kernel_loss is not None:
        head += ["kernels", "rel. error"]
    rows = [head + [""]]
    grads = [c for c in w.checks if not c.entry.startswith("delta")]
    by_param: dict = {}
    for c in grads:
        by_param.setdefault(c.entry.split("[")[0], []).append(c)
    for name, cs in by_param.items():
        for c in cs[: w.max_rows]:
            label = c.label[len("∂C/∂"):]
            row = [label if label != c.entry else name, c.entry, _num(c.theta), _num(c.value), _num(c.numeric),
                   _err(c.error)]
            if w.kernel_loss is not None:
                row += [_num(c.kernel), _err(c.kernel_error)]
            rows.append(row + [_MARK[c.status]])
        if len(cs) > w.max_rows:
            rest = cs[w.max_rows:]
            row = [name, f"… {len(rest)} more", "", "", "", _err(max((c.error for c in rest if c.status != "unchecked"),
                                                                    default=float("nan")))]
            if w.kernel_loss is not None:
                row += ["", _err(max((c.kernel_error or 0.0) for c in rest))]
            rows.append(row + [_summary(rest)])
    out += _grid(rows, fmt, {2, 3, 4, 5, 6, 7})
    out.append("")
    n_checked = sum(c.status in ("ok", "FAILED", "kink") for c in w.checks)
    verdict = "all agree" if w.ok else "SOME DISAGREE"
    out.append(("  " if not md else "") + f"{n_checked} numbers checked against five-point finite differences "
               f"(tolerance {w.tolerance:g}): {verdict}; largest relative difference {w.max_error:.1e}.")
    if any(c.status == "kink" for c in w.checks):
        out.append(("  " if not md else "") + "~ kink: a unit sits at a kink of its activation (z ≈ 0), where finite "
                   "differences average the one-sided slopes.")
    return "\n".join(out)


def _bounded_vector(v, limit: int) -> str:
    """``[1, 2, …]`` with at most ``limit`` numbers shown."""
    shown = ", ".join(_num(float(x)) for x in v[:limit])
    return "[" + shown + (f", … {len(v) - limit} more" if len(v) > limit else "") + "]"


def _summary(checks: list) -> str:
    statuses = {c.status for c in checks}
    if statuses <= {"ok"}:
        return "all ✓"
    if "FAILED" in statuses:
        return "✗ some FAILED"
    if statuses == {"unchecked"}:
        return "not checked"
    return "✓ (" + ", ".join(sorted(s for s in statuses if s != "ok")) + ")"
