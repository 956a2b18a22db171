"""The CPU target's runtime for one ``fit`` call: host arrays, the epoch kernel, snapshots.

:class:`HostRun` is what :meth:`symbp.train.model.Model.fit` drives on the CPU (the CUDA target
has its own, :class:`symbp.backends.cuda.model.DeviceRun`): it holds the batch buffers, runs
one epoch of the generated ``train_epoch``, keeps the start-of-epoch snapshot of parameters
and optimizer state, puts it back when an epoch diverges, and validates.
"""

from __future__ import annotations

import contextlib

import numpy as np


def all_finite(arrays) -> bool:
    """Whether every entry of every array is finite."""
    return all(np.isfinite(a).all() for a in arrays)


class OneProcess:
    """What a runtime of one process says to the fit loop's questions about the others."""

    n: int  # the rows of an epoch (over every process, in a data-parallel run)

    def together(self):
        """Where an epoch's callbacks run: one process, nothing to agree on."""
        return contextlib.nullcontext()

    def agree_epoch(self, stop: bool) -> bool:
        """Whether to stop after this epoch (a data-parallel run asks every process)."""
        return stop

    def comm_stats(self) -> dict | None:
        """Communication figures of a data-parallel run; None for one process."""
        return None


class HostRun(OneProcess):
    """One fit call's arrays on the host; nothing of the model changes until :meth:`epoch`."""

    def __init__(self, model, X: np.ndarray, T: np.ndarray, val, opt, batch_size: int) -> None:
        self.model, self.opt, self.X, self.T = model, opt, X, T
        self.n = X.shape[0]
        self.kernels = model._train_kernels(opt)
        self.rows = min(batch_size, X.shape[0])
        self.Xb = np.empty((self.rows, X.shape[1]), model.dtype)
        self.Tb = np.empty((self.rows, model.network.outputs), model.dtype)  # (T may hold labels)
        self.validate = None if val is None else (lambda: model.evaluate(*val))
        self._snapshot = None

    def epoch(self, order: np.ndarray, batch_size: int, hyper: list[float], step: int,
              seed: int = 0) -> tuple[float, int, int, int]:
        """Train one epoch in ``order`` (``seed``: of its Dropout masks): (Σ loss, correct,
        updates made, first bad batch or −1)."""
        model = self.model
        ws = model._workspace(self.rows)
        states = self._begin_epoch()
        total, correct, done, bad = self.kernels.train_epoch(
            self.X, self.T, order, batch_size, np.array(hyper, model.dtype), step, seed,
            *model._param_list(), *ws, *states, self.Xb, self.Tb)
        return float(total), int(correct), int(done), int(bad)

    def _begin_epoch(self) -> list[np.ndarray]:
        """The optimizer's state arrays, after keeping the parameters and state as they are:
        every loss and parameter so far was finite, so an epoch that blows up comes back here."""
        model, opt = self.model, self.opt
        self._states = model._state_list(opt)  # created before the snapshot, so it covers them too
        self._snapshot = ({k: v.copy() for k, v in model.params.items()},
                          {p: {k: v.copy() for k, v in st.items()} for p, st in opt.state.items()})
        return self._states

    def finite(self) -> bool:
        """Whether the parameters and optimizer state after the epoch are all finite."""
        return all_finite(self.model._param_list() + self._states)

    def restore(self) -> None:
        """Parameters and optimizer state back to the start of the last epoch."""
        params, state = self._snapshot
        for k, v in params.items():
            self.model.params[k][...] = v
        for p, st in state.items():
            for k, v in st.items():
                self.opt.state[p][k][...] = v

    def sync(self) -> None:
        """Make ``optimizer.state`` current (it is, on the host)."""

    def close(self) -> None:
        """Release the run (nothing to copy back on the host)."""

