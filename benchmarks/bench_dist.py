"""Data-parallel training benchmark: symbp's ``fit(..., comm=MPI.COMM_WORLD)`` on this machine.

What is measured
----------------
Training throughput (samples/s) of one float32 ``model.fit`` in two set-ups that use the
same cores:

    1 process x 2 threads   plain ``fit`` (no comm), in the environment symbp's users get
                            (OpenBLAS and Numba pick their own thread counts: 2 here)
    R ranks x 1 thread      ``mpiexec -n R python bench_dist.py --worker ...`` with
                            OPENBLAS_NUM_THREADS=1, NUMBA_NUM_THREADS=1, OMP_NUM_THREADS=1;
                            ``fit(..., comm=MPI.COMM_WORLD)``: batch_size is the global batch,
                            each rank computes its slice, one Allreduce of one flat gradient
                            buffer per step, every rank applies the same update

and, for the scaling model below, ``1 process x 1 thread`` (plain fit, the 1-thread env):
the compute time per sample on one core.

Workloads (fully connected, softmax cross-entropy, random data, 10 classes):

    medium  784-256-256-10     batch 128   relu hidden   (269,322 parameters)
    large   784-1024-1024-10   batch 256   relu hidden   (1,863,690 parameters)

each with SGD (lr=0.01) and Adam (lr=1e-3, torch's defaults otherwise). A worker builds the
model (symbp's compile cache: the first run of the benchmark compiles, later ones load),
warms up with a short fit (JIT of the distributed kernels), then times ``--reps`` fits of
``--epochs`` epochs over ``--rows`` rows. Each rep is timed from a barrier to the end of
the slowest rank's fit.

Then a bare mpi4py Allreduce (in place, float32, MPI.SUM) with R ranks, from 8 bytes
(latency) and 1 KiB to 64 MiB, plus both nets' gradient sizes. From it, the alpha-beta
model of ring allreduce

    T_ar(p, n) = 2 (p - 1) alpha + 2 ((p - 1) / p) n beta

is fitted: alpha = T(8 B) / (2 (R - 1)), beta = the slope of T(n) - 2 (R - 1) alpha against
2 ((R - 1) / R) n over the sizes >= 1 MiB, by least squares of the relative error (each size
counts alike). With R = 2 this is T = 2 alpha + n beta.

How to read the table
---------------------
    1p x 2t samples/s   best rep of the one-process, two-thread fit
    2r x 1t samples/s   best rep of the distributed fit (global samples / slowest rank's time)
    ratio               2r x 1t over 1p x 2t (the issue's target: >= 0.9 on the large MLP)
    allreduce ms/step   history.comm["allreduce_s"] / steps, mean over ranks, best rep;
                        includes a rank's wait for the slower one
    share               allreduce_s / history.comm["seconds"]: the step's share in Allreduce
    model ms            T_ar(R, gradient bytes) from the bare-Allreduce alpha and beta
    1p x 1t samples/s   one process, one thread: the per-core compute rate
    contention          share of the machine's CPU used by other processes during the reps

Last, the projected scaling of the alpha-beta model to 8, 16, 32, 64 nodes, each node
computing like one core here: efficiency = compute / (compute + T_ar) at the nets' batch
sizes, and the smallest global batch that keeps efficiency >= 80% -- once for the alpha and
beta measured here (shared memory, optimistic) and once for an ASSUMED 100 Gb/s
InfiniBand-like link (alpha = 2 us, beta = 1/(12.5 GB/s); not measured).

Usage
-----
    python benchmarks/bench_dist.py                    # everything (a few minutes)
    python benchmarks/bench_dist.py --allreduce-only   # only the bare Allreduce, alpha and beta
    python benchmarks/bench_dist.py --nets large --optimizers sgd
    python benchmarks/bench_dist.py --rounds 2         # repeat every worker, keep the best
    python benchmarks/bench_dist.py --alpha 2e-6 --beta 8e-11   # also project with your link
    python benchmarks/bench_dist.py --json dist.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _harness as h
import bench_mlp

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

# The step's settings, shared by every benchmark (symbp's sb.Adam follows torch.optim.Adam exactly).
LR, ADAM_LR, ADAM_BETAS, ADAM_EPS, OPTIMIZERS = h.LR, h.ADAM_LR, h.ADAM_BETAS, h.ADAM_EPS, h.OPTIMIZERS
SEED = 0
CLASSES = 10
CONTENTION_WARN = 0.10
# The environment of every rank of the distributed run (and of the 1-thread baseline).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
# Bare Allreduce sizes in bytes: latency, then 1 KiB ... 64 MiB (x4); the nets' gradients are added.
LATENCY_BYTES = 8
AR_SIZES = [LATENCY_BYTES] + [2 ** k for k in range(10, 27, 2)]
BETA_FROM = 2 ** 20           # beta is fitted over sizes >= 1 MiB
# The assumed interconnect: 100 Gb/s InfiniBand-like. NOT measured.
IB_ALPHA = 2e-6
IB_BETA = 1 / 12.5e9
SCALE_NODES = (8, 16, 32, 64)
EFFICIENCY_GOAL = 0.8
TARGET_RATIO = 0.9


@dataclass(frozen=True)
class Net(bench_mlp.Net):
    """bench_mlp's net, with the epochs of one timed fit here."""

    epochs: int = 1  # default epochs per timed fit (about 1-2 s on 2 cores)

    @property
    def params(self) -> int:
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))


