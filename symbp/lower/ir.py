"""The planner's IR: the kernel steps every backend prints (one emitter per step per backend).

* :class:`Gemm` — ``out ← α·op(a)·op(b) + β·out`` (a contraction found in a formula).
* :class:`BlockGemm` — a GEMM per sample over flat (batch, rows·cols) buffers (im2col).
* :class:`Loop` — one loop nest over a target's indices evaluating several assignments at
  once (bias, activation and its derivative fused), optional running sums (scalars, or
  entries summed over the batch once :mod:`~symbp.lower.fuse` has merged loops).
* :class:`ColSum` — ``out[p] = Σ_n src[n, p]`` (bias gradients), read row by row.
* :class:`RowLoop` — per-sample reductions (log-sum-exp, sums over output units) followed
  by a loop over the units: the loss and its gradient in one pass.
* :class:`Nest` — ``target[n, *idx] = expr`` over a loop nest whose expr may hold Sums
  (accumulator loops, bounds tightened from their guards).
* :class:`WindowArgmax` — the first maximum of a window (max pooling, Maxout), stored for
  the backward pass, and the maximum itself when a stage reads it; optionally the stage
  before it computed entry by entry inside the scan (``pre``).
* :class:`SampleChunks` — steps run a chunk of samples at a time, a buffer they alone use kept
  for one chunk (a conv's δ between the pool that scatters it and the sums that read it).
* :class:`Sync` — a batch statistic's sum over this process's rows made the sum over every
  process's rows (data-parallel training: BatchNorm's mean and variance of the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp


@dataclass
class Gemm:
    """out ← alpha·op(a)·op(b) + beta·out."""

    out: sp.IndexedBase
    a: sp.IndexedBase
    ta: bool
    b: sp.IndexedBase
    tb: bool
    formula: sp.Expr = None  # the Sum it implements, for the comment above the call
    alpha: sp.Expr = sp.Integer(1)
    beta: sp.Expr = sp.Integer(0)


@dataclass
class Loop:
    ranges: list  # [(index symbol, extent expr)]
    stmts: list  # [(target Indexed, expr)], in order; later ones may read earlier targets
    sums: list = field(default_factory=list)  # [(scalar Symbol, expr)] accumulated over the nest
    parallel: bool = False  # split the outermost loop across threads (prange)
    # [(target Indexed, expr)]: target += expr at every entry, after the stores (a sum over the
    # batch of a fused loop, see lower/fuse.py); they read no array a statement writes except
    # at the entry itself, where they see the statement's value
    adds: list = field(default_factory=list)


@dataclass
class ColSum:
    out: sp.IndexedBase
    src: sp.IndexedBase
    rows: sp.Expr
    cols: sp.Expr


@dataclass
class RowLoop:
    row: sp.Symbol
    rows: sp.Expr
    reductions: list  # [(scalar Symbol, "logsumexp" | "sum", body expr, index, extent)]
    row_sums: list  # [(scalar Symbol, expr)] accumulated over rows (e.g. the loss)
    col: sp.Symbol
    cols: sp.Expr
    stmts: list  # [(target Indexed, expr)] per unit
    argmax_match: tuple | None = None  # (logits base, targets base): count rows whose argmaxes agree
    threshold_match: tuple | None = None  # (logits, targets): count units where y > 0 ⇔ t > 1/2


@dataclass
class Nest:
    ranges: list  # [(index symbol, extent)]
    stmts: list  # [(target Indexed, expr)]; later ones may read earlier targets
    sum_ranges: dict = field(default_factory=dict)  # index -> (lo, hi) for guard pruning
    accumulate: bool = False  # target += expr


@dataclass
class WindowArgmax:
    ranges: list  # [(index symbol, extent)] of the output
    target: sp.Indexed  # where the window-local position of the maximum goes
    value: sp.Expr  # the window entry, in the window's indices
    window: list  # [(index symbol, extent)], scanned in this order (row-major)
    # where the window's maximum goes, when the next stage is the route-sum that picks it
    # (max pooling's z, Maxout's z): one pass over the window instead of two
    max_target: sp.Indexed | None = None
    # [(target Indexed, expr)] stored at each window entry as it is visited, before its value
    # is read (a bias and activation pass moved into the scan: see lower/elide.py); value may
    # read these targets at the entry
    pre: list = field(default_factory=list)


@dataclass
class BlockGemm(Gemm):
    """A GEMM per sample: for each n, ``out[n] ← α·op(a[n])·op(b[n]) + β·out[n]``, where an
    operand marked per sample is the (rows × cols) block of sample n of a flat buffer and
    the others are whole arrays read as one matrix (a conv weight (K, C, kh, kw) is a
    (K, C·kh·kw) matrix).  ``accumulate``: ``out`` is not per sample and sums over n (β
    applies at n = 0 only), as a weight gradient does."""

    shapes: tuple = ()  # (rows, cols) of a, b, out, as stored (before op)
    per_sample: tuple = (False, False, False)  # a, b, out
    accumulate: bool = False


@dataclass
class Sync:
    """``out`` (a batch stage's buffer, one value per entry for the whole batch) summed in place
    over the processes of a data-parallel fit: each holds its rows' share of a sum over the
    global batch, and after this step every process holds the global batch's value.  Only the
    data-parallel variants of the kernels (``Plan.sync``) have it; loops never move across it."""

    out: sp.IndexedBase
    size: int  # its entries (the processes' sums must agree on the buffer's length)


@dataclass
class SampleChunks:
    """``steps`` over the batch ``size`` samples at a time (see :mod:`symbp.lower.chunk`).

    Inside, the loops over the samples run over the chunk's ``cn`` (``CN``) and read sample
    ``n + n0`` (``N0``) of the batch's buffers; ``scratch``, which only these steps touch,
    holds the chunk alone, at the head of its own buffer: its entry [n + n0, row…, h, w] is
    ((row…)·cn + n)·H·W + h·W + w.  ``zero`` runs once before the chunks (the sums the steps
    add to); a :class:`BlockGemm` among the steps sums over the batch inside its matrices
    (δ·colᵀ): each chunk adds its columns' share, and α, β apply once, after the last."""

    steps: list
    scratch: sp.IndexedBase
    size: int
    zero: list = field(default_factory=list)
