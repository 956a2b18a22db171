"""Image layers: Conv2D, MaxPool2D, AvgPool2D, Flatten and Maxout.

Each layer checks its input shape when the network is declared (the numbers that do not fit
are in the message) and states its forward pass as a list of index formulas, *stages*, the
last of which is the layer's pre-activation ``z``.  Nothing here differentiates:
:mod:`symbp.derive` differentiates the stages with SymPy and chains them.

Shapes are channels-first, one sample ``(C, H, W)``; parameters are laid out as PyTorch's
(``Conv2d``: W ``(K, C, kh, kw)``, b ``(K,)``).  Sizes stay symbols in the formulas
(``C_0, H_0, W_0``, ``kh_1``, ``S_1``, ``P_1``, …) and are fixed by the code generator.

======================  ===========================================================================
Conv2D                  x̃[n,c,y,x] = x[n,c,y−P,x−P] inside, 0 in the padding;
                        z[n,k,h,w] = Σ_{c,u,v} W[k,c,u,v]·x̃[n,c,S·h+u,S·w+v] + b[k]
MaxPool2D               m[n,k,h,w] = argmax_{u,v} x[n,k,S·h+u,S·w+v] (first maximum, row-major);
                        z[n,k,h,w] = Σ_{u,v} route(m[n,k,h,w], u·kw+v)·x[n,k,S·h+u,S·w+v]
AvgPool2D               z[n,k,h,w] = Σ_{u,v} x[n,k,S·h+u,S·w+v] / (kh·kw)
Flatten                 z[n,i] = Σ_{c,h,w} δ(i, (c·H+h)·W+w)·x[n,c,h,w]   (PyTorch's C, H, W order)
Maxout(units, pieces)   y[n,m] = Σ_j W[m,j]·x[n,j] + b[m], m = i·pieces + e  (W: (units·pieces, in));
                        g[n,i] = argmax_e y[n,i·pieces+e];  z[n,i] = Σ_e route(g[n,i], e)·y[n,i·pieces+e]
======================  ===========================================================================

Output size per axis: ``(N − F + 2P) // S + 1``; a window that does not fit at the edge is
dropped (PyTorch's default, ``ceil_mode=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import activations
from .indices import c, e, h, i, j, k, n, p, q, r, s, u, v, w
from .ops import route, window_argmax


def _pos(value, what: str, owner: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner} {what} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{owner} {what} must be >= {low}, got {value}")
    return int(value)


def _pair(value, what: str, owner: str, low: int = 1) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner} {what} must be an int or a pair (rows, cols), got {value!r}")
        return _pos(value[0], what, owner, low), _pos(value[1], what, owner, low)
    v_ = _pos(value, what, owner, low)
    return v_, v_


def _size(name: str, l: int) -> sp.Symbol:
    return sp.Symbol(f"{name}_{l}", integer=True, positive=True)


def image_dims(l: int) -> tuple[sp.Symbol, sp.Symbol, sp.Symbol]:
    """The symbolic output shape (C_l, H_l, W_l) of layer l (l = 0: the input)."""
    return _size("C", l), _size("H", l), _size("W", l)


@dataclass
class Stage:
    """One index formula of a layer's forward pass: ``target[n, *idx] = formula``."""

    target: sp.IndexedBase
    idx: tuple
    formula: sp.Expr
    dims: tuple  # symbolic extents of idx


@dataclass
class LayerForm:
    """What a layer states symbolically; :mod:`symbp.derive` differentiates it."""

    params: dict  # key -> IndexedBase
    param_idx: dict  # key -> free index tuple of ∂C/∂θ
    param_dims: dict  # key -> symbolic extents of those indices
    stages: list  # [Stage], the last one is z
    in_idx: tuple  # free indices of ∂C/∂(layer input)
    sizes: dict = field(default_factory=dict)  # size symbol -> int (kernel, stride, padding, shapes)
    fan_in: sp.Expr = None  # Dense-style layers: the input width symbol


class _ImageLayer:
    """Common plumbing: no parameters, identity activation, 3-D input."""

    activation = activations.get(None)
    activation_params: dict = {}
    kind = "Image"

    def _need_3d(self, in_shape: tuple, pos_hint: str = "") -> tuple[int, int, int]:
        if len(in_shape) != 3:
            raise ValueError(f"{self!r} needs a 3-D input (C, H, W), got shape {tuple(in_shape)}")
        return in_shape

    def param_shapes(self, in_shape: tuple) -> dict:
        return {}

    def init(self, rng, in_shape, dtype) -> dict:
        return {}

    def param_count(self, in_shape: tuple) -> int:
        return sum(math.prod(sh) for sh in self.param_shapes(in_shape).values())


