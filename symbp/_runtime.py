"""Process settings symbp controls, applied before NumPy/SciPy load their BLAS.

Measured on the 2-core AVX-512 machine this project targets:
* OpenBLAS picks its Haswell (AVX2) kernels on AMD Zen 4; ``OPENBLAS_CORETYPE=SkylakeX``
  selects the AVX-512 ones.  Set only where the CPU has AVX-512 and the user has not chosen.
* ``OMP_WAIT_POLICY=passive`` keeps idle OpenMP threads from spinning against BLAS threads.
A variable the user already set is left alone.
"""

import os


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return " avx512f " in line + " "
    except OSError:
        pass
    return False


if _has_avx512():
    os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
