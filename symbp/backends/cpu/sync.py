"""The sums over processes that the data-parallel kernels make in the middle of a step.

A data-parallel fit (:mod:`symbp.backends.cpu.distributed`) runs the generated
``slice_grads`` on each process's rows of a global batch.  A batch statistic (BatchNorm's
mean and variance, and their gradients) must be the global batch's, so the kernel stops at
each one (``with objmode(): sum_over_processes(buf)``, a :class:`~symbp.lower.ir.Sync` step)
and this module sums ``buf`` over the processes with one ``Allreduce``.

Every such sum carries one more entry: whether a process failed before it.  A process whose
step raised (before its kernel, or inside it) still takes part in the next sum the others are
waiting in, with that entry set (:meth:`StepSums.fail`); they raise :class:`PeerFailed` out of
their kernels there, and every process goes on to the step's status ``Allreduce``, where the
failure is agreed on (:func:`symbp.distributed.agree`).  So no process waits in a collective
the others never reach.
"""

from __future__ import annotations

import numpy as np


class PeerFailed(Exception):
    """Another process's step failed: this one stops its step at the same sum."""


class StepSums:
    """One fit's sums over processes: the communicator and where in the step they are."""

    def __init__(self, MPI, comm, sizes: tuple[int, ...], dtype) -> None:
        """``MPI``: mpi4py's module (passed in: a kernel export copies this file without it)."""
        self.comm, self.SUM, self.IN_PLACE = comm, MPI.SUM, MPI.IN_PLACE
        self.sizes = tuple(sizes)  # every sum of a step, in order (the generated SYNC_SIZES)
        self.buffer = np.zeros(max(self.sizes, default=0) + 1, dtype)
        self.done = 0

    def begin_step(self) -> None:
        self.done = 0

    def _allreduce(self, size: int, failed: bool) -> np.ndarray:
        buf = self.buffer[:size + 1]
        buf[size] = 1 if failed else 0
        self.comm.Allreduce(self.IN_PLACE, buf, op=self.SUM)
        self.done += 1
        return buf

    def sum(self, out: np.ndarray) -> None:
        """``out`` ← its sum over the processes (called from the kernel)."""
        flat = out.reshape(-1)
        if self.done >= len(self.sizes) or flat.size != self.sizes[self.done]:
            raise RuntimeError(f"data-parallel step: sum {self.done + 1} of a buffer of {flat.size} entries, where the "
                               f"kernel module lists {self.sizes}: regenerate the kernels")
        buf = self.buffer[:flat.size]
        buf[:] = flat
        buf = self._allreduce(flat.size, False)
        if buf[-1]:
            raise PeerFailed(f"another process failed before sum {self.done} of this step")
        flat[:] = buf[:-1]

    def fail(self) -> None:
        """This process's step failed: take part in the sum the others wait in (if any is left)."""
        if self.done < len(self.sizes):
            self._allreduce(self.sizes[self.done], True)


_active: StepSums | None = None


def route(sums: StepSums | None) -> StepSums | None:
    """Send the kernels' sums to ``sums`` (None: nowhere); returns where they went before."""
    global _active
    before, _active = _active, sums
    return before


def sum_over_processes(out: np.ndarray) -> None:
    """What the data-parallel kernels call at each batch statistic."""
    if _active is None:
        raise RuntimeError("a data-parallel kernel ran outside a data-parallel fit (no communicator to sum over)")
    _active.sum(out)
