"""PyTorch weights both ways (symbp/interop/torch_weights.py): ``model.to_torch()`` computes
``model.decision_function`` to 1e-6 in float32; ``sb.from_torch`` builds the model a
PyTorch ``nn.Sequential`` computes, with its weights; the round trip keeps every parameter
bit for bit; a module symbp has no layer for is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from _interop_nets import NETWORKS, inputs, spread

import symbp as sb

torch = pytest.importorskip("torch", reason="the PyTorch conversion needs torch")
nn = torch.nn


def forward(module, X: np.ndarray, dtype=torch.float32) -> np.ndarray:
    with torch.no_grad():
        return module(torch.as_tensor(X, dtype=dtype)).numpy()


def assert_same(got: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    # Relative to each entry, with a floor at rtol·max|ref| for entries that are nearly 0.
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_to_torch_computes_decision_function_and_round_trips(kind, compiled, session_cache_dir):
    net = NETWORKS[kind]()
    model = spread(compiled(net, dtype="float32"))
    X = inputs(net)
    ref = model.decision_function(X)
    module = model.to_torch()
    assert isinstance(module, nn.Sequential)
    assert_same(forward(module, X), ref, 1e-6)

    back = sb.from_torch(module, inputs=net.inputs, loss=net.loss.to_config(), name=net.name,
                         cache_dir=session_cache_dir)
    assert back.params.keys() == model.params.keys()
    for name, value in model.params.items():
        assert back.params[name].dtype == value.dtype and np.array_equal(back.params[name], value), name
    assert np.array_equal(back.decision_function(X), ref)
    assert back.network.to_config() == net.to_config()


def test_to_torch_keeps_a_float64_model_in_float64(compiled):
    model = spread(compiled(NETWORKS["mlp"](), dtype="float64"))
    module = model.to_torch()
    assert next(module.parameters()).dtype == torch.float64
    X = inputs(model.network)
    assert_same(forward(module, X, torch.float64), model.decision_function(X), 1e-12)


def test_from_torch_computes_what_pytorch_computes(session_cache_dir):
    torch.manual_seed(0)
    # ReLU after the MaxPool2d (the LeNet order) moves onto the conv; nested Sequential and
    # Identity are opened and dropped; the second conv's stride leaves a row over (PyTorch drops it).
    module = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, (2, 3), stride=2, padding=(0, 1)), nn.ELU(0.5)),
        nn.AvgPool2d((1, 2), stride=1), nn.Identity(), nn.Flatten(),
        nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 5), nn.Softplus(), nn.Linear(5, 3), nn.Sigmoid(),
    ).eval()
    model = sb.from_torch(module, inputs=(2, 10, 8), cache_dir=session_cache_dir)
    kinds = [type(layer).__name__ for layer in model.network.layers]
    assert kinds == ["Conv2D", "MaxPool2D", "Conv2D", "AvgPool2D", "Flatten", "Dense", "Dense", "Dense"]
    assert model.network.layers[0].activation.name == "relu" and model.network.layers[2].exact is False
    X = np.random.default_rng(0).normal(size=(6, 2, 10, 8)) * 2
    assert_same(model.decision_function(X), forward(module, X), 1e-6)


def test_from_torch_reads_the_width_of_an_mlp(session_cache_dir):
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    model = sb.from_torch(module, loss="mse", cache_dir=session_cache_dir)
    assert model.network.inputs == 4 and model.network.loss.name == "mse"
    X = np.random.default_rng(1).normal(size=(5, 4))
    assert_same(model.decision_function(X), forward(module, X), 1e-6)


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Linear(4, 3), nn.LSTM(3, 3)), "no layer for torch.nn.LSTM"),
    (nn.Sequential(nn.Linear(4, 3), nn.AlphaDropout(0.5), nn.Linear(3, 2)), "no layer for torch.nn.AlphaDropout"),
    (nn.Sequential(nn.Linear(4, 3, bias=False)), r"bias=False"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), "dilated convolution"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "grouped convolution"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, bias=False)), r"bias=False"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect")), "padding_mode='reflect'"),
    (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), "ceil_mode"),
    (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), "must follow a Linear or Conv2d"),
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh()), "already has an activation"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softplus(beta=2)), "beta"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(5, 2)), "inputs=|shape"),
    (nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)), r"shape \(2, 5\).*\(2, 3\)"),
])
def test_unsupported_modules_are_named(module, message, session_cache_dir):
    inputs = (1, 6, 6) if isinstance(module[0], nn.Conv2d) and len(module) == 1 else None
    with pytest.raises(ValueError, match=message):
        sb.from_torch(module, inputs=inputs, cache_dir=session_cache_dir)


def test_from_torch_takes_a_sequential(session_cache_dir):
    with pytest.raises(TypeError, match="Sequential"):
        sb.from_torch(nn.Linear(3, 2), cache_dir=session_cache_dir)


def test_a_formula_torch_cannot_evaluate_is_named(compiled):
    from symbp.interop.torch_weights import modules

    formula = modules()[0]
    with pytest.raises(ValueError, match="SymPy function gamma"):
        formula(sb.Activation(sp.gamma(sp.Symbol("x"))))


def test_a_saved_whole_module_loads_in_a_fresh_process(compiled, tmp_path):
    import os
    import subprocess
    import sys

    model = spread(compiled(NETWORKS["custom"](), dtype="float32"))
    X = inputs(model.network)
    torch.save(model.to_torch(), tmp_path / "m.pt")  # FormulaActivation and Maxout pickle by name
    np.save(tmp_path / "X.npy", X.astype(np.float32))
    code = ("import numpy as np, torch; m = torch.load('m.pt', weights_only=False); "
            "np.save('out.npy', m(torch.from_numpy(np.load('X.npy'))).detach().numpy())")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ,
                   "PYTHONPATH": str(Path(sb.__file__).parent.parent)})
    assert_same(np.load(tmp_path / "out.npy"), model.decision_function(X), 1e-6)
