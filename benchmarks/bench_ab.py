"""symbp against itself: two commits' training steps measured side by side in one run.

A refactor must not make the kernels slower.  This script checks out two revisions into
temporary git worktrees and times symbp's float32 SGD step of each on the same workloads,
interleaved round by round on the same machine (each measurement in a fresh process, so
neither version's thread pools or caches touch the other's):

    medium  784-256-256-10 relu, batch 128
    large   784-1024-1024-10 relu, batch 256
    cnn     1×28×28, Conv2D 8@5×5 relu, MaxPool 2, Flatten, Dense 10, batch 64

One timed repetition is one ``fit`` call over ``steps`` batches (one compiled call per
epoch), so fit time / steps is the per-step cost; the best over all rounds and repetitions
is reported, with the median beside it.  It also times start-up: "cold" is a fresh process
with an empty cache (derive, generate, JIT, first fit on one batch of the medium net),
"cached" another fresh process reusing that cache.

Usage
-----
    python benchmarks/bench_ab.py --before 60841b5 --after HEAD
    python benchmarks/bench_ab.py --before main~3 --after HEAD --rounds 5 --nets medium,cnn
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETS = ("medium", "large", "cnn")


def _network(sb, name: str):
    if name == "medium":
        return sb.Network(inputs=784, layers=[sb.Dense(256, activation="relu"), sb.Dense(256, activation="relu"),
                                              sb.Dense(10)]), 128
    if name == "large":
        return sb.Network(inputs=784, layers=[sb.Dense(1024, activation="relu"), sb.Dense(1024, activation="relu"),
                                              sb.Dense(10)]), 256
    return sb.Network(inputs=(1, 28, 28), layers=[sb.Conv2D(8, 5, activation="relu"), sb.MaxPool2D(2), sb.Flatten(),
                                                  sb.Dense(10)]), 64


def worker(source: str, net_name: str, cache: str, target_s: float, reps: int) -> dict:
    """Time one revision's step (run in a fresh process with ``source`` first on sys.path)."""
    sys.path.insert(0, source)
    import numpy as np

    import symbp as sb

    assert Path(sb.__file__).resolve().is_relative_to(Path(source).resolve()), sb.__file__
    net, batch = _network(sb, net_name)
    model = sb.compile(net, dtype="float32", seed=0, cache_dir=cache)
    rng = np.random.default_rng(0)
    opt = sb.SGD(lr=0.01)

    def data(steps: int):
        n = batch * steps
        return rng.random((n, net.widths[0]), dtype=np.float32), rng.integers(0, 10, n)

    X, y = data(2)
    model.fit(X, y, optimizer=opt, batch_size=batch, epochs=1, shuffle=False, progress=False)  # JIT, first touch
    steps = 4
    while True:  # one repetition lasts about target_s
        X, y = data(steps)
        start = time.perf_counter()
        model.fit(X, y, optimizer=opt, batch_size=batch, epochs=1, shuffle=False, progress=False)
        took = time.perf_counter() - start
        if took >= target_s or steps >= 1 << 14:
            break
        steps = min(1 << 14, max(steps * 2, int(steps * target_s / max(took, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.fit(X, y, optimizer=opt, batch_size=batch, epochs=1, shuffle=False, progress=False)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return {"ms": times, "steps": steps}


def startup(source: str, cache: str) -> float:
    """Seconds from before ``import symbp`` to the end of a first one-batch fit (medium net)."""
    start = time.perf_counter()
    sys.path.insert(0, source)
    import numpy as np

    import symbp as sb

    net, batch = _network(sb, "medium")
    model = sb.compile(net, dtype="float32", seed=0, cache_dir=cache)
    X = np.zeros((batch, 784), np.float32)
    model.fit(X, np.zeros(batch, int), batch_size=batch, epochs=1, progress=False)
    return time.perf_counter() - start


def _run(args: list[str], timeout: float = 900) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the baseline revision (any git revision name; required)")
    parser.add_argument("--after", default="HEAD", help="the revision to compare (default HEAD)")
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {', '.join(NETS)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per worker (default 5)")
    parser.add_argument("--target-s", type=float, default=0.5, help="seconds one repetition lasts (default 0.5)")
    parser.add_argument("--worker", nargs=4, metavar=("SOURCE", "NET", "CACHE", "TARGET_S"), help=argparse.SUPPRESS)
    parser.add_argument("--startup", nargs=2, metavar=("SOURCE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        source, net, cache, target_s = args.worker
        print(json.dumps(worker(source, net, cache, float(target_s), args.reps)))
        return 0
    if args.startup:
        print(json.dumps({"s": startup(*args.startup)}))
        return 0
    if not args.before:
        parser.error("--before REV is required")
    nets = [x for x in args.nets.split(",") if x]
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        parser.error(f"unknown net {unknown[0]!r}; choose from {', '.join(NETS)}")
    work = Path(tempfile.mkdtemp(prefix="symbp-ab-"))
    trees, caches = {}, {}
    try:
        for side in ("before", "after"):
            rev = getattr(args, side)
            sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                                 check=True).stdout.strip()
            trees[side] = work / f"{side}-{sha}"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[side]), sha], check=True)
            caches[side] = work / f"cache-{side}"
        print(f"before = {args.before} ({trees['before'].name.split('-')[-1]}), after = {args.after} "
              f"({trees['after'].name.split('-')[-1]}); {os.cpu_count()} CPUs; float32 SGD step, ms")
        startups = {side: {} for side in trees}
        for side in trees:  # cold: empty cache (generation and JIT), then cached
            startups[side]["cold"] = _run(["--startup", str(trees[side]), str(caches[side])])["s"]
            startups[side]["cached"] = _run(["--startup", str(trees[side]), str(caches[side])])["s"]
        times = {(side, net): [] for side in trees for net in nets}
        for rnd in range(args.rounds):
            for net in nets:
                for side in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                    out = _run(["--worker", str(trees[side]), net, str(caches[side]), str(args.target_s),
                                "--reps", str(args.reps)])
                    times[(side, net)] += out["ms"]
        print(f"\n{'net':8} {'before best':>12} {'after best':>11} {'after/before':>13} "
              f"{'before median':>14} {'after median':>13}")
        for net in nets:
            b, a = times[("before", net)], times[("after", net)]
            print(f"{net:8} {min(b):12.3f} {min(a):11.3f} {min(a) / min(b):13.3f} "
                  f"{statistics.median(b):14.3f} {statistics.median(a):13.3f}")
        print(f"\n{'start-up, s':12} {'before':>8} {'after':>8}")
        for kind in ("cold", "cached"):
            print(f"{kind:12} {startups['before'][kind]:8.2f} {startups['after'][kind]:8.2f}")
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
