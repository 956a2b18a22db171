"""Data-parallel training on MPI (fit(comm=...), symbp train under mpiexec): N processes
compute what one does; their parameters stay the same bits; a checkpoint resumes on another
process count; one failing process stops all of them, with its message, within seconds.

Each case runs ``mpiexec -n 2`` or ``-n 3`` on tests/_mpi_worker.py (the ``mpi`` extra:
mpi4py and the MPICH wheel's launcher); three processes on two cores is fine, just slower.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from symbp import distributed
from symbp.backends.cpu import node_share

WORKER = Path(__file__).with_name("_mpi_worker.py")
ROOT = Path(__file__).resolve().parent.parent

mpi4py = pytest.importorskip("mpi4py", reason="the mpi extra (mpi4py + MPICH) is not installed")
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (the mpich wheel brings one)")


def launch(case: str, ranks: int, out: Path, *args: str, timeout: float = 240,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the worker's ``case`` on ``ranks`` processes (1: plain python, no launcher)."""
    cmd = [sys.executable, str(WORKER), case, str(out), *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    env = {k: v for k, v in os.environ.items()
           if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", node_share.ENV, node_share.EXCHANGE_ENV)}
    env.update(extra_env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)


def records(case: str, ranks: int, out: Path) -> list[dict]:
    return [json.loads((out / f"{case}-{ranks}-{r}.json").read_text()) for r in range(ranks)]


def rel(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.subtract(a[k], b[k]))) / np.max(np.abs(a[k]))) for k in a)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mpi")


@pytest.mark.parametrize("case, transport", [("adam", "shared-memory window"), ("adam", "Allreduce"),
                                             ("sgd", "shared-memory window, δ exchanged"), ("sgd", "Allreduce"),
                                             ("cnn", "shared-memory window"),
                                             ("cnn_sgd", "shared-memory window, δ exchanged"),
                                             ("batchnorm", "shared-memory window"), ("batchnorm", "Allreduce")])
