"""Scratch arrays and flat views for the generated kernels (BLAS's α and β, a pool's column
maxima, an accumulator's lanes; a work buffer read entry by entry), as ``@njit(cache=True)``
functions of this package.

``np.empty``, ``np.zeros`` and ``a.reshape`` written in a generated kernel are NumPy overloads
(reshape's with a helper of its own), which Numba compiles again in every process that compiles
a new model (their code is not cached apart from the caller's): 0.17 s of the small CNN's cold
start for the first two, 0.07 s for reshape.  Called through these, a cold start loads them
from Numba's cache, one entry per (shape, dtype) kind.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def empty(shape, dtype):
    """np.empty(shape, dtype)."""
    return np.empty(shape, dtype)


@njit(cache=True)
def zeros(shape, dtype):
    """np.zeros(shape, dtype)."""
    return np.zeros(shape, dtype)


@njit(cache=True)
def flat(a):
    """``a.reshape(a.size)``: a C-contiguous array as one row, the same memory."""
    return a.reshape(a.size)
