"""The CUDA target's image layers on Numba's CUDA simulator, against the CPU target.

Run by ``tests/test_cuda.py`` in a process of its own with ``NUMBA_ENABLE_CUDASIM=1`` (next to
``cuda_sim_cases.py``, whose fixtures and simulator fixes it shares: the two run side by side,
and most of this file's time is its CPU twin's Numba compile).  By hand:
``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim_cnn_cases.py``.
"""
# ruff: noqa: F811 - the tests take the fixture cuda_compiled imported from cuda_sim_cases

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="the CUDA target needs numba-cuda (pip install 'symbp[cuda]')")

from _support import cnn, perturb_params, rel_err  # noqa: E402
from cuda_sim_cases import assert_close, assert_same_loss_and_grads, assert_same_model_outputs, cuda_compiled, twins  # noqa: E402, F401 - a fixture, and the simulator's fixes

import symbp as sb  # noqa: E402

# -- image layers ----------------------------------------------------------------------------------
CNN_SAMPLES = 5  # with batches of 2: two full batches and a short one


def cnn_data(net: sb.Network, n: int = CNN_SAMPLES, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, *net.input_shape))
    y = rng.integers(0, net.outputs, n) if net.loss.task == "multiclass" else rng.normal(size=(n, net.outputs))
    return X, y


def test_cnn_same_results_as_cpu_target(compiled, cuda_compiled):
    """Conv (stride, padding; im2col and direct), max and average pooling, Flatten, Maxout and
    Dense: loss, every gradient and the predictions equal the CPU target's."""
    net = cnn()
    cpu, gpu = twins(net, compiled, cuda_compiled)
    X, y = cnn_data(net)
    assert_same_model_outputs(cpu, gpu, X, y)
    np.testing.assert_array_equal(gpu.decision_function(X.reshape(len(X), -1)), gpu.decision_function(X))  # flat images too
    with pytest.raises(ValueError, match=r"\(N, 1, 6, 6\)"):
        gpu.decision_function(np.zeros((2, 2, 6, 6)))


def test_cnn_ties_go_to_the_first_maximum(compiled, cuda_compiled):
    """Every pooling window and every Maxout unit tied: the gradient goes to the first maximum
    in both targets (PyTorch's rule; the CPU target is checked against PyTorch in test_conv)."""
    net = cnn()
    cpu, gpu = twins(net, compiled, cuda_compiled)
    params = cpu.params
    params["W1"][...] = 0.0  # a conv output equals its bias: every max-pooling window ties
    params["W7"][1::2], params["b7"][1::2] = params["W7"][0::2], params["b7"][0::2]  # Maxout's pieces tie
    cpu.params = params
    gpu.params = params
    X, y = cnn_data(net)
    assert_same_model_outputs(cpu, gpu, X, y)
    named = gpu._named(gpu._workspace(len(X)))
    assert not named["Am2"].copy_to_host()[:len(X)].any()  # the pooling kept window position 0 everywhere
    assert not named["Ag7"].copy_to_host()[:len(X)].any()  # and Maxout piece 0


def test_cnn_samples_beyond_the_grid_z_cap(compiled, cuda_compiled, monkeypatch):
    """A per-sample GEMM launches at most MAX_GRID_Z blocks along z and strides over the rest."""
    net = cnn()
    cpu, gpu = twins(net, compiled, cuda_compiled)
    monkeypatch.setattr(gpu.kernels, "MAX_GRID_Z", 2)  # the module the launchers read it from
    X, y = cnn_data(net)
    assert_same_loss_and_grads(cpu, gpu, X, y)


CNN_FIT_CASES = {
    "sgd": lambda: sb.SGD(lr=0.3),  # fused into the guarded Σ_n GEMM of ∂C/∂W3
    "adam": lambda: sb.Adam(lr=0.05),
}


@pytest.mark.parametrize("case", CNN_FIT_CASES)
def test_cnn_fit_matches_cpu_target(case, compiled, cuda_compiled):
    """Same batches, same updates: history, parameters and optimizer state agree to 1e-10."""
    make_opt = CNN_FIT_CASES[case]
    net = cnn()
    cpu, gpu = twins(net, compiled, cuda_compiled)
    X, y = cnn_data(net)
    X_before, W1_before = X.copy(), gpu.params["W1"]
    kwargs = dict(batch_size=2, epochs=2, seed=1, progress=False)
    c_opt, g_opt = make_opt(), make_opt()
    h_cpu = cpu.fit(X, y, optimizer=c_opt, **kwargs)
    # on the device in two calls: the second resumes from the state the first copied back
    # (W1's length-1 channel axis included)
    h_gpu = gpu.fit(X, y, optimizer=g_opt, **{**kwargs, "epochs": 1})
    h_gpu2 = gpu.fit(X, y, initial_epoch=1, **kwargs)
    np.testing.assert_array_equal(X, X_before)
    for key in h_cpu.history:
        assert_close(h_gpu[key] + h_gpu2[key], h_cpu[key], 1e-10, f"history {key}")
    for key, value in cpu.params.items():
        assert_close(gpu.params[key], value, 1e-10, key)
    assert rel_err(gpu.params["W1"], W1_before) > 1e-3  # it trained
    assert g_opt.step == c_opt.step == 6
    for pname, states in c_opt.state.items():
        for sname, value in states.items():
            assert_close(g_opt.state[pname][sname], value, 1e-10, f"state {pname}/{sname}")


def test_cnn_float32(compiled, cuda_compiled):
    """float32 kernels against the float64 CPU target (one CPU module fewer to compile)."""
    net = cnn()
    cpu = compiled(net, "float64")
    perturb_params(cpu, seed=1)
    gpu = cuda_compiled(net, "float32")
    gpu.params = cpu.params
    X, y = cnn_data(net)
    assert_same_loss_and_grads(cpu, gpu, X, y, tol=1e-4, loss_tol=1e-5)
