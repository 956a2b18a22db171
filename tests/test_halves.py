"""A CNN's batches as two halves on two threads (the generated train_epoch_halves, chosen by
symbp.backends.cpu.runtime): each half's gradient sums into its own buffers, one update from
both.  Training against PyTorch on batches whose halves differ in size, a last batch of one row,
momentum, Adam and l2; a NaN stops it as it stops train_epoch; dense networks keep train_epoch."""

from __future__ import annotations

import numpy as np
import pytest
from _support import rel_err

import symbp as sb
from symbp.backends.cpu import runtime

torch = pytest.importorskip("torch")
F = torch.nn.functional
numba = pytest.importorskip("numba")

pytestmark = pytest.mark.skipif(numba.get_num_threads() < 2, reason="two halves need two threads")


def cnn(l2=0.0):
    return sb.Network(inputs=(1, 10, 10), layers=[sb.Conv2D(4, 3, activation="relu"), sb.MaxPool2D(2),
                                                  sb.Conv2D(3, 2, activation="tanh"), sb.Flatten(), sb.Dense(3)],
                      loss="softmax_cross_entropy", l2=l2)


def torch_logits(p, X):
    a = F.max_pool2d(torch.relu(F.conv2d(torch.as_tensor(X).reshape(-1, 1, 10, 10), p["W1"], p["b1"])), 2)
    a = torch.tanh(F.conv2d(a, p["W3"], p["b3"]))
    return a.flatten(1) @ p["W5"].T + p["b5"]


@pytest.fixture
def halves_now(monkeypatch):
    """train_epoch_halves compiled before the first epoch, and every calls counted."""
    monkeypatch.setattr(runtime, "HALVES_WAIT", True)
    calls = {"halves": 0, "whole": 0}
    real = runtime.HostRun.epoch

    def epoch(self, *args, **kw):
        before = set(runtime._READY)
        out = real(self, *args, **kw)
        ready = self._halves() is not None and self.kernels.__name__ in (before | runtime._READY)
        calls["halves" if ready else "whole"] += 1
        return out
    monkeypatch.setattr(runtime.HostRun, "epoch", epoch)
    return calls


@pytest.mark.parametrize("opt, l2", [("sgd", 0.0), ("momentum", 0.01), ("adam", 0.0)])
def test_halves_train_like_torch(tmp_path, halves_now, opt, l2):
    """Batches of 19 (halves of 10 and 9), then 19, then one row; float64 to 1e-10."""
    model = sb.compile(cnn(l2), dtype="float64", seed=3, cache_dir=tmp_path)
    rng = np.random.default_rng(5)
    model.params["b1"] = rng.normal(size=4) * 0.3
    X, y = rng.normal(size=(39, 100)), rng.integers(0, 3, 39)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    mine, theirs = {"sgd": (sb.SGD(lr=0.1), lambda: torch.optim.SGD(tp.values(), lr=0.1)),
                    "momentum": (sb.SGD(lr=0.1, momentum=0.9), lambda: torch.optim.SGD(tp.values(), lr=0.1, momentum=0.9)),
                    "adam": (sb.Adam(lr=0.01), lambda: torch.optim.Adam(tp.values(), lr=0.01))}[opt]
    theirs = theirs()
    hist = model.fit(X, y, optimizer=mine, batch_size=19, epochs=2, shuffle=False, progress=False)
    assert halves_now == {"halves": 2, "whole": 0}
    losses = []
    for _ in range(2):
        total = 0.0
        for b in range(0, 39, 19):
            theirs.zero_grad()
            loss = F.cross_entropy(torch_logits(tp, X[b:b + 19]), torch.as_tensor(y[b:b + 19]))
            if l2:
                loss = loss + l2 / 2 * sum((v ** 2).sum() for k, v in tp.items() if k.startswith("W"))
            loss.backward()
            theirs.step()
            total += loss.item() * len(X[b:b + 19])
        losses.append(total / 39)
    for k, v in tp.items():
        assert rel_err(model.params[k], v.detach().numpy()) <= 1e-10, k
    assert np.allclose(hist.history["loss"], losses, rtol=1e-10)


