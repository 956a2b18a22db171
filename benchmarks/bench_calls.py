"""What a step costs when the caller's own loop makes it: symbp's per-call overhead.

For the tiny and the medium MLP of ``bench_mlp.py`` (float32, plain SGD; the medium one with
Adam too), three ways to take the same steps over the same batches, in one process (symbp's
own settings, from ``import symbp``):

    in-epoch        one ``fit`` call over all the batches: the step inside the compiled epoch
    train_on_batch  ``model.train_on_batch(X_b, y_b)`` per batch, from a Python loop
    fit per batch   ``model.fit(X_b, y_b, epochs=1, batch_size=len(X_b))`` per batch

and prints µs per step, the overhead of a call over the in-epoch step, and the targets of
issue 16 (train_on_batch ≤ 10 µs over the in-epoch step on the tiny MLP; a one-batch ``fit``
within 1.2× of the in-epoch step on the medium one).  The best of ``--reps`` repetitions of
``--steps`` steps each, the three alternated so that a slow spell of the machine hits all.

    python benchmarks/bench_calls.py [--steps 400] [--reps 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import symbp as sb  # noqa: E402  (first: its thread settings apply before NumPy's BLAS loads)

np = sb.train.model.np  # NumPy, as symbp imported it (after its settings)

NETS = {"tiny": (64, (32,), 10, 32, "tanh"), "medium": (784, (256, 256), 10, 128, "relu")}
#: The rows of the table: (net, optimizer).  Adam keeps two state arrays per parameter, which
#: train_on_batch's safety covers too (a copy of three arrays per parameter, or their proof).
CASES = {"tiny": ("tiny", lambda: sb.SGD(lr=0.01)), "medium": ("medium", lambda: sb.SGD(lr=0.01)),
         "medium Adam": ("medium", lambda: sb.Adam(lr=1e-3))}


def model_of(name: str):
    inputs, hidden, outputs, _, act = NETS[name]
    layers = [sb.Dense(h, activation=act) for h in hidden] + [sb.Dense(outputs)]
    return sb.compile(sb.Network(inputs=inputs, layers=layers, name=f"calls-{name}"), dtype="float32", seed=0)


def measure(case: str, steps: int, reps: int) -> dict[str, float]:
    name, make_opt = CASES[case]
    inputs, _, outputs, batch, _ = NETS[name]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(batch * steps, inputs)).astype(np.float32)
    y = rng.integers(0, outputs, len(X))
    batches = [(X[k:k + batch], y[k:k + batch]) for k in range(0, len(X), batch)]
    model, opt = model_of(name), make_opt()

    def in_epoch():
        model.fit(X, y, optimizer=opt, batch_size=batch, epochs=1, shuffle=False, progress=False)

    def on_batch():
        for xb, yb in batches:
            model.train_on_batch(xb, yb, opt)

    def fit_each():
        for xb, yb in batches:
            model.fit(xb, yb, optimizer=opt, batch_size=batch, epochs=1, shuffle=False, progress=False)

    ways = {"in-epoch": in_epoch, "train_on_batch": on_batch, "fit per batch": fit_each}
    for run in ways.values():  # compile, warm the caches
        run()
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(reps):
        for key, run in ways.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], (time.perf_counter() - start) / steps * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    print(f"µs per float32 step (SGD unless said), best of {args.reps} × {args.steps} steps (one process, "
          "symbp's settings)")
    print(f"{'net':12} {'in-epoch':>9} {'train_on_batch':>15} {'overhead':>9} {'fit per batch':>14} {'÷ in-epoch':>11}")
    for case in CASES:
        t = measure(case, args.steps, args.reps)
        print(f"{case:12} {t['in-epoch']:9.1f} {t['train_on_batch']:15.1f} {t['train_on_batch'] - t['in-epoch']:9.1f} "
              f"{t['fit per batch']:14.1f} {t['fit per batch'] / t['in-epoch']:11.2f}")
    print("targets (issue 16): train_on_batch overhead ≤ 10 µs on tiny; fit per batch ÷ in-epoch ≤ 1.2 on medium")


if __name__ == "__main__":
    main()
