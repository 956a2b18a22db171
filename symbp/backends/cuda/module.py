"""Code generation for the CUDA target: a :class:`~symbp.derive.Derivation` becomes a module
of ``numba.cuda`` kernels and the host functions that launch them.

The steps are the CPU target's (:class:`symbp.lower.plan.Plan` lowers them, image layers
included: forward, loss, backward, penalty, the optimizer's fused update); only their
printing differs (:mod:`symbp.backends.cuda`: one kernel per step).  The model module holds

``forward``, ``loss_rows``, ``backward``, ``penalty``, ``loss_and_grads``
    host functions of the batch size ``nb`` and device arrays; each launches kernels and
    returns at once (nothing waits for the device).  Sums land in ``stats`` (``STATS``).

and, per optimizer, a training module (:meth:`CudaBuilder.build_train`) with the backward
pass and the update fused, the batch gathered on the device, and ``train_epoch``, which
launches a whole epoch without a single host–device round trip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import sympy as sp

from ...derive import Derivation
from ...indices import N
from ...lower.plan import Plan
from ..common import docstring, module_header, one_line, tidy_args
from .emit import BLOCK_REDUCE, STAT_SLOTS, CudaPrinter, Kernels, emit, helper_source

#: The slots of the per-epoch status array ``epoch`` of the training module.
EPOCH_SLOTS = ("total", "correct", "bad", "done")


@dataclass(frozen=True)
class CudaConfig:
    """Launch geometry and GEMM choice of a generated CUDA module (generator parameters).

    Parameters
    ----------
    threads : int
        Threads per block of the elementwise, per-sample and column-sum kernels (a power of two).
    max_blocks : int
        Grid cap of those kernels; they stride over larger index spaces.
    cols : int
        Columns per block of a column sum (divides ``threads``).
    tile, tile_k, micro : int
        GEMM: a block computes a ``tile``×``tile`` tile of the result through shared-memory
        slices ``tile_k`` deep; each thread ``micro``×``micro`` of its entries.
    gemm : {"kernel", "cublas", "auto"}
        The generated tiled kernel, or cuBLAS through CuPy; ``"auto"`` takes cuBLAS when CuPy
        is installed and a real GPU is in use.
    """

    threads: int = 128
    max_blocks: int = 1024
    cols: int = 32
    tile: int = 64
    tile_k: int = 16
    micro: int = 4
    gemm: str = "kernel"

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "gemm" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"CudaConfig: {name} must be a positive int, got {value!r}")
        if self.threads & (self.threads - 1) or self.threads > 1024:
            raise ValueError(f"CudaConfig: threads must be a power of two up to 1024, got {self.threads}")
        if self.cols > self.threads or self.threads % self.cols:
            raise ValueError(f"CudaConfig: cols ({self.cols}) must divide threads ({self.threads})")
        if self.tile % self.micro:
            raise ValueError(f"CudaConfig: tile ({self.tile}) must be a multiple of micro ({self.micro})")
        if (self.tile // self.micro) ** 2 > 1024:
            raise ValueError(f"CudaConfig: a GEMM block would have {(self.tile // self.micro) ** 2} threads; "
                             "CUDA allows 1024 (raise micro or lower tile)")
        if self.shared_bytes(8) > 48 * 1024:
            raise ValueError(f"CudaConfig: GEMM tiles need {self.shared_bytes(8)} bytes of shared memory in float64; "
                             "a block may use 48 KiB (lower tile or tile_k)")
        if self.gemm not in ("kernel", "cublas", "auto"):
            raise ValueError(f"CudaConfig: gemm must be 'kernel', 'cublas' or 'auto', got {self.gemm!r}")

    def shared_bytes(self, itemsize: int) -> int:
        """Shared memory of one GEMM block: two TILE_K × (TILE + 1) slices."""
        return 2 * self.tile_k * (self.tile + 1) * itemsize

    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items())


class CudaBuilder(Plan):
    """Prints the CPU builder's steps as CUDA kernels and their launchers."""

    def __init__(self, d: Derivation, dtype: str, config: CudaConfig) -> None:
        super().__init__(d, dtype)
        if config.gemm == "auto":
            raise ValueError("resolve gemm='auto' before generating (see symbp.backends.cuda.model.compile_cuda)")
        self.config = config
        # Array label -> symbolic shape, for the sizes of each GEMM.
        self.shapes = {}
        # A matrix whose symbolic shape is in widths (N, d_l) keeps it, printed as the
        # module's width constants; any other array is sized by the numbers below.
        for ld in d.layers:
            for base in (ld.x, ld.z, ld.a, ld.delta, *ld.params.values()):
                shape = base.shape
                if shape is not None and len(shape) == 2 and all(sym in self.extents for sym in sp.Tuple(*shape).free_symbols):
                    self.shapes[str(base.label)] = shape
        # The image layers' arrays (parameters, activations, stages and their gradients) as the
        # matrices a Gemm reads: (batch, C·H·W) buffers, weights (rows, the rest).
        matrices = {name: (N if shape[0] == "batch" else shape[0], math.prod(shape[1:]))
                    for name, shape in [*self.workspace, *d.network.param_shapes().items()]}
        matrices["X"] = (N, d.dims[0])
        for label, code in self.names.items():
            if isinstance(label, str) and code in matrices and label not in self.shapes:
                self.shapes[label] = matrices[code]

    def cuda_printer(self, stage: str, kernels: Kernels, guarded=()) -> CudaPrinter:
        pr = CudaPrinter(self.dtype, dict(self.names), stage, kernels, self.shapes, guarded, self.config.gemm)
        pr.extents = dict(self.extents)
        pr.flat = dict(getattr(self, "flat", {}))
        pr.tile = self.config.tile
        # Symbolic widths -> numbers, for the launch limits checked while printing.
        pr.sizes = {**{self.d.dims[l]: w for l, w in enumerate(self.d.network.widths)}, **self.d.sizes}
        return pr

    def launcher(self, name: str, args: list[str], steps: list, doc: str, kernels: Kernels,
                 prologue: list[str] = (), guarded=(), stage: str | None = None) -> str:
        """A host function launching one kernel per step, in order, without waiting; its
        kernels are named after ``stage`` (default: the function's name)."""
        pr = self.cuda_printer(stage or name, kernels, guarded)
        body = list(prologue)
        for step in steps:
            body += emit(step, pr)
        self.helpers |= pr.helpers_used
        if any("nbf" in line for line in body) and "nb" in args:
            body.insert(0, "nbf = FT(nb)")
        lines = [f"def {name}({', '.join(args)}):", f'    """{doc}"""'] + ["    " + line for line in body or ["pass"]]
        return "\n".join(lines) + "\n"

    # -- the modules -------------------------------------------------------------------
    def constants(self) -> list[str]:
        c = self.config
        ft = "np.float32" if self.dtype == "float32" else "np.float64"
        return [
            f"FT = {ft}", "ONE = FT(1.0)", "ZERO = FT(0.0)", "HALF = FT(0.5)", "NEG_INF = FT(-np.inf)",
            *(f"d{l} = {w}" for l, w in enumerate(self.d.network.widths)), "",
            "# Launch geometry, chosen by the generator (symbp.backends.cuda.module.CudaConfig).",
            f"THREADS = {c.threads}  # threads per block of the elementwise, per-sample and column-sum kernels",
            f"MAX_BLOCKS = {c.max_blocks}  # their grid cap: they stride over larger index spaces",
            f"COLS = {c.cols}  # columns per block of a column sum,",
            "ROW_GROUPS = THREADS // COLS  # each summed by this many groups of threads",
            f"TILE = {c.tile}  # a GEMM block computes TILE×TILE entries of the result,",
            f"TILE_K = {c.tile_k}  # sweeping the shared dimension TILE_K at a time,",
            f"MICRO = {c.micro}  # each thread MICRO×MICRO of them",
            "SPAN = TILE // MICRO", "GEMM_THREADS = SPAN * SPAN",
            "TILE_PAD = TILE + 1  # a shared tile's row length: one spare column keeps the stores off one bank",
            "MAX_GRID = (2**31 - 1, 65535)  # CUDA's limits on gridDim.x and gridDim.y",
            "MAX_GRID_Z = 65535  # and on gridDim.z: a GEMM per sample strides over more samples",
            f"GEMM_BACKEND = {c.gemm!r}", "",
            "# Sums a step produces, in the float64 device array `stats`.",
            f"STATS = {STAT_SLOTS!r}",
            *(f"S_{s.upper()} = {k}" for k, s in enumerate(STAT_SLOTS)),
            "# Per-epoch status of training, in the float64 device array `epoch` (bad = −1: none).",
            f"EPOCH = {EPOCH_SLOTS!r}",
            *(f"E_{s.upper()} = {k}" for k, s in enumerate(EPOCH_SLOTS)),
        ]

    def _training_forward(self, P: list, acts: list, kernels) -> list[str]:
        """``forward_train`` and ``update_running`` where training and inference differ
        (batch statistics), else aliases (see the CPU target's)."""
        args = ", ".join(["nb", "X"] + P + acts)
        if not self.has_modes:
            return [f"def forward_train({args}, seed):\n"
                    '    """Training runs the same forward pass as inference here."""\n'
                    f"    forward({args})\n",
                    f"def update_running({args}):\n"
                    '    """No running statistics in this network."""\n    return\n']
        return [
            self.launcher("forward_train", ["nb", "X"] + P + acts + ["seed"],
                          [s for ld in self.d.layers for s in self.forward_steps(ld, train=True)],
                          "Forward pass over the first nb rows in training: batch statistics, Dropout's masks\n"
                          "    drawn under ``seed``.", kernels),
            self.launcher("update_running", ["nb", "X"] + P + acts, self.running_steps(),
                          "The running statistics from this batch's (after forward_train).", kernels),
        ]

    def build(self) -> str:
        """The model module: forward, loss, gradients, penalty."""
        self.helpers: set[str] = set()
        B = self.buffers()
        P, acts, deltas, grads, out = B["P"], B["acts"], B["deltas"], B["grads"], B["out"]
        kernels = Kernels(reserved=_MODEL_NAMES)
        launchers = [
            self.launcher("forward", ["nb", "X"] + P + acts,
                          [s for ld in self.d.layers for s in self.forward_steps(ld)],
                          "Forward pass over the first nb rows; fills Z (pre-activations) and A (outputs).", kernels),
            *self._training_forward(P, acts, kernels),
            self.launcher("loss_rows", ["nb"] + out + ["T", B["dl"][0], "stats"], [self.loss_step()],
                          "Σ_n ℓ_n and the hits into stats[S_TOTAL], stats[S_CORRECT]; δ_L = ∂C/∂z_L.", kernels),
            self.launcher("backward", ["nb", "X"] + P + acts + deltas + grads, self.backward_steps(),
                          "∂C/∂θ for every parameter, given δ_L from loss_rows.", kernels),
            self.launcher("penalty", P + ["stats"], self.penalty_steps(),
                          "(λ/2) Σ_l ‖W_l‖² into stats[S_PENALTY].", kernels),
            tidy_args(_GLUE.format(P=", ".join(P), WS=", ".join(w for w, _ in self.workspace), ACTS=", ".join(acts),
                                   OUT=", ".join(out), DL=B["dl"][0], DELTAS=", ".join(deltas), GRADS=", ".join(grads))),
        ]
        head = module_header(self).replace("symbp-generated module", "symbp-generated CUDA module", 1)
        src = [
            head, "import math", "", "import numpy as np", "from numba import cuda", "",
            *self.constants(), "",
            "# What the model passes in: its parameters, then the work buffers (\"batch\" = batch size).",
            f"PARAMS = {tuple(P)!r}", f"WORKSPACE = {tuple(self.workspace)!r}", f"ROLES = {self.roles!r}",
            f"DTYPE = {self.dtype!r}",
            "# Which work buffers the launchers take: activations, loss inputs, the output.",
            f"ACTS = {tuple(acts)!r}", f"OUT = {tuple(out)!r}", f"LAST = {B['last'][0]!r}", f"DELTA_L = {B['dl'][0]!r}",
            _HOST_HELPERS, *filter(None, [self._cublas_imports(), helper_source(self.helpers)]), BLOCK_REDUCE,
            *(f"\n{text}" for text in kernels.sources.values()),
            *(f"\n{text}" for text in launchers),
            _signatures(kernels.signatures),
        ]
        return "\n".join(src)

    def build_train(self, opt, model_module: str) -> str:
        """The training module for one optimizer (see the module docstring); it imports the
        forward pass and the loss from the model module ``model_module``."""
        self.helpers = set()
        B = self.buffers()
        P, acts, deltas, grads, out = B["P"], B["acts"], B["deltas"], B["grads"], B["out"]
        steps = self.backward_steps(opt)  # registers the state arrays' names
        states = [f"{s_}_{name}" for name in P for s_ in opt.state_names]
        hyper = [f"h_{k}" for k in opt.hyper]
        kernels = Kernels(reserved=_TRAIN_NAMES)
        update = self.launcher(
            "backward_update", ["nb", "X"] + P + acts + deltas + grads + states + hyper + ["t", "stats", "epoch"], steps,
            f"Backward pass with the {opt.name} update fused in (step t); adds the l2 penalty before the step to\n"
            "    stats[S_PENALTY].  Parameters and state stay as they are once epoch[E_BAD] ≥ 0.",
            kernels, guarded=P + states, stage="backward")
        L = len(self.d.layers)
        names = {
            "P": ", ".join(P), "WS": ", ".join(w for w, _ in self.workspace), "ACTS": ", ".join(acts),
            "OUT": ", ".join(out), "DL": B["dl"][0], "DELTAS": ", ".join(deltas), "GRADS": ", ".join(grads),
            "STATES": "".join(f"{s}, " for s in states), "HYPER": "".join(f"{h}, " for h in hyper),
            "READ_HYPER": "\n".join(f"    {h} = FT(hyper[{i}])" for i, h in enumerate(hyper)),
            "DL_WIDTH": f"d{L}",
        }
        rules = "\n".join(f"    {target} <- {expr}" for target, expr in opt.formulas())
        src = [
            docstring(f"symbp-generated CUDA training step for {self.d.network.name} ({self.dtype}) with "
                      f"{one_line(repr(opt))}.\n\nUpdate rule (SymPy), for each parameter theta with gradient g, "
                      "at step t:\n" + rules + "\n"),
            "import math", "", "import numpy as np", "from numba import cuda", "",
            *_import_lines(model_module, _SHARED_NAMES + [f"d{l}" for l in range(L + 1)]),
            *filter(None, [self._cublas_imports(train=True)]), "",
            f"STATES = {tuple(states)!r}", f"HYPER = {tuple(opt.hyper)!r}",
            f"ROLES = {dict.fromkeys(states, 'optimizer state')!r}",
            *filter(None, [helper_source(self.helpers)]), _TRAIN_KERNELS.format(**names),
            *(f"\n{text}" for text in kernels.sources.values()),
            f"\n{update}", tidy_args(_TRAIN.format(**names)),
            _signatures({**self._train_signatures(), **kernels.signatures}),
        ]
        return "\n".join(src)

    def _train_signatures(self) -> dict[str, str]:
        ft = "float32" if self.dtype == "float32" else "float64"
        arr = f"{ft}[:, ::1]"
        sigs = {
            "gather_rows": f"void(int64, int64, int64[::1], {arr}, {arr}, {arr}, {arr})",
            "check_batch": "void(int64, float64[::1], float64[::1])",
            "finish_batch": "void(int64, float64[::1], float64[::1])",
        }
        if self.config.gemm == "cublas":
            sigs["gemm_scalars"] = f"void(float64[::1], {ft}, {ft}, {ft}[::1])"
        return sigs

    def _cublas_imports(self, train: bool = False) -> str:
        if self.config.gemm != "cublas":
            return ""
        return _CUBLAS_TRAIN if train else _CUBLAS


