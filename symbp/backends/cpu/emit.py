"""CPU emitters: each IR step printed as Numba (``@njit``) Python source.

``emit`` (a ``functools.singledispatch``) has one entry per IR step; a step with no entry
fails at generation time, naming it.  The scalar printer and the op table (``SCALAR_OPS``)
are shared with the CUDA backend (:mod:`symbp.backends.common`).
"""

from __future__ import annotations

import functools
import textwrap

import sympy as sp

from ...indices import N
from ...lower.chunk import N0
from ...lower.ir import BlockGemm, ColSum, Gemm, Loop, Nest, RowLoop, SampleChunks, Sync, WindowArgmax
from ..common import (
    UNROLL_WINDOW,
    NumbaPrinter,
    extent_text,
    inner_view,
    loop_lines,
    nest_statements,
    reads_rows,
    row_reduction_lines,
    window_entry,
    window_scan,
)
from .dots import MAX_OUT


@functools.singledispatch
def emit(step, printer: NumbaPrinter) -> list[str]:
    raise NotImplementedError(f"the CPU backend has no emitter for {type(step).__name__}")


@emit.register
def _(step: Gemm, printer: NumbaPrinter) -> list[str]:
    a, b, out = printer.array(step.a), printer.array(step.b), printer.array(step.out)
    alpha, beta = printer.doprint(step.alpha), printer.doprint(step.beta)
    product = f"{a}{'ᵀ' if step.ta else ''}·{b}{'ᵀ' if step.tb else ''}"
    scaled = product if step.alpha == 1 else f"({step.alpha})·{product}"
    kept = "" if step.beta == 0 else f"({step.beta})·{out} + "
    return [
        f"# {out} ← {kept}{scaled}, from {step.formula}",
        f"gemm({a}, {step.ta}, {b}, {step.tb}, {out}, {alpha}, {beta}, scal)",
    ]


@emit.register
def _(step: Sync, printer: NumbaPrinter) -> list[str]:
    # Numba cannot call MPI: the interpreter does, for this one call (a few µs, once per
    # batch statistic a step); symbp.backends.cpu.sync holds the fit's communicator.
    return ["with objmode():  # this process's rows' sum -> the global batch's (data-parallel fit)",
            f"    sum_over_processes({printer.array(step.out)})"]


@emit.register
def _(step: Loop, printer: NumbaPrinter) -> list[str]:
    return loop_lines(step, printer)


@emit.register
def _(step: ColSum, printer: NumbaPrinter) -> list[str]:
    out, src = printer.array(step.out), printer.array(step.src)
    # Row by row, so the source is read in memory order.
    return [
        f"{out}[:] = ZERO",
        f"for n in range({extent_text(printer, step.rows)}):",
        f"    for p in range({extent_text(printer, step.cols)}):",
        f"        {out}[p] += {src}[n, p]",
    ]


@emit.register
def _(step: RowLoop, printer: NumbaPrinter) -> list[str]:
    lines = [f"for {step.row} in range({extent_text(printer, step.rows)}):"]
    body = row_reduction_lines(step, printer, "NEG_INF")
    if step.argmax_match is not None:
        y, t = (printer.array(b) for b in step.argmax_match)
        printer.helpers_used.add("row_argmax")
        body.append(f"if row_argmax({y}[{step.row}]) == row_argmax({t}[{step.row}]):")
        body.append("    correct += 1")
    if step.threshold_match is not None:
        # Binary outputs: a unit is right when logit > 0 agrees with target > 1/2.
        y, t = (printer.array(b) for b in step.threshold_match)
        body.append(f"for {step.col} in range({extent_text(printer, step.cols)}):")
        body.append(f"    if ({y}[{step.row}, {step.col}] > ZERO) == ({t}[{step.row}, {step.col}] > HALF):")
        body.append("        correct += 1")
    inner = emit(Loop([(step.col, step.cols)], step.stmts), printer)
    body += inner
    return lines + textwrap.indent("\n".join(body), "    ").split("\n")


# -- loop nests for index formulas of any shape (image layers) ------------------------------


