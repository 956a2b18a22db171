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
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size() == comm.Get_size()
    finally:
        node.Free()


def _layout(model, opt, grad_shapes: dict, size: int) -> tuple[list[str], int]:
    """(the trained parameters, the window's entries): a parameter with a gradient buffer
    (d<name>) is trained; the others (running statistics) stay each process's own."""
    shape = dict(zip(model.kernels.PARAMS, model._param_shapes))
    trained = [p for p in model.kernels.PARAMS if f"d{p}" in grad_shapes]
    n_param = sum(math.prod(shape[p]) for p in trained)
    n_grad = sum(math.prod(s) for s in grad_shapes.values())
    return trained, n_param * (1 + len(opt.state_names)) + size * n_grad


def window_bytes(model, opt, grad_shapes: dict, size: int) -> int:
    return _layout(model, opt, grad_shapes, size)[1] * np.dtype(model.dtype).itemsize


class NodeShare:
    """The window and its views: shared parameters, optimizer state and gradient buffers."""

    def __init__(self, MPI, comm, model, opt, grad_names: list[str], grad_shapes: dict) -> None:
        self.MPI, self.comm = MPI, comm
        rank, size = comm.Get_rank(), comm.Get_size()
        names = list(model.kernels.PARAMS)
        shape = dict(zip(names, model._param_shapes))
        self.names, self.state_names = names, list(opt.state_names)
        self.state_keys = [(p, s_) for p in names for s_ in self.state_names]  # the kernels' state order
        self.trained, total = _layout(model, opt, grad_shapes, size)
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
        # This process's rows of every trained parameter (and of its gradient and state).
        self.share = {p: slice(*distributed.split(shape[p][0], size, rank)) for p in self.trained}
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.closed = False
        self._args, self._rest = [], []  # update_pair's arguments, made by load()

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
        self._args = params + grads + grads_b + st
        self._rest = [(b, [other[g][r] for other in self.grads[2:]])
                      for b, g, r in zip(grads_b, self.grad_names, rows)] if len(self.grads) > 2 else []
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

    def update(self, kernels, hyper: np.ndarray, t: int) -> float:
        """Sum every process's gradients over this process's rows and update those rows;
        returns the l2 penalty of those rows (the processes' parts add up).  The generated
        ``update_pair`` reads two gradient buffers in its pass: with two processes, theirs;
        with more, the first's and the sum of the others' (taken in rank order first)."""
        for into, others in self._rest:  # three or more processes: the second's buffer takes the others'
            for other in others:
                np.add(into, other, out=into)
        return kernels.update_pair(*self._args, hyper, t)

    def close(self) -> None:
        """Free the window (collective: every process's fit ends here)."""
        if not self.closed:
            self.closed = True
            self.win.Unlock_all()
            self.win.Free()