#: What a training module takes from its model module.
_SHARED_NAMES = ["FT", "ONE", "ZERO", "HALF", "NEG_INF", "THREADS", "MAX_BLOCKS", "COLS", "ROW_GROUPS", "TILE", "TILE_K",
                 "MICRO", "SPAN", "GEMM_THREADS", "TILE_PAD", *(f"S_{s.upper()}" for s in STAT_SLOTS),
                 *(f"E_{s.upper()}" for s in EPOCH_SLOTS),
                 "blocks", "col_blocks", "gemm_blocks", "batch_gemm_blocks", "block_reduce", "forward", "loss_rows",
                 "forward_train", "update_running"]


def _import_lines(module: str, names: list[str], width: int = 100) -> list[str]:
    lines, line = [], f"from {module} import ("
    for name in names:
        if len(line) + len(name) + 2 > width:
            lines.append(line.rstrip())
            line = "    "
        line += f"{name}, "
    return lines + [line.rstrip(", ") + ")"]


def _signatures(signatures: dict[str, str]) -> str:
    lines = [f"    {name!r}: {sig!r}," for name, sig in signatures.items()]
    return "\n".join(["", "# Argument types of every kernel (for numba.cuda.compile_ptx without a GPU).",
                      "SIGNATURES = {", *lines, "}"])


