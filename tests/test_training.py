"""Training: the digits example end to end, reproducibility, the SGD update itself, and the
prediction / scoring API."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from _support import GRAD_NETS, OUTPUT_ACT_NETS, RANDOM_NETS, NetSpec, make_data, rel_err, torch_loss_and_grads

import symbp as sb
from symbp.train.model import epoch_order

# 40 epochs, not 20: this exact run (which matches PyTorch to 1e-15, see
# test_training_matches_torch_sgd) reaches 0.956 held-out accuracy after 20 epochs, 0.962
# after 30 and 0.973 after 40; an epoch of 1347 digits costs milliseconds.
EPOCHS = 40


def digits_net() -> sb.Network:
    return sb.Network(inputs=64, layers=[sb.Dense(32, activation="tanh"), sb.Dense(10)],
                      loss="softmax_cross_entropy", l2=1e-4, name="digits-test")


def regression_net() -> sb.Network:
    return sb.Network(inputs=3, layers=[sb.Dense(6, activation="tanh"), sb.Dense(1)], loss="mse",
                      l2=1e-3, name="regression-test")


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.load_digits(return_X_y=True)
    return model_selection.train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def trained(compiled, digits):
    Xtr, Xte, ytr, yte = digits
    model = compiled(digits_net(), dtype="float32", seed=0)
    initial_loss = model.evaluate(Xtr, ytr)[0]
    history = model.fit(Xtr, ytr, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=EPOCHS,
                        validation_data=(Xte, yte), shuffle=True, seed=0, progress=False)
    return model, history, initial_loss


@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1.0, 1.0, (240, 3))
    t = 0.8 * X[:, 0] - 0.6 * X[:, 1] + 0.4 * np.tanh(2 * X[:, 2]) + 0.1
    return X[:180], t[:180], X[180:], t[180:]


# -- digits -----------------------------------------------------------------------------------
def test_digits_heldout_accuracy(trained, digits):
    model, history, _ = trained
    _, Xte, _, yte = digits
    accuracy = model.score(Xte, yte)
    assert accuracy >= 0.96
    assert accuracy == pytest.approx(np.mean(model.predict(Xte) == yte))
    assert history["val_accuracy"][-1] == pytest.approx(accuracy)


def test_digits_history(trained, digits):
    model, history, _ = trained
    _, Xte, _, yte = digits
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert key in history
        assert len(history[key]) == EPOCHS, key
        assert all(isinstance(v, float) and math.isfinite(v) for v in history[key]), key
    assert all(0.0 <= v <= 1.0 for v in history["accuracy"] + history["val_accuracy"])
    # the last val_loss is the held-out loss (with the l2 term) at the final weights
    assert history["val_loss"][-1] == pytest.approx(model.evaluate(Xte, yte)[0], rel=1e-5)


def test_digits_loss_decreases(trained):
    _, history, initial_loss = trained
    loss, val_loss = history["loss"], history["val_loss"]
    assert initial_loss == pytest.approx(math.log(10), rel=0.2)  # near-uniform predictions at init
    assert loss[0] < initial_loss
    assert loss[-1] < 0.25 * loss[0]
    assert val_loss[-1] < 0.5 * val_loss[0]
    assert history["accuracy"][-1] > history["accuracy"][0]
    # a steady decline: no epoch much worse than the one before it
    assert all(b < 1.1 * a for a, b in zip(loss, loss[1:]))


def test_digits_predict_and_proba(trained, digits):
    model, _, _ = trained
    _, Xte, _, yte = digits
    labels = model.predict(Xte)
    assert labels.shape == yte.shape
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels)) <= set(range(10))
    proba = model.predict_proba(Xte)
    assert proba.shape == (len(Xte), 10)
    assert (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(proba.argmax(axis=1), labels)
    z = model.decision_function(Xte)
    assert z.shape == (len(Xte), 10) and z.dtype == np.float32
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(proba, softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    # one sample as a 1-D row, and evaluate() agrees with score()
    assert model.predict(Xte[0]).tolist() == [labels[0]]
    loss, accuracy = model.evaluate(Xte, yte)
    assert math.isfinite(loss) and accuracy == pytest.approx(model.score(Xte, yte))


def test_digits_reproducible(compiled, digits):
    Xtr, _, ytr, _ = digits
    Xtr, ytr = Xtr[:400], ytr[:400]

    def run(seed, init_seed=0):
        model = compiled(digits_net(), dtype="float32", seed=init_seed)
        model.fit(Xtr, ytr, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=2, seed=seed, progress=False)
        return model.params

    first, again, other, other_init = run(0), run(0), run(1), run(0, init_seed=1)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    assert any(not np.array_equal(first[k], other_init[k]) for k in first)


def test_init_seed(compiled):
    a = compiled(digits_net(), dtype="float32", seed=0).params
    b = compiled(digits_net(), dtype="float32", seed=0).params
    c = compiled(digits_net(), dtype="float32", seed=1).params
    assert list(a) == ["W1", "b1", "W2", "b2"]
    assert a["W1"].shape == (32, 64) and a["b1"].shape == (32,) and a["W2"].shape == (10, 32) and a["b2"].shape == (10,)
    assert all(v.dtype == np.float32 for v in a.values())
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a[key], c[key])
    assert np.abs(a["W1"]).max() <= 1 / 8 and np.abs(a["W2"]).max() <= 1 / math.sqrt(32)  # U(±1/√fan_in)


def test_digits_float64_training(compiled, digits):
    Xtr, Xte, ytr, yte = digits
    model = compiled(digits_net(), dtype="float64", seed=0)
    history = model.fit(Xtr, ytr, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=6, seed=0, progress=False)
    assert all(v.dtype == np.float64 for v in model.params.values())
    assert len(history["loss"]) == 6 and history["loss"][-1] < history["loss"][0]
    assert model.score(Xte, yte) >= 0.9
    assert model.decision_function(Xte).dtype == np.float64


def test_training_matches_torch_sgd(compiled, digits):
    """Same initial weights, batches in order (300 rows: 9 of 32 and a ragged one of 12):
    symbp's float64 SGD trajectory is PyTorch's (F.cross_entropy + l2/2·ΣW², plain SGD)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    Xtr, _, ytr, _ = digits
    Xtr, ytr = Xtr[:300], ytr[:300]
    net = digits_net()
    model = compiled(net, dtype="float64", seed=5)
    p = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    model.fit(Xtr, ytr, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=3, shuffle=False, progress=False)
    Xt, yt = torch.tensor(Xtr), torch.tensor(ytr)
    for _epoch in range(3):
        for start in range(0, len(Xtr), 32):
            idx = slice(start, start + 32)
            z = torch.tanh(Xt[idx] @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]
            loss = F.cross_entropy(z, yt[idx]) + net.l2 / 2 * ((p["W1"] ** 2).sum() + (p["W2"] ** 2).sum())
            for v in p.values():
                v.grad = None
            loss.backward()
            with torch.no_grad():
                for v in p.values():
                    v -= 0.1 * v.grad
    for key in p:
        np.testing.assert_allclose(model.params[key], p[key].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_zero_epochs_leaves_params(compiled, digits):
    Xtr, _, ytr, _ = digits
    model = compiled(digits_net(), dtype="float32", seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    history = model.fit(Xtr, ytr, epochs=0, progress=False)
    assert len(history.epoch) == 0
    for key in before:
        np.testing.assert_array_equal(model.params[key], before[key])


# -- the SGD step itself ------------------------------------------------------------------------
def test_full_batch_epoch_is_one_gradient_step(compiled, regression_data):
    """One epoch with batch_size >= N is exactly θ ← θ − lr·∂C/∂θ (l2 term included)."""
    X, t, _, _ = regression_data
    model = compiled(regression_net(), dtype="float64", seed=3)
    _, grads = model.loss_and_grads(X, t)
    expected = {k: v - 0.05 * grads[k] for k, v in model.params.items()}
    model.fit(X, t, optimizer=sb.SGD(lr=0.05), batch_size=10_000, epochs=1, shuffle=False, progress=False)
    for key in expected:
        np.testing.assert_allclose(model.params[key], expected[key], rtol=1e-12, atol=1e-14)


def assert_epoch_is_sgd_steps(model, ref, X, t, lr, batch_size, seed=None):
    """One epoch of ``model.fit`` (unshuffled, or shuffled under ``seed``) equals plain steps
    θ ← θ − lr·∂C/∂θ taken on ``ref`` (same start) with its own gradients, batch by batch on
    the rows in the fit's order, the last one ragged."""
    order = np.arange(len(X)) if seed is None else epoch_order(len(X), True, seed, 0)
    for lo in range(0, len(X), batch_size):
        rows = order[lo:lo + batch_size]
        _, grads = ref.loss_and_grads(X[rows], t[rows])
        ref.params = {k: v - lr * grads[k] for k, v in ref.params.items()}
    model.fit(X, t, optimizer=sb.SGD(lr=lr), batch_size=batch_size, epochs=1, shuffle=seed is not None,
              seed=0 if seed is None else seed,
              progress=False)
    for key in ref.params:
        np.testing.assert_allclose(model.params[key], ref.params[key], rtol=1e-12, atol=1e-14)


def test_minibatch_epoch_is_a_sequence_of_steps(compiled, regression_data):
    """shuffle=False with a ragged last batch: steps on rows [0:64], [64:128], [128:180]."""
    X, t, _, _ = regression_data
    model = compiled(regression_net(), dtype="float64", seed=4)
    ref = compiled(regression_net(), dtype="float64", seed=4)
    assert_epoch_is_sgd_steps(model, ref, X, t, 0.1, 64)


def test_a_shuffled_epoch_with_a_ragged_last_batch_is_a_sequence_of_steps(compiled, regression_data):
    """A shuffled epoch of 180 rows in batches of 64 runs its two whole batches in one
    train_epoch call and the last 52 rows in a second (runtime.epoch_calls): the same SGD steps,
    on the rows in the fit's order, as one step per batch."""
    X, t, _, _ = regression_data
    model = compiled(regression_net(), dtype="float64", seed=4)
    ref = compiled(regression_net(), dtype="float64", seed=4)
    order = epoch_order(len(X), True, 9, 0)
    assert sorted(order) == list(range(len(X))) and list(order) != sorted(order)  # (a real shuffle)
    assert_epoch_is_sgd_steps(model, ref, X, t, 0.1, 64, seed=9)


def test_a_loss_that_overflows_in_the_ragged_last_batch_names_it(compiled):
    """The last, shorter batch runs in a train_epoch call of its own: a loss that is not
    finite there is reported as that batch of the epoch (batch 2 of 4 + 4 + 2 rows), and the
    parameters go back to the epoch's start."""
    rng = np.random.default_rng(3)
    X, t = rng.normal(size=(10, 3)), rng.normal(size=10)
    X[9] = 1e200  # its squared error overflows
    model = compiled(sb.Network(inputs=3, layers=[sb.Dense(1)], loss="mse", name="linear"), dtype="float64", seed=4)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(FloatingPointError, match=r"epoch 0 \(0-based\), batch 2\b"):
        model.fit(X, t, optimizer=sb.SGD(lr=0.1), batch_size=4, epochs=1, shuffle=False, progress=False)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_train_epoch_refuses_buffers_that_are_not_its_batches(compiled, regression_data):
    """train_epoch slices no buffer: given an order that is not whole batches, or batch
    buffers of other rows, it returns -2 and changes nothing."""
    X, t, _, _ = regression_data
    model = compiled(regression_net(), dtype="float64", seed=4)
    opt = sb.SGD(lr=0.1)
    kernels = model._train_kernels(opt)
    before = {k: v.copy() for k, v in model.params.items()}
    T = t.reshape(-1, 1)
    # 10 rows in batches of 4; batches of 4 with batch buffers of 5 rows; with work buffers of 5
    for n, ws_rows, xb_rows in ((10, 4, 4), (8, 4, 5), (8, 5, 4)):
        out = kernels.train_epoch(X, T, np.arange(n), 4, np.array([0.1, 0.0, 0.0]), 0, 0, *model._param_list(),
                                  *model._sized(ws_rows), np.empty((xb_rows, 3)), np.empty((xb_rows, 1)))
        assert tuple(out) == (0.0, 0, 0, -2)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)


def test_sgd_step_with_activated_output_layer(compiled):
    """The fused SGD update is also right when the output layer has an activation (softplus,
    whose derivative needs z)."""
    spec = OUTPUT_ACT_NETS["o1-tanh-softplus-out-mse"]
    X, t = make_data(spec, n=16, seed=12)
    model, ref = compiled(spec, seed=2), compiled(spec, seed=2)
    assert_epoch_is_sgd_steps(model, ref, X, t, 0.2, 10)


def test_a_step_too_long_to_inline_is_called_and_trains_like_torch(compiled):
    """A step function is inlined into the driver that calls it unless it takes more than 30
    arguments (CPython passes those as one tuple, which Numba cannot inline): this five-layer
    net's backward pass (37) is called, its forward pass (20) inlined, and both are right —
    gradients as PyTorch's, an epoch as plain SGD steps."""
    pytest.importorskip("torch")
    spec = NetSpec("deep5-mixed-ce-l2", 5, ((4, "tanh"), (4, "relu"), (4, "sigmoid"), (4, "elu"), (3, "identity")),
                   "ce", 0.1)
    X, t = make_data(spec, n=16, seed=21)
    model, ref = compiled(spec, seed=6), compiled(spec, seed=6)
    loss, grads = model.loss_and_grads(X, t)
    want_loss, want = torch_loss_and_grads(spec, model.params, X, t)
    assert rel_err(loss, want_loss) < 1e-10
    assert max(rel_err(grads[k], want[k]) for k in want) < 1e-10
    assert_epoch_is_sgd_steps(model, ref, X, t, 0.2, 10)
    sources = model.source_path.read_text() + "".join(Path(m.__file__).read_text() for m in model._train_modules.values())
    decorators = {name: flag for flag, name in re.findall(r'@njit\(cache=True, inline="(\w+)".*\)\ndef (\w+)\(', sources)}
    assert decorators["forward"] == "always" and decorators["backward_update"] == "never"


def test_large_data_sets_are_evaluated_in_chunks(compiled):
    """More rows than one evaluation pass holds (1024): evaluate, decision_function and a
    validation set agree with loss_and_grads on the whole set."""
    net = regression_net()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2500, 3))
    t = X @ np.array([0.5, -1.0, 0.25])
    model = compiled(net, dtype="float64", seed=1)
    loss, _ = model.loss_and_grads(X, t)
    assert model.evaluate(X, t)[0] == pytest.approx(loss, rel=1e-12)
    z = model.decision_function(X)
    assert z.shape == (2500, 1)
    np.testing.assert_allclose(z[2000:], model.decision_function(X[2000:]), rtol=1e-12)
    assert loss == pytest.approx(((z[:, 0] - t) ** 2).mean() + net.l2 / 2 * sum(
        (v**2).sum() for k, v in model.params.items() if k.startswith("W")), rel=1e-10)
    history = model.fit(X[:100], t[:100], optimizer=sb.SGD(lr=0.01), batch_size=8, epochs=2,
                        validation_data=(X, t), progress=False)
    assert history["val_loss"][-1] == pytest.approx(model.evaluate(X, t)[0], rel=1e-12)
    assert model.loss_and_grads(X, t)[0] == pytest.approx(history["val_loss"][-1], rel=1e-12)