NETS = {
    "medium": Net("medium", 784, (256, 256), CLASSES, 128, "relu", 8),
    "large": Net("large", 784, (1024, 1024), CLASSES, 256, "relu", 1),
}
CONFIGS = ("1p2t", "dist", "1p1t", "ceiling")
CONFIG_LABEL = {"1p2t": "1 process x 2 threads", "dist": "{R} ranks x 1 thread",
                "1p1t": "1 process x 1 thread", "ceiling": "{R} ranks x 1 thread, gradient sums only"}


# ==========================================================================
# Workers
# ==========================================================================

def import_symbp():
    """symbp first, before NumPy, as a user's script would (it sets its BLAS settings)."""
    sys.path.insert(0, str(REPO_ROOT))
    import symbp as sb
    return sb


def make_data(rows: int, inputs: int, seed: int = SEED):
    import numpy as np

    X = np.random.default_rng(seed).standard_normal((rows, inputs), dtype=np.float32)
    y = np.random.default_rng(seed + 1).integers(0, CLASSES, size=rows, dtype=np.int64)
    return X, y


def _busy():
    """(machine busy + stolen CPU seconds since boot, this process's CPU seconds)."""
    stat = h._proc_stat()
    return (None if stat is None else stat[0] + stat[1]), time.process_time()


