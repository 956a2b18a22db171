"""The CUDA target on Numba's CUDA simulator, against the CPU target and PyTorch.

Run by ``tests/test_cuda.py`` in a process of its own with ``NUMBA_ENABLE_CUDASIM=1``: the
simulator has to be on before Numba is imported, and the rest of the suite runs the real
CPU target.  By hand: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim_cases.py``;
on a machine with a GPU, leave the variable out to run the same cases on the device.
Shapes are tiny (≤ 9 samples, ≤ 6 units) and the launch geometry small: the simulator runs
every CUDA thread as a Python thread, so a kernel costs milliseconds per element.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="the CUDA target needs numba-cuda (pip install 'symbp[cuda]')")
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATED:
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set by tests/test_cuda.py) or a GPU", allow_module_level=True)


def _shared_array(self, shape, dtype, alignment=None):
    """numba-cuda's simulated ``cuda.shared.array``, made atomic.  The simulator gives the
    threads of a block one array per calling line, but looks it up and stores it in two
    steps: two threads switching in between each get their own array (rare at the default
    switch interval, frequent at the one below), and the block's threads stop sharing."""
    if shape == 0 or alignment is not None:
        return _simulator_shared_array(self, shape, dtype, alignment)
    if isinstance(dtype, numba_types.Type):
        dtype = numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    return self._allocations.setdefault((caller.f_code.co_filename, caller.f_lineno), np.empty(shape, dtype))


if SIMULATED:
    from numba.core import types as numba_types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support

    _simulator_shared_array = FakeCUDAShared.array
    FakeCUDAShared.array = _shared_array
    # The simulator's scheduler busy-polls its threads; short GIL slices make it ~5x faster.
    sys.setswitchinterval(2e-5)

from _support import GRAD_NETS, OUTPUT_ACT_NETS, NetSpec, cnn, make_data, perturb_params, rel_err, torch_loss_and_grads  # noqa: E402

import symbp as sb  # noqa: E402
import symbp.backends.cuda.model as cm  # noqa: E402
from symbp.backends.cuda.model import CudaModel, compile_cuda  # noqa: E402
from symbp.backends.cuda.module import CudaConfig  # noqa: E402

N_SAMPLES = 9  # with batches of 4: two full batches and a short one

# Dropout's counter-based generator multiplies uint64s modulo 2**64; the simulator runs it as
# NumPy scalars, which warn on that wrap-around (a GPU does not).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in scalar:RuntimeWarning")


@pytest.fixture(scope="session")
def cuda_compiled(session_cache_dir):
    """``cuda_compiled(spec, dtype="float64", seed=0, config=None) -> CudaModel``: the module
    generated once per (network, dtype, config), a fresh model (own device arrays) per call."""
    memo: dict = {}

    def factory(spec, dtype: str = "float64", seed: int | None = 0, config: CudaConfig | None = None) -> CudaModel:
        net = spec.build() if isinstance(spec, NetSpec) else spec
        key = (net.fingerprint(), dtype, config)
        if key not in memo:
            memo[key] = compile_cuda(net, dtype=dtype, seed=0, cache_dir=session_cache_dir, config=config)
        first = memo[key]
        return CudaModel(net, first.kernels, first.source_path, dtype, net.init_params(seed, np.dtype(dtype)), first.config)

    return factory


def twins(spec, compiled, cuda_compiled, dtype="float64", seed=0, config=None):
    """A CPU model and a CUDA model of ``spec`` with the same (perturbed, non-zero-bias) parameters."""
    cpu = compiled(spec, dtype, seed=seed)
    perturb_params(cpu, seed=seed + 1)
    gpu = cuda_compiled(spec, dtype, seed=seed, config=config)
    gpu.params = cpu.params
    return cpu, gpu


def assert_close(a, b, tol, what=""):
    assert rel_err(a, b) <= tol, f"{what}: relative error {rel_err(a, b):.3g} > {tol:g}"


