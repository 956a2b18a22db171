"""A batch's targets as the generated ``train_epoch`` and ``evaluate`` read them: rows of the
(N, outputs) targets the caller gave, or integer class labels one-hot encoded a batch at a time.

A multiclass fit on the CPU keeps 1-D integer labels as they are (no copy of an int64 array)
instead of expanding them to an (N, classes) array up front: that array costs 4·classes bytes
a row in float32 — 38 MiB for 10⁶ labels of 10 classes, 4.6 GiB for ImageNet's 1.2·10⁶ of
1000.  The helpers here are typed on T: numba compiles the 2-D (rows as given) or the 1-D
(labels) body into the caller, so one generated source serves both.  Imported by the
generated modules by name, so functions that call them stay cacheable.
"""

from __future__ import annotations

from numba.extending import overload


def batch_targets(T, first, nb, Tb):
    """The targets of rows ``first … first + nb − 1``: a view of T (rows), or those rows' labels
    one-hot encoded into ``Tb[:nb]`` (labels).  Compiled code only (the overload below)."""
    raise NotImplementedError("batch_targets is called from @njit code only")


def put_target(T, i, Tb, r) -> None:
    """Row ``i``'s target into ``Tb[r]``: copied (rows) or one-hot encoded (labels).  Compiled
    code only (the overload below)."""
    raise NotImplementedError("put_target is called from @njit code only")


@overload(batch_targets)
def _batch_targets(T, first, nb, Tb):
    if T.ndim == 2:
        def rows(T, first, nb, Tb):
            return T[first:first + nb]

        return rows

    def labels(T, first, nb, Tb):
        for r in range(nb):
            put_target(T, first + r, Tb, r)
        return Tb[:nb]

    return labels


@overload(put_target)
def _put_target(T, i, Tb, r):
    if T.ndim == 2:
        def rows(T, i, Tb, r):
            for k in range(Tb.shape[1]):  # (not Tb[r] = T[i]: see train_epoch)
                Tb[r, k] = T[i, k]

        return rows

    def labels(T, i, Tb, r):
        for k in range(Tb.shape[1]):
            Tb[r, k] = 0
        Tb[r, T[i]] = 1

    return labels
