"""The update's overflow proof: ``update_bounded``, which tells, before ``train_batch`` updates
anything, that every value the update steps compute is finite — so nothing needs keeping for
the way back.

``train_on_batch`` promises that an update which would leave a parameter or optimizer state
NaN or infinite changes nothing.  Keeping a copy of the parameters and state on every call
costs a pass that writes them all and a pass that checks them after the update.  Instead, once
every δ and gradient sum of the step is computed, the update steps' own formulas are evaluated
in interval arithmetic over the extent (min, max) of every array they read: if every interval,
and every partial sum or product a kernel may form on the way, lies within ±LIMIT, the update
cannot overflow and runs with no copy; otherwise (a step near overflow, an array holding NaN or
inf) the step falls back to the copy and the check, as does a module whose update has a step or
function with no rule here (a per-sample GEMM, a custom optimizer's ``tanh``).  Measured on
the medium MLP of ``benchmarks/bench_calls.py`` (2-core Zen 5, float32, SGD): the proof 20 µs,
against 42 µs for the copy and the check.

The proof is a table (the module's ``BOUNDS``) with one row per node of the update formulas,
read by one compiled interpreter (:func:`symbp.backends.cpu.intervals.run_bounds`, compiled once
per installation): a model's proof adds rows, not code to compile.  What it does add, the calls
that read the extents, the split backward pass and the copy kept for the proof's failures, costs
the medium MLP's first ``train_on_batch`` 1.85–1.89 s of compile against 1.42–1.46 s with the
copy alone (once: the compiled step is cached).  Each row names its operation, the rows it
reads, and says in a comment what it bounds::

    (IV_EXTENT, 2, 0, 0, 0, 0, 0),  # 4: A1
    (IV_MUL, 3, 4, 0, 0, 0, 0),  # 5: -h_lr
"""

from __future__ import annotations

import sympy as sp

from ...lower.ir import BlockGemm, Gemm, Loop
from ..common import one_line

#: The fewest parameter and optimizer-state values for which train_batch proves its update
#: finite rather than copying them every call.  Measured (2-core Zen 5, float32, batch 32,
#: n-n-10 tanh MLPs, µs a call, proof against copy): 1,386 values (SGD) 10.6 / 9.9; 4,810 16.8
#: / 16.0; 10,282 24.1-24.6 / 24.2-25.9; 17,802 26.7-44.1 / 27.3-47.8; with Adam (three values
#: a parameter) 14,430 19.4 / 21.3, 30,846 29.0-29.3 / 33.6-34.1; 68,362 (SGD) 45.8 / 49.1,
#: with Adam 72.7 / 111.6.  Under 65,536 a call gains at most a few µs, not worth the 0.4 s
#: the proof adds to the first call's compile.
PROOF_MIN_VALUES = 65536

#: The row kinds of a proof (symbp.backends.cpu.intervals), imported by name by the modules.
INTERVAL_NAMES = ("IV_ABS", "IV_ADD", "IV_EXACT", "IV_EXP", "IV_EXTENT", "IV_GEMM", "IV_HULL", "IV_HYPER", "IV_INV",
                  "IV_LOG", "IV_MAX", "IV_MIN", "IV_MUL", "IV_POINT", "IV_POW", "IV_STEP")
#: The interval rows of the SymPy functions an update may call (one argument each).
FUNCTIONS = {sp.exp: "IV_EXP", sp.log: "IV_LOG", sp.Abs: "IV_ABS"}


class Unbounded(Exception):
    """An update step or formula with no interval rule: the step keeps the copy."""


