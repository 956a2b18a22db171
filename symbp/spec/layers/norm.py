"""Normalisation layers: LayerNorm and BatchNorm, with PyTorch's definitions.

LayerNorm over a sample's features, as PyTorch's ``nn.LayerNorm(features, eps=1e-5)``:

    m[n]    = Σ_j x[n,j] / D                      the sample's mean
    v[n]    = Σ_j (x[n,j] − m[n])² / D            its (biased) variance
    z[n,i]  = γ[i]·(x[n,i] − m[n]) / √(v[n] + ε) + β[i]

Three stages, the first two one number per sample: SymPy differentiates through the mean and
the variance, so ∂C/∂x comes out with its three terms (through z directly, through v and
through m).  γ starts at ones and β at zeros; l2 leaves both alone.

BatchNorm over the batch, as ``nn.BatchNorm1d(C)`` on (N, C) and ``nn.BatchNorm2d(C)`` on
(N, C, H, W), with the statistics of each feature or channel over the batch (and the image):

    m[i]    = Σ_ν x[ν,i] / N                      batch stages: one number per feature
    v[i]    = Σ_ν (x[ν,i] − m[i])² / N            (biased, for normalising)
    rsig[i] = 1/√(v[i] + ε)                       (once per feature, not per entry)
    z[n,i]  = γ[i]·(x[n,i] − m[i])·rsig[i] + β[i]

SymPy differentiates through m and v, which every sample of the batch reads: ∂C/∂x comes
out in the textbook's three terms.  Training also keeps running statistics, updated after
each forward pass as PyTorch does (``running ← (1 − momentum)·running + momentum·batch``,
the variance unbiased: ·count/(count − 1)); outside training (predict, evaluate) z reads
those instead of the batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Layer, LayerForm, Stage, register, shape_text

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


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
        import sympy as sp

        from ...indices import N, i, j, n, p, width

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


@register
class BatchNorm(Layer):
    """Normalise each feature (or channel) over the batch, then scale and shift (γ, β)."""

    type_name = "batchnorm"
    kind = "BatchNorm"
    config_keys = ("momentum", "eps")
    running_keys = ("rmean", "rvar")
    notes = {"z": "normalised by the batch's mean and variance of each feature (biased, over the batch), then "
                  "γ·… + β; outside training the running statistics replace them"}

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm momentum must be a number in [0, 1], got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"BatchNorm eps must be a number in (0, 1), got {eps!r}")
        self.momentum, self.eps = float(momentum), float(eps)

    def output_shape(self, in_shape: tuple) -> tuple:
        if len(in_shape) not in (1, 3):
            raise ValueError(f"BatchNorm takes (features,) or (C, H, W), got {tuple(in_shape)}")
        return tuple(in_shape)

    def param_shapes(self, in_shape: tuple) -> dict:
        C = (in_shape[0],)
        return {"g": C, "b": C, "rmean": C, "rvar": C}

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import N, h, i, k, n, nu, p, w

        C = in_dims[0]  # the input's own extent: δ comes back to it unguarded
        base = {key: sp.IndexedBase(f"{key}{l}", shape=(C,), real=True) for key in ("g", "b", "rmean", "rvar")}
        g, b = base["g"], base["b"]
        m = sp.IndexedBase(f"m{l}", shape=(C,), real=True)
        v = sp.IndexedBase(f"v{l}", shape=(C,), real=True)
        rsig = sp.IndexedBase(f"rsig{l}", shape=(C,), real=True)
        z = sp.IndexedBase(f"z{l}", real=True)
        eps = sp.nsimplify(self.eps, rational=True)
        if len(in_dims) == 1:
            ch, out_idx, read, at, count = i, (i,), (i,), (i,), N
            limits = [(nu, 0, N - 1)]
        else:
            _, H, W_ = in_dims
            ch, out_idx, read, at, count = k, (k, h, w), (k, h, w), (k,), N * H * W_
            limits = [(nu, 0, N - 1), (h, 0, H - 1), (w, 0, W_ - 1)]
        stages = [
            Stage(m, (ch,), sp.Sum(x[(nu, *read)], *limits) / count, (C,), batch=True),
            Stage(v, (ch,), sp.Sum((x[(nu, *read)] - m[ch]) ** 2, *limits) / count, (C,), batch=True),
            # 1/σ as a stage of its own: its square root and its derivative are taken once per
            # feature, not once per entry (outside training it is 1/√(running variance + ε))
            Stage(rsig, (ch,), 1 / sp.sqrt(v[ch] + eps), (C,), batch=True),
            Stage(z, out_idx, g[at] * (x[(n, *read)] - m[at]) * rsig[at] + b[at], (C, *in_dims[1:])),
        ]
        mom = sp.nsimplify(self.momentum, rational=True)
        updates = [(base["rmean"][ch], (1 - mom) * base["rmean"][ch] + mom * m[ch]),
                   (base["rvar"][ch], (1 - mom) * base["rvar"][ch] + mom * v[ch] * count / (count - 1))]
        return LayerForm({"g": g, "b": b}, {"g": (p,), "b": (p,)}, {"g": (C,), "b": (C,)}, stages,
                         running={"rmean": base["rmean"], "rvar": base["rvar"]}, running_updates=updates,
                         eval_subs={m: base["rmean"], v: base["rvar"]})

    def init(self, rng: np.random.Generator, in_shape: tuple, dtype) -> dict:
        C = (in_shape[0],)
        return {"g": np.ones(C, dtype), "b": np.zeros(C, dtype), "rmean": np.zeros(C, dtype), "rvar": np.ones(C, dtype)}

    def size_lines(self, ld, text) -> list[str]:
        C = ld.in_shape[0]
        what = "features" if len(ld.in_shape) == 1 else "channels"
        return [f"parameters (g ({C},), b ({C},)): 2·{what} = 2·{C} = {ld.param_count}; "
                f"running statistics (rmean ({C},), rvar ({C},)), not trained"]

    def describe(self) -> str:
        return f"BatchNorm(momentum={self.momentum:g}, eps={self.eps:g})"

    def to_config(self) -> dict:
        return {"type": "batchnorm", "momentum": self.momentum, "eps": self.eps}

    def __repr__(self) -> str:
        return self.describe()
