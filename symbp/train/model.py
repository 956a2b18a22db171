"""A compiled model: parameters in NumPy arrays, the generated kernels, and the training loop."""

from __future__ import annotations

import math
from itertools import repeat
from operator import is_
from pathlib import Path

import numpy as np

from .. import cache, distributed
from ..backends.cpu.runtime import HostRun
from ..spec.network import Network
from .callbacks import Callback, ProgressBar
from .data import as_inputs, as_targets, check_batch_size, label_error, not_finite_error
from .optim import SGD, Optimizer
from .schedules import Schedule, check_monitor

_EVAL_CHUNK = 1024  # rows per evaluation pass: bounds the work buffers for large data sets


class History:
    """Per-epoch metrics of :meth:`Model.fit`: ``history["loss"]``, ``["accuracy"]``, and
    ``val_loss``/``val_accuracy`` when validation data is given.

    Every list has one entry per epoch in ``epoch``, in the same order (as Keras's, so
    ``pandas.DataFrame(h.history, index=h.epoch)`` lines them up): an epoch that did not
    measure a metric holds NaN there, e.g. ``val_loss`` of the epochs of a fit run without
    validation data.
    """

    def __init__(self) -> None:
        self.epoch: list[int] = []
        self.history: dict[str, list[float]] = {}
        #: a data-parallel fit's figures: processes, steps, seconds in Allreduce, seconds of epochs
        self.comm: dict | None = None

    def truncate(self, epoch: int) -> None:
        """Forget epochs from ``epoch`` on (a resumed run records them again)."""
        keep = [i for i, e in enumerate(self.epoch) if e < epoch]
        self.epoch = [self.epoch[i] for i in keep]
        # A list shorter than ``epoch`` (assigned by hand) is padded, never indexed past its end.
        self.history = {k: [v[i] if i < len(v) else math.nan for i in keep] for k, v in self.history.items()}

    def plot(self, path=None, title: str | None = None):
        """Loss and accuracy per epoch, train and validation (matplotlib).

        Saves a PNG to ``path`` when given; returns the figure.
        """
        from ..read.plots import plot_history

        return plot_history(self, path, title)

    def record(self, epoch: int, **metrics: float) -> None:
        """Add ``epoch`` with its ``metrics``; NaN for a metric known from other epochs but not
        measured in this one, and NaN in the earlier epochs for a metric new in this one."""
        for key in metrics:
            if key not in self.history:
                self.history[key] = [math.nan] * len(self.epoch)
        self.epoch.append(int(epoch))
        for key, values in self.history.items():
            values.append(float(metrics[key]) if key in metrics else math.nan)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __repr__(self) -> str:
        last = {k: round(v[-1], 4) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"

    def _repr_png_(self) -> bytes | None:
        """Jupyter's rich display: the curves as PNG; None (the repr then) without matplotlib."""
        from ..read.plots import history_png

        return history_png(self)


class Model:
    """A network compiled for a target; create with :func:`symbp.compile`.

    Attributes
    ----------
    params : dict of str to numpy.ndarray
        ``W1, b1, W2, b2, …``; ``W`` has shape (out, in) and a layer computes ``x @ W.T + b``.
    source_path : pathlib.Path
        The generated module the kernels come from.
    """

    #: Whether this target's fit takes multiclass labels as labels (its epoch kernel one-hot
    #: encodes a batch at a time) rather than as an (N, classes) array made up front.
    _LABELS = True

    def __init__(self, net: Network, module, path: Path, dtype: str, params: dict[str, np.ndarray]) -> None:
        self.network = net
        self.kernels = module
        self.source_path = path
        self.dtype = np.dtype(dtype)
        self.params = params
        self._buffers: dict[int, list[np.ndarray]] = {}
        self._sized_views: tuple = (None, {})  # (the buffers, {rows: their views}): see _sized
        # Fixed by the generated kernels; every call checks the params against them.
        self._param_shapes = tuple(net.param_shapes().values())
        # Training modules by optimizer kind, once loaded: a fit call does not re-read and
        # re-hash the file on disk (the code that runs is the code already imported).
        self._train_modules: dict[str, object] = {}
        self._derivation = None
        self.optimizer: Optimizer | None = None
        self.schedule: Schedule | None = None
        self.base_lr: float | None = None
        self.epoch = 0  # epochs completed
        self.history = History()  # every epoch so far, across fit calls and checkpoints
        self._writes = True  # False on the processes other than rank 0 of a data-parallel fit
        self._step = None  # train_on_batch's arrays, kept from call to call (see _OneStep)

    # -- plumbing ----------------------------------------------------------------------
    def _param_list(self) -> list[np.ndarray]:
        out = []
        for name, shape in zip(self.kernels.PARAMS, self._param_shapes):
            arr = self.params.get(name)
            if arr is None:
                raise ValueError(f"params[{name!r}] is missing: the model's parameters are {', '.join(self.kernels.PARAMS)}")
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != self.dtype or not arr.flags.c_contiguous:
                # A user may have assigned a list or a float64 array: bring it back in line.
                try:
                    arr = np.ascontiguousarray(arr, dtype=self.dtype)
                except (TypeError, ValueError):
                    raise TypeError(f"params[{name!r}] is not numeric") from None
                if arr.shape != shape:
                    raise ValueError(f"params[{name!r}] has shape {arr.shape}, expected {shape}")
                self.params[name] = arr
            out.append(arr)
        return out

    def _workspace(self, rows: int) -> list[np.ndarray]:
        """Work buffers sized for ``rows`` samples, reused across calls."""
        cap = max((c for c in self._buffers if c >= rows), default=None)
        if cap is None:
            self._buffers = {rows: [np.empty(tuple(rows if d == "batch" else d for d in shape), self.dtype)
                                    for _, shape in self.kernels.WORKSPACE]}
            cap = rows
        return self._buffers[cap]

    def _sized(self, rows: int) -> list[np.ndarray]:
        """The work buffers with their batch dimension cut to exactly ``rows`` (the views kept
        while the buffers are the same: a one-batch fit asks for them at every call)."""
        buffers = self._workspace(rows)
        kept = self._sized_views
        if kept[0] is not buffers:
            kept = self._sized_views = (buffers, {})
        views = kept[1].get(rows)
        if views is None:
            views = kept[1][rows] = [w[:rows] if shape[0] == "batch" else w
                                     for w, (_, shape) in zip(buffers, self.kernels.WORKSPACE)]
        return views

    def _data(self, X, y=None, what: str = "", labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """X and the targets checked, in the kernels' layout; ``labels``: multiclass labels
        stay labels (the CPU kernels one-hot encode a batch at a time, see
        :mod:`symbp.backends.cpu.targets`) instead of becoming an (N, classes) array."""
        net = self.network
        X = as_inputs(X, net.inputs, self.dtype, what=f"X{what}")
        T = None if y is None else as_targets(y, X.shape[0], net.output_shape, net.loss.task, self.dtype,
                                              what=f"y{what}", labels=labels)
        return X, T

    # -- public API --------------------------------------------------------------------
    @property
    def derivation(self):
        """The :class:`~symbp.derive.Derivation` the kernels were generated from."""
        if self._derivation is None:
            from ..derive import derive

            self._derivation = derive(self.network)
        return self._derivation

    def loss_and_grads(self, X, y) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss over the samples (plus the l2 term) and ∂loss/∂θ for every parameter.

        Returns the loss and a dict with the same keys as :attr:`params`.
        """
        X, T = self._data(X, y)
        ws = self._sized(X.shape[0])
        loss, _ = self.kernels.loss_and_grads(X, T, *self._param_list(), *ws)
        grads = {}
        for (name, _), buf in zip(self.kernels.WORKSPACE, ws):
            if self.kernels.ROLES[name] == "gradient":  # d<parameter>
                grads[name[1:]] = buf.copy()
        return float(loss), grads

    def decision_function(self, X) -> np.ndarray:
        """The network's raw outputs (logits), shape (N, outputs)."""
        X, _ = self._data(X)
        out = np.empty((X.shape[0], self.network.outputs), self.dtype)
        params = self._param_list()
        for start in range(0, X.shape[0], _EVAL_CHUNK):
            chunk = X[start : start + _EVAL_CHUNK]
            ws = [w for w, (name, _) in zip(self._sized(len(chunk)), self.kernels.WORKSPACE)
                  if self.kernels.ROLES[name] == "activation"]
            out[start : start + len(chunk)] = self.kernels.logits(chunk, *params, *ws)
        return out

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities: softmax of the logits, or σ for binary cross-entropy."""
        z = self.decision_function(X).astype(np.float64)
        task = self.network.loss.task
        if task == "multiclass":
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        if task == "binary":
            return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
        raise ValueError(f"predict_proba needs a classification loss, this model uses {self.network.loss.name!r}")

    def predict(self, X) -> np.ndarray:
        """Class labels for softmax cross-entropy, 0/1 per output for binary cross-entropy,
        the raw outputs for regression losses."""
        z = self.decision_function(X)
        task = self.network.loss.task
        if task == "multiclass":
            return z.argmax(axis=1)
        if task == "binary":
            out = (z > 0).astype(np.int64)
            return out[:, 0] if out.shape[1] == 1 else out
        return z

    def evaluate(self, X, y) -> tuple[float, float]:
        """(mean loss with the l2 term, accuracy) on a data set; accuracy is NaN for regression."""
        X, T = self._data(X, y, labels=True)
        params = self._param_list()
        ws = self._workspace(min(_EVAL_CHUNK, X.shape[0]))
        total, correct = self.kernels.evaluate(X, T, *params, *ws, min(_EVAL_CHUNK, X.shape[0]))
        loss = total / X.shape[0] + self.kernels.penalty(*params)
        return float(loss), self._accuracy(X.shape[0], correct)

    def _accuracy(self, rows: int, correct: int) -> float:
        """The kernels count correct rows (multiclass) or correct output units (binary)."""
        task = self.network.loss.task
        if task == "multiclass":
            return correct / rows
        if task == "binary":
            return correct / (rows * self.network.outputs)
        return float("nan")

    def score(self, X, y) -> float:
        """Accuracy for classifiers; the coefficient of determination R² for regression.

        R² is scikit-learn's ``r2_score`` with its defaults: per output, then the plain mean
        over outputs; an output whose targets are constant scores 1 if predicted exactly,
        else 0 (not −∞ or NaN).
        """
        task = self.network.loss.task
        if task in ("multiclass", "binary"):
            return self.evaluate(X, y)[1]
        X, T = self._data(X, y)
        pred = self.decision_function(X).astype(np.float64).reshape(len(X), -1)
        T = np.asarray(T, np.float64).reshape(len(X), -1)
        ss_res = ((T - pred) ** 2).sum(axis=0)
        ss_tot = ((T - T.mean(axis=0)) ** 2).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
        return float(r2.mean())

    def _train_kernels(self, opt: Optimizer):
        """The training module for ``opt``'s kind (generated on first use, then cached on
        disk and in this model)."""
        kind = opt.key()
        module = self._train_modules.get(kind)
        if module is None:
            module = self._train_modules[kind] = self._load_train_kernels(opt)
        return module

    def _load_train_kernels(self, opt: Optimizer):
        key = cache.module_key(self.network.fingerprint() + "|" + opt.key(), self.dtype.name, "cpu")
        slug = "".join(c if c.isalnum() else "-" for c in opt.name)
        path = self.source_path.parent / f"{self.network.name}-{self.dtype.name}-{slug}-{key}.py"

        def generate() -> str:
            from ..backends.cpu.module import generate_train_source

            return generate_train_source(self.derivation, self.dtype.name, opt, cache.module_name(self.source_path),
                                         self.kernels.WORKSPACE)

        return cache.load_or_generate(path, generate)

    def _state_list(self, opt: Optimizer) -> list[np.ndarray]:
        """The optimizer's state arrays in kernel order, created on first use."""
        out = []
        for pname, value in zip(self.kernels.PARAMS, self._param_list()):
            states = opt.state.setdefault(pname, {})
            for sname in opt.state_names:
                arr = states.get(sname)
                if arr is None:
                    arr = np.full(value.shape, opt.state_init(sname), self.dtype)
                elif arr.shape != value.shape or arr.dtype != self.dtype or not arr.flags.c_contiguous:
                    arr = np.ascontiguousarray(np.broadcast_to(arr, value.shape), dtype=self.dtype)
                states[sname] = arr
                out.append(arr)
        return out

    def fit(
        self,
        X,
        y,
        optimizer: Optimizer | None = None,
        batch_size: int = 32,
        epochs: int = 1,
        validation_data: tuple | None = None,
        shuffle: bool = True,
        seed: int | None = 0,
        progress: bool = True,
        initial_epoch: int = 0,
        schedule: Schedule | None = None,
        callbacks: list | tuple | None = (),
        comm=None,
        sharded: bool = False,
    ) -> History:
        """Train with mini-batches; returns the :class:`History` of the epochs run.

        Parameters
        ----------
        optimizer : Optimizer, optional
            ``sb.SGD``, ``sb.Adam``, …; by default the one this model last trained (or
            loaded) with, else ``SGD(lr=0.01)``.  Its update rule is fused into the
            generated backward pass; its state stays in ``optimizer.state``.
        epochs, initial_epoch : int
            Runs epochs ``initial_epoch … epochs − 1`` (Keras's meaning).  The shuffle order
            of an epoch depends only on ``seed`` and the epoch number, so saving after epoch
            3 and resuming with ``initial_epoch=3`` gives the weights of an unbroken run.
        schedule : Schedule, optional
            Sets the learning rate of each epoch from the optimizer's base rate.
        callbacks : list of Callback
            e.g. ``EarlyStopping``; called after each epoch, may stop training.
        comm : mpi4py communicator, optional
            Data-parallel training on every process of ``comm`` (``MPI.COMM_WORLD``; the
            ``mpi`` extra).  ``batch_size`` is the global batch: each process computes the
            gradient sums of its slice of every batch, one ``Allreduce`` sums them, every
            process applies the same update.  Every process starts from rank 0's parameters
            and optimizer state; the result equals a one-process fit with the same arguments
            (up to the order of floating-point sums) and the history is the same on every
            process.  Only rank 0 shows progress and writes ``ModelCheckpoint`` files.  An
            error on one process (bad data, a NaN, a failing callback) is raised on all, with
            the failing rank in its message.  ``history.comm`` then says the processes, steps
            and seconds spent in ``Allreduce``.  See :mod:`symbp.backends.cpu.distributed`.
        sharded : bool
            With ``comm``: each process passes only its own part of the data (and of the
            validation data) instead of the same arrays; each shuffles its part from the
            seed, epoch and rank, and every step takes its share of each part.  The batches
            then differ from a one-process run's, so the numbers do too.

        Raises
        ------
        FloatingPointError
            When a batch's loss is NaN or infinite, or the update of an epoch's last batch
            leaves a parameter or optimizer state that is, naming the epoch and batch; the
            parameters and optimizer state are put back as they were at the start of that epoch.
        """
        callbacks = () if callbacks is None else tuple(callbacks)
        if not isinstance(sharded, (bool, np.bool_)):
            raise ValueError(f"sharded must be True or False, got {sharded!r}")
        if sharded and comm is None:
            raise ValueError("sharded=True says each process passes its own part of the data: give the processes' "
                             "communicator too, fit(..., comm=MPI.COMM_WORLD, sharded=True)")
        comm = distributed.communicator(comm)
        raw = (getattr(X, "dtype", None), getattr(y, "dtype", None))
        with distributed.together(comm):  # a bad argument on one process stops every process
            opt, batch_size, X, T, val = self._fit_arguments(X, y, optimizer, schedule, batch_size, epochs,
                                                             initial_epoch, seed, validation_data, callbacks,
                                                             labels=comm is None and self._LABELS)
        rank = 0
        if comm is None:
            # The target's arrays for this call (host buffers, or everything uploaded to a
            # device): made before anything of the model changes, so a MemoryError leaves it.
            run = self._run(X, T, val, opt, batch_size)
        else:
            run, seed = self._distributed_run(comm, sharded, X, T, val, opt, batch_size, raw, seed,
                                              (epochs, initial_epoch, shuffle, schedule))
            rank = comm.Get_rank()
        n = run.n
        self._adopt(opt, schedule)
        history = History()
        self.history.truncate(initial_epoch)
        bar = _Progress(max(0, epochs - initial_epoch), progress and rank == 0)
        self._writes = rank == 0  # ModelCheckpoint writes on rank 0 only
        try:
            for epoch in range(initial_epoch, epochs):
                hyper = self._epoch_hyper(opt, epoch)
                order = None  # (the last epoch's order goes before the next is made)
                order = epoch_order(X.shape[0], shuffle, seed, epoch, rank if sharded else None)
                # Dropout's masks: from the seed and the epoch, as the order is (a network
                # without Dropout reads no seed: no generator made for it)
                masks = mask_seed(seed, epoch) if any(layer.random for layer in self.network.layers) else 0
                total, correct, done, bad = run.epoch(order, batch_size, hyper, opt.step, masks)
                # The kernel checks each batch's loss before that batch's update; the last
                # update of the epoch is checked here (no loss of this epoch would see it).
                if bad >= 0 or not run.finite():
                    run.restore()
                    raise FloatingPointError(diverged_message(epoch, bad, opt, -(-n // batch_size)))
                opt.step += done
                metrics = self._epoch_metrics(n, total, correct, run.validate, opt)
                if callbacks:
                    run.sync()  # a checkpoint saves the current optimizer state
                with run.together():  # a callback failing on one process stops them all
                    stop = self._finish_epoch(history, epoch, metrics, callbacks, bar)
                if run.agree_epoch(stop):
                    break
        finally:
            run.close()
            bar.close()
            self._writes = True
        for cb in callbacks:
            cb.on_train_end(self)
        history.comm = run.comm_stats()
        return history

    def train_on_batch(self, X, y, optimizer: Optimizer | None = None) -> float:
        """One training step on one batch (Keras's name); returns the batch's loss as the step
        computed it, before its update: the mean over the rows plus the l2 penalty.

        It is the step ``fit`` takes (the optimizer's update fused in; ``optimizer.step``
        counts it; BatchNorm's running statistics move; Dropout draws the masks of that step
        number), at the optimizer's current learning rate: no epoch is counted, no history
        recorded, no schedule applied.  The checks are ``fit``'s: bad X or y raise
        ``ValueError``; a loss that is NaN or infinite raises ``FloatingPointError`` before
        anything changes; an update that leaves a parameter or optimizer state NaN or infinite
        is undone, then raises ``FloatingPointError``.  On the CPU the whole step is one
        compiled call, its checks included: X and the labels are checked there, and the way
        back is kept there.  For a network of 65,536 parameter and state values or more, once
        every δ is computed the update's own formulas are bounded in interval arithmetic over
        the extents of the arrays they read; when that proves every new value finite (an
        ordinary step), nothing is copied (see ``symbp/backends/cpu/bounds.py``).  Otherwise,
        and for smaller networks, the parameters and state are copied just before the update
        into a buffer kept from call to call (no allocation, no Python per array) and checked
        after it.
        """
        opt = self._step_optimizer(optimizer)
        if type(self)._run is not Model._run:  # another target: its own runtime, one batch
            return self._train_on_batch_run(X, y, opt)
        step = self._step
        if step is None or step.opt is not opt or step.model is not self:  # (a copy of a model gets its own)
            step = self._step = _OneStep(self, opt)
        X, T = step.data(X, y)
        n = X.shape[0]
        if step.needs_rows:
            self._check_batch_statistics(n, n)
        loss, _, pen, status, where = step.kernels.train_batch(
            X, T, step.hyper(), opt.step, step.seed(), *step.arrays(n), step.keep)
        if status:
            raise _step_error(status, where, X.shape[1], opt)
        opt.step += 1
        return (float(loss) + float(pen) * n) / n  # as fit counts an epoch's loss

    def _check_trainable(self, optimizer) -> None:
        """A model with parameters, and ``optimizer`` None or a symbp optimizer (fit, train_on_batch)."""
        if not self.params:
            raise ValueError(f"{self.network.name} has no parameters to train (its layers are "
                             f"{', '.join(layer.kind for layer in self.network.layers)}): it is a fixed "
                             "function; use predict() or decision_function()")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a symbp optimizer such as sb.SGD(lr=0.1), got {type(optimizer).__name__}")

    def _step_optimizer(self, optimizer) -> Optimizer:
        """train_on_batch's optimizer (checked as fit checks it), made the model's."""
        self._check_trainable(optimizer)
        opt = optimizer or self.optimizer or SGD(lr=0.01)
        if opt is not self.optimizer:
            self._adopt(opt, None)
        return opt

    def _train_on_batch_run(self, X, y, opt: Optimizer) -> float:
        """train_on_batch through a target's runtime (one epoch of one batch), with fit's
        start-of-epoch snapshot for the way back."""
        X, T = self._data(X, y)
        n = X.shape[0]
        self._check_batch_statistics(n, n)
        run = self._run(X, T, None, opt, n)
        try:
            total, _, done, bad = run.epoch(np.arange(n), n, list(opt.hyper.values()), opt.step,
                                            mask_seed(0, self.epoch))
            if bad >= 0 or not run.finite():
                run.restore()
                raise _step_error(2 if bad >= 0 else 3, -1, X.shape[1], opt)
            opt.step += done
        finally:
            run.close()
        return float(total) / n

    def _distributed_run(self, comm, sharded, X, T, val, opt, batch_size, raw, seed, settings):
        """A data-parallel fit's runtime, once every process is known to have been given data
        of the same kind and the same settings; every process then holds rank 0's
        parameters, optimizer state and seed.  Returns (runtime, seed)."""
        from ..backends.cpu.distributed import DistributedRun

        if type(self)._run is not Model._run:
            with distributed.together(comm):
                raise NotImplementedError(f"data-parallel training (comm=) runs on the CPU target; "
                                          f"{type(self).__name__} is not one")
        facts = {
            "network": self.network.fingerprint(), "dtype": self.dtype.name, "optimizer": repr(opt),
            "batch_size": batch_size, "epochs, initial_epoch, shuffle": settings[:3],
            "schedule": repr(settings[3] or self.schedule), "sharded": sharded,
            "input shape": X.shape[1:], "target shape": T.shape[1:],
            "X dtype": str(raw[0]), "y dtype": str(raw[1]),
            "validation data": None if val is None else (val[0].shape[1:], val[1].shape[1:]),
        }
        if not sharded:  # the same arrays on every process: the same rows, the same values
            facts["rows"] = X.shape[0]
            facts["data (a hash of 64 rows)"] = distributed.sample_fingerprint(X, T)
            if val is not None:
                facts["validation data"] = distributed.sample_fingerprint(*val)
        distributed.check_same(comm, facts)
        counts = comm.allgather(X.shape[0])
        if seed is None:  # every process must draw the same shuffles: rank 0's fresh seed
            seed = comm.bcast(int(np.random.SeedSequence().entropy % (1 << 63)) if comm.Get_rank() == 0 else None)
        with distributed.together(comm):
            run = DistributedRun(self, X, T, val, opt, batch_size, comm, sharded, counts)
        # Rank 0's parameters and optimizer state on every process (as DDP does), in place.
        for arr in self._param_list() + self._state_list(opt):
            comm.Bcast(arr, root=0)
        opt.step = comm.bcast(opt.step)
        run.share_memory()
        return run, seed

    def _run(self, X, T, val, opt, batch_size):
        """This target's runtime for one fit call (see :mod:`symbp.backends.cpu.runtime`)."""
        return HostRun(self, X, T, val, opt, batch_size)

    # -- what every target's fit shares ------------------------------------------------------
    def _fit_arguments(self, X, y, optimizer, schedule, batch_size, epochs, initial_epoch, seed, validation_data,
                       callbacks=(), labels: bool = False):
        """Check fit's arguments without changing the model: (optimizer, batch size, X, T, validation);
        ``labels``: multiclass labels stay labels (see :meth:`_data`)."""
        self._check_trainable(optimizer)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a symbp schedule such as sb.StepDecay(10), got {type(schedule).__name__}")
        batch_size = check_batch_size(batch_size)
        for name, value in (("epochs", epochs), ("initial_epoch", initial_epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a whole number >= 0 or None, got {seed!r}")
        X, T = self._data(X, y, labels=labels)
        self._check_batch_statistics(len(X), batch_size)
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            val = self._data(*validation_data, what="_val", labels=labels)
        for cb in callbacks:
            if not isinstance(cb, Callback) and not all(callable(getattr(cb, m, None))
                                                        for m in ("on_epoch_end", "on_train_end")):
                raise TypeError(f"callbacks must be symbp callbacks such as sb.EarlyStopping(), got {cb!r}")
        # A schedule or callback watching a metric this fit will not record is refused now,
        # not after an epoch has already changed the parameters.
        recorded = self._metric_names(val is not None)
        for watcher in (schedule or self.schedule, *callbacks):
            if getattr(watcher, "monitor", None) is not None:
                check_monitor(watcher, recorded)
        return optimizer or self.optimizer or SGD(lr=0.01), batch_size, X, T, val

    def _check_batch_statistics(self, rows: int, batch_size: int) -> None:
        """A BatchNorm layer needs two or more values per feature in every training batch (its
        running variance is unbiased: ·count/(count − 1)), as PyTorch's does."""
        net = self.network
        sizes = {min(batch_size, rows), rows % batch_size or min(batch_size, rows)}
        for pos, layer in enumerate(net.layers, 1):
            if not layer.running_keys:
                continue
            per_row = math.prod(net.in_shape(pos)[1:])  # H·W values per channel of an image, 1 per feature
            if min(sizes) * per_row < 2:
                raise ValueError(f"layer {pos} ({layer!r}) needs at least 2 values per feature in every training "
                                 f"batch, but {rows} rows in batches of {batch_size} leave a batch of "
                                 f"{min(sizes)} row: choose a batch size that leaves no single row")

    def _adopt(self, opt: Optimizer, schedule: Schedule | None) -> None:
        """Make ``opt`` (and ``schedule``) the model's; a new optimizer's rate is the base rate."""
        if opt is not self.optimizer or self.base_lr is None:
            self.base_lr = opt.lr
        self.optimizer = opt
        if schedule is not None:
            self.schedule = schedule

    def _epoch_hyper(self, opt: Optimizer, epoch: int) -> list[float]:
        """The hyper-parameters of ``epoch``, the schedule's learning rate included."""
        if self.schedule is not None:
            opt.hyper["lr"] = self.schedule.lr(epoch, self.base_lr)
        return list(opt.hyper.values())

    def _metric_names(self, validating: bool) -> list[str]:
        """What each epoch of a fit records, in order (schedules and callbacks may watch these)."""
        classes = self.network.loss.task != "regression"
        return ["loss"] + ["accuracy"] * classes + (["val_loss"] + ["val_accuracy"] * classes) * validating + ["lr"]

    def _epoch_metrics(self, n: int, total: float, correct: int, validate, opt: Optimizer) -> dict:
        values = {"loss": float(total) / n, "accuracy": self._accuracy(n, correct), "lr": opt.lr}
        if validate is not None:
            values["val_loss"], values["val_accuracy"] = validate()
        return {name: values[name] for name in self._metric_names(validate is not None)}

    def _finish_epoch(self, history: History, epoch: int, metrics: dict, callbacks, bar) -> bool:
        """Record the epoch, step the schedule, run the callbacks; True when one says stop."""
        history.record(epoch, **metrics)
        self.history.record(epoch, **metrics)
        self.epoch = epoch + 1
        if self.schedule is not None:
            self.schedule.observe(epoch, metrics)
        stop = False
        for cb in callbacks:
            stop = cb.on_epoch_end(self, epoch, metrics) or stop
        bar.epoch_done(metrics)
        return stop

    def save(self, path) -> Path:
        """Write a checkpoint (see :mod:`symbp.train.checkpoint`); returns its path."""
        from . import checkpoint

        return checkpoint.save(self, path)

    def __repr__(self) -> str:
        return f"Model({self.network!r}, dtype={self.dtype.name}, source={self.source_path.name})"

    def summary(self) -> str:
        """Layers, output shapes and parameters, the generated module's path and the training
        so far, as Keras's ``summary()`` lists them; text that shows as itself at a prompt."""
        from ..read.summary import summary_text

        return summary_text(self)

    def _repr_html_(self) -> str:
        """Jupyter's rich display: :meth:`summary` as an HTML table."""
        from ..read.summary import summary_html

        return summary_html(self)

    def to_onnx(self, path, opset: int = 17, dtype: str = "float32") -> Path:
        """Write this model as ONNX (the ``onnx`` extra): input ``X`` (N, *input_shape), output
        ``logits`` as :meth:`decision_function` gives them; returns the path.
        See :mod:`symbp.interop.onnx_export`."""
        from ..interop.onnx_export import to_onnx

        return to_onnx(self, path, opset=opset, dtype=dtype)

    def to_torch(self):
        """A PyTorch ``nn.Sequential`` with copies of this model's weights, computing
        :meth:`decision_function`.  See :mod:`symbp.interop.torch_weights`."""
        from ..interop.torch_weights import to_torch

        return to_torch(self)


def epoch_order(n: int, shuffle: bool, seed: int | None, epoch: int, rank: int | None = None) -> np.ndarray:
    """The row order of an epoch: a function of the seed and the epoch number only, so a
    resumed run (and every target, and every process count) visits the same batches.  A
    process of a sharded run orders its own rows by its ``rank`` too.

    The order is NumPy's ``default_rng(key).permutation(n)``, held in int32 where n allows:
    half the memory of permutation's int64 (the same draws shuffle an arange of either)."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    if shuffle:
        key = [seed, epoch] if rank is None else [seed, epoch, rank]
        np.random.default_rng(key if seed is not None else None).shuffle(order)
    return order


def mask_seed(seed: int | None, epoch: int) -> int:
    """The seed of an epoch's Dropout masks: a function of the fit's seed and the epoch only,
    so a resumed fit draws the masks an uninterrupted one would (None: a fresh draw)."""
    return int(np.random.default_rng(None if seed is None else [seed, epoch, 1]).integers(2**40))


def diverged_message(epoch: int, bad: int, opt: Optimizer, batches: int) -> str:
    """Why fit stopped: batch ``bad``'s loss was not finite, or (``bad`` < 0) the update of the
    epoch's last batch (of ``batches``) left a parameter or optimizer state that is not (no
    later loss of the epoch sees it)."""
    what = (f"the loss became NaN or infinite in epoch {epoch} (0-based), batch {bad}" if bad >= 0 else
            f"the update of batch {batches - 1}, the last of epoch {epoch} (0-based), left parameters or "
            f"optimizer state NaN or infinite")
    return (f"{what}; training stopped. The parameters and optimizer state are restored to the start of that "
            f"epoch, the last point where every loss and parameter was finite. Try a smaller learning rate "
            f"(lr={opt.lr:g}); a custom formula used outside its domain (log or sqrt of a negative number) or "
            f"values too large for the model's dtype do the same.")


def _step_error(status: int, where: int, width: int, opt: Optimizer) -> Exception:
    """What a failed train_on_batch raises (``status`` as the generated train_batch returns it)."""
    if status == 1:
        return not_finite_error("X", where // width, where % width)
    if status == 4:  # (a runtime error: the step was given buffers of other rows)
        return RuntimeError("train_batch was given work buffers whose rows are not the batch's")
    what = ("the loss of this batch is NaN or infinite: the update was not made" if status == 2 else
            "the update left parameters or optimizer state NaN or infinite: it was undone")
    return FloatingPointError(f"{what}, and the model is as it was before this call. Try a smaller learning "
                              f"rate (lr={opt.lr:g}); a custom formula used outside its domain or values too "
                              "large for the model's dtype do the same.")


def _state_of(state: dict, key: tuple[str, str]):
    """An optimizer state array by (parameter, state name), or None."""
    return state.get(key[0], {}).get(key[1])


class _OneStep:
    """What :meth:`Model.train_on_batch` keeps between calls for one optimizer: the training
    module, the argument lists (checked again each call by identity only: a parameter or
    state array the user replaced is picked up), the flat buffer the step stashes parameters
    and state in, the targets buffer labels are one-hot encoded into, the hyper-parameters."""

    def __init__(self, model: Model, opt: Optimizer) -> None:
        self.model, self.opt = model, opt
        self.kernels = model._train_kernels(opt)
        net = model.network
        self.needs_rows = any(layer.running_keys for layer in net.layers)
        self.labels = net.loss.task == "multiclass"
        self.width = int(np.prod(net.inputs)) if isinstance(net.inputs, tuple) else net.inputs
        self._keep_for = self._rows = self._buffers = None
        self._params = self._states = self._args = ()
        self._hyper_key, self._hyper = None, None
        self._seed_epoch, self._seed = None, 0
        self._T = np.empty((0, net.outputs), model.dtype)
        self._state_keys = [(p, s_) for p in model.kernels.PARAMS for s_ in opt.state_names]
        from ..backends.cpu.guard import one_hot  # (numba: imported with the first step, not with symbp)

        self._one_hot = one_hot

    def data(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """X and T for the kernel: an X already in the kernels' layout is taken as it is (the
        kernel checks it for NaN/inf); integer labels are one-hot encoded in compiled code."""
        model = self.model
        if not (type(X) is np.ndarray and X.ndim == 2 and X.dtype == model.dtype and X.shape[1] == self.width
                and X.shape[0] > 0 and X.flags.c_contiguous):
            X = as_inputs(X, model.network.inputs, model.dtype)
        n = X.shape[0]
        if self.labels and type(y) is np.ndarray and y.ndim == 1 and y.dtype.kind in "iu" and y.shape[0] == n:
            if self._T.shape[0] < n:
                self._T = np.empty((n, self._T.shape[1]), model.dtype)
            T = self._T[:n]
            bad = self._one_hot(y, T)
            if bad >= 0:
                raise label_error(y[bad], T.shape[1])
            return X, T
        return X, as_targets(y, n, model.network.output_shape, model.network.loss.task, model.dtype)

    def arrays(self, rows: int) -> list[np.ndarray]:
        """Parameters, work buffers, optimizer state, in the kernel's order: the last call's
        list while every parameter and state array is still the one it holds."""
        model, opt = self.model, self.opt
        if (rows == self._rows and self._buffers is model._buffers
                and all(map(is_, map(model.params.get, model.kernels.PARAMS), self._params))
                and all(map(is_, map(_state_of, repeat(opt.state), self._state_keys), self._states))):
            return self._args
        params, states = model._param_list(), model._state_list(opt)
        size = sum(a.size for a in params + states)
        if self._keep_for != size:
            self.keep, self._keep_for = np.empty(size, model.dtype), size
        ws = model._sized(rows)  # (fit may have made larger ones since: a new dict)
        self._params, self._states, self._rows, self._buffers = params, states, rows, model._buffers
        self._args = [*params, *ws, *states]
        return self._args

    def hyper(self) -> np.ndarray:
        key = tuple(self.opt.hyper.values())
        if key != self._hyper_key:
            self._hyper_key, self._hyper = key, np.array(key, self.model.dtype)
        return self._hyper

    def seed(self) -> int:
        """Dropout's seed: the epoch's, as fit draws it (the step number varies the masks)."""
        if self._seed_epoch != self.model.epoch:
            self._seed_epoch, self._seed = self.model.epoch, mask_seed(0, self.model.epoch)
        return self._seed


class _Progress:
    """The epochs bar of ``fit(progress=True)``, opened once the first epoch is done: that
    epoch JIT-compiles the training kernels (a cold run's seconds), and a bar from the start
    would project that time onto every epoch left.  The metrics are written short
    (:meth:`ProgressBar.describe`) so an 80-column terminal shows the validation figures."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = epochs, bool(enabled) and epochs > 0, None

    def epoch_done(self, metrics: dict) -> None:
        if not self.enabled:
            return
        text = ProgressBar.describe(metrics)
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=1, unit="epoch", leave=True, bar_format=ProgressBar.FORMAT)
            self.bar.set_postfix_str(text)
        else:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
