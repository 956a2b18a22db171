"""A batch's targets as the generated ``train_epoch`` and ``evaluate`` read them: rows of the
(N, outputs) targets the caller gave, or integer class labels one-hot encoded a batch at a time.

A multiclass fit on the CPU keeps 1-D integer labels as they are (no copy of an int64 array)
instead of expanding them to an (N, classes) array up front: that array costs 4·classes bytes
a row in float32 — 38 MiB for 10⁶ labels of 10 classes, 4.6 GiB for ImageNet's 1.2·10⁶ of
1000.  The helpers branch on ``T.ndim``, which Numba reads from T's type while compiling (the
branch for the other kind is pruned, never typed), so one generated source serves both.
They are ``@njit(cache=True)`` functions of this package, imported by the generated modules
by name: a new model's cold start loads them from Numba's cache instead of compiling them
again (as ``@overload`` helpers they cost 0.2-0.3 s of every cold start: Numba keeps no
overload's code between processes).
"""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def put_target(T, i, Tb, r) -> None:
    """Row ``i``'s target into ``Tb[r]``: copied (rows) or one-hot encoded (labels)."""
    if T.ndim == 2:
        for k in range(Tb.shape[1]):  # (not Tb[r] = T[i]: see train_epoch)
            Tb[r, k] = T[i, k]
    else:
        for k in range(Tb.shape[1]):
            Tb[r, k] = 0
        Tb[r, T[i]] = 1


@njit(cache=True)
def batch_targets(T, first, nb, Tb):
    """The targets of rows ``first … first + nb − 1``: a view of T (rows), or those rows' labels
    one-hot encoded into ``Tb[:nb]`` (labels)."""
    if T.ndim == 2:
        return T[first:first + nb]
    for r in range(nb):
        put_target(T, first + r, Tb, r)
    return Tb[:nb]