class _Proof:
    """The rows of one proof, printed from update steps in their order."""

    def __init__(self, pr, hyper: list[str], step: str) -> None:
        self.pr, self.step_symbol = pr, step
        self.hyper = {f"h_{k}": i for i, k in enumerate(hyper)}  # (the kernels read h_lr = hyper[0])
        self.rows: list[tuple] = []  # (op, operands, what it bounds)
        self.consts: list[float] = []
        self.arrays: dict[str, int] = {}  # array name -> its row of ext (update_bounded's reads)
        self.ks: list[str] = []  # each GEMM's number of products a term, as code
        self.env: dict[str, int] = {}  # array or temporary name -> the row of its current interval
        self.done: dict[sp.Expr, int] = {}  # expression -> its row, until an assignment

    def row(self, op: str, *operands: int, note: str) -> int:
        self.rows.append((op, operands, note))
        return len(self.rows) - 1

    def const(self, value: float) -> int:
        self.consts.append(value)
        return len(self.consts) - 1

    def array(self, name: str) -> int:
        if name not in self.env:
            self.arrays[name] = len(self.arrays)
            self.env[name] = self.row("IV_EXTENT", self.arrays[name], note=name)
        return self.env[name]

    def of(self, expr: sp.Expr) -> int:
        """The row of ``expr``'s interval, the rows of its operands before it (one row per
        expression: an assignment forgets those that read an array or a temporary)."""
        if expr not in self.done:
            self.done[expr] = self._of(expr)
        return self.done[expr]

    def forget(self, name: str) -> None:
        """Forget the rows of expressions that read array or temporary ``name`` (assigned)."""
        def reads(e):
            return name in {str(s_) for s_ in e.free_symbols} | {self.pr.array(i.base) for i in e.atoms(sp.Indexed)}
        self.done = {e: k for e, k in self.done.items() if not reads(e)}

    def _of(self, expr: sp.Expr) -> int:
        note = one_line(str(expr))
        note = note if len(note) <= 60 else note[:57] + "..."
        if isinstance(expr, sp.Indexed):
            return self.array(self.pr.array(expr.base))
        if isinstance(expr, sp.Symbol):
            if str(expr) in self.env:  # a temporary a statement set
                return self.env[str(expr)]
            if str(expr) == self.step_symbol:
                return self.row("IV_STEP", note=note)
            if str(expr) in self.hyper:
                return self.row("IV_HYPER", self.hyper[str(expr)], note=note)
            raise Unbounded(f"the symbol {expr}")
        if expr.is_number:
            if not expr.is_extended_real or not expr.is_finite:
                raise Unbounded(f"the number {expr}")
            exact = expr.is_Integer and abs(expr) <= 2**24  # (an integer float32 holds exactly)
            return self.row("IV_EXACT" if exact else "IV_POINT", self.const(float(expr)), note=note)
        if isinstance(expr, (sp.Add, sp.Mul)):
            args = [self.of(a) for a in expr.args]
            add = isinstance(expr, sp.Add)
            if len(args) > 2:
                # Every partial sum or product, in whatever order the kernel forms it, lies within
                # Σ|aᵢ| or Π max(1, |aᵢ|): rows of those bound every order the printer may choose.
                self.partial(args, add)
            if not add:
                # The printer writes a product with reciprocals as a quotient, num/(d₁·d₂·…): the
                # denominator's product is formed too, and bounded here (each dᵢ by its own row).
                den = [self.of(sp.Pow(a.base, -a.exp)) for a in expr.args
                       if isinstance(a, sp.Pow) and a.exp.is_Rational and a.exp.is_negative]
                if len(den) > 1:
                    self.partial(den, add=False)
            value = args[0]
            for k, a in enumerate(args[1:], 2):
                last = len(self.rows) + len(args) - k  # (the row of the whole expression)
                value = self.row("IV_ADD" if add else "IV_MUL", value, a,
                                 note=note if k == len(args) else f"(the first {k} terms of row {last})")
            return value
        if isinstance(expr, sp.Pow):
            base = self.of(expr.base)
            if expr.exp.is_Rational and expr.exp.is_negative and expr.exp != -1:
                self.of(sp.Pow(expr.base, -expr.exp))  # (1/xⁿ may be formed as 1/(xⁿ): xⁿ is bounded too)
            if expr.exp == -1:
                return self.row("IV_INV", base, note=note)
            return self.row("IV_POW", base, self.of(expr.exp), note=note)
        if isinstance(expr, (sp.Max, sp.Min)):
            args = [self.of(a) for a in expr.args]
            value = args[0]
            for a in args[1:]:
                value = self.row("IV_MAX" if isinstance(expr, sp.Max) else "IV_MIN", value, a, note=note)
            return value
        if expr.func in FUNCTIONS and len(expr.args) == 1:
            return self.row(FUNCTIONS[expr.func], self.of(expr.args[0]), note=note)
        raise Unbounded(f"no interval rule for {type(expr).__name__} ({expr})")

    def partial(self, args: list[int], add: bool) -> None:
        """Rows bounding Σ|aᵢ| (``add``) or Π max(1, |aᵢ|) over the rows ``args``."""
        sizes = [self.row("IV_ABS", a, note="|·|") for a in args]
        if not add:
            sizes = [self.row("IV_MAX", s_, self.of(sp.Integer(1)), note="max(1, |·|)") for s_ in sizes]
        for s_ in sizes[1:]:
            sizes[0] = self.row("IV_ADD" if add else "IV_MUL", sizes[0], s_,
                                note="partial sums" if add else "partial products")

    def assign(self, target, value: int) -> None:
        """A statement's target now holds ``value``'s interval (an array: as well as its old
        values, where the loop has not reached yet: their hull)."""
        name = self.pr.array(target.base) if isinstance(target, sp.Indexed) else str(target)
        if isinstance(target, sp.Indexed):
            value = self.row("IV_HULL", self.array(name), value, note=f"{name}, before and after")
        self.env[name] = value
        self.forget(name)  # (an expression reading the target has another interval now)

    def step(self, step) -> None:
        if isinstance(step, BlockGemm) or not isinstance(step, (Gemm, Loop)):
            raise Unbounded(f"no interval rule for a {type(step).__name__} step")
        if isinstance(step, Gemm):
            theta, a, b = (self.array(self.pr.array(x)) for x in (step.out, step.a, step.b))
            alpha, beta = self.of(step.alpha), self.of(step.beta)
            self.ks.append(f"{self.pr.array(step.a)}.shape[{0 if step.ta else 1}]")
            out = self.pr.array(step.out)
            self.forget(out)
            self.env[out] = self.row("IV_GEMM", theta, a, b, len(self.ks) - 1, alpha, beta,
                                     note=f"{out} ← β·{out} + α·op({self.pr.array(step.a)})op({self.pr.array(step.b)})")
            return
        if step.adds:
            raise Unbounded("an update loop with running sums")
        for target, expr in step.stmts:
            self.assign(target, self.of(expr))
        # (step.sums: the l2 penalty, summed in float64 and returned, never stored in θ)


