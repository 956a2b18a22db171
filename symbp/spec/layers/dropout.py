"""Dropout, as PyTorch's ``nn.Dropout(p)``: inverted dropout in training, identity otherwise.

    mask[n, i] = dropout_mask(1 − p, seed, l, n, i)   1/(1 − p) with probability 1 − p, else 0
    z[n, i]    = x[n, i]·mask[n, i]

The mask is a stage the training kernels draw from a counter-based generator: entry i of
sample n under the step's ``seed`` (from the fit's seed, the epoch and the step, so a resumed
fit draws the same masks, and the CPU and CUDA targets draw the same ones).  It reads no
input, so no gradient flows into it, and δ reaches x through the kept entries only, scaled
by 1/(1 − p).  Outside training (predict, evaluate, the exports) the mask is 1: z = x.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Layer, LayerForm, Stage, register

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@register
class Dropout(Layer):
    """Zero each entry with probability ``p`` in training and scale the rest by 1/(1 − p)."""

    type_name = "dropout"
    kind = "Dropout"
    config_keys = ("p",)
    random = True
    notes = {"z": "inverted dropout: each entry kept with probability 1 − p and scaled by 1/(1 − p) in training; "
                  "the identity outside training",
             "routing": "Dropout passes δ back through the kept entries, scaled by 1/(1 − p)"}

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"Dropout p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def output_shape(self, in_shape: tuple) -> tuple:
        return tuple(in_shape)

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import h, i, k, n, seed, w
        from ..ops import dropout_mask

        if len(in_dims) == 1:
            idx, entry = (i,), i
        else:  # the entry's place in the sample, C·H·W order
            (_, H, W_), idx = in_dims, (k, h, w)
            entry = (k * H + h) * W_ + w

        mask = sp.IndexedBase(f"mask{l}", real=True)
        z = sp.IndexedBase(f"z{l}", real=True)
        keep = 1 - sp.nsimplify(self.p, rational=True)
        stages = [Stage(mask, idx, dropout_mask(keep, seed, l, n, entry), in_dims),
                  Stage(z, idx, x[(n, *idx)] * mask[(n, *idx)], in_dims)]
        return LayerForm({}, {}, {}, stages, eval_subs={mask: sp.Integer(1)})

    def size_lines(self, ld, text) -> list[str]:
        return [f"p = {self.p:g}, no parameters"]

    def describe(self) -> str:
        return f"Dropout(p={self.p:g})"

    def to_config(self) -> dict:
        return {"type": "dropout", "p": self.p}

    def __repr__(self) -> str:
        return self.describe()
