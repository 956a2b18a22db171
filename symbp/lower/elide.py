"""Fewer passes over image buffers: a layout copy elided, an activation scanned where it is made,
stores no one reads dropped.

The planner lowers each stage on its own, so a conv layer followed by max pooling passes over
its (batch, K, H, W) maps more often than the formulas need:

* **copies** — ``B[n, k, h, w] = A[n, k, h, w]``: a conv layer's δ copied into the layout
  its GEMMs read (the batch inside, ``dt``), the gradient of the zero padding copied into the
  δ of the layer before when there is no padding.  :func:`elide_copies` lets the steps that
  write A write B instead, the steps that read A read B, and drops the copy: the printer
  maps every logical index ``[n, k, h, w]`` to each buffer's own layout, so only the memory
  order changes, not a value.
* **bias + activation, then the pool** — ``z = b + zt; a = f(z)`` in one pass, then the max
  pool's scan reading ``a`` in another.  When the pool's windows tile the map (each entry in
  exactly one window), :func:`fuse_scans` moves the first pass into the scan: each window
  entry computes z and f(z) as it is visited, stores what a later step or function reads
  (z, where the backward pass reads f′ from it) and keeps the rest in a register: one pass, and one
  buffer the size of the map neither written nor read again.
* **stores no one reads** — ``z = b + zt`` kept for f′ when f′ reads a (relu's H(z) = H(a)) or
  when a max pool's δ reads f′ at each window's maximum: :func:`drop_dead_stores` drops a
  forward-pass statement whose array no later step or function reads, and the statements
  after it read its formula.

Measured (2-core AMD EPYC Zen 5, float32, ``fit`` over 16 batches, best of 7, three interleaved
runs against the code without these passes): the wide CNN of ``benchmarks/bench_cnn.py`` 16.5 →
16.0–16.2 ms a step, the small one unchanged (0.77–0.79 ms both).  The first conv's bias, relu
and pool alone (batch 128, 32 × 26 × 26): 1.65 ms as two passes, 1.50 fused (scan unrolled, see
``common.window_scan``).  Writing the pool's δ into the batch-inside layout instead of copying it
there costs what the copy saved (the stores are no longer in memory order): 1.41 ms both ways.
The small CNN's cold first step (compile) went from 3.84–4.09 to 3.53–3.59 s with both changes.

Both passes are target-neutral IR; the CPU module printer applies them (its buffers with the
batch inside make the copies; the CUDA printer keeps its steps as planned).
"""

from __future__ import annotations

import sympy as sp

from ..indices import N
from .fuse import BARRIER, access_sets
from .ir import BlockGemm, Gemm, Loop, Nest, WindowArgmax


def _reads_writes(step, buffer) -> tuple[set, set] | None:
    """(buffers read, buffers written) of a step, None for a kind this pass does not know."""
    acc = access_sets(step, buffer)
    return None if acc is BARRIER else acc


def _labels_of(step) -> set:
    """Every array label a step names (its Indexed reads and writes, a GEMM's operands)."""
    if isinstance(step, (Gemm, BlockGemm)):
        return {str(x.label) for x in (step.a, step.b, step.out)}
    exprs = []
    for attr in ("stmts", "adds", "sums", "pre"):
        for t, e in getattr(step, attr, ()):
            exprs += [t, e]
    for attr in ("target", "value", "max_target"):
        if getattr(step, attr, None) is not None:
            exprs.append(getattr(step, attr))
    return {str(x.base.label) for e in exprs for x in sp.sympify(e).atoms(sp.Indexed)}


def _is_copy(step) -> tuple[str, str] | None:
    """(A, B) for a Nest ``B[i] = A[i]`` over its own loop indices i; else None."""
    if not isinstance(step, Nest) or step.accumulate or step.sum_ranges or len(step.stmts) != 1:
        return None
    target, expr = step.stmts[0]
    idx = tuple(sym for sym, _ in step.ranges)
    if not (isinstance(target, sp.Indexed) and isinstance(expr, sp.Indexed)) or target.indices != idx or expr.indices != idx:
        return None
    return (str(expr.base.label), str(target.base.label)) if expr.base.label != target.base.label else None


