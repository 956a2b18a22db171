"""``Model.train_on_batch(X, y)`` (Keras's name): one step of fit, its loss returned, its checks
made inside one compiled call.

The step is fit's bit for bit (SGD and Adam, a net with BatchNorm and Dropout, labels or
one-hot targets); bad X or labels are refused by name with nothing changed; a NaN loss
changes nothing; an update that overflows is undone (parameters and optimizer state as
before the call); a parameter array the user replaced between calls is the one trained.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from _support import assert_steps_are_fits

import symbp as sb


def tiny():
    return sb.Network(inputs=6, layers=[sb.Dense(5, activation="tanh"), sb.Dense(3)], l2=1e-3, name="tob-tiny")


def bn_dropout():
    x = sb.Input(6)
    h = sb.Dense(5, activation="relu")(x)
    r = sb.Dense(5, activation="tanh")(sb.Dropout(0.3)(sb.BatchNorm()(h)))
    return sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Add()([h, r])), name="tob-bn")


def data(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 6)), rng.integers(0, 3, rows)


def pair(compiled, net):
    a, b = compiled(net), compiled(net)
    for k in a.params:
        b.params[k][...] = a.params[k] + 0.01  # (copies of one memo: the same start, own arrays)
        a.params[k][...] = b.params[k]
    return a, b


@pytest.mark.parametrize("make_opt", [lambda: sb.SGD(lr=0.1, momentum=0.9), lambda: sb.Adam(lr=0.01)],
                         ids=["momentum", "adam"])
def test_steps_are_fits_steps(compiled, make_opt):
    a, b = pair(compiled, tiny())
    X, y = data()
    oa, ob = assert_steps_are_fits(a, b, make_opt, X, y)
    assert oa.step == ob.step == 3
    assert a.optimizer is oa and a.epoch == 0 and a.history.epoch == []  # no epoch counted


def test_batchnorm_dropout_step_and_one_hot_targets(compiled):
    a, b = pair(compiled, bn_dropout())
    X, y = data()
    T = np.eye(3)[y]
    loss = a.train_on_batch(X, T, sb.SGD(lr=0.1))
    history = b.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=len(X), epochs=1, shuffle=False, progress=False)
    assert loss == history.history["loss"][0]
    for k in a.params:  # running statistics included
        np.testing.assert_array_equal(a.params[k], b.params[k])
    with pytest.raises(ValueError, match="at least 2 values per feature"):
        a.train_on_batch(X[:1], y[:1])


def stepped(compiled, opt):
    """The tiny model after one step with ``opt``: (model, X, y, its parameters then)."""
    model = compiled(tiny())
    X, y = data()
    model.train_on_batch(X, y, opt)
    return model, X, y, {k: v.copy() for k, v in model.params.items()}


def test_bad_batches_change_nothing(compiled):
    opt = sb.SGD(lr=0.1)
    model, X, y, before = stepped(compiled, opt)
    Xbad = X.copy()
    Xbad[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or inf \(first at row 5, column 2\)"):
        model.train_on_batch(Xbad, y)
    with pytest.raises(ValueError, match=r"label 7 out of range: the network has 3 classes"):
        model.train_on_batch(X, np.where(np.arange(len(y)) == 4, 7, y))
    with pytest.raises(ValueError, match="features per sample"):
        model.train_on_batch(X[:, :5], y)
    with pytest.raises(ValueError, match="X has 8 samples but y has 7"):
        model.train_on_batch(X, y[:7])
    with pytest.raises(TypeError, match="optimizer must be"):
        model.train_on_batch(X, y, "sgd")
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert opt.step == 1


def test_a_nan_loss_changes_nothing(compiled):
    net = sb.Network(inputs=6, layers=[sb.Dense(3, activation="log(z)")], loss="mse", name="tob-log")
    model = compiled(net)
    X, _ = data()
    opt = sb.SGD(lr=0.1)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(FloatingPointError, match="loss of this batch is NaN or infinite: the update was not made"):
        model.train_on_batch(X, np.ones((len(X), 3)), opt)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert opt.step == 0


def test_an_overflowing_update_is_undone(compiled):
    """A finite loss whose update overflows: parameters and Adam's moments as they were."""
    opt = sb.Adam(lr=0.01)
    model, X, y, before = stepped(compiled, opt)
    state = {k: {s_: v.copy() for s_, v in st.items()} for k, st in opt.state.items()}
    opt.hyper["lr"] = 1e308  # (what a schedule would set; the kernel reads it each call)
    with pytest.raises(FloatingPointError, match="left parameters or optimizer state NaN or infinite: it was undone"):
        model.train_on_batch(X, y, opt)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
        for s_, arr in state[k].items():
            np.testing.assert_array_equal(opt.state[k][s_], arr)
    assert opt.step == 1
    opt.hyper["lr"] = 0.01
    assert np.isfinite(model.train_on_batch(X, y, opt)) and opt.step == 2


def test_a_replaced_parameter_array_is_the_one_trained(compiled):
    model = compiled(tiny())
    X, y = data()
    opt = sb.SGD(lr=0.1)
    model.train_on_batch(X, y, opt)
    model.params["W1"] = np.zeros((5, 6))  # a new array (float64 like the model): no longer the cached one
    model.train_on_batch(X, y, opt)
    assert np.abs(model.params["W1"]).max() > 0  # the zeros were trained
    model.params["W2"] = [[0.0] * 5] * 3  # a list is brought in line, as fit does
    model.train_on_batch(X, y, opt)
    assert isinstance(model.params["W2"], np.ndarray) and np.abs(model.params["W2"]).max() > 0
    twin = copy.copy(model)  # shares the arrays until given its own: then trains its own
    twin.params = {k: v.copy() for k, v in model.params.items()}
    before = {k: v.copy() for k, v in model.params.items()}
    twin.train_on_batch(X, y, opt)
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert any(np.any(twin.params[k] != v) for k, v in before.items())


def test_batches_of_other_sizes_and_a_step_given_other_rows(compiled):
    """The step slices no work buffer: train_on_batch passes buffers of each batch's rows, so
    batches of 8, 3 and 8 rows in turn train as fit's full-batch steps do; the compiled step
    given buffers of other rows refuses (status 4) and changes nothing."""
    a, b = pair(compiled, tiny())
    oa, ob = sb.SGD(lr=0.1), sb.SGD(lr=0.1)
    for rows, seed in ((8, 1), (3, 2), (8, 3)):
        X, y = data(rows, seed)
        loss = a.train_on_batch(X, y, oa)
        assert loss == b.fit(X, y, optimizer=ob, batch_size=rows, epochs=1, shuffle=False,
                             progress=False).history["loss"][-1]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    X, y = data(3, 4)
    step = a._step
    before = {k: v.copy() for k, v in a.params.items()}
    X_, T = step.data(X, y)
    out = step.kernels.train_batch(X_, T, step.hyper(), oa.step, step.seed(), *step.arrays(8), step.keep)
    assert out[3] == 4
    for k, v in before.items():
        np.testing.assert_array_equal(a.params[k], v)
