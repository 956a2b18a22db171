"""gemm_dots (symbp.backends.cpu.dots), the conv weight gradient's small-output GEMM, against
NumPy in float64: every block edge (two rows by four, the chunk of the sum), α and β."""

from __future__ import annotations

import numpy as np
import pytest

from symbp.backends.cpu.dots import _CHUNK, gemm_dots


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (2, 4, 7), (3, 5, 100), (8, 25, 2 * _CHUNK + 3), (5, 9, _CHUNK)])
def test_gemm_dots_equals_numpy(m, n, k):
    rng = np.random.default_rng(m * 100 + n)
    A, B = rng.normal(size=(m, k)), rng.normal(size=(n, k))
    C = np.full((m, n), np.nan)  # β = 0 overwrites, as BLAS does: a NaN there must not survive
    gemm_dots(A, B, C, m, n, k, 1.0, 0.0)
    assert np.allclose(C, A @ B.T, rtol=1e-12, atol=1e-12)
    C0 = rng.normal(size=(m, n))
    C = C0.copy()
    gemm_dots(A, B, C, m, n, k, -0.25, 0.5)
    assert np.allclose(C, -0.25 * (A @ B.T) + 0.5 * C0, rtol=1e-12, atol=1e-12)


def test_gemm_dots_reads_the_leading_entries_of_larger_buffers():
    """A work buffer's [:nb] slice holds the matrices in its first entries; a 4-D weight is C."""
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(6, 50)), rng.normal(size=(8, 40))  # (2 × 60) and (4 × 60) in front
    ref = A.ravel()[:120].reshape(2, 60) @ B.ravel()[:240].reshape(4, 60).T
    for dtype in (np.float64, np.float32):
        W = np.zeros((2, 1, 2, 2), dtype)
        one, zero = dtype(1), dtype(0)
        gemm_dots(A[:3].astype(dtype), B[:6].astype(dtype), W, 2, 4, 60, one, zero)
        assert np.allclose(W.reshape(2, 4), ref, rtol=1e-12 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("m, n, k, chunks", [(3, 5, 40, 3), (8, 25, _CHUNK + 5, 2), (2, 4, 7, 1)])
def test_dots_add_sums_chunks_of_columns(m, n, k, chunks):
    """dots_add, a chunk of the batch's columns at a time (A the chunk's own rows, B's rows
    ldb apart from the chunk's offset on), then dots_finish: α·Σ + β·C, as gemm_dots."""
    from symbp.backends.cpu.dots import dots_add, dots_finish

    rng = np.random.default_rng(k)
    A, B = rng.normal(size=(m, chunks * k)), rng.normal(size=(n, chunks * k + 3))  # (B's rows: 3 more)
    acc = np.zeros((m, n))
    for c in range(chunks):
        dots_add(np.ascontiguousarray(A[:, c * k:(c + 1) * k]), B, acc, k, chunks * k + 3, c * k)
    C0 = rng.normal(size=(m, n))
    C = C0.copy()
    dots_finish(acc, C, -0.5, 2.0)
    assert np.allclose(C, -0.5 * (A @ B[:, :chunks * k].T) + 2.0 * C0, rtol=1e-12, atol=1e-12)
    C = np.full((m, n), np.nan)
    dots_finish(acc, C, 1.0, 0.0)
    assert np.allclose(C, A @ B[:, :chunks * k].T, rtol=1e-12, atol=1e-12)
