"""The update's overflow proof (backends/cpu/bounds.py, the interval helpers of intervals.py):
``train_batch`` skips its copy of the parameters when ``update_bounded`` says the update
cannot overflow, so that answer must never be wrong.

The helpers are checked on generated intervals and points inside them: the value the kernel's
float32 (or float64) arithmetic computes lies in the helper's interval.  The printed proof is
checked end to end on the kernels of a small net (SGD, SGD with momentum, Adam): for
parameters, δ and gradients scaled up to overflow, whenever ``update_bounded`` says yes the
update leaves every parameter and state finite; on an ordinary step it says yes, and
``train_on_batch`` then copies nothing.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
from _support import assert_steps_are_fits

import symbp as sb
from symbp.backends.cpu import intervals
from symbp.backends.cpu.bounds import PROOF_MIN_VALUES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = {"float32": np.float32, "float64": np.float64}


def interval(dtype, big=1e30):
    """A strategy for (lo, hi) of finite values of ``dtype`` and a point inside: ((lo, hi), x)."""
    big = float(dtype(big))  # (a bound of the width: hypothesis refuses others)
    value = st.floats(-big, big, allow_nan=False, width=32 if dtype is np.float32 else 64)
    return st.tuples(value, value, st.floats(0, 1)).map(
        lambda t: ((float(min(t[0], t[1])), float(max(t[0], t[1]))),
                   dtype(min(max(min(t[0], t[1]) + t[2] * (max(t[0], t[1]) - min(t[0], t[1])),
                                 min(t[0], t[1])), max(t[0], t[1])))))


def _inside(v, x, dtype=np.float32) -> bool:
    """x (a kernel's value) within interval v, where v is one the proof accepts (within a
    sixteenth of the largest float: beyond, the kernel's value may have overflowed, and the
    proof refuses it); a NaN interval is never accepted."""
    if not intervals.fits(v, float(np.finfo(dtype).max) / 16):
        return True  # (refused: no claim to check)
    return v[0] <= float(x) <= v[1]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_each_rule_holds_what_the_kernel_computes(dtype, data):
    (a, x), (b, y) = data.draw(interval(dtype)), data.draw(interval(dtype))
    inside = functools.partial(_inside, dtype=dtype)
    with np.errstate(all="ignore"):
        assert inside(intervals.iv_add(a, b), x + y)
        assert inside(intervals.iv_mul(a, b), x * y)
        if x != 0:
            assert inside(intervals.iv_inv(a), dtype(1) / x)
        for n in (2, 3, -1, -2):
            if n > 0 or x != 0:
                assert inside(intervals.iv_pow(a, (float(n), float(n))), x ** dtype(n))
        if x >= 0:
            assert inside(intervals.iv_pow(a, (0.5, 0.5)), np.sqrt(x))
            assert inside(intervals.iv_pow(a, intervals.iv_point(0.5)), np.sqrt(x))  # (a rounded literal's)
        small = (max(a[0], -80.0), min(a[1], 80.0))
        if small[0] <= small[1]:
            assert inside(intervals.iv_exp(small), np.exp(dtype(min(max(float(x), small[0]), small[1]))))
        if x > 0:
            assert inside(intervals.iv_log(a), np.log(x))
        assert inside(intervals.iv_abs(a), abs(x))
        assert inside(intervals.iv_point(float(x)), x)


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(1e-3, 1e3), width=st.floats(0, 1e3), neg=st.booleans())
def test_ordinary_intervals_are_accepted(lo, width, neg):
    """The rules refuse only what they must: on values of ordinary size every one accepts
    (a rule that always answered NaN would pass the containment test above)."""
    a = (-lo - width, -lo) if neg else (lo, lo + width)
    b = (-1.0, 2.0)
    limit = float(np.finfo(np.float32).max) / 16
    for v in (intervals.iv_add(a, b), intervals.iv_mul(a, b), intervals.iv_inv(a), intervals.iv_abs(a),
              intervals.iv_pow(a, (2.0, 2.0)), intervals.iv_pow(a, (-3.0, -3.0)), intervals.iv_point(lo),
              intervals.iv_exp(intervals.iv_mul(a, (1e-2, 1e-2))), intervals.iv_max(a, b), intervals.iv_hull(a, b)):
        assert intervals.fits(v, limit), v
    pos = intervals.iv_abs(a)
    for v in (intervals.iv_log(pos), intervals.iv_pow(pos, intervals.iv_point(0.5)),
              intervals.iv_pow(pos, intervals.iv_point(-0.5))):
        assert intervals.fits(v, limit), v


@settings(max_examples=200, deadline=None)
@given(base=st.floats(0.0, 0.999999), t=st.integers(1, 100_000))
def test_a_decay_power_of_the_step(base, t):
    """β^t (Adam's bias correction) as the float32 kernel computes it, β rounded to float32."""
    b32 = np.float32(base)
    assert _inside(intervals.iv_pow(intervals.iv_point(float(b32)), (float(t), float(t))), b32 ** np.float32(t))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_extent_is_min_and_max_and_refuses_nan(dtype):
    extent = intervals.extent32 if dtype is np.float32 else intervals.extent64
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 13)).astype(dtype) * dtype(1e3)
    assert extent(a) == (float(a.min()), float(a.max()))
    for bad in (np.nan, -np.nan):
        b = a.copy()
        b[3, 4] = bad
        lo, hi = extent(b)
        assert math.isnan(lo) and math.isnan(hi) and not intervals.fits((lo, hi), 1e300)
    b = a.copy()
    b[0, 0], b[6, 12] = np.inf, -np.inf
    assert extent(b) == (-np.inf, np.inf) and not intervals.fits(extent(b), 1e300)
    assert extent(np.array([-0.0, -2.5, 0.0], dtype)) == (-2.5, 0.0)
    assert not intervals.fits(extent(np.zeros(0, dtype)), 1e300)