# -- regression -------------------------------------------------------------------------------
def test_regression_score_is_r2(compiled, regression_data):
    X, t, Xv, tv = regression_data
    model = compiled(regression_net(), dtype="float64", seed=0)
    history = model.fit(X, t, optimizer=sb.SGD(lr=0.1), batch_size=16, epochs=60,
                        validation_data=(Xv, tv), seed=0, progress=False)
    assert "accuracy" not in history and "val_accuracy" not in history
    assert len(history["loss"]) == 60 and len(history["val_loss"]) == 60
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    pred = model.predict(Xv)
    assert pred.shape == (len(Xv), 1)
    r2 = 1 - ((tv - pred[:, 0]) ** 2).sum() / ((tv - tv.mean()) ** 2).sum()
    score = model.score(Xv, tv)
    assert score == pytest.approx(r2, rel=1e-9)
    assert score >= 0.95
    # a constant predictor scores 0, a perfect one 1: check the formula's ends with sklearn
    metrics = pytest.importorskip("sklearn.metrics")
    assert score == pytest.approx(metrics.r2_score(tv, pred[:, 0]), rel=1e-9)
    assert math.isnan(model.evaluate(Xv, tv)[1])
    with pytest.raises(ValueError, match="classification"):
        model.predict_proba(Xv)


