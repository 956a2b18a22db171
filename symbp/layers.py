"""Layers: each states its forward formula in index notation and how it initialises its
parameters.  Their gradients are not written here: :mod:`symbp.derive` differentiates the
index formula with SymPy and chains the results.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from . import activations
from .indices import i, j, n


class Dense:
    """Fully connected layer ``z = x Wᵀ + b``, ``a = f(z)``, as PyTorch's ``Linear``.

    Parameters
    ----------
    units : int
        Number of output units.
    activation : str, sympy.Expr, Activation or None
        A built-in name, a formula in ``z``, or None for the identity.
    **activation_params
        ``slope`` for leaky_relu, ``alpha`` for elu.
    """

    def __init__(self, units: int, activation: object = None, **activation_params: float) -> None:
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)):
            raise TypeError(f"Dense units must be an int, got {type(units).__name__} {units!r}")
        if units < 1:
            raise ValueError(f"Dense units must be positive, got {units}")
        self.units = int(units)
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)

    kind = "Dense"

    def param_shapes(self, fan_in: int) -> dict[str, tuple[int, ...]]:
        return {"W": (self.units, fan_in), "b": (self.units,)}

    def output_shape(self, in_shape: tuple) -> tuple[int]:
        if len(in_shape) != 1:
            raise ValueError(f"Dense({self.units}) takes a flat input but gets shape {tuple(in_shape)}: "
                             f"put sb.Flatten() before it (giving {int(np.prod(in_shape))} features)")
        return (self.units,)

    def forward_formula(self, x: sp.IndexedBase, W: sp.IndexedBase, b: sp.IndexedBase, fan_in: sp.Expr) -> sp.Expr:
        """z[n, i] = Σ_j W[i, j] x[n, j] + b[i]."""
        return sp.Sum(W[i, j] * x[n, j], (j, 0, fan_in - 1)) + b[i]

    def init(self, rng: np.random.Generator, fan_in: int, dtype: np.dtype) -> dict[str, np.ndarray]:
        # PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b, so a user
        # comparing the two starts from the same distribution.
        bound = 1.0 / np.sqrt(fan_in)
        return {
            "W": rng.uniform(-bound, bound, (self.units, fan_in)).astype(dtype),
            "b": rng.uniform(-bound, bound, (self.units,)).astype(dtype),
        }

    def to_config(self) -> dict:
        return {"type": "dense", "units": self.units, **self.activation.layer_config()}

    def __repr__(self) -> str:
        return f"Dense({self.units}, activation={self.activation.describe()!r})"


LAYER_TYPES = {"dense": Dense}

from .conv import IMAGE_LAYERS  # noqa: E402 - conv's layers register beside Dense

LAYER_TYPES.update(IMAGE_LAYERS)