# A custom rule with a quotient of two factors and a log (the printer forms the denominator's
# product, d₁·d₂, which no node of the formula is), for the end-to-end test of the proof.
FORMULA = {"formula": lambda: sb.FormulaOptimizer("theta - lr*m*log(s/((1 + abs(theta))*(2 + abs(m))))",
                                                   state={"m": "beta*m + g"}, lr=0.1, beta=0.9, s=1e30)}
OPTIMIZERS = {"sgd": lambda: sb.SGD(lr=0.1), "momentum": lambda: sb.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
              "adam": lambda: sb.Adam(lr=0.01)}


def proven():
    """A net with enough parameters for the proof (PROOF_MIN_VALUES; below, the copy is cheaper)."""
    return sb.Network(inputs=256, layers=[sb.Dense(256, activation="tanh"), sb.Dense(3)], l2=1e-3, name="bounds-net")


def test_the_proof_is_for_nets_whose_copy_costs_more(compiled):
    """A net under PROOF_MIN_VALUES keeps the copy on every call (no update_bounded); the
    proven net is over it, and so is its compiled module."""
    assert 256 * 256 + 256 + 3 * 256 + 3 >= PROOF_MIN_VALUES
    small = compiled(sb.Network(inputs=6, layers=[sb.Dense(5, activation="tanh"), sb.Dense(3)], name="bounds-small"),
                     dtype="float32")
    small.train_on_batch(np.ones((4, 6)), np.arange(4) % 3, sb.SGD(lr=0.1))
    assert not hasattr(small._step.kernels, "update_bounded")


def _stepped(compiled, make_opt):
    """The float32 proven net after one train_on_batch with ``make_opt()``: (model, optimizer, X, y)."""
    model = compiled(proven(), dtype="float32")
    opt = make_opt()
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(8, 256)), rng.integers(0, 3, 8)
    model.train_on_batch(X, y, opt)
    return model, opt, X, y


@pytest.fixture(scope="module", params=list(OPTIMIZERS))
def stepped(request, compiled):
    """_stepped for each built-in optimizer."""
    return _stepped(compiled, OPTIMIZERS[request.param])


@pytest.fixture(scope="module", params=list(OPTIMIZERS) + list(FORMULA))
def any_stepped(request, compiled):
    """_stepped for each built-in optimizer and the custom rule."""
    return _stepped(compiled, {**OPTIMIZERS, **FORMULA}[request.param])


