"""``--target cuda`` of bench_mlp.py and bench_cnn.py: symbp's CUDA target against PyTorch
CUDA (and JAX on the GPU, when it has one) on the same shapes, and on a batch 8× larger.

What is measured: one float32 training step (forward, softmax cross-entropy, backward, plain
SGD) per batch, on data already on the device.  torch and jax run a Python loop of steps and
wait for the device at the end; symbp runs ``fit`` (one epoch launches every batch without a
host round trip) over the same batches for a few epochs and divides by the steps: its X and y
are uploaded once per ``fit`` call, which the epochs amortize.  Each implementation runs in a
subprocess of its own, after a warm-up (compilation, cuDNN autotuning, the first epoch).

Without a usable GPU the scripts say so on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _harness as h

HERE = Path(__file__).resolve().parent
NO_GPU = 2  # exit status when there is no GPU to measure on
IMPLS = ("torch", "jax", "symbp")
LR, SEED, LARGER = 0.01, 0, 8  # the second batch size is LARGER × the script's own


def require_gpu() -> None:
    """Exit with status 2 and one line on stderr unless numba-cuda sees a CUDA GPU (checked in
    a subprocess: the parent process stays free of Numba and NumPy, as the harness wants)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # the simulator is no GPU
    probe = ("import sys\ntry:\n    from numba import cuda\n    ok = cuda.is_available()\n"
             "except Exception as err:\n    print(type(err).__name__, err); sys.exit(1)\n"
             "print('numba.cuda.is_available() is False'); sys.exit(0 if ok else 1)")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stdout.strip().splitlines() or ["numba-cuda could not be imported"])[-1]
        print(f"no GPU is available: --target cuda needs a CUDA GPU and driver ({why}); nothing was measured",
              file=sys.stderr)
        raise SystemExit(NO_GPU)


# ==========================================================================
# Workloads: a JSON-able spec, built the same way by every implementation
# ==========================================================================

def mlp_spec(name: str, sizes: list[int], activation: str, batch: int) -> dict:
    return {"kind": "mlp", "name": name, "sizes": list(sizes), "activation": activation, "batch": batch}


def cnn_spec(image: tuple, filters: int, kernel: int, classes: int, batch: int) -> dict:
    return {"kind": "cnn", "name": "cnn", "image": list(image), "filters": filters, "kernel": kernel,
            "classes": classes, "batch": batch}


def describe(spec: dict) -> str:
    if spec["kind"] == "mlp":
        return f"MLP {'-'.join(map(str, spec['sizes']))}, {spec['activation']} hidden"
    c, hh, ww = spec["image"]
    return (f"CNN {c}×{hh}×{ww} → Conv2D({spec['filters']}, {spec['kernel']}×{spec['kernel']})+relu → maxpool 2 "
            f"→ Dense({spec['classes']})")


def data(spec: dict, n: int):
    import numpy as np

    shape = (spec["sizes"][0],) if spec["kind"] == "mlp" else tuple(spec["image"])
    classes = spec["sizes"][-1] if spec["kind"] == "mlp" else spec["classes"]
    X = np.random.default_rng(SEED).standard_normal((n, *shape), dtype=np.float32)
    y = np.random.default_rng(SEED + 1).integers(0, classes, size=n, dtype=np.int64)
    return X, y


class Symbp:
    def __init__(self, spec: dict):
        sys.path.insert(0, str(HERE.parent))
        import symbp as sb

        self.sb = sb
        if spec["kind"] == "mlp":
            *hidden, out = spec["sizes"][1:]
            layers = [sb.Dense(w, activation=spec["activation"]) for w in hidden] + [sb.Dense(out)]
            net = sb.Network(inputs=spec["sizes"][0], layers=layers, loss="softmax_cross_entropy")
        else:
            layers = [sb.Conv2D(spec["filters"], spec["kernel"], activation="relu"), sb.MaxPool2D(2), sb.Flatten(),
                      sb.Dense(spec["classes"])]
            net = sb.Network(inputs=tuple(spec["image"]), layers=layers, loss="softmax_cross_entropy")
        self.model = sb.compile(net, target="cuda", dtype="float32")

    def prepare(self, X, y, batch: int, epochs: int):
        model, opt = self.model, self.sb.SGD(lr=LR)

        def run():
            model.fit(X, y, optimizer=opt, batch_size=batch, epochs=epochs, shuffle=False, progress=False)
        return run

    def versions(self):
        from importlib.metadata import version

        return {"symbp": self.sb.__version__, "numba-cuda": version("numba-cuda"), "gemm": self.model.config.gemm}


