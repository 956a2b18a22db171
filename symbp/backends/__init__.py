"""Backends, one folder each: a plan (:mod:`symbp.lower.plan`) in, a generated module out.

``cpu/``  ``emit`` (one emitter per IR step, Numba ``@njit`` code), ``module`` (the module
          templates), ``blas`` (the GEMM the generated code calls)
``cuda/`` ``emit`` (CUDA kernels and launches), ``module`` (its templates), ``model`` (the
          model whose arrays live on the device)
``common`` what both print alike (safe text, the formula header).
"""
