"""Input checks: every problem with user data becomes a ValueError/TypeError naming it."""

from __future__ import annotations

import numpy as np


def _check_real(arr: np.ndarray, what: str) -> None:
    """Real numbers (bool counts as 0/1); a complex array would lose its imaginary part."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{what} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")


def as_inputs(X, width, dtype: np.dtype, what: str = "X") -> np.ndarray:
    """``X`` as a C-contiguous (N, width) array of ``dtype``; refuses bad shapes and NaN/inf.

    ``width`` may be an image shape (C, H, W): X is then (N, C, H, W), or flat (N, C·H·W),
    and comes back flat (the kernels' layout, C, H, W order).
    """
    if isinstance(width, tuple):
        shape, width = width, int(np.prod(width))
        try:
            arr = np.asarray(X)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"{what} could not be read as an array: {err}") from None
        if arr.ndim == len(shape):
            arr = arr[None]
        if arr.ndim == len(shape) + 1:
            if arr.shape[1:] != shape:
                raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}), got {arr.shape}")
            X = arr.reshape(arr.shape[0], width)
        elif arr.ndim != 2:
            raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}) or (N, {width}), got {arr.shape}")
    try:
        arr = np.asarray(X)
    except Exception as err:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"{what} could not be read as an array: {err}") from None
    _check_real(arr, what)
    if arr.ndim == 1 and width == arr.shape[0]:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (samples, {width}), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: no samples")
    if arr.shape[1] != width:
        raise ValueError(f"{what} has {arr.shape[1]} features per sample, the network expects {width}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{what} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return arr


def as_targets(y, n: int, outputs: int, task: str, dtype: np.dtype, what: str = "y") -> np.ndarray:
    """Targets as an (n, outputs) array of ``dtype``.

    ``multiclass``: integer class labels in [0, outputs) or rows of class probabilities;
    ``binary``: values in [0, 1]; ``regression``: any finite values.  A 1-D ``y`` is
    accepted for a single output unit (and as labels for multiclass).
    """
    try:
        arr = np.asarray(y)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"{what} could not be read as an array: {err}") from None
    _check_real(arr, what)
    if arr.shape[:1] != (n,):
        got = arr.shape[0] if arr.ndim else "a scalar"
        raise ValueError(f"X has {n} samples but {what} has {got}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf (first at sample {np.argwhere(~np.isfinite(arr))[0][0]})")
    if task == "multiclass" and arr.ndim == 1:
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{what} holds class labels, which must be whole numbers; got {arr[np.mod(arr, 1) != 0][0]!r}")
        labels = arr.astype(np.int64)
        bad = (labels < 0) | (labels >= outputs)
        if bad.any():
            raise ValueError(f"label {labels[bad][0]} out of range: the network has {outputs} classes (labels 0..{outputs - 1})")
        out = np.zeros((n, outputs), dtype=dtype)
        out[np.arange(n), labels] = 1
        return out
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != outputs:
        raise ValueError(f"{what} must have shape ({n}, {outputs}) for {outputs} output units, got {arr.shape}")
    if task == "multiclass":
        if (arr < 0).any() or not np.allclose(arr.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError(f"{what} rows must be one-hot or class probabilities (non-negative, summing to 1)")
    if task == "binary" and ((arr < 0) | (arr > 1)).any():
        raise ValueError(f"{what} must lie in [0, 1] for binary_cross_entropy, got values in [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=dtype)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return int(batch_size)