_MODEL_NAMES = {"forward", "forward_train", "update_running", "loss_rows", "backward", "penalty", "loss_and_grads",
                "blocks", "col_blocks", "gemm_blocks",
                "batch_gemm_blocks",
                "block_reduce", "gemm", "cublas_gemm", "sigmoid", "softplus", "relu", "leaky_relu", "elu", "maximum",
                "minimum"}
_TRAIN_NAMES = _MODEL_NAMES | {"backward_update", "train_epoch", "gather_rows", "check_batch", "finish_batch",
                               "gemm_scalars"}

_HOST_HELPERS = '''

def blocks(count):
    """Blocks of THREADS for a grid-stride kernel over ``count`` indices."""
    return max(1, min((count + THREADS - 1) // THREADS, MAX_BLOCKS))


def col_blocks(cols):
    """Blocks of a column sum: one per COLS columns, capped like the others."""
    return max(1, min((cols + COLS - 1) // COLS, MAX_BLOCKS))


def gemm_blocks(rows, cols):
    """The grid of a GEMM: one block per TILE×TILE tile of its rows×cols result."""
    return ((rows + TILE - 1) // TILE, (cols + TILE - 1) // TILE)


def batch_gemm_blocks(rows, cols, nb):
    """The grid of a GEMM per sample: the tiles of one, times up to MAX_GRID_Z samples (the
    kernel strides over the rest)."""
    return ((rows + TILE - 1) // TILE, (cols + TILE - 1) // TILE, max(1, min(nb, MAX_GRID_Z)))
'''

