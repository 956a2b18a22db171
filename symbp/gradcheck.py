"""Finite-difference check of the generated gradients."""

from __future__ import annotations

import math

import numpy as np


def gradcheck(model, X, y, eps: float = 1e-5, max_entries: int = 64, seed: int = 0) -> float:
    """Largest relative error between the generated gradients and finite differences.

    The check runs in float64 on the CPU: a float32 (or CUDA) model is recompiled as a CPU
    float64 twin with the same parameters.  The numeric derivative is the five-point central
    difference (f(θ−2h) − 8f(θ−h) + 8f(θ+h) − f(θ+2h)) / 12h with h = ``eps``: its truncation
    error is O(h⁴) (~1e-20 here) and its rounding error about 1.5·ε·|loss|/h (~3e-11·|loss|),
    so a correct gradient scores ~1e-7 or less even where it is far below the floor.  (A
    two-point difference with h = 1e-6 reached 1e-6 on such entries: rounding, not the
    gradient.)  A kink of relu or |·| within 2h of a probed point would show as an error.
    At most ``max_entries`` entries per parameter are probed (chosen at random with
    ``seed``), so large layers stay cheap.

    Returns
    -------
    float
        max over probed entries of |analytic − numeric| / max(|analytic| + |numeric|, floor),
        floor = 1e-4 · max(1, |loss|): an entry far smaller than the loss itself is judged
        against that scale, where rounding in the loss, not the gradient, dominates.
        ``inf`` — a failure, never a pass — when the loss, any loss probed for the
        differences, any analytic gradient entry or any numeric derivative is not finite
        (NaN or ±inf): NaN would otherwise compare false and vanish from the maximum, so
        ``assert gradcheck(...) < 1e-6`` fails as it should.
    """
    from .compile import compile as compile_model
    from .train.model import Model

    m64 = model
    # The check perturbs parameters in place: it needs a CPU float64 model (a twin otherwise).
    if model.dtype != np.float64 or type(model) is not Model:
        m64 = compile_model(model.network, dtype="float64", cache_dir=model.source_path.parent)
        m64.params = {k: np.asarray(v, np.float64).copy() for k, v in model.params.items()}
    loss, grads = m64.loss_and_grads(X, y)
    if not math.isfinite(loss) or not all(np.isfinite(g).all() for g in grads.values()):
        return math.inf
    floor = 1e-4 * max(1.0, abs(loss))
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name, value in m64.params.items():
        if name not in grads:
            continue  # running statistics (BatchNorm's): kept, not trained
        flat = value.reshape(-1)
        picks = np.arange(flat.size) if flat.size <= max_entries else rng.choice(flat.size, max_entries, replace=False)
        for k in picks:
            old = flat[k]
            f = []
            for step in (-2, -1, 1, 2):
                flat[k] = old + step * eps
                f.append(m64.loss_and_grads(X, y)[0])
            flat[k] = old
            numeric = (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12 * eps)
            analytic = grads[name].reshape(-1)[k]
            error = abs(analytic - numeric) / max(abs(analytic) + abs(numeric), floor)
            if not (math.isfinite(numeric) and math.isfinite(error)):
                return math.inf  # a non-finite probe (NaN is never below a bound, nor the maximum)
            worst = max(worst, float(error))
    return worst
