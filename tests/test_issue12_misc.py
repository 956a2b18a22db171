"""Issue 12, items 3, 4, 6 and 13: gradcheck fails on non-finite numbers; on/off options take
only real booleans; users' text in generated docstrings cannot break the module; formula
optimizer names that Python reads as one are refused; oversized shapes are named, not
wrapped around in int64."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import tomllib

import symbp as sb
from symbp.backends.cpu.module import docstring, generate_source, generate_train_source
from symbp.backends.cuda.module import CudaConfig, generate_cuda_source, generate_cuda_train_source
from symbp.cli import spec_optimizer
from symbp.train.optim import optimizer_from_config

# -- 1. gradcheck: NaN or inf anywhere is a failure, never 0.0 --------------------------------


def test_gradcheck_fails_on_nan_parameters(compiled):
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="tanh"), sb.Dense(1)], loss="mse")
    model = compiled(net)
    X, y = np.random.default_rng(0).normal(size=(4, 2)), np.zeros((4, 1))
    assert sb.gradcheck(model, X, y) < 1e-6  # the same model with finite parameters passes
    model.params["W1"][0, 0] = np.nan
    err = sb.gradcheck(model, X, y)
    assert err == math.inf and not err < 1e-6


def test_gradcheck_fails_on_log_of_negative_inputs(compiled):
    model = compiled(sb.Network(inputs=1, layers=[sb.Dense(1, activation="log(z)")], loss="mse"))
    model.params["W1"][:] = 1.0
    model.params["b1"][:] = 0.0
    X, y = np.array([[-1.0], [2.0]]), np.zeros((2, 1))  # log(-1): NaN loss and gradients
    assert sb.gradcheck(model, X, y) == math.inf
    # Finite at the point itself, NaN only in a probe: z = 1e-6, probes reach z = 1e-6 - 2e-5.
    model.params["W1"][:] = 0.0
    model.params["b1"][:] = 1e-6
    loss, grads = model.loss_and_grads(X, y)
    assert math.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    assert sb.gradcheck(model, X, y) == math.inf


# -- 2. on/off options: real booleans only ---------------------------------------------------

SWITCHES = [(sb.SGD, "nesterov", {"momentum": 0.9}), (sb.RMSprop, "centered", {}), (sb.Adam, "amsgrad", {}),
            (sb.AdamW, "amsgrad", {})]


@pytest.mark.parametrize("cls, option, extra", SWITCHES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("bad", ["false", "true", "False", 0, 1, None, 0.0])
def test_switch_refuses_non_booleans(cls, option, extra, bad):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {option} must be true or false, got {bad!r}"):
        cls(**extra, **{option: bad})


@pytest.mark.parametrize("cls, option, extra", SWITCHES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_switch_takes_booleans_and_survives_a_checkpoint(cls, option, extra):
    for value in (True, False, np.True_, np.False_):
        opt = cls(**extra, **{option: value})
        assert getattr(opt, option) is bool(value)
        assert getattr(optimizer_from_config(opt.to_config()), option) is bool(value)


@pytest.mark.parametrize("name, option, extra", [("sgd", "nesterov", "momentum = 0.9, "), ("rmsprop", "centered", ""),
                                                 ("adam", "amsgrad", ""), ("adamw", "amsgrad", "")])
def test_toml_switch_is_a_real_boolean(name, option, extra):
    def spec(value):
        return tomllib.loads(f'[train]\noptimizer = "{name}"\noptimizer_params = {{ {extra}{option} = {value} }}\n')

    for text in ('"false"', '"true"', "0"):
        with pytest.raises(ValueError, match=f"{option} must be true or false, got {text.strip(chr(34))!r}"
                           if text != "0" else f"{option} must be true or false, got 0"):
            spec_optimizer(spec(text), None)
    assert spec_optimizer(spec("true"), None).options() == {option: True}
    assert spec_optimizer(spec("false"), None).options() == {option: False}


def test_other_switches_refuse_strings():
    with pytest.raises(ValueError, match="restore_best_weights must be true or false, got 'false'"):
        sb.EarlyStopping(restore_best_weights="false")
    assert sb.EarlyStopping(restore_best_weights=np.True_).restore_best_weights is True
    with pytest.raises(ValueError, match="exact must be true or false, got 'false'"):
        sb.Conv2D(2, 3, exact="false")
    spec = tomllib.loads('inputs = [1, 5, 5]\nloss = "mse"\n[[layers]]\ntype = "conv2d"\nfilters = 1\n'
                         'kernel = 2\nstride = 2\nexact = "false"\n')
    with pytest.raises(ValueError, match="layer 1: Conv2D exact must be true or false"):
        sb.Network.from_config(spec)


# -- 3. users' text in the generated docstrings ----------------------------------------------

NASTY = ["z #\\x", 'z # """', "z #\\", "z # \\N{foo}", "z # \\u12", 'z # "', "z # '''\\", "(z # a\\\n + z)"]