_CUBLAS = '''
from symbp.backends.cuda.emit import cublas_gemm


def gemm(ta, tb, epoch, M, N, K, A, B, C, alpha, beta):
    """C ← alpha·op(A)·op(B) + beta·C through cuBLAS (CuPy)."""
    cublas_gemm(ta, tb, M, N, K, A, B, C, alpha, beta)
'''

_CUBLAS_TRAIN = '''
from symbp.backends.cuda.emit import cublas_gemm

_SCALARS = {}  # dtype -> the device array (alpha, beta) of a guarded update


@cuda.jit(cache=True)
def gemm_scalars(epoch, alpha, beta, out):
    """(alpha, beta), or (0, 1) — θ kept — once a batch's loss was not finite."""
    if cuda.grid(1) == 0:
        bad = epoch[E_BAD] >= 0
        out[0] = ZERO if bad else alpha
        out[1] = ONE if bad else beta


def gemm(ta, tb, epoch, M, N, K, A, B, C, alpha, beta):
    """C ← alpha·op(A)·op(B) + beta·C through cuBLAS (CuPy); with ``epoch``, a guarded update
    whose alpha and beta cuBLAS reads from the device."""
    if epoch is None:
        cublas_gemm(ta, tb, M, N, K, A, B, C, alpha, beta)
        return
    if C.dtype not in _SCALARS:
        _SCALARS[C.dtype] = cuda.device_array(2, C.dtype)
    gemm_scalars[1, 1](epoch, alpha, beta, _SCALARS[C.dtype])
    cublas_gemm(ta, tb, M, N, K, A, B, C, alpha, beta, _SCALARS[C.dtype])
'''

