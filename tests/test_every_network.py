"""Every network generates valid code: each sequence of up to three layer types (with and
without parameters, on an image or a flat input) that declares without a shape error is
generated, its model and SGD training modules compile as Python, and its forward pass
matches PyTorch's layers on the same weights.

The forward pass runs as Python (``forward.py_func``): that exercises every generated line
without JIT-compiling ~100 modules (the JIT-compiled kernels are tested elsewhere).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import symbp as sb
from symbp.backends.cpu.module import generate_train_source
from symbp.derive import derive

torch = pytest.importorskip("torch", reason="PyTorch is the reference for the forward pass")
F = torch.nn.functional

MAKERS = {
    "dense": lambda: sb.Dense(3, activation="tanh"),
    "conv": lambda: sb.Conv2D(2, 2, activation="relu"),
    "maxpool": lambda: sb.MaxPool2D(2),
    "avgpool": lambda: sb.AvgPool2D(2),
    "flatten": sb.Flatten,
    "maxout": lambda: sb.Maxout(2, 2),
    "layernorm": sb.LayerNorm,
    "formula": lambda: sb.Layer("z[n, k] = Sum(U[k, j]*x[n, j], j)*sigmoid(Sum(V[k, j]*x[n, j], j))", units=3,
                                params={"U": ("units", "in"), "V": ("units", "in")}),
}


def _networks():
    nets = []
    for length in (1, 2, 3):
        # The declared layers (LayerNorm, a formula layer) in sequences of up to two: beside
        # every other type once, without tripling the suite's time.
        makers = MAKERS if length < 3 else [k for k in MAKERS if k not in ("layernorm", "formula")]
        for kinds in itertools.product(makers, repeat=length):
            for inputs in ((2, 5, 5), 6):
                try:
                    nets.append(sb.Network(inputs=inputs, layers=[MAKERS[k]() for k in kinds], loss="mse"))
                except ValueError:  # a shape that does not fit (Dense on an image, a window too large)
                    continue
    return nets


NETWORKS = _networks()


def _reference(net, params, X):
    """The forward pass with PyTorch's functional layers, in float64."""
    x = torch.tensor(X.reshape(-1, *net.input_shape))
    for pos, layer in enumerate(net.layers, 1):
        W = torch.tensor(params[f"W{pos}"]) if f"W{pos}" in params else None
        b = torch.tensor(params[f"b{pos}"]) if f"b{pos}" in params else None
        kind = layer.to_config()["type"]
        if kind == "dense":
            x = torch.tanh(x @ W.T + b)
        elif kind == "conv2d":
            x = torch.relu(F.conv2d(x, W, b))
        elif kind == "maxpool2d":
            x = F.max_pool2d(x, 2)
        elif kind == "avgpool2d":
            x = F.avg_pool2d(x, 2)
        elif kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif kind == "maxout":
            x = (x @ W.T + b).reshape(x.shape[0], layer.units, layer.pieces).amax(-1)
        elif kind == "layernorm":
            x = F.layer_norm(x, x.shape[1:], torch.tensor(params[f"g{pos}"]), b, eps=layer.eps)
        elif kind == "formula":  # the gated unit
            x = (x @ torch.tensor(params[f"U{pos}"]).T) * torch.sigmoid(x @ torch.tensor(params[f"V{pos}"]).T)
    return x.reshape(x.shape[0], -1).numpy()


def test_the_sequences_cover_every_layer_type_with_and_without_parameters():
    kinds = {tuple(layer.to_config()["type"] for layer in net.layers) for net in NETWORKS}
    assert len(NETWORKS) >= 90
    assert {k for seq in kinds for k in seq} == {"dense", "conv2d", "maxpool2d", "avgpool2d", "flatten", "maxout",
                                                 "layernorm", "formula"}
    assert any(not net.param_shapes() for net in NETWORKS) and any(net.param_shapes() for net in NETWORKS)


IDS = [net.name + ":" + "-".join(layer.to_config()["type"] for layer in net.layers) for net in NETWORKS]


@pytest.mark.parametrize("net", NETWORKS, ids=IDS)
def test_every_network_generates_code_whose_forward_pass_matches_pytorch(net, tmp_path):
    model = sb.compile(net, dtype="float64", seed=3, cache_dir=tmp_path)
    compile(generate_train_source(derive(net), "float64", sb.SGD(lr=0.1), "model"), "train", "exec")
    kernels = model.kernels
    X = np.random.default_rng(0).normal(size=(3, int(np.prod(net.input_shape))))
    ws = {name: np.zeros((3 if shape[0] == "batch" else shape[0], *shape[1:])) for name, shape in kernels.WORKSPACE}
    acts = [ws[name] for name, _ in kernels.WORKSPACE if kernels.ROLES[name] == "activation"]
    kernels.forward.py_func(X, *(model.params[name] for name in kernels.PARAMS), *acts)
    out = X if kernels.LAST == "X" else ws[kernels.LAST]
    np.testing.assert_allclose(out, _reference(net, model.params, X), rtol=1e-12, atol=1e-12)


def test_a_network_without_parameters_predicts_and_refuses_training(tmp_path):
    net = sb.Network(inputs=(3, 4, 4), layers=[sb.MaxPool2D(2), sb.Flatten()], loss="mse")
    model = sb.compile(net, cache_dir=tmp_path)
    X = np.random.default_rng(1).random((2, 48)).astype(np.float32)
    expected = X.reshape(2, 3, 2, 2, 2, 2).max(axis=(3, 5)).reshape(2, 12)
    np.testing.assert_array_equal(model.decision_function(X), expected)
    with pytest.raises(ValueError, match="no parameters to train"):
        model.fit(X, np.zeros((2, 12), np.float32), epochs=1)
