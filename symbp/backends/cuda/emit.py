"""CUDA backend: prints the lowered steps as ``numba.cuda`` kernels and the host lines that
launch them.

The same two tables as :mod:`symbp.backends.cpu`, one entry per op: ``SCALAR_OPS`` (shared
with the CPU: ``math`` functions exist on the device too) with the device versions of the
helpers in ``_HELPERS``, and ``emit`` (a ``functools.singledispatch``) turning each IR step
into one kernel, registered with the printer, and the host lines that launch it:

============  ================================================================================
Loop          one elementwise kernel over the flattened index space, a grid-stride loop; the
              statements fused, CSE-named, loop invariants computed once per thread; running
              sums (the l2 penalty) reduced in shared memory, one atomic add per block
RowLoop       one thread per sample: its reductions (a stable log-sum-exp) and its row of δ_L;
              Σ_n ℓ_n and the hit count reduced per block, one atomic add each
ColSum        a block per ``COLS`` columns, its threads splitting the rows; combined in shared
              memory in a fixed order (the same bias gradient every run)
Gemm          a shared-memory tiled kernel (``TILE``×``TILE`` outputs per block, ``MICRO``×
              ``MICRO`` per thread, ``TILE_K`` deep), one per transposition pattern; or
              cuBLAS through CuPy when the module is generated with ``gemm="cublas"``
BlockGemm     the same tiled kernel over the samples of a batch (im2col convolution): the
              grid's z axis strides over them, or, for a weight gradient, every block sums
              them in order
Nest          one thread per output entry, each Sum a per-thread accumulator over loops whose
              bounds the Sum's guard tightens; a scatter (``+=`` at computed indices: col2im,
              a pooling layer's δ) is inverted into a gather, so no two threads write one entry
WindowArgmax  one thread per output entry scanning its window; the first maximum wins
============  ================================================================================

Kernels never synchronise with the host.  Scalars a step produces (loss, hits, penalty) go
to a float64 device array ``stats``; kernels that write parameters or optimizer state during
training take the epoch's status array and do nothing once a batch's loss was not finite.
The launch geometry (``THREADS``, ``TILE``, …) is a set of constants of the generated module,
chosen by the generator (:class:`symbp.backends.cuda.module.CudaConfig`).
"""

from __future__ import annotations

import functools
import textwrap

import sympy as sp

from ...indices import N, n
from ...lower.ir import BlockGemm, ColSum, Gemm, Loop, Nest, RowLoop, WindowArgmax
from ..common import (
    HELPER_DECORATOR,
    SCALAR_OPS,
    NumbaPrinter,
    bind_statements,
    cse_lines,
    hoist_invariants,
    loop_lines,
    nest_statements,
    row_reduction_lines,
    store_lines,
    window_scan,
)
from ..common import HELPERS as _CPU_HELPERS
from ..common import helper_source as _helper_source

#: The slots of the ``stats`` device array; a running sum in a step must name one of them.
STAT_SLOTS = ("total", "correct", "penalty")

# Device versions of the CPU helpers: the same text under a device decorator (tanh32 is
# the CPU's float32 stand-in for math.tanh, which the device has natively).
_HELPERS = {name: text.replace(HELPER_DECORATOR, '@cuda.jit(device=True, inline="always")')
            for name, text in _CPU_HELPERS.items() if name != "tanh32"}

#: Shared by every kernel with running sums; printed once into each module.
BLOCK_REDUCE = '''
@cuda.jit(device=True, inline="always")
def block_reduce(red):
    """Sum each row of the shared array ``red`` (one column per thread) into ``red[:, 0]``.

    A tree over THREADS (a power of two) entries; every thread of the block must call it.
    """
    tid = cuda.threadIdx.x
    step = THREADS // 2
    cuda.syncthreads()
    while step > 0:
        if tid < step:
            for r in range(red.shape[0]):
                red[r, tid] += red[r, tid + step]
        cuda.syncthreads()
        step //= 2
'''


