"""Generated gradients against central differences (sb.gradcheck) and PyTorch autograd.

Eight small float64 networks cover every activation in a hidden layer of one net without
and one net with l2, and every loss likewise (see ``_support.GRAD_NETS``); three random
networks vary depth and widths.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import (
    GRAD_NETS,
    LOSSES,
    OUTPUT_ACT_NETS,
    RANDOM_NETS,
    NetSpec,
    make_data,
    perturb_params,
    rel_err,
    torch_loss_and_grads,
)

import symbp as sb

ALL_NETS = {**GRAD_NETS, **OUTPUT_ACT_NETS, **RANDOM_NETS}


def test_grad_nets_cover_every_activation_and_loss_with_and_without_l2():
    for with_l2 in (False, True):
        nets = [s for s in GRAD_NETS.values() if bool(s.l2) == with_l2]
        hidden = {act for s in nets for _, act in s.layers[:-1]}
        assert {"sigmoid", "tanh", "relu", "elu", "softplus", "mish"} <= hidden
        assert hidden & {"leaky_relu", "leaky_relu_default"}
        assert hidden & {"swish", "swish_sympy"}
        assert {s.loss for s in nets} == set(LOSSES)


@pytest.mark.parametrize("name", list(ALL_NETS))
def test_gradcheck(compiled, name):
    spec = ALL_NETS[name]
    model = compiled(spec)
    X, y = make_data(spec)
    err = sb.gradcheck(model, X, y)
    assert err < 1e-6, f"{name}: gradcheck relative error {err:.3g}"


def test_gradcheck_has_no_false_alarms(compiled):
    """A correct gradient (PyTorch agrees to 1e-10) passes sb.gradcheck at 1e-6 on other data
    too, not only on the data set of test_gradcheck.  Entries of ~1e-6 next to a loss of ~1
    make |analytic − numeric| ≈ 1e-11 (the rounding of (L(θ+ε) − L(θ−ε))/2ε), which the
    per-entry relative error must not turn into a failure."""
    alarms = []
    for name in ["g1-tanh-sigmoid-ce", "g3-elu-softplus-bce", "g5-sigmoid-relu-bce-l2", "rand0-d3-bce"]:
        spec = ALL_NETS[name]
        model = compiled(spec)
        for seed in range(8):
            X, y = make_data(spec, seed=seed)
            try:
                _, grads = model.loss_and_grads(X, y)
                _, ref = torch_loss_and_grads(spec, model.params, X, y)
            except ImportError:
                pass
            else:
                assert all(rel_err(grads[k], ref[k]) <= 1e-10 for k in grads)  # the gradient is right
            err = sb.gradcheck(model, X, y)
            if not err < 1e-6:
                alarms.append(f"{name} data seed {seed}: {err:.3g}")
    assert not alarms, "gradcheck >= 1e-6 for correct gradients: " + "; ".join(alarms)


def test_gradcheck_detects_a_wrong_gradient(compiled):
    """sb.gradcheck is not vacuous: gradients off by 1% (or one entry flipped) are caught."""
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = compiled(spec)
    X, y = make_data(spec)
    assert sb.gradcheck(model, X, y) < 1e-6
    honest = model.loss_and_grads

    def scaled(X, y):
        loss, grads = honest(X, y)
        return loss, {k: 1.01 * g for k, g in grads.items()}

    model.loss_and_grads = scaled
    assert sb.gradcheck(model, X, y) > 1e-3

    def flipped(X, y):
        loss, grads = honest(X, y)
        grads["b2"][1] *= -1
        return loss, grads

    model.loss_and_grads = flipped
    assert sb.gradcheck(model, X, y) > 0.5


@pytest.mark.parametrize("name", list(ALL_NETS))
def test_matches_torch_autograd(compiled, name):
    pytest.importorskip("torch")
    spec = ALL_NETS[name]
    model = compiled(spec)
    perturb_params(model, seed=3)
    X, y = make_data(spec, seed=5)
    loss, grads = model.loss_and_grads(X, y)
    ref_loss, ref_grads = torch_loss_and_grads(spec, model.params, X, y)
    assert set(grads) == set(model.params) == set(ref_grads)
    assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss), (loss, ref_loss)
    for key in model.params:
        assert grads[key].shape == model.params[key].shape
        assert grads[key].dtype == np.float64
        assert rel_err(grads[key], ref_grads[key]) <= 1e-10, f"{name} d{key}: {rel_err(grads[key], ref_grads[key]):.3g}"


@pytest.mark.parametrize("name", [n for n, s in GRAD_NETS.items() if s.loss == "ce"])
def test_one_hot_targets_same_as_labels(compiled, name):
    spec = GRAD_NETS[name]
    model = compiled(spec)
    X, labels = make_data(spec, seed=2)
    loss_l, grads_l = model.loss_and_grads(X, labels)
    loss_h, grads_h = model.loss_and_grads(X, np.eye(spec.outputs)[labels])
    assert loss_h == pytest.approx(loss_l, rel=1e-14)
    for key in grads_l:
        assert rel_err(grads_h[key], grads_l[key]) < 1e-14


def test_soft_targets_match_torch(compiled):
    """Softmax cross-entropy with class-probability rows, as torch's probability targets."""
    pytest.importorskip("torch")
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = compiled(spec)
    X, _ = make_data(spec, seed=4)
    probs = np.random.default_rng(4).dirichlet(np.ones(spec.outputs), X.shape[0])
    loss, grads = model.loss_and_grads(X, probs)
    ref_loss, ref_grads = torch_loss_and_grads(spec, model.params, X, probs)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    for key in grads:
        assert rel_err(grads[key], ref_grads[key]) <= 1e-10


