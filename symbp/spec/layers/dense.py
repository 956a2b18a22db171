"""Dense: ``z[n, i] = Σ_j W[i, j]·x[n, j] + b[i]``, ``a = f(z)``, as PyTorch's ``Linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import activations
from .base import Layer, LayerForm, Stage, register

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@register
class Dense(Layer):
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

    type_name = "dense"
    kind = "Dense"
    config_keys = ("units", "activation")
    required = ("units",)

    def __init__(self, units: int, activation: object = None, **activation_params: float) -> None:
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)):
            raise TypeError(f"Dense units must be an int, got {type(units).__name__} {units!r}")
        if units < 1:
            raise ValueError(f"Dense units must be positive, got {units}")
        self.units = int(units)
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)

    def output_shape(self, in_shape: tuple) -> tuple[int]:
        if len(in_shape) != 1:
            raise ValueError(f"Dense({self.units}) takes a flat input but gets shape {tuple(in_shape)}: "
                             f"put sb.Flatten() before it (giving {int(np.prod(in_shape))} features)")
        return (self.units,)

    def param_shapes(self, in_shape: tuple) -> dict[str, tuple[int, ...]]:
        return {"W": (self.units, in_shape[0]), "b": (self.units,)}

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        """z_l[n, i] = Σ_j W_l[i, j]·x[n, j] + b_l[i], widths d_{l-1} → d_l kept symbolic."""
        import sympy as sp

        from ...indices import N, i, j, n, p, q, width

        (fan_in,), fan_out = in_dims, width(l)
        W = sp.IndexedBase(f"W{l}", shape=(fan_out, fan_in), real=True)
        b = sp.IndexedBase(f"b{l}", shape=(fan_out,), real=True)
        z = sp.IndexedBase(f"z{l}", shape=(N, fan_out), real=True)
        stage = Stage(z, (i,), sp.Sum(W[i, j] * x[n, j], (j, 0, fan_in - 1)) + b[i], (fan_out,))
        return LayerForm({"W": W, "b": b}, {"W": (p, q), "b": (p,)}, {"W": (fan_out, fan_in), "b": (fan_out,)},
                         [stage], decay=("W",))

    def init(self, rng: np.random.Generator, in_shape: tuple, dtype: np.dtype) -> dict[str, np.ndarray]:
        # PyTorch's Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b, so a user
        # comparing the two starts from the same distribution.
        bound = 1.0 / np.sqrt(in_shape[0])
        return {
            "W": rng.uniform(-bound, bound, (self.units, in_shape[0])).astype(dtype),
            "b": rng.uniform(-bound, bound, (self.units,)).astype(dtype),
        }

    def describe(self) -> str:
        return f"Dense({self.units})"

    def to_config(self) -> dict:
        return {"type": "dense", "units": self.units, **self.activation.layer_config()}

    def __repr__(self) -> str:
        return f"Dense({self.units}, activation={self.activation.describe()!r})"
