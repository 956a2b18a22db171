"""The networks the ONNX and PyTorch export tests share (not a test module): every built-in
layer and activation, and custom activation formulas, in four small networks, with inputs
for each.  Weights are drawn away from the small init so that every activation's curved
part (and relu's kink) is reached."""

from __future__ import annotations

import numpy as np
import sympy as sp

import symbp as sb

_u = sp.Symbol("u")
# Exact ½, not the float 0.5: the CPU printer of this tree turns a SymPy Float into an int
# (symbp/backends/cpu.py, _print_Float = _print_Integer), reported to the lead.
_half = sp.Rational(1, 2)

NETWORKS = {
    # every built-in activation, one Dense each
    "mlp": lambda: sb.Network(5, [
        sb.Dense(8, activation="tanh"), sb.Dense(7, activation="leaky_relu", slope=0.2),
        sb.Dense(7, activation="elu", alpha=0.7), sb.Dense(6, activation="softplus"),
        sb.Dense(6, activation="sigmoid"), sb.Dense(5, activation="relu"), sb.Dense(3)], name="interop-mlp"),
    # conv with stride and padding different per axis, every window layer, flatten and dense
    "cnn": lambda: sb.Network((2, 9, 8), [
        sb.Conv2D(4, kernel=(3, 2), stride=(2, 1), padding=(1, 0), activation="relu"),
        sb.MaxPool2D(2), sb.Conv2D(3, kernel=1, padding=1, activation="tanh"),
        sb.AvgPool2D((2, 1), stride=1), sb.Flatten(), sb.Dense(4)], name="interop-cnn"),
    "maxout": lambda: sb.Network(6, [sb.Maxout(5, pieces=3), sb.Maxout(4, pieces=2), sb.Dense(3)],
                                 name="interop-maxout"),
    # custom formulas: text (sigmoid, softplus, abs, a half power, a cube, max, sign, cos,
    # a constant sqrt(2)) and a SymPy Piecewise in another symbol
    "custom": lambda: sb.Network(5, [
        sb.Dense(6, activation="z*sigmoid(1.5*z)"),
        sb.Dense(6, activation="log(1+exp(z))/2 + abs(z)**0.5"),
        sb.Dense(5, activation="max(z, 0.1*z) - z**3/(2 + z**2) + sign(z)*cos(z) - sqrt(2)/(1 + exp(-z))"),
        sb.Dense(4, activation=sp.Piecewise((_u, _u > _half), (_u**2 / 2 + _half**3, _u > -_half), (-_u, True))),
        sb.Dense(3)], name="interop-custom"),
}


def inputs(net: sb.Network, rows: int = 11, seed: int = 1) -> np.ndarray:
    """Standard normal inputs shaped (rows, *input_shape)."""
    return np.random.default_rng(seed).normal(size=(rows, *net.input_shape))


def spread(model: sb.Model, seed: int = 2, scale: float = 2.0) -> sb.Model:
    """The model with its weights multiplied by ``scale`` and biases redrawn from N(0, 1):
    units land on both sides of every kink and in the tails of every curve."""
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        new = value * scale if name.startswith("W") else rng.normal(size=value.shape)
        model.params[name] = new.astype(model.dtype)
    return model