def test_an_ordinary_step_keeps_no_copy(stepped):
    model, opt, X, y = stepped
    assert hasattr(model._step.kernels, "update_bounded")
    model._step.keep[...] = 7.0  # (what no stash writes)
    before = {k: v.copy() for k, v in model.params.items()}
    model.train_on_batch(X, y, opt)
    assert np.all(model._step.keep == 7.0), "the step copied its parameters: the proof said no"
    assert any(not np.array_equal(before[k], model.params[k]) for k in before)


def test_an_unproven_but_finite_step_keeps_its_copy(stepped):
    """A learning rate too large for the proof (3e37: over LIMIT, a sixteenth of float32's
    largest), not for the numbers of this batch: the copy is made, the step is taken."""
    model, opt, X, y = stepped
    saved = [a.copy() for a in model._param_list() + model._state_list(opt)]
    lr = opt.hyper["lr"]
    try:
        opt.hyper["lr"] = 3e37
        model._step.keep[...] = 7.0
        loss = model.train_on_batch(X * 1e-30, np.zeros(len(y), int), opt)
        assert np.isfinite(loss)
        assert np.array_equal(model._step.keep, np.concatenate([a.ravel() for a in saved]))  # the step's start
        assert all(np.isfinite(a).all() for a in model._param_list())
    finally:
        opt.hyper["lr"] = lr
        for a, v in zip(model._param_list() + model._state_list(opt), saved):
            a[...] = v


def kernel_args(model, opt, name):
    """The arrays kernel ``name`` of the training module takes, by argument name."""
    kernels = model._step.kernels
    rows = model._step._rows
    arrays = {**model.params, **dict(zip([w for w, _ in model.kernels.WORKSPACE], model._sized(rows)))}
    arrays |= {f"{s_}_{p}": opt.state[p][s_] for p in model.kernels.PARAMS for s_ in opt.state_names}
    params = list(inspect.signature(getattr(kernels, name).py_func).parameters)
    return [arrays[a] if a != "X" else None for a in params[:-2]], params[:-2]


# (scales near overflow drawn as often as ordinary ones: that is where a wrong rule shows)
SCALE = st.one_of(st.integers(-10, 4), st.integers(30, 38))


@settings(max_examples=100, deadline=None)
@given(scales=st.lists(SCALE, min_size=4, max_size=4), lr_exp=st.integers(-4, 30),
       t=st.integers(1, 10_000), seed=st.integers(0, 2**16))
@example(scales=[0, 0, 36, 0], lr_exp=-2, t=1, seed=0)  # a state's new value overflows θ's update
def test_what_the_proof_accepts_stays_finite(any_stepped, scales, lr_exp, t, seed):
    """Parameters, δ, layer inputs and gradient sums scaled by 10^k (k up to float32's overflow):
    whenever update_bounded says the update is finite, update_from_deltas leaves every
    parameter and optimizer state finite."""
    model, opt, X, _ = any_stepped
    kernels = model._step.kernels
    rng = np.random.default_rng(seed)
    saved = {k: v.copy() for k, v in model.params.items()}
    states = {p: {k: v.copy() for k, v in s.items()} for p, s in opt.state.items()}
    try:
        args, names = kernel_args(model, opt, "update_bounded")
        x = np.clip(rng.normal(size=X.shape) * 10.0 ** scales[0], -3e38, 3e38).astype(np.float32)
        for a, name in zip(args, names):
            if a is None:
                continue
            role = model.kernels.ROLES.get(name, "parameter") if hasattr(model.kernels, "ROLES") else "parameter"
            k = {"parameter": 1, "delta": 2, "activation": 3}.get(role, 2)
            values = rng.normal(size=a.shape) * 10.0 ** scales[k]
            if name.startswith("exp_avg_sq"):
                values = np.abs(values)
            with np.errstate(over="ignore"):
                a[...] = np.clip(values, -3e38, 3e38)
        args = [x if a is None else a for a in args]
        hyper = np.array([10.0 ** -lr_exp if h == "lr" else v for h, v in opt.hyper.items()], np.float32)
        proven = kernels.update_bounded(*args, hyper, t)
        upd, unames = kernel_args(model, opt, "update_from_deltas")
        upd = [x if a is None else a for a in upd]
        with np.errstate(all="ignore"):
            kernels.update_from_deltas(*upd, hyper, t)
        finite = all(np.isfinite(a).all() for a in model._param_list() + model._state_list(opt))
        assert finite or not proven, f"the proof said finite, the update made NaN/inf (scales {scales}, lr 1e-{lr_exp})"
        if max(scales) <= 3 and lr_exp >= 1:
            assert proven, f"an ordinary step was not proven finite (scales {scales}, lr 1e-{lr_exp})"
    finally:
        for k, v in saved.items():
            model.params[k][...] = v
        for p, s in states.items():
            for k, v in s.items():
                opt.state[p][k][...] = v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_proven_steps_are_fits_steps(compiled, name, dtype):
    """With the update split from the backward pass (every δ, the proof, then the update), the
    steps are still fit's bit for bit."""
    a, b = compiled(proven(), dtype=dtype), compiled(proven(), dtype=dtype)  # (the same start)
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(16, 256)), rng.integers(0, 3, 16)
    assert_steps_are_fits(a, b, OPTIMIZERS[name], X, y)
    assert hasattr(a._step.kernels, "update_bounded")


