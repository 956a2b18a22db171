"""``@njit`` helpers of a one-batch training step (``Model.train_on_batch``): its checks and
its way back.

The generated ``train_batch`` calls them inside one compiled call, so that a step on a small
batch pays no Python for its safety: the batch is checked for NaN/inf and bad labels there,
the parameters and optimizer state are stashed in one flat buffer (a copy of the arrays
already in cache, no allocation) before the update and put back if the update left any of
them NaN or infinite -- unless the update is proven finite beforehand (a larger network's
ordinary step: :mod:`symbp.backends.cpu.intervals`).  Imported by the generated training
modules by name, so functions that call them stay cacheable.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def first_not_finite(a) -> int:
    """The flat index of the first NaN or inf in a C-contiguous array, or −1."""
    flat = a.reshape(-1)
    if all_finite(flat):
        return -1
    for k in range(flat.size):
        if not np.isfinite(flat[k]):
            return k
    return -1  # (not reached)


@njit(cache=True)
def all_finite(a) -> bool:
    """Whether every entry of a C-contiguous array is finite: |x| ≤ the largest float is
    false for NaN and ±inf, and counting the failures is an integer sum, which vectorizes
    with no licence to reorder float arithmetic (whose x − x a compiler may fold to 0)."""
    flat = a.reshape(-1)
    big = np.finfo(flat.dtype).max
    bad = 0
    for k in range(flat.size):
        bad += not (abs(flat[k]) <= big)
    return bad == 0


@njit(cache=True)
def one_hot(labels, T) -> int:
    """Integer class labels as one-hot rows of ``T`` (len(labels) rows, its columns the
    classes); returns the position of the first label out of range (nothing written), or −1."""
    classes = T.shape[1]
    for r in range(labels.size):
        if labels[r] < 0 or labels[r] >= classes:
            return r
    for r in range(labels.size):
        for k in range(classes):
            T[r, k] = 0
        T[r, labels[r]] = 1
    return -1


@njit(cache=True)
def stash(keep, at: int, a) -> int:
    """Copy ``a`` into ``keep[at:]``; returns the offset after it."""
    flat = a.reshape(-1)
    for k in range(flat.size):  # (a loop, not keep[at:…] = flat: numba compiles an array
        keep[at + k] = flat[k]  # assignment's shape-mismatch message for seconds, cold)
    return at + flat.size


@njit(cache=True)
def unstash(keep, at: int, a) -> int:
    """Put ``a`` back from ``keep[at:]``; returns the offset after it."""
    flat = a.reshape(-1)
    for k in range(flat.size):
        flat[k] = keep[at + k]
    return at + flat.size

