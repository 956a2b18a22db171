"""The CPU target: Numba ``@njit`` kernels calling BLAS, in one readable module per model."""
