"""The network specification: inputs, layers, loss and l2, checked when declared."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .graph import Input, Tensor, topological
from .layers import LAYERS, Layer
from .losses import Loss

# The most values one sample may have at the input, after any layer, or in one parameter
# array: sizes are Python ints here (exact), but the kernels index with 64-bit integers and
# allocate per batch, so a larger declaration is a typo (or would overflow), never a network.
MAX_VALUES = 2**31 - 1


def _check_size(shape: tuple, what: str) -> None:
    """Refuse more than MAX_VALUES values; ``what`` names the shape in the message."""
    count = math.prod(shape)  # Python ints: exact, where np.prod wraps around in int64
    if count > MAX_VALUES:
        raise ValueError(f"{what} has {count:,} values; the limit is {MAX_VALUES:,} (2**31 - 1)")


class Network:
    """A feed-forward network declared symbolically.

    Parameters
    ----------
    inputs : int or (int, int, int)
        Width of one input sample, or the shape (C, H, W) of one image (channels first).
    layers : sequence of layers
        For example ``[sb.Dense(32, activation="tanh"), sb.Dense(10)]``.
    loss : str or sympy.Expr
        Applied to the last layer's output (the logits); see :class:`symbp.spec.losses.Loss`.
    l2 : float
        Weight decay in the loss: ``l2/2 · Σ‖W‖²`` over weights, not biases.
    name : str, optional
        Used in the generated module's file name.

    Examples
    --------
    >>> net = Network(inputs=4, layers=[Dense(3, activation="tanh"), Dense(2)], loss="mse")
    >>> net.widths
    [4, 3, 2]
    """

    def __init__(
        self,
        inputs: int | tuple[int, int, int] | Input,
        layers: Sequence[Layer] | None = None,
        loss: str | object = "softmax_cross_entropy",
        l2: float = 0.0,
        name: str | None = None,
        outputs: Tensor | None = None,
    ) -> None:
        if isinstance(inputs, Input):  # the functional form: the graph from outputs back to inputs
            if layers is not None:
                raise ValueError("a network from sb.Input takes outputs=…, not layers=…")
            layers, sources = topological(inputs, outputs)
            inputs = inputs.shape
        elif outputs is not None:
            raise ValueError("outputs=… goes with inputs=sb.Input(…) (the functional form); a chain takes layers=[…]")
        else:
            sources = None
        self._build(inputs, layers, sources, None, loss, l2, name)

    def _build(self, inputs, layers, sources, names, loss, l2, name) -> None:
        """Check and store; ``sources[l-1]``: the positions layer l reads (0: the input; None:
        a chain), ``names``: the TOML names of the layers (None: none given)."""
        if isinstance(inputs, (tuple, list)):
            if len(inputs) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in inputs):
                raise TypeError(f"inputs must be an int or a shape (C, H, W) of three ints, got {inputs!r}")
            if min(inputs) < 1:
                raise ValueError(f"inputs shape must be positive, got {tuple(inputs)}")
            inputs = tuple(int(d) for d in inputs)
            _check_size(inputs, f"inputs shape {inputs}: one sample")
        else:
            if isinstance(inputs, bool) or not isinstance(inputs, (int, np.integer)):
                raise TypeError(f"inputs must be an int (the width of one sample) or a shape (C, H, W), "
                                f"got {type(inputs).__name__} {inputs!r}")
            if inputs < 1:
                raise ValueError(f"inputs must be positive, got {inputs}")
            inputs = int(inputs)
            _check_size((inputs,), f"inputs width {inputs}: one sample")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise ValueError("layers must be a non-empty list of layers, e.g. [sb.Dense(10)]")
        for pos, layer in enumerate(layers, 1):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {pos} is a {type(layer).__name__}, not a symbp layer (known: {', '.join(LAYERS)})")
        if isinstance(l2, bool) or not isinstance(l2, (int, float, np.floating, np.integer)) or not math.isfinite(l2) or l2 < 0:
            raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
        self.inputs = inputs
        self.layers = list(layers)
        #: the positions each layer reads, 0 being the input: (l − 1,) in a chain
        self.sources = [tuple(src) for src in sources] if sources else [(pos - 1,) for pos in range(1, len(layers) + 1)]
        self.names = list(names) if names else None
        self.shapes = [self.input_shape]
        for pos, layer in enumerate(self.layers, 1):
            src = self.sources[pos - 1]
            if layer.merges != (len(src) > 1) or any(not 0 <= s_ < pos for s_ in src):
                raise ValueError(f"layer {pos}{self._named(pos)} ({layer!r}) reads "
                                 f"{', '.join(self.layer_name(s_) for s_ in src if 0 <= s_ < pos) or src}: "
                                 + ("a merging layer reads two or more earlier layers" if layer.merges else
                                    "a layer reads one earlier layer (0: the input)"))
            try:
                self.shapes.append(tuple(int(d) for d in layer.output_shape(self.in_shape(pos))))
            except ValueError as err:
                raise ValueError(f"layer {pos}{self._named(pos)}: {err}") from None
            _check_size(self.shapes[-1], f"layer {pos} ({layer!r}): its output {self.shapes[-1]} per sample")
            for key, shape in layer.param_shapes(self.in_shape(pos)).items():
                _check_size(shape, f"layer {pos} ({layer!r}): its parameter {key}{pos} of shape {tuple(shape)}")
        for pos in range(1, len(self.layers)):
            if not self.consumers(pos):
                raise ValueError(f"layer {pos}{self._named(pos)} ({self.layers[pos - 1]!r}) is read by no layer: an "
                                 f"unused branch (the output is the last layer, {self.layers[-1]!r})")
        self.loss = Loss(loss)
        self.l2 = float(l2)
        # "mlp-" for a network of flat vectors, "net-" when it reads images: the default file
        # name in generated/ then says which kind of model it holds.
        mlp = all(len(shape) == 1 for shape in self.shapes)
        self.name = _safe_name(name or ("mlp-" if mlp else "net-") + "-".join(map(str, self.widths)))
        if self.loss.task == "multiclass" and self.widths[-1] < 2:
            raise ValueError("softmax_cross_entropy needs at least 2 output units, the last layer has 1")

    def _named(self, pos: int) -> str:
        return f" ({self.names[pos - 1]!r})" if self.names else ""

    @property
    def is_graph(self) -> bool:
        """Whether some layer reads anything but the layer before it (a branch, a join)."""
        return any(src != (pos - 1,) for pos, src in enumerate(self.sources, 1))

    @property
    def random(self) -> bool:
        """Whether training draws random numbers (Dropout's masks)."""
        return any(layer.random for layer in self.layers)

    def consumers(self, pos: int) -> list[int]:
        """The layers that read position ``pos`` (0: the input), in order."""
        return [l for l, src in enumerate(self.sources, 1) if pos in src]

    def in_shape(self, pos: int) -> tuple:
        """What layer ``pos`` reads: its input's shape, or a tuple of shapes (a merging layer)."""
        src = self.sources[pos - 1]
        return tuple(self.shapes[s_] for s_ in src) if self.layers[pos - 1].merges else self.shapes[src[0]]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(inputs,)`` or ``(C, H, W)``.  ``X.reshape(-1, *input_shape)``
        is what the network reads (a flat ``(N, C·H·W)`` X is accepted too)."""
        return self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """One sample's output: ``(outputs,)``, or ``(C, H, W)`` where the last layer makes an
        image (its targets may come so shaped; predictions are read flat, C, H, W order)."""
        return tuple(self.shapes[-1])

    @property
    def widths(self) -> list[int]:
        """Values per sample at the input and after each layer (C·H·W for images)."""
        return [math.prod(shape) for shape in self.shapes]

    def param_counts(self) -> list[int]:
        """Number of parameters of each layer (Conv2D: (F·F·C + 1)·K)."""
        return [sum(math.prod(sh) for key, sh in layer.param_shapes(self.in_shape(pos)).items()
                    if key not in layer.running_keys)
                for pos, layer in enumerate(self.layers, 1)]

    @property
    def outputs(self) -> int:
        return self.widths[-1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for pos, layer in enumerate(self.layers, 1):
            for key, shape in layer.param_shapes(self.in_shape(pos)).items():
                shapes[f"{key}{pos}"] = shape
        return shapes

    def init_params(self, seed: int | None, dtype: np.dtype) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        params = {}
        for pos, layer in enumerate(self.layers, 1):
            for key, value in layer.init(rng, self.in_shape(pos), dtype).items():
                params[f"{key}{pos}"] = np.ascontiguousarray(value)
        return params

    def layer_name(self, pos: int) -> str:
        """Position ``pos``'s name in the TOML spec: ``"input"`` for 0, a layer's ``name``
        (or its type and position, ``"dense3"``, when none was given)."""
        if pos == 0:
            return "input"
        return self.names[pos - 1] if self.names else f"{self.layers[pos - 1].type_name}{pos}"

    def to_config(self) -> dict:
        layers = []
        for pos, layer in enumerate(self.layers, 1):
            cfg = layer.to_config()
            if self.names or self.is_graph:  # a chain without names stays as it was written
                cfg = {"name": self.layer_name(pos), **cfg}
            if self.is_graph:
                cfg["inputs"] = [self.layer_name(s_) for s_ in self.sources[pos - 1]]
            layers.append(cfg)
        return {
            "name": self.name,
            "inputs": list(self.inputs) if isinstance(self.inputs, tuple) else self.inputs,
            "loss": self.loss.to_config(),
            "l2": self.l2,
            "layers": layers,
        }

    @classmethod
    def from_config(cls, cfg: Mapping) -> Network:
        """Build from a dict shaped like the TOML spec (see README)."""
        if not isinstance(cfg, Mapping):
            raise TypeError(f"a network spec must be a table, got {type(cfg).__name__}")
        known = {"name", "inputs", "loss", "l2", "layers"}
        unknown = sorted(set(cfg) - known - {"train"})
        if "data" in unknown:  # a [train] key written above the table
            raise ValueError("unknown key 'data' in network spec: the data set goes in the [train] table "
                             "(write data = … below the [train] line)")
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in network spec (known: {', '.join(sorted(known))})")
        if "inputs" not in cfg:
            raise ValueError("network spec needs 'inputs' (the width of one sample)")
        layers_cfg = cfg.get("layers")
        if not isinstance(layers_cfg, list) or not layers_cfg:
            raise ValueError("network spec needs at least one [[layers]] table")
        layers, names, reads = [], [], []
        for pos, lc in enumerate(layers_cfg, 1):
            if not isinstance(lc, Mapping):
                raise ValueError(f"layer {pos} must be a table, got {lc!r}")
            lc = dict(lc)
            names.append(lc.pop("name", None))
            reads.append(lc.pop("inputs", None))
            kind = str(lc.pop("type", "dense")).lower()
            if kind not in LAYERS:
                raise ValueError(f"layer {pos}: unknown layer type {kind!r} (known: {', '.join(LAYERS)})")
            layers.append(LAYERS[kind].from_config(lc, f"layer {pos}"))
        inputs = cfg["inputs"]
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        net = cls.__new__(cls)
        if all(n_ is None for n_ in names) and all(r_ is None for r_ in reads):
            net._build(inputs, layers, None, None, cfg.get("loss", "softmax_cross_entropy"), cfg.get("l2", 0.0),
                       cfg.get("name"))
            return net
        layers, sources, names = _graph_from_tables(layers, names, reads)
        net._build(inputs, layers, sources, names, cfg.get("loss", "softmax_cross_entropy"), cfg.get("l2", 0.0),
                   cfg.get("name"))
        return net

    def fingerprint(self) -> str:
        """A stable digest of everything that changes the generated code."""
        blob = json.dumps(self.to_config(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Network(inputs={self.inputs}, layers={self.layers}, loss={self.loss.name!r}, l2={self.l2})"


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-")[:60]
    return cleaned or "model"


def _graph_from_tables(layers: list, names: list, reads: list) -> tuple[list, list, list]:
    """The [[layers]] tables of a graph spec in the order they can run: (layers, the
    positions each reads, their names).  A table without ``inputs`` reads the table above
    it (the first: the input); the last table is the output."""
    given = {pos for pos, name in enumerate(names, 1) if name is not None}
    for pos, name in enumerate(names, 1):
        if name is None:
            names[pos - 1] = f"{layers[pos - 1].type_name}{pos}"
        elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", name) or name == "input":
            raise ValueError(f"layer {pos}: name must be a word of letters, digits and _ (not 'input'), got {name!r}")
    where = {}
    for pos, name in enumerate(names, 1):
        if name in where:
            first = where[name]
            whose = f"layer {first}'s" if first in given else f"layer {first}'s default name (type and position)"
            raise ValueError(f"layer {pos}: the name {name!r} is also {whose}")
        where[name] = pos
    edges = []  # per table: the table positions it reads (0: the input)
    for pos, read in enumerate(reads, 1):
        if read is None:
            edges.append((pos - 1,))
            continue
        read = [read] if isinstance(read, str) else read
        if not isinstance(read, list) or not read or not all(isinstance(r_, str) for r_ in read):
            raise ValueError(f"layer {pos} ({names[pos - 1]!r}): inputs must be a name or a list of names, got {read!r}")
        unknown = [r_ for r_ in read if r_ != "input" and r_ not in where]
        if unknown:
            raise ValueError(f"layer {pos} ({names[pos - 1]!r}) reads {unknown[0]!r}, which no layer is named "
                             f"(names: input, {', '.join(names)})")
        if names[pos - 1] in read:
            raise ValueError(f"layer {pos} ({names[pos - 1]!r}) reads itself: a cycle")
        edges.append(tuple(0 if r_ == "input" else where[r_] for r_ in read))
    # Kahn's algorithm, taking the earliest ready table first: a graph already in order keeps it.
    order, done = [], {0}
    while len(order) < len(layers):
        ready = next((pos for pos in range(1, len(layers) + 1) if pos not in done and set(edges[pos - 1]) <= done), None)
        if ready is None:
            stuck = [names[pos - 1] for pos in range(1, len(layers) + 1) if pos not in done]
            raise ValueError(f"the layers {', '.join(map(repr, stuck))} read each other in a cycle")
        order.append(ready)
        done.add(ready)
    if order[-1] != len(layers):
        reader = next(pos for pos in range(1, len(layers) + 1) if len(layers) in edges[pos - 1])
        raise ValueError(f"the last layer ({names[-1]!r}) is the output, but layer {reader} ({names[reader - 1]!r}) "
                         "reads it: put the output's table last")
    new = {old: k for k, old in enumerate(order, 1)}
    new[0] = 0
    return ([layers[old - 1] for old in order], [tuple(new[s_] for s_ in edges[old - 1]) for old in order],
            [names[old - 1] for old in order])