_GLUE = '''def loss_and_grads(nb, X, T, {P}, {WS}, stats):
    """Forward, loss and backward over nb rows: Σ_n ℓ_n, the hits and the penalty into stats,
    the gradients into the dW, db buffers (as in training: the batch's statistics)."""
    forward_train(nb, X, {P}, {ACTS}, 0)
    loss_rows(nb, {OUT}, T, {DL}, stats)
    backward(nb, X, {P}, {ACTS}, {DELTAS}, {GRADS})
    penalty({P}, stats)
'''

_TRAIN_KERNELS = '''

@cuda.jit(cache=True)
def gather_rows(nb, start, order, X, T, Xb, Tb):
    """The batch, gathered on the device: Xb[r] = X[order[start + r]], Tb[r] = T[order[start + r]]."""
    for flat in range(cuda.grid(1), nb * d0, cuda.gridsize(1)):
        r = flat // d0
        c = flat % d0
        Xb[r, c] = X[order[start + r], c]
    for flat in range(cuda.grid(1), nb * {DL_WIDTH}, cuda.gridsize(1)):
        r = flat // {DL_WIDTH}
        c = flat % {DL_WIDTH}
        Tb[r, c] = T[order[start + r], c]


@cuda.jit(cache=True)
def check_batch(batch, stats, epoch):
    """Marks the epoch bad at its first batch whose loss is not finite (before its update)."""
    if cuda.grid(1) == 0 and epoch[E_BAD] < 0 and not math.isfinite(stats[S_TOTAL]):
        epoch[E_BAD] = batch


@cuda.jit(cache=True)
def finish_batch(nb, stats, epoch):
    """Adds the batch's Σ_n ℓ_n + nb·penalty and hits to the epoch (while it is good); clears stats."""
    if cuda.grid(1) == 0:
        if epoch[E_BAD] < 0:
            epoch[E_TOTAL] += stats[S_TOTAL] + stats[S_PENALTY] * nb
            epoch[E_CORRECT] += stats[S_CORRECT]
            epoch[E_DONE] += 1
        for s in range(stats.shape[0]):
            stats[s] = 0.0
'''

