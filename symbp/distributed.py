"""What the processes of a data-parallel run (MPI, through mpi4py) agree on.

``model.fit(X, y, …, comm=MPI.COMM_WORLD)`` trains on every process of ``comm``: each takes
its slice of every global batch, the gradient sums go through one ``Allreduce`` per step (or,
on one machine, a shared-memory window) and every process ends the step with the same
parameters (:class:`symbp.backends.cpu.distributed.DistributedRun`).
This module holds what is not the step: finding the communicator (the ``mpi`` extra, or a
launch by ``mpiexec``/``srun``), raising one failure on every process (:func:`together`),
checking that the processes were given data of the same kind (:func:`check_same`) and that
their parameters are the same bits (:func:`fingerprint`).

Nothing here imports mpi4py until a communicator is asked for: importing mpi4py starts MPI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np

EXTRA = "pip install 'symbp[mpi]' (mpi4py and the MPICH wheel)"

# What launchers tell the processes they start: the number of them.  Hydra (MPICH) sets
# PMI_SIZE, Open MPI OMPI_COMM_WORLD_SIZE, Slurm's srun PMI_SIZE or PMIX_SIZE and
# SLURM_STEP_NUM_TASKS (not SLURM_NTASKS: a batch script itself has that, as one process).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_size() -> int:
    """How many processes the MPI launcher started with this one (1 when none did)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def _mpi(why: str):
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError(f"{why} needs mpi4py, which is not installed: {EXTRA}") from None
    return MPI


def world():
    """``MPI.COMM_WORLD`` when a launcher started several processes, else None (no MPI)."""
    size = launched_size()
    if size <= 1:
        return None
    return _mpi(f"this process is one of {size} started by an MPI launcher; training on them").COMM_WORLD


def communicator(comm):
    """``comm`` checked: an mpi4py communicator of two or more processes, or None (one
    process: the plain single-process fit, which it equals)."""
    if comm is None:
        return None
    MPI = _mpi("fit(comm=…)")
    if not isinstance(comm, MPI.Comm) or isinstance(comm, MPI.Intercomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intra-communicator such as MPI.COMM_WORLD, got {comm!r}")
    return comm if comm.Get_size() > 1 else None


def _rebuilt(kind: type, message: str) -> BaseException:
    """The failing process's error, of its type when that type takes a message."""
    try:
        err = kind(message)
        if str(err) == message:
            return err
    except Exception:  # noqa: BLE001 - a type that cannot be rebuilt from its text
        pass
    return RuntimeError(message)


def agree(comm, error: BaseException | None) -> None:
    """Every process says whether it failed; when one did, every process raises the same
    error: the lowest failing rank's type and message, the message naming that rank."""
    reports = comm.allgather(None if error is None else (type(error), str(error)))
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if not failed:
        return
    rank, (kind, message) = failed[0]
    others = "" if len(failed) == 1 else f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)"
    err = _rebuilt(kind, f"rank {rank} of {comm.Get_size()}: {message}{others}")
    err.symbp_rank = comm.Get_rank()  # the command line prints it on rank 0 only
    if error is not None and type(error) is type(err):
        raise err from error
    raise err


@contextlib.contextmanager
def together(comm):
    """Run the block on every process; if it raises on any, it raises on all (see
    :func:`agree`), so no process goes on to a collective the others never reach."""
    if comm is None:
        yield
        return
    try:
        yield
    except Exception as err:  # noqa: BLE001 - sent to every process, raised there
        agree(comm, err)
        raise  # not reached: agree raised
    agree(comm, None)


def check_same(comm, facts: dict) -> None:
    """Refuse a run whose processes differ in ``facts`` (name → value), naming what differs
    on which ranks.  Call inside :func:`together`."""
    every = comm.allgather(facts)
    for key in facts:
        seen = {}
        for rank, f in enumerate(every):
            seen.setdefault(repr(f.get(key)), []).append(rank)
        if len(seen) > 1:
            parts = "; ".join(f"{v} on rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}" for v, r in seen.items())
            raise ValueError(f"the {comm.Get_size()} processes were given different {key}: {parts}")


def fingerprint(arrays) -> str:
    """A hash of the arrays' bytes (and shapes): equal on two processes only when every
    bit is."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def sample_fingerprint(X: np.ndarray, T: np.ndarray) -> str:
    """A hash of up to 64 rows spread over the data: same arrays on every process, cheaply."""
    rows = np.unique(np.linspace(0, X.shape[0] - 1, min(64, X.shape[0])).astype(np.int64)) if len(X) else []
    return fingerprint([X[rows], T[rows], np.array(X.shape)])


def split(rows: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part of ``rows`` split ``size`` ways, near-equal
    (the first ``rows % size`` parts one longer)."""
    base, extra = divmod(rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
