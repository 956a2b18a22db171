"""Shared test helpers: the small networks the gradient tests use, matching data, and a
float64 PyTorch reference for any of them.

Not a test module (pytest collects only ``test_*.py``); imported by the tests and by
``conftest.py``.  ``torch`` is imported lazily, only by :func:`torch_loss_and_grads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

import symbp as sb

# --------------------------------------------------------------------------------------------
# Activations: key -> keyword arguments for sb.Dense.  Every key also has a torch twin below.
# --------------------------------------------------------------------------------------------
_u = sp.Symbol("u")  # deliberately not "z": a SymPy expression may use any single symbol

ACTIVATIONS: dict[str, dict] = {
    "identity": {"activation": None},
    "sigmoid": {"activation": "sigmoid"},
    "tanh": {"activation": "tanh"},
    "relu": {"activation": "relu"},
    "leaky_relu": {"activation": "leaky_relu", "slope": 0.2},
    "leaky_relu_default": {"activation": "leaky_relu"},  # slope 0.01
    "elu": {"activation": "elu", "alpha": 0.7},
    "softplus": {"activation": "softplus"},
    "mish": {"activation": "z*tanh(log(1 + exp(z)))"},  # custom formula string
    "swish": {"activation": "z*sigmoid(z)"},  # custom formula string using a helper
    "swish_sympy": {"activation": _u / (1 + sp.exp(-_u))},  # custom SymPy expression
    # Constant multiples of z (issue 12: the bias was counted twice in 2·(x·Wᵀ + b)), and a
    # max whose gradient is 0.1 (not ½) below the kink.
    "gelu_tanh": {"activation": "0.5*z*(1+tanh(0.7978845608*(z+0.044715*z**3)))"},
    "max_leaky": {"activation": "max(z, 0.1*z)"},
}

# key -> sb loss spec
LOSSES: dict[str, str] = {
    "ce": "softmax_cross_entropy",
    "mse": "mse",
    "bce": "binary_cross_entropy",
    "logcosh": "log(cosh(y - t))",
    "l1": "abs(y - t)",  # mean absolute error, a custom formula
}


@dataclass(frozen=True)
class NetSpec:
    """A hashable description of a small test network."""

    name: str
    inputs: int
    layers: tuple  # ((units, activation key), ...); the last layer is the output layer
    loss: str  # key of LOSSES
    l2: float = 0.0

    def build(self) -> sb.Network:
        layers = [sb.Dense(units, **ACTIVATIONS[act]) for units, act in self.layers]
        return sb.Network(inputs=self.inputs, layers=layers, loss=LOSSES[self.loss], l2=self.l2, name=self.name)

    @property
    def activations(self) -> set[str]:
        return {act for _, act in self.layers}

    @property
    def outputs(self) -> int:
        return self.layers[-1][0]


# Every activation appears in a hidden layer of one net without l2 and one net with l2, and
# every loss in one net of each kind: 10 networks cover activations x losses x {l2, no l2}.
GRAD_NETS: dict[str, NetSpec] = {s.name: s for s in [
    NetSpec("g1-tanh-sigmoid-ce", 5, ((4, "tanh"), (5, "sigmoid"), (3, "identity")), "ce", 0.0),
    NetSpec("g2-relu-leaky-mse", 5, ((6, "relu"), (4, "leaky_relu"), (3, "identity")), "mse", 0.0),
    NetSpec("g3-elu-softplus-bce", 5, ((4, "elu"), (5, "softplus"), (3, "identity")), "bce", 0.0),
    NetSpec("g4-mish-swish-logcosh", 5, ((4, "mish"), (5, "swish"), (3, "identity")), "logcosh", 0.0),
    NetSpec("g5-sigmoid-relu-bce-l2", 5, ((4, "sigmoid"), (5, "relu"), (3, "identity")), "bce", 0.3),
    NetSpec("g6-leaky-elu-logcosh-l2", 5, ((5, "leaky_relu_default"), (4, "elu"), (3, "identity")), "logcosh", 0.3),
    NetSpec("g7-softplus-mish-ce-l2", 5, ((4, "softplus"), (5, "mish"), (3, "identity")), "ce", 0.3),
    NetSpec("g8-swishsym-tanh-mse-l2", 5, ((5, "swish_sympy"), (4, "tanh"), (3, "identity")), "mse", 0.3),
    NetSpec("g9-tanh-l1", 5, ((4, "tanh"), (3, "identity")), "l1", 0.0),
    NetSpec("g10-relu-l1-l2", 5, ((4, "relu"), (3, "identity")), "l1", 0.3),
    NetSpec("g11-gelu-maxleaky-mse-l2", 5, ((4, "gelu_tanh"), (5, "max_leaky"), (3, "identity")), "mse", 0.1),
]}


# The output layer may carry an activation too: one whose derivative needs z (softplus) and
# a single-layer net whose output activation's derivative is written in a (sigmoid).
OUTPUT_ACT_NETS: dict[str, NetSpec] = {s.name: s for s in [
    NetSpec("o1-tanh-softplus-out-mse", 4, ((4, "tanh"), (3, "softplus")), "mse", 0.0),
    NetSpec("o2-sigmoid-out-logcosh-l2", 4, ((3, "sigmoid"),), "logcosh", 0.1),
]}


def _random_nets(seed: int = 0, count: int = 3) -> dict[str, NetSpec]:
    rng = np.random.default_rng(seed)
    acts = sorted(ACTIVATIONS)
    losses = sorted(LOSSES)
    nets = {}
    for k in range(count):
        depth = int(rng.integers(1, 4))  # 1..3 layers including the output layer
        inputs = int(rng.integers(1, 9))
        hidden = [(int(rng.integers(1, 7)), str(rng.choice(acts))) for _ in range(depth - 1)]
        loss = losses[k % len(losses)]  # spread the losses over the random nets
        outputs = int(rng.integers(2 if loss == "ce" else 1, 5))
        l2 = float(rng.choice([0.0, 0.05]))
        name = f"rand{k}-d{depth}-{loss}"
        nets[name] = NetSpec(name, inputs, tuple(hidden) + ((outputs, "identity"),), loss, l2)
    return nets


RANDOM_NETS = _random_nets()


def make_data(spec: NetSpec, n: int = 12, seed: int = 0, one_hot: bool = False):
    """Inputs and targets suited to ``spec``'s loss (labels for CE, [0, 1] for BCE)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, (n, spec.inputs))
    K = spec.outputs
    if spec.loss == "ce":
        y = rng.integers(0, K, n)
        y[:K] = np.arange(K)  # every class present
        if one_hot:
            y = np.eye(K)[y]
    elif spec.loss == "bce":
        y = rng.uniform(0.0, 1.0, (n, K))
        y[0, :] = 0.0  # hard targets too
        y[1, :] = 1.0
    else:
        y = rng.normal(0.0, 1.0, (n, K))
    return X, y


