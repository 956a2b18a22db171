"""Training-step benchmark: symbp against NumPy, PyTorch and JAX on CPU.

What is measured
----------------
The wall time of one float32 training step -- forward, softmax cross-entropy
(mean over the batch), backward, plain SGD update (lr=0.01, no weight decay,
no momentum) -- on three fully connected nets:

    small   64-32-10          batch  32   tanh hidden
    medium  784-256-256-10    batch 128   relu hidden
    large   784-1024-1024-10  batch 256   relu hidden

Implementations (each only if it imports):

    numpy          hand-written backprop: ``x @ W.T + b``, stable softmax, SGD in place
    torch          eager nn.Linear stack, F.cross_entropy, torch.optim.SGD
    torch.compile  the same with the module under torch.compile (default mode, inductor);
                   its compilation is timed apart (the "setup s" column, and start-up)
    jax            the whole step under jax.jit (params -> new params, donated)
    symbp          sb.compile(...).fit(X, y, batch_size=B, epochs=1, shuffle=False)

With ``--optimizer adam`` the update is Adam instead (lr=1e-3, betas
(0.9, 0.999), eps=1e-8, no weight decay, torch.optim.Adam's formulas) in
every impl: NumPy by hand (m, v, bias corrections, in place),
torch.optim.Adam, optax.adam inside the jitted JAX step, and sb.Adam, whose
update symbp fuses into the generated backward pass. ``--adam-overhead``
times every impl with both optimizers (each in its own worker, interleaved)
and prints the Adam/SGD ratio per impl: for symbp that is the cost of its
fused Adam step (the goal: under 1.10).

For the peers a timed repetition is a Python loop of ``steps`` step calls over
pre-sliced batches of N = batch * steps samples (JAX: block_until_ready on
the final params). For symbp it is one ``fit`` call over the same kind of N
samples: fit runs the whole epoch in one compiled call, so fit time / steps is
its real per-step cost. ``steps`` is picked per implementation so that one
repetition lasts about ``--target-s`` seconds (default 0.5); later rounds
start from the previous size and only grow it. Every implementation warms up
(JIT compilation, first-touch of the data) before it is timed.

How it runs
-----------
Each measurement happens in a fresh subprocess (this script re-invoked with
``--worker IMPL NET``) so that one library's thread pools and allocator state
never touch another's. Rounds are interleaved -- round 1 runs every impl once,
then round 2, ... -- so slow drift of the machine hits all impls alike.

Each library runs in its own default environment, threads as its users get them:
workers inherit the shell's environment minus its thread/BLAS tuning variables
(OMP_*, OPENBLAS_*, MKL_*, NUMBA_*, ...; ``--keep-shell-tuning`` keeps them), plus
only what a library needs to run at all (JAX_PLATFORMS=cpu, for JAX alone).
symbp's settings (OMP_WAIT_POLICY=passive, and OPENBLAS_CORETYPE=SkylakeX on
AVX-512 CPUs) are made by ``import symbp`` itself, so only symbp's worker has
them: every worker imports its library first, before NumPy. The report's
environment table shows, per worker, what the harness gave it, what its library
set in-process, and the threads and BLAS pools it ran with.

How to read the table
---------------------
    best ms/step    the minimum over all rounds and reps: the least noisy
                    estimate of what the code costs on this machine
    median ms/step  the median over all rounds and reps: what you typically get
    ratio           best ms/step divided by the best peer's (fastest of
                    numpy/torch/torch.compile/jax). The best peer shows 1.00;
                    for symbp, < 1 means symbp is faster than every peer.
    × floor         best ms/step over the GEMM floor of issue 16: 3× the
                    forward pass's GEMM FLOPs at the best float32 2048³ GEMM
                    rate NumPy gets in the same run (a worker of its own)
    setup s         build + first call on 2 batches, in the first round's
                    worker (/ the last round's): JIT and torch.compile time
    contention      share of the machine's CPU that other processes used (or
    best/max        the hypervisor stole) during a worker's timed reps: for
                    the worker that produced the best value, and the worst
                    over the row. On 2 cores, another process taking one core
                    can slow a 2-thread BLAS step tenfold; above ~10% treat
                    the number with suspicion.

Then every impl's start-up: the time from before its library's import to the
end of its first step on one batch of the medium net, in a fresh process. "cold"
starts with an empty compile cache (symbp: ``SYMBP_CACHE_DIR``, so derivation,
code generation and Numba compilation all happen; torch.compile:
``TORCHINDUCTOR_CACHE_DIR``), "cached" is a second fresh process reusing it. JAX
keeps no compiled code between processes by default; NumPy and eager torch have
none to keep.

Last, memory: the peak RSS of one symbp ``fit`` (SGD, one epoch, shuffled, batch
128) over ``--mem-samples`` (10^6) samples of the medium net, beside the data's
size plus 3x the parameters plus the batch buffers.

Usage
-----
    python benchmarks/bench_mlp.py                      # everything, 3 rounds
    python benchmarks/bench_mlp.py --quick              # 1 round, short reps
    python benchmarks/bench_mlp.py --nets small,medium --impls numpy,symbp
    python benchmarks/bench_mlp.py --check              # verify every impl's SGD step
    python benchmarks/bench_mlp.py --check --optimizer adam   # ... and 3 Adam steps
    python benchmarks/bench_mlp.py --optimizer adam     # the usual tables, Adam steps
    python benchmarks/bench_mlp.py --adam-overhead      # Adam vs SGD per impl (medium net)
    python benchmarks/bench_mlp.py --env torch:OMP_WAIT_POLICY=passive   # one impl's env
    python benchmarks/bench_mlp.py --target cuda        # on the GPU: symbp vs PyTorch CUDA (and JAX)
    python benchmarks/bench_mlp.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _harness as h

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

# The step's settings, shared by every benchmark (symbp's sb.Adam follows torch.optim.Adam exactly).
LR, ADAM_LR, ADAM_BETAS, ADAM_EPS, OPTIMIZERS = h.LR, h.ADAM_LR, h.ADAM_BETAS, h.ADAM_EPS, h.OPTIMIZERS
# Steps compared by --check: one for SGD; three for Adam, so that the moment
# estimates and both bias corrections are exercised past their first step.
CHECK_STEPS = {"sgd": 1, "adam": 3}
SEED = 0
# Share of the machine used by other processes above which numbers are suspect.
CONTENTION_WARN = 0.10


@dataclass(frozen=True)
class Net:
    name: str
    inputs: int
    hidden: tuple[int, ...]
    outputs: int
    batch: int
    activation: str

    @property
    def sizes(self) -> list[int]:
        return [self.inputs, *self.hidden, self.outputs]

    def describe(self) -> str:
        shape = "-".join(map(str, self.sizes))
        return f"{shape}, batch {self.batch}, {self.activation} hidden"


NETS = {
    "small": Net("small", 64, (32,), 10, 32, "tanh"),
    "medium": Net("medium", 784, (256, 256), 10, 128, "relu"),
    "large": Net("large", 784, (1024, 1024), 10, 256, "relu"),
}
PEERS = ("numpy", "torch", "torch.compile", "jax")
IMPLS = (*PEERS, "symbp")

# The environment of the workers: see _harness.WorkerEnv. Each library runs with its own
# defaults; only what a library needs to run at all is added, for it alone. symbp's
# settings (OMP_WAIT_POLICY=passive, OPENBLAS_CORETYPE=SkylakeX on AVX-512) are made by
# ``import symbp`` itself, inside symbp's worker, which imports it before NumPy.
IMPL_NEEDS = {
    "jax": {"JAX_PLATFORMS": "cpu"},
}
# Start-up (time to the first step) and memory are measured on this net.
STARTUP_NET = MEMORY_NET = "medium"
# Where each impl keeps compiled code between processes; start-up's "cold" empties it.
COMPILE_CACHE = {"symbp": "SYMBP_CACHE_DIR", "torch.compile": "TORCHINDUCTOR_CACHE_DIR"}
CACHE_NOTE = {"numpy": "nothing to compile", "torch": "nothing to compile",
              "jax": "no persistent cache by default: every process compiles again"}


# ==========================================================================
# Data and initial weights (shared by all implementations)
# ==========================================================================

def make_data(net: Net, n_batches: int, seed: int = SEED):
    """Synthetic inputs and labels. Generated sequentially from fixed seeds,
    so the data of a shorter run is a prefix of a longer one: every impl sees
    the same samples, whatever number of steps it was given."""
    import numpy as np

    n = net.batch * n_batches
    X = np.random.default_rng(seed).standard_normal((n, net.inputs), dtype=np.float32)
    y = np.random.default_rng(seed + 1).integers(0, net.outputs, size=n, dtype=np.int64)
    return X, y


def init_params(net: Net, seed: int = SEED + 2):
    """Glorot-uniform weights (out, in) -- the nn.Linear layout -- and small
    non-zero biases (so a wrong bias gradient cannot hide behind zeros)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(net.sizes[:-1], net.sizes[1:]):
        lim = math.sqrt(6.0 / (fan_in + fan_out))
        W = rng.uniform(-lim, lim, size=(fan_out, fan_in)).astype(np.float32)
        b = rng.uniform(-0.1, 0.1, size=fan_out).astype(np.float32)
        params.append((W, b))
    return params