_TRAIN = '''
def train_epoch(X, T, order, batch_size, hyper, step0, seed, {P}, {WS}, {STATES}Xb, Tb, stats, epoch):
    """One epoch of mini-batch training over ``order`` (a device array of row indices).

    The host only launches kernels: per batch, gather its rows, forward, loss, check, backward
    with the update, tally.  Read ``epoch`` afterwards: (Σ loss, hits, the first batch whose
    loss was not finite or −1, updates made).  After a bad batch the update kernels leave the
    parameters and state alone, so they are the last good ones.  ``stats`` must start zeroed.
    """
{READ_HYPER}
    n = X.shape[0]
    for batch, start in enumerate(range(0, n, batch_size)):
        nb = min(batch_size, n - start)
        gather_rows[blocks(nb * max(d0, {DL_WIDTH})), THREADS](nb, start, order, X, T, Xb, Tb)
        forward_train(nb, Xb, {P}, {ACTS}, seed + step0 + batch)
        update_running(nb, Xb, {P}, {ACTS})
        loss_rows(nb, {OUT}, Tb, {DL}, stats)
        check_batch[1, 1](batch, stats, epoch)
        backward_update(nb, Xb, {P}, {ACTS}, {DELTAS}, {GRADS}, {STATES}{HYPER}step0 + batch + 1, stats, epoch)
        finish_batch[1, 1](nb, stats, epoch)
'''


def generate_cuda_source(derivation: Derivation, dtype: str, config: CudaConfig) -> str:
    """The CUDA model module text for a derivation (see the module docstring)."""
    return CudaBuilder(derivation, dtype, config).build()


def generate_cuda_train_source(derivation: Derivation, dtype: str, config: CudaConfig, optimizer, model_module: str) -> str:
    """The CUDA training module text for ``optimizer`` (see :meth:`CudaBuilder.build_train`)."""
    return CudaBuilder(derivation, dtype, config).build_train(optimizer, model_module)
