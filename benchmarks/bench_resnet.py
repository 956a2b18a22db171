"""A residual MLP with BatchNorm: symbp against PyTorch and JAX, side by side in one run.

    x (784) → Dense(256, relu) = h₀;  4 blocks  h ← h + relu(W·BatchNorm(h) + b);  → Dense(10)

Batch 128, float32, softmax cross-entropy, plain SGD (lr 0.01), BatchNorm in training mode
with its running statistics updated every step, in all three.  Each library runs in a worker
process of its own with its own default environment and threads (the harness adds only
JAX_PLATFORMS=cpu; symbp's own settings come from ``import symbp`` inside its worker).  One
timed repetition is ``--steps`` training steps over fixed batches; the table gives the best
and the median ms per step over all repetitions, and symbp's step over the best peer's (the
issue's target: at most 0.9).

    python benchmarks/bench_resnet.py [--steps 20] [--reps 7] [--impls symbp torch jax]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

IMPLS = ("symbp", "torch", "jax")
WIDTH, BLOCKS, INPUTS, CLASSES, BATCH = 256, 4, 784, 10, 128
NEEDS = {"jax": {"JAX_PLATFORMS": "cpu"}}


def data(steps: int):
    import numpy as np

    rng = np.random.default_rng(0)
    X = rng.normal(size=(BATCH * steps, INPUTS)).astype(np.float32)
    return X, rng.integers(0, CLASSES, len(X))


def symbp_step(steps: int):
    import symbp as sb

    x = sb.Input(INPUTS)
    v = sb.Dense(WIDTH, activation="relu")(x)
    for _ in range(BLOCKS):
        v = sb.Add()([v, sb.Dense(WIDTH, activation="relu")(sb.BatchNorm()(v))])
    model = sb.compile(sb.Network(inputs=x, outputs=sb.Dense(CLASSES)(v), name="bench-resnet"), dtype="float32")
    X, y = data(steps)
    opt = sb.SGD(lr=h.LR)

    def run():
        model.fit(X, y, optimizer=opt, batch_size=BATCH, epochs=1, shuffle=False, progress=False)
    return run


def torch_step(steps: int):
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = torch.nn.BatchNorm1d(WIDTH), torch.nn.Linear(WIDTH, WIDTH)

        def forward(self, v):
            return v + torch.relu(self.lin(self.norm(v)))

    net = torch.nn.Sequential(torch.nn.Linear(INPUTS, WIDTH), torch.nn.ReLU(), *[Block() for _ in range(BLOCKS)],
                              torch.nn.Linear(WIDTH, CLASSES)).train()
    opt = torch.optim.SGD(net.parameters(), lr=h.LR)
    X, y = data(steps)
    batches = [(torch.from_numpy(X[k:k + BATCH]), torch.from_numpy(y[k:k + BATCH])) for k in range(0, len(X), BATCH)]

    def run():
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
    return run


def jax_step(steps: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)

    def linear(fan_in, fan_out):
        bound = 1 / np.sqrt(fan_in)
        return (jnp.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)), jnp.float32),
                jnp.asarray(rng.uniform(-bound, bound, fan_out), jnp.float32))

    params = {"stem": linear(INPUTS, WIDTH), "out": linear(WIDTH, CLASSES),
              "blocks": [(jnp.ones(WIDTH), jnp.zeros(WIDTH), *linear(WIDTH, WIDTH)) for _ in range(BLOCKS)]}
    stats = [(jnp.zeros(WIDTH), jnp.ones(WIDTH)) for _ in range(BLOCKS)]

    def loss(p, running, xb, yb):
        v = jax.nn.relu(xb @ p["stem"][0] + p["stem"][1])
        new = []
        for (g, b, W, c), (rm, rv) in zip(p["blocks"], running):
            m, var = v.mean(0), v.var(0)
            new.append((0.9 * rm + 0.1 * m, 0.9 * rv + 0.1 * var * BATCH / (BATCH - 1)))
            v = v + jax.nn.relu((g * (v - m) / jnp.sqrt(var + 1e-5) + b) @ W + c)
        logits = v @ p["out"][0] + p["out"][1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1)), new

    @jax.jit
    def step(p, running, xb, yb):
        (_, new), g = jax.value_and_grad(loss, has_aux=True)(p, running, xb, yb)
        return jax.tree_util.tree_map(lambda a, d: a - h.LR * d, p, g), jax.lax.stop_gradient(new)

    X, y = data(steps)
    batches = [(jnp.asarray(X[k:k + BATCH]), jnp.asarray(y[k:k + BATCH])) for k in range(0, len(X), BATCH)]
    state = {"p": params, "s": stats}

    def run():
        p, s = state["p"], state["s"]
        for xb, yb in batches:
            p, s = step(p, s, xb, yb)
        jax.block_until_ready(p)
        state["p"], state["s"] = p, s
    return run


def worker(impl: str, steps: int, reps: int) -> None:
    try:
        run = {"symbp": symbp_step, "torch": torch_step, "jax": jax_step}[impl](steps)
        run()  # compile, warm caches and thread pools
        times = [t / steps * 1e3 for t in h.time_reps(run, reps)]
        h.emit({"ms": times, "env": h.worker_env_info()})
    except Exception as exc:  # noqa: BLE001 - one library's failure is a table row, not a crash
        h.emit({"error": h.one_line_error(exc)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per library, alternated")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE or IMPL:KEY=VALUE for the workers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.reps)
        return
    envs = h.WorkerEnv(args.impls, NEEDS, args.env)
    print(f"residual MLP {INPUTS}-{WIDTH}×{BLOCKS} blocks (BatchNorm, Dense, relu, add)-{CLASSES}, batch {BATCH}, "
          f"float32, SGD lr {h.LR}, {args.steps} steps a repetition")
    for line in envs.header_lines():
        print(line)
    results: dict[str, list[float]] = {impl: [] for impl in args.impls}
    errors, infos = {}, {}
    for _ in range(args.rounds):
        for impl in args.impls:
            out = h.run_worker([__file__, "--worker", impl, "--steps", str(args.steps), "--reps", str(args.reps)],
                               envs.for_impl(impl), timeout=1200)
            if "error" in out:
                errors[impl] = out["error"]
                continue
            results[impl] += out["ms"]
            infos[impl] = out.get("env")
    best = {impl: min(ms) for impl, ms in results.items() if ms}
    peers = [best[i] for i in best if i != "symbp"]
    rows = []
    for impl in args.impls:
        if impl not in best:
            rows.append([impl, "-", "-", errors.get(impl, "no result")])
            continue
        ratio = f"{best[impl] / min(peers):.2f}" if peers else "-"
        rows.append([impl, f"{best[impl]:.2f}", f"{h.median(results[impl]):.2f}", ratio])
    print(h.format_table(["library", "best ms/step", "median ms/step", "÷ best peer's best"], rows))
    print(envs.table(args.impls, infos))
    for key, value in h.system_info().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
