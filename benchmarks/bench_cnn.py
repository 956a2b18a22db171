"""Training-step benchmark of two CNNs: symbp against NumPy, PyTorch and JAX on CPU.

What is measured
----------------
One float32 training step -- forward, softmax cross-entropy (mean over the batch),
backward, plain SGD (lr=0.01) -- of

    small  input 1×28×28 → Conv2D(8, 5×5) + relu → 2×2 max pool → Flatten → Dense(10),  batch 64
    wide   input 1×28×28 → Conv2D(32, 3×3) + relu → 2×2 max pool → Conv2D(64, 3×3) + relu
           → 2×2 max pool → Flatten → Dense(10),  batch 128

    numpy          hand-written: im2col by sliding_window_view, GEMMs, max-pool routing by argmax
                   (the small net only)
    torch          eager nn.Conv2d/MaxPool2d/Linear, F.cross_entropy, torch.optim.SGD
    torch.compile  the same module under torch.compile (default mode; compile time in "setup s")
    jax            the whole step under jax.jit (params -> new params)
    symbp          sb.compile(...).fit(X, y, batch_size=64, epochs=1, shuffle=False)

As in ``bench_mlp.py`` (whose harness this reuses): the peers run a Python loop of
``steps`` step calls over pre-sliced batches of N = batch·steps samples; symbp runs one
``fit`` over the same N samples (the whole epoch is one compiled call) and fit time / steps
is its per-step cost.  The "× floor" column divides by the GEMM floor: 3× the forward pass's
GEMM FLOPs at the best float32 2048³ GEMM rate NumPy gets in the same run.  Each
implementation runs in its own subprocess, rounds are interleaved, the parent waits for
the machine to go idle before each worker, and the "contention" column says how much of
the machine other processes used meanwhile (above ~10% the number is suspect: on 2 cores
one busy neighbour halves a 2-thread step).  Each library runs in its own default
environment (symbp's OMP_WAIT_POLICY and OPENBLAS_CORETYPE only in symbp's worker, set by
``import symbp``); the report prints each worker's environment and threads, then every
impl's cold and cached start-up (of the small net).

Usage
-----
    python benchmarks/bench_cnn.py                 # 3 rounds, every impl that imports
    python benchmarks/bench_cnn.py --quick         # 1 round, short reps, 1 start-up round
    python benchmarks/bench_cnn.py --rounds 1 --impls torch,symbp --nets wide
    python benchmarks/bench_cnn.py --check         # every impl's SGD step vs a float64 reference
    python benchmarks/bench_cnn.py --profile       # symbp's kernels, step by step
    python benchmarks/bench_cnn.py --target cuda   # on the GPU: symbp vs PyTorch CUDA (and JAX)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import _harness as h

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
LR, SEED, CLASSES = 0.01, 0, 10
IMAGE = (1, 28, 28)
# Each conv (filters, kernel) is followed by relu and a 2×2 max pool, then Flatten and Dense(10).
NETS = {"small": {"convs": ((8, 5),), "batch": 64},
        "wide": {"convs": ((32, 3), (64, 3)), "batch": 128}}
CONVS, BATCH = NETS["small"]["convs"], NETS["small"]["batch"]
FILTERS, KERNEL = CONVS[0]  # the small net's (the CUDA comparison's shapes)
PEERS = ("numpy", "torch", "torch.compile", "jax")
IMPLS = (*PEERS, "symbp")
CONTENTION_WARN = 0.10
# Each library in its own default environment; see _harness.WorkerEnv and bench_mlp.py.
IMPL_NEEDS = {"jax": {"JAX_PLATFORMS": "cpu"}}
COMPILE_CACHE = {"symbp": "SYMBP_CACHE_DIR", "torch.compile": "TORCHINDUCTOR_CACHE_DIR"}
CACHE_NOTE = {"numpy": "nothing to compile", "torch": "nothing to compile",
              "jax": "no persistent cache by default: every process compiles again"}


def use_net(name: str) -> None:
    """Make ``name`` the net every function here builds and times."""
    global CONVS, BATCH
    CONVS, BATCH = NETS[name]["convs"], NETS[name]["batch"]


def shapes() -> list:
    """(kind, in_shape, out_shape) of every layer: conv, pool, …, dense."""
    out, (c, hw) = [], (IMAGE[0], IMAGE[1])
    for filters, kernel in CONVS:
        out.append(("conv", (c, hw), (filters, hw - kernel + 1)))
        c, hw = filters, hw - kernel + 1
        out.append(("pool", (c, hw), (c, hw // 2)))
        hw //= 2
    out.append(("dense", c * hw * hw, CLASSES))
    return out


def param_names() -> list:
    """symbp's names, by layer position: conv l, pool l+1, …, Flatten, Dense."""
    names, pos = [], 1
    for _ in CONVS:
        names += [f"W{pos}", f"b{pos}"]
        pos += 2
    return names + [f"W{pos + 1}", f"b{pos + 1}"]