def _rename(step, old: str, new: str):
    """``step`` with array label ``old`` read and written as ``new`` (same indices)."""
    swap = {}

    def fix(e):
        e = sp.sympify(e)
        for x in e.atoms(sp.Indexed):
            if str(x.base.label) == old:
                swap[x.base] = sp.IndexedBase(new)
        return e.xreplace(swap)

    if isinstance(step, Nest):
        return Nest(list(step.ranges), [(fix(t), fix(e)) for t, e in step.stmts], dict(step.sum_ranges), step.accumulate)
    if isinstance(step, Loop):
        return Loop(list(step.ranges), [(fix(t), fix(e)) for t, e in step.stmts], [(a, fix(e)) for a, e in step.sums],
                    step.parallel, [(fix(t), fix(e)) for t, e in step.adds])
    if isinstance(step, WindowArgmax):
        return WindowArgmax(list(step.ranges), fix(step.target), fix(step.value), list(step.window),
                            None if step.max_target is None else fix(step.max_target),
                            [(fix(t), fix(e)) for t, e in step.pre])
    raise TypeError(type(step).__name__)


def elide_copies(steps: list, buffer, private, shape) -> list:
    """``steps`` with each copy ``B[i] = A[i]`` elided where that is safe: A is ``private``
    (a work buffer no other function reads after this one), stored as an image of the same
    ``shape`` as B (``shape(label)``: its (C, H, W), None for other buffers), named by one
    label only, never a GEMM operand, first used by a step that sets it; the copy covers all
    of B, which is not touched from A's first write up to the copy nor written after it.  Then
    every step naming A names B."""
    steps = list(steps)
    changed = True
    while changed:
        changed = False
        for pos, step in enumerate(steps):
            pair = _is_copy(step)
            if pair is None:
                continue
            a_, b_ = pair
            if not private(a_) or shape(a_) is None or shape(a_) != shape(b_):
                continue
            if [ext for _, ext in step.ranges] != [N, *shape(b_)]:  # (all of B: no stale entry of it read as A's)
                continue
            labels = [_labels_of(s) for s in steps]
            # one label per buffer: an alias of A (or B) would keep the old memory
            same = [lab for ls in labels for lab in ls if buffer(lab) in (buffer(a_), buffer(b_))]
            if set(same) - {a_, b_}:
                continue
            # A read by index only (a GEMM reads its memory as a matrix, whose layout B changes)
            if any(a_ in ls and not isinstance(s, (Nest, Loop, WindowArgmax)) for s, ls in zip(steps, labels)):
                continue
            first = next(k for k, ls in enumerate(labels) if a_ in ls)
            acc = _reads_writes(steps[first], buffer)
            if acc is None or buffer(a_) in acc[0] or buffer(a_) not in acc[1]:
                continue  # (A's first use must set it: a value it held before this function is not B's)
            if any(b_ in labels[k] for k in range(first, pos)):
                continue
            if any(buffer(b_) in (_reads_writes(s, buffer) or (set(), {buffer(b_)}))[1] for s in steps[pos + 1:]):
                continue
            steps = [_rename(s, a_, b_) if a_ in ls else s for s, ls in zip(steps, labels) if s is not step]
            changed = True
            break
    return steps


def _window_map(at: tuple, pointwise: list, outer: list, window: list) -> bool:
    """Whether the scan's read ``a[at]`` (``outer`` × ``window`` loops: the pool's output
    entries and window positions) visits every entry of the ``pointwise`` loops' domain
    exactly once: each index of ``at`` is an output index of the same extent, or S·o + u with
    a window of S entries and S times o's extent equal to the domain's extent."""
    if len(at) != len(pointwise):
        return False
    outs, wins = dict(outer), dict(window)
    used = []
    for e, (_, extent) in zip(at, pointwise):
        e = sp.expand(e)
        if e in outs:
            if outs[e] != extent:
                return False
            used.append(e)
            continue
        syms = [s for s in e.free_symbols if s in wins]
        if len(syms) != 1 or e.coeff(syms[0]) != 1 or extent == N:
            return False
        u_ = syms[0]
        rest = sp.expand(e - u_)
        o_ = next(iter(rest.free_symbols), None) if len(rest.free_symbols) == 1 else None
        if o_ not in outs or outs[o_] == N or rest != wins[u_] * o_ or outs[o_] * wins[u_] != extent:
            return False
        used += [o_, u_]
    return sorted(map(str, used)) == sorted(map(str, [*outs, *wins]))


def fuse_scans(steps: list, buffer, needed) -> list:
    """``steps`` with each point-wise Nest over an image that the next step, a window scan,
    reads through windows tiling it, moved into that scan (see the module docstring).  A
    target of the Nest stays stored when ``needed(buffer)`` (read by another function, the
    network's output) or when another step of ``steps`` reads it; otherwise it lives in a
    register."""
    out = list(steps)
    pos = 0
    while pos + 1 < len(out):
        fused = _fuse_pair(out[pos], out[pos + 1], [s for k, s in enumerate(out) if k not in (pos, pos + 1)],
                           buffer, needed)
        if fused is None:
            pos += 1
            continue
        out[pos:pos + 2] = [fused]
    return out