def batches_of(net: Net, X, y):
    """Pre-sliced views, so slicing is not part of the timed loop."""
    B = net.batch
    return [(X[i:i + B], y[i:i + B]) for i in range(0, len(X), B)]


# ==========================================================================
# Implementations. Each one is built as Impl(net, params, optimizer) with
# optimizer "sgd" or "adam" (plus keyword options some impls take) and offers:
#   prepare(X, y) -> run      run() performs one pass (= steps updates) and
#                             returns only when the result is materialised
#   params()      -> [(W, b)] current weights as NumPy (for --check)
#   versions()    -> dict
# Optimizer state (Adam's moments and step count) lives in the impl, so it
# carries over from one run() to the next, as in a real training loop.
# ==========================================================================

class NumpyImpl:
    """Hand-written backprop. Works in the dtype of the given params, so the
    same code in float64 is the reference for --check.

    ``grad_log``: if a list, every step appends its gradients
    ``[(gW, gb), ...]`` (copies, layer order) -- --check uses this on the
    float64 reference."""

    def __init__(self, net: Net, params, optimizer: str = "sgd", grad_log: list | None = None):
        import numpy as np

        self.np = np
        self.net = net
        self.optimizer = optimizer
        self.grad_log = grad_log
        self.W = [W.copy() for W, _ in params]
        self.b = [b.copy() for _, b in params]
        self.rows = np.arange(net.batch)
        if optimizer == "adam":
            # torch.optim.Adam's state: exp_avg (m), exp_avg_sq (v), the step
            # count; plus one scratch array per tensor for the denominator.
            ts = [*self.W, *self.b]
            self.m = {id(t): np.zeros_like(t) for t in ts}
            self.v = {id(t): np.zeros_like(t) for t in ts}
            self.tmp = {id(t): np.empty_like(t) for t in ts}
            self.t = 0
        elif optimizer != "sgd":
            raise ValueError(f"unknown optimizer {optimizer!r}")

    def adam_update(self, theta, g) -> None:
        """torch.optim.Adam (single-tensor path, no weight decay), in place:
            m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
            theta <- theta - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)
        The bias corrections are Python floats, as in torch."""
        np = self.np
        b1, b2 = ADAM_BETAS
        key = id(theta)
        m, v, tmp = self.m[key], self.v[key], self.tmp[key]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        g *= g                                  # g is a fresh array: square it in place
        g *= 1 - b2
        v += g
        step_size = ADAM_LR / (1 - b1 ** self.t)
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(1 - b2 ** self.t)
        tmp += ADAM_EPS
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        theta -= tmp

    def step(self, x, y):
        np, W, b = self.np, self.W, self.b
        n_layers = len(W)
        tanh = self.net.activation == "tanh"
        adam = self.optimizer == "adam"
        if adam:
            self.t += 1
        if self.grad_log is not None:
            self.grad_log.append([None] * n_layers)

        # Forward, keeping every layer's input for the backward pass.
        acts = [x]
        for i in range(n_layers):
            z = acts[-1] @ W[i].T
            z += b[i]
            if i < n_layers - 1:
                if tanh:
                    np.tanh(z, out=z)
                else:
                    np.maximum(z, 0, out=z)
                acts.append(z)

        # d(mean CE)/d(logits) = (softmax - onehot) / B; max-shift for stability.
        p = z
        p -= p.max(axis=1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=1, keepdims=True)
        p[self.rows[: len(y)], y] -= 1
        p *= 1.0 / len(y)
        delta = p

        # Backward, updating each layer once its weights are no longer needed.
        for i in reversed(range(n_layers)):
            a = acts[i]
            gW = delta.T @ a
            gb = delta.sum(axis=0)
            if i > 0:
                delta = delta @ W[i]          # uses W[i] before its update
                if tanh:
                    delta *= 1 - a * a          # tanh' from the tanh output
                else:
                    delta *= a > 0              # relu' from the relu output
            if self.grad_log is not None:
                self.grad_log[-1][i] = (gW.copy(), gb.copy())
            if adam:
                self.adam_update(W[i], gW)
                self.adam_update(b[i], gb)
                continue
            gW *= LR
            W[i] -= gW
            gb *= LR
            b[i] -= gb

    def prepare(self, X, y):
        batches = batches_of(self.net, X, y)
        step = self.step

        def run():
            for xb, yb in batches:
                step(xb, yb)
        return run

    def params(self):
        return list(zip(self.W, self.b))

    def versions(self):
        return {"numpy": self.np.__version__}