def perturb_params(model, seed: int = 1, scale: float = 1.0) -> None:
    """Replace the parameters with new random float64 values (biases non-zero, so that a
    bias that is silently ignored cannot go unnoticed)."""
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        fan_in = value.shape[1] if value.ndim == 2 else 1
        model.params[name] = (rng.normal(0.0, scale / np.sqrt(max(fan_in, 1)), value.shape)).astype(model.dtype)


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------
def _torch_activation(key: str, z):
    import torch
    import torch.nn.functional as F

    if key == "identity":
        return z
    if key == "sigmoid":
        return torch.sigmoid(z)
    if key == "tanh":
        return torch.tanh(z)
    if key == "relu":
        return torch.relu(z)
    if key == "leaky_relu":
        return F.leaky_relu(z, negative_slope=0.2)
    if key == "leaky_relu_default":
        return F.leaky_relu(z, negative_slope=0.01)
    if key == "elu":
        return F.elu(z, alpha=0.7)
    if key == "softplus":
        return F.softplus(z)
    if key == "mish":
        return z * torch.tanh(F.softplus(z))
    if key in ("swish", "swish_sympy"):
        return z * torch.sigmoid(z)
    if key == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(0.7978845608 * (z + 0.044715 * z**3)))
    if key == "max_leaky":
        return torch.maximum(z, 0.1 * z)
    raise KeyError(key)