def assert_same_model_outputs(cpu, gpu, X, y):
    """Loss, gradients, logits, predictions (and probabilities for a classifier), evaluate
    and score: the CUDA model's equal the CPU model's."""
    assert_same_loss_and_grads(cpu, gpu, X, y)
    assert_close(gpu.decision_function(X), cpu.decision_function(X), 1e-12, "logits")
    if cpu.network.loss.task in ("multiclass", "binary"):
        np.testing.assert_array_equal(gpu.predict(X), cpu.predict(X))
        assert_close(gpu.predict_proba(X), cpu.predict_proba(X), 1e-12, "probabilities")
    else:
        assert_close(gpu.predict(X), cpu.predict(X), 1e-12, "predictions")
    g_loss, g_acc = gpu.evaluate(X, y)
    c_loss, c_acc = cpu.evaluate(X, y)
    assert_close(g_loss, c_loss, 1e-10, "evaluate")
    assert g_acc == c_acc or (np.isnan(g_acc) and np.isnan(c_acc))
    assert gpu.score(X, y) == pytest.approx(cpu.score(X, y), rel=1e-10)


def assert_same_loss_and_grads(cpu, gpu, X, y, tol=1e-10, loss_tol=None):
    """The CUDA model's loss and every gradient (in its own dtype) equal the CPU model's."""
    loss, grads = gpu.loss_and_grads(X, y)
    ref_loss, ref = cpu.loss_and_grads(X, y)
    assert_close(loss, ref_loss, tol if loss_tol is None else loss_tol, "loss")
    assert set(grads) == set(ref)
    for key in ref:
        assert grads[key].dtype == gpu.dtype
        assert_close(grads[key], ref[key], tol, f"∂/∂{key}")


# -- loss and gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*GRAD_NETS, *OUTPUT_ACT_NETS])
def test_loss_and_grads_match_torch(name, cuda_compiled):
    """Every activation and loss: the CUDA kernels' gradients equal PyTorch autograd's."""
    spec = {**GRAD_NETS, **OUTPUT_ACT_NETS}[name]
    model = cuda_compiled(spec)
    perturb_params(model, seed=2)
    X, y = make_data(spec, n=N_SAMPLES)
    loss, grads = model.loss_and_grads(X, y)
    ref_loss, ref = torch_loss_and_grads(spec, model.params, X, y)
    assert_close(loss, ref_loss, 1e-10, f"{name} loss")
    assert set(grads) == set(ref)
    for key in ref:
        assert_close(grads[key], ref[key], 1e-10, f"{name} ∂/∂{key}")


@pytest.mark.parametrize("name", ["g1-tanh-sigmoid-ce", "g5-sigmoid-relu-bce-l2", "g8-swishsym-tanh-mse-l2"])
def test_same_results_as_cpu_target(name, compiled, cuda_compiled):
    spec = GRAD_NETS[name]
    cpu, gpu = twins(spec, compiled, cuda_compiled)
    X, y = make_data(spec, n=N_SAMPLES)
    assert_same_model_outputs(cpu, gpu, X, y)


def test_evaluation_in_chunks(compiled, cuda_compiled, monkeypatch):
    """Data sets larger than the evaluation chunk are evaluated piecewise on the device."""
    spec = GRAD_NETS["g5-sigmoid-relu-bce-l2"]
    cpu, gpu = twins(spec, compiled, cuda_compiled)
    X, y = make_data(spec, n=N_SAMPLES)
    monkeypatch.setattr(cm, "_EVAL_CHUNK", 4)
    assert_close(gpu.evaluate(X, y)[0], cpu.evaluate(X, y)[0], 1e-10, "chunked evaluate")
    assert gpu.evaluate(X, y)[1] == cpu.evaluate(X, y)[1]
    assert_close(gpu.decision_function(X), cpu.decision_function(X), 1e-12, "chunked logits")


def test_grid_striding_geometry(compiled, cuda_compiled):
    """One block of four threads, one-wide micro tiles, K in slices of 2: every kernel strides
    over many more indices than it has threads, and every GEMM over partial tiles."""
    config = CudaConfig(threads=4, max_blocks=1, cols=2, tile=2, tile_k=2, micro=1)
    spec = GRAD_NETS["g8-swishsym-tanh-mse-l2"]
    cpu, gpu = twins(spec, compiled, cuda_compiled, config=config)
    X, y = make_data(spec, n=N_SAMPLES)
    assert_same_loss_and_grads(cpu, gpu, X, y)


