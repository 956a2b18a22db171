"""The network specification: inputs, layers, loss and l2, checked when declared."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

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
        inputs: int | tuple[int, int, int],
        layers: Sequence[Layer],
        loss: str | object = "softmax_cross_entropy",
        l2: float = 0.0,
        name: str | None = None,
    ) -> None:
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
        self.shapes = [self.input_shape]
        for pos, layer in enumerate(self.layers, 1):
            try:
                self.shapes.append(tuple(int(d) for d in layer.output_shape(self.shapes[-1])))
            except ValueError as err:
                raise ValueError(f"layer {pos}: {err}") from None
            _check_size(self.shapes[-1], f"layer {pos} ({layer!r}): its output {self.shapes[-1]} per sample")
            for key, shape in layer.param_shapes(self.shapes[pos - 1]).items():
                _check_size(shape, f"layer {pos} ({layer!r}): its parameter {key}{pos} of shape {tuple(shape)}")
        self.loss = Loss(loss)
        self.l2 = float(l2)
        # "mlp-" for a network of flat vectors, "net-" when it reads images: the default file
        # name in generated/ then says which kind of model it holds.
        mlp = all(len(shape) == 1 for shape in self.shapes)
        self.name = _safe_name(name or ("mlp-" if mlp else "net-") + "-".join(map(str, self.widths)))
        if self.loss.task == "multiclass" and self.widths[-1] < 2:
            raise ValueError("softmax_cross_entropy needs at least 2 output units, the last layer has 1")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(inputs,)`` or ``(C, H, W)``.  ``X.reshape(-1, *input_shape)``
        is what the network reads (a flat ``(N, C·H·W)`` X is accepted too)."""
        return self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)

    @property
    def widths(self) -> list[int]:
        """Values per sample at the input and after each layer (C·H·W for images)."""
        return [math.prod(shape) for shape in self.shapes]

    def param_counts(self) -> list[int]:
        """Number of parameters of each layer (Conv2D: (F·F·C + 1)·K)."""
        return [sum(math.prod(sh) for sh in layer.param_shapes(self.shapes[pos - 1]).values())
                for pos, layer in enumerate(self.layers, 1)]

    @property
    def outputs(self) -> int:
        return self.widths[-1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for pos, layer in enumerate(self.layers, 1):
            for key, shape in layer.param_shapes(self.shapes[pos - 1]).items():
                shapes[f"{key}{pos}"] = shape
        return shapes

    def init_params(self, seed: int | None, dtype: np.dtype) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        params = {}
        for pos, layer in enumerate(self.layers, 1):
            for key, value in layer.init(rng, self.shapes[pos - 1], dtype).items():
                params[f"{key}{pos}"] = np.ascontiguousarray(value)
        return params

    def to_config(self) -> dict:
        return {
            "name": self.name,
            "inputs": list(self.inputs) if isinstance(self.inputs, tuple) else self.inputs,
            "loss": self.loss.to_config(),
            "l2": self.l2,
            "layers": [layer.to_config() for layer in self.layers],
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
        layers = []
        for pos, lc in enumerate(layers_cfg, 1):
            if not isinstance(lc, Mapping):
                raise ValueError(f"layer {pos} must be a table, got {lc!r}")
            lc = dict(lc)
            kind = str(lc.pop("type", "dense")).lower()
            if kind not in LAYERS:
                raise ValueError(f"layer {pos}: unknown layer type {kind!r} (known: {', '.join(LAYERS)})")
            layers.append(LAYERS[kind].from_config(lc, f"layer {pos}"))
        inputs = cfg["inputs"]
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        return cls(
            inputs=inputs,
            layers=layers,
            loss=cfg.get("loss", "softmax_cross_entropy"),
            l2=cfg.get("l2", 0.0),
            name=cfg.get("name"),
        )

    def fingerprint(self) -> str:
        """A stable digest of everything that changes the generated code."""
        blob = json.dumps(self.to_config(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Network(inputs={self.inputs}, layers={self.layers}, loss={self.loss.name!r}, l2={self.l2})"


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-")[:60]
    return cleaned or "model"