def _fuse_pair(nest, scan, others: list, buffer, needed):
    """The scan with ``nest`` computed at each window entry, or None where it does not apply."""
    if not isinstance(nest, Nest) or not isinstance(scan, WindowArgmax) or nest.accumulate or nest.sum_ranges:
        return None
    idx = tuple(sym for sym, _ in nest.ranges)
    if not nest.ranges or nest.ranges[0][1] != N:
        return None
    if any(not isinstance(t, sp.Indexed) or t.indices != idx for t, _ in nest.stmts):
        return None
    written = {str(t.base.label) for t, _ in nest.stmts}
    exprs = [e for _, e in nest.stmts]
    if any(e.has(sp.Sum) for e in exprs):
        return None
    for e in exprs:  # point-wise: what the nest writes it reads at the entry itself only
        if any(str(x.base.label) in written and x.indices != idx for x in e.atoms(sp.Indexed)):
            return None
    reads = [x for x in sp.sympify(scan.value).atoms(sp.Indexed) if str(x.base.label) in written]
    if not reads or len({x.indices for x in reads}) != 1 or scan.pre:
        return None
    at = reads[0].indices
    if not _window_map(at, list(nest.ranges), list(scan.ranges), list(scan.window)):
        return None
    nest_acc, scan_acc = _reads_writes(nest, buffer), _reads_writes(scan, buffer)
    if scan_acc[1] & (nest_acc[0] | nest_acc[1]):  # (the scan's stores move among the nest's)
        return None
    elsewhere = set()
    for s in others:
        acc = _reads_writes(s, buffer)
        if acc is None:
            return None
        elsewhere |= acc[0]
    at_entry = dict(zip(idx, at))
    pre, local = [], {}  # local: the entries kept in registers, by their formulas
    for t, e in nest.stmts:  # in order: a later statement may read an earlier target
        here = t.xreplace(at_entry)
        value = e.xreplace(at_entry).xreplace(local)
        if needed(buffer(str(t.base.label))) or buffer(str(t.base.label)) in elsewhere:
            pre.append((here, value))  # (read back as the stored entry: the printer keeps it in a register)
        else:
            local[here] = value
    value = sp.sympify(scan.value).xreplace(local)
    return WindowArgmax(list(scan.ranges), scan.target, value, list(scan.window), scan.max_target, pre)


def drop_dead_stores(steps: list, buffer, needed) -> list:
    """``steps`` (a forward pass) without the stores no one reads: a statement of a point-wise
    Loop or Nest writing an array that no other step of ``steps`` reads and ``needed(buffer)``
    says no later function reads (z of a layer whose f′ reads a, or whose max pool's δ reads
    the window's maximum) is dropped, and a later statement of the same entry reading its value
    gets the formula instead: ``A1 = relu(Z1)`` after ``Z1 = b + Z1`` becomes
    ``A1 = relu(b + Z1)``, one store an entry fewer.  A step this pass cannot read keeps
    everything."""
    acc = [_reads_writes(step, buffer) for step in steps]
    if any(a is None for a in acc):
        return list(steps)
    out = []
    for pos, step in enumerate(steps):
        if not isinstance(step, (Loop, Nest)) or getattr(step, "accumulate", False):
            out.append(step)
            continue
        read_elsewhere = set().union(*(a[0] for k, a in enumerate(acc) if k != pos))
        extra = [sp.sympify(e) for _, e in [*getattr(step, "sums", ()), *getattr(step, "adds", ())]]
        kept, local = [], {}
        for k, (t, e) in enumerate(step.stmts):
            e = sp.sympify(e).xreplace(local)
            name = buffer(str(t.base.label)) if isinstance(t, sp.Indexed) else None
            later = [sp.sympify(e2) for _, e2 in step.stmts[k + 1:]] + extra
            # later statements of this entry may read the target at the entry itself only
            here_only = all(x == t for e2 in later for x in e2.atoms(sp.Indexed) if buffer(str(x.base.label)) == name)
            if name is None or needed(name) or name in read_elsewhere or not here_only or any(e2.has(t) for e2 in extra):
                kept.append((t, e))
            else:
                local[t] = e
        if not local:
            out.append(step)
        elif isinstance(step, Nest):
            if kept:
                out.append(Nest(list(step.ranges), kept, dict(step.sum_ranges), step.accumulate))
        elif kept or extra:
            out.append(Loop(list(step.ranges), kept, list(step.sums), step.parallel, list(step.adds)))
    return out