# -- training ------------------------------------------------------------------------------------
FIT_CASES = {
    # plain SGD with an l2 loss term: the update rides on the weight-gradient GEMM (guarded)
    "sgd-fused": ("g5-sigmoid-relu-bce-l2", lambda: sb.SGD(lr=0.5)),
    "sgd-nesterov-wd": ("g1-tanh-sigmoid-ce", lambda: sb.SGD(lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam-amsgrad-wd": ("g8-swishsym-tanh-mse-l2", lambda: sb.Adam(lr=0.05, amsgrad=True, weight_decay=0.01)),
    "adamw": ("g1-tanh-sigmoid-ce", lambda: sb.AdamW(lr=0.05)),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_matches_cpu_target(case, compiled, cuda_compiled):
    """Same batches, same updates: history, parameters and optimizer state agree to 1e-10."""
    name, make_opt = FIT_CASES[case]
    spec = GRAD_NETS[name]
    cpu, gpu = twins(spec, compiled, cuda_compiled)
    X, y = make_data(spec, n=N_SAMPLES)
    Xv, yv = make_data(spec, n=5, seed=3)
    X_before = X.copy()
    kwargs = dict(batch_size=4, epochs=2, validation_data=(Xv, yv), seed=1, progress=False)
    c_opt, g_opt = make_opt(), make_opt()
    h_cpu = cpu.fit(X, y, optimizer=c_opt, **kwargs)
    h_gpu = gpu.fit(X, y, optimizer=g_opt, **kwargs)
    np.testing.assert_array_equal(X, X_before)
    assert h_gpu.epoch == h_cpu.epoch and set(h_gpu.history) == set(h_cpu.history)
    for key in h_cpu.history:
        assert_close(h_gpu[key], h_cpu[key], 1e-10, f"history {key}")
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)
    assert g_opt.step == c_opt.step == 6
    for pname, states in c_opt.state.items():
        for sname, value in states.items():
            assert_close(g_opt.state[pname][sname], value, 1e-10, f"state {pname}/{sname}")
    assert gpu.epoch == 2 and gpu.optimizer is g_opt


def test_fit_resumes_with_the_same_state(compiled, cuda_compiled):
    """Two fit calls of one epoch each equal one of two epochs: state is kept across calls."""
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    cpu, gpu = twins(spec, compiled, cuda_compiled)
    X, y = make_data(spec, n=N_SAMPLES)
    opt_c, opt_g = sb.AdamW(lr=0.05), sb.AdamW(lr=0.05)  # as in test_fit_matches_cpu_target: compiled already
    cpu.fit(X, y, optimizer=opt_c, batch_size=4, epochs=2, progress=False)
    gpu.fit(X, y, optimizer=opt_g, batch_size=4, epochs=1, progress=False)
    gpu.fit(X, y, batch_size=4, epochs=2, initial_epoch=1, progress=False)
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)


def test_train_on_batch_matches_cpu_target(compiled, cuda_compiled):
    """train_on_batch runs the device runtime one batch at a time: the CPU's losses and
    parameters, and the same refusal (nothing changed) of an update that overflows."""
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    cpu, gpu = twins(spec, compiled, cuda_compiled)
    X, y = make_data(spec, n=N_SAMPLES)
    opt_c, opt_g = sb.AdamW(lr=0.05), sb.AdamW(lr=0.05)  # (compiled already, as above)
    for start in (0, 4, 8):
        assert_close(gpu.train_on_batch(X[start:start + 4], y[start:start + 4], opt_g),
                     cpu.train_on_batch(X[start:start + 4], y[start:start + 4], opt_c), 1e-10, "loss")
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)
    before = {k: np.array(v) for k, v in gpu.params.items()}
    opt_g.hyper["lr"] = 1e308
    with pytest.raises(FloatingPointError, match="it was undone"):
        gpu.train_on_batch(X[:4], y[:4], opt_g)
    for key, value in before.items():
        assert_close(gpu.params[key], value, 0.0, key)
    assert opt_g.step == opt_c.step == 3


