"""The CPU target: Numba ``@njit`` kernels calling BLAS, in one readable module per model."""

#: The modules of this package that the generated kernels import by name, their code compiled
#: into the kernels (or, for sync, called from them): the module key covers their source
#: (symbp/cache.py) and a kernel export copies them into its folder (symbp/interop/kernels.py).
KERNEL_HELPERS = ("arrays", "blas", "dots", "guard", "intervals", "sync", "targets")