def test_l2_term_is_half_lambda_sum_of_squared_weights_only(compiled):
    """The l2 net and the same net without l2 differ by exactly l2/2·ΣW² and l2·W."""
    with_l2 = GRAD_NETS["g8-swishsym-tanh-mse-l2"]
    no_l2 = NetSpec("g8-no-l2", with_l2.inputs, with_l2.layers, with_l2.loss, 0.0)
    m1, m0 = compiled(with_l2), compiled(no_l2)
    perturb_params(m1, seed=9)
    m0.params = {k: v.copy() for k, v in m1.params.items()}
    X, y = make_data(with_l2, seed=9)
    loss1, g1 = m1.loss_and_grads(X, y)
    loss0, g0 = m0.loss_and_grads(X, y)
    weights = [v for k, v in m1.params.items() if k.startswith("W")]
    assert loss1 - loss0 == pytest.approx(with_l2.l2 / 2 * sum((w**2).sum() for w in weights), rel=1e-10)
    for key in m1.params:
        expected = with_l2.l2 * m1.params[key] if key.startswith("W") else np.zeros_like(m1.params[key])
        np.testing.assert_allclose(g1[key] - g0[key], expected, rtol=1e-9, atol=1e-13)
    # and evaluate() reports the same loss (with the l2 term) as loss_and_grads
    assert m1.evaluate(X, y)[0] == pytest.approx(loss1, rel=1e-12)


def test_loss_is_batch_mean(compiled):
    """The loss of a batch is the mean of the per-sample losses (and so are the gradients)."""
    spec = GRAD_NETS["g2-relu-leaky-mse"]
    model = compiled(spec)
    X, y = make_data(spec, n=8, seed=6)
    loss, grads = model.loss_and_grads(X, y)
    singles = [model.loss_and_grads(X[i : i + 1], y[i : i + 1]) for i in range(len(X))]
    assert loss == pytest.approx(np.mean([s[0] for s in singles]), rel=1e-12)
    for key in grads:
        np.testing.assert_allclose(grads[key], np.mean([s[1][key] for s in singles], axis=0), rtol=1e-10, atol=1e-14)


def test_loss_and_grads_does_not_modify_params_or_inputs(compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = compiled(spec)
    before = {k: v.copy() for k, v in model.params.items()}
    X, y = make_data(spec)
    X0, y0 = X.copy(), y.copy()
    first = model.loss_and_grads(X, y)
    second = model.loss_and_grads(X, y)
    assert first[0] == second[0]
    for key in before:
        np.testing.assert_array_equal(model.params[key], before[key])
        np.testing.assert_array_equal(first[1][key], second[1][key])
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)


