"""Code printers per target: cpu (Numba njit)."""
