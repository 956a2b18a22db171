"""LayerNorm over a sample's features, as PyTorch's ``nn.LayerNorm(features, eps=1e-5)``.

    m[n]    = Σ_j x[n,j] / D                      the sample's mean
    v[n]    = Σ_j (x[n,j] − m[n])² / D            its (biased) variance
    z[n,i]  = γ[i]·(x[n,i] − m[n]) / √(v[n] + ε) + β[i]

Three stages, the first two one number per sample: SymPy differentiates through the mean and
the variance, so ∂C/∂x comes out with its three terms (through z directly, through v and
through m).  γ starts at ones and β at zeros; l2 leaves both alone.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from ...indices import N, i, j, n, p, width
from .base import Layer, LayerForm, Stage, register, shape_text


@register
class LayerNorm(Layer):
    """Normalise each sample over its features, then scale and shift (γ, β per feature)."""

    type_name = "layernorm"
    kind = "LayerNorm"
    config_keys = ("eps",)
    notes = {"z": "normalised by the sample's own mean and variance (biased, over its features), then γ·… + β"}

    def __init__(self, eps: float = 1e-5) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"LayerNorm eps must be a number in (0, 1), got {eps!r}")
        self.eps = float(eps)

    def output_shape(self, in_shape: tuple) -> tuple:
        if len(in_shape) != 1:
            raise ValueError(f"LayerNorm takes a flat input but gets shape {tuple(in_shape)}: put sb.Flatten() "
                             "before it")
        return tuple(in_shape)

    def param_shapes(self, in_shape: tuple) -> dict:
        return {"g": tuple(in_shape), "b": tuple(in_shape)}

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        (D,) = in_dims
        out = width(l)
        g = sp.IndexedBase(f"g{l}", shape=(out,), real=True)
        b = sp.IndexedBase(f"b{l}", shape=(out,), real=True)
        m = sp.IndexedBase(f"m{l}", shape=(N,), real=True)
        v = sp.IndexedBase(f"v{l}", shape=(N,), real=True)
        z = sp.IndexedBase(f"z{l}", shape=(N, out), real=True)
        eps = sp.nsimplify(self.eps, rational=True)
        stages = [
            Stage(m, (), sp.Sum(x[n, j], (j, 0, D - 1)) / D, ()),
            Stage(v, (), sp.Sum((x[n, j] - m[n]) ** 2, (j, 0, D - 1)) / D, ()),
            Stage(z, (i,), g[i] * (x[n, i] - m[n]) / sp.sqrt(v[n] + eps) + b[i], (out,)),
        ]
        return LayerForm({"g": g, "b": b}, {"g": (p,), "b": (p,)}, {"g": (out,), "b": (out,)}, stages)

    def init(self, rng: np.random.Generator, in_shape: tuple, dtype) -> dict:
        return {"g": np.ones(in_shape, dtype), "b": np.zeros(in_shape, dtype)}

    def size_lines(self, ld, text) -> list[str]:
        (d,) = ld.in_shape
        return [f"parameters (g {shape_text(d)}, b {shape_text(d)}): 2·features = 2·{d} = {ld.param_count}"]

    def describe(self) -> str:
        return f"LayerNorm(eps={self.eps:g})"

    def to_config(self) -> dict:
        return {"type": "layernorm", "eps": self.eps}

    def __repr__(self) -> str:
        return f"LayerNorm(eps={self.eps:g})"