def test_returned_grads_are_not_overwritten_by_later_calls(compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = compiled(spec)
    X, y = make_data(spec, seed=0)
    _, g_first = model.loss_and_grads(X, y)
    kept = {k: v.copy() for k, v in g_first.items()}
    X2, y2 = make_data(spec, seed=1)
    model.loss_and_grads(X2, y2)
    for key in kept:
        np.testing.assert_array_equal(g_first[key], kept[key])


def test_float32_gradients_match_float64(compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    m32 = compiled(spec, dtype="float32")
    m64 = compiled(spec, dtype="float64")
    assert all(v.dtype == np.float32 for v in m32.params.values())
    m64.params = {k: v.astype(np.float64) for k, v in m32.params.items()}
    X, y = make_data(spec, seed=7)
    loss32, g32 = m32.loss_and_grads(X, y)
    loss64, g64 = m64.loss_and_grads(X, y)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for key in g64:
        assert g32[key].dtype == np.float32
        assert rel_err(g32[key], g64[key]) < 1e-4, key
    # gradcheck of a float32 model runs in float64 on the same parameters
    assert sb.gradcheck(m32, X, y) < 1e-6


# --------------------------------------------------------------------------------------------
# Numerical stability: logits of ±1000
# --------------------------------------------------------------------------------------------
def _huge_logits(model, spec):
    """Set the output layer so that the logits are about +1000, -1000 and 0."""
    last = len(spec.layers)
    W = model.params[f"W{last}"]
    model.params[f"W{last}"] = np.zeros_like(W)
    b = np.zeros(spec.outputs)
    b[0], b[1] = 1000.0, -1000.0
    model.params[f"b{last}"] = b


def test_softmax_cross_entropy_stable_for_huge_logits(compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    for dtype in ("float64", "float32"):
        model = compiled(spec, dtype=dtype)
        _huge_logits(model, spec)
        X, y = make_data(spec, seed=8)  # every class present: some samples are ~2000 off
        loss, grads = model.loss_and_grads(X, y)
        z = model.decision_function(X).astype(np.float64)
        assert np.abs(z).max() == pytest.approx(1000.0)
        lse = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
        expected = np.mean(lse - z[np.arange(len(y)), y])
        assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-6)
        for key, g in grads.items():
            assert np.isfinite(g).all(), (dtype, key)
        assert np.abs(grads["b3"]).max() <= 1.0 + 1e-6  # mean of softmax − onehot
        evaluated = model.evaluate(X, y)[0]
        assert np.isfinite(evaluated) and evaluated == pytest.approx(expected, rel=1e-6)
        proba = model.predict_proba(X)
        assert np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_binary_cross_entropy_stable_for_huge_logits(compiled):
    spec = GRAD_NETS["g3-elu-softplus-bce"]
    for dtype in ("float64", "float32"):
        model = compiled(spec, dtype=dtype)
        _huge_logits(model, spec)
        X, t = make_data(spec, seed=8)  # rows of hard 0 and 1 targets: ±1000 is badly wrong
        loss, grads = model.loss_and_grads(X, t)
        z = model.decision_function(X).astype(np.float64)
        expected = np.mean(np.logaddexp(0.0, z) - t * z)
        assert expected > 100
        assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-6)
        for key, g in grads.items():
            assert np.isfinite(g).all(), (dtype, key)
        proba = model.predict_proba(X)
        assert np.isfinite(proba).all() and (proba >= 0).all() and (proba <= 1).all()


@pytest.mark.parametrize("name", list(GRAD_NETS))
def test_huge_inputs_give_finite_loss_and_grads(compiled, name):
    """Saturated hidden units (|z| ~ 1e3) must not produce inf/NaN in any activation where
    PyTorch's float64 result is finite, and must still agree with it."""
    pytest.importorskip("torch")
    spec = GRAD_NETS[name]
    model = compiled(spec)
    X, y = make_data(spec, seed=10)
    X = 1e3 * X
    ref_loss, ref_grads = torch_loss_and_grads(spec, model.params, X, y)
    if not (np.isfinite(ref_loss) and all(np.isfinite(g).all() for g in ref_grads.values())):
        pytest.skip("the reference itself overflows for this loss")  # e.g. log(cosh(1000))
    loss, grads = model.loss_and_grads(X, y)
    assert np.isfinite(loss)
    assert loss == pytest.approx(ref_loss, rel=1e-8)
    for key, g in grads.items():
        assert np.isfinite(g).all(), key
        assert rel_err(g, ref_grads[key]) < 1e-8, key
