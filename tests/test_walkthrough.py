"""The worked example: one sample's values, δs and gradients, each checked.

References: the classic 2-2-2 example's published numbers (inputs 0.05, 0.10; targets 0.01,
0.99; E = 0.298371109, ∂E/∂w₅ = 0.082167041, ∂E/∂w₁ = 0.000438568), PyTorch autograd, and
the generated kernels.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _support import GRAD_NETS, torch_loss_and_grads

import symbp as sb
from symbp.cli import main as cli
from symbp.read.walkthrough import Walkthrough, evaluate, walkthrough

ROOT = Path(__file__).resolve().parent.parent
CLASSIC_PARAMS = {"W1": [[0.15, 0.20], [0.25, 0.30]], "b1": [0.35, 0.35],
                  "W2": [[0.40, 0.45], [0.50, 0.55]], "b2": [0.60, 0.60]}


def classic_net() -> sb.Network:
    return sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2, activation="sigmoid")],
                      loss="mse", name="classic-2-2-2")


@pytest.fixture(scope="module")
def classic() -> Walkthrough:
    return walkthrough(classic_net(), x=[0.05, 0.10], t=[0.01, 0.99], params=CLASSIC_PARAMS)


def test_classic_2_2_2_reproduces_the_published_numbers(classic):
    w = classic
    np.testing.assert_allclose(w.z[0], [0.3775, 0.3925])
    np.testing.assert_allclose(w.a[0], [0.593269992, 0.596884378], atol=1e-9)
    np.testing.assert_allclose(w.a[1], [0.75136507, 0.772928465], atol=1e-8)
    assert w.loss == pytest.approx(0.298371109, abs=1e-9)
    assert w.delta[1][0] == pytest.approx(0.138498562, abs=1e-9)  # ∂E/∂net_o1
    assert w.grads["W2"][0, 0] == pytest.approx(0.082167041, abs=1e-9)  # ∂E/∂w5
    assert w.grads["W2"][1, 1] == pytest.approx(-0.022740242, abs=1e-9)  # ∂E/∂w8
    assert w.grads["W1"][0, 0] == pytest.approx(0.000438568, abs=1e-9)  # ∂E/∂w1
    # after one step of gradient descent with η = 0.5: w5⁺ = 0.35891648, w1⁺ = 0.149780716
    assert 0.40 - 0.5 * w.grads["W2"][0, 0] == pytest.approx(0.35891648, abs=1e-8)
    assert 0.15 - 0.5 * w.grads["W1"][0, 0] == pytest.approx(0.149780716, abs=1e-9)
    assert w.ok and w.max_error < 1e-8
    assert len([c for c in w.checks if c.status == "ok"]) == 4 + 12  # every δ and every parameter


def test_table_lists_forward_values_deltas_and_gradients(classic):
    text = str(classic)
    forward = text[text.index("Forward pass"):text.index("Backward pass")]
    backward = text[text.index("Backward pass"):text.index("Parameter gradients")]
    grads = text[text.index("Parameter gradients"):]
    assert re.search(r"^\s*2\s+o₁\s+1\.10590597\s+0\.75136507$", forward, re.M)
    assert re.search(r"^\s*1\s+h₂\s+0\.3925\s+0\.596884378$", forward, re.M)
    assert re.search(r"^\s*1\s+h₁\s+0\.00877135469\s+0\.00877135469\s+\S+\s+✓$", backward, re.M)
    assert re.search(r"^\s*w₅\s+W2\[0,0\]\s+0\.4\s+0\.0821670406\s+0\.0821670406\s+\S+\s+✓$", grads, re.M)
    assert re.search(r"^\s*b₁\s+b1\[0\]\s+0\.35\s+0\.00877135469\s", grads, re.M)
    assert "cost C = 0.298371109" in text
    assert "16 numbers checked against five-point finite differences (tolerance 1e-06): all agree" in text
    md = classic.to_markdown()
    assert re.search(r"^\| w₅ \| W2\[0,0\] \| 0\.4 \| 0\.0821670406 \| 0\.0821670406 \| \S+ \| ✓ \|$", md, re.M)
    assert repr(classic) == text


def test_against_pytorch_on_networks_with_every_kind_of_activation():
    for name in ("g2-relu-leaky-mse", "g4-mish-swish-logcosh", "g7-softplus-mish-ce-l2"):
        spec = GRAD_NETS[name]
        net = spec.build()
        rng = np.random.default_rng(3)
        x = rng.normal(size=spec.inputs)
        t = 1 if spec.loss == "ce" else rng.normal(size=spec.outputs)
        w = walkthrough(net, x=x, t=t, seed=1)
        y = np.array([t]) if spec.loss == "ce" else t[None, :]
        loss, grads = torch_loss_and_grads(spec, w.params, x[None, :], y)
        assert w.loss == pytest.approx(loss, rel=1e-12), name
        for key, g in grads.items():
            np.testing.assert_allclose(w.grads[key], g, rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")
        assert w.ok, name


def test_against_the_generated_kernels(compiled):
    model = compiled(classic_net(), "float64")
    w = walkthrough(model, x=[0.05, 0.10], t=[0.01, 0.99], params=CLASSIC_PARAMS)
    assert w.kernel_loss == pytest.approx(0.298371109, abs=1e-9)
    np.testing.assert_allclose(w.kernel_output, w.a[-1], rtol=1e-12)
    grads = [c for c in w.checks if c.kernel is not None]
    assert len(grads) == 12 and all(c.kernel_error < 1e-12 for c in grads)
    assert "kernels" in str(w) and "generated kernels: 0.298371109" in str(w)
    assert model.params["W1"][0, 0] != 0.15  # the model's own parameters are left alone


def test_random_example_with_a_seed_is_reproducible():
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(3)], loss="softmax_cross_entropy",
                     l2=0.01)
    a, b = walkthrough(net, seed=7), walkthrough(net, seed=7)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.loss == b.loss and a.ok
    assert sorted(a.t.tolist()) == [0.0, 0.0, 1.0]  # a one-hot target


def test_wide_network_checks_a_sample_of_entries_and_shortens_the_table():
    net = sb.Network(inputs=30, layers=[sb.Dense(20, activation="relu"), sb.Dense(3)], loss="mse")
    w = walkthrough(net, seed=0, max_checks=5)
    by_status = {s: sum(c.status == s for c in w.checks) for s in ("ok", "unchecked", "FAILED")}
    assert by_status["FAILED"] == 0 and by_status["ok"] == 23 + 4 * 5 - sum(
        max(0, 5 - v.size) for v in w.params.values())
    text = str(w)
    assert "… 4 more" in text and "not checked" in text and "all agree" in text


def test_relu_kink_is_flagged_not_failed():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="relu"), sb.Dense(1)], loss="mse")
    params = {"W1": [[1.0, -1.0], [0.5, 0.5]], "b1": [0.0, 0.0], "W2": [[1.0, 1.0]], "b2": [0.0]}
    w = walkthrough(net, x=[1.0, 1.0], t=[0.3], params=params)  # z_h₁ = 0 exactly: relu's kink
    assert w.z[0][0] == 0.0
    statuses = {c.entry: c.status for c in w.checks}
    assert statuses["delta1[0]"] == "kink" and w.ok
    assert "~ kink" in str(w)


def test_evaluate_reads_index_formulas():
    net = sb.Network(inputs=3, layers=[sb.Dense(2, activation="tanh")], loss="mse")
    d = sb.derive(net)
    rng = np.random.default_rng(0)
    env = {"x": rng.normal(size=(5, 3)), "W1": rng.normal(size=(2, 3)), "b1": rng.normal(size=2)}
    from symbp.indices import i, n

    z = evaluate(d.layers[0].forward, env, (n, i), {d.dims[0]: 3})
    np.testing.assert_allclose(z, env["x"] @ env["W1"].T + env["b1"])
    with pytest.raises(ValueError, match="no value for d_0"):
        evaluate(d.layers[0].forward, env, (n, i))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"params": {**CLASSIC_PARAMS, "W2": [[0.4, 0.45, 0.1], [0.5, 0.55, 0.1]]}}, ValueError,
     r"params\['W2'\] has shape \(2, 3\), expected \(2, 2\) \(W is \(out, in\)\)"),
    ({"params": {k: v for k, v in CLASSIC_PARAMS.items() if k != "b2"}}, ValueError, "params is missing b2"),
    ({"params": {**CLASSIC_PARAMS, "W3": [[1.0]]}}, ValueError, "unknown parameter 'W3'"),
    ({"params": [1, 2]}, TypeError, "params must be a dict"),
    ({"params": {**CLASSIC_PARAMS, "b1": ["a", "b"]}}, TypeError, r"params\['b1'\] must be numbers"),
    ({"params": {**CLASSIC_PARAMS, "b1": [np.nan, 0.0]}}, ValueError, r"params\['b1'\] must be finite"),
    ({"x": [1.0, 2.0, 3.0]}, ValueError, r"x \(one sample's inputs\) must hold 2 numbers"),
    ({"t": [0.5]}, ValueError, "t .* must hold 2 numbers"),
    ({"h": 0}, ValueError, "h must be a finite number > 0"),
    ({"max_checks": 0}, ValueError, "max_checks"),
])
def test_bad_input_is_named(kwargs, error, message):
    args = {"x": [0.05, 0.10], "t": [0.01, 0.99], "params": CLASSIC_PARAMS, **kwargs}
    with pytest.raises(error, match=message):
        walkthrough(classic_net(), **args)


def test_bad_targets_and_sources():
    clf = sb.Network(inputs=2, layers=[sb.Dense(3)], loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match="t = 3 is not a class label 0..2"):
        walkthrough(clf, t=3)
    assert walkthrough(clf, t=2).t.tolist() == [0.0, 0.0, 1.0]
    bce = sb.Network(inputs=2, layers=[sb.Dense(2)], loss="binary_cross_entropy")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        walkthrough(bce, t=[0.5, 2.0])
    with pytest.raises(TypeError, match="Network or a compiled Model"):
        walkthrough("net.toml")


def test_cli_walkthrough_from_the_example_spec(capsys, tmp_path):
    spec = ROOT / "examples" / "classic_2_2_2.toml"
    assert cli(["walkthrough", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "cost C = 0.298371109" in out and "0.0821670406" in out and "all agree" in out
    assert cli(["walkthrough", str(spec), "--seed", "3", "--x", "1", "2", "--t", "0.5,0.5", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "x = [1, 2]" in out and "| layer | unit |" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace("[walkthrough]", "[walkthrough]\ny = 1"))
    assert cli(["walkthrough", str(bad)]) == 2
    assert "unknown key 'y' in [walkthrough]" in capsys.readouterr().err
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(spec.read_text().replace("b2 = [0.60, 0.60]", "b2 = [0.60]"))
    assert cli(["walkthrough", str(wrong)]) == 2
    assert "params['b2'] has shape (1,), expected (2,)" in capsys.readouterr().err
    # the spec with a [walkthrough] table still trains and explains
    assert cli(["explain", str(spec)]) == 0
