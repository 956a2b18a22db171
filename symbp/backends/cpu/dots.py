"""``gemm_dots``: C ← α·A·Bᵀ + β·C for a small C and a long sum, as register-blocked dot products.

A conv's weight gradient with the batch inside its matrices (see symbp.lower.stages._col_ranges)
is δ·colᵀ: an (8 × 25) or (32 × 9) output, each entry a sum over the batch's N·H·W output
positions (36,864 or 86,528).  BLAS packs both long operands before multiplying and its kernels
are tuned for wide outputs: OpenBLAS 0.3.30 (SkylakeX kernels, 2-core Zen 5) took 0.35-0.55 ms
for the (8 × 36,864)·(36,864 × 25) product, where these dot products take 0.15-0.19 ms (and
0.54-0.68 against 0.87-0.92 ms for (32 × 86,528)·(86,528 × 9)), each timed alone.  The rows are
read in chunks that stay in the L2 cache, two rows of A against four of B at a time (eight
running sums, six loads per eight multiply-adds), each dot product vectorised by LLVM (fastmath:
the sums may be reordered).
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: the CPU emitter prints gemm_dots for an A·Bᵀ whose output has at most this many entries and
#: whose sum runs over the batch (measured above: 200 and 288 entries); BLAS for anything wider
MAX_OUT = 512

# Entries of a row per pass: a block's 6 rows are 48 KiB of float32 (a Zen 5 core's L1), a
# whole chunk of δ and col (8 + 25 rows) 264 KiB, in L2.
_CHUNK = 2048


@njit(cache=True, fastmath=True, boundscheck=False)
def gemm_dots(A, B, C, m, n, k, alpha, beta):
    """C (the first m·n entries, an (m × n) matrix) ← α·A·Bᵀ + β·C, where A's first m·k
    entries are an (m × k) matrix and B's first n·k an (n × k) one, all C-ordered (work
    buffers, their [:nb] slices, parameter arrays).  β = 0 overwrites C, as BLAS does."""
    acc = np.zeros((m, n), C.dtype)
    dots_add(A, B, acc, k, k, 0)
    dots_finish(acc, C, alpha, beta)


@njit(cache=True, fastmath=True, boundscheck=False)
def dots_add(A, B, acc, k, ldb, offset):
    """acc (m × n) += A·B[:, offset:offset + k]ᵀ, where A's first m·k entries are an (m × k)
    matrix and B's rows start ``ldb`` entries apart (B a C-ordered buffer read flat): the
    dot products of a chunk of the batch's columns (a conv's weight gradient a few samples
    at a time, see symbp.lower.chunk), added to those of the chunks before."""
    m, n = acc.shape
    a = A.reshape(A.size)
    b = B.reshape(B.size)
    for p0 in range(0, k, _CHUNK):
        w = min(_CHUNK, k - p0)
        for i0 in range(0, m, 2):
            for j0 in range(0, n, 4):
                if i0 + 2 <= m and j0 + 4 <= n:
                    _block(_row(a, i0, k, p0, w), _row(a, i0 + 1, k, p0, w), _row(b, j0, ldb, offset + p0, w),
                           _row(b, j0 + 1, ldb, offset + p0, w), _row(b, j0 + 2, ldb, offset + p0, w),
                           _row(b, j0 + 3, ldb, offset + p0, w), acc, i0, j0)
                else:
                    for i in range(i0, min(m, i0 + 2)):
                        for j in range(j0, min(n, j0 + 4)):
                            acc[i, j] += _dot(_row(a, i, k, p0, w), _row(b, j, ldb, offset + p0, w))


@njit(cache=True, fastmath=True, boundscheck=False)
def dots_finish(acc, C, alpha, beta):
    """C (its first m·n entries) ← α·acc + β·C; β = 0 overwrites C."""
    m, n = acc.shape
    c = C.reshape(C.size)
    for i in range(m):
        for j in range(n):
            c[i * n + j] = alpha * acc[i, j] if beta == 0 else alpha * acc[i, j] + beta * c[i * n + j]


@njit(cache=True, fastmath=True, boundscheck=False, inline="always")
def _row(flat, i, ld, start, w):
    """Entries start … start + w of row i of a matrix stored flat with rows ld apart (a
    contiguous slice: LLVM vectorises the dot products over it)."""
    return flat[i * ld + start:i * ld + start + w]


@njit(cache=True, fastmath=True, boundscheck=False, inline="always")
def _block(x0, x1, y0, y1, y2, y3, acc, i0, j0):
    """acc[i0:i0 + 2, j0:j0 + 4] += the eight dot products of x0, x1 with y0 … y3."""
    z = acc.dtype.type(0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = z
    for p in range(x0.size):
        u0, u1 = x0[p], x1[p]
        v0, v1, v2, v3 = y0[p], y1[p], y2[p], y3[p]
        s00 += u0 * v0
        s01 += u0 * v1
        s02 += u0 * v2
        s03 += u0 * v3
        s10 += u1 * v0
        s11 += u1 * v1
        s12 += u1 * v2
        s13 += u1 * v3
    acc[i0, j0] += s00
    acc[i0, j0 + 1] += s01
    acc[i0, j0 + 2] += s02
    acc[i0, j0 + 3] += s03
    acc[i0 + 1, j0] += s10
    acc[i0 + 1, j0 + 1] += s11
    acc[i0 + 1, j0 + 2] += s12
    acc[i0 + 1, j0 + 3] += s13


@njit(cache=True, fastmath=True, boundscheck=False, inline="always")
def _dot(x, y):
    s = x.dtype.type(0)
    for p in range(x.size):
        s += x[p] * y[p]
    return s