def describe() -> str:
    convs = " → ".join(f"Conv2D({f}, {k}×{k})+relu → maxpool 2" for f, k in CONVS)
    return f"CNN 1×28×28 → {convs} → Dense(10), batch {BATCH}, float32, SGD step"


def forward_gemm_flops() -> int:
    """The forward pass's multiply-adds × 2 over one batch, as GEMMs count them (im2col)."""
    flops = 0
    for kind, a, b in shapes():
        if kind == "conv":
            flops += 2 * BATCH * b[0] * a[0] * (a[1] - b[1] + 1) ** 2 * b[1] ** 2
        elif kind == "dense":
            flops += 2 * BATCH * a * b
    return flops


def make_data(steps: int, seed: int = SEED):
    import numpy as np

    n = BATCH * steps
    X = np.random.default_rng(seed).standard_normal((n, *IMAGE), dtype=np.float32)
    y = np.random.default_rng(seed + 1).integers(0, CLASSES, size=n, dtype=np.int64)
    return X, y


def init_params(seed: int = SEED + 2) -> dict:
    """PyTorch-style uniform init, small non-zero biases (the small net: W1 (8, 1, 5, 5), W4 (10, 1152))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names, out = iter(param_names()), {}
    for kind, a, b in shapes():
        if kind == "pool":
            continue
        shape = (b[0], a[0], a[1] - b[1] + 1, a[1] - b[1] + 1) if kind == "conv" else (b, a)
        fan = math.prod(shape[1:])
        out[next(names)] = rng.uniform(-1, 1, shape).astype(np.float32) / math.sqrt(fan)
        out[next(names)] = rng.uniform(-0.1, 0.1, shape[0]).astype(np.float32)
    return out


def batches(X, y):
    return [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


# ==========================================================================
# Implementations: prepare(X, y) -> run (one pass = steps updates); params() -> dict
# ==========================================================================

class NumpyImpl:
    """Hand-written forward and backward in the params' dtype (float64: the --check reference)."""

    def __init__(self, params: dict):
        import numpy as np

        if len(CONVS) != 1:
            raise NotImplementedError("the hand-written NumPy step is the small net's (one conv layer)")
        self.np = np
        self.p = {k: v.copy() for k, v in params.items()}

    def step(self, x, y):
        np, p = self.np, self.p
        (K, kernel), = CONVS
        B = len(x)
        W1 = p["W1"].reshape(K, -1)
        # im2col: (B, Ho, Wo, C·kh·kw), then Z = cols·W1ᵀ + b1
        cols = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))
        Ho = cols.shape[2]
        cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(B, Ho * Ho, -1)
        z = cols @ W1.T + p["b1"]                      # (B, Ho·Wo, K)
        a = np.maximum(z, 0).reshape(B, Ho, Ho, K).transpose(0, 3, 1, 2)  # (B, K, Ho, Wo)
        win = a.reshape(B, K, Ho // 2, 2, Ho // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, K, Ho // 2, Ho // 2, 4)
        arg = win.argmax(axis=-1)
        pooled = np.take_along_axis(win, arg[..., None], -1)[..., 0]
        flat = pooled.reshape(B, -1)
        logits = flat @ p["W4"].T + p["b4"]
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        prob[np.arange(B), y] -= 1
        d4 = prob / B
        dflat = d4 @ p["W4"]
        gW4, gb4 = d4.T @ flat, d4.sum(0)
        dwin = np.zeros_like(win)
        np.put_along_axis(dwin, arg[..., None], dflat.reshape(B, K, Ho // 2, Ho // 2, 1), -1)
        da = dwin.reshape(B, K, Ho // 2, Ho // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, K, Ho, Ho)
        dz = (da * (a > 0)).transpose(0, 2, 3, 1).reshape(B, Ho * Ho, K)
        gW1 = np.einsum("bpk,bpc->kc", dz, cols).reshape(p["W1"].shape)
        gb1 = dz.sum((0, 1))
        for k, g in (("W1", gW1), ("b1", gb1), ("W4", gW4), ("b4", gb4)):
            p[k] -= LR * g

    def prepare(self, X, y):
        bs, step = batches(X, y), self.step

        def run():
            for xb, yb in bs:
                step(xb, yb)
        return run

    def params(self):
        return self.p

    def versions(self):
        return {"numpy": self.np.__version__}


class TorchImpl:
    """Eager; or, with ``compiled``, the module under torch.compile (default mode, inductor;
    compiled on the first call), loss and optimizer step eager. torch's own thread settings."""

    def __init__(self, params: dict, compiled: bool = False):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        layers, self.owners = [], []  # owners: (module, weight name, bias name)
        names = iter(param_names())
        for kind, a, b in shapes():
            if kind == "conv":
                mod = torch.nn.Conv2d(a[0], b[0], a[1] - b[1] + 1)
                layers += [mod, torch.nn.ReLU()]
            elif kind == "pool":
                layers.append(torch.nn.MaxPool2d(2))
                continue
            else:
                mod = torch.nn.Linear(a, b)
                layers += [torch.nn.Flatten(), mod]
            self.owners.append((mod, next(names), next(names)))
        with torch.no_grad():
            for mod, w, b in self.owners:
                mod.weight.copy_(torch.from_numpy(params[w]))
                mod.bias.copy_(torch.from_numpy(params[b]))
        self.model = torch.nn.Sequential(*layers)
        opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        model = torch.compile(self.model) if compiled else self.model

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        self.step = step

    def prepare(self, X, y):
        torch, step = self.torch, self.step
        bs = list(zip(torch.from_numpy(X).split(BATCH), torch.from_numpy(y).split(BATCH)))

        def run():
            for xb, yb in bs:
                step(xb, yb)
        return run

    def params(self):
        return {k: t.detach().numpy().copy() for mod, w, b in self.owners
                for k, t in ((w, mod.weight), (b, mod.bias))}

    def versions(self):
        return {"torch": self.torch.__version__}


class JaxImpl:
    def __init__(self, params: dict):
        import jax
        import jax.numpy as jnp

        self.jax = jax
        self.ps = {k: jnp.asarray(v) for k, v in params.items()}

        names = param_names()

        def loss(ps, x, y):
            a = x
            for i in range(len(CONVS)):
                w, b = names[2 * i], names[2 * i + 1]
                z = jax.lax.conv_general_dilated(a, ps[w], (1, 1), "VALID") + ps[b][None, :, None, None]
                a = jax.lax.reduce_window(jax.nn.relu(z), -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
            logits = a.reshape(len(x), -1) @ ps[names[-2]].T + ps[names[-1]]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        @jax.jit
        def step(ps, x, y):
            g = jax.grad(loss)(ps, x, y)
            return {k: ps[k] - LR * g[k] for k in ps}
        self.step = step

    def prepare(self, X, y):
        jnp = self.jax.numpy
        bs = [(jnp.asarray(xb), jnp.asarray(yb)) for xb, yb in batches(X, y)]

        def run():
            ps = self.ps
            for xb, yb in bs:
                ps = self.step(ps, xb, yb)
            self.jax.block_until_ready(ps)
            self.ps = ps
        return run

    def params(self):
        import numpy as np

        return {k: np.asarray(v) for k, v in self.ps.items()}

    def versions(self):
        return {"jax": self.jax.__version__}


class SymbpImpl:
    def __init__(self, params: dict):
        sys.path.insert(0, str(REPO_ROOT))
        import symbp as sb

        self.sb = sb
        layers = [x for f, k in CONVS for x in (sb.Conv2D(f, k, activation="relu"), sb.MaxPool2D(2))]
        net = sb.Network(inputs=IMAGE, layers=[*layers, sb.Flatten(), sb.Dense(CLASSES)], loss="softmax_cross_entropy")
        dtype = str(params["W1"].dtype)
        self.model = sb.compile(net, dtype=dtype, seed=0)
        for k, v in params.items():
            self.model.params[k] = v.copy()

    def prepare(self, X, y):
        model, sb = self.model, self.sb

        def run():
            model.fit(X, y, optimizer=sb.SGD(lr=LR), batch_size=BATCH, epochs=1, shuffle=False, progress=False)
        return run

    def settle(self):
        """Wait for the two-thread step (train_epoch_halves) that symbp compiles beside a fit's
        first epochs: a user's later epochs run it.  Its compile time counts in setup_s."""
        from symbp.backends.cpu import runtime

        self.prepare(*make_data(2))()  # a second fit: the background compile starts
        runtime.wait_for_halves(self.model._train_kernels(self.sb.SGD(lr=LR)))

    def params(self):
        return dict(self.model.params)

    def versions(self):
        import numba

        return {"symbp": getattr(self.sb, "__version__", "?"), "numba": numba.__version__}


BUILDERS = {"numpy": NumpyImpl, "torch": TorchImpl, "torch.compile": lambda p: TorchImpl(p, compiled=True),
            "jax": JaxImpl, "symbp": SymbpImpl}
LIBRARY = {"numpy": "numpy", "torch": "torch", "torch.compile": "torch", "jax": "jax", "symbp": "symbp"}


def import_library(impl: str) -> None:
    """The impl's library first, before NumPy, as a user's script would (``import symbp``
    sets its thread and BLAS settings, which only count before NumPy loads OpenBLAS)."""
    if impl == "symbp":
        sys.path.insert(0, str(REPO_ROOT))
    __import__(LIBRARY[impl])


# ==========================================================================
# Workers
# ==========================================================================

def worker_timing(args) -> dict:
    t0 = time.perf_counter()
    impl = BUILDERS[args.impl](init_params())
    impl.prepare(*make_data(2))()  # JIT / first-call costs
    getattr(impl, "settle", lambda: None)()  # what compiles beside the first epochs (symbp)
    setup_s = time.perf_counter() - t0
    steps = args.steps_hint or 8
    for _ in range(8):  # grow until one pass lasts about target_s
        run = impl.prepare(*make_data(steps))
        warm = min(h.time_once(run), h.time_once(run))
        if warm >= 0.7 * args.target_s or steps >= 2000:
            break
        steps = min(2000, max(steps + 1, math.ceil(steps * 1.1 * args.target_s / max(warm, 1e-6))))
    with h.Contention() as busy:
        times = h.time_reps(run, args.reps)
    return {"impl": args.impl, "steps": steps, "ms_per_step": [t / steps * 1e3 for t in times],
            "contention": busy.fraction, "versions": impl.versions(), "setup_s": setup_s,
            "env_info": h.worker_env_info()}


def worker_startup(args) -> dict:
    """From before the library's import to the end of the first step on one batch (making
    the data left out), in this fresh process."""
    t0 = time.perf_counter()
    import_library(args.impl)
    t1 = time.perf_counter()
    X, y = make_data(1)
    params = init_params()
    t2 = time.perf_counter()
    impl = BUILDERS[args.impl](params)
    t3 = time.perf_counter()
    impl.prepare(X, y)()
    t4 = time.perf_counter()
    return {"impl": args.impl, "import_s": t1 - t0, "build_s": t3 - t2, "first_step_s": t4 - t3,
            "total_s": (t1 - t0) + (t4 - t2), "env_info": h.worker_env_info()}


def worker_check(args) -> dict:
    import numpy as np

    data = np.load(args.check_in)
    impl = BUILDERS[args.impl]({k: data[k] for k in param_names()})
    impl.prepare(data["x"], data["y"])()
    np.savez(args.check_out, **{k: np.asarray(v) for k, v in impl.params().items()})
    return {"impl": args.impl}


def run_profile(nets: list[str]) -> None:
    """symbp's forward and SGD backward kernels step by step (benchmarks/_steps.py), in this
    process, on one batch: where a step's time goes."""
    import inspect

    import _steps
    import numpy as np

    for net in nets:
        use_net(net)
        impl = SymbpImpl(init_params())
        X, y = make_data(2)
        impl.prepare(X, y)()  # compiles the training module
        model = impl.model
        fwd, train = model.kernels, next(iter(model._train_modules.values()))
        ws = {k: np.zeros(tuple(BATCH if d == "batch" else d for d in shape), np.float32) for k, shape in fwd.WORKSPACE}
        given = {"X": np.ascontiguousarray(X[:BATCH].reshape(BATCH, -1)), "hyper": np.array([LR, 0.0, 0.0]), "t": 1,
                 "seed": 0, **{k: v.copy() for k, v in model.params.items()}, **ws}
        print(f"\n{describe()}: symbp's kernels, each step alone on one batch (best of 3 × 10)")
        for module, name in ((fwd, "forward"), (train, "backward_update")):
            args = [given[a] for a in inspect.signature(getattr(module, name).py_func).parameters]
            whole = min(h.time_once(lambda m=module, a=args, f=name: getattr(m, f)(*a)) for _ in range(20)) * 1e3
            _steps.print_profile(name, _steps.profile(module, name, args), whole)


def worker_main(args) -> int:
    use_net(args.net)
    try:
        if args.impl == "gemm":
            result = h.gemm_rate()
        elif args.startup:
            result = worker_startup(args)
        else:
            import_library(args.impl)
            result = worker_check(args) if args.check_in else worker_timing(args)
    except BaseException as exc:  # report one line, never a traceback in the table
        h.emit({"error": h.torch_compile_error(exc) if args.impl == "torch.compile" else h.one_line_error(exc)})
        return 1
    h.emit(result)
    return 0


# ==========================================================================
# Parent
# ==========================================================================

def run_benchmark(args, impls, envs: h.WorkerEnv) -> dict:
    res = {i: {"ms": [], "steps": None, "error": None, "busy": [], "setup": [], "env_info": None} for i in impls}
    for r in range(args.rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            rec = res[impl]
            if rec["error"]:
                continue
            if args.wait_idle > 0 and h.wait_for_idle(args.wait_idle, CONTENTION_WARN) is None:
                print(f"  (machine still busy after {args.wait_idle:.0f} s; measuring anyway)", file=sys.stderr)
            argv = [str(Path(__file__).resolve()), "--worker", impl, "--net", args.net, "--reps", str(args.reps),
                    "--target-s", str(args.target_s)] + (["--steps-hint", str(rec["steps"])] if rec["steps"] else [])
            out = h.run_worker(argv, envs.for_impl(impl), args.timeout)
            if "error" in out:
                rec["error"] = out["error"]
                print(f"  round {r + 1}  {impl:<13}  ERROR {out['error']}", file=sys.stderr, flush=True)
                continue
            rec["ms"] += out["ms_per_step"]
            rec["steps"] = out["steps"]
            rec["busy"].append((min(out["ms_per_step"]), out.get("contention")))
            rec["setup"].append(out["setup_s"])
            rec["env_info"] = out["env_info"]
            print(f"  round {r + 1}  {impl:<13}  {min(out['ms_per_step']):8.3f} ms/step  "
                  f"({out['steps']} steps, contention {out.get('contention') or 0:.0%})", file=sys.stderr, flush=True)
    return res


def print_table(impls, res, gflops: float | None) -> None:
    best_peer = min((min(res[i]["ms"]) for i in impls if i in PEERS and res[i]["ms"]), default=None)
    floor = h.gemm_floor_ms(forward_gemm_flops(), gflops)
    rows = []
    for impl in impls:
        rec = res[impl]
        if not rec["ms"]:
            rows.append([impl, f"error: {rec['error']}"])
            continue
        best = min(rec["ms"])
        at_best = min(rec["busy"], key=lambda mc: mc[0])[1]
        seen = [c for _, c in rec["busy"] if c is not None]
        busy = "?" if at_best is None else f"{at_best:.0%}/{max(seen):.0%}"
        setup = f"{rec['setup'][0]:.2f}" + (f" / {rec['setup'][-1]:.2f}" if len(rec["setup"]) > 1 else "")
        rows.append([impl, f"{best:.3f}", f"{h.median(rec['ms']):.3f}",
                     f"{best / best_peer:.2f}" if best_peer else "-", f"{best / floor:.1f}" if floor else "-",
                     str(rec["steps"]), setup, busy])
    print(f"\n{describe()}")
    print(h.format_table(["impl", "best ms/step", "median ms/step", "ratio", "× floor", "steps/rep", "setup s",
                          "contention best/max"], rows, right=[False] + [True] * 7))
    if floor:
        print(h.gemm_floor_note(forward_gemm_flops(), gflops))
    print(f"ratio: best ms/step over the best peer's ({', '.join(PEERS)}); setup s: build + first call on\n"
          "2 batches, first round (/ last round) -- JAX's jit and torch.compile's compilation, measured apart\n"
          "from the steps; contention: share of the machine other processes used during the best / the\n"
          "worst worker.")


def run_check(args, impls, envs: h.WorkerEnv) -> bool:
    """Every impl makes one SGD step from the same weights and batch; compared with the
    hand-written step in float64."""
    import numpy as np

    x, y = make_data(1)
    params = init_params()
    ref = NumpyImpl({k: v.astype(np.float64) for k, v in params.items()})
    ref.step(x.astype(np.float64), y)
    ok = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.npz"
        np.savez(src, x=x, y=y, **params)
        for impl in impls:
            dst = Path(tmp) / f"{impl}.npz"
            out = h.run_worker([str(Path(__file__).resolve()), "--worker", impl, "--check-in", str(src),
                                "--check-out", str(dst)], envs.for_impl(impl), args.timeout)
            if "error" in out:
                rows.append([impl, f"error: {out['error']}"])
                continue
            got = np.load(dst)
            # relative error of the update itself (new − old), the part a wrong gradient changes
            err = max(np.abs(got[k] - ref.p[k]).max() / np.abs(ref.p[k] - params[k]).max() for k in param_names())
            good = err < 1e-3
            ok &= good
            rows.append([impl, f"{err:.2e}", "ok" if good else "MISMATCH"])
    print(h.format_table(["impl", "max update rel err vs float64", "result"], rows))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed reps per worker (default 5, --quick 2)")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per rep (default 0.4, --quick 0.15)")
    ap.add_argument("--quick", action="store_true", help="1 round, short reps, one start-up round")
    ap.add_argument("--wait-idle", type=float, default=20.0, help="seconds to wait for an idle machine per worker")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    ap.add_argument("--startup-rounds", type=int, default=None,
                    help="start-up rounds, each with fresh caches (default 2, --quick 1)")
    ap.add_argument("--env", action="append", default=[], metavar="[IMPL:]KEY=VALUE",
                    help="extra env var for every worker, or with IMPL: for that impl's only (repeatable)")
    ap.add_argument("--keep-shell-tuning", action="store_true",
                    help="pass this shell's thread/BLAS variables (OMP_*, OPENBLAS_*, ...) on to every worker "
                         "(by default they are dropped: each library runs with its own defaults)")
    ap.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: symbp's CUDA target against PyTorch CUDA (and JAX on the GPU) on these shapes "
                         "and an 8× batch (see _cuda_bench.py); exits 2 without a GPU")
    ap.add_argument("--nets", default="small,wide",
                    help="which nets, of " + ", ".join(f"{k} ({v['convs']}, batch {v['batch']})" for k, v in NETS.items()))
    ap.add_argument("--net", default="small", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="symbp's forward and backward kernels timed step by step (no peers)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps-hint", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--check-in", help=argparse.SUPPRESS)
    ap.add_argument("--check-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, full, quick in (("rounds", 3, 1), ("reps", 5, 2), ("target_s", 0.4, 0.15), ("startup_rounds", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.worker:
        args.impl = args.worker
        return worker_main(args)
    if any(n not in NETS for n in args.nets.split(",")):
        ap.error(f"unknown net in {args.nets!r}; choose from {tuple(NETS)}")
    if args.profile:
        import_library("symbp")
        run_profile(args.nets.split(","))
        return 0
    impls = [i for i in args.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown impl(s) {bad}; choose from {IMPLS}")
    if args.target == "cuda":
        import _cuda_bench

        spec = _cuda_bench.cnn_spec(IMAGE, FILTERS, KERNEL, CLASSES, BATCH)
        return _cuda_bench.run([spec], [i for i in impls if i in _cuda_bench.IMPLS], rounds=args.rounds, reps=args.reps,
                               timeout=args.timeout)
    envs = h.WorkerEnv(impls, IMPL_NEEDS, args.env, args.keep_shell_tuning)
    print(" ".join(f"{k}={v}" for k, v in h.system_info().items()))
    for line in envs.header_lines():
        print(line)
    if args.check:
        return 0 if run_check(args, impls, envs) else 1
    t0 = time.perf_counter()
    gemm = h.run_worker([str(Path(__file__).resolve()), "--worker", "gemm"], envs.for_impl("numpy"), args.timeout)
    gflops = gemm.get("gflops")
    for net in args.nets.split(","):
        use_net(net)
        args.net = net
        print(f"\n== {describe()}", file=sys.stderr, flush=True)
        res = run_benchmark(args, impls, envs)
        print(f"rounds {args.rounds} x reps {args.reps}, target {args.target_s} s per rep")
        print_table(impls, res, gflops)
    print("\nenvironment of each worker:")
    print(envs.table(impls, {i: res[i]["env_info"] for i in impls}))
    if not args.no_startup:
        use_net("small")
        out = h.run_startup(impls, lambda impl: [str(Path(__file__).resolve()), "--worker", impl, "--net", "small",
                                                 "--startup"],
                            envs, COMPILE_CACHE, args.startup_rounds, args.timeout, args.wait_idle, CONTENTION_WARN)
        h.print_startup(impls, out, f"the small CNN, first step on one batch of {BATCH}", COMPILE_CACHE, CACHE_NOTE)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
