"""Dropout (``sb.Dropout(p)``) as PyTorch's ``nn.Dropout``: inverted dropout in training, the
identity otherwise, its masks drawn by the training kernels from the fit's seed and epoch.

Loss and gradients equal torch autograd's to 1e-10 with the kernels' own mask given to torch;
p = 0 is the identity; inference ignores the masks; a resumed fit draws the same masks.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import perturb_params, rel_err

import symbp as sb

torch = pytest.importorskip("torch", reason="PyTorch is the reference")
F = torch.nn.functional


def mlp(p=0.3):
    x = sb.Input(4)
    h = sb.Dense(5, activation="tanh")(x)
    r = sb.Dense(5, activation="relu")(sb.Dropout(p)(h))
    return sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Add()([h, r])), l2=1e-3)


def torch_mlp(P, X, mask):
    h = torch.tanh(X @ P["W1"].T + P["b1"])
    r = torch.relu((h * mask) @ P["W3"].T + P["b3"])
    return (h + r) @ P["W5"].T + P["b5"]


def _mask(model, rows: int, label: str) -> np.ndarray:
    """The mask the kernels drew in the last training forward pass (their work buffer)."""
    names = [name for name, _ in model.kernels.WORKSPACE]
    return model._workspace(rows)[names.index(label)][:rows].copy()


def _torch_grads(forward, model, X, y, *extra):
    P = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    out = forward(P, torch.tensor(X), *extra)
    loss = F.cross_entropy(out, torch.tensor(y)) + model.network.l2 / 2 * sum(
        (v ** 2).sum() for k, v in P.items() if k.startswith("W"))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in P.items()}


def test_gradients_equal_torch_with_the_mask_given(compiled):
    model = compiled(mlp(), "float64", seed=1)
    perturb_params(model, seed=2)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(9, 4)), rng.integers(0, 3, 9)
    loss, grads = model.loss_and_grads(X, y)
    mask = _mask(model, 9, "Amask2")
    assert set(np.unique(mask)) == {0.0, 1 / 0.7}  # inverted dropout: kept entries scaled by 1/(1 − p)
    ref_loss, ref = _torch_grads(torch_mlp, model, X, y, torch.tensor(mask))
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for key in ref:
        assert rel_err(grads[key], ref[key]) <= 1e-10, key
    assert sb.gradcheck(model, X, y) < 1e-6  # loss_and_grads draws the same masks on every call
    again, _ = model.loss_and_grads(X, y)
    assert again == loss


def test_cnn_gradients_equal_torch_with_the_mask_given(compiled):
    net = sb.Network(inputs=(1, 5, 5), layers=[sb.Conv2D(2, 3, activation="relu"), sb.Dropout(0.5), sb.Flatten(),
                                               sb.Dense(3)], l2=1e-3)
    model = compiled(net, "float64", seed=1)
    perturb_params(model, seed=2)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(4, 25)), rng.integers(0, 3, 4)
    loss, grads = model.loss_and_grads(X, y)
    mask = _mask(model, 4, "Amask2").reshape(4, 2, 3, 3)

    def forward(P, X_, m):
        a = torch.relu(F.conv2d(X_.reshape(-1, 1, 5, 5), P["W1"], P["b1"]))
        return (a * m).flatten(1) @ P["W4"].T + P["b4"]

    ref_loss, ref = _torch_grads(forward, model, X, y, torch.tensor(mask))
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for key in ref:
        assert rel_err(grads[key], ref[key]) <= 1e-10, key


def test_p_zero_is_the_identity_and_inference_ignores_masks(compiled):
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(6, 4)), rng.integers(0, 3, 6)
    zero = compiled(mlp(p=0.0), "float64", seed=5)
    perturb_params(zero, seed=6)
    loss, grads = zero.loss_and_grads(X, y)
    ref_loss, ref = _torch_grads(torch_mlp, zero, X, y, torch.ones(6, 5, dtype=torch.float64))
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for key in ref:
        assert rel_err(grads[key], ref[key]) <= 1e-10, key
    model = compiled(mlp(p=0.6), "float64", seed=5)
    model.params = zero.params
    P = {k: torch.tensor(v) for k, v in zero.params.items()}
    expected = torch_mlp(P, torch.tensor(X), torch.ones(6, 5, dtype=torch.float64)).numpy()
    assert rel_err(model.decision_function(X), expected) <= 1e-12


def test_masks_follow_the_seed_and_epoch_and_resume_bit_for_bit(compiled, tmp_path):
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(10, 4)), rng.integers(0, 3, 10)
    whole = compiled(mlp(), "float64", seed=8)
    whole.fit(X, y, optimizer=sb.Adam(0.01), batch_size=4, epochs=4, seed=11, progress=False)
    half = compiled(mlp(), "float64", seed=8)
    half.fit(X, y, optimizer=sb.Adam(0.01), batch_size=4, epochs=2, seed=11, progress=False)
    half.save(tmp_path / "half.npz")
    resumed = sb.load(tmp_path / "half.npz")
    resumed.fit(X, y, batch_size=4, epochs=4, initial_epoch=2, seed=11, progress=False)
    for key, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[key], value, err_msg=key)
    other = compiled(mlp(), "float64", seed=8)
    other.fit(X, y, optimizer=sb.Adam(0.01), batch_size=4, epochs=4, seed=12, progress=False)
    assert not np.array_equal(other.params["W3"], whole.params["W3"])  # another seed, other masks


def test_the_kept_fraction(compiled):
    net = sb.Network(inputs=200, layers=[sb.Dropout(0.25), sb.Dense(2)], loss="mse")
    model = compiled(net, "float64", seed=0)
    X, Y = np.ones((50, 200)), np.zeros((50, 2))
    model.loss_and_grads(X, Y)
    kept = np.mean(_mask(model, 50, "Amask1") > 0)
    assert abs(kept - 0.75) < 0.02  # 10,000 draws: 4.6 standard deviations is 0.02


def test_exports_toml_and_errors(compiled, tmp_path, session_cache_dir):
    model = compiled(mlp(), "float64", seed=1)
    X = np.random.default_rng(0).normal(size=(3, 4))
    module = model.to_torch()
    with torch.no_grad():
        assert rel_err(module(torch.tensor(X)).numpy(), model.decision_function(X)) <= 1e-12
    ort = pytest.importorskip("onnxruntime")
    logits = ort.InferenceSession(str(model.to_onnx(tmp_path / "d.onnx", dtype="float64"))).run(None, {"X": X})[0]
    assert rel_err(logits, model.decision_function(X)) <= 1e-12
    seq = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.2), torch.nn.Linear(3, 2)).double().eval()
    back = sb.from_torch(seq, dtype="float64", cache_dir=session_cache_dir)
    assert back.network.layers[1].p == pytest.approx(0.2)
    net = sb.Network.from_config({"inputs": 3, "layers": [{"units": 4}, {"type": "dropout", "p": 0.1}, {"units": 2}]})
    assert net.layers[1].p == 0.1 and sb.Network.from_config(net.to_config()).fingerprint() == net.fingerprint()
    with pytest.raises(ValueError, match=r"probability in \[0, 1\)"):
        sb.Dropout(1.0)


def test_readers_check_the_masks_loss_and_grads_draws(compiled):
    """The walkthrough and the entry graph evaluate the masks of seed 0 that loss_and_grads
    draws, so finite differences see one function and the kernels compare."""
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dropout(0.5), sb.Dense(2)])
    w = sb.walkthrough(compiled(net, "float64", seed=0))
    assert w.ok, str(w)
    assert w.kernel_loss == pytest.approx(w.loss, rel=1e-12)
    entries = sb.graph(net, collapse=False)
    for name, grad in w.grads.items():
        for idx in np.ndindex(*grad.shape):
            node = entries.entry(f"{name}[{','.join(map(str, idx))}]")
            assert node.grad == pytest.approx(grad[idx], rel=1e-9, abs=1e-12), (name, idx)
    text = sb.derive(net).explain()
    assert "δ1[n,p] = mask2[n,p]·δ2[n,p]·(1 - a1[n,p]²)" in text  # δ through the kept entries only
    assert "mask2[n,i] = dropout_mask(1/2, seed, 2, n, i)" in text  # seed, layer, sample, entry


def test_two_dropout_layers_draw_apart(compiled):
    net = sb.Network(inputs=4, layers=[sb.Dense(6, activation="relu"), sb.Dropout(0.5), sb.Dense(6, activation="relu"),
                                       sb.Dropout(0.5), sb.Dense(2)])
    model = compiled(net, "float64", seed=0)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(40, 4)), rng.integers(0, 2, 40)
    model.loss_and_grads(X, y)
    first, second = _mask(model, 40, "Amask2"), _mask(model, 40, "Amask4")
    assert 0.4 < np.mean(first == second) < 0.6  # independent draws agree about half the time