def test_halves_stop_where_train_epoch_stops(tmp_path, halves_now, monkeypatch):
    """A learning rate of 1e250 blows the weights up within a few batches: the halves stop at
    the first batch whose loss is not finite, before its update, and fit puts the parameters
    back, as train_epoch does (the same message, the same parameters)."""
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(96, 100)), rng.integers(0, 3, 96)
    outcome = {}
    for way in ("halves", "whole"):
        if way == "whole":
            monkeypatch.setattr(runtime, "HALVES_MIN_ROWS", 10 ** 9)
        model = sb.compile(cnn(), dtype="float64", seed=3, cache_dir=tmp_path / way)
        before = {k: v.copy() for k, v in model.params.items()}
        with pytest.raises(FloatingPointError) as err:
            model.fit(X, y, optimizer=sb.SGD(lr=1e250), batch_size=16, epochs=1, shuffle=False, progress=False)
        assert all(np.array_equal(before[k], model.params[k]) for k in before)
        outcome[way] = str(err.value)
    assert "batch" in outcome["halves"] and outcome["halves"] == outcome["whole"], outcome
    assert halves_now == {"halves": 1, "whole": 1}


def test_dense_networks_keep_train_epoch(tmp_path, halves_now):
    mlp = sb.Network(inputs=20, layers=[sb.Dense(16, activation="relu"), sb.Dense(3)], loss="softmax_cross_entropy")
    model = sb.compile(mlp, dtype="float64", seed=0, cache_dir=tmp_path)
    X, y = np.random.default_rng(0).normal(size=(64, 20)), np.arange(64) % 3
    model.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=1, progress=False)
    assert halves_now == {"halves": 0, "whole": 1}


def test_the_halves_compile_beside_the_epochs(tmp_path):
    """Without HALVES_WAIT the first epoch runs train_epoch and a later one starts the halves'
    compile in the background; once it is done, epochs run as halves."""
    model = sb.compile(cnn(), dtype="float32", seed=1, cache_dir=tmp_path)
    X, y = np.random.default_rng(2).normal(size=(64, 100)).astype(np.float32), np.arange(64) % 3
    opt = sb.SGD(lr=0.05)
    model.fit(X, y, optimizer=opt, batch_size=32, epochs=2, shuffle=False, progress=False)
    kernels = model._train_kernels(opt)
    assert runtime.wait_for_halves(kernels, timeout=300)
    before = {k: v.copy() for k, v in model.params.items()}
    model.fit(X, y, optimizer=opt, batch_size=32, epochs=1, shuffle=False, progress=False)
    assert kernels.train_epoch_halves.signatures and any(not np.array_equal(before[k], model.params[k]) for k in before)


def test_a_halves_compile_that_fails_warns_and_leaves_train_epoch():
    def broken(*args):
        raise TypeError("no matching definition")

    with pytest.warns(RuntimeWarning, match="two-thread training step of mod_x did not compile .*TypeError: no "
                                            "matching definition.*one-thread step"):
        runtime._compile("mod_x", broken, ())
    assert "mod_x" not in runtime._READY


def test_a_process_that_ends_while_the_halves_compile_exits_cleanly(tmp_path):
    """A script that ends while the halves still compile in the background (their compile
    starts with a fit's second epoch) waits for that compile, then exits with status 0: the
    halves' compiled code is in the cache afterwards.  It used to end in the interpreter's
    teardown, which freed LLVM's objects beneath the compiling thread: an LLVM assertion
    (status 134) or a segfault, when the script ended 2-4 s after its fit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import numpy as np, symbp as sb\n"
        "net = sb.Network(inputs=(1, 10, 10), layers=[sb.Conv2D(4, 3, activation='relu'), sb.MaxPool2D(2),\n"
        "                 sb.Flatten(), sb.Dense(3)], loss='softmax_cross_entropy')\n"
        "m = sb.compile(net, dtype='float32', seed=0)\n"
        "X, y = np.random.default_rng(0).normal(size=(64, 100)).astype(np.float32), np.arange(64) % 3\n"
        "m.fit(X, y, batch_size=32, epochs=2, progress=False)\n"
        "print('fitted', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SYMBP_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0 and "fitted" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert list(Path(tmp_path).glob("__pycache__/*.train_epoch_halves-*.nbi")), sorted(Path(tmp_path).rglob("*"))
