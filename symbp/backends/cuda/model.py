"""The CUDA target: a :class:`~symbp.train.model.Model` whose parameters, optimizer state and
batches live on the GPU, run by the kernels of :mod:`symbp.backends.cuda.module`.

``sb.compile(net, target="cuda")`` lands here (:func:`compile_cuda`).  The API is the CPU
model's.  What differs:

* ``params`` reads copy the parameters back to the host; assigning the whole dict, or one
  entry (``model.params["W1"] = w``), uploads.  Editing a returned array in place does not
  reach the device.
* ``fit`` uploads X and y once, then per epoch only the shuffled row order; every batch is
  gathered, trained and tallied on the device.  The host reads back one small status array
  per epoch (and the validation metrics, when asked).  The optimizer's state is copied back
  into ``optimizer.state`` when ``fit`` returns (and before callbacks run), so checkpoints
  and a later CPU model see it.
* Out of device memory is a ``MemoryError`` saying what did not fit, raised before anything
  changed; a batch beyond the kernels' launch limits is a ``ValueError``.

It runs on Numba's CUDA simulator as well (``NUMBA_ENABLE_CUDASIM=1`` set before Numba is
imported): slowly, one Python thread per CUDA thread, but the same kernels.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ... import cache
from ...spec.network import Network
from ...train.model import _EVAL_CHUNK, Model
from ...train.optim import Optimizer
from ..cpu.runtime import OneProcess, all_finite
from .module import EPOCH_SLOTS, CudaConfig, generate_cuda_source

#: A small launch geometry for the simulator, where every CUDA thread is a Python thread.
SIMULATOR_CONFIG = CudaConfig(threads=8, max_blocks=2, cols=4, tile=4, tile_k=4, micro=2)


def simulated() -> bool:
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` at import)."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def require_cuda():
    """``numba.cuda``, or an error saying what is missing: the package or a usable GPU."""
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("target='cuda' needs the numba-cuda package, which is not installed: "
                          "pip install 'symbp[cuda]' (numba-cuda[cu12]).")
    from numba import cuda

    if not cuda.is_available():
        raise ValueError("target='cuda': numba-cuda is installed but no CUDA GPU can be used here "
                         "(numba.cuda.is_available() is False: no device, or no driver). "
                         "To run on Numba's CUDA simulator instead, set NUMBA_ENABLE_CUDASIM=1 before importing numba.")
    return cuda


def device_limits() -> dict:
    """The current device's compute capability and the limits the generated kernels need."""
    from numba import cuda

    dev = cuda.get_current_device()
    return {"cc": tuple(dev.compute_capability), "threads": dev.MAX_THREADS_PER_BLOCK,
            "shared": dev.MAX_SHARED_MEMORY_PER_BLOCK, "name": dev.name}