def test_n_processes_equal_one(out, case, transport):
    """2 and 3 processes (uneven slices: the last batch of one row leaves two idle) give the
    one-process parameters and history to 1e-12 in float64; every process the same bits.  On
    one machine the step goes through a shared-memory window (with plain SGD, exchanging δ and
    the layer inputs for the weights); ``SYMBP_SHARED_WINDOW=0`` takes the Allreduce path that
    runs between machines."""
    assert launch(case, 1, out).returncode == 0
    (one,) = records(case, 1, out)
    assert "error" not in one, one
    env = {node_share.ENV: "0"} if transport == "Allreduce" else {}
    for ranks in (2, 3):
        proc = launch(case, ranks, out, extra_env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        every = records(case, ranks, out)
        assert all("error" not in r for r in every), every
        assert len({r["hash"] for r in every}) == 1  # the same bits on every process
        assert rel(one["params"], every[0]["params"]) < 1e-12
        for key, values in one["history"].items():
            np.testing.assert_allclose(every[0]["history"][key], values, rtol=1e-12, err_msg=key)
        assert all(r["history"] == every[0]["history"] for r in every)
        if case in ("adam", "sgd"):
            assert every[0]["comm"]["ranks"] == ranks and every[0]["comm"]["steps"] == 33
        if "comm" in every[0]:
            assert every[0]["comm"]["transport"] == transport


def test_resume_on_another_process_count(out):
    """Saved after 2 epochs on 3 processes, resumed for 2 more on 1 and on 2: the weights of
    an unbroken 4-epoch run on 3."""
    ckpt = out / "run3.npz"
    assert launch("resume", 3, out, "2", "-", str(ckpt)).returncode == 0
    unbroken = out / "unbroken"
    unbroken.mkdir()
    assert launch("resume", 3, unbroken, "4", "-", "-").returncode == 0
    (ref, *_) = records("resume", 3, unbroken)
    for ranks in (1, 2):
        where = out / f"resumed{ranks}"
        where.mkdir()
        proc = launch("resume", ranks, where, "4", str(ckpt), "-")
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = records("resume", ranks, where)[0]
        assert "error" not in got, got
        assert rel(ref["params"], got["params"]) < 1e-12
        np.testing.assert_allclose(got["history"]["loss"], ref["history"]["loss"][2:], rtol=1e-12)


@pytest.mark.parametrize("case, ranks, kind, words", [
    ("bad_shard", 2, "ValueError", ["rank 1 of 2", "NaN"]),
    ("dtype", 3, "ValueError", ["different X dtype", "'float64' on ranks 0, 1", "'float32' on rank 2"]),
    ("nan", 2, "FloatingPointError", ["NaN or infinite", "epoch 0"]),
    ("callback", 3, "OSError", ["rank 0 of 3", "No space left on device"]),
    ("diverge", 2, "RuntimeError", ["parameters differ between processes", "ranks [1]"]),
    ("bn_fail", 3, "MemoryError", ["rank 1 of 3", "no memory for this step's rows"]),
])
def test_one_failing_process_stops_all(out, case, ranks, kind, words):
    """The error of one process is raised on every process, the same type and message, and
    the job ends (no process waits in a collective)."""
    start = time.monotonic()
    proc = launch(case, ranks, out, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the worker records the error and exits
    every = records(case, ranks, out)
    assert {r.get("error") for r in every} == {kind}, every
    assert len({r["message"] for r in every}) == 1
    for word in words:
        assert word in every[0]["message"]
    assert time.monotonic() - start < 100


def test_killed_process_ends_the_job_and_the_checkpoint_is_intact(out):
    """A process killed outright (SIGKILL in epoch 2): mpiexec ends the others; rank 0's last
    checkpoint loads."""
    import symbp as sb

    ckpt = out / "killed.npz"
    start = time.monotonic()
    proc = launch("killed", 2, out, str(ckpt), timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 100
    model = sb.load(ckpt)
    assert model.epoch in (2, 3)  # saved after epochs 1 (and 2, when rank 0 got there first)
    assert all(np.isfinite(v).all() for v in model.params.values())


def test_sharded(out):
    """Each process passes its own rows: the processes still agree bit for bit, the epoch
    counts every process's rows, and the loss falls."""
    proc = launch("sharded", 2, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = records("sharded", 2, out)
    assert all("error" not in r for r in every), every
    assert every[0]["hash"] == every[1]["hash"] and every[0]["history"] == every[1]["history"]
    assert every[0]["comm"]["steps"] == 3 * 6  # ceil((40 + 50) / 16) steps an epoch
    loss = every[0]["history"]["loss"]
    assert loss[-1] < loss[0]


def test_sharded_delta_exchange_equals_gradient_buffers(out):
    """Sharded data with plain SGD: the δ-exchange step (each process's rows at its offset in
    the global batch) gives what the window's gradient-buffer step gives, to 1e-12."""
    runs = {}
    for exchange in ("1", "0"):
        proc = launch("sharded_sgd", 2, out, extra_env={node_share.EXCHANGE_ENV: exchange})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[exchange] = records("sharded_sgd", 2, out)
        assert all("error" not in r for r in runs[exchange]), runs[exchange]
    assert runs["1"][0]["comm"]["transport"] == "shared-memory window, δ exchanged"
    assert runs["0"][0]["comm"]["transport"] == "shared-memory window"
    assert runs["1"][0]["hash"] == runs["1"][1]["hash"]
    assert rel(runs["0"][0]["params"], runs["1"][0]["params"]) < 1e-12
    np.testing.assert_allclose(runs["1"][0]["history"]["loss"], runs["0"][0]["history"]["loss"], rtol=1e-12)


def test_cli_train_under_mpiexec(out, tmp_path):
    """``mpiexec -n 2 symbp train examples/digits_mlp.toml`` prints what one process prints
    (once), and a per-rank data pattern trains on shards."""
    spec = ROOT / "examples" / "digits_mlp.toml"
    symbp = [sys.executable, "-m", "symbp"]
    one = subprocess.run(symbp + ["train", str(spec), "-q", "--epochs", "5"], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    two = subprocess.run([MPIEXEC, "-n", "2"] + symbp + ["train", str(spec), "-q", "--epochs", "5",
                                                         "--save", "run.npz"],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    held = [line for line in one.stdout.splitlines() if line.startswith(("held-out", "training set"))]
    assert held and all(two.stdout.count(line) == 1 for line in held), (one.stdout, two.stdout)
    assert "data-parallel: 2 processes" in two.stdout
    assert (tmp_path / "run.npz").exists()
    rng = np.random.default_rng(0)
    for rank in range(2):
        np.savez(tmp_path / f"part-{rank}.npz", X=rng.normal(size=(60, 64)), y=rng.integers(0, 10, 60))
    shards = subprocess.run([MPIEXEC, "-n", "2"] + symbp + ["train", str(spec), "-q", "--epochs", "2",
                                                            "--data", "part-{rank}.npz"],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert shards.returncode == 0, shards.stderr[-3000:]
    assert "from its own shard" in shards.stdout and "the held-out parts of 2 shards" in shards.stdout
    missing = subprocess.run([MPIEXEC, "-n", "2"] + symbp + ["train", str(spec), "-q", "--data", "none-{rank}.npz"],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert missing.returncode != 0
    assert missing.stderr.count("symbp: error: rank 0 of 2: data file") == 1, missing.stderr


def test_without_the_extra_the_message_names_it(monkeypatch):
    """A launch on several processes, or comm=, without mpi4py: the message names the extra."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(ImportError, match=r"symbp\[mpi\]"):
        distributed.world()
    with pytest.raises(ImportError, match=r"symbp\[mpi\]"):
        distributed.communicator(object())


def test_arguments_checked_without_mpi():
    import symbp as sb

    net = sb.Network(inputs=3, layers=[sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64")
    X = np.zeros((4, 3))
    with pytest.raises(ValueError, match="give the processes' communicator"):
        model.fit(X, np.zeros((4, 2)), sharded=True, progress=False)
    with pytest.raises(ValueError, match="sharded must be True or False"):
        model.fit(X, np.zeros((4, 2)), sharded="yes", progress=False)
    with pytest.raises(TypeError, match="intra-communicator"):
        model.fit(X, np.zeros((4, 2)), comm="world", progress=False)
    assert distributed.split(10, 3, 0) == (0, 4) and distributed.split(10, 3, 2) == (7, 10)
    assert distributed.split(1, 3, 1) == (1, 1)


def test_shared_window_only_where_dev_shm_has_room(monkeypatch):
    """A window larger than /dev/shm's free space (a container's is often 64 MiB) would die of
    SIGBUS on first touch: the fit takes the Allreduce path instead."""
    monkeypatch.setattr(node_share.shutil, "disk_usage", lambda path: __import__("collections").namedtuple(
        "usage", "total used free")(64 << 20, 0, 64 << 20))
    assert not node_share.room_for(8 << 20)  # 8 MiB + the margin MPICH's own segments need
    monkeypatch.setattr(node_share.shutil, "disk_usage", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    assert node_share.room_for(8 << 20)  # no /dev/shm: the MPI library places the window elsewhere
