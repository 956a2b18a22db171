"""Loop fusion: consecutive passes over the same (batch × units) buffers become one pass.

The planner lowers each stage of each layer on its own, so a step of a network passes over
its activations many times: bias and relu, the residual add, the batch mean of BatchNorm
(one loop each forward); relu′ ⊙ δ, the bias gradient, BatchNorm's four sums over the
batch (backward).  On buffers of a few hundred KiB each pass is bound by memory, not by
arithmetic, so this pass merges them: a step is moved up past the steps it does not depend
on, into the latest loop over the same domain it can join, where it reads what that loop
wrote at the same entry from a register instead of memory.  Sums over the batch
(``t[0, i] += …``, a bias gradient's column sum) join as running sums; their zeroing goes
just before the loop.

Only loops over two indices, the batch and one other with the same extent, are merged
(image layers keep their own nests, whose inner loops the CPU printer fuses differently).
Everything here is target-neutral IR; the CPU module printer applies it (a CUDA kernel per
loop would need atomic adds for the sums).

On ``benchmarks/bench_resnet.py`` (four BatchNorm blocks of (128, 256)) each block's forward
goes from five passes to three and its backward from eight to three: 2.54 → 2.46 ms a step
(measured in one process, 2-core AMD EPYC).
"""

from __future__ import annotations

import sympy as sp

from ..indices import N
from .ir import BlockGemm, ColSum, Gemm, Loop, Nest, WindowArgmax

BARRIER = None  # the access sets of a step nothing may move past (an unknown kind of step)


def fuse_loops(steps: list, size, buffer) -> list:
    """``steps`` with point-wise loops over the same (batch, units) domain merged.

    ``size(extent)``: an extent's number (widths are symbols in the IR); ``buffer(label)``:
    the array a label is stored in (a Flatten's δ shares its source's buffer, so two labels
    may be one array)."""
    out: list = []
    pending: list = []  # zeroings not placed yet: each goes just before the first step using its target
    seen: dict = {}  # id(step) -> its access sets (a loop that grows is looked at again)

    def access(step):
        if id(step) not in seen:
            seen[id(step)] = (step, access_sets(step, buffer))  # (the step kept: its id stays its own)
        return seen[id(step)][1]

    for step in steps:
        for part in _parts(step):
            if _is_init(part):
                pending.append(part)
            else:
                grown = _place(out, pending, part, size, buffer, access)
                if grown is not None:
                    seen.pop(id(grown), None)
    return out + pending


def _parts(step) -> list:
    """A column sum as its zeroing and a point-wise running sum; other steps as they are."""
    if isinstance(step, ColSum) and step.rows == N:
        nu, p = sp.Symbol("n", integer=True), sp.Symbol("p", integer=True)
        return [Nest([(p, step.cols)], [(step.out[p], sp.Integer(0))]),
                Loop([(nu, N), (p, step.cols)], [], adds=[(step.out[p], step.src[nu, p])])]
    return [step]


def _place(out: list, pending: list, step, size, buffer, access_of):
    """Put ``step`` at the end of ``out``, or into the earliest loop it can join after the
    last step it depends on (returned); a zeroing it needs goes just before it (or before
    that loop)."""
    access = access_sets(step, buffer)
    mine = [z for z in pending if _conflict(access_of(z), access)]
    for z in mine:
        pending.remove(z)
    point = _as_point(step)
    target = None
    if point is not None:
        sums = {buffer(str(t.base.label)) for t, _ in point.adds}
        if all(access_of(z)[1] <= sums for z in mine):  # only its own sums' zeroings
            for pos in range(len(out) - 1, -1, -1):
                other = out[pos]
                if _is_point_loop(other) and _merge(other, point, size, buffer, dry=True):
                    target = pos  # the earliest loop it may join before the first step it depends on
                if _conflict(access_of(other), access):
                    break
    if target is not None:
        group = out[target]
        _merge(group, point, size, buffer, dry=False)
        out[target:target] = mine
        return group
    out += mine + [point if point is not None else step]
    return None


def _is_init(step) -> bool:
    """A Nest over units only that sets its targets to constants (where a sum starts)."""
    return (isinstance(step, Nest) and not step.accumulate and len(step.ranges) == 1
            and step.ranges[0][1] != N and all(not e.free_symbols and not e.has(sp.Indexed) for _, e in step.stmts))


def _is_point_loop(step) -> bool:
    return (isinstance(step, Loop) and not step.sums and not step.parallel and len(step.ranges) == 2
            and step.ranges[0][1] == N)