def _doc(src: str) -> str:
    compile(src, "generated", "exec")  # no SyntaxError, whatever the text
    return ast.get_docstring(ast.parse(src), clean=False)


@pytest.mark.parametrize("text", NASTY)
def test_activation_text_cannot_break_the_generated_modules(text):
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation=text), sb.Dense(1)], loss="mse")
    d = sb.derive(net)
    shown = text.replace("\n", "\\n")  # one line in the header
    assert f"layer 1 (Dense, {shown}):" in _doc(generate_source(d, "float64"))
    assert f"layer 1 (Dense, {shown}):" in _doc(generate_cuda_source(d, "float32", CudaConfig()))
    opt = sb.FormulaOptimizer("theta - lr*m", state={"m": "beta*m + g"}, lr=0.1, beta=0.9)
    assert "m <- beta*m + g" in _doc(generate_train_source(d, "float64", opt, "model_module"))
    assert "m <- beta*m + g" in _doc(generate_cuda_train_source(d, "float64", CudaConfig(), opt, "model_module"))


@pytest.mark.parametrize("text", ["(y - t)**2 #\\x", '(y - t)**2 # """\\'])
def test_loss_text_cannot_break_the_generated_module(text):
    d = sb.derive(sb.Network(inputs=2, layers=[sb.Dense(1)], loss=text))
    assert "loss per sample:" in _doc(generate_source(d, "float64"))


@pytest.mark.parametrize("text", ["", '"', '""', '"""', '""""', "\\", "a\\", '\\"', "\x00", "\ud800", "\r\n\t",
                                  "\u2028\x85\x0c", "\U0001f600 é", "'''", "\\N{foo}\\u12\\x"])
def test_docstring_literal_is_exactly_its_text(text):
    literal = docstring(text)
    assert literal.isascii() or text.isprintable()
    assert ast.literal_eval(literal) == text


def test_model_with_a_backslash_comment_compiles_and_predicts(compiled):
    model = compiled(sb.Network(inputs=2, layers=[sb.Dense(2, activation="tanh(z) #\\x"), sb.Dense(1)], loss="mse"))
    X = np.array([[0.5, -1.0], [2.0, 0.25]])
    W1, b1, W2, b2 = (model.params[k] for k in ("W1", "b1", "W2", "b2"))
    np.testing.assert_allclose(model.predict(X), np.tanh(X @ W1.T + b1) @ W2.T + b2, rtol=1e-12)


# -- 4. formula optimizer names --------------------------------------------------------------


@pytest.mark.parametrize("state, hyper, names", [
    ({"m": "beta*m + g", "ｍ": "m"}, {"beta": 0.9}, ["'m'", "'ｍ'"]),  # fullwidth m
    ({"ｍ": "g", "m": "m"}, {}, ["'m'", "'ｍ'", "NFKC"]),
    ({}, {"ｌr": 0.2}, ["'lr'", "'ｌr'"]),
    ({"m": "m + g"}, {"m": 0.5}, ["state name 'm'", "hyper-parameter name 'm'"]),
    ({"h": "h + g"}, {"W1": 0.5}, ["'h'", "'W1'", "h_W1"]),
    ({"ｍ": "g"}, {}, ["'ｍ'", "'m'"]),
    ({"lambda": "g"}, {}, ["'lambda'", "keyword"]),
    ({}, {"if": 1.0}, ["'if'", "keyword"]),
    ({"a-b": "g"}, {}, ["'a-b'", "identifier"]),
    ({1: "g"}, {}, ["1", "identifier"]),
    ({"theta": "g"}, {}, ["'theta'", "reserved"]),
])
def test_formula_optimizer_refuses_names_python_cannot_keep_apart(state, hyper, names):
    with pytest.raises(ValueError) as err:
        sb.FormulaOptimizer("theta - lr*g", state=state, lr=0.1, **hyper)
    for name in names:
        assert name in str(err.value)


def test_formula_optimizer_still_takes_plain_names():
    opt = sb.FormulaOptimizer("theta - lr*h*beta", state={"h": "h + g"}, lr=0.1, beta=0.9)  # h without W1
    assert opt.state_names == ("h",)
    opt = sb.FormulaOptimizer("theta - lr*m*W1", state={"m": "m + g"}, lr=0.1, W1=0.5)
    assert set(opt.hyper) == {"lr", "W1"}


# -- 5. shapes beyond int64 (or any sane size) -----------------------------------------------


