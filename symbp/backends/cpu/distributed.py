"""The CPU target's runtime for a data-parallel ``fit`` (``comm=``): one process of several.

Every step of an epoch, on every process: gather this process's rows of the global batch,
run the generated ``slice_grads`` (forward pass, Σ ℓ, gradient sums with δ_L scaled by its
share of the batch's rows), sum the gradient buffers of every process with one in-place
``Allreduce`` of a single flat buffer (the gradient buffers are views into it, in the
kernels' parameter order; two trailing entries count the processes whose loss was not
finite and those that failed), then run the generated ``update``, the optimizer's rule with
λθ added once.  Every process applies the same update to the same sums, so the parameters
stay the same bits on all of them (:meth:`agree_epoch` checks a hash after every epoch).
That is the path between machines.  When every process is on one machine, the parameters,
their state and the gradient buffers live in a shared-memory window instead and each process
updates its block of rows from everyone's buffers, with no gradient Allreduce, or, for the
weights whose update rides on a GEMM (plain SGD), from everyone's δ and layer inputs
(:mod:`.node_share`).  A network with batch statistics (BatchNorm) stops inside the kernels
to sum them over the processes (:mod:`.sync`).

The global batch is the single-process one: with the same data on every process
(``sharded=False``) a batch is the rows ``order[k·B : (k+1)·B]`` of the single-process
shuffle, split into contiguous near-equal slices, so N processes compute what one does, up to
the order of floating-point sums.  With ``sharded=True`` each process shuffles only its own
rows (from the seed, epoch and rank) and every step takes its share of them:
``ceil(Σ rows / B)`` steps, process r giving ``rows_r / steps`` rows to each.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ... import distributed
from . import node_share, sync
from .node_share import NodeShare
from .runtime import HostRun
from .sync import PeerFailed, StepSums


class DistributedRun(HostRun):
    """One process's arrays and communicator for one data-parallel fit call."""

    def __init__(self, model, X, T, val, opt, batch_size: int, comm, sharded: bool, counts: list[int]) -> None:
        """``counts``: every process's rows (from an allgather: no collective runs here, so a
        failure in here can be agreed on)."""
        from mpi4py import MPI

        self.MPI, self.comm, self.sharded = MPI, comm, sharded
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        n = sum(counts) if sharded else X.shape[0]
        self.counts, self.steps, self.batch_size = counts, -(-n // batch_size), batch_size
        # The most rows this process takes in a step (split() and _local() round up to this).
        most = -(-counts[self.rank] // self.steps) if sharded else -(-min(batch_size, n) // self.size)
        super().__init__(model, X, T, val, opt, max(1, most))
        self.n = n  # every process's rows, when sharded
        if not hasattr(self.kernels, "slice_grads"):
            raise RuntimeError(f"{self.kernels.__file__} predates data-parallel training: delete it to regenerate")
        if getattr(self.kernels, "SYNC_ERROR", None):
            raise NotImplementedError(self.kernels.SYNC_ERROR)
        # The gradient buffers as views into one flat buffer, + 2 status slots: one Allreduce a step.
        names = [name for name, _ in model.kernels.WORKSPACE]
        shapes = dict(model.kernels.WORKSPACE)
        grads = [name for name in names if model.kernels.ROLES[name] == "gradient"]
        sizes = [math.prod(shapes[g]) for g in grads]
        self.flat = np.zeros(sum(sizes) + 2, model.dtype)
        views, offset = {}, 0
        for g, size in zip(grads, sizes):
            views[g] = self.flat[offset:offset + size].reshape(shapes[g])
            offset += size
        self.grads = [views[g] for g in grads]
        self.ws = [views.get(name, w) for name, w in zip(names, model._workspace(self.rows))]
        self._grad_names, self._grad_shapes, self._ws_names = grads, {g: shapes[g] for g in grads}, names
        self.node = None  # the shared-memory window, on one machine (share_memory)
        self.status = np.zeros(2, model.dtype)
        self.allreduce_s, self.steps_run, self.seconds = 0.0, 0, 0.0
        # The batch statistics' sums inside a step (BatchNorm), when the network has any.
        sizes = getattr(self.kernels, "SYNC_SIZES", ())
        self.sums = StepSums(MPI, comm, sizes, model.dtype) if sizes else None
        self.validate = None if val is None else (lambda: self._validate(*val))

    def share_memory(self) -> None:
        """On one machine, keep the parameters, their state and the gradients in one shared
        window and skip the gradient Allreduce (:mod:`.node_share`); collective, after every
        process holds rank 0's parameters."""
        MPI, comm = self.MPI, self.comm
        table = getattr(self.kernels, "EXCHANGE", ())
        if node_share.exchange_enabled() and table:  # δ and inputs of the global batch in the window too
            batch = node_share.exchanged(self.model, table, max(map(self._global_rows, range(self.steps))),
                                         self.X.shape[1])
        else:
            table, batch = (), {}
        need = node_share.window_bytes(self.model, self.opt, self._grad_shapes, self.size, batch)
        ok = node_share.one_node(MPI, comm) and node_share.room_for(need)
        if not comm.allreduce(int(ok), op=MPI.MIN):  # all processes or none
            return
        try:  # an MPI without shared windows, say: the Allreduce path, on every process
            node = NodeShare(MPI, comm, self.model, self.opt, self._grad_names, self._grad_shapes, batch, table)
        except (MPI.Exception, MemoryError, OSError):
            node = None
        if not comm.allreduce(int(node is not None), op=MPI.MIN):
            if node is not None:
                node.close()
            return
        self.node = node
        own = node.own_grads()
        self.ws = [own.get(name, w) for name, w in zip(self._ws_names, self.ws)]

    def close(self) -> None:
        if self.node is not None:
            self.node.close()

    # -- which rows are whose ------------------------------------------------------------
    def _local(self, k: int) -> tuple[int, int]:
        """Step ``k``'s rows of this process: positions [start, stop) in its epoch order."""
        if self.sharded:
            mine = self.counts[self.rank]
            return k * mine // self.steps, (k + 1) * mine // self.steps
        start = k * self.batch_size
        first, last = distributed.split(min(self.batch_size, self.n - start), self.size, self.rank)
        return start + first, start + last

    def _row0(self, k: int) -> int:
        """Where this process's rows of step ``k`` start in its global batch (Dropout's draws
        for them are the one-process draws for those rows)."""
        if self.sharded:
            return sum((k + 1) * c // self.steps - k * c // self.steps for c in self.counts[:self.rank])
        return self._local(k)[0] - k * self.batch_size

    def _global_rows(self, k: int) -> int:
        """How many rows step ``k``'s global batch has, over every process."""
        if self.sharded:
            return sum((k + 1) * c // self.steps - k * c // self.steps for c in self.counts)
        return min(self.batch_size, self.n - k * self.batch_size)

    # -- an epoch ------------------------------------------------------------------------
    def epoch(self, order: np.ndarray, batch_size: int, hyper: list[float], step: int,
              seed: int = 0) -> tuple[float, int, int, int]:
        """One epoch over every process: (Σ loss, correct, updates made, first bad batch or −1),
        the same numbers on every process."""
        before = sync.route(self.sums)
        try:
            return self._epoch(order, hyper, step, seed)
        finally:
            sync.route(before)

    def _epoch(self, order: np.ndarray, hyper: list[float], step: int, seed: int) -> tuple[float, int, int, int]:
        model, k_ = self.model, self.kernels
        began = time.perf_counter()
        states = self._begin_epoch()
        params, hyper = model._param_list(), np.array(hyper, model.dtype)
        total, correct, t, bad = 0.0, 0, step, -1
        node, sums = self.node, self.sums
        exchange = node is not None and bool(node.exchange)
        private = params
        if node is not None:  # one machine: the parameters and gradients in the shared window
            node.load(private, states)
            params = node.kernel_params(private)
        status = self.flat[-2:] if node is None else self.status
        for k in range(self.steps):
            rows = self._global_rows(k)
            if rows == 0:
                continue  # sharded, no process has a row for this step: no batch, no update
            error = None
            try:
                if sums is not None:
                    sums.begin_step()
                start, stop = self._local(k)
                nb = stop - start
                status[:] = 0
                loss, c = 0.0, 0
                # A process without rows this step still runs the kernel when the batch's
                # statistics are summed over the processes: it takes part in those sums.
                if nb or sums is not None:
                    idx, row0 = order[start:stop], self._row0(k)
                    kernel, Xs, ws = k_.slice_grads, self.Xb[:nb], self.ws
                    if exchange:  # δ exchanged: this process's rows of the global batch's buffers
                        kernel, ws = k_.slice_deltas, node.workspace(self._ws_names, self.ws, row0, nb)
                        Xs = node.batch_rows("X", row0, nb) if "X" in node.batch else Xs
                    np.take(self.X, idx, axis=0, out=Xs)
                    np.take(self.T, idx, axis=0, out=self.Tb[:nb])
                    loss, c = kernel(Xs, self.Tb[:nb], nb / rows, rows, row0, seed + t, *params, *ws)
                    status[0] = 0 if math.isfinite(loss) else 1
                if not nb:
                    if node is None:
                        self.flat[:-2] = 0
                    else:
                        node.zero_own_grads()
            except PeerFailed:  # another process failed; its error is agreed on below
                status[1] = 0
            except Exception as err:  # noqa: BLE001 - every process learns of it below
                error, status[1] = err, 1
                if sums is not None:
                    sums.fail()  # into the sum the others may be waiting in
            tic = time.perf_counter()
            if node is None:
                self.comm.Allreduce(self.MPI.IN_PLACE, self.flat, op=self.MPI.SUM)
            else:  # only the status: the gradients are in the window (the Allreduce orders the writes)
                node.win.Sync()
                self.comm.Allreduce(self.MPI.IN_PLACE, status, op=self.MPI.SUM)
                node.win.Sync()
            self.allreduce_s += time.perf_counter() - tic
            if status[1]:
                distributed.agree(self.comm, error)
            if status[0]:
                bad = k
                break
            t += 1
            if node is None:
                pen = k_.update(*params, *self.grads, *states, hyper, t)
                total += float(loss) + (pen * rows if self.rank == 0 else 0.0)  # λ's term counted once
            else:  # this process's rows of every parameter; the penalty's parts add up over processes
                pen = node.update(k_, hyper, t, rows)
                tic = time.perf_counter()
                node.fence()
                self.allreduce_s += time.perf_counter() - tic
                total += float(loss) + pen * rows
            correct += int(c)
        if node is not None:
            node.store(private, states)
        self.steps_run += t - step
        total, correct = self._sum(total, correct)
        self.seconds += time.perf_counter() - began
        return total, correct, t - step, bad

    def _validate(self, X, T) -> tuple[float, float]:
        """(loss, accuracy) on the validation data: a part of it on each process (its own part
        when sharded), the sums reduced; equal on every process."""
        model = self.model
        if not self.sharded:
            first, last = distributed.split(X.shape[0], self.size, self.rank)
            X, T = X[first:last], T[first:last]
        total, correct = 0.0, 0
        params = model._param_list()
        if X.shape[0]:
            chunk = min(1024, X.shape[0])
            total, correct = model.kernels.evaluate(X, T, *params, *model._workspace(chunk), chunk)
        total, correct, rows = self._sum(total, correct, X.shape[0])
        return float(total / rows + model.kernels.penalty(*params)), model._accuracy(rows, correct)

    def _sum(self, *values):
        """Sums over every process (float64: counts stay exact below 2^53)."""
        buf = np.array(values, np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return (float(buf[0]), *(int(v) for v in buf[1:]))

    # -- after an epoch --------------------------------------------------------------------
    def together(self):
        return distributed.together(self.comm)

    def agree_epoch(self, stop: bool) -> bool:
        """After an epoch's callbacks: stop when any process's callback said so; the
        parameters must hash the same on every process (an error if not)."""
        mine = distributed.fingerprint(self.model._param_list())
        every = self.comm.allgather((bool(stop), mine))
        if len({h for _, h in every}) > 1:
            differ = [r for r, (_, h) in enumerate(every) if h != every[0][1]]
            raise RuntimeError(f"the parameters differ between processes after an epoch (ranks {differ} differ from "
                               "rank 0): their updates were not the same; training stopped")
        return any(s for s, _ in every)

    def comm_stats(self) -> dict:
        """``allreduce_s``: the seconds in the step's collectives (waits for the slower
        processes included): the gradient Allreduce, or, in the shared window, the status
        Allreduce and the end-of-step barrier."""
        return {"ranks": self.size, "steps": self.steps_run, "allreduce_s": self.allreduce_s, "seconds": self.seconds,
                "transport": "Allreduce" if self.node is None else
                "shared-memory window" + (", δ exchanged" if self.node.exchange else "")}

