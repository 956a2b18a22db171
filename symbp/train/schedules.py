"""Learning-rate schedules, stepped once per epoch as ``torch.optim.lr_scheduler`` does.

The closed-form ones are pure functions of the epoch number, so a resumed run gets the same
rates; :class:`ReduceLROnPlateau` keeps state, which checkpoints save.
"""

from __future__ import annotations

import math


def _positive(owner: str, name: str, value, *, integer: bool = False, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{owner}: {name} must be {kind} {'>=' if allow_zero else '>'} 0, got {value!r}")
    return int(value) if integer else float(value)



def check_monitor(owner, recorded) -> None:
    """``owner`` (a schedule or callback with a ``monitor``) watches a metric the fit records."""
    if owner.monitor not in recorded:
        raise ValueError(f"{type(owner).__name__} monitors {owner.monitor!r}, which this fit does not record "
                         f"(it records {', '.join(recorded)}); pass validation_data for val_* metrics")

class Schedule:
    """Base: ``lr(epoch, base_lr)`` gives the rate for a 0-based epoch."""

    name = "schedule"

    def lr(self, epoch: int, base_lr: float) -> float:
        raise NotImplementedError

    def observe(self, epoch: int, metrics: dict) -> None:
        """Called after each epoch with its metrics (only plateau schedules use it)."""

    def to_config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class StepDecay(Schedule):
    """lr · gamma^⌊epoch / step_size⌋ (``torch.optim.lr_scheduler.StepLR``)."""

    name = "step"

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = _positive("StepDecay", "step_size", step_size, integer=True)
        self.gamma = _positive("StepDecay", "gamma", gamma)

    def lr(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialDecay(Schedule):
    """lr · gamma^epoch (``ExponentialLR``)."""

    name = "exponential"

    def __init__(self, gamma: float) -> None:
        self.gamma = _positive("ExponentialDecay", "gamma", gamma)

    def lr(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.gamma**epoch


class CosineDecay(Schedule):
    """eta_min + (lr − eta_min)(1 + cos(π·epoch/T_max))/2 (``CosineAnnealingLR``'s closed form)."""

    name = "cosine"

    def __init__(self, T_max: int, eta_min: float = 0.0) -> None:  # noqa: N803 - torch's name
        self.T_max = _positive("CosineDecay", "T_max", T_max, integer=True)
        self.eta_min = _positive("CosineDecay", "eta_min", eta_min, allow_zero=True)

    def lr(self, epoch: int, base_lr: float) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class ReduceLROnPlateau(Schedule):
    """Multiply the rate by ``factor`` when ``monitor`` has not improved for ``patience``
    epochs (``torch.optim.lr_scheduler.ReduceLROnPlateau``, relative threshold)."""

    name = "plateau"

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, mode: str = "min",
                 threshold: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        factor = _positive("ReduceLROnPlateau", "factor", factor)
        if factor >= 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1, got {factor}")
        self.monitor = str(monitor)
        self.factor = factor
        self.patience = _positive("ReduceLROnPlateau", "patience", patience, integer=True, allow_zero=True)
        self.mode = mode
        self.threshold = _positive("ReduceLROnPlateau", "threshold", threshold, allow_zero=True)
        self.cooldown = _positive("ReduceLROnPlateau", "cooldown", cooldown, integer=True, allow_zero=True)
        self.min_lr = _positive("ReduceLROnPlateau", "min_lr", min_lr, allow_zero=True)
        self.scale = 1.0  # product of the reductions so far
        self.best = None
        self.bad_epochs = 0
        self.cooldown_left = 0

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        # torch's relative threshold, taken as it is (also for negative values).
        if self.mode == "min":
            return value < self.best * (1 - self.threshold)
        return value > self.best * (1 + self.threshold)

    def observe(self, epoch: int, metrics: dict) -> None:
        check_monitor(self, metrics)
        value = metrics[self.monitor]
        if self._better(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def lr(self, epoch: int, base_lr: float) -> float:
        return max(base_lr * self.scale, self.min_lr)


SCHEDULES = {c.name: c for c in (StepDecay, ExponentialDecay, CosineDecay, ReduceLROnPlateau)}


def schedule_from_config(cfg: dict) -> Schedule:
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})")
    cls = SCHEDULES[name]
    state = {k: cfg.pop(k) for k in ("scale", "best", "bad_epochs", "cooldown_left") if k in cfg}
    obj = cls(**cfg)
    for k, v in state.items():
        setattr(obj, k, v)
    return obj
