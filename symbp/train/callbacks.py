"""Callbacks run by :meth:`symbp.Model.fit` after each epoch."""

from __future__ import annotations

import math

import numpy as np

from .schedules import check_monitor


class Callback:
    def on_epoch_end(self, model, epoch: int, metrics: dict) -> bool:
        """Return True to stop training."""
        return False

    def on_train_end(self, model) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the parameters of the best epoch are put back at the end
    (Keras's semantics).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be a whole number >= 0, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be a number >= 0, got {min_delta!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min', 'max' or 'auto', got {mode!r}")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, float(min_delta), mode
        if not isinstance(restore_best_weights, (bool, np.bool_)):  # bool("false") is True: refuse, never guess
            raise ValueError(f"EarlyStopping: restore_best_weights must be true or false, got {restore_best_weights!r}")
        self.restore_best_weights = bool(restore_best_weights)
        self.best = None
        self.best_epoch = None
        self.best_params = None
        self.wait = 0
        self.stopped_epoch = None

    def on_epoch_end(self, model, epoch: int, metrics: dict) -> bool:
        check_monitor(self, metrics)
        value = metrics[self.monitor]
        improved = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_params = {k: v.copy() for k, v in model.params.items()}
            return False
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, model) -> None:
        if self.restore_best_weights and self.best_params is not None:
            for k, v in self.best_params.items():
                model.params[k] = v.copy()  # assignment, so a device-side model uploads it

    def __repr__(self) -> str:
        state = "" if self.best is None else f", best={self.best:.6g} at epoch {self.best_epoch}"
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, min_delta={self.min_delta:g}, "
                f"mode={self.mode!r}, restore_best_weights={self.restore_best_weights}{state})")


class ModelCheckpoint(Callback):
    """Save the model after every epoch (or only when ``monitor`` improves)."""

    def __init__(self, path, monitor: str | None = None, mode: str = "min") -> None:
        from .checkpoint import checkpoint_path

        checkpoint_path(path)  # a directory is refused here, not after the first epoch has trained
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        self.path, self.monitor, self.mode, self.best = path, monitor, mode, None

    def on_epoch_end(self, model, epoch: int, metrics: dict) -> bool:
        if self.monitor is not None:
            check_monitor(self, metrics)
            value = metrics[self.monitor]
            if self.best is not None and not (value < self.best if self.mode == "min" else value > self.best):
                return False
            self.best = value
        if getattr(model, "_writes", True):  # in a data-parallel fit, rank 0 alone writes
            model.save(self.path)
        return False

    def __repr__(self) -> str:
        return f"ModelCheckpoint({str(self.path)!r}, monitor={self.monitor!r}, mode={self.mode!r})"


class ProgressBar(Callback):
    """A one-line progress bar for ``epochs`` epochs (tqdm): epochs done, time left and the last
    epoch's metrics, written short (``loss 0.471 acc 0.929 · val 0.449 acc 0.911``) so that an
    80-column terminal shows the validation figures whole."""

    FORMAT = "{n_fmt}/{total_fmt} epochs |{bar}| {remaining} left{postfix}"  # tqdm puts ", " before a postfix

    def __init__(self, epochs: int, file=None, ncols: int | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, unit="epoch", file=file, ncols=ncols, dynamic_ncols=ncols is None,
                        bar_format=self.FORMAT)

    @staticmethod
    def describe(metrics: dict) -> str:
        """``loss 0.471 acc 0.929 · val 0.449 acc 0.911`` from an epoch's metrics."""
        def pair(prefix: str) -> str:
            acc = metrics.get(f"{prefix}accuracy")
            return f"{metrics[prefix + 'loss']:.3g}" + ("" if acc is None else f" acc {acc:.3f}")

        text = "loss " + pair("")
        return text + (" · val " + pair("val_") if "val_loss" in metrics else "")

    def on_epoch_end(self, model, epoch: int, metrics: dict) -> bool:
        self.bar.set_postfix_str(self.describe(metrics), refresh=False)
        self.bar.update(1)
        return False

    def on_train_end(self, model) -> None:
        self.bar.close()

    def __repr__(self) -> str:
        return f"ProgressBar(epochs={self.bar.total})"