def test_float32(compiled, cuda_compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    cpu, gpu = twins(spec, compiled, cuda_compiled, dtype="float32")
    X, y = make_data(spec, n=N_SAMPLES)
    assert_same_loss_and_grads(cpu, gpu, X, y, tol=1e-4, loss_tol=1e-5)
    h_cpu = cpu.fit(X, y, optimizer=sb.SGD(lr=0.5), batch_size=4, epochs=3, progress=False)
    h_gpu = gpu.fit(X, y, optimizer=sb.SGD(lr=0.5), batch_size=4, epochs=3, progress=False)
    assert_close(h_gpu["loss"], h_cpu["loss"], 1e-5, "history")
    assert h_gpu["loss"][-1] < h_gpu["loss"][0]
    for key, value in cpu.params.items():
        assert gpu.params[key].dtype == np.float32
        assert_close(gpu.params[key], value, 1e-4, key)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_loss_restores_the_epoch_start(compiled, cuda_compiled):
    """A diverging run stops at the same batch as on the CPU, with the same restored state."""
    net = sb.Network(inputs=3, layers=[sb.Dense(2), sb.Dense(2)], loss="mse", name="cuda-diverge")
    X = np.random.default_rng(0).normal(0.0, 3.0, (N_SAMPLES, 3))
    target = np.ones((N_SAMPLES, 2))
    results = []
    for model in (compiled(net, "float64"), cuda_compiled(net, "float64")):
        opt = sb.SGD(lr=1e10, momentum=0.5)
        with pytest.raises(FloatingPointError, match=r"epoch \d+ \(0-based\), batch \d+") as err:
            model.fit(X, target, optimizer=opt, batch_size=4, epochs=3, progress=False)
        results.append((str(err.value), model.params, opt.step, opt.state, model.epoch))
    (c_msg, c_params, c_step, c_state, c_epoch), (g_msg, g_params, g_step, g_state, g_epoch) = results
    assert g_msg == c_msg and g_step == c_step and g_epoch == c_epoch
    for key, value in c_params.items():
        assert np.isfinite(g_params[key]).all()
        assert_close(g_params[key], value, 1e-10, key)
    assert g_epoch == 1  # epoch 0 went through: the state to restore is not the initial one
    for key in c_params:
        assert_close(g_state[key]["momentum_buffer"], c_state[key]["momentum_buffer"], 1e-10, f"momentum {key}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_an_overflowing_last_update_is_caught_as_on_the_cpu(compiled, cuda_compiled):
    """The last update of an epoch (seen by no loss) is checked after the epoch: same error,
    same restored parameters as the CPU target."""
    net = sb.Network(inputs=3, layers=[sb.Dense(2), sb.Dense(2)], loss="mse", name="cuda-diverge")
    X = np.random.default_rng(1).normal(0.0, 1e3, (N_SAMPLES, 3))
    target = np.ones((N_SAMPLES, 2))
    results = []
    for model in (compiled(net, "float64"), cuda_compiled(net, "float64")):
        start = {k: np.array(v) for k, v in model.params.items()}
        with pytest.raises(FloatingPointError, match=r"the update of batch 0, the last of epoch 0") as err:
            model.fit(X, target, optimizer=sb.SGD(lr=1e306), batch_size=N_SAMPLES, epochs=2, progress=False)
        results.append(str(err.value))
        for key, value in start.items():
            assert_close(model.params[key], value, 0.0, key)
    assert results[0] == results[1]


# -- parameters on the device ---------------------------------------------------------------------
def test_params_are_host_copies(cuda_compiled):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = cuda_compiled(spec)
    X, y = make_data(spec, n=N_SAMPLES)
    before = model.loss_and_grads(X, y)[0]
    copy = model.params
    copy["W1"][0, 0] += 1.0  # reading gives host arrays: editing them leaves the device alone
    assert model.loss_and_grads(X, y)[0] == before
    model.params["W1"] = copy["W1"]  # assigning an entry uploads it
    np.testing.assert_array_equal(model.params["W1"], copy["W1"])
    assert model.loss_and_grads(X, y)[0] != before
    fresh = {k: np.zeros_like(v) for k, v in model.params.items()}
    model.params = fresh  # assigning the dict uploads every entry
    assert all(not v.any() for v in model.params.values())
    with pytest.raises(ValueError, match="shape"):
        model.params["W1"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="lacks 'b2'"):
        model.params = {k: v for k, v in fresh.items() if k != "b2"}
    with pytest.raises(TypeError, match="not numeric"):
        model.params["W1"] = "weights"
    assert all(not v.any() for v in model.params.values())  # nothing half-applied


def test_checkpoint_round_trip_to_cpu(cuda_compiled, tmp_path, session_cache_dir):
    """A CUDA model saves like a CPU one; sb.load gives a CPU model with its parameters and
    optimizer state."""
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = cuda_compiled(spec)
    X, y = make_data(spec, n=N_SAMPLES)
    opt = sb.Adam(lr=0.05)
    model.fit(X, y, optimizer=opt, batch_size=4, epochs=1, progress=False)
    back = sb.load(model.save(tmp_path / "gpu"), cache_dir=session_cache_dir)
    for key, value in model.params.items():
        np.testing.assert_array_equal(back.params[key], value)
        np.testing.assert_array_equal(back.optimizer.state[key]["exp_avg"], opt.state[key]["exp_avg"])
    assert back.optimizer.step == opt.step == 3


# -- bad input ---------------------------------------------------------------------------------------
def test_out_of_memory_is_refused_before_anything_changes(cuda_compiled, monkeypatch):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = cuda_compiled(spec)
    X, y = make_data(spec, n=N_SAMPLES)
    X_before, params = X.copy(), model.params
    monkeypatch.setattr(CudaModel, "_free_memory", lambda self: 512.0)
    with pytest.raises(MemoryError, match=r"out of memory: training on 9 samples .* MiB"):
        model.fit(X, y, optimizer=sb.Adam(), batch_size=4, progress=False)
    with pytest.raises(MemoryError, match="work buffers for 9 samples"):
        model.loss_and_grads(X, y)
    np.testing.assert_array_equal(X, X_before)
    for key, value in params.items():
        np.testing.assert_array_equal(model.params[key], value)
    assert model.optimizer is None and model.epoch == 0


def test_failed_allocation_becomes_memory_error(cuda_compiled, monkeypatch):
    from numba import cuda
    from numba.cuda.cudadrv.driver import CudaAPIError

    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = cuda_compiled(spec)
    X, y = make_data(spec, n=N_SAMPLES)
    params = model.params

    def no_memory(*args, **kwargs):
        raise CudaAPIError(2, "CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(cuda, "device_array", no_memory)
    with pytest.raises(MemoryError, match="out of memory allocating work buffer"):
        model.loss_and_grads(X, y)
    for key, value in params.items():
        np.testing.assert_array_equal(model.params[key], value)


def test_parameters_that_do_not_fit(cuda_compiled, monkeypatch):
    """A model whose parameters do not fit: refused up front when the free memory says so, and
    when the allocation itself fails; either way the error names the bytes and the host arrays
    are left as they were."""
    from numba import cuda
    from numba.cuda.cudadrv.driver import CudaAPIError

    net = cnn()
    first = cuda_compiled(net)
    host = net.init_params(0, np.dtype("float64"))
    copies = {k: v.copy() for k, v in host.items()}
    nbytes = sum(v.nbytes for v in host.values())
    monkeypatch.setattr(CudaModel, "_free_memory", lambda self: 64.0)
    with pytest.raises(MemoryError, match=rf"the parameters needs {nbytes} bytes .* your host arrays"):
        CudaModel(net, first.kernels, first.source_path, "float64", host, first.config)
    monkeypatch.undo()

    def no_memory(*args, **kwargs):
        raise CudaAPIError(2, "CUDA_ERROR_OUT_OF_MEMORY")

    monkeypatch.setattr(cuda, "to_device", no_memory)
    with pytest.raises(MemoryError, match=rf"allocating parameter W1: {host['W1'].nbytes} bytes .* as they were"):
        CudaModel(net, first.kernels, first.source_path, "float64", host, first.config)
    for key, value in copies.items():
        np.testing.assert_array_equal(host[key], value)


def test_a_conv_gemm_beyond_the_grid_is_refused_when_generated(session_cache_dir):
    """A conv whose per-sample GEMM would need more than 65535 blocks along y (here with
    one-wide tiles) is refused when its kernels are generated, not at launch."""
    net = sb.Network(inputs=(1, 258, 258), layers=[sb.Conv2D(1, 3), sb.Flatten(), sb.Dense(2)], name="cuda-wide")
    config = CudaConfig(threads=8, max_blocks=2, cols=4, tile=1, tile_k=1, micro=1)
    with pytest.raises(ValueError, match=r"65536 columns need 65536 blocks of TILE = 1 along the grid's y axis"):
        compile_cuda(net, config=config, cache_dir=session_cache_dir)


def test_a_dense_gemm_beyond_the_grid_is_refused_when_generated(session_cache_dir):
    """dW1 = δ1ᵀ·X has 65536 columns: with one-wide tiles that is one block too many on y."""
    net = sb.Network(inputs=65536, layers=[sb.Dense(2)], loss="mse", name="cuda-wide-dense")
    config = CudaConfig(threads=8, max_blocks=2, cols=4, tile=1, tile_k=1, micro=1)
    with pytest.raises(ValueError, match=r"GEMM of .*65536 columns need 65536 blocks of TILE = 1 along the grid's y"):
        compile_cuda(net, config=config, cache_dir=session_cache_dir)


def test_a_wide_feature_map_is_not_a_gemm_width(session_cache_dir):
    """4 maps of 128×128 make a layer 65536 wide, but no GEMM has that many columns (the conv's
    per sample has 16384, the Dense reads 4·64·64): the model is not refused at launch."""
    net = sb.Network(inputs=(1, 130, 130), layers=[sb.Conv2D(4, 3), sb.MaxPool2D(2), sb.Flatten(), sb.Dense(2)],
                     name="cuda-wide-maps")
    config = CudaConfig(threads=8, max_blocks=2, cols=4, tile=1, tile_k=1, micro=1)
    model = compile_cuda(net, config=config, cache_dir=session_cache_dir)
    assert max(net.widths) == 65536
    model._check_launch(4)


def test_batch_beyond_launch_limits(cuda_compiled, monkeypatch):
    spec = GRAD_NETS["g1-tanh-sigmoid-ce"]
    model = cuda_compiled(spec)
    X, y = make_data(spec, n=N_SAMPLES)
    params = model.params
    need = -(-N_SAMPLES // model.kernels.TILE)  # GEMM blocks along x for a batch of 9 rows
    monkeypatch.setattr(model.kernels, "MAX_GRID", (need - 1, 65535))  # as if CUDA allowed one fewer
    with pytest.raises(ValueError, match=rf"a batch of 9 rows needs {need} GEMM blocks .* allows {need - 1}: use a smaller"):
        model.fit(X, y, batch_size=N_SAMPLES, progress=False)
    with pytest.raises(ValueError, match="batch of 9 rows"):
        model.loss_and_grads(X, y)
    for key, value in params.items():
        np.testing.assert_array_equal(model.params[key], value)
    assert model.optimizer is None and model.epoch == 0
    monkeypatch.undo()
    model.fit(X, y, batch_size=N_SAMPLES, progress=False)  # within CUDA's limits: fine
    assert model.epoch == 1


def test_dtypes_the_device_cannot_do(monkeypatch, session_cache_dir):
    net = GRAD_NETS["g1-tanh-sigmoid-ce"].build()
    for dtype in ("float16", "int32"):
        with pytest.raises(ValueError, match="dtype"):
            sb.compile(net, target="cuda", dtype=dtype, cache_dir=session_cache_dir)
        with pytest.raises(ValueError, match="dtype"):
            sb.compile(cnn(), target="cuda", dtype=dtype, cache_dir=session_cache_dir)
    monkeypatch.setattr(cm, "simulated", lambda: False)
    monkeypatch.setattr(cm, "device_limits", lambda: {"cc": (5, 2), "threads": 1024, "shared": 48 * 1024, "name": b"Old GPU"})
    with pytest.raises(ValueError, match=r"float64.* compute capability 6\.0 .* Old GPU has 5\.2: use dtype='float32'"):
        sb.compile(net, target="cuda", dtype="float64", cache_dir=session_cache_dir)
    monkeypatch.setattr(cm, "device_limits", lambda: {"cc": (8, 0), "threads": 256, "shared": 48 * 1024, "name": "Small"})
    with pytest.raises(ValueError, match="needs 1024 threads per block; Small allows 256"):
        compile_cuda(net, dtype="float32", config=CudaConfig(threads=1024), cache_dir=session_cache_dir)


def test_launch_geometry_is_checked():
    with pytest.raises(ValueError, match="power of two"):
        CudaConfig(threads=100)
    with pytest.raises(ValueError, match="multiple of micro"):
        CudaConfig(tile=10, micro=4)
    with pytest.raises(ValueError, match="shared memory"):
        CudaConfig(tile=256, tile_k=64, micro=16)
    with pytest.raises(ValueError, match="1024"):
        CudaConfig(tile=128, micro=2)
    with pytest.raises(ValueError, match="gemm"):
        CudaConfig(gemm="magic")


def test_cublas_choice(session_cache_dir):
    net = GRAD_NETS["g1-tanh-sigmoid-ce"].build()
    if SIMULATED:
        assert cm._resolve_gemm(CudaConfig(gemm="auto")).gemm == "kernel"  # no cuBLAS on the simulator
    if SIMULATED or importlib.util.find_spec("cupy") is None:
        with pytest.raises((ImportError, ValueError), match="CuPy|real GPU"):
            compile_cuda(net, config=CudaConfig(gemm="cublas"), cache_dir=session_cache_dir)


# -- the generated module ------------------------------------------------------------------------------
def test_generated_module(cuda_compiled, session_cache_dir):
    net = GRAD_NETS["g1-tanh-sigmoid-ce"].build()
    model = sb.compile(net, target="cuda", dtype="float64", cache_dir=session_cache_dir)
    assert isinstance(model, CudaModel) and model.config == (cm.SIMULATOR_CONFIG if SIMULATED else CudaConfig())
    path = model.source_path
    assert path.parent == session_cache_dir and "-cuda-" in path.name
    text = path.read_text()
    assert "Formulas (SymPy)" in text and "@cuda.jit(cache=True)" in text
    assert "def gemm_nt(" in text and "def forward(" in text and "SIGNATURES = {" in text
    assert all(hasattr(model.kernels, name) for name in model.kernels.SIGNATURES)
    assert text.count("@cuda.jit(cache=True)") == len(model.kernels.SIGNATURES)  # every kernel has its types
    # Cached: the same file next time; a damaged one is regenerated.
    assert sb.compile(net, target="cuda", dtype="float64", cache_dir=session_cache_dir).source_path == path
    path.write_text(text.replace("def forward(", "def forward_broken("))
    again = compile_cuda(net, dtype="float64", cache_dir=session_cache_dir)
    assert "def forward(" in again.source_path.read_text()


# -- layers written as index formulas (sb.Layer) ---------------------------------------------------
FORMULA_LAYERS = {
    "bilinear": lambda: sb.Layer("z[n, k] = Sum(W[k, i, j]*x[n, i]*x[n, j], (i, j)) + b[k]", units=3,
                                 params={"W": ("units", "in", "in"), "b": ("units",)}, activation="tanh"),
    "glu": lambda: sb.Layer("z[n, k] = Sum(U[k, j]*x[n, j], j) * sigmoid(Sum(V[k, j]*x[n, j], j))", units=4,
                            params={"U": ("units", "in"), "V": ("units", "in")}),
    "layernorm": lambda: sb.LayerNorm(),  # per-sample stages: the mean and the variance
}


@pytest.mark.parametrize("make_opt", [lambda: sb.SGD(lr=0.2, momentum=0.9), lambda: sb.Adam(lr=0.05)],
                         ids=["momentum", "adam"])
@pytest.mark.parametrize("kind", FORMULA_LAYERS)
def test_formula_layers_match_cpu_target(kind, make_opt, compiled, cuda_compiled):
    """A custom layer (or LayerNorm) between two Dense layers: gradients and two epochs of
    training agree."""
    net = sb.Network(inputs=4, layers=[sb.Dense(3, activation="tanh"), FORMULA_LAYERS[kind](), sb.Dense(3)],
                     loss="softmax_cross_entropy", l2=0.01)
    cpu, gpu = compiled(net, "float64", seed=2), cuda_compiled(net, "float64", seed=2)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, 4)), rng.integers(0, 3, 7)
    assert_same_loss_and_grads(cpu, gpu, X, y)
    kwargs = dict(batch_size=4, epochs=2, seed=1, progress=False)
    cpu.fit(X, y, optimizer=make_opt(), **kwargs)
    gpu.fit(X, y, optimizer=make_opt(), **kwargs)
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)


# -- graph networks (sb.Input, sb.Add, sb.Concat) ------------------------------------------------
def _residual_mlp():
    x = sb.Input(4)
    h = sb.Dense(3, activation="relu")(x)
    r = sb.Dense(3, activation="tanh")(h)
    s = sb.Dense(2, activation="sigmoid")(h)  # reads h, two layers back: its update waits for δ of h
    return sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Concat()([sb.Add()([h, r]), s])), l2=0.01)


