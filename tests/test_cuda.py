"""The CUDA target, tested without a GPU.

Three runs, each in a process of its own and started together:

* ``tests/cuda_sim_cases.py`` under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, which
  must be set before Numba is imported; this process runs the real CPU target): loss,
  gradients, predictions and training against the CPU target and PyTorch, bad input.
* ``tests/cuda_sim_cnn_cases.py``, the same for the image layers (a process of its own: most
  of its time is the CPU twin's Numba compile, which then overlaps the others).
* ``tests/cuda_ptx_cases.py`` in real CUDA mode: every generated kernel compiled to PTX, so
  type errors the simulator lets through fail here.

Each case file can also be run on its own (see its docstring); on a machine with a GPU,
``python -m pytest tests/cuda_sim_cases.py`` with ``NUMBA_ENABLE_CUDASIM=1`` left out runs
the simulator cases on the device instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="the CUDA target needs numba-cuda (pip install 'symbp[cuda]'), not installed")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds per run; together they take about 1.5 minutes on two cores


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start both case files at once; each test waits for its own."""
    started = {}
    for name, sim in (("cuda_sim_cases.py", "1"), ("cuda_sim_cnn_cases.py", "1"), ("cuda_ptx_cases.py", "0")):
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": sim, "PYTHONDONTWRITEBYTECODE": "1"}
        env["SYMBP_CACHE_DIR"] = str(tmp_path_factory.mktemp(name.split(".")[0]))
        log = tmp_path_factory.mktemp("logs") / f"{name}.log"
        fh = open(log, "w+")  # noqa: SIM115 - read back once the run ends
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{name}"]
        started[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT), fh, time.time())
    yield started
    for proc, fh, _ in started.values():
        if proc.poll() is None:
            proc.kill()
        fh.close()


def _wait(runs, name):
    proc, fh, start = runs[name]
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    fh.seek(0)
    output = fh.read()
    assert code == 0, f"tests/{name} failed ({code}) after {time.time() - start:.0f} s:\n{output[-20000:]}"
    assert " passed" in output.strip().splitlines()[-1], f"tests/{name} ran no test:\n{output[-3000:]}"


def test_simulator_cases(runs):
    """Kernels on the simulator agree with the CPU target (1e-10) and PyTorch; bad input is refused."""
    _wait(runs, "cuda_sim_cases.py")


def test_simulator_image_layer_cases(runs):
    """Conv, pooling, Flatten and Maxout kernels on the simulator agree with the CPU target (1e-10)."""
    _wait(runs, "cuda_sim_cnn_cases.py")


def test_every_kernel_compiles_to_ptx(runs):
    """Every generated kernel, compiled for sm_80 by NVVM without a GPU."""
    _wait(runs, "cuda_ptx_cases.py")


def test_missing_numba_cuda_is_named(monkeypatch):
    import importlib.util

    import symbp as sb
    from symbp.backends.cuda import model as cuda_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    net = sb.Network(inputs=2, layers=[sb.Dense(2)], loss="mse")
    with pytest.raises(ImportError, match=r"needs the numba-cuda package, which is not installed: pip install 'symbp\[cuda\]'"):
        sb.compile(net, target="cuda")
    with pytest.raises(ImportError, match="numba-cuda"):
        cuda_model.require_cuda()