def worker_fit(args) -> dict | None:
    """Build, warm up, time ``reps`` fits. Under mpiexec (``--dist``) every rank runs this
    and rank 0 returns the result; the other ranks return None."""
    sb = import_symbp()
    import numpy as np

    comm = None
    rank, size = 0, 1
    if args.dist:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    net = NETS[args.net]

    def barrier():
        if comm is not None:
            comm.Barrier()

    t0 = time.perf_counter()
    layers = [sb.Dense(n, activation=net.activation) for n in net.hidden] + [sb.Dense(net.outputs)]
    spec = sb.Network(inputs=net.inputs, layers=layers, loss="softmax_cross_entropy")
    model = sb.compile(spec, target="cpu", dtype="float32", seed=0)
    build_s = time.perf_counter() - t0
    opt = (sb.Adam(lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS) if args.optimizer == "adam"
           else sb.SGD(lr=LR))
    # Every rank holds the same data and passes all of it: fit's global batch is split over ranks.
    X, y = make_data(args.rows, net.inputs)
    extra = {"comm": comm} if comm is not None else {}

    def fit(Xs, ys, epochs):
        return model.fit(Xs, ys, optimizer=opt, batch_size=net.batch, epochs=epochs, seed=SEED,
                         progress=False, **extra)

    # Warm-up: loads (or compiles) the kernels, touches the data and the buffers.
    barrier()
    t0 = time.perf_counter()
    fit(X[: 4 * net.batch], y[: 4 * net.batch], 1)
    warm_s = time.perf_counter() - t0

    reps = []
    for _ in range(args.reps):
        barrier()
        busy0, own0 = _busy()
        t0 = time.perf_counter()
        hist = fit(X, y, args.epochs)
        t1 = time.perf_counter()
        barrier()     # the slowest rank's end: everything after it is idle
        busy1, own1 = _busy()
        rep = {"wall_s": t1 - t0, "own_cpu_s": own1 - own0,
               "busy_s": None if busy0 is None else busy1 - busy0,
               "loss": float(hist.history["loss"][-1]) if hasattr(hist, "history") else None,
               "comm": getattr(hist, "comm", None)}
        reps.append(rep)

    # Do all ranks hold the same parameters after the fits?
    same = None
    if comm is not None:
        flat = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for _, v in sorted(model.params.items())])
        ref = flat.copy() if rank == 0 else np.empty_like(flat)
        comm.Bcast(ref, root=0)
        same = comm.allreduce(float(np.max(np.abs(flat - ref))), op=MPI.MAX)

    env_info = h.worker_env_info()
    gathered = comm.gather((reps, env_info, warm_s, build_s), root=0) if comm is not None \
        else [(reps, env_info, warm_s, build_s)]
    if rank != 0:
        return None

    rows_per_fit = args.rows * args.epochs
    out_reps = []
    for i in range(args.reps):
        per_rank = [g[0][i] for g in gathered]
        wall = max(r["wall_s"] for r in per_rank)
        # Other load: machine busy CPU time (rank 0's view, machine-wide) minus all ranks' own.
        busy = per_rank[0]["busy_s"]
        own = sum(r["own_cpu_s"] for r in per_rank)
        cont = None if busy is None else min(1.0, max(0.0, busy - own) / max(wall * (os.cpu_count() or 1), 1e-9))
        out_reps.append({"wall_s": wall, "samples_per_s": rows_per_fit / wall, "contention": cont,
                         "loss": per_rank[0]["loss"], "comm": [r["comm"] for r in per_rank],
                         "wall_per_rank_s": [r["wall_s"] for r in per_rank]})
    return {
        "net": net.name, "optimizer": args.optimizer, "ranks": size, "dist": bool(args.dist),
        "rows": args.rows, "epochs": args.epochs, "batch": net.batch,
        "steps_per_fit": args.epochs * -(-args.rows // net.batch),
        "reps": out_reps, "warmup_s": [g[2] for g in gathered], "build_s": [g[3] for g in gathered],
        "max_param_diff_across_ranks": same,
        "env_info": gathered[0][1], "env_info_other_ranks": [g[1]["threads"] for g in gathered[1:]],
        "versions": {"symbp": getattr(sb, "__version__", "?"), "numpy": np.__version__,
                     **({"mpi4py": __import__("mpi4py").__version__} if comm is not None else {})},
    }


def worker_ceiling(args) -> dict | None:
    """The distributed run's compute alone: every rank runs the generated ``slice_grads`` on its
    slice of each global batch (what ``fit(comm=...)`` runs), with a barrier per step to keep the
    ranks in lockstep as the Allreduce does, but no Allreduce and no update. No data-parallel
    design that computes each rank's gradient sums this way can beat it: its samples/s over the
    one-process run's is the ceiling of the ratio. (Reads the model's generated kernels directly.)"""
    sb = import_symbp()
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    net = NETS[args.net]
    layers = [sb.Dense(n, activation=net.activation) for n in net.hidden] + [sb.Dense(net.outputs)]
    model = sb.compile(sb.Network(inputs=net.inputs, layers=layers, loss="softmax_cross_entropy"),
                       target="cpu", dtype="float32", seed=0)
    opt = (sb.Adam(lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS) if args.optimizer == "adam" else sb.SGD(lr=LR))
    kernels = model._train_kernels(opt)
    X, y = make_data(args.rows, net.inputs)
    T = np.eye(CLASSES, dtype=np.float32)[y]
    first, last = sb.distributed.split(net.batch, size, rank)
    ws, params = model._workspace(last - first), model._param_list()
    steps = args.rows // net.batch

    def epoch():
        for k in range(steps):
            lo = k * net.batch
            kernels.slice_grads(X[lo + first:lo + last], T[lo + first:lo + last], (last - first) / net.batch,
                                net.batch, first, 0, *params, *ws)
            comm.Barrier()

    epoch()  # warm-up: JIT or cache load, first touch
    reps = []
    for _ in range(args.reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            epoch()
        wall = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        reps.append({"wall_s": wall, "samples_per_s": steps * net.batch * args.epochs / wall, "contention": None})
    return {"reps": reps} if rank == 0 else None


def worker_allreduce(args) -> dict | None:
    """Bare in-place float32 Allreduce (SUM) over MPI.COMM_WORLD. Every size: warm-up calls,
    then ``--ar-trials`` trials of ``iters`` calls (iters chosen by rank 0 so one trial lasts
    ~--ar-trial-s); a trial's time is the slowest rank's mean per call."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = sorted(set(AR_SIZES) | {NETS[n].params * 4 for n in NETS})
    results = []
    comm.Barrier()
    busy0, own0 = _busy()
    t_all = time.perf_counter()
    for nbytes in sizes:
        buf = np.zeros(max(1, nbytes // 4), dtype=np.float32)
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        est = comm.allreduce((time.perf_counter() - t0) / 3, op=MPI.MAX)
        iters = max(2, min(100_000, int(args.ar_trial_s / max(est, 1e-9))))
        trials = []
        for _ in range(args.ar_trials):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            trials.append(comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
        results.append({"bytes": buf.nbytes, "iters": iters, "trials_s": trials,
                        "best_s": min(trials), "median_s": h.median(trials)})
    comm.Barrier()
    busy1, own1 = _busy()
    wall = time.perf_counter() - t_all
    own = comm.allreduce(own1 - own0, op=MPI.SUM)
    if rank != 0:
        return None
    cont = None if busy0 is None else min(1.0, max(0.0, busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)))
    return {"ranks": size, "sizes": results, "contention": cont, "library": MPI.Get_library_version().strip().splitlines()[0],
            "mpi4py": __import__("mpi4py").__version__, "env_info": h.worker_env_info()}


# ==========================================================================
# Parent: launching workers
# ==========================================================================

def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The shell's environment without its thread/BLAS tuning variables (as bench_mlp's
    workers get it), plus ``extra``."""
    env = {k: v for k, v in h.START_ENV.items() if not k.startswith(h.TUNING_PREFIXES)}
    env.update(extra or {})
    return env


def run_cmd(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run a worker command; its result is the one line after h.RESULT_MARKER. Never raises."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(h.RESULT_MARKER):
            result = json.loads(line[len(h.RESULT_MARKER):])
            result["process_wall_s"] = wall
            return result
    text = (proc.stderr + "\n" + proc.stdout).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    code = proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    # The last error line for the table, the whole tail for the report / JSON.
    last = next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1] if lines else "no output")
    return {"error": f"worker {how}: {' '.join(last.split())[:200]}", "output_tail": "\n".join(lines[-40:])}


def mpiexec_cmd(args, worker_argv: list[str]) -> list[str]:
    return [args.mpiexec, "-n", str(args.np), *args.mpiexec_args.split(),
            sys.executable, str(Path(__file__).resolve()), *worker_argv]


def plain_cmd(worker_argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *worker_argv]


def wait_idle(args) -> None:
    if args.wait_idle > 0 and h.wait_for_idle(args.wait_idle) is None:
        print(f"  (machine still busy after {args.wait_idle:.0f} s; measuring anyway)", file=sys.stderr)


def run_fit(args, net: Net, optimizer: str, config: str) -> dict:
    epochs = args.epochs or net.epochs
    argv = ["--worker", "fit", "--net", net.name, "--optimizer", optimizer, "--rows", str(args.rows),
            "--epochs", str(epochs), "--reps", str(args.reps)]
    wait_idle(args)
    if config == "dist":
        return run_cmd(mpiexec_cmd(args, argv + ["--dist"]), clean_env(ONE_THREAD), args.timeout)
    if config == "ceiling":
        argv[1] = "ceiling"
        return run_cmd(mpiexec_cmd(args, argv), clean_env(ONE_THREAD), args.timeout)
    env = clean_env(ONE_THREAD if config == "1p1t" else None)
    return run_cmd(plain_cmd(argv), env, args.timeout)


def run_allreduce(args) -> dict:
    argv = ["--worker", "allreduce", "--ar-trials", str(args.ar_trials), "--ar-trial-s", str(args.ar_trial_s)]
    wait_idle(args)
    return run_cmd(mpiexec_cmd(args, argv), clean_env(ONE_THREAD), args.timeout)


# ==========================================================================
# The alpha-beta model
# ==========================================================================

def t_ring(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Ring allreduce of ``nbytes`` over ``p`` processes: 2(p-1) alpha + 2((p-1)/p) n beta."""
    return 2 * (p - 1) * alpha + 2 * ((p - 1) / p) * nbytes * beta


def fit_alpha_beta(ar: dict, key: str = "best_s") -> tuple[float, float]:
    """alpha from the 8-byte latency, beta by least squares over sizes >= 1 MiB (see below)."""
    R = ar["ranks"]
    by = {s["bytes"]: s[key] for s in ar["sizes"]}
    alpha = by[LATENCY_BYTES] / (2 * (R - 1))
    # Relative least squares: minimise sum(((2 alpha + x beta - T) / T)^2), so that every
    # size counts alike (plain least squares would be decided by the 64 MiB point alone).
    pts = [(2 * ((R - 1) / R) * n, t - 2 * (R - 1) * alpha, t) for n, t in by.items() if n >= BETA_FROM]
    beta = sum(x * y / t ** 2 for x, y, t in pts) / sum(x * x / t ** 2 for x, _, t in pts)
    return alpha, beta


def min_batch(p: int, c: float, t_ar: float, goal: float = EFFICIENCY_GOAL) -> int:
    """Smallest global batch (a multiple of p) with (B/p) c / ((B/p) c + t_ar) >= goal."""
    per_node = math.ceil(goal / (1 - goal) * t_ar / c - 1e-9)
    return max(1, per_node) * p


def projection_rows(workloads: list[dict], alpha: float, beta: float) -> list[list[str]]:
    rows = []
    for w in workloads:
        c, nbytes, B = w["c_s"], w["grad_bytes"], w["batch"]
        for p in SCALE_NODES:
            t_ar = t_ring(p, nbytes, alpha, beta)
            t_c = B / p * c
            bmin = min_batch(p, c, t_ar)
            rows.append([w["workload"], str(p), f"{B / p:g}", f"{t_c * 1e3:.3f}", f"{t_ar * 1e3:.3f}",
                         f"{t_c / (t_c + t_ar):.0%}", f"{bmin:,}", f"{bmin // p:,}"])
    return rows


PROJ_HEADERS = ["workload", "nodes", "samples/node", "compute ms", "allreduce ms", "efficiency",
                "min batch for 80%", "per node"]


# ==========================================================================
# Report
# ==========================================================================

def best_rep(res: dict | None) -> dict | None:
    if not res or "error" in res or not res.get("reps"):
        return None
    return max(res["reps"], key=lambda r: r["samples_per_s"])


def merge_rounds(results: list[dict]) -> dict:
    """All rounds' reps of one (workload, config) in one result (the first round's metadata)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    out = dict(ok[0])
    out["reps"] = [rep for r in ok for rep in r["reps"]]
    out["rounds_ok"] = len(ok)
    return out


def comm_stats(rep: dict) -> dict | None:
    """Mean over ranks of allreduce s/step and share; None when fit gave no history.comm."""
    comms = [c for c in rep.get("comm") or [] if c]
    if not comms:
        return None
    ms = [c["allreduce_s"] / max(c["steps"], 1) * 1e3 for c in comms]
    share = [c["allreduce_s"] / c["seconds"] for c in comms if c.get("seconds")]
    compute_ms = [(c["seconds"] - c["allreduce_s"]) / max(c["steps"], 1) * 1e3 for c in comms]
    return {"allreduce_ms": sum(ms) / len(ms), "allreduce_ms_per_rank": ms,
            "share": sum(share) / len(share) if share else None,
            "compute_ms_per_rank": compute_ms, "steps": comms[0]["steps"], "ranks": comms[0].get("ranks")}


def fmt_rate(rep: dict | None, res: dict | None) -> str:
    if rep is None:
        return "error" if res and "error" in res else "-"
    return f"{rep['samples_per_s']:,.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for how to read the tables.")
    p.add_argument("--nets", default=",".join(NETS), help="comma list of %(default)s")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of %(default)s")
    p.add_argument("--np", type=int, default=2, help="ranks of the distributed run (default %(default)s)")
    p.add_argument("--rows", type=int, default=16384, help="rows of random data (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per timed fit (default: per net, " +
                        ", ".join(f"{n.name} {n.epochs}" for n in NETS.values()) + ")")
    p.add_argument("--reps", type=int, default=3, help="timed fits per worker (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every worker this many times, interleaved; best rep over all (default %(default)s)")
    p.add_argument("--no-single-thread", action="store_true",
                   help="skip the 1 process x 1 thread run (then the projection uses the distributed "
                        "run's per-rank compute time)")
    p.add_argument("--allreduce-only", action="store_true", help="only the bare Allreduce, alpha and beta")
    p.add_argument("--no-allreduce", action="store_true", help="skip the bare Allreduce")
    p.add_argument("--ar-trials", type=int, default=5, help="trials per Allreduce size (default %(default)s)")
    p.add_argument("--ar-trial-s", type=float, default=0.05, help="seconds per trial (default %(default)s)")
    p.add_argument("--alpha", type=float, default=None,
                   help="also project with this alpha (s), e.g. your interconnect's latency")
    p.add_argument("--beta", type=float, default=None, help="... and this beta (s per byte)")
    p.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec", help="launcher (default %(default)s)")
    p.add_argument("--mpiexec-args", default="", help="extra launcher arguments, e.g. --mpiexec-args='-bind-to core'")
    p.add_argument("--wait-idle", type=float, default=10, metavar="S",
                   help="before each worker wait up to S seconds for other load to drop below 10%% "
                        "(0: don't wait; default %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a worker is killed")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    # Internal: worker modes.
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the compute-only run (each rank's slice_grads, no Allreduce, no update)")
    p.add_argument("--worker", choices=("fit", "allreduce", "ceiling"), help=argparse.SUPPRESS)
    p.add_argument("--net", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    p.add_argument("--dist", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)

    if args.worker:
        fn = {"fit": worker_fit, "allreduce": worker_allreduce, "ceiling": worker_ceiling}[args.worker]
        try:
            out = fn(args)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            out = {"error": h.one_line_error(exc, 300)}
            h.emit(out)
            return 1
        if out is not None:
            h.emit(out)
        return 0

    nets = [NETS[n] for n in args.nets.split(",")]
    optimizers = args.optimizers.split(",")
    R = args.np
    print("Data-parallel training (MPI) benchmark")
    for k, v in h.system_info().items():
        print(f"  {k}: {v}")
    print(f"  ranks: {R}; data: {args.rows} random rows, {CLASSES} classes, float32; "
          f"reps {args.reps}, rounds {args.rounds}; launcher: {args.mpiexec} -n {R} {args.mpiexec_args}".rstrip())
    print(f"  distributed and 1-thread runs: {h.fmt_env(ONE_THREAD)}; 2-thread run: libraries' defaults")
    print(f"  started {time.strftime('%Y-%m-%d %H:%M')}")
    t_start = time.perf_counter()
    payload: dict = {"system": h.system_info(), "date": time.strftime("%Y-%m-%d"), "ranks": R,
                     "settings": {k: getattr(args, k) for k in ("rows", "epochs", "reps", "rounds", "np",
                                                                "mpiexec_args", "ar_trials", "ar_trial_s")}}

    # ---- bare Allreduce --------------------------------------------------------------------
    alpha = beta = None
    if not args.no_allreduce:
        print(f"\nbare Allreduce: {R} ranks, in place, float32, MPI.SUM", file=sys.stderr)
        ar = run_allreduce(args)
        payload["allreduce"] = ar
        print(f"\n== Bare Allreduce ({R} ranks, in place, float32, SUM; best / median of "
              f"{args.ar_trials} trials) ==")
        if "error" in ar:
            print(f"  error: {ar['error']}")
            if ar.get("output_tail"):
                print("  " + ar["output_tail"].replace("\n", "\n  "))
        else:
            alpha, beta = fit_alpha_beta(ar)
            payload["alpha_s"], payload["beta_s_per_byte"] = alpha, beta
            cont = ar.get("contention")
            print(f"  {ar['library']}; mpi4py {ar['mpi4py']}; other load during the run: "
                  + ("?" if cont is None else f"{cont:.0%}")
                  + (" -- WARNING: busy machine, rerun when idle" if cont and cont > CONTENTION_WARN else ""))
            grad = {NETS[n].params * 4: n for n in NETS}
            rows = []
            for s in ar["sizes"]:
                n, best, med = s["bytes"], s["best_s"], s["median_s"]
                size = f"{n} B" if n < 1024 else (f"{n / 1024:g} KiB" if n < 2**20 else f"{n / 2**20:.3g} MiB")
                if n in grad:
                    size += f" ({grad[n]} grad)"
                rows.append([size, f"{best * 1e6:,.1f}", f"{med * 1e6:,.1f}", f"{n / best / 1e9:.2f}",
                             f"{t_ring(R, n, alpha, beta) * 1e6:,.1f}", str(s["iters"])])
            print(h.format_table(["size", "best us", "median us", "GB/s (n/t)", "model us", "calls/trial"],
                                 rows, [False, True, True, True, True, True]))
            print(f"\n  alpha = {alpha * 1e6:.2f} us (T(8 B) / {2 * (R - 1)}),  beta = {beta * 1e12:.1f} ps/B "
                  f"= 1/({1 / beta / 1e9:.2f} GB/s) (relative least squares over sizes >= 1 MiB)")
            print("  model: T_ar(p, n) = 2(p-1) alpha + 2((p-1)/p) n beta")
        if args.allreduce_only:
            return _finish(args, payload, t_start)

    # ---- training throughput ---------------------------------------------------------------
    configs = [c for c in CONFIGS if not (c == "1p1t" and args.no_single_thread)
               and not (c == "ceiling" and args.no_ceiling)]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for net in nets:
            for optimizer in optimizers:
                order = configs if rnd % 2 == 0 else configs[::-1]
                for config in order:
                    label = CONFIG_LABEL[config].format(R=R)
                    print(f"round {rnd + 1}/{args.rounds}: {net.name} {optimizer} -- {label}", file=sys.stderr)
                    runs.setdefault((net.name, optimizer, config), []).append(run_fit(args, net, optimizer, config))
    merged = {k: merge_rounds(v) for k, v in runs.items()}

    print(f"\n== Training throughput: {R} ranks x 1 thread vs 1 process x 2 threads "
          f"(float32, {args.rows} rows; best rep) ==")
    headers = ["workload", "1p x 2t samples/s", f"{R}r x 1t samples/s", "ratio", "allreduce ms/step",
               "share", "model ms", "compute ms/step"]
    if "1p1t" in configs:
        headers.append("1p x 1t samples/s")
    if "ceiling" in configs:
        headers += [f"{R}r gradient sums only, samples/s", "its ratio"]
    headers.append("contention")
    rows, errors, workloads = [], [], []
    for net in nets:
        for optimizer in optimizers:
            wl = f"{net.name} {optimizer} (B={net.batch})"
            res = {c: merged[(net.name, optimizer, c)] for c in configs}
            best = {c: best_rep(res[c]) for c in configs}
            for c in configs:
                if "error" in res[c]:
                    errors.append((wl, CONFIG_LABEL[c].format(R=R), res[c]))
            b1, bd = best["1p2t"], best["dist"]
            ratio = f"{bd['samples_per_s'] / b1['samples_per_s']:.2f}" if b1 and bd else "-"
            cs = comm_stats(bd) if bd else None
            model_ms = f"{t_ring(R, net.params * 4, alpha, beta) * 1e3:.3f}" if alpha is not None else "-"
            row = [wl, fmt_rate(b1, res["1p2t"]), fmt_rate(bd, res["dist"]), ratio,
                   f"{cs['allreduce_ms']:.3f}" if cs else ("no history.comm" if bd else "-"),
                   f"{cs['share']:.1%}" if cs and cs["share"] is not None else "-", model_ms,
                   f"{max(cs['compute_ms_per_rank']):.3f}" if cs else "-"]
            if "1p1t" in configs:
                row.append(fmt_rate(best["1p1t"], res["1p1t"]))
            if "ceiling" in configs:
                bc = best["ceiling"]
                row += [fmt_rate(bc, res["ceiling"]),
                        f"{bc['samples_per_s'] / b1['samples_per_s']:.2f}" if bc and b1 else "-"]
            conts = [b["contention"] for b in best.values() if b and b.get("contention") is not None]
            row.append(f"{max(conts):.0%}" if conts else "-")
            rows.append(row)
            # Compute per sample on one core, for the projection.
            if best.get("1p1t"):
                c_s = 1 / best["1p1t"]["samples_per_s"]
                c_from = "1p x 1t"
            elif cs:
                c_s = max(cs["compute_ms_per_rank"]) * 1e-3 / (net.batch / R)
                c_from = f"{R}r x 1t compute"
            else:
                c_s, c_from = None, None
            workloads.append({"workload": f"{net.name} {optimizer}", "net": net.name, "optimizer": optimizer,
                              "batch": net.batch, "grad_bytes": net.params * 4, "c_s": c_s, "c_from": c_from,
                              "samples_per_s": {c: (best[c]["samples_per_s"] if best[c] else None) for c in configs},
                              "ratio": (bd["samples_per_s"] / b1["samples_per_s"]) if b1 and bd else None,
                              "comm": cs})
    print(h.format_table(headers, rows, [False] + [True] * (len(headers) - 1)))
    print("  ratio = distributed over 1 process x 2 threads; allreduce ms/step and share: history.comm, mean "
          "over ranks (a rank's\n  wait for the slower one included); model ms: T_ar from the bare Allreduce; "
          "compute ms/step: (seconds - allreduce_s) / steps, slower rank"
          + ("; gradient sums only: each rank's slice_grads and a barrier per step, no Allreduce and no update "
             "(the ceiling of the ratio for this way of computing the gradient sums)" if "ceiling" in configs else ""))
    for wl, label, res in errors:
        print(f"\n  {wl}, {label}: {res['error']}")
        if res.get("output_tail"):
            print("    " + res["output_tail"].replace("\n", "\n    "))

    # Sanity: same parameters on every rank; final losses.
    print("\n  checks: max |param(rank) - param(rank 0)| after the fits; final-epoch loss of the first rep")
    for net in nets:
        for optimizer in optimizers:
            d = merged[(net.name, optimizer, "dist")]
            one = merged[(net.name, optimizer, "1p2t")]
            if "error" in d:
                continue
            l1 = one["reps"][0]["loss"] if "error" not in one else None
            print(f"    {net.name} {optimizer}: param diff {d.get('max_param_diff_across_ranks')}, loss "
                  f"{R} ranks {d['reps'][0]['loss']:.6f} vs 1 process "
                  f"{'-' if l1 is None else f'{l1:.6f}'}")
    bad = [k for k, v in merged.items() if "error" not in v
           for r in v["reps"] if r.get("contention") is not None and r["contention"] > CONTENTION_WARN]
    if bad:
        print(f"\n  WARNING: other processes used > {CONTENTION_WARN:.0%} of the machine during "
              f"{len(bad)} rep(s); rerun when idle")

    # Threads each run actually had.
    print("\n  threads per run (rank 0; first workload):")
    for c in configs:
        r = merged[(nets[0].name, optimizers[0], c)]
        if "error" not in r and "env_info" in r:
            print(f"    {CONFIG_LABEL[c].format(R=R)}: {'; '.join(r['env_info']['threads'])}")

    for w in workloads:
        if w["net"] == "large" and w["ratio"] is not None:
            verdict = "met" if w["ratio"] >= TARGET_RATIO else f"NOT met (short by {TARGET_RATIO - w['ratio']:.2f})"
            print(f"\n  target (large MLP, {w['optimizer']}): {R} ranks >= {TARGET_RATIO} x one process: "
                  f"{w['ratio']:.2f} -- {verdict}")

    # ---- projection ------------------------------------------------------------------------
    proj = [w for w in workloads if w["c_s"]]
    sets = []
    if alpha is not None:
        sets.append(("measured here (intra-node shared memory: optimistic for a network)", alpha, beta))
    sets.append(("ASSUMED, not measured: 100 Gb/s InfiniBand-like link", IB_ALPHA, IB_BETA))
    if args.alpha is not None and args.beta is not None:
        sets.append(("given on the command line", args.alpha, args.beta))
    if proj:
        print("\n== Projected scaling: ring allreduce, alpha-beta model, no overlap ==")
        print("  each node computes like one core here (c = seconds per sample: "
              + ", ".join(f"{w['workload']} {w['c_s'] * 1e6:.1f} us ({w['c_from']})" for w in proj) + ")")
        print("  efficiency = c B/p / (c B/p + T_ar(p, 4 x params)); min batch: smallest global B "
              f"(multiple of p) with efficiency >= {EFFICIENCY_GOAL:.0%}")
        payload["projection"] = []
        for label, a, b in sets:
            print(f"\n  alpha = {a * 1e6:.2f} us, beta = {b * 1e12:.1f} ps/B (1/({1 / b / 1e9:.2f} GB/s)): {label}")
            prow = projection_rows(proj, a, b)
            print(h.format_table(PROJ_HEADERS, prow, [False] + [True] * 7))
            payload["projection"].append({"label": label, "alpha_s": a, "beta_s_per_byte": b,
                                          "headers": PROJ_HEADERS, "rows": prow})
    payload["runs"] = {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in runs.items()}
    payload["workloads"] = workloads
    return _finish(args, payload, t_start)


def _finish(args, payload: dict, t_start: float) -> int:
    elapsed = time.perf_counter() - t_start
    payload["elapsed_s"] = elapsed
    print(f"\n(finished in {elapsed:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