def _check_device(dtype: str, config: CudaConfig) -> None:
    """Refuse what the device cannot run, before generating anything."""
    if simulated():
        return  # the simulator runs any dtype and geometry
    lim = device_limits()
    name = lim["name"].decode() if isinstance(lim["name"], bytes) else lim["name"]
    if dtype == "float64" and lim["cc"] < (6, 0):
        raise ValueError(f"dtype='float64' needs compute capability 6.0 or newer (atomic adds on doubles); "
                         f"{name} has {lim['cc'][0]}.{lim['cc'][1]}: use dtype='float32'")
    for what, need, have in (("threads per block", max(config.threads, (config.tile // config.micro) ** 2), lim["threads"]),
                             ("bytes of shared memory per block", config.shared_bytes(np.dtype(dtype).itemsize),
                              lim["shared"])):
        if need > have:
            raise ValueError(f"the CUDA launch geometry {config} needs {need} {what}; {name} allows {have}")


def _resolve_gemm(config: CudaConfig) -> CudaConfig:
    from dataclasses import replace

    have_cupy = importlib.util.find_spec("cupy") is not None
    if config.gemm == "auto":
        return replace(config, gemm="cublas" if have_cupy and not simulated() else "kernel")
    if config.gemm == "cublas":
        if not have_cupy:
            raise ImportError("CudaConfig(gemm='cublas') needs CuPy (pip install cupy-cuda12x)")
        if simulated():
            raise ValueError("CudaConfig(gemm='cublas') needs a real GPU: cuBLAS does not run on the CUDA simulator")
    return config


def compile_cuda(
    net: Network,
    dtype: str = "float32",
    seed: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
    config: CudaConfig | None = None,
) -> CudaModel:
    """Generate (or reuse) the CUDA kernels for ``net`` and return a :class:`CudaModel`.

    ``sb.compile(net, target="cuda", …)`` calls this; ``config`` (the launch geometry and the
    GEMM choice) defaults to :class:`~symbp.backends.cuda.module.CudaConfig`'s defaults on a GPU and to
    :data:`SIMULATOR_CONFIG` on the simulator.

    Raises
    ------
    ImportError
        numba-cuda is not installed (or CuPy, for ``gemm="cublas"``).
    ValueError
        No usable GPU and no simulator; or a dtype or launch geometry the device cannot run.
    """
    if not isinstance(net, Network):
        raise TypeError(f"compile() takes a symbp.Network, got {type(net).__name__}")
    if dtype not in ("float32", "float64") and np.dtype(dtype).name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64' on the CUDA target, got {dtype!r}")
    dtype = np.dtype(dtype).name
    require_cuda()
    if config is None:
        config = SIMULATOR_CONFIG if simulated() else CudaConfig()
    if not isinstance(config, CudaConfig):
        raise TypeError(f"config must be a symbp.backends.cuda.module.CudaConfig, got {type(config).__name__}")
    config = _resolve_gemm(config)
    _check_device(dtype, config)
    module, path, derivation = cache.model_module(net, dtype, "cuda", cache_dir,
                                                  lambda d: generate_cuda_source(d, dtype, config),
                                                  key_extra=f"|{config.key()}", tag="-cuda")
    model = CudaModel(net, module, path, dtype, net.init_params(seed, np.dtype(dtype)), config)
    if derivation is not None:
        model._derivation = derivation
    return model


_UNCHANGED = ("Nothing was changed: your host arrays, the model's parameters and the optimizer's state are as "
              "they were; try a smaller batch_size or less data per call.")


def _c_array(value, dtype) -> np.ndarray:
    """``value`` as a C-ordered array with the plain strides of its shape.  NumPy calls an
    array with a zero stride on a length-1 axis contiguous (``np.broadcast_to`` makes those);
    Numba's device copies drop such axes, so they would not fit the device array."""
    arr = np.ascontiguousarray(value, dtype=dtype)
    return arr if all(st for st in arr.strides) or arr.size == 0 else arr.copy()


def _is_oom(err: BaseException) -> bool:
    code = getattr(err, "code", None)
    text = f"{code} {err}".upper()
    return "OUT_OF_MEMORY" in text or "OUT OF MEMORY" in text or str(code) == "2"


class _HostParams(dict):
    """Host copies of a CUDA model's parameters; assigning an entry uploads it."""

    def __init__(self, model: CudaModel, arrays: dict) -> None:
        super().__init__(arrays)
        self._model = model

    def __setitem__(self, name: str, value) -> None:
        self._model._set_param(name, value)
        super().__setitem__(name, self._model._device_params[name].copy_to_host())


class CudaModel(Model):
    """A network compiled for the CUDA target; create with ``sb.compile(net, target="cuda")``.

    The API is :class:`~symbp.train.model.Model`'s; see :mod:`symbp.backends.cuda.model` for what differs.

    Attributes
    ----------
    params : dict of str to numpy.ndarray
        Host copies, made on each read; assign the dict or an entry to change them.
    config : CudaConfig
        The launch geometry the kernels were generated for.
    """

    _LABELS = False  # the device kernels read (N, classes) targets

    def __init__(self, net: Network, module, path: Path, dtype: str, params: dict, config: CudaConfig) -> None:
        from numba import cuda

        self._cuda = cuda
        self.config = config
        self._device_params: dict = {}
        self._device_buffers: dict[int, list] = {}
        self._stats = None
        super().__init__(net, module, path, dtype, params)

    # -- device memory -----------------------------------------------------------------
    def _free_memory(self) -> float:
        try:
            return float(self._cuda.current_context().get_memory_info()[0])
        except Exception:  # noqa: BLE001 - unknown: let the allocation itself decide
            return math.inf

    def _require_memory(self, nbytes: int, what: str) -> None:
        free = self._free_memory()
        if nbytes > free:
            raise MemoryError(f"the GPU is out of memory: {what} needs {nbytes} bytes ({nbytes / 2**20:.1f} MiB), "
                              f"{free / 2**20:.1f} MiB are free. {_UNCHANGED}")

    def _device(self, make, what: str, nbytes: int):
        """Run an allocation or upload of ``nbytes``; out of memory becomes a MemoryError naming
        ``what`` and the bytes asked for."""
        try:
            return make()
        except Exception as err:
            if type(err).__name__ == "CudaAPIError" and _is_oom(err):
                raise MemoryError(f"the GPU is out of memory allocating {what}: {nbytes} bytes "
                                  f"({nbytes / 2**20:.1f} MiB) were asked for. {_UNCHANGED}") from err
            raise

    def _upload(self, host: np.ndarray, what: str):
        return self._device(lambda: self._cuda.to_device(host), what, host.nbytes)

    def _empty(self, shape: tuple, dtype, what: str):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        return self._device(lambda: self._cuda.device_array(shape, dtype), what, nbytes)

    # -- parameters --------------------------------------------------------------------
    @property
    def params(self) -> dict[str, np.ndarray]:
        """Host copies of the parameters (``W1, b1, …``), copied back from the device on each read."""
        return _HostParams(self, {name: arr.copy_to_host() for name, arr in self._device_params.items()})

    @params.setter
    def params(self, values: Mapping) -> None:
        if not isinstance(values, Mapping):
            raise TypeError(f"params must be a dict of arrays, got {type(values).__name__}")
        missing = [name for name in self.kernels.PARAMS if name not in values]
        if missing:
            raise ValueError(f"params lacks {missing[0]!r} (the model has {', '.join(self.kernels.PARAMS)})")
        host = {name: self._checked(name, values[name]) for name in self.kernels.PARAMS}
        if not self._device_params:
            nbytes = sum(a.nbytes for a in host.values())
            self._require_memory(nbytes, "the parameters")
            self._device_params = {name: self._upload(a, f"parameter {name}") for name, a in host.items()}
        else:
            for name, arr in host.items():
                self._device_params[name].copy_to_device(arr)

    def _set_param(self, name: str, value) -> None:
        if name not in self._device_params:
            raise KeyError(f"no parameter {name!r} (the model has {', '.join(self.kernels.PARAMS)})")
        self._device_params[name].copy_to_device(self._checked(name, value))

    def _checked(self, name: str, value) -> np.ndarray:
        shape = self.network.param_shapes()[name]
        try:
            arr = _c_array(value, self.dtype)
        except (TypeError, ValueError):
            raise TypeError(f"params[{name!r}] is not numeric") from None
        if arr.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {arr.shape}, expected {shape}")
        return arr

    def _param_list(self) -> list:
        return [self._device_params[name] for name in self.kernels.PARAMS]

    # -- work buffers ------------------------------------------------------------------
    def _check_launch(self, rows: int) -> None:
        """A batch whose GEMM grid CUDA cannot launch is refused before any kernel runs.  Only
        the batch varies: every GEMM's columns (the grid's y axis) were checked when the
        kernels were generated."""
        k = self.kernels
        max_x = k.MAX_GRID[0]
        if -(-rows // k.TILE) > max_x:
            raise ValueError(f"a batch of {rows} rows needs {-(-rows // k.TILE)} GEMM blocks along the grid's x axis; "
                             f"CUDA allows {max_x}: use a smaller batch_size")

    def _buffer_shapes(self, rows: int) -> list[tuple[str, tuple]]:
        return [(name, tuple(rows if d == "batch" else d for d in shape)) for name, shape in self.kernels.WORKSPACE]

    def _buffer_bytes(self, rows: int) -> int:
        return sum(math.prod(shape) for _, shape in self._buffer_shapes(rows)) * self.dtype.itemsize

    def _workspace(self, rows: int) -> list:
        """Device work buffers for up to ``rows`` samples, reused across calls."""
        cap = max((c for c in self._device_buffers if c >= rows), default=None)
        if cap is None:
            self._check_launch(rows)
            self._require_memory(self._buffer_bytes(rows), f"work buffers for {rows} samples")
            self._device_buffers = {}  # let the old ones go first
            self._device_buffers[rows] = [self._empty(shape, self.dtype, f"work buffer {name} for {rows} samples")
                                          for name, shape in self._buffer_shapes(rows)]
            cap = rows
        return self._device_buffers[cap]

    def _named(self, ws: list) -> dict:
        return {name: buf for (name, _), buf in zip(self.kernels.WORKSPACE, ws)}

    def _fresh_stats(self):
        zeros = np.zeros(len(self.kernels.STATS))
        if self._stats is None:
            self._stats = self._upload(zeros, "the loss accumulators")
        else:
            self._stats.copy_to_device(zeros)
        return self._stats

    def _upload_data(self, X: np.ndarray, T: np.ndarray | None, what: str = ""):
        nbytes = X.nbytes + (0 if T is None else T.nbytes)
        self._require_memory(nbytes, f"the data X{what}" + ("" if T is None else f", y{what}"))
        return self._upload(X, f"X{what}"), None if T is None else self._upload(T, f"y{what}")

    # -- public API --------------------------------------------------------------------
    def loss_and_grads(self, X, y) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss over the samples (plus the l2 term) and ∂loss/∂θ for every parameter,
        computed on the device in one batch; returns host arrays keyed like :attr:`params`."""
        X, T = self._data(X, y)
        nb = X.shape[0]
        ws = self._workspace(nb)
        dX, dT = self._upload_data(X, T)
        stats = self._fresh_stats()
        self.kernels.loss_and_grads(nb, dX, dT, *self._param_list(), *ws, stats)
        s = stats.copy_to_host()
        k = self.kernels
        grads = {name[1:]: buf.copy_to_host() for name, buf in self._named(ws).items() if k.ROLES[name] == "gradient"}
        return float(s[k.S_TOTAL] / nb + s[k.S_PENALTY]), grads

    def decision_function(self, X) -> np.ndarray:
        """The network's raw outputs (logits), shape (N, outputs)."""
        X, _ = self._data(X)
        n = X.shape[0]
        chunk = min(_EVAL_CHUNK, n)
        named = self._named(self._workspace(chunk))
        dX, _ = self._upload_data(X, None)
        acts = [named[a] for a in self.kernels.ACTS]
        out = np.empty((n, self.network.outputs), self.dtype)
        for start in range(0, n, chunk):
            nb = min(chunk, n - start)
            self.kernels.forward(nb, dX[start:start + nb], *self._param_list(), *acts)
            out[start:start + nb] = named[self.kernels.LAST][:nb].copy_to_host()
        return out

    def evaluate(self, X, y) -> tuple[float, float]:
        """(mean loss with the l2 term, accuracy) on a data set; accuracy is NaN for regression."""
        X, T = self._data(X, y)
        dX, dT = self._upload_data(X, T)
        return self._evaluate_device(dX, dT)

    def _evaluate_device(self, dX, dT, chunk: int | None = None) -> tuple[float, float]:
        """Evaluate device-resident data in chunks of ``chunk`` rows (default: up to
        _EVAL_CHUNK), through the work buffers and the model's own ``stats``."""
        k = self.kernels
        n = dX.shape[0]
        chunk = min(chunk or _EVAL_CHUNK, n)
        named = self._named(self._workspace(chunk))
        acts, out, last_delta = [named[a] for a in k.ACTS], [named[o] for o in k.OUT], named[k.DELTA_L]
        P = self._param_list()
        stats = self._fresh_stats()
        for start in range(0, n, chunk):
            nb = min(chunk, n - start)
            k.forward(nb, dX[start:start + nb], *P, *acts)
            k.loss_rows(nb, *out, dT[start:start + nb], last_delta, stats)
        k.penalty(*P, stats)
        s = stats.copy_to_host()
        return float(s[k.S_TOTAL] / n + s[k.S_PENALTY]), self._accuracy(n, s[k.S_CORRECT])

    # -- training ----------------------------------------------------------------------
    def _load_train_kernels(self, opt: Optimizer):
        """The CUDA training module for ``opt``'s kind (generated on first use, then cached)."""
        key = cache.module_key(f"{self.network.fingerprint()}|{opt.key()}|{self.config.key()}",
                               self.dtype.name, "cuda")
        slug = "".join(c if c.isalnum() else "-" for c in opt.name)
        path = self.source_path.parent / f"{self.network.name}-{self.dtype.name}-cuda-{slug}-{key}.py"

        def generate() -> str:
            from .module import generate_cuda_train_source

            return generate_cuda_train_source(self.derivation, self.dtype.name, self.config, opt,
                                              cache.module_name(self.source_path))

        return cache.load_or_generate(path, generate, "cuda")

    def _host_states(self, opt: Optimizer) -> list[np.ndarray]:
        """The optimizer's state in kernel order as host arrays, created on first use."""
        out = []
        for pname in self.kernels.PARAMS:
            shape = self.network.param_shapes()[pname]
            states = opt.state.get(pname, {})
            for sname in opt.state_names:
                arr = states.get(sname)
                if arr is None:
                    arr = np.full(shape, opt.state_init(sname), self.dtype)
                else:
                    arr = _c_array(np.broadcast_to(arr, shape), self.dtype)
                out.append(arr)
        return out

    def _download_states(self, opt: Optimizer, device_states: list) -> None:
        pairs = [(p, s) for p in self.kernels.PARAMS for s in opt.state_names]
        for (pname, sname), arr in zip(pairs, device_states):
            opt.state.setdefault(pname, {})[sname] = arr.copy_to_host()

    def _run(self, X, T, val, opt, batch_size) -> DeviceRun:
        """The device's runtime for one fit call: everything uploaded, or a MemoryError first."""
        return DeviceRun(self, X, T, val, opt, batch_size)

    def __repr__(self) -> str:
        return f"CudaModel({self.network!r}, dtype={self.dtype.name}, source={self.source_path.name})"


class DeviceRun(OneProcess):
    """One fit call on the device (what :class:`symbp.backends.cpu.runtime.HostRun` is on the
    host): X and y uploaded once, per epoch only the shuffled row order; every batch is
    gathered, trained and tallied on the device, and the host reads back one small status
    array per epoch.  The optimizer's state is copied back into ``optimizer.state`` by
    :meth:`sync` (before callbacks) and :meth:`close`."""

    def __init__(self, model: CudaModel, X, T, val, opt, batch_size: int) -> None:
        self.model, self.opt = model, opt
        n = self.n = X.shape[0]
        rows = min(batch_size, n)
        model._check_launch(rows)
        host_states = model._host_states(opt)
        # Everything fit puts on the device, checked at once so that a MemoryError leaves
        # nothing half done: data, batch buffers, work buffers, state, and the snapshots.
        param_bytes = sum(a.nbytes for a in model._device_params.values())
        state_bytes = sum(a.nbytes for a in host_states)
        need = (X.nbytes + T.nbytes + (0 if val is None else val[0].nbytes + val[1].nbytes) + n * 8
                + rows * (X.shape[1] + T.shape[1]) * model.dtype.itemsize + 2 * state_bytes + param_bytes
                + (0 if any(c >= rows for c in model._device_buffers) else model._buffer_bytes(rows)))
        model._require_memory(need, f"training on {n} samples in batches of {rows}")
        self.kernels = model._train_kernels(opt)
        self.ws = model._workspace(rows)
        self.dX, self.dT = model._upload_data(X, T)
        dval = None if val is None else model._upload_data(*val, what="_val")
        self.validate = None if dval is None else (lambda: model._evaluate_device(*dval, chunk=rows))  # training buffers
        self.dXb = model._empty((rows, X.shape[1]), model.dtype, "the batch buffer X")
        self.dTb = model._empty((rows, T.shape[1]), model.dtype, "the batch buffer y")
        self.states = [model._upload(a, "optimizer state") for a in host_states]
        self.kept = model._param_list() + self.states
        self.snapshot = [model._empty(a.shape, a.dtype, "the start-of-epoch snapshot") for a in self.kept]
        self.status = model._upload(np.zeros(len(EPOCH_SLOTS)), "the epoch status")
        self.dorder = model._empty((n,), np.int64, "the epoch's row order")
        self.stats = model._upload(np.zeros(len(model.kernels.STATS)), "the batch's sums")  # zeroed after each batch

    def epoch(self, order, batch_size: int, hyper: list[float], step: int, seed: int = 0) -> tuple[float, int, int, int]:
        self.dorder.copy_to_device(np.ascontiguousarray(order, dtype=np.int64))
        for copy, live in zip(self.snapshot, self.kept):
            copy.copy_to_device(live)
        self.status.copy_to_device(np.array([0.0, 0.0, -1.0, 0.0]))
        self.kernels.train_epoch(self.dX, self.dT, self.dorder, batch_size, hyper, step, seed, *self.model._param_list(),
                                 *self.ws, *self.states, self.dXb, self.dTb, self.stats, self.status)
        result = self.status.copy_to_host()  # the epoch's one wait for the device
        E = {s: k for k, s in enumerate(EPOCH_SLOTS)}
        return float(result[E["total"]]), int(result[E["correct"]]), int(result[E["done"]]), int(result[E["bad"]])

    def finite(self) -> bool:
        # As on the CPU: the last update of the epoch is checked here (one download of the
        # parameters and state per epoch).
        return all_finite(a.copy_to_host() for a in self.kept)

    def restore(self) -> None:
        for copy, live in zip(self.snapshot, self.kept):
            live.copy_to_device(copy)

    def sync(self) -> None:
        self.model._download_states(self.opt, self.states)

    def close(self) -> None:
        self.model._download_states(self.opt, self.states)
