"""A data-parallel step on one machine through MPI shared memory: no Allreduce of the gradients.

When every process of a data-parallel fit runs on one node (MPI's ``COMM_TYPE_SHARED`` split
holds them all), :class:`~symbp.backends.cpu.distributed.DistributedRun` keeps the trained
parameters, their optimizer state and every process's gradient buffers in one MPI-3
shared-memory window (``Win.Allocate_shared``): one copy of θ, which every process's forward
pass reads.  A step:

1. each process writes its rows' gradient sums into its own buffers (the generated ``slice_grads``);
2. a two-entry ``Allreduce`` agrees on the step's status (a non-finite loss, a failure) and,
   being collective, orders every process's writes before anyone reads them;
3. each process takes its share of the rows of every parameter (near-equal blocks) and applies
   the generated ``update_pair`` to those rows only (its loops run over the rows of the arrays
   given, ``rows_of_array``), reading the gradient as the sum of two buffers in the same pass:
   the two processes', or, with more, the first's and the others' (summed beforehand);
4. a barrier: nobody starts the next forward pass on half-updated parameters.

Against one ``Allreduce`` of every gradient and the whole update on every process, each gradient
entry is read once instead of copied through MPI's buffers several times, and each of p
processes updates 1/p of the parameters (ZeRO stage 1's sharded update, without its all-gather,
since the parameters are shared).  The parameters end the step the same bits for everyone: there
is one copy.  Between nodes the Allreduce path stays (the window needs one machine).

**The δ-exchange step.**  Where a weight's update rides on its gradient's GEMM (plain SGD:
θ ← (1 − ηλ)·θ − η·δᵀx, as a one-process step runs it), the processes exchange what that
gradient is made of instead of the gradient itself: the window also holds the global batch's δ
and inputs x of those layers (the training module's ``EXCHANGE`` names them), each process's
``slice_deltas`` writes its rows of them there (and forms no such weight gradient), and its
``update_rows`` applies θ[rows] ← β·θ[rows] + α·δ[:, rows]ᵀ·x over the whole global batch for
its block of rows of each such θ, one GEMM each, the other parameters (biases) from two gradient
buffers as above.  On the large MLP a process then reads ~2.5 MiB of the other's δ and inputs a
step instead of half of 7.1 MiB of gradients, and no weight gradient is written or read at all:
2 processes × 1 thread went from 0.86–0.91 to 0.90–1.02 of one process × 2 threads
(``benchmarks/bench_dist.py``).  ``SYMBP_EXCHANGE_DELTAS=0`` keeps the gradient-buffer step.

The model's own arrays are not in the window: each process copies its share in at the start of
an epoch and the whole window out at its end (callbacks, checkpoints, the parameter hash and the
restore after a blow-up all see the model's arrays, as in the Allreduce path).  Running
statistics (BatchNorm's) stay each process's own: every process updates them from the same
global statistics, so they agree without being shared.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np

from ... import distributed

#: ``SYMBP_SHARED_WINDOW=0`` makes a one-node data-parallel fit use the Allreduce path anyway.
ENV = "SYMBP_SHARED_WINDOW"


#: ``SYMBP_EXCHANGE_DELTAS=0`` keeps the window's step on gradient buffers (no δ exchange).
EXCHANGE_ENV = "SYMBP_EXCHANGE_DELTAS"


def _switched_off(var: str) -> bool:
    return os.environ.get(var, "1").strip() == "0"


def exchange_enabled() -> bool:
    return not _switched_off(EXCHANGE_ENV)


def room_for(nbytes: int) -> bool:
    """Whether /dev/shm, where MPICH puts a shared window on Linux, has room for ``nbytes`` (a
    container's is often 64 MiB: a window past it dies of SIGBUS on first touch, not with an
    error).  Where there is no /dev/shm the MPI library places the window elsewhere."""
    try:
        return shutil.disk_usage("/dev/shm").free >= 1.25 * nbytes + (64 << 20)
    except OSError:
        return True


def one_node(MPI, comm) -> bool:
    """Whether every process of ``comm`` can share memory with the others (collective)."""
    if _switched_off(ENV):
        return False
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size() == comm.Get_size()
    finally:
        node.Free()


def exchanged(model, table: tuple, rows: int, width: int) -> dict[str, tuple[int, ...]]:
    """The global batch's buffers of the δ-exchange step (the δ and inputs named in ``table``,
    the training kernels' ``EXCHANGE``), ``rows`` rows each (X: ``width`` columns, the data's)."""
    shapes = dict(model.kernels.WORKSPACE)
    names = dict.fromkeys(name for _, d, x in table for name in (d, x))
    return {name: (rows, *((width,) if name == "X" else shapes[name][1:])) for name in names}


def _layout(model, opt, grad_shapes: dict, size: int, batch: dict) -> tuple[list[str], int]:
    """(the trained parameters, the window's entries): a parameter with a gradient buffer
    (d<name>) is trained; the others (running statistics) stay each process's own.  ``batch``:
    the δ-exchange step's global-batch buffers (:func:`exchanged`)."""
    shape = dict(zip(model.kernels.PARAMS, model._param_shapes))
    trained = [p for p in model.kernels.PARAMS if f"d{p}" in grad_shapes]
    n_param = sum(math.prod(shape[p]) for p in trained)
    n_grad = sum(math.prod(s) for s in grad_shapes.values())
    return trained, n_param * (1 + len(opt.state_names)) + size * n_grad + sum(map(math.prod, batch.values()))


def window_bytes(model, opt, grad_shapes: dict, size: int, batch: dict) -> int:
    return _layout(model, opt, grad_shapes, size, batch)[1] * np.dtype(model.dtype).itemsize


class NodeShare:
    """The window and its views: shared parameters, optimizer state and gradient buffers."""

    def __init__(self, MPI, comm, model, opt, grad_names: list[str], grad_shapes: dict, batch: dict,
                 exchange: tuple = ()) -> None:
        self.MPI, self.comm = MPI, comm
        rank, size = comm.Get_rank(), comm.Get_size()
        names = list(model.kernels.PARAMS)
        shape = dict(zip(names, model._param_shapes))
        self.names, self.state_names = names, list(opt.state_names)
        self.state_keys = [(p, s_) for p in names for s_ in self.state_names]  # the kernels' state order
        self.trained, total = _layout(model, opt, grad_shapes, size, batch)
        dtype = model.dtype
        item = np.dtype(dtype).itemsize
        self.win = MPI.Win.Allocate_shared(total * item if rank == 0 else 0, item, comm=comm)
        buf, _ = self.win.Shared_query(0)
        memory = np.ndarray(buffer=buf, dtype=dtype, shape=(total,))
        at = 0

        def take(shape_):
            nonlocal at
            count = math.prod(shape_)
            view = memory[at:at + count].reshape(shape_)
            at += count
            return view

        self.params = {p: take(shape[p]) for p in self.trained}
        self.states = {(p, s_): take(shape[p]) for p in self.trained for s_ in self.state_names}
        self.grads = [{g: take(grad_shapes[g]) for g in grad_names} for _ in range(size)]
        self.grad_names = grad_names
        # The δ-exchange step: the global batch's δ and inputs, each process writing its rows;
        # (θ, δ, x) of each update a GEMM carries (empty: every update reads gradient buffers).
        self.batch = {name: take(shape_) for name, shape_ in batch.items()}
        self.exchange = exchange
        self._carried = {f"d{p}" for p, _, _ in exchange}  # gradient buffers the exchange leaves unused
        # This process's rows of every trained parameter (and of its gradient and state).
        self.share = {p: slice(*distributed.split(shape[p][0], size, rank)) for p in self.trained}
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.closed = False
        # update_pair's arguments (update_rows takes δ and x between the two), made by load()
        self._heads, self._st, self._rest = [], [], []

    def own_grads(self) -> dict:
        """This process's gradient buffers (what its ``slice_grads`` writes)."""
        return self.grads[self.comm.Get_rank()]

    def kernel_params(self, private: list[np.ndarray]) -> list[np.ndarray]:
        """The parameters in kernel order: the shared ones, and this process's running statistics."""
        return [self.params.get(p, a) for p, a in zip(self.names, private)]

    def fence(self) -> None:
        """Every process's writes to the window done and seen: a barrier between memory syncs."""
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def load(self, private: list[np.ndarray], states: list[np.ndarray]) -> None:
        """Start of an epoch: this process's rows of the model's parameters and optimizer state
        into the window (every process holds the same: checked by hash after every epoch), and
        ``update_pair``'s arguments for the epoch: those rows, shared, and the running statistics
        (and their unused state), the model's own."""
        blocks = []
        for key, a in zip(self.names + self.state_keys, private + states):
            shared = self.params.get(key) if isinstance(key, str) else self.states.get(key)
            if shared is None:
                blocks.append(a)
                continue
            rows = self.share[key if isinstance(key, str) else key[0]]
            shared[rows] = a[rows]
            blocks.append(shared[rows])
        params, st = blocks[:len(self.names)], blocks[len(self.names):]
        rows = [self.share[g[1:]] for g in self.grad_names]
        grads, grads_b = ([buffers[g][r] for g, r in zip(self.grad_names, rows)] for buffers in self.grads[:2])
        self._heads, self._st = params + grads + grads_b, st
        self._rest = [(b, [other[g][r] for other in self.grads[2:]])
                      for b, g, r in zip(grads_b, self.grad_names, rows)
                      if g not in self._carried] if len(self.grads) > 2 else []
        self.fence()

    def store(self, private: list[np.ndarray], states: list[np.ndarray]) -> None:
        """End of an epoch: the window's parameters and optimizer state into the model's arrays."""
        for p, a in zip(self.names, private):
            if p in self.params:
                a[...] = self.params[p]
        for key, a in zip(self.state_keys, states):
            if key in self.states:
                a[...] = self.states[key]

    def zero_own_grads(self) -> None:
        for g in self.own_grads().values():
            g[...] = 0

    def update(self, kernels, hyper: np.ndarray, t: int, rows: int) -> float:
        """Sum every process's gradients over this process's rows and update those rows;
        returns the l2 penalty of those rows (the processes' parts add up).  The generated
        ``update_pair`` reads two gradient buffers in its pass: with two processes, theirs;
        with more, the first's and the sum of the others' (taken in rank order first).  In the
        δ-exchange step, ``update_rows`` does, and carries the weights of ``exchange`` on GEMMs
        over the global batch of ``rows`` rows."""
        for into, others in self._rest:  # three or more processes: the second's buffer takes the others'
            for other in others:
                np.add(into, other, out=into)
        if not self.exchange:
            return kernels.update_pair(*self._heads, *self._st, hyper, t)
        return kernels.update_rows(*self._heads, *self._operands(rows), *self._st, hyper, t)

    # -- the δ-exchange step ----------------------------------------------------------------
    def batch_rows(self, name: str, row0: int, nb: int) -> np.ndarray:
        """This process's rows of a global-batch buffer (its kernels write them there)."""
        return self.batch[name][row0:row0 + nb]

    def workspace(self, names: list[str], ws: list[np.ndarray], row0: int, nb: int) -> list[np.ndarray]:
        """The kernels' work buffers for a step, the exchanged ones as this process's rows."""
        return [self.batch[name][row0:row0 + nb] if name in self.batch else w for name, w in zip(names, ws)]

    def _operands(self, rows: int) -> list[np.ndarray]:
        """update_rows' δ and x, in the kernels' order: of δ the columns of this process's rows
        of its θ, of x every row of the global batch (``rows`` rows this step)."""
        out = {}
        for p, d, x in self.exchange:
            out[d] = self.batch[d][:rows, self.share[p]]
            out[x] = self.batch[x][:rows]
        return list(out.values())

    def close(self) -> None:
        """Free the window (collective: every process's fit ends here)."""
        if not self.closed:
            self.closed = True
            self.win.Unlock_all()
            self.win.Free()
