"""Layers that join branches of a graph network: ``sb.Add()`` and ``sb.Concat(axis=1)``.

    Add:     z[n, i]    = x₁[n, i] + x₂[n, i] + …                  (images: z[n, k, h, w])
    Concat:  z[n, i]    = x₁[n, i] for i < d₁, x₂[n, i − d₁] for d₁ ≤ i < d₁ + d₂, …
             (images: along the channels, z[n, k, h, w] from x_m[n, k − offset_m, h, w])

The chain rule does the rest: Add's local derivative is 1 for every input, so each branch
gets δ unchanged (the add gate copies its gradient); Concat hands each input its slice of δ.
A tensor read by several layers gets the sum of what each sends back (see
:mod:`symbp.derive`).
"""

from __future__ import annotations

from .. import activations
from .base import Layer, LayerForm, Stage, register, shape_text


class _Merge(Layer):
    merges = True
    config_keys = ("activation",)

    def __init__(self, activation: object = None, **activation_params: float) -> None:
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)

    def _activation_text(self) -> str:
        return "" if self.activation.is_identity else f"activation={self.activation.describe()!r}"

    def to_config(self) -> dict:
        return {"type": self.type_name, **self.activation.layer_config()}


@register
class Add(_Merge):
    """The elementwise sum of two or more tensors of one shape (a residual connection)."""

    type_name = "add"
    kind = "Add"
    notes = {"z": "the elementwise sum of its inputs (a residual join)",
             "routing": "the add gate copies δ unchanged to every input"}

    def output_shape(self, in_shape: tuple) -> tuple:
        first = tuple(in_shape[0])
        for other in in_shape[1:]:
            if tuple(other) != first:
                raise ValueError(f"Add needs inputs of one shape, got {' and '.join(shape_text(*s_) for s_ in in_shape)}")
        return first

    def symbolic(self, l: int, x: tuple, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import h, i, k, n, w

        dims = in_dims[0]  # every input read over the first one's extents (the shapes agree)
        idx = (i,) if len(dims) == 1 else (k, h, w)
        z = sp.IndexedBase(f"z{l}", real=True)
        stage = Stage(z, idx, sp.Add(*[x_[(n, *idx)] for x_ in x]), dims)
        return LayerForm({}, {}, {}, [stage], in_dims=(dims,) * len(x))

    def size_lines(self, ld, text) -> list[str]:
        return [f"the inputs' shape {shape_text(*ld.out_shape)}, no parameters"]

    def describe(self) -> str:
        return "Add()"

    def __repr__(self) -> str:
        return f"Add({self._activation_text()})"


@register
class Concat(_Merge):
    """Two or more tensors side by side along axis 1: the features of flat inputs, the
    channels of images (their H and W must agree), as ``torch.cat(…, dim=1)``."""

    type_name = "concat"
    kind = "Concat"
    config_keys = ("axis", "activation")
    notes = {"z": "its inputs side by side along axis 1 (features, or channels of images)",
             "routing": "Concat hands each input its own slice of δ"}

    def __init__(self, axis: int = 1, activation: object = None, **activation_params: float) -> None:
        if isinstance(axis, bool) or axis != 1:
            raise ValueError(f"Concat joins along axis 1 (the features, or the channels of images), got axis={axis!r}")
        self.axis = 1
        super().__init__(activation, **activation_params)

    def output_shape(self, in_shape: tuple) -> tuple:
        ranks = {len(s_) for s_ in in_shape}
        if ranks not in ({1}, {3}) or (ranks == {3} and len({tuple(s_[1:]) for s_ in in_shape}) != 1):
            raise ValueError("Concat needs flat inputs, or images of one height and width, got "
                             + " and ".join(shape_text(*s_) for s_ in in_shape))
        return (sum(s_[0] for s_ in in_shape), *in_shape[0][1:])

    def symbolic(self, l: int, x: tuple, in_dims: tuple) -> LayerForm:
        import sympy as sp

        from ...indices import h, i, k, n, w

        first = in_dims[0]
        idx = (i,) if len(first) == 1 else (k, h, w)
        total = sp.Add(*[d_[0] for d_ in in_dims])
        pieces, offset = [], sp.Integer(0)
        for pos, (x_, d_) in enumerate(zip(x, in_dims)):
            conds = ([idx[0] >= offset] if pos else []) + ([idx[0] <= offset + d_[0] - 1] if pos < len(x) - 1 else [])
            read = x_[(n, idx[0] - offset, *idx[1:])]
            pieces.append(sp.Piecewise((read, sp.And(*conds)), (0, True)))
            offset += d_[0]
        out = (total,) if len(first) == 1 else (total, *first[1:])
        z = sp.IndexedBase(f"z{l}", real=True)
        # The image inputs are read over the first one's H and W (they agree).
        reads = tuple(d_ if len(d_) == 1 else (d_[0], *first[1:]) for d_ in in_dims)
        return LayerForm({}, {}, {}, [Stage(z, idx, sp.Add(*pieces), out)], in_dims=reads)

    def size_lines(self, ld, text) -> list[str]:
        return [f"{ld.out_shape[0]} {'features' if len(ld.out_shape) == 1 else 'channels'} "
                f"side by side, no parameters"]

    def describe(self) -> str:
        return "Concat(axis=1)"

    def to_config(self) -> dict:
        return {**super().to_config(), "axis": self.axis}

    def __repr__(self) -> str:
        return f"Concat(axis=1{', ' + self._activation_text() if self._activation_text() else ''})"

