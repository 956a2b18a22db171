"""A compiled model: parameters in NumPy arrays, the generated kernels, and the training loop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import cache
from .data import as_inputs, as_targets, check_batch_size
from .network import Network
from .optim import SGD

_EVAL_CHUNK = 1024  # rows per evaluation pass: bounds the work buffers for large data sets


class History:
    """Per-epoch metrics of :meth:`Model.fit`: ``history["loss"]``, ``["accuracy"]``, and
    ``val_loss``/``val_accuracy`` when validation data is given."""

    def __init__(self) -> None:
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}

    def record(self, epoch: int, **metrics: float) -> None:
        self.epoch.append(epoch)
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __repr__(self) -> str:
        last = {k: round(v[-1], 4) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


class Model:
    """A network compiled for a target; create with :func:`symbp.compile`.

    Attributes
    ----------
    params : dict of str to numpy.ndarray
        ``W1, b1, W2, b2, …``; ``W`` has shape (out, in) and a layer computes ``x @ W.T + b``.
    source_path : pathlib.Path
        The generated module the kernels come from.
    """

    def __init__(self, net: Network, module, path: Path, dtype: str, params: dict[str, np.ndarray]) -> None:
        self.network = net
        self.kernels = module
        self.source_path = path
        self.dtype = np.dtype(dtype)
        self.params = params
        self._buffers: dict[int, list[np.ndarray]] = {}
        self._derivation = None

    # -- plumbing ----------------------------------------------------------------------
    def _param_list(self) -> list[np.ndarray]:
        out = []
        for name, shape in zip(self.kernels.PARAMS, self.network.param_shapes().values()):
            arr = self.params.get(name)
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != self.dtype or not arr.flags.c_contiguous:
                # A user may have assigned a list or a float64 array: bring it back in line.
                try:
                    arr = np.ascontiguousarray(arr, dtype=self.dtype)
                except (TypeError, ValueError):
                    raise TypeError(f"params[{name!r}] is not numeric") from None
                if arr.shape != shape:
                    raise ValueError(f"params[{name!r}] has shape {arr.shape}, expected {shape}")
                self.params[name] = arr
            out.append(arr)
        return out

    def _workspace(self, rows: int) -> list[np.ndarray]:
        """Work buffers sized for ``rows`` samples, reused across calls."""
        cap = max((c for c in self._buffers if c >= rows), default=None)
        if cap is None:
            self._buffers = {rows: [np.empty(tuple(rows if d == "batch" else d for d in shape), self.dtype)
                                    for _, shape in self.kernels.WORKSPACE]}
            cap = rows
        return self._buffers[cap]

    def _sized(self, rows: int) -> list[np.ndarray]:
        """The work buffers with their batch dimension cut to exactly ``rows``."""
        return [w[:rows] if shape[0] == "batch" else w
                for w, (_, shape) in zip(self._workspace(rows), self.kernels.WORKSPACE)]

    def _data(self, X, y=None, what: str = "") -> tuple[np.ndarray, np.ndarray | None]:
        net = self.network
        X = as_inputs(X, net.inputs, self.dtype, what=f"X{what}")
        T = None if y is None else as_targets(y, X.shape[0], net.outputs, net.loss.task, self.dtype, what=f"y{what}")
        return X, T

    # -- public API --------------------------------------------------------------------
    @property
    def derivation(self):
        """The :class:`~symbp.derive.Derivation` the kernels were generated from."""
        if self._derivation is None:
            from .derive import derive

            self._derivation = derive(self.network)
        return self._derivation

    def loss_and_grads(self, X, y) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss over the samples (plus the l2 term) and ∂loss/∂θ for every parameter.

        Returns the loss and a dict with the same keys as :attr:`params`.
        """
        X, T = self._data(X, y)
        ws = self._sized(X.shape[0])
        loss, _ = self.kernels.loss_and_grads(X, T, *self._param_list(), *ws)
        grads = {}
        for (name, _), buf in zip(self.kernels.WORKSPACE, ws):
            if name.startswith(("dW", "db")):
                grads[name[1:]] = buf.copy()
        return float(loss), grads

    def decision_function(self, X) -> np.ndarray:
        """The network's raw outputs (logits), shape (N, outputs)."""
        X, _ = self._data(X)
        out = np.empty((X.shape[0], self.network.outputs), self.dtype)
        params = self._param_list()
        for start in range(0, X.shape[0], _EVAL_CHUNK):
            chunk = X[start : start + _EVAL_CHUNK]
            ws = [w for w, (name, _) in zip(self._sized(len(chunk)), self.kernels.WORKSPACE)
                  if name.startswith(("Z", "A"))]
            out[start : start + len(chunk)] = self.kernels.logits(chunk, *params, *ws)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities: softmax of the logits, or σ for binary cross-entropy."""
        z = self.decision_function(X).astype(np.float64)
        task = self.network.loss.task
        if task == "multiclass":
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        if task == "binary":
            return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
        raise ValueError(f"predict_proba needs a classification loss, this model uses {self.network.loss.name!r}")

    def predict(self, X) -> np.ndarray:
        """Class labels for softmax cross-entropy, 0/1 per output for binary cross-entropy,
        the raw outputs for regression losses."""
        z = self.decision_function(X)
        task = self.network.loss.task
        if task == "multiclass":
            return z.argmax(axis=1)
        if task == "binary":
            out = (z > 0).astype(np.int64)
            return out[:, 0] if out.shape[1] == 1 else out
        return z

    def evaluate(self, X, y) -> tuple[float, float]:
        """(mean loss with the l2 term, accuracy) on a data set; accuracy is NaN for regression."""
        X, T = self._data(X, y)
        params = self._param_list()
        ws = self._workspace(min(_EVAL_CHUNK, X.shape[0]))
        total, correct = self.kernels.evaluate(X, T, *params, *ws, min(_EVAL_CHUNK, X.shape[0]))
        loss = total / X.shape[0] + self.kernels.penalty(*params)
        return float(loss), self._accuracy(X.shape[0], correct)

    def _accuracy(self, rows: int, correct: int) -> float:
        """The kernels count correct rows (multiclass) or correct output units (binary)."""
        task = self.network.loss.task
        if task == "multiclass":
            return correct / rows
        if task == "binary":
            return correct / (rows * self.network.outputs)
        return float("nan")

    def score(self, X, y) -> float:
        """Accuracy for classifiers; the coefficient of determination R² for regression."""
        task = self.network.loss.task
        if task in ("multiclass", "binary"):
            return self.evaluate(X, y)[1]
        X, T = self._data(X, y)
        pred = self.decision_function(X).astype(np.float64)
        ss_res = ((T - pred) ** 2).sum()
        ss_tot = ((T - T.mean(axis=0)) ** 2).sum()
        return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")

    def fit(
        self,
        X,
        y,
        optimizer: SGD | None = None,
        batch_size: int = 32,
        epochs: int = 1,
        validation_data: tuple | None = None,
        shuffle: bool = True,
        seed: int | None = 0,
        progress: bool = True,
    ) -> History:
        """Train with mini-batch gradient descent; returns the per-epoch :class:`History`.

        The shuffle order of an epoch depends only on ``seed`` and the epoch number, so a run
        is reproducible.  Each epoch runs as one compiled call.
        """
        optimizer = optimizer if optimizer is not None else SGD()
        if not isinstance(optimizer, SGD):
            raise TypeError(f"optimizer must be a symbp optimizer such as sb.SGD(lr=0.1), got {type(optimizer).__name__}")
        batch_size = check_batch_size(batch_size)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ValueError(f"epochs must be a whole number >= 0, got {epochs!r}")
        X, T = self._data(X, y)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            val = self._data(*validation_data, what="_val")
        history = History()
        n = X.shape[0]
        rows = min(batch_size, n)
        Xb = np.empty((rows, X.shape[1]), self.dtype)
        Tb = np.empty((rows, T.shape[1]), self.dtype)
        lr = self.dtype.type(optimizer.lr)
        bar = _progress(epochs, progress)
        for epoch in range(epochs):
            order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle and seed is not None
                     else np.random.default_rng().permutation(n) if shuffle else np.arange(n))
            ws = self._workspace(rows)
            total, correct = self.kernels.train_epoch_sgd(X, T, order, batch_size, lr, *self._param_list(), *ws, Xb, Tb)
            metrics = {"loss": total / n}
            if self.network.loss.task != "regression":
                metrics["accuracy"] = self._accuracy(n, correct)
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} in epoch {epoch + 1}; try a smaller learning rate")
            if val is not None:
                val_loss, val_acc = self.evaluate(*val)
                metrics["val_loss"] = val_loss
                if self.network.loss.task != "regression":
                    metrics["val_accuracy"] = val_acc
            history.record(epoch, **metrics)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        return history

    def __repr__(self) -> str:
        return f"Model({self.network!r}, dtype={self.dtype.name}, source={self.source_path.name})"


def _progress(epochs: int, enabled: bool):
    if not enabled or epochs == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, unit="epoch", desc="training", leave=True)


def compile(  # noqa: A001 - the public name the API promises
    net: Network,
    target: str = "cpu",
    dtype: str = "float32",
    seed: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Model:
    """Generate (or reuse) the kernels for ``net`` and return a trainable :class:`Model`.

    Parameters
    ----------
    net : Network
    target : {"cpu"}
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the parameter initialisation.
    cache_dir : path, optional
        Where generated modules go; defaults to ``$SYMBP_CACHE_DIR`` or ``generated/``.
    """
    if not isinstance(net, Network):
        raise TypeError(f"compile() takes a symbp.Network, got {type(net).__name__}")
    if target != "cpu":
        raise ValueError(f"unknown target {target!r}; available: 'cpu'")
    if dtype not in ("float32", "float64") and np.dtype(dtype).name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    dtype = np.dtype(dtype).name
    key = cache.module_key(net.fingerprint(), dtype, target)
    path = cache.cache_dir(cache_dir) / f"{net.name}-{dtype}-{key}.py"

    def generate() -> str:
        from .codegen import generate_source
        from .derive import derive

        return generate_source(derive(net), dtype)

    module = cache.load_or_generate(path, generate)
    return Model(net, module, path, dtype, net.init_params(seed, np.dtype(dtype)))