@emit.register
def _(step: BlockGemm, printer: NumbaPrinter) -> list[str]:
    names = [printer.array(x_) for x_ in (step.a, step.b, step.out)]
    a, b, out = (f"{x_}[n]" if per else x_ for x_, per in zip(names, step.per_sample))
    alpha, beta = printer.doprint(step.alpha), printer.doprint(step.beta)
    product = f"{a}{'ᵀ' if step.ta else ''}·{b}{'ᵀ' if step.tb else ''}"
    scaled = product if step.alpha == 1 else f"({step.alpha})·{product}"
    kept = "" if step.beta == 0 else f"({step.beta})·{out} + "
    how = f"Σ_n {scaled}" if step.accumulate else scaled
    # each operand as gemm_block takes it: the buffer, its block (sample n, or 0: the whole), its shape
    args = [f"{name}, {'n' if per else 0}, {_dim(rows)}, {_dim(cols)}" + ("" if flag is None else f", {flag}")
            for name, per, (rows, cols), flag in zip(names, step.per_sample, step.shapes, (step.ta, step.tb, None))]
    if not any(step.per_sample):  # the batch is inside the matrices (shapes count nb): one call
        (_, ca), _, (ro, co) = step.shapes
        if not step.ta and step.tb and ro * co <= MAX_OUT and sp.sympify(ca).has(N):
            return [f"# {out} ← {kept}{scaled}, dot products over the batch (a small output), from {step.formula}",
                    f"gemm_dots({a}, {b}, {out}, {ro}, {co}, {_dim(ca)}, {alpha}, {beta})"]
        return [f"# {out} ← {kept}{scaled}, one GEMM with the batch inside its matrices, from {step.formula}",
                f"gemm_block({', '.join(args)}, {alpha}, {beta}, scal)"]
    stacked = _stacked(step, names)
    if stacked is not None:
        return [f"# {out} ← {kept}{how}, the samples' blocks stacked into one GEMM, from {step.formula}",
                f"gemm_block({stacked}, {alpha}, {beta}, scal)"]
    if step.accumulate and step.beta != 1:
        beta = f"({beta} if n == 0 else ONE)"  # Σ over the samples: β once, then add
    return [
        f"# {out} ← {kept}{how}, per sample n (blocks as (rows, cols) matrices), from {step.formula}",
        "for n in range(nb):",
        f"    gemm_block({', '.join(args)}, {alpha}, {beta}, scal)",
    ]


@emit.register
def _(step: SampleChunks, printer: NumbaPrinter) -> list[str]:
    label = str(step.scratch.label)
    out = [f"# {printer.array(step.scratch)} {size_note(step)}"]
    for st in step.zero:
        out += emit(st, printer)
    dtype = "np.float32" if printer.dtype == "float32" else "np.float64"
    gemms = [st for st in step.steps if isinstance(st, BlockGemm) and str(st.out.label) != label]  # (sums over chunks)
    for st in gemms:
        (_, _), _, (ro, co) = st.shapes
        out.append(f"acc_{printer.array(st.out)} = zeros(({ro}, {co}), {dtype})")
    out += [f"for n0 in range(0, nb, {step.size}):", f"    cn = {step.size} if {step.size} < nb - n0 else nb - n0"]
    printer.chunked = getattr(printer, "chunked", set()) | {label}
    try:
        for st in step.steps:
            if isinstance(st, BlockGemm) and str(st.out.label) == label:  # the chunk's columns: Wᵀ·δ
                (ar, ac), (br, bcols), (orows, _) = st.shapes
                hw = sp.sympify(bcols) / N  # the columns of one sample
                a, b, o = (printer.array(x_) for x_ in (st.a, st.b, st.out))
                lines = [f"# {o} ← {a}ᵀ·{b} for the chunk's samples, from {st.formula}",
                         f"gemm_at({a}, 0, {ar}, {ac}, {ac}, True, {b}, n0 * {hw}, {br}, cn * {hw}, nb * {hw}, False, "
                         f"{o}, 0, {orows}, cn * {hw}, cn * {hw}, {printer.doprint(st.alpha)}, ZERO, scal)"]
            elif isinstance(st, BlockGemm):  # the chunk's share of δ·colᵀ
                hw = sp.sympify(st.shapes[0][1]) / N
                a, b, o = (printer.array(x_) for x_ in (st.a, st.b, st.out))
                lines = [f"# {o} ← {st.beta}·{o} + ({st.alpha})·Σ_chunks {a}·{b}ᵀ, from {st.formula}",
                         f"dots_add({a}, {b}, acc_{o}, cn * {hw}, nb * {hw}, n0 * {hw})"]
            else:
                lines = emit(st, printer)
            out += ["    " + line for line in lines]
    finally:
        printer.chunked = printer.chunked - {label}
    for st in gemms:
        o = printer.array(st.out)
        out.append(f"dots_finish(acc_{o}, {o}, {printer.doprint(st.alpha)}, {printer.doprint(st.beta)})")
    return out


