"""BatchNorm (``sb.BatchNorm``) as PyTorch's BatchNorm1d and BatchNorm2d.

Training uses the batch's statistics (its stages are sums over the batch, differentiated by
SymPy), updates the running mean and unbiased variance as torch does, and everything outside
training (predict, evaluate, score, the exports) reads the running ones.  Loss and gradients
equal torch autograd's in float64 to 1e-10 with random γ, β and biases; trajectories and
running statistics after five steps equal torch's.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _support import perturb_params, rel_err

import symbp as sb

torch = pytest.importorskip("torch", reason="PyTorch is the reference")
F = torch.nn.functional


def residual_mlp(momentum=0.1):
    """Dense → BatchNorm → Dense, added to the first Dense's output, LayerNorm, Dense."""
    x = sb.Input(5)
    h = sb.Dense(4, activation="tanh")(x)
    r = sb.Dense(4, activation="relu")(sb.BatchNorm(momentum=momentum)(h))
    y = sb.Dense(3)(sb.LayerNorm()(sb.Add()([h, r])))
    return sb.Network(inputs=x, outputs=y, l2=1e-3)


class TorchResidual:
    """The same network in torch, its BatchNorm's running statistics held here."""

    def __init__(self, P, momentum=0.1):
        self.P, self.momentum = P, momentum
        self.rmean, self.rvar = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)

    def __call__(self, X, training=True):
        P = self.P
        h = torch.tanh(X @ P["W1"].T + P["b1"])
        bn = F.batch_norm(h, self.rmean, self.rvar, P["g2"], P["b2"], training=training, momentum=self.momentum)
        r = torch.relu(bn @ P["W3"].T + P["b3"])
        ln = F.layer_norm(h + r, (4,), P["g5"], P["b5"])
        return ln @ P["W6"].T + P["b6"]


def branching_cnn():
    """Two conv branches concatenated over channels, BatchNorm2d, pooling, Dense."""
    x = sb.Input((2, 6, 6))
    c = sb.Concat()([sb.Conv2D(2, 3, padding=1, activation="relu")(x), sb.Conv2D(2, 3, padding=1, activation="tanh")(x)])
    y = sb.Dense(3)(sb.Flatten()(sb.MaxPool2D(2)(sb.BatchNorm(momentum=0.3)(c))))
    return sb.Network(inputs=x, outputs=y, l2=1e-3)


def torch_cnn(P, X, rmean, rvar, training=True):
    x = X.reshape(-1, 2, 6, 6)
    c = torch.cat([torch.relu(F.conv2d(x, P["W1"], P["b1"], padding=1)), torch.tanh(F.conv2d(x, P["W2"], P["b2"], padding=1))], 1)
    bn = F.batch_norm(c, rmean, rvar, P["g4"], P["b4"], training=training, momentum=0.3)
    return F.max_pool2d(bn, 2).flatten(1) @ P["W7"].T + P["b7"]


def _perturbed(compiled, net, seed):
    """A model of ``net`` with random weights, γ, β and biases (non-zero), and the running
    statistics at their start (mean 0, variance 1), as torch's."""
    model = compiled(net, "float64", seed=seed)
    perturb_params(model, seed=seed + 1)
    model.params = {k: np.zeros_like(v) if k.startswith("rmean") else np.ones_like(v) if k.startswith("rvar") else v
                    for k, v in model.params.items()}
    return model


def _trainable(model):
    return {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items() if not k.startswith("r")}


def _loss(out, y, P, l2):
    return F.cross_entropy(out, torch.tensor(y)) + l2 / 2 * sum((v ** 2).sum() for k, v in P.items() if k.startswith("W"))


@pytest.fixture
def mlp_model(compiled):
    return _perturbed(compiled, residual_mlp(), seed=1)


def test_residual_mlp_loss_and_gradients_equal_torch(mlp_model):
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
    loss, grads = mlp_model.loss_and_grads(X, y)
    P = _trainable(mlp_model)
    ref = _loss(TorchResidual(P)(torch.tensor(X)), y, P, 1e-3)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert set(grads) == set(P)  # the running statistics have no gradient
    for key, value in P.items():
        assert rel_err(grads[key], value.grad.numpy()) <= 1e-10, key
    assert sb.gradcheck(mlp_model, X, y) < 1e-6
    np.testing.assert_array_equal(mlp_model.params["rmean2"], 0.0)  # loss_and_grads leaves them alone


