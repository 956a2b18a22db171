"""Differential fuzzing of user formulas against PyTorch autograd (issue 12).

Hypothesis builds expression trees over every function the formula parser accepts and
renders each tree twice: as the text a user would type (``sb.Dense(4, activation=text)``,
a loss in ``y`` and ``t``, a ``FormulaOptimizer`` rule) and as PyTorch operations on float64
tensors.  A formula the parser accepts must compile, and the generated kernels' loss,
gradients, predictions (and an optimizer's updated weights) must equal PyTorch's on random
data with non-zero biases — and the five-point differences of ``sb.gradcheck``.  A refused
one must raise the parser's own error (``FormulaError``), nothing else.

Points where the reference itself is not finite (log of a negative number, an overflowing
exp) say nothing about the kernel and are skipped (``assume``), as are kinks the finite
differences straddle.  CI runs a fixed seed and a bounded number of examples (the ``ci``
profile, see conftest.py); ``pytest --hypothesis-profile=long tests/test_formula_fuzz.py``
is the deep run before a release.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import symbp as sb  # noqa: E402
from symbp.spec.formula import FormulaError  # noqa: E402

F = torch.nn.functional

# -- the trees ------------------------------------------------------------------------------
# Every function the parser accepts by default (symbp.spec.formula.DEFAULT_FUNCTIONS) and the
# textbook ops (symbp.spec.ops.FORMULA_FUNCTIONS), each with its PyTorch twin.
UNARY = {
    "exp": torch.exp, "tanh": torch.tanh, "sinh": torch.sinh, "cosh": torch.cosh,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "atan": torch.atan,
    "asinh": torch.asinh, "erf": torch.erf, "sign": torch.sign, "abs": torch.abs,
    "log": torch.log, "sqrt": torch.sqrt, "log1p": torch.log1p,
    "sigmoid": torch.sigmoid, "softplus": F.softplus, "relu": torch.relu,
}
BINARY = {
    "max": torch.maximum, "min": torch.minimum, "pow": torch.pow,
    "log": lambda x, base: torch.log(x) / torch.log(base),
}
# Functions whose second argument is a number: (name, torch twin of f(x, c)).
WITH_CONSTANT = {
    "leaky_relu": lambda x, c: F.leaky_relu(x, c),
    "elu": lambda x, c: F.elu(x, c),
}
NUMBERS = ["0", "1", "2", "3", "0.5", "0.1", "1.702", "0.044715", "10", "pi", "e"]
OPS = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div, "**": torch.pow, "^": torch.pow}


def _number(text: str) -> float:
    return {"pi": math.pi, "e": math.e}.get(text) or float(text)


def trees(variables: list[str]):
    leaf = st.one_of(st.sampled_from([("var", v) for v in variables]),
                     st.sampled_from([("num", t) for t in NUMBERS]))

    def grow(child):
        return st.one_of(
            st.tuples(st.just("un"), st.sampled_from(sorted(UNARY)), child),
            st.tuples(st.just("bin"), st.sampled_from(sorted(OPS)), child, child),
            st.tuples(st.just("neg"), child),
            st.tuples(st.just("fn2"), st.sampled_from(sorted(BINARY)), child, child),
            st.tuples(st.just("fnc"), st.sampled_from(sorted(WITH_CONSTANT)), child,
                      st.sampled_from(["0.01", "0.2", "1", "1.5"])),
        )

    return st.recursive(leaf, grow, max_leaves=6)


def text(tree) -> str:
    kind = tree[0]
    if kind == "var":
        return tree[1]
    if kind == "num":
        return tree[1]
    if kind == "un":
        return f"{tree[1]}({text(tree[2])})"
    if kind == "neg":
        return f"-({text(tree[1])})"
    if kind == "bin":
        return f"({text(tree[2])}){tree[1]}({text(tree[3])})"
    if kind == "fn2":
        return f"{tree[1]}({text(tree[2])}, {text(tree[3])})"
    return f"{tree[1]}({text(tree[2])}, {tree[3]})"


def torch_eval(tree, env: dict):
    kind = tree[0]
    if kind == "var":
        return env[tree[1]]
    if kind == "num":
        return torch.tensor(_number(tree[1]), dtype=torch.float64)
    if kind == "un":
        return UNARY[tree[1]](torch_eval(tree[2], env))
    if kind == "neg":
        return -torch_eval(tree[1], env)
    if kind == "bin":
        return OPS[tree[1]](torch_eval(tree[2], env), torch_eval(tree[3], env))
    if kind == "fn2":
        return BINARY[tree[1]](torch_eval(tree[2], env), torch_eval(tree[3], env))
    return WITH_CONSTANT[tree[1]](torch_eval(tree[2], env), float(tree[3]))


# -- comparing ------------------------------------------------------------------------------
RTOL = 1e-9  # relative to the largest entry of each array: rounding, not a wrong formula


def close(ours, ref, what: str) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    assert err <= RTOL * scale, f"{what}: max |symbp − torch| = {err:.3g} (scale {scale:.3g})\nsymbp {ours}\ntorch {ref}"


def finite_and_tame(*tensors) -> bool:
    # Past ~1e8 the float64 rounding of intermediate steps, amplified by a steep formula,
    # reaches the tolerance; such points test the condition number, not the derivation.
    return all(bool(torch.isfinite(t).all()) and float(t.detach().abs().max()) < 1e8 for t in tensors)


def parse_or_refuse(build):
    """The object ``build()`` makes, or None when the parser refused with its own error.
    (``--hypothesis-show-statistics`` counts the outcomes.)"""
    try:
        made = build()
    except FormulaError:
        event("refused by the parser")
        return None
    event("accepted")
    return made


def finite_reference(*tensors) -> None:
    if not finite_and_tame(*tensors):
        event("skipped: the reference is not finite (or beyond 1e8) there")
    assume(finite_and_tame(*tensors))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-generated")


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                     HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

RNG_DATA = np.random.default_rng(12)
X = RNG_DATA.normal(size=(5, 3))
T = RNG_DATA.normal(size=(5, 2))


def _torch_params(model):
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}


def _torch_grads(loss, params) -> dict:
    if not loss.requires_grad:  # a formula that does not depend on the parameters
        return {k: torch.zeros_like(v) for k, v in params.items()}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out = {}
    for (k, v), g in zip(params.items(), grads):
        out[k] = torch.zeros_like(v) if g is None else g
    return out


# -- activations ----------------------------------------------------------------------------
@FUZZ
@given(tree=trees(["z"]))
def test_custom_activation_matches_torch(tree, cache):
    formula = text(tree)
    layer = parse_or_refuse(lambda: sb.Dense(4, activation=formula))
    if layer is None:
        return  # refused with the parser's own error: allowed
    net = sb.Network(inputs=3, layers=[layer, sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64", seed=3, cache_dir=cache)
    # Non-zero biases: the bug this test was written for counted b twice in 2·(x·Wᵀ + b).
    model.params["b1"] = np.linspace(-0.7, 0.9, 4)
    model.params["b2"] = np.array([0.3, -0.4])
    P = _torch_params(model)
    z1 = torch.tensor(X) @ P["W1"].T + P["b1"]
    a1 = torch_eval(tree, {"z": z1})
    a1 = a1.expand_as(z1) if a1.dim() == 0 or a1.shape != z1.shape else a1
    y = a1 @ P["W2"].T + P["b2"]
    loss = ((y - torch.tensor(T)) ** 2).mean()
    finite_reference(loss, y)
    ref = _torch_grads(loss, P)
    finite_reference(*ref.values())
    ours_loss, ours_grads = model.loss_and_grads(X, T)
    close(model.decision_function(X), y.detach().numpy(), f"predictions of {formula!r}")
    close(ours_loss, loss.item(), f"loss of {formula!r}")
    for k in P:
        close(ours_grads[k], ref[k].numpy(), f"∂C/∂{k} of {formula!r}")
    event("compared: matches PyTorch")


# -- losses ---------------------------------------------------------------------------------
@FUZZ
@given(tree=trees(["y", "t"]))
def test_custom_loss_matches_torch(tree, cache):
    formula = text(tree)
    net = parse_or_refuse(lambda: sb.Network(inputs=3, layers=[sb.Dense(2)], loss=formula))
    if net is None:
        return
    model = sb.compile(net, dtype="float64", seed=5, cache_dir=cache)
    model.params["b1"] = np.array([0.25, -0.6])
    P = _torch_params(model)
    y = torch.tensor(X) @ P["W1"].T + P["b1"]
    e = torch_eval(tree, {"y": y, "t": torch.tensor(T)})
    loss = e.expand_as(y).mean() if e.dim() == 0 or e.shape != y.shape else e.mean()
    finite_reference(loss)
    ref = _torch_grads(loss, P)
    finite_reference(*ref.values())
    ours_loss, ours_grads = model.loss_and_grads(X, T)
    close(ours_loss, loss.item(), f"loss {formula!r}")
    for k in P:
        close(ours_grads[k], ref[k].numpy(), f"∂C/∂{k} of loss {formula!r}")
    event("compared: matches PyTorch")
    # Five-point differences too, where no kink lies within their reach.
    assume(not any(f in formula for f in ("sign", "abs", "max", "min", "relu", "elu")))
    assert sb.gradcheck(model, X, T) < 1e-5, formula


# -- optimizer rules ------------------------------------------------------------------------
@FUZZ
@given(state=trees(["m", "g", "theta", "beta"]), update=trees(["theta", "g", "m", "lr"]))
def test_formula_optimizer_matches_numpy(state, update, cache):
    """One fused update step: the state rule, then θ's rule reading the new state."""
    opt = parse_or_refuse(lambda: sb.FormulaOptimizer(text(update), state={"m": text(state)}, lr=0.1, beta=0.9))
    if opt is None:
        return
    net = sb.Network(inputs=3, layers=[sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64", seed=7, cache_dir=cache)
    model.params["b1"] = np.array([0.25, -0.6])
    before = {k: v.copy() for k, v in model.params.items()}
    _, grads = model.loss_and_grads(X, T)
    expected = {}
    for k, theta in before.items():
        env = {"theta": torch.tensor(theta), "g": torch.tensor(grads[k]), "m": torch.zeros_like(torch.tensor(theta)),
               "lr": torch.tensor(0.1, dtype=torch.float64), "beta": torch.tensor(0.9, dtype=torch.float64)}
        env["m"] = torch_eval(state, env).expand_as(env["theta"])
        expected[k] = torch_eval(update, env).expand_as(env["theta"])
        # fit refuses a step that leaves the optimizer state non-finite too
        finite_reference(env["m"])
    finite_reference(*expected.values())
    model.fit(X, T, optimizer=opt, batch_size=len(X), epochs=1, shuffle=False, progress=False)
    for k in before:
        close(model.params[k], expected[k].numpy(), f"{k} after θ ← {text(update)!r}, m ← {text(state)!r}")
    event("compared: matches PyTorch")


# -- the cases this file was written for, pinned -----------------------------------------------
ZERO = torch.zeros((), dtype=torch.float64)
PINNED = {  # issue 12's silently wrong activations, each with its PyTorch twin
    "2*z": lambda z: 2 * z,
    "tanh(2*z)": lambda z: torch.tanh(2 * z),
    "z*sigmoid(1.702*z)": lambda z: z * torch.sigmoid(1.702 * z),
    "0.5*z*(1+tanh(0.7978845608*(z+0.044715*z**3)))":
        lambda z: 0.5 * z * (1 + torch.tanh(0.7978845608 * (z + 0.044715 * z**3))),
    "max(z, 0.01*z)": lambda z: torch.maximum(z, 0.01 * z),
    "z/2 + tanh(z)/2": lambda z: z / 2 + torch.tanh(z) / 2,
    "max(z, 0)": lambda z: torch.maximum(z, ZERO),
    "min(z, 0)": lambda z: torch.minimum(z, ZERO),
    "max(0, min(z, 6))": lambda z: torch.maximum(ZERO, torch.minimum(z, ZERO + 6)),
}


@pytest.mark.parametrize("formula", sorted(PINNED))
def test_issue12_activations(formula, cache):
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation=formula), sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64", seed=3, cache_dir=cache)
    model.params["b1"] = np.linspace(-0.7, 0.9, 4)
    P = _torch_params(model)
    z = torch.tensor(X) @ P["W1"].T + P["b1"]
    y = PINNED[formula](z) @ P["W2"].T + P["b2"]
    loss = ((y - torch.tensor(T)) ** 2).mean()
    ref = _torch_grads(loss, P)
    ours_loss, ours_grads = model.loss_and_grads(X, T)
    close(model.decision_function(X), y.detach().numpy(), formula)
    close(ours_loss, loss.item(), formula)
    for k in P:
        close(ours_grads[k], ref[k].numpy(), f"∂C/∂{k} of {formula}")


@pytest.mark.parametrize("formula", ["max(y - t, 0)", "sign(y - t)*(y - t)", "elu(y - t, 1)", "leaky_relu(y - t, 0.1)"])
def test_issue12_losses_compile_and_match(formula, cache):
    net = sb.Network(inputs=3, layers=[sb.Dense(2)], loss=formula)
    model = sb.compile(net, dtype="float64", seed=5, cache_dir=cache)
    P = _torch_params(model)
    y = torch.tensor(X) @ P["W1"].T + P["b1"]
    d = y - torch.tensor(T)
    e = {"max(y - t, 0)": torch.relu(d), "sign(y - t)*(y - t)": torch.sign(d) * d,
         "elu(y - t, 1)": F.elu(d, 1.0), "leaky_relu(y - t, 0.1)": F.leaky_relu(d, 0.1)}[formula]
    loss = e.mean()
    ref = _torch_grads(loss, P)
    ours_loss, ours_grads = model.loss_and_grads(X, T)
    close(ours_loss, loss.item(), formula)
    for k in P:
        close(ours_grads[k], ref[k].numpy(), f"∂C/∂{k} of {formula}")


# -- NaN goes through, as in PyTorch ----------------------------------------------------------
# The fuzzer skips points where the reference is not finite; a NaN weight (a diverged step)
# must still reach the predictions and the loss, whose check stops training.  relu(NaN) was 0
# and max/min kept their other argument (Python's comparisons), so a NaN weight trained on
# silently.
NAN_FORMULAS = {
    "relu": torch.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "tanh": torch.tanh,
    "max(z, 0)": lambda z: torch.maximum(z, ZERO), "max(0, z)": lambda z: torch.maximum(ZERO, z),
    "min(z, 1)": lambda z: torch.minimum(z, ZERO + 1), "max(0, min(z, 6))": PINNED["max(0, min(z, 6))"],
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("formula", sorted(NAN_FORMULAS))
def test_a_nan_weight_reaches_the_predictions_and_loss_like_torch(formula, dtype, cache):
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation=formula), sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype=dtype, seed=3, cache_dir=cache)
    model.params["W1"][1, 2] = np.nan  # unit 1's z is NaN for every sample
    P = _torch_params(model)
    y = NAN_FORMULAS[formula](torch.tensor(X) @ P["W1"].T + P["b1"]) @ P["W2"].T + P["b2"]
    assert torch.isnan(y).all()  # PyTorch: every output reads unit 1
    assert np.isnan(model.decision_function(X)).all(), formula
    assert np.isnan(model.loss_and_grads(X, T)[0]), formula
