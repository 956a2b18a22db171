"""Every user mistake becomes a ValueError or TypeError whose message names the problem.

No kernel runs in this file: every check happens before the generated code is called, so
these models are generated but never JIT-compiled.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp

import symbp as sb

BAD = (ValueError, TypeError)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def clf(cache):
    """64 inputs, 10 classes."""
    net = sb.Network(inputs=64, layers=[sb.Dense(10)], loss="softmax_cross_entropy", name="bad-clf")
    return sb.compile(net, dtype="float64", cache_dir=cache)


@pytest.fixture(scope="module")
def bce(cache):
    net = sb.Network(inputs=4, layers=[sb.Dense(2)], loss="binary_cross_entropy", name="bad-bce")
    return sb.compile(net, dtype="float64", cache_dir=cache)


@pytest.fixture(scope="module")
def reg(cache):
    net = sb.Network(inputs=4, layers=[sb.Dense(2)], loss="mse", name="bad-reg")
    return sb.compile(net, dtype="float64", cache_dir=cache)


def good_clf_data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 64)), rng.integers(0, 10, n)


# -- declaring a network ------------------------------------------------------------------------
def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="swishy"):
        sb.Dense(4, activation="swishy")
    with pytest.raises(ValueError, match="(?i)activation"):
        sb.Dense(4, activation="swishy")


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="hinge"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], loss="hinge")
    with pytest.raises(ValueError, match="(?i)loss"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], loss="hinge")


@pytest.mark.parametrize("formula", ["z*(", "z +* 2", "tanh(z", "z z"])
def test_activation_formula_that_does_not_parse(formula):
    with pytest.raises(ValueError, match="(?i)parse|syntax"):
        sb.Dense(4, activation=formula)


def test_loss_formula_that_does_not_parse():
    with pytest.raises(ValueError, match="(?i)parse|syntax"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], loss="log(cosh(y - t)")


def test_activation_formula_with_other_symbol_names_it():
    with pytest.raises(ValueError, match="'w'"):
        sb.Dense(4, activation="z*w")
    with pytest.raises(ValueError, match="'x'"):
        sb.Dense(4, activation="tanh(x)")


def test_loss_formula_with_other_symbol_names_it():
    with pytest.raises(ValueError, match="'s'"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], loss="(y - t)**2 * s")


def test_activation_unknown_function_is_named():
    with pytest.raises(ValueError, match="gelu"):
        sb.Dense(4, activation="gelu(z) + z")


def test_sympy_activation_with_two_free_symbols():
    x, w = sp.symbols("x w")
    with pytest.raises(ValueError, match="(?i)one free symbol") as info:
        sb.Dense(4, activation=x * w)
    assert "x" in str(info.value) and "w" in str(info.value)


def test_sympy_activation_with_no_free_symbol():
    with pytest.raises(ValueError, match="(?i)free symbol"):
        sb.Dense(4, activation=sp.Integer(3))


def test_sympy_loss_with_foreign_symbol_is_named():
    y, t, q = sp.symbols("y t q")
    with pytest.raises(ValueError, match="q"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], loss=(y - t) ** 2 + q)


def test_activation_of_wrong_type():
    with pytest.raises(TypeError, match="(?i)activation"):
        sb.Dense(4, activation=3.5)


@pytest.mark.parametrize("units", [0, -3])
def test_non_positive_layer_size(units):
    with pytest.raises(ValueError, match=rf"(?i)positive.*{units}|{units}.*positive"):
        sb.Dense(units)


@pytest.mark.parametrize("units", ["3", 3.0, None, True])
def test_layer_size_of_wrong_type(units):
    with pytest.raises(TypeError, match="(?i)units.*int"):
        sb.Dense(units)


@pytest.mark.parametrize("inputs", [0, -1])
def test_non_positive_inputs(inputs):
    with pytest.raises(ValueError, match="(?i)inputs"):
        sb.Network(inputs=inputs, layers=[sb.Dense(2)])


def test_inputs_of_wrong_type():
    with pytest.raises(TypeError, match="(?i)inputs"):
        sb.Network(inputs="64", layers=[sb.Dense(2)])


def test_empty_layers():
    with pytest.raises(ValueError, match="(?i)layers"):
        sb.Network(inputs=3, layers=[])


def test_layer_that_is_not_a_layer():
    with pytest.raises(TypeError, match="(?i)layer 2"):
        sb.Network(inputs=3, layers=[sb.Dense(2), 5])


@pytest.mark.parametrize("l2", [-1e-4, float("nan"), float("inf")])
def test_bad_l2(l2):
    with pytest.raises(ValueError, match="l2"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], l2=l2)


def test_l2_of_wrong_type():
    with pytest.raises(BAD, match="l2"):
        sb.Network(inputs=3, layers=[sb.Dense(2)], l2="0.1")


def test_unknown_activation_parameter_is_named():
    with pytest.raises(ValueError, match="alpha"):
        sb.Dense(4, activation="leaky_relu", alpha=0.1)
    with pytest.raises(ValueError, match="(?i)finite|slope"):
        sb.Dense(4, activation="leaky_relu", slope=float("nan"))


def test_softmax_needs_two_outputs():
    with pytest.raises(ValueError, match="(?i)2 output"):
        sb.Network(inputs=3, layers=[sb.Dense(1)], loss="softmax_cross_entropy")


# -- from_config ----------------------------------------------------------------------------------
def test_from_config_round_trip():
    net = sb.Network(inputs=5, layers=[sb.Dense(4, activation="elu", alpha=0.5), sb.Dense(3, activation="z*sigmoid(z)"),
                                       sb.Dense(2)], loss="mse", l2=0.01, name="cfg")
    again = sb.Network.from_config(net.to_config())
    assert again.fingerprint() == net.fingerprint()
    assert again.widths == [5, 4, 3, 2]
    assert again.layers[0].activation.params == {"alpha": 0.5}


def test_from_config_unknown_layer_type():
    with pytest.raises(ValueError, match="conv2d") as info:
        sb.Network.from_config({"inputs": 4, "layers": [{"type": "dense", "units": 3}, {"type": "conv2d", "units": 3}]})
    assert "layer 2" in str(info.value)


def test_from_config_missing_units():
    with pytest.raises(ValueError, match="units") as info:
        sb.Network.from_config({"inputs": 4, "layers": [{"type": "dense", "activation": "tanh"}]})
    assert "layer 1" in str(info.value)


def test_from_config_other_mistakes():
    with pytest.raises(ValueError, match="inputs"):
        sb.Network.from_config({"layers": [{"units": 3}]})
    with pytest.raises(ValueError, match="layers"):
        sb.Network.from_config({"inputs": 4, "layers": []})
    with pytest.raises(ValueError, match="lossy"):
        sb.Network.from_config({"inputs": 4, "lossy": "mse", "layers": [{"units": 3}]})
    with pytest.raises(ValueError, match="activaton"):
        sb.Network.from_config({"inputs": 4, "layers": [{"units": 3, "activaton": "tanh"}]})
    with pytest.raises(TypeError, match="units"):
        sb.Network.from_config({"inputs": 4, "layers": [{"units": "3"}]})
    with pytest.raises(ValueError, match="nope"):
        sb.Network.from_config({"inputs": 4, "layers": [{"units": 3, "activation": "nope"}]})


# -- compile ------------------------------------------------------------------------------------------
def test_unknown_target(cache):
    net = sb.Network(inputs=3, layers=[sb.Dense(2)])
    with pytest.raises(ValueError, match="gpu"):
        sb.compile(net, target="gpu", cache_dir=cache)


@pytest.mark.parametrize("dtype", ["float16", "int32", "complex128", "banana"])
def test_unknown_dtype(cache, dtype):
    net = sb.Network(inputs=3, layers=[sb.Dense(2)])
    with pytest.raises(BAD, match=dtype):
        sb.compile(net, dtype=dtype, cache_dir=cache)


def test_compile_needs_a_network(cache):
    with pytest.raises(TypeError, match="Network"):
        sb.compile({"inputs": 3}, cache_dir=cache)


# -- data -----------------------------------------------------------------------------------------------
def test_wrong_width_says_expected_and_got(clf):
    X, y = good_clf_data()
    with pytest.raises(ValueError) as info:
        clf.loss_and_grads(X[:, :63], y)
    assert "64" in str(info.value) and "63" in str(info.value)
    for call in (clf.predict, clf.decision_function, clf.predict_proba):
        with pytest.raises(ValueError, match="63"):
            call(X[:, :63])
    with pytest.raises(ValueError, match="63"):
        clf.fit(X[:, :63], y, epochs=1, progress=False)


def test_wrong_number_of_dimensions(clf):
    X, y = good_clf_data()
    with pytest.raises(ValueError, match="2-D"):
        clf.predict(X.reshape(8, 8, 8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_X(clf, bad):
    X, y = good_clf_data()
    X[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf") as info:
        clf.loss_and_grads(X, y)
    assert "row 3" in str(info.value) and "column 5" in str(info.value)
    with pytest.raises(ValueError, match="NaN or inf"):
        clf.fit(X, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        clf.predict(X)


def test_non_finite_targets(reg):
    X = np.zeros((4, 4))
    T = np.zeros((4, 2))
    T[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        reg.loss_and_grads(X, T)


@pytest.mark.parametrize("label", [10, 12, -1])
def test_label_out_of_range_is_named(clf, label):
    X, y = good_clf_data()
    y[4] = label
    with pytest.raises(ValueError, match=rf"(?i)label {label}\b.*range") as info:
        clf.loss_and_grads(X, y)
    assert "10" in str(info.value)  # the number of classes
    with pytest.raises(ValueError, match=rf"label {label}\b"):
        clf.fit(X, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match=rf"label {label}\b"):
        clf.score(X, y)


def test_label_out_of_range_in_validation_data(clf):
    X, y = good_clf_data()
    yv = y.copy()
    yv[0] = 11
    with pytest.raises(ValueError, match=r"label 11\b"):
        clf.fit(X, y, epochs=1, validation_data=(X, yv), progress=False)


def test_non_integer_labels(clf):
    X, y = good_clf_data()
    y = y.astype(float)
    y[2] = 2.5
    with pytest.raises(ValueError, match=r"(?i)whole|integer") as info:
        clf.loss_and_grads(X, y)
    assert "2.5" in str(info.value)


def test_string_labels(clf):
    X, _ = good_clf_data()
    with pytest.raises(TypeError, match="y"):
        clf.loss_and_grads(X, np.array(["a"] * 8))


def test_empty_X(clf):
    with pytest.raises(ValueError, match="(?i)empty"):
        clf.loss_and_grads(np.empty((0, 64)), np.empty((0,), dtype=int))
    with pytest.raises(ValueError, match="(?i)empty"):
        clf.predict(np.empty((0, 64)))


def test_X_y_length_mismatch(clf):
    X, y = good_clf_data()
    with pytest.raises(ValueError, match="8") as info:
        clf.loss_and_grads(X, y[:7])
    assert "7" in str(info.value)
    with pytest.raises(ValueError, match="7"):
        clf.fit(X, y[:7], epochs=1, progress=False)


def test_targets_of_wrong_shape(reg):
    with pytest.raises(ValueError, match="3"):
        reg.loss_and_grads(np.zeros((4, 4)), np.zeros((4, 3)))


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(clf, batch_size):
    X, y = good_clf_data()
    with pytest.raises(ValueError, match=rf"batch_size.*{batch_size}"):
        clf.fit(X, y, batch_size=batch_size, epochs=1, progress=False)


@pytest.mark.parametrize("batch_size", [2.0, "32", True])
def test_batch_size_of_wrong_type(clf, batch_size):
    X, y = good_clf_data()
    with pytest.raises(TypeError, match="batch_size"):
        clf.fit(X, y, batch_size=batch_size, epochs=1, progress=False)


@pytest.mark.parametrize("epochs", [-1, 1.5])
def test_bad_epochs(clf, epochs):
    X, y = good_clf_data()
    with pytest.raises(BAD, match="epochs"):
        clf.fit(X, y, epochs=epochs, progress=False)


def test_bad_validation_data(clf):
    X, y = good_clf_data()
    with pytest.raises(ValueError, match="validation_data"):
        clf.fit(X, y, epochs=1, validation_data=X, progress=False)


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="(?i)learning rate"):
        sb.SGD(lr=lr)


def test_optimizer_of_wrong_type(clf):
    X, y = good_clf_data()
    with pytest.raises(TypeError, match="optimizer"):
        clf.fit(X, y, optimizer="sgd", epochs=1, progress=False)


@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_bce_targets_outside_unit_interval(bce, value):
    X = np.zeros((4, 4))
    T = np.full((4, 2), 0.5)
    T[1, 0] = value
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        bce.loss_and_grads(X, T)
    assert str(value) in str(info.value)


def test_one_hot_rows_must_sum_to_one(clf):
    X, _ = good_clf_data()
    T = np.eye(10)[np.arange(8)]
    T[3, 4] = 1.0  # a row with two ones
    with pytest.raises(ValueError, match="(?i)sum") as info:
        clf.loss_and_grads(X, T)
    assert "one-hot" in str(info.value)
    T = np.eye(10)[np.arange(8)]
    T[5] = 0.0  # an all-zero row
    with pytest.raises(ValueError, match="(?i)sum"):
        clf.loss_and_grads(X, T)
    T = np.full((8, 10), 0.1)
    T[0, 0], T[0, 1] = 1.1, -0.1  # sums to 1 but negative
    with pytest.raises(ValueError, match="(?i)non-negative"):
        clf.loss_and_grads(X, T)


def test_bad_params_assignment(clf):
    model = sb.compile(clf.network, dtype="float64", cache_dir=clf.source_path.parent)
    X, y = good_clf_data()
    model.params["W1"] = np.zeros((10, 63))
    with pytest.raises(ValueError, match=r"W1.*\(10, 63\).*\(10, 64\)"):
        model.loss_and_grads(X, y)
    model.params["W1"] = "zeros"
    with pytest.raises(TypeError, match="W1"):
        model.loss_and_grads(X, y)
    del model.params["W1"]
    with pytest.raises(ValueError, match=r"params\['W1'\] is missing: the model's parameters are W1, b1"):
        model.predict(X)


def test_errors_leave_the_model_usable(clf):
    """A rejected call must not leave half-updated state: finite params afterwards."""
    X, y = good_clf_data()
    before = {k: v.copy() for k, v in clf.params.items()}
    bad = y.copy()
    bad[-1] = 99
    with pytest.raises(ValueError):
        clf.fit(X, bad, epochs=1, progress=False)
    for key in before:
        np.testing.assert_array_equal(clf.params[key], before[key])
    assert all(math.isfinite(float(v.sum())) for v in clf.params.values())


def test_complex_data_is_refused_not_cast(clf, reg):
    X, y = good_clf_data()
    with pytest.raises(TypeError, match="X must hold real numbers, got dtype complex128"):
        clf.predict(X.astype(complex))
    with pytest.raises(TypeError, match="y must hold real numbers, got dtype complex128"):
        reg.fit(np.ones((3, 4)), np.ones((3, 2), complex), progress=False)


def test_callbacks_that_are_not_callbacks_are_refused_before_training(clf):
    X, y = np.zeros((4, 64)), np.arange(4)
    before = clf.params["W1"].copy()
    with pytest.raises(TypeError, match="callbacks must be symbp callbacks such as sb.EarlyStopping"):
        clf.fit(X, y, callbacks=["x"], progress=False)
    np.testing.assert_array_equal(clf.params["W1"], before)  # nothing trained
    with pytest.raises(TypeError, match="callbacks must be"):
        clf.fit(X, y, callbacks=[object()], progress=False)


@pytest.mark.parametrize("formula", ["1e400*z", "9**999*z", "z + 10**309"])
def test_a_number_beyond_float_range_is_refused_at_declaration(formula):
    with pytest.raises(ValueError, match="beyond the largest float"):
        sb.Dense(3, activation=formula)


def test_sign_differentiates_to_zero_as_in_torch():
    """SymPy's derivative of sign is 2·δ(z), which no kernel can evaluate; like every autograd
    library symbp takes it as 0, so sign(z) is a usable activation."""
    act = sb.Dense(3, activation="sign(z) + z").activation
    assert act.derivative == 1
    assert sb.Dense(3, activation="sign(z)").activation.derivative == 0


def test_data_above_the_train_table_is_named():
    cfg = sb.Network(inputs=4, layers=[sb.Dense(2)], loss="mse").to_config()
    with pytest.raises(ValueError, match=r"the data set goes in the \[train\] table"):
        sb.Network.from_config({**cfg, "data": "my.npz"})


def test_paths_and_files_that_cannot_be_used_are_named(tmp_path, clf):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ValueError, match="afile is a file, not a directory"):
        clf.save(afile / "model.npz")
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        sb.load(tmp_path)
    net = sb.Network(inputs=2, layers=[sb.Dense(2)], loss="mse", name="bad-cache-dir")
    with pytest.raises(ValueError, match="cannot use the cache directory .*afile"):
        sb.compile(net, cache_dir=afile)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing half-written


@pytest.mark.parametrize("lr", [0, -1.0])
def test_formula_optimizer_needs_a_positive_lr(lr):
    with pytest.raises(ValueError, match="learning rate lr must be > 0"):
        sb.FormulaOptimizer("theta - lr*g", lr=lr)
