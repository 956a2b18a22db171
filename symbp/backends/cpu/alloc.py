"""Scratch arrays for the generated kernels (BLAS's α and β, a pool's column maxima, an
accumulator's lanes), as ``@njit(cache=True)`` functions of this package.

``np.empty`` and ``np.zeros`` written in a generated kernel are NumPy overloads, which Numba
compiles again in every process that compiles a new model (their code is not cached apart
from the caller's): 0.17 s of the small CNN's cold start.  Called through these, a cold
start loads them from Numba's cache, one entry per (shape, dtype) kind.
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