def test_a_formula_with_no_interval_rule_keeps_the_copy(compiled):
    """A custom optimizer whose rule calls a function the proof has no rule for (tanh): the
    module keeps the copy, and an overflowing step is still undone."""
    opt = sb.FormulaOptimizer("theta - lr*tanh(g)*s", lr=0.1, s=1.0)
    model = compiled(proven(), dtype="float32")
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(8, 256)), rng.integers(0, 3, 8)
    model.train_on_batch(X, y, opt)
    assert not hasattr(model._step.kernels, "update_bounded")
    before = {k: v.copy() for k, v in model.params.items()}
    opt.hyper["s"] = 1e38  # (float32: lr·tanh(g)·s overflows where |tanh(g)| is near 1)
    opt.hyper["lr"] = 1e2
    with pytest.raises(FloatingPointError, match="it was undone"):
        model.train_on_batch(X, y, opt)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_a_product_of_denominators_is_bounded(compiled):
    """A quotient s/(d₁·d₂) whose denominator's product overflows though each factor and the
    quotient do not (|θ| = |m| = 1e20, s = 1e30): not proven, so the copy is made, and the step,
    whose log(s/inf) is −inf, is undone (it once passed the proof and left θ infinite)."""
    model, opt, X, y = _stepped(compiled, FORMULA["formula"])
    for p in model._param_list() + model._state_list(opt):  # (θ and m: their product is 1e40)
        p[...] = 1e20
    before = {k: v.copy() for k, v in model.params.items()}
    model._step.keep[...] = 7.0
    with pytest.raises(FloatingPointError, match="it was undone"):
        model.train_on_batch(np.zeros_like(X), y, opt)
    assert not np.all(model._step.keep == 7.0)  # the proof said no: the copy was made
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def conv():
    """A convolutional net over PROOF_MIN_VALUES (78,067 parameters)."""
    return sb.Network(inputs=(2, 12, 12), layers=[sb.Conv2D(64, 3, activation="relu"), sb.Flatten(),
                                                  sb.Dense(12, activation="tanh"), sb.Dense(3)], l2=1e-3, name="bounds-conv")


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_conv_nets_steps_are_fits_steps(compiled, name):
    """SGD's fused step carries the conv weights' update on its per-sample GEMM (BLAS's
    rounding), which the split step does not: no proof there (the copy), so the steps stay
    fit's bit for bit; Adam's update is a loop either way, and is proven."""
    a, b = compiled(conv(), dtype="float32"), compiled(conv(), dtype="float32")
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(8, 2, 12, 12)), rng.integers(0, 3, 8)
    assert_steps_are_fits(a, b, OPTIMIZERS[name], X, y)
    assert hasattr(a._step.kernels, "update_bounded") == (name == "adam")