class TorchImpl:
    """``torch_adam``: which torch.optim.Adam implementation to ask for.
    "default" passes neither ``foreach`` nor ``fused``; on CPU torch then
    picks the single-tensor for-loop (``_single_tensor_adam``): its
    ``_default_to_fused_or_foreach`` turns foreach on only when every param
    is on a foreach-capable device (cuda, xpu, ...), and fused is never a
    default. "foreach" and "fused" (a native CPU kernel since torch 2.4) are
    there to see how much torch leaves on the table by default."""

    def __init__(self, net: Net, params, optimizer: str = "sgd", torch_adam: str = "default",
                 compiled: bool = False):
        import torch
        import torch.nn.functional as F

        # torch's own thread settings (no set_num_threads): as its users get them.
        self.torch, self.net, self.compiled = torch, net, compiled
        layers = []
        for i, (W, b) in enumerate(params):
            lin = torch.nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
                lin.bias.copy_(torch.from_numpy(b))
            layers.append(lin)
            if i < len(params) - 1:
                layers.append(torch.nn.Tanh() if net.activation == "tanh" else torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.torch_adam = None
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        elif optimizer == "adam":
            flags = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[torch_adam]
            self.opt = torch.optim.Adam(self.model.parameters(), lr=ADAM_LR, betas=ADAM_BETAS,
                                        eps=ADAM_EPS, **flags)
            self.torch_adam = torch_adam
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        model, opt = self.model, self.opt
        if compiled:
            # torch.compile as its tutorial shows it: the module compiled (default mode,
            # inductor), the loss and the optimizer step eager. The compilation happens
            # on the first call, which the worker times apart from the steps.
            model = torch.compile(model)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        self.step = step

    def prepare(self, X, y):
        torch = self.torch
        batches = list(zip(torch.from_numpy(X).split(self.net.batch),
                           torch.from_numpy(y).split(self.net.batch)))
        step = self.step

        def run():
            for xb, yb in batches:
                step(xb, yb)   # eager CPU ops are synchronous: nothing to wait for
        return run

    def params(self):
        lins = [m for m in self.model if isinstance(m, self.torch.nn.Linear)]
        return [(l.weight.detach().numpy().copy(), l.bias.detach().numpy().copy()) for l in lins]

    def versions(self):
        out = {"torch": self.torch.__version__}
        if self.torch_adam:
            out["torch_adam"] = self.torch_adam
        return out


class JaxImpl:
    """The whole step is one jitted function of the training state: the
    params for SGD, (params, optax state) for Adam; the state is donated."""

    def __init__(self, net: Net, params, optimizer: str = "sgd"):
        import functools
        import warnings

        import jax
        import jax.numpy as jnp

        # If a backend cannot reuse a donated buffer it says so on every
        # compile; that is harmless for timing.
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        self.jax, self.net = jax, net
        act = jnp.tanh if net.activation == "tanh" else jax.nn.relu

        def loss(ps, x, y):
            a = x
            for W, b in ps[:-1]:
                a = act(a @ W.T + b)
            W, b = ps[-1]
            logp = jax.nn.log_softmax(a @ W.T + b)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        ps = [(jnp.asarray(W), jnp.asarray(b)) for W, b in params]
        if optimizer == "sgd":
            @functools.partial(jax.jit, donate_argnums=0)
            def step(ps, x, y):
                grads = jax.grad(loss)(ps, x, y)
                return jax.tree_util.tree_map(lambda p, g: p - LR * g, ps, grads)

            self.state = ps
        elif optimizer == "adam":
            import optax

            self.optax = optax
            # optax.adam: m_hat / (sqrt(v_hat) + eps) with bias-corrected
            # moments, the same update as torch.optim.Adam.
            tx = optax.adam(ADAM_LR, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS)

            @functools.partial(jax.jit, donate_argnums=0)
            def step(state, x, y):
                ps, opt_state = state
                grads = jax.grad(loss)(ps, x, y)
                updates, opt_state = tx.update(grads, opt_state, ps)
                return optax.apply_updates(ps, updates), opt_state

            self.state = (ps, tx.init(ps))
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.optimizer = optimizer
        self.step = step

    def prepare(self, X, y):
        import numpy as np

        jax = self.jax
        # int32 labels: JAX runs with 64-bit types disabled by default.
        batches = [(jax.device_put(xb), jax.device_put(yb.astype(np.int32)))
                   for xb, yb in batches_of(self.net, X, y)]
        step = self.step

        def run():
            state = self.state
            for xb, yb in batches:
                state = step(state, xb, yb)
            self.state = jax.block_until_ready(state)
        return run

    def params(self):
        import numpy as np

        ps = self.state if self.optimizer == "sgd" else self.state[0]
        return [(np.asarray(W), np.asarray(b)) for W, b in ps]

    def versions(self):
        import jaxlib

        out = {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__}
        if self.optimizer == "adam":
            out["optax"] = self.optax.__version__
        return out


class SymbpImpl:
    """symbp through its public API: Network, compile, fit, and the documented
    ``Model.params`` dict (``W1, b1, W2, ...``, W as (out, in)), through which
    it starts from the same weights as the peers."""

    def __init__(self, net: Net, params, optimizer: str = "sgd"):
        # Benchmark the checkout this script lives in.
        sys.path.insert(0, str(REPO_ROOT))
        import symbp as sb

        self.sb, self.net = sb, net
        layers = [sb.Dense(n, activation=net.activation) for n in net.hidden]
        layers.append(sb.Dense(net.outputs))
        spec = sb.Network(inputs=net.inputs, layers=layers, loss="softmax_cross_entropy")
        self.model = sb.compile(spec, target="cpu", dtype="float32", seed=0)
        for i, (W, b) in enumerate(params, start=1):
            self.model.params[f"W{i}"] = W.copy()
            self.model.params[f"b{i}"] = b.copy()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        # Adam: one optimizer object for the whole worker, so its state (m, v,
        # step count) carries over between fit calls like the peers' state.
        self.adam = (sb.Adam(lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS)
                     if optimizer == "adam" else None)

    def prepare(self, X, y):
        model, sb, B, adam = self.model, self.sb, self.net.batch, self.adam

        if adam is not None:
            def run():
                model.fit(X, y, optimizer=adam, batch_size=B, epochs=1,
                          shuffle=False, progress=False)
            return run

        def run():
            model.fit(X, y, optimizer=sb.SGD(lr=LR), batch_size=B, epochs=1,
                      shuffle=False, progress=False)
        return run

    def params(self):
        p = self.model.params
        return [(p[f"W{i}"], p[f"b{i}"]) for i in range(1, len(self.net.sizes))]

    def versions(self):
        out = {"symbp": getattr(self.sb, "__version__", "?"),
               "symbp_path": str(Path(self.sb.__file__).parent)}
        for mod in ("numba", "sympy"):
            try:
                out[mod] = __import__(mod).__version__
            except ImportError:
                pass
        return out


def torch_compiled(net: Net, params, optimizer: str = "sgd", torch_adam: str = "default"):
    return TorchImpl(net, params, optimizer, torch_adam, compiled=True)


BUILDERS = {"numpy": NumpyImpl, "torch": TorchImpl, "torch.compile": torch_compiled, "jax": JaxImpl,
            "symbp": SymbpImpl}
# The module a worker imports first and a start-up worker times as "import".
LIBRARY = {"numpy": "numpy", "torch": "torch", "torch.compile": "torch", "jax": "jax", "symbp": "symbp"}


def build(impl: str, net: Net, params, args):
    """The impl with the worker's optimizer (and impl-specific options)."""
    extra = {"torch_adam": args.torch_adam} if impl in ("torch", "torch.compile") else {}
    return BUILDERS[impl](net, params, args.optimizer, **extra)


def import_library(impl: str) -> None:
    """Import the impl's library before anything else of the worker (NumPy included), as a
    user's script would: ``import symbp`` sets its thread and BLAS settings in os.environ,
    and those only count before NumPy loads OpenBLAS."""
    if impl == "symbp":
        sys.path.insert(0, str(REPO_ROOT))  # benchmark the checkout this script lives in
    __import__(LIBRARY[impl])


# ==========================================================================
# Worker processes
# ==========================================================================

def all_finite(impl) -> bool | None:
    import numpy as np

    try:
        return bool(all(np.isfinite(W).all() and np.isfinite(b).all() for W, b in impl.params()))
    except NotImplementedError:
        return None


def worker_timing(args) -> dict:
    """Build once, warm up, size the run, then time ``reps`` repetitions."""
    net = NETS[args.net]
    t0 = time.perf_counter()
    impl = build(args.impl, net, init_params(net), args)
    build_s = time.perf_counter() - t0

    # First call on tiny data: JIT compilation (JAX), first-call dispatch.
    t0 = time.perf_counter()
    impl.prepare(*make_data(net, 2))()
    first_call_s = time.perf_counter() - t0

    # Size the run: grow ``steps`` until one pass lasts about target_s. Each
    # attempt makes fresh data and runs two passes: the first is the warm-up
    # (first touch of the data), the faster of the two is the estimate (a
    # single hiccup must not freeze the size). The last attempt thus doubles
    # as the warm-up of exactly the workload that is then timed.
    bytes_per_step = net.batch * net.inputs * 4
    max_steps = max(1, int(args.max_mb * 2**20 // bytes_per_step))
    steps = min(args.steps or args.steps_hint or 16, max_steps)
    for _ in range(8):
        X, y = make_data(net, steps)
        run = impl.prepare(X, y)
        warm_s = min(h.time_once(run), h.time_once(run))
        if args.steps or warm_s >= 0.7 * args.target_s or steps >= max_steps:
            break
        # Aim 10% high so fixed per-call overhead cannot keep us short.
        grow = min(1.1 * args.target_s / max(warm_s, 1e-6), 1000.0)
        steps = min(max_steps, max(steps + 1, math.ceil(steps * grow)))

    with h.Contention() as busy:
        times = h.time_reps(run, args.reps)
    env_info = h.worker_env_info()
    return {
        "impl": args.impl, "net": net.name, "optimizer": args.optimizer,
        "steps": steps, "reps": args.reps,
        "times_s": times, "ms_per_step": [t / steps * 1e3 for t in times],
        "build_s": build_s, "first_call_s": first_call_s, "warmup_s": warm_s,
        "finite": all_finite(impl), "contention": busy.fraction,
        "versions": impl.versions(), "blas": h.blas_info(), "env_info": env_info,
    }


def worker_check(args) -> dict:
    """One pass over the batches in ``--check-in`` (one SGD step, or three
    Adam steps) from its weights; the updated weights go to ``--check-out``."""
    import numpy as np

    net = NETS[args.net]
    data = np.load(args.check_in)
    n = len(net.sizes) - 1
    params = [(data[f"W{i}"], data[f"b{i}"]) for i in range(n)]
    impl = build(args.impl, net, params, args)
    impl.prepare(data["x"], data["y"])()
    out = {}
    for i, (W, b) in enumerate(impl.params()):
        out[f"W{i}"], out[f"b{i}"] = W, b
    np.savez(args.check_out, **out)
    return {"impl": args.impl, "net": net.name, "optimizer": args.optimizer,
            "versions": impl.versions()}


def worker_startup(args) -> dict:
    """Time to the first training step in a fresh process: from before the impl's library
    is imported to the end of its first step on one batch of the medium net (data making
    left out). Compile caches (symbp's, inductor's) are wherever the environment says."""
    impl_name, net = args.worker_startup, NETS[STARTUP_NET]
    t0 = time.perf_counter()
    import_library(impl_name)
    t1 = time.perf_counter()
    X, y = make_data(net, 1)
    params = init_params(net)
    t2 = time.perf_counter()
    impl = build(impl_name, net, params, args)
    t3 = time.perf_counter()
    impl.prepare(X, y)()
    t4 = time.perf_counter()
    return {"impl": impl_name, "import_s": t1 - t0, "build_s": t3 - t2, "first_step_s": t4 - t3,
            "total_s": (t1 - t0) + (t4 - t2), "env_info": h.worker_env_info()}


def worker_memory(args) -> dict:
    """Peak RSS of one symbp ``fit`` over ``--mem-samples`` samples of the medium net, as a
    user calls it (SGD, batch 128, one epoch, shuffled), next to what it should need."""
    import_library("symbp")
    import numpy as np

    net = NETS[MEMORY_NET]
    impl = build("symbp", net, init_params(net), args)
    model, sb = impl.model, impl.sb

    def fit(X, y):
        model.fit(X, y, optimizer=sb.SGD(lr=LR), batch_size=net.batch, epochs=1, progress=False)

    fit(*make_data(net, 2))                     # JIT, buffers for this batch size
    rss_before_data = h.rss_bytes()
    X, y = make_data(net, -(-args.mem_samples // net.batch))
    X, y = X[:args.mem_samples], y[:args.mem_samples]
    rss_with_data = h.rss_bytes()
    windowed = h.reset_peak_rss()
    t0 = time.perf_counter()
    fit(X, y)
    fit_s = time.perf_counter() - t0
    peak = h.peak_rss_bytes()
    params_bytes = sum(int(np.asarray(v).nbytes) for v in model.params.values())
    itemsize = np.dtype(np.float32).itemsize
    try:
        # symbp's per-batch workspace (activations, deltas) plus fit's batch copies of X and
        # the targets: a private API, hence the fallback below.
        buffers = sum(a.nbytes for a in model._workspace(net.batch))
        buffers += net.batch * (net.inputs + net.outputs) * itemsize
        buffers_how = "model._workspace(batch) + the batch's X and target rows"
    except Exception as exc:
        # Estimate: one batch of inputs, and per layer its output and its delta.
        buffers = net.batch * (net.inputs + 2 * sum(net.sizes[1:])) * itemsize
        buffers_how = f"estimated as batch x (inputs + 2 x layer widths) ({h.one_line_error(exc, 60)})"
    return {"samples": len(X), "data_bytes": int(X.nbytes + y.nbytes), "params_bytes": params_bytes,
            "buffers_bytes": int(buffers), "buffers_how": buffers_how, "rss_before_data": rss_before_data,
            "rss_with_data": rss_with_data, "peak_rss": peak, "peak_windowed": windowed, "fit_s": fit_s,
            "finite": all_finite(impl), "env_info": h.worker_env_info()}


def worker_main(args) -> int:
    impl = args.worker[0] if args.worker else args.worker_startup
    try:
        if args.worker_gemm:
            result = h.gemm_rate()
        elif args.worker_memory:
            result = worker_memory(args)
        elif args.worker_startup:
            result = worker_startup(args)
        else:
            import_library(impl)
            args.impl, args.net = args.worker
            result = worker_check(args) if args.check_in else worker_timing(args)
    except BaseException as exc:  # report, never traceback-spam the table
        error = h.torch_compile_error(exc) if impl == "torch.compile" else h.one_line_error(exc)
        h.emit({"error": error})
        return 1
    h.emit(result)
    return 0


# ==========================================================================
# Parent: orchestration and reporting
# ==========================================================================

def worker_argv(*extra: str) -> list[str]:
    return [str(Path(__file__).resolve()), *extra]


def worker_flags(impl: str, optimizer: str, args) -> list[str]:
    out = ["--optimizer", optimizer]
    if impl == "torch" and optimizer == "adam":
        out += ["--torch-adam", args.torch_adam]
    return out


def run_benchmark(args, nets, groups, envs: h.WorkerEnv) -> dict:
    """Interleaved rounds; returns {net: {label: record}}.

    ``groups`` is a list of groups of variants ``(label, impl, optimizer)``.
    Each round runs every variant once; the groups' order is rotated from
    round to round, and a group's own variants run back to back (their
    order flipped every other round), so the variants one compares with each
    other -- the same impl with SGD and Adam -- see nearly the same machine.
    The usual run has one variant per group: (impl, impl, --optimizer)."""
    res = {n: {label: {"ms": [], "steps": None, "error": None, "info": None, "contention": [], "setup": []}
               for group in groups for label, _, _ in group}
           for n in nets}
    for r in range(args.rounds):
        for net in nets:
            # Rotate the order each round so no impl always runs first/last.
            rotated = groups[r % len(groups):] + groups[: r % len(groups)]
            order = [v for g in rotated for v in (g[::-1] if r % 2 else g)]
            for label, impl, optimizer in order:
                rec = res[net][label]
                if rec["error"]:
                    continue  # errors are deterministic (import, API); don't repeat them
                if args.wait_idle > 0:
                    waited = h.wait_for_idle(args.wait_idle, CONTENTION_WARN)
                    if waited is None:
                        print(f"  (machine still busy after {args.wait_idle:.0f} s; measuring anyway)",
                              file=sys.stderr, flush=True)
                    elif waited > 1:
                        print(f"  (waited {waited:.0f} s for the machine to go idle)",
                              file=sys.stderr, flush=True)
                argv = worker_argv("--worker", impl, net, "--reps", str(args.reps),
                                   "--target-s", str(args.target_s), "--max-mb", str(args.max_mb),
                                   *worker_flags(impl, optimizer, args))
                if args.steps:
                    argv += ["--steps", str(args.steps)]
                elif rec["steps"]:
                    # Start from the last round's size; the worker grows it if
                    # that round was slowed down (and so sized too small).
                    argv += ["--steps-hint", str(rec["steps"])]
                out = h.run_worker(argv, envs.for_impl(impl), args.timeout)
                if "error" in out:
                    rec["error"] = out["error"]
                    print(f"  round {r + 1}  {net:<6}  {label:<13}  ERROR {out['error']}",
                          file=sys.stderr, flush=True)
                    continue
                rec["ms"] += out["ms_per_step"]
                rec["steps"] = out["steps"]
                rec["info"] = out
                rec["setup"].append(out["build_s"] + out["first_call_s"])
                busy = out.get("contention")
                rec["contention"].append((min(out["ms_per_step"]), busy))
                busy_txt = f", contention {busy:.0%}" if busy is not None else ""
                print(f"  round {r + 1}  {net:<6}  {label:<13}  "
                      f"{min(out['ms_per_step']):10.4f} ms/step  ({out['steps']} steps{busy_txt})",
                      file=sys.stderr, flush=True)
    return res


def fmt_setup(times: list[float]) -> str:
    if not times:
        return "-"
    return f"{times[0]:.2f}" + (f" / {times[-1]:.2f}" if len(times) > 1 else "")


def forward_gemm_flops(net: Net) -> int:
    """The forward pass's GEMM FLOPs on one batch: 2·batch·Σ fan_in·fan_out."""
    return sum(2 * net.batch * a * b for a, b in zip(net.sizes[:-1], net.sizes[1:]))


def print_tables(nets, impls, res, gflops: float | None = None) -> None:
    headers = ["impl", "best ms/step", "median ms/step", "ratio", "× floor", "steps/rep", "reps", "setup s",
               "contention best/max"]
    worst_at_best = worst = 0.0
    for net in nets:
        print(f"\n{net}: {NETS[net].describe()}")
        best_peer = min((min(res[net][i]["ms"]) for i in impls
                         if i in PEERS and res[net][i]["ms"]), default=None)
        floor = h.gemm_floor_ms(forward_gemm_flops(NETS[net]), gflops)
        rows = []
        for impl in impls:
            rec = res[net][impl]
            if not rec["ms"]:
                rows.append([impl, f"error: {rec['error']}"])
                continue
            best, med = min(rec["ms"]), h.median(rec["ms"])
            ratio = f"{best / best_peer:.2f}" if best_peer else "-"
            # Contention while the best value was taken, and the worst any
            # worker of this row saw (each worker is one round).
            at_best = min(rec["contention"], key=lambda mc: mc[0])[1]
            seen = [c for _, c in rec["contention"] if c is not None]
            busy = "?" if at_best is None else f"{at_best:.0%}/{max(seen):.0%}"
            worst_at_best = max(worst_at_best, at_best or 0.0)
            worst = max([worst, *seen])
            row = [impl, f"{best:.4f}", f"{med:.4f}", ratio, f"{best / floor:.2f}" if floor else "-",
                   str(rec["steps"]), str(len(rec["ms"])),
                   fmt_setup(rec["setup"]), busy]
            if rec["info"].get("finite") is False:
                row[-1] += "  (weights went non-finite!)"
            if rec["error"]:  # measured in early rounds, failed later
                row[-1] += f"  (later error: {rec['error']})"
            rows.append(row)
        print(h.format_table(headers, rows, right=[False] + [True] * 8))
        if floor:
            print(h.gemm_floor_note(forward_gemm_flops(NETS[net]), gflops, digits=4))
    print("\nratio = best ms/step over the best peer's (" + ", ".join(i for i in impls if i in PEERS) + ").\n"
          "setup s = build + first call on 2 batches in the worker, first round (/ last round):\n"
          "JAX's jit and torch.compile's compilation (measured apart from the steps), symbp's compile\n"
          "(a cache hit after its first worker; cold start-up is measured below).")
    print("contention = share of the machine's CPU that other processes used (or the hypervisor\n"
          "stole) during a worker's timed reps: for the worker that gave the best value / the\n"
          "worst over this row's workers.")
    if worst_at_best > CONTENTION_WARN:
        print(f"WARNING: a best value was taken while up to {worst_at_best:.0%} of the machine was "
              "busy elsewhere;\n         it is likely too slow. Rerun on an idle machine.")
    elif worst > CONTENTION_WARN:
        print(f"note: some rounds ran while up to {worst:.0%} of the machine was busy elsewhere; "
              "medians are\n      inflated, best values came from quiet rounds.")


# Goal of the fused Adam step: less than this times symbp's SGD step.
ADAM_OVERHEAD_GOAL = 1.10


def print_overhead_tables(nets, impls, res) -> None:
    """--adam-overhead: per impl, SGD vs Adam step time (labels impl/sgd and
    impl/adam in ``res``)."""
    headers = ["impl", "sgd ms/step", "adam ms/step", "adam-sgd ms", "adam/sgd", "(medians)",
               "adam vs best peer adam", "contention sgd/adam"]
    worst_at_best = worst = 0.0
    for net in nets:
        print(f"\n{net}: {NETS[net].describe()}   (best ms/step over all rounds and reps)")
        per = {i: (res[net][f"{i}/sgd"], res[net][f"{i}/adam"]) for i in impls}
        adam_peers = {i: min(a["ms"]) for i, (_, a) in per.items() if i in PEERS and a["ms"]}
        best_peer = min(adam_peers, key=adam_peers.get) if adam_peers else None
        rows = []
        for impl, (sgd, adam) in per.items():
            if not sgd["ms"] or not adam["ms"]:
                errs = [f"{o}: {r['error']}" for o, r in (("sgd", sgd), ("adam", adam)) if not r["ms"]]
                rows.append([impl, "error: " + "; ".join(errs)])
                continue
            s_best, a_best = min(sgd["ms"]), min(adam["ms"])
            s_med, a_med = h.median(sgd["ms"]), h.median(adam["ms"])
            vs_peer = f"{a_best / adam_peers[best_peer]:.2f}" if best_peer else "-"
            busy = []
            for rec in (sgd, adam):
                at_best = min(rec["contention"], key=lambda mc: mc[0])[1]
                seen = [c for _, c in rec["contention"] if c is not None]
                busy.append("?" if at_best is None else f"{at_best:.0%}")
                worst_at_best = max(worst_at_best, at_best or 0.0)
                worst = max([worst, *seen])
            row = [impl, f"{s_best:.4f}", f"{a_best:.4f}", f"{a_best - s_best:+.4f}",
                   f"{a_best / s_best:.3f}", f"{a_med / s_med:.3f}", vs_peer, "/".join(busy)]
            for o, rec in (("sgd", sgd), ("adam", adam)):
                if rec["info"].get("finite") is False:
                    row[-1] += f"  ({o}: weights went non-finite!)"
                if rec["error"]:
                    row[-1] += f"  ({o}: later error: {rec['error']})"
            rows.append(row)
        print(h.format_table(headers, rows, right=[False] + [True] * 7))
        if best_peer:
            print(f"best peer adam: {best_peer} ({adam_peers[best_peer]:.4f} ms/step)")
        if "symbp" in per and per["symbp"][0]["ms"] and per["symbp"][1]["ms"]:
            ratio = min(per["symbp"][1]["ms"]) / min(per["symbp"][0]["ms"])
            busy = max(min(rec["contention"], key=lambda mc: mc[0])[1] or 0.0
                       for rec in per["symbp"])
            if busy > CONTENTION_WARN:
                verdict = (f"not judged against the goal < {ADAM_OVERHEAD_GOAL:.2f}: a best value "
                           f"was taken with {busy:.0%} of the machine busy elsewhere")
            else:
                verdict = ("meets" if ratio < ADAM_OVERHEAD_GOAL else "MISSES") + \
                    f" the goal < {ADAM_OVERHEAD_GOAL:.2f}"
            print(f"symbp: the fused Adam step costs {ratio:.3f}x its SGD step ({ratio - 1:+.1%}); "
                  f"{verdict}")
    print("\nadam/sgd = best Adam ms/step over best SGD ms/step of the same impl; (medians): the\n"
          "same with medians. adam vs best peer adam: best Adam ms/step over the fastest peer's.\n"
          "contention: share of the machine used by other processes while each best value was\n"
          "taken. Each number comes from its own worker process; the two workers of an impl run\n"
          "back to back in every round.")
    if worst_at_best > CONTENTION_WARN:
        print(f"WARNING: a best value was taken while up to {worst_at_best:.0%} of the machine was "
              "busy elsewhere;\n         it is likely too slow, and ratios are unreliable. Rerun "
              "on an idle machine.")
    elif worst > CONTENTION_WARN:
        print(f"note: some rounds ran while up to {worst:.0%} of the machine was busy elsewhere; "
              "medians are\n      inflated, best values came from quiet rounds.")


def run_startup(args, impls, envs: h.WorkerEnv) -> dict:
    """Cold and cached time to the first step of every impl, each in fresh processes."""
    out = h.run_startup(impls, lambda impl: worker_argv("--worker-startup", impl), envs, COMPILE_CACHE,
                        args.startup_rounds, args.timeout, args.wait_idle, CONTENTION_WARN)
    h.print_startup(impls, out, f"{STARTUP_NET} net ({NETS[STARTUP_NET].describe()}), first step on one "
                    "batch", COMPILE_CACHE, CACHE_NOTE)
    return out


def run_memory(args, envs: h.WorkerEnv) -> dict:
    """Peak RSS of one symbp fit over --mem-samples samples (worker_memory), printed beside
    data + 3x parameters + batch buffers."""
    if args.wait_idle > 0:
        h.wait_for_idle(args.wait_idle, CONTENTION_WARN)
    r = h.run_worker(worker_argv("--worker-memory", "--mem-samples", str(args.mem_samples)),
                     envs.for_impl("symbp"), args.timeout)
    net = NETS[MEMORY_NET]
    print(f"\nmemory: symbp, one fit over {args.mem_samples:,} samples of the {MEMORY_NET} net "
          f"({net.describe()}; SGD, one epoch, shuffled)")
    if "error" in r:
        print(f"  error: {r['error']}")
        return r
    mib = 2.0 ** 20
    budget_fit = 3 * r["params_bytes"] + r["buffers_bytes"]
    budget = r["data_bytes"] + budget_fit
    peak_over_base = r["peak_rss"] - r["rss_before_data"]
    peak_over_data = r["peak_rss"] - r["rss_with_data"]
    rows = [
        ["data (X float32 + y int64)", f"{r['data_bytes'] / mib:,.1f}", ""],
        ["parameters (3x)", f"{r['params_bytes'] / mib:,.2f} ({3 * r['params_bytes'] / mib:,.2f})", ""],
        ["batch buffers", f"{r['buffers_bytes'] / mib:,.2f}", r["buffers_how"]],
        ["budget: data + 3x parameters + buffers", f"{budget / mib:,.1f}", ""],
        ["RSS before the data was made", f"{r['rss_before_data'] / mib:,.1f}",
         "interpreter, libraries, compiled kernels, a 2-batch warm-up fit"],
        ["RSS with the data, before fit", f"{r['rss_with_data'] / mib:,.1f}", ""],
        ["peak RSS during fit", f"{r['peak_rss'] / mib:,.1f}",
         "" if r["peak_windowed"] else "peak of the whole process (/proc/self/clear_refs not writable)"],
        ["peak - RSS before the data", f"{peak_over_base / mib:,.1f}",
         f"{peak_over_base / budget:.2f}x the budget" if budget else ""],
        ["peak - RSS with the data", f"{peak_over_data / mib:,.1f}",
         f"fit's own memory; 3x parameters + buffers = {budget_fit / mib:,.2f}"],
    ]
    print(h.format_table(["", "MiB", ""], rows, right=[False, True, False]))
    print(f"fit took {r['fit_s']:.1f} s" + ("" if r["finite"] is not False else "; weights went non-finite!"))
    return r


# --------------------------------------------------------------------------
# --check: the impls must agree on one SGD step (or three Adam steps)
# --------------------------------------------------------------------------

def reference_run(net: Net, params, X, y, optimizer: str):
    """Float64 NumPy run over the batches of X (the yardstick for the float32
    impls). Returns the new params and each step's gradients."""
    import numpy as np

    log: list = []
    ref = NumpyImpl(net, [(W.astype(np.float64), b.astype(np.float64)) for W, b in params],
                    optimizer, grad_log=log)
    ref.prepare(X.astype(np.float64), y)()
    return ref.params(), log


def finite_difference_check(net: Net, params, x, y, grads) -> float:
    """Max error of the float64 hand-written gradient ``grads`` (at ``params``,
    on the batch x, y) against central differences on a few entries of every
    tensor, relative to the tensor's largest gradient entry. Validates the
    NumPy backprop independently of torch and JAX."""
    import numpy as np

    p64 = [[W.astype(np.float64), b.astype(np.float64)] for W, b in params]
    x64 = x.astype(np.float64)

    def loss() -> float:
        a = x64
        for i, (W, b) in enumerate(p64):
            a = a @ W.T + b
            if i < len(p64) - 1:
                a = np.tanh(a) if net.activation == "tanh" else np.maximum(a, 0)
        a = a - a.max(axis=1, keepdims=True)
        logp = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    rng = np.random.default_rng(123)
    worst, eps = 0.0, 1e-6
    for layer, layer_grads in zip(p64, grads):
        for t, grad in zip(layer, layer_grads):
            # Errors are measured against the tensor's largest gradient: single
            # entries can be tiny, and then the finite difference's own
            # round-off (~1e-10) would dominate a per-entry relative error.
            scale = max(float(np.abs(grad).max()), 1e-12)
            for _ in range(4):
                idx = tuple(rng.integers(0, s) for s in t.shape)
                old = t[idx]
                t[idx] = old + eps
                up = loss()
                t[idx] = old - eps
                down = loss()
                t[idx] = old
                fd = (up - down) / (2 * eps)
                worst = max(worst, abs(fd - grad[idx]) / scale)
    return worst


# Adam check: entries whose Adam denominator sqrt(v_hat) falls below this
# fraction of the tensor's largest |gradient| at some step are not compared
# -- see compare_adam.
ADAM_GRAD_FLOOR = 3e-3


def adam_denominators(grads, i: int, j: int):
    """Per entry of tensor (layer i, W if j == 0 else b): the smallest
    sqrt(v_hat_t) over the steps -- the bias-corrected RMS of its gradients
    so far, which Adam divides by -- and the tensor's largest |gradient|."""
    import numpy as np

    b2 = ADAM_BETAS[1]
    v = np.zeros_like(grads[0][i][j])
    smallest = np.full_like(v, np.inf)
    for t, step in enumerate(grads, start=1):
        v = b2 * v + (1 - b2) * step[i][j] ** 2
        smallest = np.minimum(smallest, np.sqrt(v / (1 - b2 ** t)))
    return smallest, max(float(np.abs(step[i][j]).max()) for step in grads)


def compare_sgd(params, ref, got):
    """(max |W - W_ref|, update rel err, ok, note) after one SGD step."""
    import numpy as np

    max_abs, upd_err = 0.0, 0.0
    for i, ((W0, b0), (Wr, br)) in enumerate(zip(params, ref)):
        for name, t0, tr in ((f"W{i}", W0, Wr), (f"b{i}", b0, br)):
            t = got[name].astype(np.float64)
            max_abs = max(max_abs, float(np.abs(t - tr).max()))
            d_ref, d_got = tr - t0, t - t0
            upd_err = max(upd_err, float(np.abs(d_got - d_ref).max()
                                         / max(np.abs(d_ref).max(), 1e-30)))
    # Rounding the new float32 weights (~4e-9 at |W| ~ 0.1) costs a
    # relative error of ~1e-5..1e-4 on updates of ~1e-4..1e-5.
    return max_abs, upd_err, max_abs < 1e-4 and upd_err < 1e-3, ""


def adam_keep_masks(grads) -> dict:
    """{(i, j): entries compare_adam compares} -- see there."""
    masks = {}
    for i in range(len(grads[0])):
        for j in range(2):
            denom, gmax = adam_denominators(grads, i, j)
            masks[i, j] = denom >= ADAM_GRAD_FLOOR * gmax
    return masks


def compare_adam(params, ref, got, masks):
    """(max |W - W_ref|, update rel err, ok, note) after CHECK_STEPS["adam"]
    Adam steps.

    Adam divides the first moment by sqrt(v_hat), the RMS of the entry's
    gradients so far, so an entry's update is ~lr whatever its gradient, and
    a float32 gradient error ``e`` moves it by ~lr*e/sqrt(v_hat). Where that
    RMS is tiny at some step -- typically at step 1, where v_hat = g^2 and
    the update is lr*g/(|g| + eps) -- the float32 update is noise even though
    every impl is right (an entry with g = 3e-8 at step 1 moves by 0.73*lr in
    float64 and 0.72*lr in float32). So, per tensor, only the entries whose
    smallest sqrt(v_hat) over the steps (float64 reference) reaches
    ADAM_GRAD_FLOOR of the tensor's largest |gradient| are compared: their
    update must match the reference's to 1e-3 of the tensor's largest update
    (the same update rel err as the SGD check), and the weights to 1e-4.
    The others must only be finite and no larger than Adam can make them
    (~lr per step)."""
    import numpy as np

    steps = CHECK_STEPS["adam"]
    max_abs, upd_err, wild = 0.0, 0.0, 0
    for i, ((W0, b0), (Wr, br)) in enumerate(zip(params, ref)):
        for j, (name, t0, tr) in enumerate(((f"W{i}", W0, Wr), (f"b{i}", b0, br))):
            t = got[name].astype(np.float64)
            keep = masks[i, j]
            d_ref, d_got = tr - t0, t - t0
            if not np.isfinite(t).all():
                wild += int((~np.isfinite(t)).sum())
                continue
            wild += int((np.abs(d_got[~keep]) > 2 * steps * ADAM_LR).sum())
            max_abs = max(max_abs, float(np.abs(t - tr)[keep].max()))
            upd_err = max(upd_err, float(np.abs(d_got - d_ref)[keep].max()
                                         / max(np.abs(d_ref[keep]).max(), 1e-30)))
    note = f"{wild} uncompared entries non-finite or moved > {2 * steps}*lr" if wild else ""
    ok = max_abs < 1e-4 and upd_err < 1e-3 and not wild
    return max_abs, upd_err, ok, note


def run_check(args, nets, impls, envs: h.WorkerEnv) -> bool:
    """One SGD step (or three Adam steps) of every impl from identical weights
    and batches; compare the updated weights with a float64 NumPy reference
    (and hence each other). A peer that errors fails the check; symbp
    erroring (e.g. not importable yet) is reported but does not.

    Two numbers per peer: the max abs difference of the updated weights (the
    spec's ~1e-4 float32 criterion), and the relative error of the *update*
    itself (W_new - W_old), which is ~lr*grad and so would let a wrong gradient
    slip under the first criterion; it must be small too. For Adam see
    compare_adam: entries with a near-zero gradient are left out."""
    import numpy as np

    ok = True
    optimizer = args.optimizer
    n_steps = CHECK_STEPS[optimizer]
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlp-check-"))
    try:
        for net_name in nets:
            net = NETS[net_name]
            params = init_params(net)
            X, y = make_data(net, n_steps)
            src = tmp / f"{net_name}-in.npz"
            np.savez(src, x=X, y=y, **{f"W{i}": W for i, (W, _) in enumerate(params)},
                     **{f"b{i}": b for i, (_, b) in enumerate(params)})
            ref, grads = reference_run(net, params, X, y, optimizer)
            B = net.batch
            fd_err = finite_difference_check(net, params, X[:B], y[:B], grads[0])
            fd_ok = fd_err < 1e-5
            ok &= fd_ok
            print(f"\n{net_name}: {net.describe()}; {n_steps} {optimizer} step(s)")
            print(f"  float64 NumPy gradient vs finite differences: max err "
                  f"{fd_err:.1e}  {'ok' if fd_ok else 'FAIL'}")
            if optimizer == "adam":
                masks = adam_keep_masks(grads)
                skipped = sum(int(m.size - m.sum()) for m in masks.values())
                total = sum(m.size for m in masks.values())
                print(f"  compared: the entries whose Adam denominator sqrt(v_hat) stays above "
                      f"{ADAM_GRAD_FLOOR:g} x the tensor's\n  max |gradient| "
                      f"({total - skipped} of {total}; {skipped / total:.2%} left out)")
            rows = []
            for impl in impls:
                dst = tmp / f"{net_name}-{impl}.npz"
                out = h.run_worker(worker_argv("--worker", impl, net_name, "--check-in", str(src),
                                               "--check-out", str(dst),
                                               *worker_flags(impl, optimizer, args)),
                                   envs.for_impl(impl), args.timeout)
                if "error" in out:
                    # symbp may be mid-development; only a wrong answer from it
                    # fails the check, a peer must run.
                    ok &= impl not in PEERS
                    rows.append([impl, f"error: {out['error']}"])
                    continue
                got = np.load(dst)
                if optimizer == "adam":
                    max_abs, upd_err, good, note = compare_adam(params, ref, got, masks)
                else:
                    max_abs, upd_err, good, note = compare_sgd(params, ref, got)
                ok &= good
                rows.append([impl, f"{max_abs:.1e}", f"{upd_err:.1e}", "ok" if good else "FAIL", note])
            headers = ["impl", "max |W - W_ref|", "update rel err", "result"]
            if any(len(r) == 5 and r[4] for r in rows):
                headers.append("note")
            else:
                rows = [r[:4] for r in rows]
            print(h.format_table(headers, rows, right=[False, True, True, False, False]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ncheck {'passed' if ok else 'FAILED'}")
    return ok


# --------------------------------------------------------------------------

def print_header(args, impls, envs: h.WorkerEnv, res=None) -> None:
    info = h.system_info()
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs; "
          f"Python {info['python']}; {info['platform']}")
    for line in envs.header_lines():
        print(line)
    if res is not None:
        versions = {}
        for per_impl in res.values():
            for rec in per_impl.values():
                if rec["info"]:
                    versions.update(rec["info"]["versions"])
        versions.pop("symbp_path", None)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if not args.check:
        sgd, adam = f"SGD lr={LR}", f"Adam lr={ADAM_LR:g} betas={ADAM_BETAS} eps={ADAM_EPS:g}"
        what = (f"{sgd} vs {adam}" if args.adam_overhead
                else adam if args.optimizer == "adam" else sgd)
        print(f"rounds {args.rounds} x reps {args.reps}, target {args.target_s} s per rep, "
              f"{what}, float32")
    if any(i in impls for i in ("torch", "torch.compile")) and (args.adam_overhead or args.optimizer == "adam"):
        print(f"torch.optim.Adam implementation: {args.torch_adam}"
              + (" (on CPU: the single-tensor for-loop)" if args.torch_adam == "default" else ""))


def print_env_table(impls, envs: h.WorkerEnv, res) -> None:
    """Which environment and threads each impl's worker had (from its last timing worker)."""
    infos = {}
    for per_impl in res.values():
        for label, rec in per_impl.items():
            if rec["info"] and "env_info" in rec["info"]:
                infos[label.split("/")[0]] = rec["info"]["env_info"]
    print("\nenvironment of each worker:")
    print(envs.table(impls, infos))


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return items


def run_cuda(args) -> int:
    """--target cuda: the nets' shapes on the GPU (benchmarks/_cuda_bench.py)."""
    import _cuda_bench

    nets = parse_list(args.nets or ",".join(NETS), NETS, "net")
    specs = [_cuda_bench.mlp_spec(n, NETS[n].sizes, NETS[n].activation, NETS[n].batch) for n in nets]
    impls = [i for i in parse_list(args.impls, IMPLS, "impl") if i in _cuda_bench.IMPLS]
    return _cuda_bench.run(specs, impls, rounds=args.rounds, reps=args.reps, timeout=args.timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for how to read the table.")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: symbp's CUDA target against PyTorch CUDA (and JAX on the GPU) on each net's "
                        "shapes and an 8× batch (see _cuda_bench.py); exits 2 without a GPU")
    p.add_argument("--nets", default=None,
                   help=f"comma list of {','.join(NETS)} (default: all; medium with --adam-overhead)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of %(default)s")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed reps per worker (default 3, --quick 2)")
    p.add_argument("--target-s", type=float, default=None,
                   help="seconds one rep should last (default 0.5, --quick 0.15)")
    p.add_argument("--steps", type=int, default=None, help="fixed steps per rep (default: auto)")
    p.add_argument("--quick", action="store_true", help="1 round, short reps")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="update rule timed (and checked): sgd (lr=%s) or adam (lr=%g, torch defaults); "
                        "default %%(default)s" % (LR, ADAM_LR))
    p.add_argument("--adam-overhead", action="store_true",
                   help="time every impl with sgd AND adam (own workers, interleaved rounds) and "
                        "report the adam/sgd step-time ratios; nets default to medium")
    p.add_argument("--torch-adam", choices=("default", "foreach", "fused"), default="default",
                   help="torch.optim.Adam implementation (default: torch's own choice, on CPU the "
                        "single-tensor loop)")
    p.add_argument("--check", action="store_true",
                   help="only verify that all impls compute the same step (one SGD step, or "
                        "three Adam steps with --optimizer adam), then exit")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    p.add_argument("--startup-rounds", type=int, default=None,
                   help="start-up rounds, each with fresh caches (default 2, --quick 1)")
    p.add_argument("--no-memory", action="store_true", help="skip symbp's peak-RSS measurement")
    p.add_argument("--mem-samples", type=int, default=10**6,
                   help="samples of the fit whose peak RSS is measured (default %(default)s: 3 GiB of X)")
    p.add_argument("--env", action="append", default=[], metavar="[IMPL:]KEY=VALUE",
                   help="extra env var for every worker, or with IMPL: for that impl's workers only "
                        "(repeatable), e.g. --env torch:OMP_WAIT_POLICY=passive")
    p.add_argument("--keep-shell-tuning", action="store_true",
                   help="pass this shell's thread/BLAS variables (OMP_*, OPENBLAS_*, MKL_*, NUMBA_*, ...) "
                        "on to every worker; by default they are dropped, so each library runs with "
                        "its own defaults")
    p.add_argument("--wait-idle", type=float, default=10, metavar="S",
                   help="before each worker wait up to S seconds for other load to drop "
                        "below 10%% of the machine (0: don't wait; default %(default)s)")
    p.add_argument("--max-mb", type=float, default=512, help="cap on the input data per worker, MiB")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before a worker is killed")
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    # Internal: worker modes.
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "NET"), help=argparse.SUPPRESS)
    p.add_argument("--worker-startup", metavar="IMPL", help=argparse.SUPPRESS)
    p.add_argument("--worker-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-gemm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps-hint", type=int, help=argparse.SUPPRESS)
    p.add_argument("--check-in", help=argparse.SUPPRESS)
    p.add_argument("--check-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Keep stdout (the report) and stderr (progress) in order when both are piped.
    sys.stdout.reconfigure(line_buffering=True)

    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    if args.target_s is None:
        args.target_s = 0.15 if args.quick else 0.5
    if args.startup_rounds is None:
        args.startup_rounds = 1 if args.quick else 2

    if args.worker or args.worker_startup or args.worker_memory or args.worker_gemm:
        return worker_main(args)
    if args.target == "cuda":
        return run_cuda(args)

    if args.adam_overhead and args.check:
        raise SystemExit("--adam-overhead and --check do not go together; "
                         "check each optimizer with --check --optimizer sgd|adam")
    if args.nets is None:
        args.nets = "medium" if args.adam_overhead else ",".join(NETS)
    nets = parse_list(args.nets, NETS, "net")
    impls = parse_list(args.impls, IMPLS, "impl")
    envs = h.WorkerEnv(impls, IMPL_NEEDS, args.env, args.keep_shell_tuning)

    if args.check:
        print_header(args, impls, envs)
        return 0 if run_check(args, nets, impls, envs) else 1

    if args.adam_overhead:
        groups = [[(f"{i}/{o}", i, o) for o in OPTIMIZERS] for i in impls]
    else:
        groups = [[(i, i, args.optimizer)] for i in impls]
    what = "sgd and adam steps" if args.adam_overhead else f"{args.optimizer} steps"
    print(f"running {args.rounds} round(s) of {', '.join(impls)} on {', '.join(nets)}, {what} "
          f"(progress on stderr) ...", file=sys.stderr, flush=True)
    # the floor's GEMM rate, for the tables that print it (not the Adam-overhead ones)
    gemm = {} if args.adam_overhead else h.run_worker(worker_argv("--worker-gemm"), envs.for_impl("numpy"), args.timeout)
    res = run_benchmark(args, nets, groups, envs)
    print_header(args, impls, envs, res)
    if args.adam_overhead:
        print_overhead_tables(nets, impls, res)
    else:
        print_tables(nets, impls, res, gemm.get("gflops"))
    print_env_table(impls, envs, res)
    startup = memory = None
    if not args.no_startup and not args.adam_overhead:
        startup = run_startup(args, impls, envs)
    if "symbp" in impls and not args.no_memory and not args.adam_overhead:
        memory = run_memory(args, envs)

    if args.json:
        payload = {
            "system": h.system_info(),
            "env_given": {i: envs.given(i) for i in impls}, "shell_tuning_dropped": envs.dropped,
            "settings": {k: getattr(args, k) for k in ("rounds", "reps", "target_s", "steps", "quick",
                                                       "optimizer", "adam_overhead", "torch_adam")},
            "nets": {n: NETS[n].describe() for n in nets},
            "results": {n: {i: {"best_ms": min(r["ms"]) if r["ms"] else None,
                                "median_ms": h.median(r["ms"]) if r["ms"] else None,
                                "ms_per_step": r["ms"], "steps": r["steps"], "error": r["error"],
                                "contention_per_worker": [c for _, c in r["contention"]],
                                "setup_s": r["setup"], "worker": r["info"]}
                            for i, r in per.items()}
                        for n, per in res.items()},
            "startup": startup, "memory": memory,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