class CudaPrinter(NumbaPrinter):
    """SymPy → scalar code inside a ``numba.cuda`` kernel.

    Besides the CPU printer's state it holds ``shapes`` (array label → symbolic shape, for
    the GEMM sizes), ``guarded`` (code names of the arrays that only change when the batch's
    loss is finite: parameters and optimizer state), the ``stage`` that prefixes kernel
    names, and ``kernels``, the module's :class:`Kernels`.
    """

    def __init__(self, dtype: str, names: dict, stage: str, kernels: Kernels, shapes: dict, guarded=(),
                 gemm_backend: str = "kernel", settings=None) -> None:
        super().__init__(dtype, names, settings)
        self.stage = stage
        self.kernels = kernels
        self.shapes = shapes
        self.guarded = set(guarded)
        self.gemm_backend = gemm_backend

    @property
    def float_type(self) -> str:
        return "float32" if self.dtype == "float32" else "float64"

    target = "CUDA"
    helpers = _HELPERS

    def function_name(self, func) -> str | None:
        return SCALAR_OPS.get(func)  # libdevice's tanh is fast: no float32 stand-ins here

    def _print_tanh(self, expr):
        return f"math.tanh({self._print(expr.args[0])})"  # tanhf / tanh from libdevice

    def _print_Relational(self, expr):
        # Index arithmetic stays in integers (2*h + u >= 1), never promoted to the float type.
        if all(side.is_integer and not side.atoms(sp.Indexed) for side in (expr.lhs, expr.rhs)):
            return f"{expr.lhs} {expr.rel_op} {expr.rhs}"
        return super()._print_Relational(expr)

    def _print_route(self, expr):
        # route(m, j): the stored arg-max m (a float buffer) compared in the float type.
        m, j = expr.args
        return f"(ONE if {self._print(m)} == FT({j}) else ZERO)"

    # -- kernel arguments --------------------------------------------------------------
    def array_type(self, rank: int, dtype: str | None = None) -> str:
        return f"{dtype or self.float_type}[{', '.join([':'] * (rank - 1) + ['::1'])}]"

    def operands(self, exprs, local: set) -> tuple[dict, dict]:
        """The arrays (code name → numba type) and scalars (code name → type) that
        ``exprs`` read or write, leaving out ``local`` symbols (indices, accumulators)."""
        arrays, scalars = {}, {}
        for e in exprs:
            inner = set()
            for ix in e.atoms(sp.Indexed):
                shape = self.flat.get(str(ix.base.label)) if hasattr(self, "flat") else None
                flat = shape is not None and len(ix.indices) == len(shape) + 1  # (batch, C·H·W)
                arrays[self.array(ix.base)] = self.array_type(2 if flat else len(ix.indices))
                inner |= ix.free_symbols
            for s in e.free_symbols - inner - local:
                if s == N:
                    scalars["nbf"] = self.float_type
                elif s.is_integer:
                    scalars[self._print(s)] = "int64"
                else:
                    scalars[self._print(s)] = self.float_type
        return arrays, scalars

    def kernel(self, name: str, params: list[tuple[str, str]], doc: str, body: list[str]) -> str:
        """Register a kernel under a fresh name based on ``name``; returns that name."""
        name = self.kernels.fresh(name)
        code = ["@cuda.jit(cache=True)", f"def {name}({', '.join(p for p, _ in params)}):", f'    """{doc}"""']
        code += ["    " + line if line else "" for line in body]
        self.kernels.add(name, "\n".join(code) + "\n", f"void({', '.join(t for _, t in params)})")
        return name


class Kernels:
    """The kernels of one generated module: name → source and name → signature (the
    argument types a PTX compile needs); ``reserved`` names are taken by the module."""

    def __init__(self, reserved=()) -> None:
        self.sources: dict[str, str] = {}
        self.signatures: dict[str, str] = {}
        self.reserved = set(reserved)

    def fresh(self, name: str) -> str:
        candidate, k = name, 2
        while candidate in self.sources or candidate in self.reserved:
            candidate, k = f"{name}_{k}", k + 1
        return candidate

    def add(self, name: str, source: str, signature: str) -> None:
        self.sources[name] = source
        self.signatures[name] = signature


def helper_source(names: set[str]) -> str:
    return _helper_source(names, _HELPERS)


def _extent(printer: CudaPrinter, extent) -> str:
    """A bound: the batch size (nb), a width constant (d1) or a number."""
    return printer.extents.get(extent, str(extent))


def _statements_doc(pairs) -> str:
    """``target = expr`` per line; a running sum's target is written ``acc +``, giving ``acc += expr``."""
    return "\n    ".join(f"{target}{'=' if str(target).endswith('+') else ' ='} {expr}" for target, expr in pairs)


