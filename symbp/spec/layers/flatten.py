"""Flatten: (C, H, W) → C·H·W in PyTorch's order.

    z[n,i] = Σ_{c,h,w} δ(i, (c·H+h)·W+w)·x[n,c,h,w]

A reshape: its form says ``view``, so the kernels give z the input's buffer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import Layer, LayerForm, Stage, register, size_symbol

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@register
class Flatten(Layer):
    """(C, H, W) → C·H·W in PyTorch's order: entry (c, h, w) goes to (c·H + h)·W + w."""

    type_name = "flatten"
    kind = "Flatten"
    notes = {
        "z": "a reshape, in PyTorch's C, H, W order: entry (c, h, w) goes to i = (c·H + h)·W + w",
        "routing": "Flatten hands δ back reshaped to (C, H, W)",
    }

    def size_lines(self, ld, text) -> list[str]:
        return [f"C·H·W = {'·'.join(map(str, ld.in_shape))} = {ld.out_shape[0]}, no parameters"]

    def output_shape(self, in_shape: tuple) -> tuple[int]:
        return (math.prod(in_shape),)  # Python ints: no int64 wrap-around

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import c, h, i, n, w

        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        if len(in_dims) == 1:  # already flat: the identity
            return LayerForm({}, {}, {}, [Stage(z, (i,), x[n, i], (size_symbol("d", l),))], view=True)
        C, H, W_ = in_dims
        flat = sp.Sum(sp.KroneckerDelta(i, (c * H + h) * W_ + w) * x[n, c, h, w], (c, 0, C - 1), (h, 0, H - 1), (w, 0, W_ - 1))
        return LayerForm({}, {}, {}, [Stage(z, (i,), flat, (C * H * W_,))], view=True)

    def to_config(self) -> dict:
        return {"type": "flatten"}

    def __repr__(self) -> str:
        return "Flatten()"
