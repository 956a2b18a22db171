"""What every layer states, and the one registry of layer types.

A layer is a declaration, not a code path: its parameters, its forward pass as SymPy index
formulas (*stages*, the last of which is its pre-activation ``z``), its initialisation and
its TOML round trip.  :mod:`symbp.derive` differentiates the stages and chains them; the
planner and the backends read only what the stages say (a contraction becomes a GEMM, a
window arg-max an arg-max scan, the rest fused loops), never which class declared them.

Adding a layer type is one file: subclass :class:`Layer`, decorate it with
:func:`register`, import the file in ``symbp/spec/layers/__init__.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import activations
from ..graph import Tensor, as_inputs

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@dataclass
class Stage:
    """One index formula of a layer's forward pass: ``target[n, *idx] = formula``; a
    ``batch`` stage is one value for the whole batch, ``target[*idx]`` (BatchNorm's mean,
    a sum over the samples ν)."""

    target: sp.IndexedBase
    idx: tuple
    formula: sp.Expr
    dims: tuple  # symbolic extents of idx
    batch: bool = False

    def at(self, idx: tuple) -> sp.Indexed:
        """The target at sample n and ``idx`` (a batch stage: at ``idx``)."""
        from ...indices import n as N_SAMPLE

        return self.target[tuple(idx)] if self.batch else self.target[(N_SAMPLE, *idx)]


@dataclass
class LayerForm:
    """What a layer states symbolically; :mod:`symbp.derive` differentiates it."""

    params: dict  # key -> IndexedBase
    param_idx: dict  # key -> free index tuple of ∂C/∂θ
    param_dims: dict  # key -> symbolic extents of those indices
    stages: list  # [Stage], the last one is z
    sizes: dict = field(default_factory=dict)  # size symbol -> int (kernel, stride, padding, shapes)
    #: the parameters the network's l2 term applies to (weights; never biases or a norm's γ)
    decay: tuple = ()
    #: a merging layer's inputs' extents as its formula reads them (None: as given); Add
    #: reads every input over the first one's extents, so that δ comes back unguarded
    in_dims: tuple | None = None
    #: z holds the input's values in C order, unchanged (a reshape): the kernels give z the
    #: input's buffer instead of copying it
    view: bool = False
    #: statistics kept across batches (BatchNorm's running mean and variance): key -> base.
    #: They are not trained; ``running_updates`` (target, formula) run after each training
    #: forward pass, and outside training (predict, evaluate) the stages in ``eval_subs``
    #: are not computed: their reads become reads of the running statistics.
    running: dict = field(default_factory=dict)
    running_updates: list = field(default_factory=list)
    eval_subs: dict = field(default_factory=dict)


def size_symbol(name: str, l: int) -> sp.Symbol:
    """A positive integer size of layer l (``kh_1``, ``S_2``, ``d_3``), fixed by the planner."""
    import sympy as sp

    return sp.Symbol(f"{name}_{l}", integer=True, positive=True)


def image_dims(l: int) -> tuple[sp.Symbol, sp.Symbol, sp.Symbol]:
    """The symbolic output shape (C_l, H_l, W_l) of layer l (l = 0: the input)."""
    return size_symbol("C", l), size_symbol("H", l), size_symbol("W", l)


def positive_int(value, what: str, owner: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner} {what} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{owner} {what} must be >= {low}, got {value}")
    return int(value)


def int_pair(value, what: str, owner: str, low: int = 1) -> tuple[int, int]:
    """An int or a pair (rows, cols) of ints ≥ ``low``, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner} {what} must be an int or a pair (rows, cols), got {value!r}")
        return positive_int(value[0], what, owner, low), positive_int(value[1], what, owner, low)
    one = positive_int(value, what, owner, low)
    return one, one