def test_cnn_with_batchnorm2d_and_concat_equals_torch(compiled):
    model = _perturbed(compiled, branching_cnn(), seed=1)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(5, 72)), rng.integers(0, 3, 5)
    loss, grads = model.loss_and_grads(X, y)
    P = _trainable(model)
    ref = _loss(torch_cnn(P, torch.tensor(X), torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)),
                y, P, 1e-3)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    for key, value in P.items():
        assert rel_err(grads[key], value.grad.numpy()) <= 1e-10, key


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_five_steps_and_running_statistics_equal_torch(opt, compiled):
    """Five steps (the last batch shorter), momentum 0.25: parameters, running mean and
    unbiased running variance, then inference logits with the running statistics."""
    model = _perturbed(compiled, residual_mlp(momentum=0.25), seed=4)
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(18, 5)), rng.integers(0, 3, 18)
    P = _trainable(model)
    net = TorchResidual(P, momentum=0.25)
    mine, theirs = {"sgd": (sb.SGD(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9)),
                    "adam": (sb.Adam(0.01), lambda ps: torch.optim.Adam(ps, 0.01))}[opt]
    model.fit(X, y, optimizer=mine, batch_size=4, epochs=1, shuffle=False, progress=False)
    topt = theirs(list(P.values()))
    for start in range(0, 18, 4):
        topt.zero_grad()
        _loss(net(torch.tensor(X[start:start + 4])), y[start:start + 4], P, 1e-3).backward()
        topt.step()
    for key, value in P.items():
        assert rel_err(model.params[key], value.detach().numpy()) <= 1e-10, key
    assert rel_err(model.params["rmean2"], net.rmean.numpy()) <= 1e-12
    assert rel_err(model.params["rvar2"], net.rvar.numpy()) <= 1e-12
    with torch.no_grad():
        expected = net(torch.tensor(X), training=False).numpy()
    assert rel_err(model.decision_function(X), expected) <= 1e-12
    loss, _ = model.evaluate(X, y)
    penalty = 1e-3 / 2 * sum(float((v.detach() ** 2).sum()) for k, v in P.items() if k.startswith("W"))
    assert loss == pytest.approx(F.cross_entropy(torch.tensor(expected), torch.tensor(y)).item() + penalty, rel=1e-10)


def test_cnn_running_statistics_after_training(compiled):
    model = _perturbed(compiled, branching_cnn(), seed=7)
    rng = np.random.default_rng(9)
    X, y = rng.normal(size=(10, 72)), rng.integers(0, 3, 10)
    P = _trainable(model)
    rmean, rvar = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    model.fit(X, y, optimizer=sb.SGD(0.05), batch_size=3, epochs=1, shuffle=False, progress=False)
    topt = torch.optim.SGD(list(P.values()), 0.05)
    for start in range(0, 10, 3):  # the last batch: one image, still 36 values per channel
        topt.zero_grad()
        _loss(torch_cnn(P, torch.tensor(X[start:start + 3]), rmean, rvar), y[start:start + 3], P, 1e-3).backward()
        topt.step()
    for key, value in P.items():
        assert rel_err(model.params[key], value.detach().numpy()) <= 1e-10, key
    assert rel_err(model.params["rmean4"], rmean.numpy()) <= 1e-12
    assert rel_err(model.params["rvar4"], rvar.numpy()) <= 1e-12
    with torch.no_grad():
        expected = torch_cnn(P, torch.tensor(X), rmean, rvar, training=False).numpy()
    assert rel_err(model.decision_function(X), expected) <= 1e-12