def _branching_cnn():
    x = sb.Input((1, 5, 5))
    a = sb.Conv2D(2, 3, padding=1, activation="relu")(x)
    b = sb.Conv2D(1, 3, padding=1, activation="tanh")(x)
    c = sb.Concat()([a, b])
    r = sb.Add(activation="relu")([c, sb.Conv2D(3, 3, padding=1)(c)])
    return sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Flatten()(sb.MaxPool2D(2)(r))), l2=0.01)


def _batchnorm_mlp():
    x = sb.Input(4)
    h = sb.Dense(3, activation="tanh")(x)
    return sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Add()([h, sb.Dense(3)(sb.BatchNorm(momentum=0.3)(h))])), l2=0.01)


def _batchnorm_cnn():
    return sb.Network(inputs=(1, 5, 5), layers=[sb.Conv2D(2, 3, activation="relu"), sb.BatchNorm(), sb.Flatten(),
                                                sb.Dense(3)], l2=0.01)


@pytest.mark.parametrize("make", [_residual_mlp, _branching_cnn, _batchnorm_mlp, _batchnorm_cnn],
                         ids=["residual_mlp", "branching_cnn", "batchnorm_mlp", "batchnorm_cnn"])
def test_graph_networks_match_cpu_target(make, compiled, cuda_compiled):
    """Residual joins, concatenations, BatchNorm: gradients and two epochs of Adam agree (the
    running statistics too), then inference with them."""
    net = make()
    cpu, gpu = compiled(net, "float64", seed=2), cuda_compiled(net, "float64", seed=2)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, net.widths[0])), rng.integers(0, 3, 7)
    assert_same_loss_and_grads(cpu, gpu, X, y)
    kwargs = dict(batch_size=4, epochs=2, seed=1, progress=False)
    cpu.fit(X, y, optimizer=sb.Adam(lr=0.05), **kwargs)
    gpu.fit(X, y, optimizer=sb.Adam(lr=0.05), **kwargs)
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)
    assert_close(gpu.decision_function(X), cpu.decision_function(X), 1e-12, "logits")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dropout_draws_the_cpu_targets_masks(dtype, compiled, cuda_compiled):
    """The counter-based masks: the same draws on both targets, in the loss and gradients and
    over two epochs of training (a seed per step); float32 too."""
    net = sb.Network(inputs=(1, 4, 4), layers=[sb.Conv2D(2, 3, activation="relu"), sb.Dropout(0.3), sb.Flatten(),
                                               sb.Dense(3, activation="tanh"), sb.Dropout(0.5), sb.Dense(3)])
    cpu, gpu = compiled(net, dtype, seed=2), cuda_compiled(net, dtype, seed=2)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, 16)).astype(dtype), rng.integers(0, 3, 7)
    tol = 1e-10 if dtype == "float64" else 1e-4
    assert_same_loss_and_grads(cpu, gpu, X, y, tol=tol)
    kwargs = dict(batch_size=4, epochs=2, seed=1, progress=False)
    cpu.fit(X, y, optimizer=sb.SGD(lr=0.1, momentum=0.9), **kwargs)
    gpu.fit(X, y, optimizer=sb.SGD(lr=0.1, momentum=0.9), **kwargs)
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, tol, key)