def bound_function(name: str, updates: list, pr, dtype: str, hyper: list[str], limit: str,
                   step: str) -> tuple[str, list[str]] | None:
    """The text of the proof table and of ``name(arrays..., hyper, t)``: whether the update
    steps ``updates`` provably keep every value within ±``limit``; and the arrays it reads
    (its arguments before hyper and t).  None where a step or formula has no interval rule
    (the module then keeps the copy on every call).  ``hyper``: the optimizer's
    hyper-parameter names in the kernels' order; ``step``: the step number's symbol."""
    proof = _Proof(pr, hyper, step)
    try:
        for st in updates:
            proof.step(st)
    except Unbounded:
        return None
    extent = {"float32": "extent32", "float64": "extent64"}[dtype]
    rows = [f"    ({op}, {', '.join(str(x) for x in (*operands, 0, 0, 0, 0, 0, 0)[:6])}),  # {k}: {note}"
            for k, (op, operands, note) in enumerate(proof.rows)]
    ks = proof.ks or ["0"]  # (one entry at least: an empty tuple has no element type)
    lines = [
        f"# {name}'s proof (backends/cpu/bounds.py): row k is the interval of one node of the update",
        "# formulas, from the rows, arrays (IV_EXTENT: the extents update_bounded reads), constants",
        "# (BOUND_CONSTS) or hyper-parameters it names; the update cannot overflow when every row lies",
        "# within ±LIMIT (run_bounds, backends/cpu/intervals.py).",
        "BOUNDS = np.array([", *rows, "], np.int64)",
        f"BOUND_CONSTS = np.array({[float(c) for c in proof.consts] or [0.0]!r}, np.float64)",
        f"LIMIT = {limit}", "", "",
        '@njit(cache=True, error_model="numpy")',
        f"def {name}({', '.join(proof.arrays)}, hyper, t):",
        '    """Whether update_from_deltas (step t) provably keeps every value it computes finite, from',
        "    the extents of the arrays it reads: interval arithmetic over its formulas (BOUNDS).  False:",
        '    the caller keeps a copy first."""',
        f"    ext = empty(({len(proof.arrays)}, 2), np.float64)",
        *(f"    ext[{k}, 0], ext[{k}, 1] = {extent}({a})" for a, k in proof.arrays.items()),
        f"    ks = empty({len(ks)}, np.int64)",
        *(f"    ks[{k}] = {code}" for k, code in enumerate(ks)),
        "    return run_bounds(BOUNDS, BOUND_CONSTS, ext, ks, hyper, t, LIMIT)",
    ]
    return "\n".join(lines) + "\n", list(proof.arrays)