def test_multi_output_score_is_sklearns_r2(compiled, regression_data):
    """Several outputs: R² per output, then the plain mean (sklearn's default), and a constant
    target column scores 0 unless predicted exactly: not a variance-weighted mean, not NaN."""
    metrics = pytest.importorskip("sklearn.metrics")
    X, t, Xv, tv = regression_data
    net = sb.Network(inputs=3, layers=[sb.Dense(6, activation="tanh"), sb.Dense(3)], loss="mse", name="r2-multi")
    model = compiled(net, dtype="float64", seed=0)
    T = np.stack([t, 10 * X[:, 0], np.full(len(t), 0.5)], axis=1)
    model.fit(X, T, optimizer=sb.SGD(lr=0.05), batch_size=16, epochs=5, seed=0, progress=False)
    Tv = np.stack([tv, 10 * Xv[:, 0], np.full(len(tv), 0.5)], axis=1)
    pred = model.predict(Xv)
    assert model.score(Xv, Tv) == pytest.approx(metrics.r2_score(Tv, pred), rel=1e-12)
    per_output = metrics.r2_score(Tv, pred, multioutput="raw_values")
    assert per_output[2] == 0.0 and np.ptp(per_output[:2]) > 0.01  # the mean is not variance-weighted
    weighted = metrics.r2_score(Tv, pred, multioutput="variance_weighted")
    assert model.score(Xv, Tv) != pytest.approx(weighted, rel=1e-3)


