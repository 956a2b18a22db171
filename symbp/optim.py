"""Optimizers.  Their update rule is a SymPy formula fused into the generated backward pass
(see :class:`symbp.codegen.SGDRule`); the objects here carry the hyper-parameters."""

from __future__ import annotations

import math


class SGD:
    """Plain mini-batch gradient descent, θ ← θ − lr · ∂C/∂θ.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    """

    rule = "sgd"

    def __init__(self, lr: float = 0.01) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"SGD learning rate must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr:g})"
