"""One process of the data-parallel tests (tests/test_distributed.py starts it under mpiexec,
or alone for the one-process reference).  ``python _mpi_worker.py CASE OUTDIR [ARGS]``:
each process writes ``OUTDIR/CASE-<ranks>-<rank>.json`` with its parameters, history, the
hash of its parameters and, if fit raised, the error's type and message."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import symbp as sb
from symbp import distributed


def comm_world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def mlp():
    net = sb.Network(inputs=7, layers=[sb.Dense(6, activation="tanh"), sb.Dense(3)], loss="softmax_cross_entropy",
                     l2=1e-3)
    return net, sb.compile(net, dtype="float64", seed=0)


def data(rows=101, width=7, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, width)), rng.integers(0, classes, rows)


def run(case: str, comm, rank: int, args: list[str]) -> dict:
    if case == "adam":  # Adam with l2 and a schedule, 101 rows in batches of 10: the last has 1 row
        _, model = mlp()
        X, y = data()
        h = model.fit(X, y, optimizer=sb.Adam(lr=0.01), batch_size=10, epochs=3, seed=3, schedule=sb.StepDecay(2),
                      validation_data=(X[:17], y[:17]), progress=False, comm=comm)
        return {"params": model.params, "history": h.history, "comm": h.comm}
    if case == "sgd":  # plain SGD with l2 and a schedule: on one machine, the δ-exchange step
        net = sb.Network(inputs=7, layers=[sb.Dense(9, activation="tanh"), sb.Dense(6, activation="relu"),
                                           sb.Dense(3)], loss="softmax_cross_entropy", l2=1e-3)
        model = sb.compile(net, dtype="float64", seed=0)
        for k in ("b1", "b2", "b3"):  # non-zero biases
            model.params[k][:] = np.linspace(-0.1, 0.2, model.params[k].size)
        X, y = data()
        h = model.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=10, epochs=3, seed=3, schedule=sb.StepDecay(2),
                      validation_data=(X[:17], y[:17]), progress=False, comm=comm)
        return {"params": model.params, "history": h.history, "comm": h.comm}
    if case in ("cnn", "cnn_sgd"):  # conv, pooling, dense; SGD with momentum (the unfused update path), or
        # plain SGD: the Dense weight's update on the δ exchange, the conv's from gradient buffers
        net = sb.Network(inputs=(1, 6, 6), layers=[sb.Conv2D(2, 3, activation="relu"), sb.MaxPool2D(2),
                                                   sb.Flatten(), sb.Dense(3)], loss="softmax_cross_entropy", l2=1e-3)
        model = sb.compile(net, dtype="float64", seed=0)
        X, y = data(rows=37, width=36)
        opt = sb.SGD(lr=0.05, momentum=0.9) if case == "cnn" else sb.SGD(lr=0.05)
        h = model.fit(X.reshape(37, 1, 6, 6), y, optimizer=opt, batch_size=8, epochs=2,
                      seed=1, progress=False, comm=comm)
        return {"params": model.params, "history": h.history, "comm": h.comm}
    if case == "batchnorm":  # BatchNorm and Dropout: the global batch's statistics and masks
        net = sb.Network(inputs=7, layers=[sb.Dense(6), sb.BatchNorm(), sb.Dense(5, activation="relu"),
                                           sb.Dropout(0.3), sb.Dense(3)], loss="softmax_cross_entropy", l2=1e-3)
        model = sb.compile(net, dtype="float64", seed=0)
        model.params["b2"][:] = np.linspace(-0.2, 0.3, 6)  # BatchNorm's shift, non-zero
        X, y = data(rows=102)  # the last batch has 2 rows: on 3 processes one has none
        # (Not Adam: the bias before a BatchNorm has a gradient of 0 up to rounding, which
        # Adam's division by √v̂ would scale up to whole steps, apart in every run.)
        h = model.fit(X, y, optimizer=sb.SGD(lr=0.05, momentum=0.9), batch_size=10, epochs=3, seed=4,
                      validation_data=(X[:17], y[:17]), progress=False, comm=comm)
        return {"params": model.params, "history": h.history}
    if case == "resume":  # args: epochs to run, the checkpoint to start from ("-": none), where to save
        start, save = args[1], args[2]
        if start == "-":
            _, model = mlp()
            initial = 0
        else:
            model = sb.load(start)
            initial = model.epoch
        X, y = data()
        cbs = [] if save == "-" else [sb.ModelCheckpoint(save)]
        h = model.fit(X, y, optimizer=model.optimizer or sb.Adam(lr=0.01), batch_size=10, epochs=int(args[0]),
                      initial_epoch=initial, seed=3, progress=False, comm=comm, callbacks=cbs)
        return {"params": model.params, "history": h.history}
    if case == "bad_shard":  # rank 1's data has a NaN
        _, model = mlp()
        X, y = data()
        if rank == 1:
            X[5, 2] = np.nan
        model.fit(X, y, batch_size=10, epochs=1, progress=False, comm=comm)
    if case == "dtype":  # rank 2's data is float32
        _, model = mlp()
        X, y = data()
        model.fit(X if rank != 2 else X.astype(np.float32), y, batch_size=10, epochs=1, progress=False, comm=comm)
    if case == "nan":  # a learning rate that makes the loss overflow
        _, model = mlp()
        X, y = data()
        before = {k: v.copy() for k, v in model.params.items()}
        try:
            model.fit(X * 1e150, y, optimizer=sb.SGD(lr=1e150), batch_size=10, epochs=2, progress=False, comm=comm)
        finally:
            assert all(np.array_equal(before[k], v) for k, v in model.params.items())
    if case == "callback":  # rank 0's callback fails (a full disk, say) after the first epoch
        class DiskFull(sb.train.callbacks.Callback):
            def on_epoch_end(self, model, epoch, metrics):
                if rank == 0:
                    raise OSError(28, "No space left on device")
                return False

        _, model = mlp()
        X, y = data()
        model.fit(X, y, batch_size=10, epochs=3, progress=False, comm=comm, callbacks=[DiskFull()])
    if case == "diverge":  # rank 1's callback nudges a weight: the epoch's hash check must catch it
        class Nudge(sb.train.callbacks.Callback):
            def on_epoch_end(self, model, epoch, metrics):
                if rank == 1:
                    model.params["W1"][0, 0] += 1e-12
                return False

        _, model = mlp()
        X, y = data()
        model.fit(X, y, batch_size=10, epochs=2, progress=False, comm=comm, callbacks=[Nudge()])
    if case == "killed":  # args: checkpoint path; rank 1 dies in epoch 2, rank 0 has saved epochs 0 and 1
        class Die(sb.train.callbacks.Callback):
            def on_epoch_end(self, model, epoch, metrics):
                if epoch == 2 and rank == 1:
                    os.kill(os.getpid(), 9)
                return False

        _, model = mlp()
        X, y = data()
        model.fit(X, y, batch_size=10, epochs=50, progress=False, comm=comm,
                  callbacks=[sb.ModelCheckpoint(args[0]), Die()])
    if case == "bn_fail":  # rank 1's step fails before its kernel: the others wait in a BatchNorm sum
        import symbp.backends.cpu.distributed as dist

        net = sb.Network(inputs=7, layers=[sb.Dense(6), sb.BatchNorm(), sb.Dense(3)], loss="softmax_cross_entropy")
        model = sb.compile(net, dtype="float64", seed=0)
        X, y = data(rows=102)
        if rank == 1:
            steps = {"k": 0}
            real = dist.DistributedRun._row0

            def failing(self, k):
                steps["k"] += 1
                if steps["k"] == 4:
                    raise MemoryError("no memory for this step's rows")
                return real(self, k)

            dist.DistributedRun._row0 = failing
        model.fit(X, y, batch_size=10, epochs=1, progress=False, comm=comm)
    if case in ("sharded", "sharded_sgd"):  # each process its own 40 + 10·rank rows, and its own validation part
        _, model = mlp()
        X, y = data(rows=40 + 10 * rank, seed=10 + rank)
        opt = sb.Adam(lr=0.01) if case == "sharded" else sb.SGD(lr=0.1)
        h = model.fit(X, y, optimizer=opt, batch_size=16, epochs=3, seed=2, progress=False, comm=comm,
                      sharded=True, validation_data=(X[:9], y[:9]))
        return {"params": model.params, "history": h.history, "comm": h.comm}
    return {}


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    ranks = distributed.launched_size()
    comm = comm_world() if ranks > 1 else None
    rank = 0 if comm is None else comm.Get_rank()
    record: dict = {}
    try:
        record = run(case, comm, rank, sys.argv[3:])
    except Exception as err:  # noqa: BLE001 - the test reads what each process raised
        record = {"error": type(err).__name__, "message": str(err)}
    if "params" in record:
        record["hash"] = distributed.fingerprint([record["params"][k] for k in sorted(record["params"])])
        record["params"] = {k: v.tolist() for k, v in record["params"].items()}
    (out / f"{case}-{ranks}-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
