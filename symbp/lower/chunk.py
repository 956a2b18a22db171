"""A conv layer's backward pass a chunk of samples at a time, the buffer that only its steps
use never written out whole.

Two runs of backward steps each sweep a buffer with the batch inside that nothing else reads:

* **the first conv's δ** (nobody needs its ∂C/∂x): the max pool writes it (its scatter), the
  bias gradient sums it, and the weight gradient δ·colᵀ reads it again as dot products over
  the batch (the wide CNN's δ: 32 × 128 × 26 × 26 floats, 11 MB);
* **a later conv's input gradient**: its columns Wᵀ·δ (one GEMM, 288 × 128·121 floats, 18 MB for
  the wide CNN's second conv), then col2im adds them into the δ of the layer before.

:func:`chunk_samples` runs each over ``size`` samples at a time instead, with one chunk of the
buffer (about a MiB) at the head of its own memory: it stays in cache from the step that writes
it to the steps that read it, where the whole buffer went out to memory and came back.  Sums
over the batch (the bias gradient, the dot products) add each chunk's share to totals zeroed
before the first; the columns' GEMM runs on the chunk's columns of δ.

Measured (2-core AMD EPYC Zen 5, float32, ``fit`` over 16 batches of the wide CNN of
``benchmarks/bench_cnn.py``, best of 7, runs interleaved with the code before): the first conv's
run 15.1–17.5 ms a step → 14.2–14.3 (512 KiB, 6 samples a chunk; 1 and 2 MiB the same); the
second conv's columns then 13.9–14.3 → 13.0–13.7 (1 MiB, 7 samples; 512 KiB gained less).  The
small CNN (8 × 24 × 24 maps, one conv) is unchanged: 0.73–0.77 ms both.  The same chunks in the
forward pass (the GEMM into one chunk of z, then the pool's scan) gained nothing: that scan is
bound by its arithmetic, not by memory.

Target-neutral IR; the CPU module printer applies it (a CUDA kernel has no cache to keep a
chunk in: its printer keeps the steps as planned).
"""

from __future__ import annotations

import sympy as sp

from ..indices import N, n
from .fuse import BARRIER, access_sets
from .ir import BlockGemm, Nest, SampleChunks

#: The first sample of a chunk and the chunk's length, as the printed loop names them.
N0 = sp.Symbol("n0", integer=True, nonnegative=True)
CN = sp.Symbol("cn", integer=True, positive=True)

#: The bytes of the buffer one chunk holds: a 2-core Zen 5 has 1 MiB of L2 a core.  (Patched by
#: tests that want several chunks of a small batch; the generated module's cache key does not
#: see it.)
CHUNK_BYTES = 1024 * 1024


