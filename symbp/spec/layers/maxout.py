"""Maxout (Goodfellow et al. 2013): each unit the largest of ``pieces`` affine maps.

    y[n,m] = Σ_j W[m,j]·x[n,j] + b[m], m = i·pieces + e  (W: (units·pieces, in))
    g[n,i] = argmax_e y[n,i·pieces+e];  z[n,i] = Σ_e route(g[n,i], e)·y[n,i·pieces+e]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import Layer, LayerForm, Stage, positive_int, register, shape_text, size_symbol

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@register
class Maxout(Layer):
    """Maxout (Goodfellow et al. 2013): ``units`` outputs, each the max of ``pieces`` affine
    maps of the (flat) input.

    Parameters ``W`` (units·pieces, in) and ``b`` (units·pieces,); row ``i·pieces + e`` is
    piece e of unit i, so ``W.reshape(units, pieces, in)`` groups them.  The gradient goes
    to the winning piece (the first one on ties).
    """

    type_name = "maxout"
    kind = "Maxout"
    config_keys = ("units", "pieces")
    required = ("units", "pieces")

    def __init__(self, units: int, pieces: int) -> None:
        self.units = positive_int(units, "units", "Maxout")
        self.pieces = positive_int(pieces, "pieces", "Maxout")

    def output_shape(self, in_shape: tuple) -> tuple[int]:
        if len(in_shape) != 1:
            raise ValueError(f"{self!r} takes a flat input, got shape {tuple(in_shape)}: put sb.Flatten() before it")
        return (self.units,)

    def param_shapes(self, in_shape: tuple) -> dict:
        return {"W": (self.units * self.pieces, in_shape[0]), "b": (self.units * self.pieces,)}

    def init(self, rng, in_shape, dtype) -> dict:
        bound = 1.0 / np.sqrt(in_shape[0])
        shapes = self.param_shapes(in_shape)
        return {key: rng.uniform(-bound, bound, sh).astype(dtype) for key, sh in shapes.items()}

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import e, i, j, n, p, q
        from ..ops import route, window_argmax

        (fan_in,) = in_dims
        pieces, units = size_symbol("pieces", l), size_symbol("d", l)
        Wt = sp.IndexedBase(f"W{l}", shape=(units * pieces, fan_in))
        b = sp.IndexedBase(f"b{l}", shape=(units * pieces,))
        y, g, z = sp.IndexedBase(f"y{l}"), sp.IndexedBase(f"g{l}"), sp.IndexedBase(f"z{l}", real=True)
        affine = sp.Sum(Wt[i, j] * x[n, j], (j, 0, fan_in - 1)) + b[i]
        piece = y[n, i * pieces + e]
        stages = [Stage(y, (i,), affine, (units * pieces,)),
                  Stage(g, (i,), window_argmax(piece, sp.Tuple(e, 0, pieces - 1)), (units,)),
                  Stage(z, (i,), sp.Sum(route(g[n, i], e) * piece, (e, 0, pieces - 1)), (units,))]
        return LayerForm({"W": Wt, "b": b}, {"W": (p, q), "b": (p,)}, {"W": (units * pieces, fan_in), "b": (units * pieces,)},
                         stages, {pieces: self.pieces}, decay=("W",))

    notes = {
        "z": "the largest piece",
        "stage:y": "the affine pieces, unit i's pieces in rows i·pieces … i·pieces + pieces − 1",
        "stage:g": "the winning piece of each unit (ties: the first)",
        "routing": "Maxout routes δ to the winning piece only",
        "stage_grad:y": "routed to the winning piece",
    }

    def describe(self) -> str:
        return f"Maxout({self.units} units, {self.pieces} pieces)"

    def size_lines(self, ld, text) -> list[str]:
        fan_in, rows = ld.in_shape[0], self.units * self.pieces
        return [f"parameters (W {shape_text(rows, fan_in)}, b {shape_text(rows)}): "
                f"(in + 1)·units·pieces = ({fan_in} + 1)·{self.units}·{self.pieces} = {ld.param_count}"]

    def to_config(self) -> dict:
        return {"type": "maxout", "units": self.units, "pieces": self.pieces}

    def __repr__(self) -> str:
        return f"Maxout({self.units}, pieces={self.pieces})"