def _as_point(step) -> Loop | None:
    """``step`` as a point-wise Loop over (batch, units): every array it writes at the
    entry (b, i) itself, or summed over the batch into an entry that does not depend on b;
    None if it is not one."""
    if isinstance(step, Loop):
        stmts, adds = step.stmts, step.adds
        if not _is_point_loop(step):
            return None
    elif isinstance(step, Nest):
        if len(step.ranges) != 2 or step.ranges[0][1] != N or step.sum_ranges:
            return None
        stmts, adds = ([], step.stmts) if step.accumulate else (step.stmts, [])
    else:
        return None
    (b, _), (i, _) = step.ranges
    exprs = [e for _, e in stmts + adds]
    if any(e.has(sp.Sum, sp.Piecewise) for e in exprs):
        return None
    if any(not isinstance(t, sp.Indexed) or t.indices != (b, i) for t, _ in stmts):
        return None
    if any(not isinstance(t, sp.Indexed) or not _index_symbols(t) <= {i} for t, _ in adds):
        return None
    written = {t.base.label for t, _ in stmts}
    for e in exprs:  # what a step writes entry by entry it reads at that entry only
        if any(x.base.label in written and x.indices != (b, i) for x in e.atoms(sp.Indexed)):
            return None
    return Loop(list(step.ranges), list(stmts), adds=list(adds))


def _index_symbols(x: sp.Indexed) -> set:
    return set().union(*(sp.sympify(k).free_symbols for k in x.indices))


def _labels(exprs, buffer) -> set:
    return {buffer(str(x.base.label)) for e in exprs for x in sp.sympify(e).atoms(sp.Indexed)}


def access_sets(step, buffer):
    """(arrays read, arrays written) by a step, by buffer; BARRIER for a kind not known."""
    def name(base):
        return buffer(str(base.label))

    if isinstance(step, (Gemm, BlockGemm)):
        reads = {name(step.a), name(step.b)}
        if step.beta != 0 or getattr(step, "accumulate", False):
            reads.add(name(step.out))
        return reads, {name(step.out)}
    if isinstance(step, Loop):
        targets = [t for t, _ in step.stmts + step.adds]
        writes = _labels(targets, buffer) | {str(acc) for acc, _ in step.sums}
        reads = _labels([e for _, e in step.stmts + step.adds + step.sums], buffer)
        return reads | _labels([t for t, _ in step.adds], buffer) | {str(acc) for acc, _ in step.sums}, writes
    if isinstance(step, Nest):
        writes = _labels([t for t, _ in step.stmts], buffer)
        reads = _labels([e for _, e in step.stmts], buffer)
        return reads | (writes if step.accumulate else set()), writes
    if isinstance(step, ColSum):
        return {name(step.src)}, {name(step.out)}
    if isinstance(step, WindowArgmax):
        stores = [step.target] + ([step.max_target] if step.max_target is not None else []) + [t for t, _ in step.pre]
        return _labels([step.value] + [e for _, e in step.pre], buffer), _labels(stores, buffer)
    return BARRIER


def _conflict(a, b) -> bool:
    """Whether two steps must keep their order (one writes what the other reads or writes)."""
    if a is BARRIER or b is BARRIER:
        return True
    (ra, wa), (rb, wb) = a, b
    return bool(wa & (rb | wb) or ra & wb)


def _merge(group: Loop, step: Loop, size, buffer, dry: bool) -> bool:
    """Append ``step``'s statements to ``group``'s (same domain, after renaming its indices)
    if the result computes the same values; with ``dry``, only say whether it would."""
    if [size(e) for _, e in group.ranges] != [size(e) for _, e in step.ranges]:
        return False
    rename = {old: new for (old, _), (new, _) in zip(step.ranges, group.ranges)}
    # An array the group writes keeps the group's name in what joins it (an Add's output is
    # z4 to its writer and a4 to its reader: one buffer), so a read of an entry just written
    # finds its formula.
    canon = {buffer(str(t.base.label)): t.base for t, _ in group.stmts}

    def same(e):
        e = e.xreplace(rename)
        return e.replace(lambda x: isinstance(x, sp.Indexed) and canon.get(buffer(str(x.base.label)), x.base) != x.base,
                         lambda x: canon[buffer(str(x.base.label))][x.indices])

    stmts = [(same(t), same(e)) for t, e in step.stmts]
    adds = [(same(t), same(e)) for t, e in step.adds]
    point = tuple(idx for idx, _ in group.ranges)
    g_set, g_add = _labels([t for t, _ in group.stmts], buffer), _labels([t for t, _ in group.adds], buffer)
    s_set, s_add = _labels([t for t, _ in stmts], buffer), _labels([t for t, _ in adds], buffer)
    g_read = _labels([e for _, e in group.stmts + group.adds], buffer)
    s_read = _labels([e for _, e in stmts + adds], buffer)
    # A running sum is complete only after the loop: nothing else in it may read or set it
    # (two running sums into one array commute).  The sums are added after every store and
    # see the loop's last value of what they read: the group's must read nothing ``step`` sets.
    if g_add & (s_read | s_set) or s_add & (g_read | g_set) or s_set & _labels([e for _, e in group.adds], buffer):
        return False
    # An array one of them sets and the other reads or sets: every access at the entry itself.
    shared = (g_set & (s_read | s_set)) | (s_set & g_read)
    every = [x for _, e in group.stmts + group.adds + stmts + adds for x in e.atoms(sp.Indexed)]
    every += [t for t, _ in group.stmts + stmts]
    if any(buffer(str(x.base.label)) in shared and x.indices != point for x in every):
        return False
    if not dry:
        group.stmts += stmts
        group.adds += adds
    return True