def test_binary_predict_and_proba(compiled):
    spec = GRAD_NETS["g3-elu-softplus-bce"]
    model = compiled(spec)
    X, t = make_data(spec, n=16, seed=11)
    z = model.decision_function(X)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-z)), rtol=1e-12)
    labels = model.predict(X)
    assert labels.shape == (16, spec.outputs)
    np.testing.assert_array_equal(labels, (z > 0).astype(int))
    accuracy = model.score(X, t)
    assert accuracy == pytest.approx(np.mean((z > 0) == (t > 0.5)))


def test_single_output_binary_predict_is_1d(compiled):
    spec = RANDOM_NETS["rand0-d3-bce"]
    assert spec.outputs == 1
    model = compiled(spec)
    X, t = make_data(spec, n=16, seed=13)
    labels = model.predict(X)
    assert labels.shape == (16,)
    np.testing.assert_array_equal(labels, (model.decision_function(X)[:, 0] > 0).astype(int))
    assert model.predict_proba(X).shape == (16, 1)
    # 1-D targets are accepted for a single output unit
    assert model.loss_and_grads(X, t[:, 0])[0] == model.loss_and_grads(X, t)[0]


def test_binary_classifier_history_has_accuracy(compiled):
    """A binary_cross_entropy classifier reports val_accuracy; its history must then also
    carry the training accuracy, as a softmax classifier's does."""
    spec = GRAD_NETS["g3-elu-softplus-bce"]
    model = compiled(spec)
    X, t = make_data(spec, n=16, seed=14)
    history = model.fit(X, t, optimizer=sb.SGD(lr=0.1), batch_size=8, epochs=2, validation_data=(X, t), progress=False)
    assert len(history["val_accuracy"]) == 2
    assert "accuracy" in history and len(history["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in history["accuracy"])