class Torch:
    def __init__(self, spec: dict):
        import torch

        self.torch, dev = torch, torch.device("cuda")
        if spec["kind"] == "mlp":
            mods, sizes = [], spec["sizes"]
            act = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}[spec["activation"]]
            for k in range(len(sizes) - 1):
                mods += [torch.nn.Linear(sizes[k], sizes[k + 1])] + ([act()] if k < len(sizes) - 2 else [])
        else:
            c, hh, _ = spec["image"]
            pooled = spec["filters"] * ((hh - spec["kernel"] + 1) // 2) ** 2
            mods = [torch.nn.Conv2d(c, spec["filters"], spec["kernel"]), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                    torch.nn.Flatten(), torch.nn.Linear(pooled, spec["classes"])]
        self.model = torch.nn.Sequential(*mods).to(dev)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    def prepare(self, X, y, batch: int, epochs: int):
        torch, model, opt = self.torch, self.model, self.opt
        xs = torch.from_numpy(X).cuda().split(batch)
        ys = torch.from_numpy(y).cuda().split(batch)

        def run():
            for _ in range(epochs):
                for xb, yb in zip(xs, ys):
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
            torch.cuda.synchronize()
        return run

    def versions(self):
        return {"torch": self.torch.__version__, "device": self.torch.cuda.get_device_name()}


class Jax:
    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp

        if not any(d.platform == "gpu" for d in jax.devices()):
            raise RuntimeError("JAX sees no GPU (install jax[cuda12])")
        self.jax, rng = jax, jax.random.PRNGKey(SEED)
        if spec["kind"] == "mlp":
            sizes, act = spec["sizes"], getattr(jax.nn, spec["activation"], jnp.tanh)
            ks = jax.random.split(rng, len(sizes))
            self.ps = [(jax.random.normal(k, (a, b)) / a ** 0.5, jnp.zeros(b)) for k, a, b in zip(ks, sizes, sizes[1:])]

            def logits(ps, x):
                for w, b in ps[:-1]:
                    x = act(x @ w + b)
                return x @ ps[-1][0] + ps[-1][1]
        else:
            c, hh, _ = spec["image"]
            f, k = spec["filters"], spec["kernel"]
            pooled = f * ((hh - k + 1) // 2) ** 2
            k1, k2 = jax.random.split(rng)
            self.ps = [(jax.random.normal(k1, (f, c, k, k)) / (c * k * k) ** 0.5, jnp.zeros(f)),
                       (jax.random.normal(k2, (pooled, spec["classes"])) / pooled ** 0.5, jnp.zeros(spec["classes"]))]

            def logits(ps, x):
                z = jax.lax.conv_general_dilated(x, ps[0][0], (1, 1), "VALID") + ps[0][1][None, :, None, None]
                a = jax.lax.reduce_window(jax.nn.relu(z), -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
                return a.reshape(len(x), -1) @ ps[1][0] + ps[1][1]

        def loss(ps, x, y):
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(ps, x)), y[:, None], 1))

        @jax.jit
        def step(ps, x, y):
            g = jax.grad(loss)(ps, x, y)
            return jax.tree_util.tree_map(lambda p, d: p - LR * d, ps, g)
        self.step = step

    def prepare(self, X, y, batch: int, epochs: int):
        jnp = self.jax.numpy
        bs = [(jnp.asarray(X[i:i + batch]), jnp.asarray(y[i:i + batch])) for i in range(0, len(X), batch)]

        def run():
            ps = self.ps
            for _ in range(epochs):
                for xb, yb in bs:
                    ps = self.step(ps, xb, yb)
            self.jax.block_until_ready(ps)
            self.ps = ps
        return run

    def versions(self):
        return {"jax": self.jax.__version__}


def worker(impl: str, spec: dict, reps: int, steps: int, epochs: int) -> dict:
    try:
        obj = {"torch": Torch, "jax": Jax, "symbp": Symbp}[impl](spec)
        X, y = data(spec, spec["batch"] * steps)
        run = obj.prepare(X, y, spec["batch"], epochs)
        run()  # warm-up: compilation, autotuning, the first upload
        secs = h.time_reps(run, reps)
        return {"ms_per_step": [1e3 * s / (steps * epochs) for s in secs], "versions": obj.versions()}
    except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
        return {"error": h.one_line_error(err)}


# ==========================================================================
# Parent
# ==========================================================================

def run(specs: list[dict], impls=IMPLS, rounds: int = 3, reps: int = 3, steps: int = 50, epochs: int = 3,
        timeout: float = 600.0) -> int:
    """Time every impl on every spec at its batch and at LARGER × that batch; print a table."""
    require_gpu()
    impls = [i for i in impls if i in IMPLS]
    cases = [dict(s, batch=b) for s in specs for b in (s["batch"], s["batch"] * LARGER)]
    best: dict = {}
    for r in range(rounds):
        for case in cases:
            for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                key = (case["name"], case["batch"], impl)
                if "error" in best.get(key, {}):
                    continue
                out = h.run_worker([str(Path(__file__).resolve()), "--worker", impl, "--spec", json.dumps(case),
                                    "--reps", str(reps), "--steps", str(steps), "--epochs", str(epochs)],
                                   h.make_env({}), timeout)
                if "error" in out:
                    best[key] = out
                    print(f"  {impl:<6} {describe(case)}, batch {case['batch']}: ERROR {out['error']}", file=sys.stderr)
                    continue
                rec = best.setdefault(key, {"ms": []})
                rec["ms"] += out["ms_per_step"]
                rec["versions"] = out.get("versions", {})
                print(f"  round {r + 1} {impl:<6} {case['name']} batch {case['batch']}: "
                      f"{min(out['ms_per_step']):.3f} ms/step", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        peers = [min(best[(case["name"], case["batch"], i)]["ms"]) for i in impls
                 if i != "symbp" and "ms" in best.get((case["name"], case["batch"], i), {})]
        for impl in impls:
            rec = best.get((case["name"], case["batch"], impl), {})
            if "ms" not in rec:
                rows.append([describe(case), str(case["batch"]), impl, f"error: {rec.get('error', '?')}"])
                continue
            ms = min(rec["ms"])
            rows.append([describe(case), str(case["batch"]), impl, f"{ms:.3f}", f"{h.median(rec['ms']):.3f}",
                         f"{ms / min(peers):.2f}" if peers else "-"])
    print("\nGPU, float32, one SGD step (softmax cross-entropy) per batch, data on the device")
    print(h.format_table(["workload", "batch", "impl", "best ms/step", "median ms/step", "ratio"], rows,
                         right=[False, True, False, True, True, True]))
    print("ratio: best ms/step over the best of torch/jax at the same shapes.")
    versions = {k: v for rec in best.values() for k, v in rec.get("versions", {}).items()}
    print(" ".join(f"{k}={v}" for k, v in sorted(versions.items())))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    h.emit(worker(args.worker, json.loads(args.spec), args.reps, args.steps, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