def shape_text(*dims) -> str:
    """``(N, 8, 24, 24)``; a 1-tuple keeps its comma."""
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def pair_text(pair, sep: str = "×") -> str:
    """One number when both agree, else ``rows×cols``."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}{sep}{pair[1]}"


def config_pair(pair):
    """A pair as the TOML spec writes it: one int when both agree."""
    return pair[0] if pair[0] == pair[1] else list(pair)


class Layer:
    """The interface every layer implements (defaults: no parameters, no activation).

    ``type_name`` is its TOML ``type``; ``config_keys`` the other keys its table may have
    (the constructor's arguments), ``required`` those it must have.
    """

    type_name = ""
    kind = "Layer"
    config_keys: tuple = ()
    required: tuple = ()
    activation = activations.get(None)
    activation_params: dict = {}
    #: every output is one of its input entries (max pooling): a non-decreasing activation
    #: after the layer is the same function as before it
    selects_inputs = False
    #: it joins several inputs (Add, Concat): ``output_shape`` and ``symbolic`` then take a
    #: tuple of shapes, of input bases and of input extents, one per input
    merges = False
    #: the keys of ``param_shapes`` that are statistics, not trained (BatchNorm's running
    #: mean and variance): saved, loaded and exported with the parameters, never updated
    #: by an optimizer and not counted as parameters
    running_keys: tuple = ()
    #: its training forward pass draws random numbers (Dropout's masks)
    random = False

    def __call__(self, inputs):
        """The functional form: ``h = sb.Dense(64)(x)``; a merging layer takes a list."""
        return Tensor(self, as_inputs(inputs, self))

    def output_shape(self, in_shape: tuple) -> tuple:
        raise NotImplementedError

    def param_shapes(self, in_shape: tuple) -> dict:
        return {}

    def init(self, rng: np.random.Generator, in_shape: tuple, dtype) -> dict:
        return {}

    def param_count(self, in_shape: tuple) -> int:
        return sum(math.prod(sh) for sh in self.param_shapes(in_shape).values())

    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        """The stages of layer ``l`` reading ``x[n, *in]`` of symbolic extents ``in_dims``."""
        raise NotImplementedError

    def to_config(self) -> dict:
        raise NotImplementedError

    # -- what the readers say about it (explain, the report) ---------------------------------
    #: Notes on this layer's formulas, by topic: ``"z"`` its last stage, ``"stage:<name>"``
    #: an earlier stage (its label without the layer number), ``"routing"`` how δ reaches its
    #: input, ``"sent_back"`` what the layer below hears from it (default: the routing),
    #: ``"local:<stage>/<wrt>"`` a local derivative (``wrt``: a parameter, ``x`` the input or
    #: a stage), ``"stage_grad:<name>"`` the gradient of a stage, ``"grad:<param>"`` and
    #: ``"grad"`` its parameter gradients.  A topic with no note prints none.
    notes: dict = {}

    def describe(self) -> str:
        """The layer with its hyper-parameters, for a heading: ``Conv2D(8 filters, 5×5, …)``."""
        return f"{self.kind}()"

    def size_lines(self, ld, text) -> list[str]:
        """How its output size and parameter count follow from its input (``ld``: its
        :class:`~symbp.derive.LayerDerivation`; ``text`` prints a size symbol)."""
        return []

    @classmethod
    def from_config(cls, cfg: dict, where: str):
        """The layer a TOML table (without its ``type``) declares; ``where`` prefixes errors."""
        cfg = dict(cfg)
        params = cfg.pop("activation_params", None)
        known = cls.config_keys + (("activation_params",) if "activation" in cls.config_keys else ())
        extra = sorted(set(cfg) - set(known)) or (["activation_params"] if params and "activation" not in cls.config_keys else [])
        if extra:
            raise ValueError(f"{where}: unknown key {extra[0]!r} for {cls.type_name} "
                             f"(known: type, {', '.join(known) or 'no others'})")
        missing = [key for key in cls.required if key not in cfg]
        if missing:
            raise ValueError(f"{where}: {cls.type_name} needs {missing[0]!r}")
        args = {key: tuple(val) if isinstance(val, list) else val for key, val in cfg.items()}
        try:
            return cls(**args, **(params or {}))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None


#: TOML ``type`` -> layer class: the one list of layer types.
LAYERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a layer type known to specs and checkpoints by its ``type_name``."""
    if not cls.type_name or cls.type_name in LAYERS:
        raise ValueError(f"layer type {cls.type_name!r} is empty or registered twice")
    LAYERS[cls.type_name] = cls
    return cls
