"""Conv2D: 2-D convolution (cross-correlation), as PyTorch's ``Conv2d``.

    x̃[n,c,y,x] = x[n,c,y−P,x−P] inside, 0 in the padding
    z[n,k,h,w] = Σ_{c,u,v} W[k,c,u,v]·x̃[n,c,S·h+u,S·w+v] + b[k]

Output size per axis: ``(N − F + 2P) // S + 1``.  Parameters are laid out as PyTorch's: W
``(K, C, kh, kw)``, b ``(K,)``.  Sizes stay symbols in the formulas (``C_0, H_0, W_0``,
``kh_1``, ``S_1``, ``P_1``, …); the planner fixes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import activations
from .base import (
    Layer,
    LayerForm,
    Stage,
    config_pair,
    image_dims,
    int_pair,
    pair_text,
    positive_int,
    register,
    shape_text,
    size_symbol,
)
from .windows import need_3d, window_count, window_size_lines

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@register
class Conv2D(Layer):
    """2-D convolution (cross-correlation, as PyTorch's ``Conv2d``), ``a = f(z)``.

    Parameters
    ----------
    filters : int
        K, the number of output channels.
    kernel : int or (int, int)
        Filter size (rows, cols).
    stride : int or (int, int)
    padding : int or (int, int)
        Zeros added on each side.
    activation : str, sympy.Expr or None
        As for :class:`symbp.Dense`.
    exact : bool
        True (default): refuse a stride that leaves input rows/columns unused (the output
        size ``(N − F + 2P)/S + 1`` not a whole number); False: drop them, as PyTorch does.

    Parameters are ``W`` (K, C, kh, kw) and ``b`` (K,): (F·F·C + 1)·K in all.
    """

    type_name = "conv2d"
    kind = "Conv2D"
    config_keys = ("filters", "kernel", "stride", "padding", "activation", "exact")
    required = ("filters", "kernel")

    def __init__(self, filters: int, kernel, stride=1, padding=0, activation: object = None, exact: bool = True,
                 **activation_params: float) -> None:
        self.filters = positive_int(filters, "filters", "Conv2D")
        self.kernel = int_pair(kernel, "kernel", "Conv2D")
        self.stride = int_pair(stride, "stride", "Conv2D")
        self.padding = int_pair(padding, "padding", "Conv2D", low=0)
        if not isinstance(exact, (bool, np.bool_)):  # bool("false") is True: refuse, never guess
            raise ValueError(f"Conv2D exact must be true or false, got {exact!r}")
        self.exact = bool(exact)
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)

    def output_shape(self, in_shape: tuple) -> tuple[int, int, int]:
        C, H, W = need_3d(self, in_shape)
        out = []
        for axis, size, F, S, P in zip(("row", "column"), (H, W), self.kernel, self.stride, self.padding):
            o = window_count(axis, size, F, S, P, repr(self))
            if self.exact and (size - F + 2 * P) % S:
                raise ValueError(f"{self!r}: output {axis}s ({size} − {F} + 2·{P})/{S} + 1 = "
                                 f"{(size - F + 2 * P) / S + 1:g} is not a whole number")
            out.append(o)
        return (self.filters, out[0], out[1])

    def param_shapes(self, in_shape: tuple) -> dict:
        return {"W": (self.filters, in_shape[0], *self.kernel), "b": (self.filters,)}

    def init(self, rng, in_shape, dtype) -> dict:
        # PyTorch's Conv2d default: U(±1/sqrt(C·kh·kw)) for W and b.
        bound = 1.0 / np.sqrt(in_shape[0] * self.kernel[0] * self.kernel[1])
        return {"W": rng.uniform(-bound, bound, self.param_shapes(in_shape)["W"]).astype(dtype),
                "b": rng.uniform(-bound, bound, (self.filters,)).astype(dtype)}

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import c, h, k, n, p, q, r, s, u, v, w

        C, H, W_ = in_dims
        K, Ho, Wo = image_dims(l)
        kh, kw, S = size_symbol("kh", l), size_symbol("kw", l), size_symbol("S", l)
        P = sp.Symbol(f"P_{l}", integer=True, nonnegative=True)
        sizes = {kh: self.kernel[0], kw: self.kernel[1], S: self.stride[0], P: self.padding[0]}
        S2, P2 = S, P  # one symbol each when rows and columns agree
        if self.stride[1] != self.stride[0]:
            S2 = size_symbol("Sc", l)
            sizes[S2] = self.stride[1]
        if self.padding[1] != self.padding[0]:
            P2 = sp.Symbol(f"Pc_{l}", integer=True, nonnegative=True)
            sizes[P2] = self.padding[1]
        Wt = sp.IndexedBase(f"W{l}", shape=(K, C, kh, kw))
        b = sp.IndexedBase(f"b{l}", shape=(K,))
        xp = sp.IndexedBase(f"xpad{l}", shape=(sp.Symbol("N"), C, H + 2 * P, W_ + 2 * P2))
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        # x̃ as a sum over deltas: SymPy resolves it to x[n, c, h − P, w − P] with the range
        # test that makes the border zero.
        pad = sp.Sum(sp.KroneckerDelta(h, u + P) * sp.KroneckerDelta(w, v + P2) * x[n, c, u, v],
                     (u, 0, H - 1), (v, 0, W_ - 1))
        conv = sp.Sum(Wt[k, c, u, v] * xp[n, c, S * h + u, S2 * w + v], (c, 0, C - 1), (u, 0, kh - 1), (v, 0, kw - 1)) + b[k]
        stages = [Stage(xp, (c, h, w), pad, xp.shape[1:]), Stage(z, (k, h, w), conv, (K, Ho, Wo))]
        return LayerForm({"W": Wt, "b": b}, {"W": (p, q, r, s), "b": (p,)}, {"W": (K, C, kh, kw), "b": (K,)},
                         stages, sizes, decay=("W",))

    notes = {
        "z": "the convolution (cross-correlation, as PyTorch's Conv2d)",
        "stage:xpad": "zero padding: x shifted by P inside, 0 on the border",
        "local:z/W": "the forward-pass part: the (padded) input under the filter",
        "local:z/xpad": "the filter weight that joins x̃[q,r,s] to z[k,h,w], where the window covers it",
        "local:xpad/x": "the padding moves each input by P",
        "sent_back": "the convolution above sends back its ∂C/∂x̃ at the unpadded positions",
        "stage_grad:xpad": ("the transposed convolution: every output whose window covers x̃[q,r,s] sends back "
                            "δ times the weight that joined them; the brackets keep the window inside the filter"),
        "grad:W": "summed over the batch and every output position: the input patch under the filter times δ",
        "grad": "summed over the batch and every output position",
    }

    def describe(self) -> str:
        return (f"Conv2D({self.filters} filters, {self.kernel[0]}×{self.kernel[1]}, stride "
                f"{pair_text(self.stride)}, padding {pair_text(self.padding)})")

    def size_lines(self, ld, text) -> list[str]:
        lines = window_size_lines(ld, text, self.kernel, self.stride, self.padding, "(N − F + 2P)/S + 1")
        C, K = ld.in_shape[0], self.filters
        kh, kw = self.kernel
        ff = "F·F·C" if kh == kw else "kh·kw·C"
        return lines + [f"parameters (W {shape_text(K, C, kh, kw)}, b {shape_text(K)}): ({ff} + 1)·K = "
                        f"({kh}·{kw}·{C} + 1)·{K} = {ld.param_count}"]

    def to_config(self) -> dict:
        cfg = {"type": "conv2d", "filters": self.filters, "kernel": config_pair(self.kernel),
               "stride": config_pair(self.stride), "padding": config_pair(self.padding)}
        if not self.exact:
            cfg["exact"] = False
        return {**cfg, **self.activation.layer_config()}

    def __repr__(self) -> str:
        return (f"Conv2D({self.filters}, kernel={config_pair(self.kernel)}, stride={config_pair(self.stride)}, "
                f"padding={config_pair(self.padding)}, activation={self.activation.describe()!r})")