def _out_size(axis: str, size: int, kernel: int, stride: int, pad: int, owner: str) -> int:
    padded = size + 2 * pad
    if kernel > padded:
        what = f"padded input {size} + 2·{pad} = {padded}" if pad else f"input {size}"
        raise ValueError(f"{owner}: the {axis} window {kernel} is larger than the {what}")
    return (padded - kernel) // stride + 1


class Conv2D(_ImageLayer):
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

    kind = "Conv2D"

    def __init__(self, filters: int, kernel, stride=1, padding=0, activation: object = None, exact: bool = True,
                 **activation_params: float) -> None:
        self.filters = _pos(filters, "filters", "Conv2D")
        self.kernel = _pair(kernel, "kernel", "Conv2D")
        self.stride = _pair(stride, "stride", "Conv2D")
        self.padding = _pair(padding, "padding", "Conv2D", low=0)
        if not isinstance(exact, (bool, np.bool_)):  # bool("false") is True: refuse, never guess
            raise ValueError(f"Conv2D exact must be true or false, got {exact!r}")
        self.exact = bool(exact)
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)

    def output_shape(self, in_shape: tuple) -> tuple[int, int, int]:
        C, H, W = self._need_3d(in_shape)
        out = []
        for axis, size, F, S, P in zip(("row", "column"), (H, W), self.kernel, self.stride, self.padding):
            o = _out_size(axis, size, F, S, P, repr(self))
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

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple, out_shape: tuple, in_shape: tuple) -> LayerForm:
        C, H, W_ = in_dims
        K, Ho, Wo = image_dims(l)
        kh, kw, S, P = _size("kh", l), _size("kw", l), _size("S", l), sp.Symbol(f"P_{l}", integer=True, nonnegative=True)
        sizes = {kh: self.kernel[0], kw: self.kernel[1], S: self.stride[0], P: self.padding[0]}
        S2, P2 = S, P  # one symbol each when rows and columns agree
        if self.stride[1] != self.stride[0]:
            S2 = _size("Sc", l)
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
                         stages, (q, r, s), sizes)

    def to_config(self) -> dict:
        cfg = {"type": "conv2d", "filters": self.filters, "kernel": _cfg_pair(self.kernel),
               "stride": _cfg_pair(self.stride), "padding": _cfg_pair(self.padding)}
        if not self.exact:
            cfg["exact"] = False
        return {**cfg, **self.activation.layer_config()}

    def __repr__(self) -> str:
        return (f"Conv2D({self.filters}, kernel={_cfg_pair(self.kernel)}, stride={_cfg_pair(self.stride)}, "
                f"padding={_cfg_pair(self.padding)}, activation={self.activation.describe()!r})")


def _cfg_pair(pair):
    return pair[0] if pair[0] == pair[1] else list(pair)


class _Pool2D(_ImageLayer):
    def __init__(self, size, stride=None) -> None:
        self.size = _pair(size, "size", self.kind)
        self.stride = self.size if stride is None else _pair(stride, "stride", self.kind)

    def output_shape(self, in_shape: tuple) -> tuple[int, int, int]:
        C, H, W = self._need_3d(in_shape)
        return (C, *(_out_size(a, sz, F, S, 0, repr(self))
                     for a, sz, F, S in zip(("row", "column"), (H, W), self.size, self.stride)))

    def _window(self, l: int, in_dims: tuple):
        kh, kw = _size("kh", l), _size("kw", l)
        S = _size("S", l)
        sizes = {kh: self.size[0], kw: self.size[1], S: self.stride[0]}
        S2 = S
        if self.stride[1] != self.stride[0]:
            S2 = _size("Sc", l)
            sizes[S2] = self.stride[1]
        return kh, kw, S, S2, sizes

    def to_config(self) -> dict:
        cfg = {"type": self.kind.lower(), "size": _cfg_pair(self.size)}
        if self.stride != self.size:
            cfg["stride"] = _cfg_pair(self.stride)
        return cfg

    def __repr__(self) -> str:
        return f"{self.kind}({_cfg_pair(self.size)}, stride={_cfg_pair(self.stride)})"


class MaxPool2D(_Pool2D):
    """Max pooling: each output is the largest input of its window; the gradient goes to
    that input only.  Ties go to the first maximum in row-major window order (PyTorch's
    rule).  ``stride`` defaults to ``size``."""

    kind = "MaxPool2D"

    def symbolic(self, l, x, in_dims, out_shape, in_shape) -> LayerForm:
        kh, kw, S, S2, sizes = self._window(l, in_dims)
        out = (in_dims[0], *image_dims(l)[1:])  # pooling keeps the channels
        m = sp.IndexedBase(f"m{l}")
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        val = x[n, k, S * h + u, S2 * w + v]
        stages = [Stage(m, (k, h, w), window_argmax(val, sp.Tuple(u, 0, kh - 1), sp.Tuple(v, 0, kw - 1)), out),
                  Stage(z, (k, h, w), sp.Sum(route(m[n, k, h, w], u * kw + v) * val, (u, 0, kh - 1), (v, 0, kw - 1)), out)]
        return LayerForm({}, {}, {}, stages, (q, r, s), sizes)