def test_exports_checkpoint_and_resume(mlp_model, tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
    mlp_model.fit(X, y, optimizer=sb.Adam(0.01), batch_size=4, epochs=1, progress=False)
    assert not np.allclose(mlp_model.params["rvar2"], 1.0)
    module = mlp_model.to_torch()  # nn.BatchNorm1d with the running statistics, in eval mode
    with torch.no_grad():
        assert rel_err(module(torch.tensor(X)).numpy(), mlp_model.decision_function(X)) <= 1e-12
    ort = pytest.importorskip("onnxruntime")
    path = mlp_model.to_onnx(tmp_path / "bn.onnx", dtype="float64")
    logits = ort.InferenceSession(str(path)).run(None, {"X": X})[0]
    assert rel_err(logits, mlp_model.decision_function(X)) <= 1e-12
    mlp_model.save(tmp_path / "bn.npz")
    back = sb.load(tmp_path / "bn.npz")
    np.testing.assert_array_equal(back.params["rvar2"], mlp_model.params["rvar2"])
    back.fit(X, y, batch_size=4, epochs=1, seed=3, progress=False)
    mlp_model.fit(X, y, batch_size=4, epochs=1, seed=3, progress=False)
    for key, value in mlp_model.params.items():
        np.testing.assert_array_equal(back.params[key], value, err_msg=key)


def test_from_torch_reads_batchnorm(session_cache_dir):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=0.3), torch.nn.ReLU(),
                                 torch.nn.Linear(4, 2)).double()
    module.train()
    module(torch.randn(8, 3, dtype=torch.float64))  # running statistics away from 0 and 1
    module.eval()
    with pytest.raises(ValueError, match="an activation must follow"):  # symbp puts f on a Linear/Conv2d
        sb.from_torch(module, dtype="float64", cache_dir=session_cache_dir)
    module = torch.nn.Sequential(module[0], module[1], module[3]).eval()
    model = sb.from_torch(module, dtype="float64", cache_dir=session_cache_dir)
    assert model.network.layers[1].momentum == pytest.approx(0.3)
    X = np.random.default_rng(1).normal(size=(5, 3))
    with torch.no_grad():
        assert rel_err(model.decision_function(X), module(torch.tensor(X)).numpy()) <= 1e-12
    with pytest.raises(ValueError, match="momentum=None"):
        sb.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=None)),
                      cache_dir=session_cache_dir)


def test_bad_input_is_named(mlp_model):
    with pytest.raises(ValueError, match="momentum must be a number in"):
        sb.BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match="eps must be a number in"):
        sb.BatchNorm(eps=0)
    X, y = np.zeros((9, 5)), np.zeros(9, dtype=int)
    with pytest.raises(ValueError, match="leave a batch of 1 row"):
        mlp_model.fit(X, y, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="leave a batch of 1 row"):
        mlp_model.fit(X, y, batch_size=1, progress=False)


def test_toml_and_explain():
    net = sb.Network.from_config({"inputs": 3, "layers": [
        {"units": 4, "activation": "tanh"}, {"type": "batchnorm", "momentum": 0.2}, {"units": 2}]})
    assert net.layers[1].momentum == 0.2 and net.param_counts() == [16, 8, 10]  # γ, β: the statistics are not counted
    again = sb.Network.from_config(net.to_config())
    assert again.fingerprint() == net.fingerprint()
    text = sb.derive(net).explain()
    # ∂C/∂x in the textbook's three terms: through z directly, through the variance, through the mean
    assert "δ1[n,p] = (1 - a1[n,p]²)·(gv2[p]·(2·a1[n,p] - 2·m2[p])/N + g2[p]·rsig2[p]·δ2[n,p] + gm2[p]/N)" in text
    assert re.search(r"m2\[i\] = Σ_nu a1\[nu,i\]/N +\(4,\)", text)  # one value per feature for the batch
    assert "gm2[q] = ∂C/∂m2[q] = Σ_n (-g2[q]·rsig2[q]·δ2[n,q]) - 2·gv2[q]·Σ_nu (a1[nu,q] - m2[q])/N" in text
    assert "gv2[q] = ∂C/∂v2[q] = -grsig2[q]/(2·(v2[q] + 1/100000)^(3/2))" in text  # through rsig = 1/√(v + ε)
    assert "running statistics (rmean (4,), rvar (4,)), not trained" in text


def test_readers_show_and_check_batchnorm(tmp_path):
    """The walkthrough checks every gradient of a one-sample BatchNorm2d against finite
    differences (the step shrinks where the cost is sharply curved), the entry graph's gates
    give the same gradients, and the report renders."""
    net = sb.Network(inputs=(1, 4, 4), layers=[sb.Conv2D(2, 3, activation="relu"), sb.BatchNorm(), sb.Flatten(),
                                               sb.Dense(2)])
    w = sb.walkthrough(net)
    assert w.ok, str(w)
    assert set(w.grads) == {"W1", "b1", "g2", "b2", "W4", "b4"}
    entries = sb.graph(net, collapse=False)
    for name, grad in w.grads.items():
        for idx in np.ndindex(*grad.shape):
            node = entries.entry(f"{name}[{','.join(map(str, idx))}]")
            assert node.grad == pytest.approx(grad[idx], rel=1e-9, abs=1e-12), (name, idx)
    html = sb.report(sb.compile(net, dtype="float64"), tmp_path / "bn.html")
    assert "BatchNorm" in html
