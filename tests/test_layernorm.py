"""LayerNorm (issue 14 item 3, its first layer): PyTorch's ``nn.LayerNorm(features, eps)``,
three stages (the sample's mean, its biased variance, the normalised and scaled output) that
SymPy differentiates — loss and every gradient equal PyTorch's in float64 to 1e-10."""

from __future__ import annotations

import numpy as np
import pytest
from test_optim import CASES

import symbp as sb

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def residual_free_net(eps=1e-5, width=4):
    """Dense → LayerNorm → Dense(tanh) → LayerNorm → Dense: δ crosses two norms."""
    return sb.Network(inputs=5, layers=[sb.Dense(width), sb.LayerNorm(eps), sb.Dense(4, activation="tanh"),
                                        sb.LayerNorm(eps), sb.Dense(3)], loss="softmax_cross_entropy", l2=1e-2)


def torch_loss(torch, P, X, y, eps, width=4, l2=1e-2):
    F = torch.nn.functional
    h = F.layer_norm(torch.tensor(X) @ P["W1"].T + P["b1"], (width,), P["g2"], P["b2"], eps=eps)
    h = F.layer_norm(torch.tanh(h @ P["W3"].T + P["b3"]), (4,), P["g4"], P["b4"], eps=eps)
    out = h @ P["W5"].T + P["b5"]
    loss = F.cross_entropy(out, torch.tensor(y))
    return loss + l2 / 2 * sum(P[k].pow(2).sum() for k in ("W1", "W3", "W5"))


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7), scale=st.floats(0.3, 3.0))
def test_loss_and_gradients_equal_torch(compiled, seed, rows, scale):
    torch = pytest.importorskip("torch")
    model = compiled(residual_free_net(), "float64")
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():  # γ and β too: not left at ones and zeros
        model.params[k] = rng.normal(scale=scale, size=v.shape)
    X, y = rng.normal(size=(rows, 5)), rng.integers(0, 3, rows)
    loss, grads = model.loss_and_grads(X, y)
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    ref = torch_loss(torch, P, X, y, 1e-5)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-10 * max(1.0, abs(ref.item()))
    for k, v in P.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "rmsprop"])
def test_trajectories_match_torch_optim(compiled, name):
    torch = pytest.importorskip("torch")
    ours, theirs = CASES[name]
    model = compiled(residual_free_net(eps=1e-3), "float64", seed=2)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    P = {k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    opt = theirs(torch, list(P.values()))
    for _ in range(5):
        opt.zero_grad()
        torch_loss(torch, P, X, y, 1e-3).backward()
        opt.step()
    model.fit(X, y, optimizer=ours(), batch_size=8, epochs=5, shuffle=False, progress=False)
    for k, v in P.items():
        np.testing.assert_allclose(model.params[k], v.detach().numpy(), rtol=0, atol=1e-10, err_msg=f"{name}: {k}")


def test_defaults_config_and_readers(compiled):
    torch = pytest.importorskip("torch")
    ours, theirs = sb.LayerNorm(), torch.nn.LayerNorm(4)
    assert ours.eps == theirs.eps
    net = residual_free_net()
    params = net.init_params(0, np.dtype("float64"))
    assert np.all(params["g2"] == 1) and np.all(params["b2"] == 0)
    assert sb.Network.from_config(net.to_config()).fingerprint() == net.fingerprint()
    text = sb.derive(net).explain()
    assert "m2[n] = Σ_j z1[n,j]/d₁" in text or "m2[n]" in text
    assert "gv2[n] = ∂C/∂v2[n]" in text and "gm2[n] = ∂C/∂m2[n]" in text
    assert "parameters (g (4,), b (4,)): 2·features = 2·4 = 8" in text
    w = sb.walkthrough(net)
    assert w.ok, w.max_error
    with pytest.raises(ValueError, match="eps must be a number in"):
        sb.LayerNorm(eps=0)
    with pytest.raises(ValueError, match="LayerNorm takes a flat input"):
        sb.Network(inputs=(1, 4, 4), layers=[sb.LayerNorm(), sb.Flatten(), sb.Dense(2)])


def test_to_and_from_torch_and_onnx(compiled, tmp_path):
    torch = pytest.importorskip("torch")
    model = compiled(residual_free_net(), "float64", seed=5)
    rng = np.random.default_rng(6)
    for k, v in model.params.items():
        model.params[k] = rng.normal(size=v.shape)
    X = rng.normal(size=(4, 5))
    ref = model.decision_function(X)
    seq = model.to_torch()
    np.testing.assert_allclose(seq(torch.tensor(X)).detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    back = sb.from_torch(seq, inputs=5, loss="softmax_cross_entropy", dtype="float64")
    np.testing.assert_allclose(back.decision_function(X), ref, rtol=1e-12, atol=1e-12)
    ort = pytest.importorskip("onnxruntime")
    path = model.to_onnx(tmp_path / "ln.onnx", dtype="float64")
    out = ort.InferenceSession(str(path)).run(None, {"X": X})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