def _guard(printer: CudaPrinter, written: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """For a kernel writing parameters or optimizer state during training: the status
    argument and the early return once a batch's loss was not finite (uniform over the grid,
    so no thread is left waiting at a barrier)."""
    if not written & printer.guarded:
        return [], []
    return [("epoch", "float64[::1]")], ["if epoch[E_BAD] >= 0:  # a batch's loss was not finite: keep θ", "    return"]


def _reduce_lines(accs: list[str]) -> list[str]:
    """After the grid-stride loop: the block's sums of the thread-local ``accs`` go to stats."""
    tid = "cuda.threadIdx.x"
    lines = [f"red[{r}, {tid}] = {acc}" for r, acc in enumerate(accs)] + ["block_reduce(red)", f"if {tid} == 0:"]
    return lines + [f"    cuda.atomic.add(stats, S_{acc.upper()}, red[{r}, 0])" for r, acc in enumerate(accs)]


def _stat_name(symbol: sp.Symbol) -> str:
    if symbol.name not in STAT_SLOTS:
        raise NotImplementedError(f"the CUDA backend has no stats slot for the running sum {symbol.name!r}")
    return symbol.name


def _flat_loop(ranges: list, printer: CudaPrinter) -> tuple[str, list[str]]:
    """A grid-stride loop over the product of ``ranges`` and the lines recovering each index
    (the last index varies fastest, so neighbouring threads touch neighbouring addresses)."""
    extents = [_extent(printer, e) for _, e in ranges]
    if len(ranges) == 1:
        return f"for {ranges[0][0]} in range(cuda.grid(1), {extents[0]}, cuda.gridsize(1)):", []
    lines = []
    for pos, (idx, _) in enumerate(ranges):
        inner = extents[pos + 1:]
        stride = inner[0] if len(inner) == 1 else f"({' * '.join(inner)})"
        if pos == 0:
            lines.append(f"{idx} = flat // {stride}")
        elif not inner:
            lines.append(f"{idx} = flat % {extents[pos]}")
        else:
            lines.append(f"{idx} = flat // {stride} % {extents[pos]}")
    return f"for flat in range(cuda.grid(1), {' * '.join(extents)}, cuda.gridsize(1)):", lines


@functools.singledispatch
def emit(step, printer: CudaPrinter) -> list[str]:
    raise NotImplementedError(f"the CUDA backend has no emitter for {type(step).__name__}")


def _launch_args(params: list[tuple[str, str]]) -> str:
    return ", ".join(p for p, _ in params)


@emit.register
def _(step: Loop, printer: CudaPrinter) -> list[str]:
    # As on the CPU (see bind_statements): memory is read as it was when the step began, a
    # later statement reads an earlier target's new value through its local.
    if step.adds:  # (the CPU printer's fused loops; a thread per entry would need atomic adds)
        raise NotImplementedError("the CUDA backend does not print fused loops with sums over the batch")
    stored = bind_statements(step.stmts)
    indices = {idx for idx, _ in step.ranges}
    accs = [_stat_name(acc) for acc, _ in step.sums]
    exprs = [e for _, e in step.sums] + [e for _, e in stored]
    arrays, scalars = printer.operands([t for t, _ in stored] + exprs, indices)
    written = [printer.array(t.base) for t, _ in stored]
    guard_params, guard = _guard(printer, set(written))
    sizes = [("nb", "int64")] if any(e == N for _, e in step.ranges) else []
    params = (guard_params + sizes + sorted(arrays.items()) + sorted(scalars.items())
              + ([("stats", "float64[::1]")] if accs else []))
    # The kernel is named after what it updates (a parameter), else what it writes first,
    # else what its sum reads (the penalty of W1).
    updated = [w for w in written if w in printer.guarded]
    if updated:
        name = f"update_{updated[-1]}"
    elif written:
        name = f"{printer.stage}_{written[0]}"
    else:
        name = f"{accs[0]}_{min(arrays, default='sum')}"
    doc = "One thread per index, striding over the grid:\n    " + _statements_doc(
        [(f"{acc} +", e) for acc, (_, e) in zip(accs, step.sums)] + stored)
    printer.counter = 0
    hoisted, exprs = hoist_invariants(exprs, indices, printer)
    temps, printed, reduced = cse_lines(printer, exprs)
    header, recover = _flat_loop(step.ranges, printer)
    body = list(guard)
    if accs:
        body.append(f"red = cuda.shared.array(({len(accs)}, THREADS), np.float64)")
    body += hoisted + [f"{acc} = 0.0" for acc in accs] + [header]
    inner = recover + temps
    inner += [f"{acc} += {text}" for acc, text in zip(accs, printed)]
    inner += store_lines(printer, stored, printed[len(accs):], reduced[len(accs):])
    body += ["    " + line for line in inner]
    if accs:
        body += _reduce_lines(accs)
    name = printer.kernel(name, params, doc, body)
    count = " * ".join(_extent(printer, e) for _, e in step.ranges)
    return [f"{name}[blocks({count}), THREADS]({_launch_args(params)})"]


@emit.register
def _(step: RowLoop, printer: CudaPrinter) -> list[str]:
    row, col = step.row, step.col
    local = {row, col} | {r[0] for r in step.reductions} | {r[3] for r in step.reductions}
    local |= {acc for acc, _ in step.row_sums}
    exprs = [r[2] for r in step.reductions] + [e for _, e in step.row_sums] + [t for t, _ in step.stmts]
    arrays, scalars = printer.operands(exprs + [e for _, e in step.stmts], local)
    accs = [_stat_name(acc) for acc, _ in step.row_sums]
    for match in (step.argmax_match, step.threshold_match):
        if match is not None:
            accs.append("correct")
            arrays.update({printer.array(b): printer.array_type(2) for b in match})
    params = [("nb", "int64")] + sorted(arrays.items()) + sorted(scalars.items()) + [("stats", "float64[::1]")]
    cols = _extent(printer, step.cols)
    body = row_reduction_lines(step, printer, "NEG_INF")
    if step.argmax_match is not None:
        # np.argmax's rule: the first maximum wins.
        y, t = (printer.array(b) for b in step.argmax_match)
        body += ["best_y = 0", "best_t = 0", f"for {col} in range(1, {cols}):",
                 f"    if {y}[{row}, {col}] > {y}[{row}, best_y]:", f"        best_y = {col}",
                 f"    if {t}[{row}, {col}] > {t}[{row}, best_t]:", f"        best_t = {col}",
                 "if best_y == best_t:", "    correct += 1.0"]
    if step.threshold_match is not None:
        # Binary outputs: a unit is right when logit > 0 agrees with target > 1/2.
        y, t = (printer.array(b) for b in step.threshold_match)
        body += [f"for {col} in range({cols}):",
                 f"    if ({y}[{row}, {col}] > ZERO) == ({t}[{row}, {col}] > HALF):", "        correct += 1.0"]
    # The row's units, one after another inside the thread (hoisting and CSE as on the CPU).
    printer.counter = 0
    body += loop_lines(Loop([(col, step.cols)], step.stmts), printer)
    lines = [f"red = cuda.shared.array(({len(accs)}, THREADS), np.float64)"] + [f"{acc} = 0.0" for acc in accs]
    lines += [f"for {row} in range(cuda.grid(1), nb, cuda.gridsize(1)):"]
    lines += textwrap.indent("\n".join(body), "    ").split("\n") + _reduce_lines(accs)
    doc = ("One thread per sample n: its reductions (log-sum-exp shifted by the row's max), ℓ_n and its\n"
           "    row of δ; Σ_n ℓ_n and the hits go to stats:\n    "
           + _statements_doc([(f"{acc} +", e) for acc, e in step.row_sums] + list(step.stmts)))
    written = [printer.array(t.base) for t, _ in step.stmts]
    name = printer.kernel(f"{printer.stage}_{written[0] if written else 'rows'}", params, doc, lines)
    return [f"{name}[blocks({_extent(printer, step.rows)}), THREADS]({_launch_args(params)})"]


@emit.register
def _(step: ColSum, printer: CudaPrinter) -> list[str]:
    out, src = printer.array(step.out), printer.array(step.src)
    cols = _extent(printer, step.cols)
    params = [("nb", "int64"), (src, printer.array_type(2)), (out, printer.array_type(1))]
    body = [
        "part = cuda.shared.array((ROW_GROUPS, COLS), FT)",
        "lane = cuda.threadIdx.x % COLS",
        "group = cuda.threadIdx.x // COLS",
        f"for p0 in range(cuda.blockIdx.x * COLS, {cols}, cuda.gridDim.x * COLS):",
        "    p = p0 + lane",
        "    s = ZERO",
        f"    if p < {cols}:",
        "        for n in range(group, nb, ROW_GROUPS):",
        f"            s += {src}[n, p]",
        "    part[group, lane] = s",
        "    cuda.syncthreads()",
        f"    if group == 0 and p < {cols}:",
        "        for g in range(1, ROW_GROUPS):",
        "            s += part[g, lane]",
        f"        {out}[p] = s",
        "    cuda.syncthreads()",
    ]
    doc = (f"{out}[p] = Σ_n {src}[n, p]: a block per COLS columns, its ROW_GROUPS groups of threads\n"
           "    summing strided rows, then combined in shared memory in a fixed order.")
    name = printer.kernel(f"colsum_{out}", params, doc, body)
    return [f"{name}[col_blocks({cols}), THREADS]({_launch_args(params)})"]


def _check_grid_y(printer: CudaPrinter, cols, formula, what: str) -> None:
    """A GEMM's columns (never the batch) lie on the grid's y axis, which CUDA caps at
    65535 blocks: a GEMM beyond it is refused when generated, not at launch."""
    if hasattr(cols, "subs"):
        cols = cols.subs(getattr(printer, "sizes", {}))
    try:
        cols = int(cols)
    except TypeError:
        return  # still symbolic: not a size this network fixes
    tile = getattr(printer, "tile", 1)
    if -(-cols // tile) > 65535:
        raise ValueError(f"the CUDA target cannot launch the {what} of {formula}: its {cols} columns "
                         f"need {-(-cols // tile)} blocks of TILE = {tile} along the grid's y axis; CUDA allows 65535 "
                         "(generate with a larger CudaConfig(tile=...))")


@emit.register
def _(step: Gemm, printer: CudaPrinter) -> list[str]:
    a, b, out = printer.array(step.a), printer.array(step.b), printer.array(step.out)
    try:
        shape_a, shape_b = printer.shapes[str(step.a.label)], printer.shapes[str(step.b.label)]
    except KeyError as err:
        raise NotImplementedError(f"the CUDA backend does not know the shape of {err.args[0]} (in {step.formula})") from None
    m, k = shape_a[::-1] if step.ta else shape_a
    n = shape_b[0] if step.tb else shape_b[1]
    if printer.gemm_backend != "cublas":
        _check_grid_y(printer, n, step.formula, "GEMM")
    m, n, k = (_extent(printer, e) for e in (m, n, k))
    alpha, beta = (printer.doprint(v) if v in (0, 1) else f"FT({printer.doprint(v)})" for v in (step.alpha, step.beta))
    guarded = out in printer.guarded
    product = f"{a}{'ᵀ' if step.ta else ''}·{b}{'ᵀ' if step.tb else ''}"
    scaled = product if step.alpha == 1 else f"({step.alpha})·{product}"
    kept = "" if step.beta == 0 else f"({step.beta})·{out} + "
    comment = f"# {out} ← {kept}{scaled}, from {step.formula}"
    operands = f"{m}, {n}, {k}, {a}, {b}, {out}, {alpha}, {beta}"
    if printer.gemm_backend == "cublas":
        return [comment, f"gemm({step.ta}, {step.tb}, {'epoch' if guarded else 'None'}, {operands})"]
    name = f"gemm_{'t' if step.ta else 'n'}{'t' if step.tb else 'n'}" + ("_guarded" if guarded else "")
    if name not in printer.kernels.sources:
        printer.kernels.add(name, gemm_source(name, step.ta, step.tb, guarded), gemm_signature(printer, guarded))
    return [comment, f"{name}[gemm_blocks({m}, {n}), GEMM_THREADS]({'epoch, ' if guarded else ''}{operands})"]


def gemm_signature(printer: CudaPrinter, guarded: bool) -> str:
    arr, ft = printer.array_type(2), printer.float_type
    return f"void({'float64[::1], ' if guarded else ''}int64, int64, int64, {arr}, {arr}, {arr}, {ft}, {ft})"


def gemm_source(name: str, ta: bool, tb: bool, guarded: bool) -> str:
    """The tiled GEMM kernel for one transposition pattern.

    Tiles are loaded so that consecutive threads read consecutive addresses of the stored
    matrix, whichever way it is transposed; the shared tiles have a padding column so that
    those stores do not collide in one memory bank.
    """
    op_a, op_b = ("Aᵀ" if ta else "A"), ("Bᵀ" if tb else "B")
    return f'''@cuda.jit(cache=True)
def {name}({"epoch, " if guarded else ""}M, N, K, A, B, C, alpha, beta):
    """C[:M, :N] ← alpha·{op_a}·{op_b} + beta·C, op({op_a[0]}) being M×K; C is read only when beta ≠ 0.

    A block computes a TILE×TILE tile of C, each of its GEMM_THREADS threads MICRO×MICRO
    entries of it (rows ty + i·SPAN, columns tx + j·SPAN: neighbouring threads, neighbouring
    columns), sweeping K in steps of TILE_K through shared memory.
    """
{_gemm_guard(guarded)}{_GEMM_SETUP}{_gemm_zero("    ")}{_gemm_sweep(ta, tb, "", "", "    ")}{_gemm_store("", "    ")}'''


def block_gemm_source(name: str, ta: bool, tb: bool, guarded: bool, accumulate: bool) -> str:
    """The tiled GEMM of :func:`gemm_source` over the samples of a batch (a :class:`BlockGemm`).

    A, B, C are (samples, rows, cols) views; sample m reads A[m·sa] and B[m·sb] (sa, sb = 0:
    one matrix for every sample, as a weight is).  Per sample (``accumulate`` False) the
    grid's z axis strides over the samples, C[m] ← alpha·op(A[m·sa])·op(B[m·sb]) + beta·C[m];
    summed, C[0] ← alpha·Σ_m op(A[m·sa])·op(B[m·sb]) + beta·C[0], each block sweeping every
    sample in order (no atomics: the same sum every run).
    """
    op_a, op_b = ("A[m·sa]ᵀ" if ta else "A[m·sa]"), ("B[m·sb]ᵀ" if tb else "B[m·sb]")
    args = f"{'epoch, ' if guarded else ''}nb, M, N, K, sa, sb, A, B, C, alpha, beta"
    pick = "    ia = m * sa\n    ib = m * sb\n"
    if accumulate:
        what = f"C[0, :M, :N] ← alpha·Σ_(m < nb) {op_a}·{op_b} + beta·C[0]"
        body = (_gemm_zero("    ") + "    for m in range(nb):\n" + textwrap.indent(pick, "    ")
                + _gemm_sweep(ta, tb, "ia, ", "ib, ", "        ") + _gemm_store("0, ", "    "))
    else:
        what = f"C[m, :M, :N] ← alpha·{op_a}·{op_b} + beta·C[m] for every sample m < nb"
        body = ("    for m in range(cuda.blockIdx.z, nb, cuda.gridDim.z):\n" + textwrap.indent(pick, "    ")
                + _gemm_zero("        ")
                + _gemm_sweep(ta, tb, "ia, ", "ib, ", "        ") + _gemm_store("m, ", "        "))
    return f'''@cuda.jit(cache=True)
def {name}({args}):
    """{what}; C is read only when beta ≠ 0.

    Tiles as in the plain GEMM kernels (TILE×TILE of C per block, MICRO×MICRO per thread,
    K swept TILE_K at a time through shared memory).
    """
{_gemm_guard(guarded)}{_GEMM_SETUP}{body}'''


def _gemm_guard(guarded: bool) -> str:
    return "    if epoch[E_BAD] >= 0:  # a batch's loss was not finite: keep θ\n        return\n" if guarded else ""


_GEMM_SETUP = """    sA = cuda.shared.array((TILE_K, TILE_PAD), FT)  # sA[s, r] = op(A)[r0 + r, k0 + s]
    sB = cuda.shared.array((TILE_K, TILE_PAD), FT)  # sB[s, c] = op(B)[k0 + s, c0 + c]
    acc = cuda.local.array((MICRO, MICRO), FT)
    a = cuda.local.array(MICRO, FT)
    b = cuda.local.array(MICRO, FT)
    tid = cuda.threadIdx.x
    ty = tid // SPAN
    tx = tid % SPAN
    r0 = cuda.blockIdx.x * TILE
    c0 = cuda.blockIdx.y * TILE
"""


def _gemm_zero(indent: str) -> str:
    return textwrap.indent("for i in range(MICRO):\n    for j in range(MICRO):\n        acc[i, j] = ZERO\n", indent)


def _gemm_sweep(ta: bool, tb: bool, at_a: str, at_b: str, indent: str) -> str:
    """The sweep over K into ``acc``; ``at_a``/``at_b`` prefix the operands' indices (a sample)."""
    # op(A)[r, s] for r < TILE, s < TILE_K, and op(B)[s, c]: e runs along the stored rows.
    if ta:
        load_a = ["s = e // TILE", "r = e % TILE", f"sA[s, r] = A[{at_a}k0 + s, r0 + r] if k0 + s < K and r0 + r < M else ZERO"]
    else:
        load_a = ["r = e // TILE_K", "s = e % TILE_K",
                  f"sA[s, r] = A[{at_a}r0 + r, k0 + s] if r0 + r < M and k0 + s < K else ZERO"]
    if tb:
        load_b = ["c = e // TILE_K", "s = e % TILE_K",
                  f"sB[s, c] = B[{at_b}c0 + c, k0 + s] if c0 + c < N and k0 + s < K else ZERO"]
    else:
        load_b = ["s = e // TILE", "c = e % TILE", f"sB[s, c] = B[{at_b}k0 + s, c0 + c] if k0 + s < K and c0 + c < N else ZERO"]
    load_a, load_b = ("\n        ".join(lines) for lines in (load_a, load_b))
    return textwrap.indent(f"""for k0 in range(0, K, TILE_K):
    for e in range(tid, TILE * TILE_K, GEMM_THREADS):
        {load_a}
    for e in range(tid, TILE * TILE_K, GEMM_THREADS):
        {load_b}
    cuda.syncthreads()
    for s in range(TILE_K):
        for i in range(MICRO):
            a[i] = sA[s, ty + i * SPAN]
        for j in range(MICRO):
            b[j] = sB[s, tx + j * SPAN]
        for i in range(MICRO):
            for j in range(MICRO):
                acc[i, j] += a[i] * b[j]
    cuda.syncthreads()
""", indent)


def _gemm_store(at_c: str, indent: str) -> str:
    return textwrap.indent(f"""for i in range(MICRO):
    r = r0 + ty + i * SPAN
    for j in range(MICRO):
        c = c0 + tx + j * SPAN
        if r < M and c < N:
            if beta == ZERO:
                C[{at_c}r, c] = alpha * acc[i, j]
            else:
                C[{at_c}r, c] = alpha * acc[i, j] + beta * C[{at_c}r, c]
""", indent)


# -- cuBLAS through CuPy (optional) ----------------------------------------------------------
def cublas_gemm(ta: bool, tb: bool, M: int, N: int, K: int, A, B, C, alpha, beta, scalars=None) -> None:
    """C[:M, :N] ← alpha·op(A)·op(B) + beta·C with cuBLAS (CuPy), on numba device arrays.

    cuBLAS is column-major, where a C-ordered matrix is its own transpose, so this computes
    Cᵀ = op(B)ᵀ·op(A)ᵀ, as :mod:`symbp.backends.cpu.blas` does on the CPU.  ``scalars``, a device
    array (alpha, beta), switches cuBLAS to read them from the device (the guarded update
    sets them there).  Not exercised without a GPU: CuPy needs a real device.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    handle = cupy.cuda.device.get_cublas_handle()
    fn = cublas.sgemm if C.dtype.itemsize == 4 else cublas.dgemm
    ptr = lambda arr: arr.__cuda_array_interface__["data"][0]  # noqa: E731
    op = lambda t: cublas.CUBLAS_OP_T if t else cublas.CUBLAS_OP_N  # noqa: E731
    mode = cublas.getPointerMode(handle)
    if scalars is None:
        import numpy as np

        host = np.array([alpha, beta], C.dtype)
        a_ptr, b_ptr = host.ctypes.data, host.ctypes.data + host.itemsize
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    else:
        a_ptr, b_ptr = ptr(scalars), ptr(scalars) + scalars.dtype.itemsize
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_DEVICE)
    try:
        fn(handle, op(tb), op(ta), N, M, K, a_ptr, ptr(B), B.shape[1], ptr(A), A.shape[1], b_ptr, ptr(C), C.shape[1])
    finally:
        cublas.setPointerMode(handle, mode)



# -- loop nests for index formulas of any shape (image layers) ------------------------------


def _nest_operands(printer: CudaPrinter, exprs: list, local: set) -> tuple[dict, dict, bool]:
    """:meth:`CudaPrinter.operands` of expressions that may hold Sums (their dummies are
    local); the flag says whether a Sum runs over the batch (its bound needs ``nb``)."""
    plain, uses_nb, local = [], False, set(local)
    for e in exprs:
        for s_ in e.atoms(sp.Sum):
            for sym, lo, hi in s_.limits:
                local.add(sym)
                uses_nb |= N in lo.free_symbols | hi.free_symbols
        plain.append(e.replace(lambda x: isinstance(x, sp.Sum), lambda x: x.function))
    arrays, scalars = printer.operands(plain, local)
    return arrays, scalars, uses_nb


def _gather(step: Nest) -> Nest | None:
    """An accumulating scatter ``t[f(idx)] += e`` (col2im, a pooling layer's δ) as a gather
    that one thread per entry of ``t`` can run without races: each index of ``t`` that is
    ``c·x + rest`` with c = ±1 gives x = (o − rest)/c for a new output index o; the other
    loop indices are summed, under the guard 0 ≤ x < extent (which :func:`_sum_loops`
    turns into tight bounds).  None when ``t``'s indices do not have that form."""
    if len(step.stmts) != 1:
        return None
    target, expr = step.stmts[0]
    extent, order = dict(step.ranges), [idx for idx, _ in step.ranges]
    tidx = [sp.expand(i) for i in target.indices]
    out, solved, conds = [], {}, []
    for pos, e in enumerate(tidx):
        others = set().union(set(), *(o.free_symbols for k, o in enumerate(tidx) if k != pos))
        if e in extent and e not in others:
            out.append((e, extent[e]))
            continue
        syms = e.free_symbols
        if not syms <= set(extent) or syms & others or not all(isinstance(extent[x], (int, sp.Integer)) for x in syms):
            return None
        coeff = {x: e.coeff(x) for x in syms}
        const = sp.expand(e - sum(c_ * x for x, c_ in coeff.items()))
        if not const.is_Integer or not all(c_.is_Integer for c_ in coeff.values()):
            return None
        picks = [x for x in reversed(order) if x in syms and abs(coeff[x]) == 1]
        if not picks:
            return None
        x = max(picks, key=lambda x_: extent[x_])  # the longer range solved, the shorter one summed
        o = sp.Symbol(f"o{pos}", integer=True, nonnegative=True)
        solved[x] = sp.expand((o - (e - coeff[x] * x)) / coeff[x])
        lo = const + sum(min(0, c_ * (extent[y] - 1)) for y, c_ in coeff.items())
        hi = const + sum(max(0, c_ * (extent[y] - 1)) for y, c_ in coeff.items())
        if lo < 0:
            return None
        out.append((o, int(hi) + 1))
        conds += [sp.GreaterThan(solved[x], 0), sp.LessThan(solved[x], extent[x] - 1)]
    free = {idx for idx, _ in out}
    summed = [(x, 0, extent[x] - 1) for x in order if x not in solved and x not in free]
    body = expr.xreplace(solved)
    if conds:
        body = sp.Piecewise((body, sp.And(*conds)), (0, True))
    if summed:
        body = sp.Sum(body, *summed)
    new = target.base[tuple(idx for idx, _ in out)]
    return Nest(out, [(new, new + body)], step.sum_ranges)


def _scatter_in_order(step: Nest, printer: CudaPrinter) -> list[str]:
    """An accumulating scatter that :func:`_gather` cannot invert: one thread per value of
    the loop indices that index the target alone (no two threads meet), the other loops run
    inside the thread in the CPU's order."""
    targets = [t for t, _ in step.stmts]
    alone = [idx for idx, _ in step.ranges
             if all(sum(ix == idx for ix in t.indices) == 1
                    and not any(ix != idx and idx in ix.free_symbols for ix in t.indices) for t in targets)]
    parallel = [(idx, ext) for idx, ext in step.ranges if idx in alone] or [(sp.Symbol("one"), 1)]
    serial = [(idx, ext) for idx, ext in step.ranges if idx not in alone]
    indices = {idx for idx, _ in step.ranges}
    arrays, scalars, uses_nb = _nest_operands(printer, targets + [e for _, e in step.stmts], indices)
    written = [printer.array(t.base) for t in targets]
    guard_params, guard = _guard(printer, set(written))
    sizes = [("nb", "int64")] if uses_nb or any(e == N for _, e in step.ranges) else []
    params = guard_params + sizes + sorted(arrays.items()) + sorted(scalars.items())
    header, recover = _flat_loop(parallel, printer)
    inner, indent = list(recover), ""
    for idx, ext in serial:
        inner.append(f"{indent}for {idx} in range({_extent(printer, ext)}):")
        indent += "    "
    inner += [f"{indent}{printer._print(t)} += {printer.doprint(e)}" for t, e in step.stmts]
    doc = ("One thread per value of the indices that address the target alone, the rest in order:\n    "
           + _statements_doc([(f"{t} +", e) for t, e in step.stmts]))
    name = printer.kernel(f"{printer.stage}_{written[0]}", params, doc, guard + [header] + ["    " + x for x in inner])
    count = " * ".join(_extent(printer, e) for _, e in parallel)
    return [f"{name}[blocks({count}), THREADS]({_launch_args(params)})"]


def _batch_sum(step: Nest) -> sp.Sum | None:
    """The Sum of a Nest that reduces over the batch into a few entries (a bias or a directly
    looped weight gradient: no ``n`` among the outputs, ``n`` summed, fixed bounds), or None."""
    if step.accumulate or len(step.stmts) != 1 or any(e == N or isinstance(e, sp.Basic) and e.has(N)
                                                       for _, e in step.ranges):
        return None
    sums = step.stmts[0][1].atoms(sp.Sum)
    if len(sums) != 1:
        return None
    (s_,) = sums
    outputs = {idx for idx, _ in step.ranges}
    bounds_fixed = all(not ((lo.free_symbols | hi.free_symbols) - {N}) for _, lo, hi in s_.limits)
    if not bounds_fixed or n not in {lim[0] for lim in s_.limits} or s_.function.has(sp.Sum) or not _scalars(s_) - {N} <= outputs:
        return None
    return s_


def _scalars(expr: sp.Expr) -> set:
    """The plain symbols ``expr`` reads (indices, sizes, hyperparameters), not array names."""
    labels = {ix.base.label for ix in expr.atoms(sp.Indexed)}
    return {x for x in expr.free_symbols if isinstance(x, sp.Symbol)} - labels


def _block_sum_nest(step: Nest, s_: sp.Sum, printer: CudaPrinter) -> list[str]:
    """A reduction over the batch: one block per output entry, its THREADS threads striding
    over the summed indices (n outermost), the partial sums combined by a tree in a fixed
    order (the same result every run, no atomics)."""
    target, expr = step.stmts[0]
    outputs = {idx for idx, _ in step.ranges}
    arrays, scalars, _ = _nest_operands(printer, [target, expr], outputs)
    written = printer.array(target.base)
    guard_params, guard = _guard(printer, {written})
    params = guard_params + [("nb", "int64")] + sorted(arrays.items()) + sorted(scalars.items())
    limits = sorted(s_.limits, key=lambda lim: str(lim[0]) != "n")
    inner = [(sym, hi - lo + 1) for sym, lo, hi in limits]
    offsets = {sym: lo for sym, lo, _ in limits if lo != 0}
    body = s_.function.xreplace({sym: sym + lo for sym, lo in offsets.items()})
    if isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].expr == 0:
        test = " and ".join(f"({c_})" for c_ in sp.And.make_args(body.args[0].cond))
        term = f"({printer.doprint(body.args[0].expr)} if {test} else ZERO)"
    else:
        term = printer.doprint(body)
    count = " * ".join(_extent(printer, e) for _, e in step.ranges)
    total = sp.Symbol("total_")
    printer.names[total] = "red[0, 0]"
    outer, recover = _flat_loop(step.ranges, printer)
    sweep, sweep_recover = _flat_loop(inner, printer)
    sweep, sweep_recover = sweep.replace("flat", "j_"), [x.replace("flat", "j_") for x in sweep_recover]
    lines = [outer.replace("cuda.grid(1)", "cuda.blockIdx.x").replace("cuda.gridsize(1)", "cuda.gridDim.x")]
    lines += ["    " + x for x in recover + ["part = ZERO",
                                             sweep.replace("cuda.grid(1)", "cuda.threadIdx.x")
                                             .replace("cuda.gridsize(1)", "THREADS")]]
    lines += ["        " + x for x in sweep_recover + [f"part += {term}"]]
    lines += ["    " + x for x in ["red[0, cuda.threadIdx.x] = part", "block_reduce(red)", "if cuda.threadIdx.x == 0:",
                                   f"    {printer._print(target)} = {printer.doprint(expr.xreplace({s_: total}))}",
                                   "cuda.syncthreads()  # red is reused by the next entry"]]
    body_lines = guard + ["red = cuda.shared.array((1, THREADS), FT)"] + lines
    doc = ("One block per output entry, its threads splitting the sum over the batch, combined in a\n"
           "    fixed order:\n    " + _statements_doc(step.stmts))
    name = printer.kernel(f"{printer.stage}_{written}", params, doc, body_lines)
    return [f"{name}[min({count}, MAX_BLOCKS), THREADS]({_launch_args(params)})"]


@emit.register
def _(step: Nest, printer: CudaPrinter) -> list[str]:
    # One thread per output entry; each Sum a per-thread accumulator over loops whose bounds
    # the Sum's guard tightens (as on the CPU).  A scatter (accumulate) runs as a gather; a
    # sum over the batch into a few entries (a bias gradient) takes a block per entry.
    s_ = _batch_sum(step)
    if s_ is not None:
        return _block_sum_nest(step, s_, printer)
    note = ""
    if step.accumulate:
        gathered = _gather(step)
        if gathered is None:
            return _scatter_in_order(step, printer)
        step, note = gathered, " (a scatter, run as a gather: each thread owns its entry)"
    indices = {idx for idx, _ in step.ranges}
    targets, exprs = [t for t, _ in step.stmts], [e for _, e in step.stmts]
    arrays, scalars, uses_nb = _nest_operands(printer, targets + exprs, indices)
    written = [printer.array(t.base) for t in targets]
    guard_params, guard = _guard(printer, set(written))
    sizes = [("nb", "int64")] if uses_nb or any(e == N for _, e in step.ranges) else []
    params = guard_params + sizes + sorted(arrays.items()) + sorted(scalars.items())
    printer.counter = 0
    header, inner = _flat_loop(step.ranges, printer)
    inner += nest_statements(step, printer)  # plain stores: a scatter became a gather above
    doc = f"One thread per output entry{note}, striding over the grid:\n    " + _statements_doc(step.stmts)
    name = printer.kernel(f"{printer.stage}_{written[0]}", params, doc, guard + [header] + ["    " + x for x in inner])
    count = " * ".join(_extent(printer, e) for _, e in step.ranges)
    return [f"{name}[blocks({count}), THREADS]({_launch_args(params)})"]


@emit.register
def _(step: WindowArgmax, printer: CudaPrinter) -> list[str]:
    indices = {idx for idx, _ in step.ranges} | {idx for idx, _ in step.window}
    stores = [step.target] + ([step.max_target] if step.max_target is not None else [])
    arrays, scalars = printer.operands(stores + [step.value], indices)
    written = [printer.array(t.base) for t in stores]
    sizes = [("nb", "int64")] if any(e == N for _, e in step.ranges) else []
    params = sizes + sorted(arrays.items()) + sorted(scalars.items())
    header, inner = _flat_loop(step.ranges, printer)
    inner += window_scan(step, printer, "NEG_INF")
    window = ", ".join(f"{idx} < {ext}" for idx, ext in step.window)
    doc = (f"One thread per output entry: {step.target} = the first position (row-major over {window})\n"
           f"    of the window's maximum of {step.value}.")
    name = printer.kernel(f"{printer.stage}_{written[0]}", params, doc, [header] + ["    " + x for x in inner])
    count = " * ".join(_extent(printer, e) for _, e in step.ranges)
    return [f"{name}[blocks({count}), THREADS]({_launch_args(params)})"]


@emit.register
def _(step: BlockGemm, printer: CudaPrinter) -> list[str]:
    names = [printer.array(x_) for x_ in (step.a, step.b, step.out)]
    (ra, ca), (rb, cb), (ro, co) = ((int(r_), int(c_)) for r_, c_ in step.shapes)
    m, k = (ca, ra) if step.ta else (ra, ca)
    n_ = rb if step.tb else cb
    _check_grid_y(printer, n_, step.formula, "GEMM per sample")
    # (samples, rows, cols) views of the flat buffers; a weight is one matrix for every sample
    views = [f"{x_}.reshape({x_}.shape[0], {r_}, {c_})" if per else f"{x_}.reshape(1, {r_}, {c_})"
             for x_, per, (r_, c_) in zip(names, step.per_sample, ((ra, ca), (rb, cb), (ro, co)))]
    alpha, beta = (printer.doprint(v) if v in (0, 1) else f"FT({printer.doprint(v)})" for v in (step.alpha, step.beta))
    guarded = names[2] in printer.guarded
    a, b, out = (f"{x_}[n]" if per else x_ for x_, per in zip(names, step.per_sample))
    product = f"{a}{'ᵀ' if step.ta else ''}·{b}{'ᵀ' if step.tb else ''}"
    scaled = product if step.alpha == 1 else f"({step.alpha})·{product}"
    kept = "" if step.beta == 0 else f"({step.beta})·{out} + "
    how = f"Σ_n {scaled}" if step.accumulate else scaled
    name = (f"bgemm_{'sum_' if step.accumulate else ''}{'t' if step.ta else 'n'}{'t' if step.tb else 'n'}"
            + ("_guarded" if guarded else ""))
    if name not in printer.kernels.sources:
        arr, ft = printer.array_type(3), printer.float_type
        sizes = ", ".join(["int64"] * 6)  # nb, M, N, K, sa, sb
        signature = f"void({'float64[::1], ' if guarded else ''}{sizes}, {arr}, {arr}, {arr}, {ft}, {ft})"
        printer.kernels.add(name, block_gemm_source(name, step.ta, step.tb, guarded, step.accumulate), signature)
    grid = f"gemm_blocks({m}, {n_})" if step.accumulate else f"batch_gemm_blocks({m}, {n_}, nb)"
    operands = f"nb, {m}, {n_}, {k}, {int(step.per_sample[0])}, {int(step.per_sample[1])}, {', '.join(views)}, {alpha}, {beta}"
    return [f"# {out} ← {kept}{how}, per sample n (blocks as (rows, cols) matrices), from {step.formula}",
            f"{name}[{grid}, GEMM_THREADS]({'epoch, ' if guarded else ''}{operands})"]
