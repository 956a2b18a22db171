"""The generated code: one source of truth, width-independent, dtype-clean."""

import re
import time

import sympy as sp

import symbp as sb
from symbp.backends.cpu.module import generate_source


def _net(width: int, act: str = "tanh") -> sb.Network:
    return sb.Network(inputs=width, layers=[sb.Dense(width, activation=act), sb.Dense(width, activation=act),
                                            sb.Dense(10)], l2=1e-4)


def test_derivation_and_code_do_not_grow_with_width():
    sources, costs = {}, {}
    for width in (16, 4096):
        start = time.process_time()
        sources[width] = generate_source(sb.derive(_net(width)), "float32")
        costs[width] = time.process_time() - start
    # The same program: only the width constants differ.
    strip = [re.sub(r"\b(16|4096)\b", "W", s).replace("mlp-W-W-W-10", "NAME") for s in sources.values()]
    assert strip[0] == strip[1]
    assert len(sources[16].splitlines()) == len(sources[4096].splitlines())


def test_float32_module_has_no_float64_literals():
    src = generate_source(sb.derive(_net(8, "z*tanh(log(1 + exp(z)))")), "float32")
    code = re.sub(r'"""(.|\n)*?"""', "", src)  # docstrings
    code = re.sub(r"np\.float32\(-?\d+\.\d+(e[-+]?\d+)?\)", "F32", code)
    offending = [line.strip() for line in code.splitlines()
                 if re.search(r"\d+\.\d+", line.split("#")[0])]
    # Only the float64 accumulators of the loss and the l2 penalty may hold a float64 literal:
    # they sum float32 terms in double precision on purpose.
    assert set(offending) <= {"total = 0.0", "penalty = 0.0", "total, correct = 0.0, 0"}, offending


def test_kernel_header_prints_the_derivation_it_implements():
    net = _net(4, "sigmoid")
    d = sb.derive(net)
    src = generate_source(d, "float64")
    for ld in d.layers:
        assert f"delta{ld.index}[n, p] = {ld.delta_formula}" in src
        assert f"dC/dW{ld.index} = {ld.grads['W']}" in src
    # σ′ = a(1 − a) is what the backward kernel evaluates, read from the stored output.
    assert d.layers[0].layer.activation.derivative_in_a == sp.Symbol("a", real=True) * (1 - sp.Symbol("a", real=True))
    assert "(ONE - A1[n, p])" in src or "(-A1[n, p] + ONE)" in src


def test_sgd_update_rides_on_the_gemm(tmp_path):
    net = sb.Network(inputs=6, layers=[sb.Dense(5, activation="relu"), sb.Dense(3)], l2=0.01)
    model = sb.compile(net, dtype="float64", cache_dir=tmp_path)
    source = model._train_kernels(sb.SGD(lr=0.1)).__file__
    text = open(source).read()
    # W ← (1 − lr·λ)·W − lr·δᵀa: one GEMM with α = −lr, β = 1 − lr·λ, no separate update loop.
    fused = text[text.index("def backward_update"):text.index("def backward_grads")]
    assert re.search(r"gemm\(dZ2, True, A1, False, W2, -h_lr, .*h_lr", fused)
    assert "W2[p, q] = " not in fused
    # Data-parallel training's update reads the summed gradient instead: one loop, λθ added there.
    update = text[text.index("def update"):text.index("def train_epoch")]
    assert "W2[p, q] = -h_lr*((0.01)*W2[p, q] + dW2[p, q]) + W2[p, q]" in update


def test_cuda_helpers_are_the_cpu_helpers_as_device_functions():
    from symbp.backends import common
    from symbp.backends.cuda import emit as cuda

    assert set(cuda._HELPERS) == set(common.HELPERS) - {"tanh32"}
    for name, text in cuda._HELPERS.items():
        assert "@cuda.jit(device=True" in text and "@njit" not in text, name
        assert text.split("\n", 2)[2] == common.HELPERS[name].split("\n", 2)[2], name  # same body


def test_row_argmax_is_numpys_argmax():
    """The loop that counts a batch's correct predictions picks what np.argmax picks: the
    first maximum, or the first NaN (ties and NaN drawn often; float32 and float64)."""
    import numpy as np
    from numba import njit

    from symbp.backends import common

    space = {"njit": njit, "FASTMATH": {"contract", "arcp", "nsz"}, "np": np}
    exec(common.HELPERS["row_argmax"].replace("cache=True, ", ""), space)
    row_argmax = space["row_argmax"]
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        for _ in range(500):
            x = rng.integers(-2, 3, rng.integers(1, 9)).astype(dtype)
            if rng.random() < 0.3:
                x[rng.integers(0, len(x), rng.integers(1, 3))] = np.nan
            assert row_argmax(x) == np.argmax(x), x


def test_readme_kernel_excerpt_is_what_the_generator_writes():
    """The README shows the digits MLP's fused backward + SGD function whole: it must be the
    generator's current text, not a copy that drifted."""
    from pathlib import Path

    from symbp.backends.cpu.module import generate_train_source

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"```python\n(def backward_update\(.*?)```", readme, re.S)
    assert shown, "README has no backward_update excerpt"
    net = sb.Network(inputs=64, layers=[sb.Dense(64, activation="tanh"), sb.Dense(10)],
                     loss="softmax_cross_entropy", l2=1e-4, name="digits-mlp")
    src = generate_train_source(sb.derive(net), "float32", sb.SGD(lr=0.1), "model_module")
    body = src[src.index("def backward_update("):]
    body = body[:body.index("    return penalty\n") + len("    return penalty\n")]
    assert shown.group(1) == body
