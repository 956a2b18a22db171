"""Class labels as labels: a CPU fit (and evaluate) keeps 1-D integer labels as they are and
one-hot encodes a batch at a time, instead of an (N, classes) array made up front.  The
numbers must be those of one-hot rows, bit for bit; fit's own memory must not grow with the
number of classes; the epoch's row order is NumPy's permutation, in int32."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import symbp as sb
from symbp.train.data import as_targets
from symbp.train.model import epoch_order


def _net(classes: int, dropout: bool = False) -> sb.Network:
    layers = [sb.Dense(12, activation="tanh"), *([sb.Dropout(0.25)] if dropout else []), sb.Dense(classes)]
    return sb.Network(inputs=6, layers=layers, loss="softmax_cross_entropy", l2=1e-3,
                      name=f"labels-{classes}{'-dropout' if dropout else ''}")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(203, 6))
    y = rng.integers(0, 4, 203)
    return X, y


def _train(compiled, net, X, y, **kw):
    model = compiled(net, dtype="float64", seed=3)
    history = model.fit(X, y, optimizer=sb.Adam(lr=0.01), batch_size=16, epochs=3, progress=False,
                        validation_data=(X[:60], y[:60]), **kw)
    return model, history


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
def test_labels_train_exactly_as_one_hot_rows(compiled, data, dropout, shuffle):
    """Labels of any integer dtype (and whole-number floats) give the parameters, optimizer
    state and history of the same targets given as one-hot rows, to the bit: both the gathered
    batches (shuffle) and the batches read in place (in order) one-hot encode the same rows."""
    X, y = data
    net = _net(4, dropout)
    ref, ref_history = _train(compiled, net, X, np.eye(4)[y], shuffle=shuffle)
    for labels in (y, y.astype(np.int32), y.astype(np.uint8), y.astype(np.float64)):
        model, history = _train(compiled, net, X, labels, shuffle=shuffle)
        for k in ref.params:
            assert np.array_equal(model.params[k], ref.params[k]), (labels.dtype, k)
        for p, st in ref.optimizer.state.items():
            for k, v in st.items():
                assert np.array_equal(model.optimizer.state[p][k], v), (labels.dtype, p, k)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert history[key] == ref_history[key], (labels.dtype, key)
        assert model.evaluate(X, labels) == ref.evaluate(X, np.eye(4)[y])


def test_evaluate_labels_in_chunks(compiled):
    """More rows than one evaluation pass (1024): labels one-hot encoded chunk by chunk give
    the one-hot rows' loss and accuracy exactly."""
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(2500, 6)), rng.integers(0, 5, 2500)
    model = compiled(_net(5), dtype="float64", seed=1)
    assert model.evaluate(X, y) == model.evaluate(X, np.eye(5)[y])
    assert model.score(X, y) == pytest.approx(float((model.predict(X) == y).mean()), abs=0)


def test_as_targets_keeps_int64_labels_without_a_copy():
    y = np.array([0, 2, 1, 2], np.int64)
    out = as_targets(y, 4, 3, "multiclass", np.dtype(np.float32), labels=True)
    assert out is y
    out = as_targets(y.astype(np.int8), 4, 3, "multiclass", np.dtype(np.float32), labels=True)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1, 2]
    rows = as_targets(y, 4, 3, "multiclass", np.dtype(np.float32))
    assert rows.tolist() == np.eye(3, dtype=np.float32)[y].tolist()
    for bad, message in (([0, 3, 1, 2], "label 3 out of range"), ([0, -1, 1, 2], "label -1 out of range"),
                         ([0.0, 1.5, 1, 2], "whole numbers; got 1.5"), ([0.0, np.nan, 1, 2], "NaN or inf")):
        with pytest.raises(ValueError, match=message):
            as_targets(np.array(bad), 4, 3, "multiclass", np.dtype(np.float32), labels=True)


def test_fit_memory_does_not_grow_with_classes(compiled):
    """The fit's own allocations (tracemalloc sees NumPy's) stay far below the (N, classes)
    one-hot array it used to make: here 20,000 rows × 200 classes = 30.5 MiB in float64."""
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(20_000, 6)), rng.integers(0, 200, 20_000)
    model = compiled(_net(200), dtype="float64", seed=0)
    model.fit(X[:64], y[:64], optimizer=sb.SGD(lr=0.01), batch_size=32, progress=False)  # JIT first
    tracemalloc.start()
    try:
        model.fit(X, y, optimizer=sb.SGD(lr=0.01), batch_size=32, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_hot = 20_000 * 200 * 8
    # the order (int32, 78 KiB), a snapshot of θ (~20 KiB), the batch buffers (~55 KiB)
    assert peak < one_hot / 100, f"fit's peak allocation {peak / 2**20:.2f} MiB"


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_epoch_order_is_numpys_permutation_in_int32(n):
    for seed, epoch in ((0, 0), (3, 5)):
        order = epoch_order(n, True, seed, epoch)
        assert order.dtype == np.int32
        assert np.array_equal(order, np.random.default_rng([seed, epoch]).permutation(n))
    assert np.array_equal(epoch_order(n, True, 1, 2, rank=1), np.random.default_rng([1, 2, 1]).permutation(n))
    assert np.array_equal(epoch_order(n, False, 0, 0), np.arange(n))
