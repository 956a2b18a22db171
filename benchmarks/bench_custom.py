"""A layer written as a formula against the built-in it spells out, side by side in one run.

The medium MLP of ``bench_mlp.py`` (784-256-256-10 relu, batch 128, float32, SGD) twice: with
``sb.Dense`` and with every Dense written as ``sb.Layer("z[n, k] = Sum(W[k, j]*x[n, j], j) +
b[k]", …)``.  Each measurement runs in a fresh process (its own thread pools and caches), the
two alternate round by round, and one timed repetition is one ``fit`` call over ``steps``
batches; the best per-step time over all rounds is reported, the median beside it.  The issue's
target: the formula network within 5% of the built-in one.  A gated unit (two contractions)
of the same width is timed too, for scale.

    python benchmarks/bench_custom.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

DENSE = "z[n, k] = Sum(W[k, j]*x[n, j], j) + b[k]"
GLU = "z[n, k] = Sum(U[k, j]*x[n, j], j) * sigmoid(Sum(V[k, j]*x[n, j], j))"


def network(sb, kind: str):
    def layer(units, activation):
        if kind == "builtin":
            return sb.Dense(units, activation=activation)
        if kind == "glu" and activation == "relu":
            return sb.Layer(GLU, units=units, params={"U": ("units", "in"), "V": ("units", "in")})
        return sb.Layer(DENSE, units=units, params={"W": ("units", "in"), "b": ("units",)}, activation=activation)

    return sb.Network(inputs=784, layers=[layer(256, "relu"), layer(256, "relu"), layer(10, None)],
                      loss="softmax_cross_entropy", name=f"bench-custom-{kind}")


def worker(kind: str, cache: str, steps: int, reps: int) -> dict:
    import os

    os.environ["SYMBP_CACHE_DIR"] = cache
    import numpy as np

    import symbp as sb

    model = sb.compile(network(sb, kind), dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(128 * steps, 784)).astype(np.float32)
    y = rng.integers(0, 10, len(X))
    opt = sb.SGD(lr=0.01)
    model.fit(X[:256], y[:256], optimizer=opt, batch_size=128, epochs=1, progress=False)  # JIT
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model.fit(X, y, optimizer=opt, batch_size=128, epochs=1, shuffle=False, progress=False)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return {"kind": kind, "ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.reps)))
        return
    kinds = ("builtin", "formula", "glu")
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            for kind in kinds:
                out = subprocess.run([sys.executable, __file__, "--worker", kind, cache, "--steps", str(args.steps),
                                      "--reps", str(args.reps)], capture_output=True, text=True, check=True)
                runs[kind] += json.loads(out.stdout.strip().splitlines()[-1])["ms"]
    best = {k: min(v) for k, v in runs.items()}
    print("784-256-256-10, batch 128, float32 SGD step, ms (best / median of "
          f"{args.rounds} rounds × {args.reps} fits of {args.steps} steps, a fresh process each)")
    print(f"{'network':<34}{'best':>8}{'median':>9}{'/ built-in':>12}")
    names = {"builtin": "sb.Dense", "formula": "sb.Layer(Dense's formula)", "glu": "sb.Layer(gated unit), relu→glu"}
    for kind in kinds:
        print(f"{names[kind]:<34}{best[kind]:>8.3f}{statistics.median(runs[kind]):>9.3f}"
              f"{best[kind] / best['builtin']:>12.3f}")


if __name__ == "__main__":
    main()
