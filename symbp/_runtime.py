"""Process settings symbp controls, applied before NumPy/SciPy load their BLAS.

Measured on the 2-core AVX-512 machine this project targets:
* OpenBLAS picks its Haswell (AVX2) kernels on AMD Zen 4; ``OPENBLAS_CORETYPE=SkylakeX``
  selects the AVX-512 ones.  Set only where the CPU has AVX-512 and the user has not chosen.
* ``OMP_WAIT_POLICY=passive`` keeps idle OpenMP threads from spinning against BLAS threads.
* Under an MPI launcher with k processes on this node, each uses cores/k threads.
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


def _processes_here() -> int:
    """How many processes an MPI launcher started on this node (MPICH's Hydra, Open MPI, Slurm)."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


if _has_avx512():
    os.environ.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# Several data-parallel processes on one node share its cores: each gets its share of threads
# for BLAS, OpenMP and Numba (all of them by default would oversubscribe the cores k-fold).
_local = _processes_here()
if _local > 1:
    try:
        _cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        _cores = os.cpu_count() or 1
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _cores // _local)))