def chunk_samples(steps: list, buffer, inner: set, flat: dict, itemsize: int, small_out: int) -> list:
    """``steps`` with each run [zeroings of D, the scatter into D, D's bias sum, δ·colᵀ as dot
    products] made one :class:`SampleChunks`, where D has the batch inside (``inner``, its
    per-sample shape in ``flat``) and no other step reads it.  ``buffer(label)``: the array
    a label is stored in; ``small_out``: the most entries a weight gradient printed as dot
    products has (larger ones are BLAS GEMMs, which this does not split)."""
    out, k = [], 0
    while k < len(steps):
        found = _run_at(steps, k, buffer, inner, flat, small_out) or _col2im_run_at(steps, k, buffer, inner, flat)
        if found is None:
            out.append(steps[k])
            k += 1
            continue
        end, label = found
        rows_hw = 1
        for ext in flat[label]:
            rows_hw *= int(ext)
        size = max(1, CHUNK_BYTES // (rows_hw * itemsize))
        out.append(_chunked(steps[k:end], label, size))
        k = end
    return out


def _writes_only(step, label: str) -> bool:
    """Whether ``step`` is a Nest over the samples (n outermost) storing into ``label`` alone,
    each sample's entries from that sample's."""
    return (isinstance(step, Nest) and not step.accumulate and step.ranges[:1] == [(n, N)]
            and all(str(t.base.label) == label and t.indices[0] == n for t, _ in step.stmts))


def _bias_sum(step, label: str) -> bool:
    """Whether ``step`` is gb[p] = Σ_{n,h,w} f(label[n, p, h, w]) (a conv's bias gradient)."""
    if not isinstance(step, Nest) or step.accumulate or len(step.stmts) != 1 or any(i == n for i, _ in step.ranges):
        return False
    (_, expr), = step.stmts
    if not isinstance(expr, sp.Sum) or (n, 0, N - 1) not in [tuple(lim) for lim in expr.limits]:
        return False
    reads = expr.function.atoms(sp.Indexed)
    return bool(reads) and all(str(t.base.label) == label and t.indices[0] == n for t in reads)


def _weight_dots(step, label: str, inner: set, small_out: int) -> bool:
    """Whether ``step`` is out ← α·D·colᵀ + β·out with the batch inside both (dot products)."""
    if not isinstance(step, BlockGemm) or any(step.per_sample) or step.ta or not step.tb:
        return False
    (_, ca), (_, cb), (ro, co) = step.shapes
    return (str(step.a.label) == label and str(step.b.label) in inner and ro * co <= small_out
            and sp.sympify(ca).has(N) and sp.expand(ca - cb) == 0)


def _run_at(steps: list, k: int, buffer, inner: set, flat: dict, small_out: int):
    """(end, label of D) of a run starting at ``steps[k]``, or None."""
    first = steps[k]
    if not isinstance(first, Nest) or not first.stmts:
        return None
    label = str(first.stmts[0][0].base.label)
    if label not in inner or label not in flat or not _writes_only(first, label):
        return None
    end = k
    while end < len(steps) and _writes_only(steps[end], label):
        end += 1
    readers = 0
    gemm = None
    while end < len(steps) and readers < 2:
        st = steps[end]
        if _bias_sum(st, label):
            readers += 1
        elif gemm is None and _weight_dots(st, label, inner, small_out):
            gemm = st
            readers += 1
        else:
            break
        end += 1
    if gemm is None:
        return None
    run = steps[k:end]
    weight = buffer(str(gemm.out.label))
    if any(weight in _touches(st, buffer) for st in run if st is not gemm):
        return None  # (a step reads the weight its chunks update)
    if any(buffer(label) in _touches(st, buffer) for st in steps[end:]):
        return None  # D is read after the run: it must hold the whole batch
    return end, label


def _col2im_run_at(steps: list, k: int, buffer, inner: set, flat: dict):
    """(end, label of S) of a run [zeroings of g, S ← Wᵀ·δ (the batch inside both), g += col2im(S)]
    starting at ``steps[k]`` (a conv's input gradient, S its columns), or None."""
    end, zeroed = k, None
    while end < len(steps) and isinstance(steps[end], Nest) and steps[end].stmts:
        target = str(steps[end].stmts[0][0].base.label)
        if not _writes_only(steps[end], target) or any(e != 0 for _, e in steps[end].stmts) or zeroed not in (None, target):
            break
        zeroed, end = target, end + 1
    if end + 2 > len(steps):
        return None
    gemm, back = steps[end], steps[end + 1]
    if not isinstance(gemm, BlockGemm) or any(gemm.per_sample) or not gemm.ta or gemm.tb or gemm.beta != 0:
        return None
    label = str(gemm.out.label)
    if label not in inner or label not in flat or str(gemm.b.label) not in inner or str(gemm.a.label) in inner:
        return None
    if not (isinstance(back, Nest) and back.accumulate and back.ranges[:1] == [(n, N)] and back.stmts):
        return None
    target = str(back.stmts[0][0].base.label)
    if zeroed not in (None, target) or not all(str(t.base.label) == target and t.indices[0] == n for t, _ in back.stmts):
        return None
    if any(t.indices[0] != n for _, e in back.stmts for t in e.atoms(sp.Indexed) if str(t.base.label) == label):
        return None  # (col2im adds sample n's columns into sample n)
    end += 2
    if any(buffer(label) in _touches(st, buffer) for st in steps[end:]):
        return None  # the columns are read after the run: they must hold the whole batch
    return end, label


def _touches(step, buffer) -> set:
    acc = access_sets(step, buffer)
    if acc is BARRIER:
        return {None}
    reads, writes = acc
    return reads | writes


def _chunked(run: list, label: str, size: int) -> SampleChunks:
    """The run over one chunk: samples n + N0 for n < CN; sums over the batch become sums over
    the chunk added to totals zeroed before the first."""
    at = {n: n + N0}
    steps, zero = [], []
    for st in run:
        if isinstance(st, BlockGemm):
            steps.append(st)
        elif any(i == n for i, _ in st.ranges):
            steps.append(Nest([(n, CN), *st.ranges[1:]], [(t.xreplace(at), e.xreplace(at)) for t, e in st.stmts],
                              st.sum_ranges, st.accumulate))
        else:  # a bias sum: Σ over the chunk's samples, added
            (target, expr), = st.stmts
            limits = [(n, 0, CN - 1) if lim[0] == n else lim for lim in expr.limits]
            zero.append(Nest(st.ranges, [(target, sp.Integer(0))]))
            steps.append(Nest(st.ranges, [(target, sp.Sum(expr.function.xreplace(at), *limits))],
                              st.sum_ranges, accumulate=True))
    scratch = next(x_ for st in run if isinstance(st, BlockGemm) for x_ in (st.a, st.out) if str(x_.label) == label)
    return SampleChunks(steps, scratch, size, zero)
