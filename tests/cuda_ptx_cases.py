"""Every kernel the CUDA target generates compiles to PTX: Numba's real CUDA mode types and
lowers it (NVVM, from the ``numba-cuda[cu12]`` wheels), no GPU needed, so type errors that
the simulator would let through surface in CI.

Run by ``tests/test_cuda.py`` in a process of its own, with the simulator off.
"""

from __future__ import annotations

import os
import re

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
    pytest.skip("compiles for a real device: run without NUMBA_ENABLE_CUDASIM", allow_module_level=True)
pytest.importorskip("numba_cuda", reason="the CUDA target needs numba-cuda (pip install 'symbp[cuda]')")

from _support import GRAD_NETS, cnn  # noqa: E402

import symbp as sb  # noqa: E402
from symbp import cache  # noqa: E402
from symbp.backends.cuda.module import CudaConfig, generate_cuda_source, generate_cuda_train_source  # noqa: E402
from symbp.derive import derive  # noqa: E402

CC = (8, 0)
# Four nets cover every activation and every loss; g5 adds the l2 term (penalty kernels).
NETS = ["g1-tanh-sigmoid-ce", "g2-relu-leaky-mse", "g3-elu-softplus-bce", "g4-mish-swish-logcosh", "g5-sigmoid-relu-bce-l2"]
OPTIMIZERS = [
    sb.SGD(lr=0.1),  # fused into the guarded weight-gradient GEMM
    sb.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    sb.Adam(lr=0.01, amsgrad=True, weight_decay=0.01),
    sb.AdamW(lr=0.01),
    sb.RMSprop(lr=0.01, centered=True, momentum=0.5),
    sb.Adagrad(lr=0.1, lr_decay=0.01),
]
# Elementwise and GEMM kernels of a float32 module do float32 arithmetic only (the sums
# into `stats`, the epoch status a guarded kernel reads and per-thread step-size constants
# are float64 on purpose).
FLOAT32_ONLY = ("forward_", "backward_", "colsum_", "gemm_n", "gemm_t", "bgemm_", "gather_rows")


@pytest.fixture(scope="module")
def ptx_of():
    from numba import cuda

    seen: dict = {}

    def compile_all(module) -> dict[str, str]:
        out = {}
        for name, signature in module.SIGNATURES.items():
            fn = getattr(module, name).py_func
            key = (module.__dict__.get("FT"), signature, fn.__code__.co_code, fn.__code__.co_consts)
            if key not in seen:
                seen[key] = cuda.compile_ptx(fn, signature, cc=CC)[0]
            out[name] = seen[key]
        return out

    return compile_all


def modules(tmp_path, name: str, dtype: str, optimizers, config: CudaConfig | None = None):
    config = config or CudaConfig()
    d = derive(cnn() if name == "cnn" else GRAD_NETS[name].build())
    path = tmp_path / f"{name}-{dtype}-{config.gemm}.py"
    model = cache.load_or_generate(path, lambda: generate_cuda_source(d, dtype, config), "cuda")
    out = [model]
    for k, opt in enumerate(optimizers):
        tpath = tmp_path / f"{name}-{dtype}-{config.gemm}-{k}.py"
        out.append(cache.load_or_generate(
            tpath, lambda opt=opt: generate_cuda_train_source(d, dtype, config, opt, cache.module_name(path)), "cuda"))
    return out


def check(ptx_of, mods, dtype):
    for module in mods:
        for name, ptx in ptx_of(module).items():
            assert ".entry" in ptx, name
            if dtype == "float32" and name.startswith(FLOAT32_ONLY) and not name.endswith("_guarded"):
                assert not re.search(r"\.f64\b", ptx), f"{name} does float64 arithmetic in a float32 module"
            # The GEMM's accumulators stay in registers (no local-memory spills of acc, a, b).
            if name.startswith(("gemm_", "bgemm_")):
                assert ".local" not in ptx, f"{name} keeps its micro-tile in local memory"


@pytest.mark.parametrize("name", NETS)
def test_model_kernels_compile(name, tmp_path, ptx_of):
    check(ptx_of, modules(tmp_path, name, "float32", [sb.SGD(lr=0.1)]), "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optimizer_kernels_compile(dtype, tmp_path, ptx_of):
    check(ptx_of, modules(tmp_path, "g5-sigmoid-relu-bce-l2", dtype, OPTIMIZERS), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cnn_kernels_compile(dtype, tmp_path, ptx_of):
    """Image layers: the per-sample and summed GEMMs (SGD fuses its update into the summed one,
    guarded), window scans, gathers and per-entry block sums, and Adam's update of 4-d weights."""
    mods = modules(tmp_path, "cnn", dtype, [sb.SGD(lr=0.1), sb.Adam(lr=0.01)] if dtype == "float32" else [])
    names = {n for m in mods for n in m.SIGNATURES}
    assert {"bgemm_nn", "bgemm_sum_nt", "bgemm_tn"} <= names, names
    assert dtype == "float64" or "bgemm_sum_nt_guarded" in names
    check(ptx_of, mods, dtype)


def test_cublas_variant_compiles(tmp_path, ptx_of):
    """With gemm='cublas' no GEMM kernel is generated; the guarded update's scalars kernel is."""
    mods = modules(tmp_path, "g5-sigmoid-relu-bce-l2", "float32", [sb.SGD(lr=0.1)], CudaConfig(gemm="cublas"))
    assert not any(n.startswith("gemm_n") or n.startswith("gemm_t") for m in mods for n in m.SIGNATURES)
    assert "gemm_scalars" in mods[1].SIGNATURES
    check(ptx_of, mods, "float32")


def test_simulator_geometry_compiles(tmp_path, ptx_of):
    from symbp.backends.cuda.model import SIMULATOR_CONFIG

    check(ptx_of, modules(tmp_path, "g1-tanh-sigmoid-ce", "float64", [sb.Adam()], SIMULATOR_CONFIG), "float64")


def test_without_a_gpu_the_error_says_so():
    from numba import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present")
    net = GRAD_NETS["g1-tanh-sigmoid-ce"].build()
    with pytest.raises(ValueError, match=r"no CUDA GPU .* NUMBA_ENABLE_CUDASIM=1"):
        sb.compile(net, target="cuda")