class AvgPool2D(_Pool2D):
    """Average pooling: each output is the mean of its window; the gradient is spread
    evenly over it.  ``stride`` defaults to ``size``."""

    kind = "AvgPool2D"

    def symbolic(self, l, x, in_dims, out_shape, in_shape) -> LayerForm:
        kh, kw, S, S2, sizes = self._window(l, in_dims)
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        mean = sp.Sum(x[n, k, S * h + u, S2 * w + v], (u, 0, kh - 1), (v, 0, kw - 1)) / (kh * kw)
        out = (in_dims[0], *image_dims(l)[1:])
        return LayerForm({}, {}, {}, [Stage(z, (k, h, w), mean, out)], (q, r, s), sizes)


class Flatten(_ImageLayer):
    """(C, H, W) → C·H·W in PyTorch's order: entry (c, h, w) goes to (c·H + h)·W + w."""

    kind = "Flatten"

    def output_shape(self, in_shape: tuple) -> tuple[int]:
        return (math.prod(in_shape),)  # Python ints: no int64 wrap-around

    def symbolic(self, l, x, in_dims, out_shape, in_shape) -> LayerForm:
        z = sp.IndexedBase(f"z{l}", real=True)  # real: see Derivation (SymPy rebuilds f(z) fast)
        if len(in_dims) == 1:  # already flat: the identity
            return LayerForm({}, {}, {}, [Stage(z, (i,), x[n, i], (_size("d", l),))], (q,), {})
        C, H, W_ = in_dims
        flat = sp.Sum(sp.KroneckerDelta(i, (c * H + h) * W_ + w) * x[n, c, h, w], (c, 0, C - 1), (h, 0, H - 1), (w, 0, W_ - 1))
        return LayerForm({}, {}, {}, [Stage(z, (i,), flat, (C * H * W_,))], (q, r, s), {})

    def to_config(self) -> dict:
        return {"type": "flatten"}

    def __repr__(self) -> str:
        return "Flatten()"


class Maxout(_ImageLayer):
    """Maxout (Goodfellow et al. 2013): ``units`` outputs, each the max of ``pieces`` affine
    maps of the (flat) input.

    Parameters ``W`` (units·pieces, in) and ``b`` (units·pieces,); row ``i·pieces + e`` is
    piece e of unit i, so ``W.reshape(units, pieces, in)`` groups them.  The gradient goes
    to the winning piece (the first one on ties).
    """

    kind = "Maxout"

    def __init__(self, units: int, pieces: int) -> None:
        self.units = _pos(units, "units", "Maxout")
        self.pieces = _pos(pieces, "pieces", "Maxout")

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

    def symbolic(self, l, x, in_dims, out_shape, in_shape) -> LayerForm:
        (fan_in,) = in_dims
        pieces, units = _size("pieces", l), _size("d", l)
        Wt = sp.IndexedBase(f"W{l}", shape=(units * pieces, fan_in))
        b = sp.IndexedBase(f"b{l}", shape=(units * pieces,))
        y, g, z = sp.IndexedBase(f"y{l}"), sp.IndexedBase(f"g{l}"), sp.IndexedBase(f"z{l}", real=True)
        affine = sp.Sum(Wt[i, j] * x[n, j], (j, 0, fan_in - 1)) + b[i]
        piece = y[n, i * pieces + e]
        stages = [Stage(y, (i,), affine, (units * pieces,)),
                  Stage(g, (i,), window_argmax(piece, sp.Tuple(e, 0, pieces - 1)), (units,)),
                  Stage(z, (i,), sp.Sum(route(g[n, i], e) * piece, (e, 0, pieces - 1)), (units,))]
        return LayerForm({"W": Wt, "b": b}, {"W": (p, q), "b": (p,)}, {"W": (units * pieces, fan_in), "b": (units * pieces,)},
                         stages, (q,), {pieces: self.pieces}, fan_in)

    def to_config(self) -> dict:
        return {"type": "maxout", "units": self.units, "pieces": self.pieces}

    def __repr__(self) -> str:
        return f"Maxout({self.units}, pieces={self.pieces})"


IMAGE_LAYERS = {"conv2d": Conv2D, "maxpool2d": MaxPool2D, "avgpool2d": AvgPool2D, "flatten": Flatten, "maxout": Maxout}