def _torch_loss(key: str, out, y):
    import torch
    import torch.nn.functional as F

    if key == "ce":
        if y.ndim == 1:
            return F.cross_entropy(out, torch.as_tensor(y, dtype=torch.int64))
        return F.cross_entropy(out, torch.as_tensor(y, dtype=torch.float64))
    t = torch.as_tensor(np.asarray(y, np.float64).reshape(out.shape))
    if key == "mse":
        return F.mse_loss(out, t)
    if key == "bce":
        return F.binary_cross_entropy_with_logits(out, t)
    if key == "logcosh":
        return torch.log(torch.cosh(out - t)).mean()
    if key == "l1":
        return F.l1_loss(out, t)
    raise KeyError(key)


def torch_loss_and_grads(spec: NetSpec, params: dict, X, y) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of ``spec`` at ``params`` computed by PyTorch autograd in float64."""
    import torch

    tp = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params.items()}
    a = torch.as_tensor(np.asarray(X, np.float64))
    for pos, (_, act) in enumerate(spec.layers, 1):
        a = _torch_activation(act, a @ tp[f"W{pos}"].T + tp[f"b{pos}"])
    loss = _torch_loss(spec.loss, a, y)
    if spec.l2:
        loss = loss + spec.l2 / 2 * sum((tp[f"W{pos}"] ** 2).sum() for pos in range(1, len(spec.layers) + 1))
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy().copy() for k, v in tp.items()}


def assert_steps_are_fits(a, b, make_opt, X, y, steps: int = 3):
    """``steps`` calls of ``a.train_on_batch(X, y)`` against ``b.fit`` (the same start) for as
    many one-batch epochs: the same losses, parameters and optimizer state, bit for bit.
    Returns the two optimizers."""
    oa, ob = make_opt(), make_opt()
    losses = [a.train_on_batch(X, y, oa) for _ in range(steps)]
    history = b.fit(X, y, optimizer=ob, batch_size=len(X), epochs=steps, shuffle=False, progress=False)
    assert losses == history.history["loss"]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
        for s_ in oa.state_names:
            np.testing.assert_array_equal(oa.state[k][s_], ob.state[k][s_])
    return oa, ob


def rel_err(a, b) -> float:
    """Norm-wise relative difference max|a − b| / max|b| (0 when both are all zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), np.abs(a).max(initial=0.0))
    diff = np.abs(a - b).max(initial=0.0)
    return 0.0 if diff == 0.0 else diff / scale


def cnn():
    """The image net of the CUDA tests (cuda_sim_cases.py, cuda_ptx_cases.py).

    One small net takes every path of the image layers' lowering (one: its CPU twin's Numba
    compile is most of the tests' cost).  Layers: 1 a direct-loop conv (C·kh·kw < 8: guarded
    window sums; ∂C/∂W a guarded sum over the batch), stride 2, padding 1; 2 overlapping max
    pooling; 3 an im2col conv (a GEMM per sample, ∂C/∂W a GEMM summed over the samples, ∂C/∂x
    by col2im, a scatter run as a gather); 4 average pooling; 5 a direct conv whose ∂C/∂x is a
    guarded window sum; 6 Flatten; 7, 8 Maxout of 2 and of 3 pieces; 9 Dense.
    """
    layers = [
        sb.Conv2D(2, 2, stride=2, padding=1, activation="tanh"), sb.MaxPool2D(2, stride=1),
        sb.Conv2D(2, 2, padding=1, activation="relu"), sb.AvgPool2D(2), sb.Conv2D(2, (2, 1), activation="sigmoid"),
        sb.Flatten(), sb.Maxout(3, 2), sb.Maxout(2, 3), sb.Dense(3)]
    return sb.Network(inputs=(1, 6, 6), layers=layers, loss="softmax_cross_entropy", l2=0.1, name="cuda-cnn")
