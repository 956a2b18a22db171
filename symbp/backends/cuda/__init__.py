"""The CUDA target (numba-cuda): the same plan as kernels and launches, arrays on the device."""
