"""The CPU target's runtime for one ``fit`` call: host arrays, the epoch kernel, snapshots.

:class:`HostRun` is what :meth:`symbp.train.model.Model.fit` drives on the CPU (the CUDA target
has its own, :class:`symbp.backends.cuda.model.DeviceRun`): it holds the batch buffers, runs
one epoch of the generated ``train_epoch``, keeps the start-of-epoch snapshot of parameters
and optimizer state, puts it back when an epoch diverges, and validates.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import threading
import warnings

import numpy as np

from .guard import all_finite as finite

#: The fewest rows a batch needs for train_epoch_halves (two threads) to run it.
HALVES_MIN_ROWS = 16
#: Compile train_epoch_halves before the first epoch instead of beside it (tests: the halves run
#: from the first step on).
HALVES_WAIT = False

# The training modules whose train_epoch_halves is compiled (or loaded from the cache) in this
# process, and those being compiled, by module name.
_READY: set[str] = set()
_STARTED: dict[str, threading.Thread] = {}


def epoch_calls(n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """The train_epoch calls of an epoch of ``n`` rows, as (first, end, rows of each batch) of
    the order: the whole batches in one call, a shorter last batch in a second.  train_epoch
    slices no buffer (each slice costs Numba compile time), so every batch of a call has its
    buffers' rows."""
    whole = n - n % batch_size
    return [part for part in ((0, whole, batch_size), (whole, n, n - whole)) if part[1] > part[0]]


def all_finite(arrays) -> bool:
    """Whether every entry of every array is finite: a compiled pass over each, read as one
    row (one compiled signature), with no temporary array (np.isfinite(a).all() makes one:
    22.6 against 10.7 µs over the medium MLP's parameters, a fit call's check)."""
    return all(finite(a.reshape(-1)) if a.flags.c_contiguous else np.isfinite(a).all() for a in arrays)


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
        states = self._begin_epoch()
        hyper = np.array(hyper, model.dtype)
        one_thread = self._halves()
        if one_thread is not None:
            half = (self.rows + 1) // 2
            if getattr(self, "_ws_b", None) is None:  # the second half's work buffers, for the fit
                self._ws_b = [np.empty(tuple(half if d == "batch" else d for d in shape), model.dtype)
                              for _, shape in model.kernels.WORKSPACE]
            args = [*model._param_list(), *model._workspace(half), *states, self.Xb, self.Tb, *self._ws_b]
            name = self.kernels.__name__
            if name not in _READY and name not in _STARTED:
                # Not compiled in this process yet: beside the epochs that train_epoch runs meanwhile
                # (a cold start's first step does not wait for it), or before, with HALVES_WAIT.
                warm = (self.kernels.train_epoch_halves, (self.X[:0], self.T[:0], order[:0], batch_size, hyper,
                                                          step, seed, *args))
                _STARTED[name] = threading.Thread(target=_compile, args=(name, *warm), daemon=True,
                                                  name="symbp-compile-halves")
                if HALVES_WAIT:
                    _STARTED[name].run()
                elif self.kernels.train_epoch.signatures:  # (train_epoch has run in this process)
                    _STARTED[name].start()
                else:
                    del _STARTED[name]  # (started after the first epoch: it must not delay the first step)
            if name in _READY:
                with one_thread():
                    total, correct, done, bad = self.kernels.train_epoch_halves(
                        self.X, self.T, order, batch_size, hyper, step, seed, *args)
                return float(total), int(correct), int(done), int(bad)
        total, correct, done = 0.0, 0, 0
        for lo, hi, rows in epoch_calls(len(order), batch_size):
            t, c, d, bad = self.kernels.train_epoch(
                self.X, self.T, order[lo:hi], rows, hyper, step + done, seed, *model._param_list(),
                *model._sized(rows), *states, self.Xb[:rows], self.Tb[:rows])
            total, correct, done = total + float(t), correct + int(c), done + int(d)
            if bad == -2:
                raise RuntimeError(f"train_epoch was given batches of {rows} rows with other buffers")
            if bad >= 0:
                return total, correct, done, lo // batch_size + int(bad)
        return total, correct, done, -1

    def _halves(self):
        """BLAS held to one thread (a context), where this fit's batches run as two halves on two
        threads (the generated train_epoch_halves); None where they run whole.

        Halves for networks with image layers: their im2col, pools, scatters and col2im are
        Numba loops on one core, and two halves put them on two.  A dense network's step is its
        GEMMs, which BLAS already runs on both cores: measured (2-core Zen 5, float32, SGD, fit
        over 16 batches) the small and wide CNNs of benchmarks/bench_cnn.py 0.72-1.05 → 0.51 and
        13.4-13.9 → 9.5 ms a step as halves, the MLPs of bench_mlp.py slower as halves (tiny
        0.009 → 0.050 ms, medium 0.45-0.49 → 0.66, large 5.9-7.0 → 7.2).  Not on one core, nor
        for a network the halves cannot train (HALVES false: batch statistics, Dropout, an
        update a GEMM carries), nor for batches under HALVES_MIN_ROWS rows."""
        model = self.model
        if not getattr(self.kernels, "HALVES", False) or self.rows < HALVES_MIN_ROWS:
            return None
        if not any(len(shape) == 3 for shape in model.network.shapes[1:]):
            return None
        import numba

        return _blas_one_thread() if numba.get_num_threads() >= 2 else None

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


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # (finds the loaded BLAS libraries once: a scan of the process)


def _blas_one_thread():
    """A context factory: every BLAS library of the process on one thread inside it."""
    return lambda: _controller().limit(limits=1, user_api="blas")


def _compile(name: str, kernel, args: tuple) -> None:
    """Compile (or load from the cache) ``kernel`` for ``args`` by calling it on them (an epoch of
    no rows: nothing changes), then mark module ``name`` ready; a failure leaves it unready, and
    train_epoch keeps running the epochs (with a warning that says why)."""
    try:
        kernel(*args)
    except Exception as err:  # noqa: BLE001 - the halves are an optimisation: a failure means "not used"
        warnings.warn(f"symbp: the two-thread training step of {name} did not compile ({type(err).__name__}: "
                      f"{err}); training goes on with the one-thread step", RuntimeWarning, stacklevel=1)
        return
    _READY.add(name)


@atexit.register
def _finish_compiles() -> None:
    """At exit, wait for the background compiles still running.  Numba compiles through LLVM,
    whose objects the interpreter's teardown frees beneath a thread still optimizing with them:
    a script that ended its fit while the halves compiled died of an LLVM assertion (abort,
    exit status 134) instead of exiting."""
    for thread in list(_STARTED.values()):
        if thread.is_alive():
            thread.join()


def wait_for_halves(kernels, timeout: float | None = None) -> bool:
    """Wait for a training module's train_epoch_halves to be compiled (its background compile,
    if one started); whether it is ready."""
    thread = _STARTED.get(kernels.__name__)
    if thread is not None and thread.is_alive():
        thread.join(timeout)
    return kernels.__name__ in _READY