def size_note(step: SampleChunks) -> str:
    """The comment above a chunked run: what it holds and how many samples a chunk has."""
    return (f"holds {step.size} samples at a time (at its head): the steps that write and read it "
            "run a chunk of the batch at a time, the chunk kept in cache (lower/chunk.py)")


def _dim(size) -> str:
    """A matrix dimension: a number, or one that counts the batch (N → the run's nb)."""
    return str(sp.sympify(size).xreplace({N: sp.Symbol("nb")}))


def _stacked(step: BlockGemm, names: list) -> str | None:
    """gemm_block's operands for the samples' GEMMs as one, when the blocks stack: a per-sample
    buffer's blocks, one after the other, are one (nb·rows × cols) matrix.  out[n] = a[n]·op(b)
    for every n is [out[0]; out[1]; …] = [a[0]; a[1]; …]·op(b), and Σ_n a[n]ᵀ·b[n] is
    [a[0]; a[1]; …]ᵀ·[b[0]; b[1]; …]: one call with the sum over the samples inside the GEMM,
    where nb small calls (an 8×25 block of a conv weight from a 576-long sum each) measured
    3-4× slower in all than one."""
    (ra, ca), (rb, cb), (ro, co) = step.shapes
    a, b, out = names
    if step.per_sample == (True, False, True) and not step.ta:
        return f"{a}, 0, nb * {ra}, {ca}, False, {b}, 0, {rb}, {cb}, {step.tb}, {out}, 0, nb * {ro}, {co}"
    if step.per_sample == (True, True, False) and step.accumulate and step.ta and not step.tb:
        return f"{a}, 0, nb * {ra}, {ca}, True, {b}, 0, nb * {rb}, {cb}, False, {out}, 0, {ro}, {co}"
    return None


def _merge_inner_loops(step: Nest, printer: NumbaPrinter) -> Nest:
    """Fuse the two innermost loops (h, w) into one over H·W when every access reads them as
    H·h + w of a flat buffer (bias + activation over a (K, H, W) block, a δ ⊙ f′ pass): one
    long contiguous loop vectorizes, where a nest of short ones measured ~10× slower."""
    ranges, stmts = list(step.ranges), list(step.stmts)
    while len(ranges) >= 3:
        (h_, eh), (w_, ew) = ranges[-2], ranges[-1]
        if not reads_rows(printer, [x_ for st in stmts for x_ in st], h_, w_, ew):
            break
        ranges[-2:] = [(w_, eh * ew)]
        stmts = [(t_.xreplace({h_: 0}), x_.xreplace({h_: 0})) for t_, x_ in stmts]
    return Nest(ranges, stmts, step.sum_ranges, step.accumulate)


@emit.register
def _(step: Nest, printer: NumbaPrinter) -> list[str]:
    step = _merge_inner_loops(step, printer)
    # (before hoisting: a hoisted read may index a view too)
    views = _inner_views([x_ for st in step.stmts for x_ in st], printer)
    step, hoisted = _hoist_reads(step, printer)
    out, indent = views, ""
    for depth, (idx, extent) in enumerate(step.ranges):
        out.append(f"{indent}for {idx} in range({extent_text(printer, extent)}):")
        indent += "    "
        out += [f"{indent}{name} = {printer._print(read)}" for name, read, at in hoisted if at == depth]
    return out + [indent + line for line in nest_statements(step, printer)]