def test_image_input_too_large_is_named_not_negative():
    with pytest.raises(ValueError, match=r"inputs shape \(3, 2147483648, 2147483648\).* 13,835,058,055,282,163,712 "
                                         r"values; the limit is 2,147,483,647") as err:
        sb.Network(inputs=(3, 2**31, 2**31), layers=[sb.Flatten(), sb.Dense(2)], loss="mse")
    assert "-" not in str(err.value).split("limit")[0]  # no wrapped-around negative count
    with pytest.raises(ValueError, match="inputs width 2147483648"):
        sb.Network(inputs=2**31, layers=[sb.Dense(2)], loss="mse")


def test_layer_output_and_parameter_too_large_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 1 \(Conv2D\(.*\)\): its output \(2, 2101246, 2101246\) per sample "
                                         r"has 8,830,469,505,032 values"):
        sb.Network(inputs=(3, 2**12, 2**12), layers=[sb.Conv2D(2, 3, padding=2**20), sb.Flatten(), sb.Dense(2)],
                   loss="mse")
    with pytest.raises(ValueError, match=r"layer 2 \(Dense\(.*\)\): its parameter W2 of shape \(1048576, 1048576\)"):
        sb.Network(inputs=4, layers=[sb.Dense(2**20), sb.Dense(2**20)], loss="mse")
    net = sb.Network(inputs=(3, 2**10, 2**10), layers=[sb.Flatten(), sb.Dense(2)], loss="mse")
    assert net.widths == [3 * 2**20, 3 * 2**20, 2] and all(type(w) is int for w in net.widths)
    assert sb.Network(inputs=2**31 - 1, layers=[sb.Dense(1)], loss="mse").param_counts() == [2**31]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_sympy_float_in_an_activation_keeps_its_value(compiled, dtype):
    """A Float in a SymPy activation (0.3*z**2 + z, a Piecewise threshold 0.5) is printed as
    its value: it was printed as int(0.3) = 0, so the model computed z, without an error."""
    import sympy

    z = sympy.Symbol("z")
    act = sympy.Float(0.3) * z**2 + sympy.Piecewise((z, z > sympy.Float(0.5)), (sympy.Float(0.25) * z, True))
    model = compiled(sb.Network(inputs=1, layers=[sb.Dense(1, activation=act)], loss="mse"), dtype)
    model.params["W1"][...] = 1.0
    model.params["b1"][...] = 0.0
    x = np.array([[-1.0], [0.25], [0.75], [2.0]])
    expected = 0.3 * x**2 + np.where(x > 0.5, x, 0.25 * x)
    np.testing.assert_allclose(model.decision_function(x), expected, rtol=1e-6)


def test_a_checkpoint_that_would_not_load_is_refused_before_writing(compiled, tmp_path):
    """A SymPy activation with a Piecewise is stored as its text, which the formula parser
    does not read: save() refuses (nothing written) instead of writing a file load() refuses."""
    import sympy

    z = sympy.Symbol("z")
    act = sympy.Piecewise((z, z > sympy.Rational(1, 2)), (z / 4, True))
    model = compiled(sb.Network(inputs=1, layers=[sb.Dense(1, activation=act)], loss="mse"))
    with pytest.raises(ValueError, match="would not read back"):
        model.save(tmp_path / "run.npz")
    assert not list(tmp_path.iterdir())
    ok = compiled(sb.Network(inputs=1, layers=[sb.Dense(1, activation=sympy.Max(z, z / 4))], loss="mse"))
    sb.load(ok.save(tmp_path / "ok.npz"))


def test_load_finds_what_save_wrote_and_names_a_missing_file(compiled, tmp_path):
    """save("run") writes run.npz; load("run") finds it; a missing checkpoint is a
    FileNotFoundError (and still a ValueError, as every other refusal)."""
    model = compiled(sb.Network(inputs=2, layers=[sb.Dense(2)], loss="mse"))
    written = model.save(tmp_path / "run")
    assert written.name == "run.npz"
    again = sb.load(tmp_path / "run")
    np.testing.assert_array_equal(again.params["W1"], model.params["W1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sb.load(tmp_path / "nothing.npz")
    with pytest.raises(ValueError, match="does not exist"):
        sb.load(tmp_path / "nothing")


def test_callbacks_say_what_they_are():
    assert repr(sb.EarlyStopping(patience=3)) == ("EarlyStopping(monitor='val_loss', patience=3, min_delta=0, "
                                                 "mode='min', restore_best_weights=False)")
    assert repr(sb.ModelCheckpoint("best.npz", monitor="val_loss")) == \
        "ModelCheckpoint('best.npz', monitor='val_loss', mode='min')"
