"""Pooling: MaxPool2D and AvgPool2D, each output one window of its input channel.

    MaxPool2D   m[n,k,h,w] = argmax_{u,v} x[n,k,S·h+u,S·w+v] (first maximum, row-major);
                z[n,k,h,w] = Σ_{u,v} route(m[n,k,h,w], u·kw+v)·x[n,k,S·h+u,S·w+v]
    AvgPool2D   z[n,k,h,w] = Σ_{u,v} x[n,k,S·h+u,S·w+v] / (kh·kw)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Layer, LayerForm, Stage, config_pair, image_dims, int_pair, pair_text, register, size_symbol
from .windows import need_3d, window_count, window_size_lines

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


class _Pool2D(Layer):
    config_keys = ("size", "stride")
    required = ("size",)

    def __init__(self, size, stride=None) -> None:
        self.size = int_pair(size, "size", self.kind)
        self.stride = self.size if stride is None else int_pair(stride, "stride", self.kind)

    def output_shape(self, in_shape: tuple) -> tuple[int, int, int]:
        C, H, W = need_3d(self, in_shape)
        return (C, *(window_count(a, sz, F, S, 0, repr(self))
                     for a, sz, F, S in zip(("row", "column"), (H, W), self.size, self.stride)))

    def _window(self, l: int, in_dims: tuple):
        kh, kw = size_symbol("kh", l), size_symbol("kw", l)
        S = size_symbol("S", l)
        sizes = {kh: self.size[0], kw: self.size[1], S: self.stride[0]}
        S2 = S
        if self.stride[1] != self.stride[0]:
            S2 = size_symbol("Sc", l)
            sizes[S2] = self.stride[1]
        return kh, kw, S, S2, sizes

    def describe(self) -> str:
        return f"{self.kind}({self.size[0]}×{self.size[1]}, stride {pair_text(self.stride)})"

    def size_lines(self, ld, text) -> list[str]:
        return window_size_lines(ld, text, self.size, self.stride, (0, 0), "(N − F)/S + 1") + [
            "no parameters; the channels pass through, each pooled on its own"]

    def to_config(self) -> dict:
        cfg = {"type": self.type_name, "size": config_pair(self.size)}
        if self.stride != self.size:
            cfg["stride"] = config_pair(self.stride)
        return cfg

    def __repr__(self) -> str:
        return f"{self.kind}({config_pair(self.size)}, stride={config_pair(self.stride)})"


@register
class MaxPool2D(_Pool2D):
    """Max pooling: each output is the largest input of its window; the gradient goes to
    that input only.  Ties go to the first maximum in row-major window order (PyTorch's
    rule).  ``stride`` defaults to ``size``."""

    type_name = "maxpool2d"
    kind = "MaxPool2D"
    selects_inputs = True
    notes = {
        "z": "max pooling: the input at the window's arg-max",
        "stage:m": ("the arg-max of each window, as the position u·kw + v (ties: the first maximum in row-major "
                    "order, as PyTorch)"),
        "routing": ("max pooling routes δ to the arg-max of each window only (ties: the first maximum, as PyTorch); "
                    "every other input of the window gets 0"),
    }

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import h, k, n, u, v, w
        from ..ops import route, window_argmax

        kh, kw, S, S2, sizes = self._window(l, in_dims)
        out = (in_dims[0], *image_dims(l)[1:])  # pooling keeps the channels
        m = sp.IndexedBase(f"m{l}")
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        val = x[n, k, S * h + u, S2 * w + v]
        stages = [Stage(m, (k, h, w), window_argmax(val, sp.Tuple(u, 0, kh - 1), sp.Tuple(v, 0, kw - 1)), out),
                  Stage(z, (k, h, w), sp.Sum(route(m[n, k, h, w], u * kw + v) * val, (u, 0, kh - 1), (v, 0, kw - 1)), out)]
        return LayerForm({}, {}, {}, stages, sizes)


@register
class AvgPool2D(_Pool2D):
    """Average pooling: each output is the mean of its window; the gradient is spread
    evenly over it.  ``stride`` defaults to ``size``."""

    type_name = "avgpool2d"
    kind = "AvgPool2D"
    notes = {
        "z": "average pooling: the mean of the window",
        "routing": "average pooling spreads δ evenly: each input of the window gets 1/(kh·kw) of it",
    }

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import h, k, n, u, v, w

        kh, kw, S, S2, sizes = self._window(l, in_dims)
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        mean = sp.Sum(x[n, k, S * h + u, S2 * w + v], (u, 0, kh - 1), (v, 0, kw - 1)) / (kh * kw)
        out = (in_dims[0], *image_dims(l)[1:])
        return LayerForm({}, {}, {}, [Stage(z, (k, h, w), mean, out)], sizes)