def _inner_views(exprs: list, printer: NumbaPrinter) -> list[str]:
    """The flat views of the buffers with the batch inside that a step's expressions index
    (see common._inner_index), bound before its loops."""
    inner = getattr(printer, "inner", ())
    names = sorted({printer.array(t.base) for x_ in exprs for t in x_.atoms(sp.Indexed) if str(t.base.label) in inner})
    return [f"{inner_view(name)} = flat({name})" for name in names]


def _hoist_reads(step: Nest, printer: NumbaPrinter) -> tuple[Nest, list]:
    """Array reads that do not change in the innermost loops, read once in the loop that
    fixes their indices: Numba cannot tell that the stores of the nest leave them unchanged,
    so it loads them again at every entry (a max pool's δ scatter reads the pooled δ and the
    arg-max once per window entry: measured 1.6 ms against 7.6 with the four loads per window
    left in, 128 × 32 × 26 × 26 entries).  Reads of an array the nest writes stay where they are,
    and so do reads under a guard or inside a sum (a guarded read may be out of range where
    its guard is false)."""
    depth_of = {idx: d for d, (idx, _) in enumerate(step.ranges)}
    last = len(step.ranges) - 1
    written = {printer.array(t.base) for t, _ in step.stmts}
    hoisted, subs = [], {}
    for _, expr in step.stmts:
        kept = set().union(*(s_.atoms(sp.Indexed) for s_ in expr.atoms(sp.Sum)),
                           *(e_.atoms(sp.Indexed) for pw in expr.atoms(sp.Piecewise) for e_, _ in pw.args))
        for read in sorted(expr.atoms(sp.Indexed) - kept, key=str):
            used = set().union(*(sp.sympify(i).free_symbols for i in read.indices)) - {N0}  # (a chunk's first sample: fixed)
            if read in subs or printer.array(read.base) in written or used - set(depth_of):
                continue
            at = max((depth_of[s_] for s_ in used), default=-1)
            if 0 <= at < last:
                name = sp.Symbol(f"r{printer.counter}")  # (one name per read in the function: one type each)
                printer.counter += 1
                printer.names[name] = str(name)
                subs[read] = name
                hoisted.append((name, read, at))
    if not hoisted:
        return step, []
    stmts = [(t, e.xreplace(subs)) for t, e in step.stmts]
    return Nest(step.ranges, stmts, step.sum_ranges, step.accumulate), hoisted


@emit.register
def _(step: WindowArgmax, printer: NumbaPrinter) -> list[str]:
    out, indent = _inner_views([step.value, *(x_ for st in step.pre for x_ in st)], printer), ""
    rows = _row_form(step)
    if rows is not None:
        return out + _row_scan(step, printer, *rows)
    for idx, extent in step.ranges:
        out.append(f"{indent}for {idx} in range({extent_text(printer, extent)}):")
        indent += "    "
    return out + [indent + line for line in window_scan(step, printer, "NEG_INF")]


#: The fewest columns a row of windows is scanned a column at a time for: one AVX-512 vector of
#: float32.  Measured alone (float32, batch 128): 26 columns (the wide CNN's first pool) 1.1 ms
#: against 2.0-2.4 window by window, 24 (the small CNN's) 0.12 against 0.14, but 10 (the wide
#: CNN's second pool, 64 × 11 × 11 → 5 × 5) 0.42 against 0.20: a short row pays the column pass's
#: set-up per row and vectorises a remainder.
ROW_FORM_MIN = 16


def _row_form(step: WindowArgmax) -> tuple | None:
    """(column symbol, the row's columns, the window entry at (u, column) as value and pre)
    when a row of windows can be scanned a column at a time: a 2-D window of at most UNROLL_WINDOW entries
    whose column offset v and the output column w meet only as kw·w + v (windows side by side
    along the row, as a max pool whose stride is its width), w the innermost output index, and
    rows of at least ROW_FORM_MIN columns."""
    if len(step.window) != 2 or len(step.ranges) < 2:
        return None
    (u, kh), (v, kw) = step.window
    w = step.ranges[-1][0]
    if not (sp.sympify(kh).is_Integer and sp.sympify(kw).is_Integer) or int(kh) * int(kw) > UNROLL_WINDOW:
        return None
    cols = sp.sympify(step.ranges[-1][1]) * int(kw)
    if not cols.is_Integer or int(cols) < ROW_FORM_MIN:
        return None
    j = sp.Symbol("j", integer=True, nonnegative=True)
    at_column = {v: j - int(kw) * w}

    def moved(e):
        out = e.xreplace(at_column).replace(lambda x: isinstance(x, sp.Indexed),
                                            lambda x: x.base[tuple(sp.expand(i) for i in x.indices)])
        return out if not any(w in sp.sympify(i).free_symbols for x in out.atoms(sp.Indexed) for i in x.indices) else None

    value = moved(step.value)
    pre = [(moved(t), moved(e)) for t, e in step.pre]
    if value is None or value.has(w) or any(t is None or e is None or e.has(w) for t, e in pre):
        return None
    return j, int(cols), value, pre


def _row_scan(step: WindowArgmax, printer: NumbaPrinter, j, cols: int, value, pre) -> list[str]:
    """A row of max-pool windows in two passes: down each column of the row (the kh entries
    of column j, contiguous in j: LLVM vectorises it), then across the kw column maxima of
    each window.  The same arg-max as window_scan: the first maximum in row-major order (the
    column pass keeps its first row on ties; the row pass takes a later column only if it
    is larger, or as large and earlier in row-major order), NaN never taken, a window of
    -inf and NaN at position 0, and Σ 0·val added to the maximum.  Measured on the wide
    CNN's first pool (128 × 32 × 26 × 26, float32, alone): 1.1 ms against 2.0-2.4 for the
    window-at-a-time scan, which LLVM left scalar."""
    (u, kh), (v, kw) = step.window
    kh, kw = int(kh), int(kw)
    w, wo = step.ranges[-1]
    keep = step.max_target is not None
    width = str(cols)  # (the row's columns, wo·kw, a number: see _row_form)
    dtype = "np.float32" if printer.dtype == "float32" else "np.float64"
    out = [f"col_best = empty({width}, {dtype})", f"col_arg = empty({width}, {dtype})"]
    out += [f"col_poison = empty({width}, {dtype})"] if keep else []
    indent = ""
    for idx, extent in step.ranges[:-1]:
        out.append(f"{indent}for {idx} in range({extent_text(printer, extent)}):")
        indent += "    "
    printer.names[j] = "j"
    body = [f"for j in range({width}):"]
    body += ["    cb = NEG_INF", "    cu = ZERO"] + (["    cp = ZERO"] if keep else [])
    for row in range(kh):
        body += window_entry(pre, value, {u: sp.Integer(row)}, printer, "    ", "cp" if keep else None)
        body += ["    c = val > cb", "    cb = val if c else cb", f"    cu = {printer._print(sp.Integer(row * kw))} if c else cu"]
    body += ["    col_best[j] = cb", "    col_arg[j] = cu"] + (["    col_poison[j] = cp"] if keep else [])
    body += [f"for {w} in range({extent_text(printer, wo)}):", f"    best = col_best[{kw}*{w}]", f"    arg = col_arg[{kw}*{w}]"]
    body += [f"    poison = col_poison[{kw}*{w}]"] if keep else []
    for col in range(1, kw):
        body += [f"    m = col_best[{kw}*{w} + {col}]", f"    a = col_arg[{kw}*{w} + {col}] + {printer._print(sp.Integer(col))}",
                 "    c = (m > best) | ((m == best) & (a < arg))", "    best = m if c else best", "    arg = a if c else arg"]
        body += [f"    poison += col_poison[{kw}*{w} + {col}]"] if keep else []
    body += [f"    {printer._print(step.target)} = arg"]
    body += [f"    {printer._print(step.max_target)} = best + poison"] if keep else []
    return out + [indent + line for line in body]


