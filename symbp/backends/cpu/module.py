"""The CPU module: a plan's steps printed as ``@njit`` functions in one readable Python file.

The model module holds, as ``@njit(cache=True)`` functions (the steps inlined into the glue
that calls them: see ``inline_flag``):

``forward``          z_l = a_{l-1} W_lᵀ + b_l and a_l = f(z_l), layer by layer
``loss_rows``        the per-sample loss and δ_L (the loss gradient at the logits) in one pass
``backward``         every ∂C/∂θ and the δ recurrence
``loss_and_grads``, ``evaluate``, ``logits``   the glue a model calls

and, per optimizer, a training module (:meth:`CpuModule.build_train`) with the backward pass
and that optimizer's update rule fused in, and the epoch loop.  Every formula the functions
evaluate is printed from the derivation's SymPy expressions; the module's header lists them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ...derive import Derivation
from ...indices import N
from ...lower.chunk import chunk_samples
from ...lower.elide import drop_dead_stores, elide_copies, fuse_scans
from ...lower.fuse import BARRIER, access_sets, fuse_loops
from ...lower.ir import Gemm, Loop, SampleChunks, Sync
from ...lower.plan import T_STEP, Plan
from ..common import NumbaPrinter, docstring, helper_source, module_header, one_line, tidy_args
from .bounds import INTERVAL_NAMES, PROOF_MIN_VALUES, bound_function
from .dots import MAX_OUT
from .emit import emit

# The step functions (forward, loss_rows, backward_update, …) are inlined, as Numba IR, into
# the drivers that call them (train_epoch, train_batch, evaluate, …): a cold start then
# compiles each step once, as part of its driver, rather than alone and then again when
# LLVM optimises the driver with the step's code linked in (the small CNN's first fit:
# 3.7-3.9 → 3.2-3.3 s).  Inlined code is compiled under the driver's flags, so the drivers
# carry the steps' own (no nnan/ninf: the drivers' isfinite checks stay).  CPython passes
# more than 30 positional arguments as one tuple (CALL_FUNCTION_EX, a call with *args), which
# Numba cannot inline: a step with more parameters (a deep or wide net's backward pass) stays
# a function of its own, and so does one with a ``with objmode()`` block (a data-parallel
# fit's batch statistics), which Numba cannot lift out of inlined code.
# The steps write the min or max of two numbers as a conditional expression (Python's rule:
# max(a, b) is b if b > a else a), allocate their scratch arrays and take flat views through
# arrays.py: Numba compiles its builtins' and NumPy's overloads again in every process that
# compiles a new model, where arrays.py's functions load from its cache.
STEP_FLAGS = 'fastmath=FASTMATH, error_model="numpy"'
MAX_INLINE_ARGS = 30


def inline_flag(n_args: int, objmode: bool = False) -> str:
    """The decorator's inline flag for a step taking ``n_args`` arguments (see above)."""
    return 'inline="always"' if n_args <= MAX_INLINE_ARGS and not objmode else 'inline="never"'


def step_writes(step, printer) -> tuple[str, ...]:
    """The arrays (and running sums: ``total``, ``penalty``) a kernel step writes, by the
    names the module gives them."""
    if isinstance(step, SampleChunks):
        return tuple(dict.fromkeys(w_ for st in step.steps for w_ in step_writes(st, printer)))
    out = []
    for attr in ("out", "target", "max_target"):
        base = getattr(step, attr, None)
        if base is not None:
            out.append(printer.array(base.base if isinstance(base, sp.Indexed) else base))
    for target, _ in [*getattr(step, "stmts", ()), *getattr(step, "adds", ()), *getattr(step, "sums", ()),
                      *getattr(step, "row_sums", ()), *getattr(step, "pre", ())]:
        out.append(printer.array(target.base) if isinstance(target, sp.Indexed) else str(target))
    if getattr(step, "argmax_match", None) is not None or getattr(step, "threshold_match", None) is not None:
        out.append("correct")
    return tuple(dict.fromkeys(out))


def with_provenance(src: str, provenance: list[tuple]) -> str:
    """``src`` with a ``PROVENANCE`` table at its end: for each kernel step, the function,
    its first and last line (1-based, in this file), the arrays it writes and the formula it
    implements (a GEMM's sum).  The report reads it to show each formula's lines."""
    lines = src.split("\n")
    defs = {line[4:line.index("(")]: k for k, line in enumerate(lines) if line.startswith("def ")}
    rows = [(fn, defs[fn] + first, defs[fn] + last, writes, formula) for fn, first, last, writes, formula in provenance]
    table = "".join(f"\n    {row!r}," for row in rows)
    return (src.rstrip("\n") + "\n\n\n# The lines of each kernel step: (function, first, last, arrays it writes, "
            f"the sum it implements).\nPROVENANCE = ({table}\n)\n")


def names_in_bodies(functions: list[str]) -> set[str]:
    """The identifiers the printed functions' bodies name (their parameter lists left out)."""
    return {name for text in functions for line in text.split("\n") if not line.startswith(("def ", "@njit"))
            for name in re.findall(r"[A-Za-z_]\w*", line)}


def drop_params(text: str, names: set[str]) -> str:
    """A printed function with ``names`` left out of its parameter list."""
    def keep(m):
        return m.group(1) + ", ".join(a for a in m.group(2).split(", ") if a not in names) + "):"
    return re.sub(r"^(def \w+\()(.*)\):$", keep, text, count=1, flags=re.M)


@dataclass
class ModuleLayout:
    """What a model needs to call the generated functions."""

    params: list[str]  # argument order of the parameters
    workspace: list[tuple[str, tuple]]  # (name, shape); "batch" stands for the batch size
    source: str


class CpuModule(Plan):
    """Prints a :class:`~symbp.lower.plan.Plan` as the CPU target's modules."""

    batch_inner = True

    def printer(self) -> NumbaPrinter:
        pr = NumbaPrinter(self.dtype, dict(self.names))
        pr.extents = dict(self.extents)
        pr.flat = dict(self.flat)
        pr.inner = set(self.inner)
        return pr

    def function(self, name: str, args: list[str], prologue: list[str], steps: list, epilogue: list[str], doc: str) -> str:
        pr = self.printer()
        body = list(prologue)
        buffer = self._buffer_of
        steps = elide_copies(steps, buffer, lambda label: self.roles.get(buffer(label)) == "delta", self.flat.get)
        steps = fuse_scans(steps, buffer, self._read_later)
        if name.startswith("forward"):  # (what the backward pass and the loss read: _read_later)
            steps = drop_dead_stores(steps, buffer, self._read_later)
        steps = fuse_loops(steps, self._size, buffer)
        steps = chunk_samples(steps, buffer, self.inner, self.flat, 4 if self.dtype == "float32" else 8, MAX_OUT)
        for step in steps:
            start = len(body)
            body += emit(step, pr)
            if len(body) > start:  # lines counted from the decorator: body line k is line 3 + k
                self.provenance.append((name, 3 + start, 3 + len(body) - 1, step_writes(step, pr),
                                        None if getattr(step, "formula", None) is None else str(step.formula)))
        body += epilogue
        if body[:1] == ["nb = X.shape[0]"] and any("nbf" in line for line in body) and not body[1].startswith("nbf = "):
            body.insert(1, f"nbf = {self.float_type}(nb)")  # the batch size in the float type (a mean's 1/N)
            self.provenance = [(f, a + 1, b + 1, *rest) if f == name else (f, a, b, *rest)
                               for f, a, b, *rest in self.provenance]
        self.helpers |= pr.helpers_used
        parallel = any(getattr(step, "parallel", False) for step in steps)
        objmode = any(isinstance(step, Sync) for step in steps)  # printed as ``with objmode()``
        flags = f"cache=True, {'parallel=True' if parallel else inline_flag(len(args), objmode)}, {STEP_FLAGS}"
        lines = [f"@njit({flags})", f"def {name}({', '.join(args)}):", f'    """{doc}"""']
        lines += ["    " + line if line else "" for line in body]
        return "\n".join(lines) + "\n"

    def _buffer_of(self, label: str) -> str:
        """The array a label is stored in (a Flatten's δ shares its source's: two labels, one array)."""
        return self.names.get(label, label)

    def _read_later(self, name: str) -> bool:
        """Whether work buffer ``name`` is read after the forward pass that writes it: by the
        backward pass (whatever the optimizer: its updates read what the gradients read), the
        running statistics' update, the loss (the network's output).  Planned once, on the
        first question (a forward pass with a scan to fuse, see lower/elide.py)."""
        if "_later" not in self.__dict__:
            self._reads_after_forward(self.backward_steps())
        return name in self._later

    def _reads_after_forward(self, backward: list) -> None:
        """Note what ``backward`` (the planned backward pass) and the rest read (see _read_later),
        before printing changes any step."""
        B = self.buffers()
        later = set(B["out"]) | set(B["last"])
        for step in backward + self.running_steps():
            acc = access_sets(step, self._buffer_of)
            later |= set(self.roles) if acc is BARRIER else acc[0]
        self._later = later

    def _size(self, extent) -> sp.Expr:
        """A loop extent's number (the batch size stays N), to tell which loops may merge."""
        sizes = self.__dict__.setdefault("_sizes", {})
        if extent not in sizes:
            sizes[extent] = extent if extent == N else self.value(sp.sympify(extent))
        return sizes[extent]

    def _blas_import(self) -> str:
        kind = "s" if self.dtype == "float32" else "d"
        return (f"from symbp.backends.cpu.blas import {kind}gemm as gemm, {kind}gemm_at as gemm_at, "
                f"{kind}gemm_block as gemm_block\n"
                "from symbp.backends.cpu.dots import dots_add, dots_finish, gemm_dots\n"
                "from symbp.backends.cpu.arrays import empty, flat, zeros")

    @property
    def float_type(self) -> str:
        return "np.float32" if self.dtype == "float32" else "np.float64"

    def _prelude(self, rows: bool = False) -> list[str]:
        """The first lines of a kernel over a batch; ``rows``: a data-parallel kernel, whose
        1/N is the global batch's (its ``rows`` argument), not this process's ``nb``."""
        first = ["nb = X.shape[0]"] + ([f"nbf = {self.float_type}(rows)  # the global batch's rows"] if rows else [])
        return first + [f"scal = empty(2, {self.float_type})  # alpha and beta, passed to BLAS by address"]

    @property
    def needs_sync(self) -> bool:
        """Whether a data-parallel fit needs kernels of its own: batch statistics to sum over
        the processes (BatchNorm), or Dropout's draws to place at the process's rows."""
        return any(st.batch for ld in self.d.layers for st in ld.stages) or any(
            getattr(ld.layer, "random", False) for ld in self.d.layers)

    @property
    def sync_error(self) -> str | None:
        """Why the network's batch statistics cannot be summed over processes, or None."""
        self._synced_forward()
        return self._sync_error

    def _synced_forward(self) -> list:
        """The data-parallel variant's training forward steps (planned once)."""
        if "_sync_error" not in self.__dict__:
            self._sync_error, self._sync_forward = None, []
            try:
                self._sync_forward = self._synced(self._train_forward_steps)
            except NotImplementedError as err:
                self._sync_error = str(err)
        return self._sync_forward

    def _synced(self, make):
        """``make()`` with the plan printing the data-parallel variant (see ``Plan.sync``)."""
        self.sync = True
        try:
            return make()
        finally:
            self.sync = False

    def _sync_imports(self) -> list[str]:
        return (["from numba import objmode", "from symbp.backends.cpu.sync import sum_over_processes"]
                if self.needs_sync and self.sync_error is None else [])

    def build(self) -> ModuleLayout:
        """The model module: forward, loss, gradients, evaluation."""
        self.helpers: set[str] = set()
        self.provenance: list[tuple] = []
        B = self.buffers()
        P, acts, deltas, grads, out = B["P"], B["acts"], B["deltas"], B["grads"], B["out"]
        ft = self.float_type
        backward = self.backward_steps()
        self._reads_after_forward(backward)  # (planned once: the forward pass's scans ask, see lower/elide.py)
        fns = [
            self.function("forward", ["X"] + P + acts, self._prelude(),
                          [s for ld in self.d.layers for s in self.forward_steps(ld)], [],
                          "Forward pass over a batch; fills Z (pre-activations) and A (outputs)."
                          + ("\n    Inference: the running statistics stand for the batch's." if self.has_modes else "")),
            *(self._training_forward(P, acts) if self.has_modes else []),
            self.function("loss_rows", out + ["T", B["dl"][0]],
                          [f"nb = {B['last'][0]}.shape[0]", f"nbf = {ft}(nb)", "total = 0.0", "correct = 0"],
                          [self.loss_step()], ["return total, correct"],
                          "Σ_n ℓ_n over the batch and δ_L = ∂C/∂z_L; counts correct predictions for classifiers."),
            self.function("backward", ["X"] + P + acts + deltas + grads, self._prelude(), backward, [],
                          "∂C/∂θ for every parameter, given δ_L from loss_rows."),
            self.function("penalty", P, ["penalty = 0.0"], self.penalty_steps(), ["return penalty"],
                          "(λ/2) Σ_l ‖W_l‖²."),
        ]
        if self.needs_sync and self.sync_error is None:
            fns += self._synced(lambda: [
                self.function("forward_train_sync", ["X"] + P + acts + ["seed", "rows", "row0"],
                              self._prelude(rows=True), self._synced_forward(), [],
                              "forward_train for one process of a data-parallel fit: its rows are rows row0… of a\n"
                              "    global batch of ``rows``, whose statistics every process computes together."),
                self.function("update_running_sync", ["X"] + P + acts + ["rows"], self._prelude(rows=True),
                              self.running_steps(), [],
                              "update_running from the global batch's statistics (``rows`` rows)."),
            ])
        # Work buffers no step reads or writes (a conv's z, a and δ where its pool reads the GEMM's
        # output, relu applied, and its δ goes straight into the GEMM's): not allocated, not passed.
        kept = set(B["last"] + B["out"] + B["dl"])
        used = names_in_bodies(fns)
        dropped = {w for w in acts + deltas if w not in used and w not in kept}
        if dropped:
            self.workspace = [(w, shape) for w, shape in self.workspace if w not in dropped]
            self.roles = {w: role for w, role in self.roles.items() if w not in dropped}
            fns = [drop_params(f, dropped) for f in fns]
            B = self.buffers()
            P, acts = B["P"], B["acts"]
        if not self.has_modes:  # forward_train and update_running as aliases, with the buffers kept
            fns[1:1] = self._training_forward(P, acts)
        fns.append(tidy_args(_GLUE.format(**self._glue_names(B))))
        consts = [f"d{l} = {w}" for l, w in enumerate(self.d.network.widths)]
        src = "\n".join([
            module_header(self), "import math", "", "import numpy as np", "from numba import njit", "",
            self._blas_import(), "from symbp.backends.cpu.targets import batch_targets", *self._sync_imports(), "",
            f"ONE = {ft}(1.0)", f"ZERO = {ft}(0.0)", f"HALF = {ft}(0.5)", f"NEG_INF = {ft}(-np.inf)",
            "# Fused multiply-add and reciprocal multiplication allowed; never 'assume finite'",
            "# (the NaN checks must stay) nor reassociation (sums keep their order).  The kernels",
            "# use error_model='numpy': x/0 gives inf as in NumPy (caught by the NaN check) instead",
            "# of a per-division ZeroDivisionError test that stops loops from vectorizing.",
            'FASTMATH = {"contract", "arcp", "nsz"}',
            *consts, "",
            "# What the model passes in: its parameters, then the work buffers (\"batch\" = batch size).",
            f"PARAMS = {tuple(P)!r}",
            f"WORKSPACE = {tuple(self.workspace)!r}",
            f"ROLES = {self.roles!r}",
            f"LAST = {B['last'][0]!r}  # the buffer that holds the network's output after forward()",
            f"DTYPE = {self.dtype!r}", "", helper_source(self.helpers), *fns,
        ])
        return ModuleLayout(P, self.workspace, with_provenance(src, self.provenance))

    def _training_forward(self, P: list, acts: list) -> list[str]:
        """``forward_train`` (the batch's statistics) and ``update_running`` (the running
        statistics from them), where training and inference differ; else aliases."""
        names = ["X"] + P + acts
        args = ", ".join(names)
        if not self.has_modes:
            return [f"@njit(cache=True, {inline_flag(len(names) + 1)}, {STEP_FLAGS})\ndef forward_train({args}, seed):\n"
                    '    """Training runs the same forward pass as inference here."""\n'
                    f"    forward({args})\n",
                    f"\n@njit(cache=True, {inline_flag(len(names))}, {STEP_FLAGS})\ndef update_running({args}):\n"
                    '    """No running statistics in this network."""\n    return\n']
        return [
            self.function("forward_train", ["X"] + P + acts + ["seed"], self._prelude(), self._train_forward_steps(), [],
                          "Forward pass over a batch in training: batch statistics, Dropout's masks drawn under\n"
                          "    ``seed``; fills Z and A."),
            self.function("update_running", ["X"] + P + acts, self._prelude(), self.running_steps(), [],
                          "The running statistics from this batch's (after forward_train), as PyTorch updates them."),
        ]

    def _two_gradients(self, updates: list) -> list:
        """The update loops with every gradient read g[i] made g[i] + g_b[i] (new loops)."""
        grads = {label for label, name in self.names.items() if isinstance(label, str) and label.startswith("g")
                 and name.startswith("d") and self.roles.get(name) == "gradient"}
        out = []
        for step in updates:
            if isinstance(step, Gemm):  # an update a GEMM carries reads no gradient buffer
                out.append(step)
                continue

            def both(e):
                return e.replace(lambda x: isinstance(x, sp.Indexed) and str(x.base.label) in grads,
                                 lambda x: x + sp.IndexedBase(f"{x.base.label}_b")[x.indices])
            out.append(Loop(list(step.ranges), [(t, both(e)) for t, e in step.stmts],
                            [(a, both(e)) for a, e in step.sums], step.parallel))
        for label in grads:
            self.names[f"{label}_b"] = f"{self.names[label]}_b"
        return out

    def _train_forward_steps(self) -> list:
        return [s for ld in self.d.layers for s in self.forward_steps(ld, train=True)]

    def _glue_names(self, B: dict) -> dict:
        def join(names, sliced=False):
            return ", ".join(f"{w}[:nb]" if sliced else w for w in names)

        names = {
            "P": join(B["P"]), "WS": join(B["WS"]), "ACTS": join(B["acts"]), "DELTAS": join(B["deltas"]),
            "GRADS": join(B["grads"]), "LAST": B["last"][0], "DL": B["dl"][0], "OUT": join(B["out"]),
            "OUT_SLICED": join(B["out"], True), "ACTS_SLICED": join(B["acts"], True),
            "SLICED": join(B["acts"] + B["deltas"], True),
        }
        # Where training runs inference's forward pass, the drivers call forward itself: Numba
        # inlines its code once (through forward_train it copied forward's IR twice: 0.16 s of
        # the small CNN's cold start).
        # train_epoch and train_batch slice no work buffer: their callers pass buffers of the
        # batch's rows (an epoch's shorter last batch runs in a call of its own, see
        # backends/cpu/runtime.py epoch_calls).  Each slice costs Numba's compile time (the small
        # CNN's epoch loop sliced 11 buffers).
        names["BUFFERS"] = join(B["acts"] + B["deltas"])
        for key, x, acts, seed in (("EPOCH", "Xs", "ACTS", "seed + t"), ("BATCH", "X", "ACTS", "seed + t"),
                                   ("SLICE", "X", "ACTS_SLICED", "seed"), ("GRADS", "X", "ACTS", "0")):
            names[f"FORWARD_{key}"] = (f"forward_train({x}, {names['P']}, {names[acts]}, {seed})" if self.has_modes
                                       else f"forward({x}, {names['P']}, {names[acts]})")
        # The running statistics' update, where the network has any: a call to the empty
        # update_running would still cost a cold start the typing and lowering of its slices.
        for key, x, indent, acts in (("EPOCH", "Xs", 8, "ACTS"), ("BATCH", "X", 4, "ACTS")):
            names[f"RUNNING_{key}"] = (f"\n{' ' * indent}update_running({x}, {names['P']}, {names[acts]})"
                                       if self.has_modes else "")
        return names

    def build_train(self, opt, model_module: str, workspace: tuple | None = None) -> str:
        """The training module for one optimizer: the backward pass with its update rule
        fused in, and the epoch loop.  It imports the forward pass and loss from the model
        module (``model_module``, already imported under that name), and takes the work
        buffers that module keeps (its ``workspace``: no step reads those it dropped)."""
        self.helpers = set()
        self.provenance = []
        if workspace is not None:
            keep = {w for w, _ in workspace}
            self.workspace = [(w, shape) for w, shape in self.workspace if w in keep]
        B = self.buffers()
        states = [f"{s_}_{name}" for name in B["P"] for s_ in opt.state_names]
        ft = self.float_type
        read_hyper = [f"h_{k} = {ft}(hyper[{i}])" for i, k in enumerate(opt.hyper)]
        fused = self.backward_steps(opt)
        pr = self.printer()
        # the parameters whose fused update rides on a GEMM (BLAS's β·θ + α·Σ, rounded its way)
        carried = sorted(pr.array(st.out) for st in fused if isinstance(st, Gemm) and pr.array(st.out) in B["P"])
        update = self.function(
            "backward_update", ["X"] + B["P"] + B["acts"] + B["deltas"] + B["grads"] + states + ["hyper", "t"],
            self._prelude() + read_hyper + ["penalty = 0.0"], fused, ["return penalty"],
            f"Backward pass with the {opt.name} update fused in (step t); returns the l2 penalty before the step.")
        # Data-parallel training (fit with comm=): each process's gradient sums, then, once
        # they are summed over processes, the update.  Numba compiles them on first call only.
        apart, updates = self.backward_apart(opt)
        grads_only = self.function(
            "backward_grads", ["X"] + B["P"] + B["acts"] + B["deltas"] + B["grads"], self._prelude(), apart, [],
            "∂C/∂θ without the λθ term: the data's sums over this process's rows (δ_L as loss_rows left it).")
        syncs, synced = [], self.needs_sync and self.sync_error is None
        if synced:  # batch statistics over the global batch: summed over the processes
            try:
                forward, (apart_sync, _) = self._synced_forward(), self._synced(lambda: self.backward_apart(opt))
            except NotImplementedError as err:
                self._sync_error, synced = str(err), False
        if synced:
            syncs = [step.size for step in forward + apart_sync if isinstance(step, Sync)]
            grads_only += "\n" + self._synced(lambda: self.function(
                "backward_grads_sync", ["X"] + B["P"] + B["acts"] + B["deltas"] + B["grads"] + ["rows", "row0"],
                self._prelude(rows=True), apart_sync, [],
                "backward_grads for one process of a data-parallel fit (its rows are rows row0… of a global\n"
                "    batch of ``rows``): the batch statistics' gradients summed over every process."))
        pair = self._two_gradients(updates)  # (made before printing: the printer merges loops in place)
        update_only = self.function(
            "update", B["P"] + B["grads"] + states + ["hyper", "t"], read_hyper + ["penalty = 0.0"], updates,
            ["return penalty"],
            f"The {opt.name} update (step t) from gradient buffers summed over every process; returns the l2 "
            "penalty before the step.")
        update_only += "\n" + self.function(
            "update_pair", B["P"] + B["grads"] + [f"{g}_b" for g in B["grads"]] + states + ["hyper", "t"],
            read_hyper + ["penalty = 0.0"], pair, ["return penalty"],
            "update with each gradient the sum of two buffers, g + g_b, read in the same pass (the shared-memory\n"
            "    data-parallel step: two processes' sums, or the first process's and the rest's).")
        # Two halves of each batch on two threads (train_epoch_halves): where a process's step is
        # slice_grads and update_pair alone -- no batch statistics, no Dropout masks, every update
        # read from the gradient buffers.
        halves = not self.has_modes and not self.needs_sync and not any(isinstance(st, Gemm) for st in pair)
        exchange, table, proof = self._split_functions(opt, B, states, read_hyper, carried)
        rules = "\n".join(f"    {target} <- {expr}" for target, expr in opt.formulas())
        names = self._glue_names(B)
        names["STATES"] = ", ".join(states) + ("," if states else "")
        names["BATCH_UPDATE"] = self._batch_update(names, B["P"] + states, proof)
        shapes = dict(self.workspace)
        rows = {w: f"{w}[:nb]" if shapes[w][0] == "batch" else w for w in shapes}  # (1, k) buffers stay whole
        names["SLICE_CALLS"] = (
            f"    forward_train_sync(X, {names['P']}, {', '.join(rows[w] for w in B['acts'])}, seed, rows, row0)\n"
            f"    update_running_sync(X, {names['P']}, {', '.join(rows[w] for w in B['acts'])}, rows)"
            if synced else f"    {names['FORWARD_SLICE']}")
        names["SLICE_BACKWARD"] = (
            f"backward_grads_sync(X, {names['P']}, {', '.join(rows[w] for w in B['acts'] + B['deltas'])}, "
            f"{names['GRADS']}, rows, row0)" if synced
            else f"backward_grads(X, {names['P']}, {names['SLICED']}, {names['GRADS']})")
        names["WS_B"] = ", ".join(f"{w}_b" for w in B["WS"])
        names["GRADS_B"] = ", ".join(f"{g}_b" for g in B["grads"])
        names["FT"] = self.float_type
        names["GATHER"] = _GATHER.replace("GATHERED", "Xb, Tb")
        names["GATHER_HALVES"] = _GATHER.replace("GATHERED", "Xb[:nb], Tb[:nb]")
        consts = ", ".join(f"d{l}" for l in range(len(self.d.network.widths)))
        src = "\n".join([
            docstring(f"symbp-generated training step for {self.d.network.name} ({self.dtype}) with {one_line(repr(opt))}."
                      "\n\nUpdate rule (SymPy), for each parameter theta with gradient g, at step t:\n" + rules + "\n"),
            "import math", "", "import numpy as np", "from numba import njit, prange", "",
            self._blas_import(),
            "from symbp.backends.cpu.guard import all_finite, first_not_finite, stash, unstash",
            *([f"from symbp.backends.cpu.intervals import {', '.join(INTERVAL_NAMES)}, "
               f"extent{32 if self.dtype == 'float32' else 64}, run_bounds"] if proof else []),
            "from symbp.backends.cpu.targets import batch_targets, put_target",
            f"from {model_module} import FASTMATH, ONE, ZERO, HALF, {consts}, "
            f"{'forward_train' if self.has_modes else 'forward'}, loss_rows, "
            "update_running" + (", forward_train_sync, update_running_sync" if synced else ""),
            *(self._sync_imports() if synced else []), "",
            f"STATES = {tuple(states)!r}", f"HYPER = {tuple(opt.hyper)!r}",
            "# The lengths of the buffers slice_grads sums over the processes, in its order (a data-parallel",
            "# fit: a process that fails mid-step still takes part in the rest, see backends/cpu/sync.py).",
            f"SYNC_SIZES = {tuple(syncs)!r}",
            "# The δ-exchange step (backends/cpu/node_share.py): (θ, δ, x) of each update a GEMM carries,",
            "# θ ← β·θ + α·δᵀx over the global batch; empty: this network's step exchanges gradients.",
            f"EXCHANGE = {table!r}",
            "# Why a data-parallel fit cannot train this network (None: it can).",
            f"SYNC_ERROR = {self.sync_error if self.needs_sync else None!r}",
            f"ROLES = {dict.fromkeys(states, 'optimizer state')!r}", "",
            f"# Whether train_epoch_halves is here (see its docstring).\nHALVES = {halves!r}", "",
            helper_source(self.helpers), update, grads_only, update_only, tidy_args(_TRAIN.format(**names)),
            tidy_args(_HALVES.format(**names)) if halves else "",
            exchange and exchange + tidy_args(_EXCHANGE_GLUE.format(**names)),
        ])
        missing = names_in_bodies([src]) & ({w for w in self.roles} - {w for w, _ in self.workspace})
        if missing:  # (a generator error: the model module dropped a buffer this module's steps use)
            raise RuntimeError(f"the training module's steps use work buffers the model module does not keep: "
                               f"{sorted(missing)}")
        return with_provenance(src, self.provenance)

    def _split_functions(self, opt, B: dict, states: list[str], read_hyper: list[str],
                         carried: list[str]) -> tuple[str, tuple, dict | None]:
        """The kernels of the backward pass split from the update (every δ first, then every
        update: :meth:`~symbp.lower.plan.Plan.backward_exchange`), for two callers.

        The δ-exchange step (see :mod:`symbp.backends.cpu.node_share`): ``backward_deltas``,
        the backward pass over this process's rows less the weight gradients whose update a
        GEMM carries, and ``update_rows``, those GEMMs over the global batch's δ and inputs
        into a block of θ's rows plus the other updates from two gradient buffers; and the
        table of (θ, δ, x) names (empty when no update rides on such a GEMM).

        train_batch's update without a copy (see :mod:`symbp.backends.cpu.bounds`):
        ``backward_deltas``, ``update_from_deltas`` (the update steps over this batch) and
        ``update_bounded`` (whether they provably stay finite); the third value says how to call
        them (None: train_batch keeps its copy on every call).

        Neither where the data-parallel step has kernels of its own (batch statistics); no
        proof where training runs another forward pass (Dropout's masks, batch statistics), nor
        where the fused step carries an update on a GEMM the split one does not (``carried``: a
        convolution's per-sample GEMM), so that train_on_batch stays fit's step bit for bit."""
        if self.needs_sync:
            return "", (), None
        steps, updates = self.backward_exchange(opt)
        pr = self.printer()
        table = tuple((pr.array(g.out), pr.array(g.a), pr.array(g.b)) for g in updates if isinstance(g, Gemm))
        shapes = dict(self.workspace)
        batch = {name for name, shape in shapes.items() if shape[0] == "batch"} | {"X"}
        if not all({d, x} <= batch for _, d, x in table) or len({d for _, d, _ in table}) < len(table):
            return "", (), None  # (a δ or input not a batch buffer, or one δ read by two GEMMs: no split)
        ft = self.float_type
        limit = f"{0.0625 * float(np.finfo(self.dtype).max)!r}"  # (a sixteenth of the largest float: slack)
        # (printed before the updates: the printer merges their loops in place)
        values = sum(math.prod(shape) for shape in self.d.network.param_shapes().values()) * (1 + len(opt.state_names))
        same = sorted(out for out, _, _ in table) == carried
        proof = None if self.has_modes or values < PROOF_MIN_VALUES or not same else bound_function(
            "update_bounded", updates, pr, self.dtype, list(opt.hyper), limit, str(T_STEP))
        if not table and proof is None:
            return "", (), None
        pair = self._two_gradients(updates) if table else None
        operands = list(dict.fromkeys(name for _, d, x in table for name in (d, x)))
        text = self.function(
            "backward_deltas", ["X"] + B["P"] + B["acts"] + B["deltas"] + B["grads"], self._prelude(), steps, [],
            "backward_grads less the weight gradients whose update a GEMM carries (EXCHANGE): δ of every\n"
            "    layer and the other gradients' sums over this process's rows.")
        scal = [f"scal = empty(2, {ft})  # alpha and beta, passed to BLAS by address"] if table else []
        if table:
            text += "\n" + self.function(
                "update_rows", B["P"] + B["grads"] + [f"{g}_b" for g in B["grads"]] + operands + states + ["hyper", "t"],
                scal + read_hyper + ["penalty = 0.0"], pair, ["return penalty"],
                f"The {opt.name} update of a block of rows of every parameter (step t): θ ← β·θ + α·δᵀx for those in\n"
                "    EXCHANGE (δ: the global batch's, its columns of this block; x: the global batch's), the rest\n"
                "    from two gradient buffers, g + g_b; returns the l2 penalty of those rows before the step.")
        if proof is None:
            return text, table, None
        source, reads = proof
        update_args = B["P"] + B["grads"] + operands + states
        text += "\n" + self.function(
            "update_from_deltas", update_args + ["hyper", "t"], scal + read_hyper + ["penalty = 0.0"], updates,
            ["return penalty"],
            f"The {opt.name} update (step t) once backward_deltas has run: θ ← β·θ + α·δᵀx for those in\n"
            "    EXCHANGE, the rest from the gradient buffers; returns the l2 penalty before the step.")
        text += "\n" + source
        return text, table, {"update": ", ".join(update_args), "bounded": ", ".join(reads)}

    def _batch_update(self, names: dict, kept: list[str], proof: dict | None) -> str:
        """train_batch's backward pass and update, with the way back: ``kept`` (parameters and
        optimizer state) stashed before the update and checked after it -- on every call, or,
        with ``proof`` (see _split_functions), only when update_bounded cannot tell the update
        stays finite."""
        def block(pad: str) -> list[str]:
            return ([f"{pad}at = 0"] + [f"{pad}at = stash(keep, at, {a})" for a in kept],
                    [f"{pad}ok = True"] + [f"{pad}ok = ok and all_finite({a})" for a in kept],
                    [f"{pad}    at = 0"] + [f"{pad}    at = unstash(keep, at, {a})" for a in kept])
        if proof is None:
            stash, finite, unstash = block("    ")
            return "\n".join([*stash, *names["RUNNING_BATCH"].splitlines()[1:],
                              f"    pen = backward_update(X, {names['P']}, {names['BUFFERS']}, {names['GRADS']}, "
                              f"{names['STATES']} hyper, t + 1)",
                              *finite, "    if not ok:", *unstash, "        return loss, c, pen, 3, -1",
                              "    return loss, c, pen, 0, -1"])
        stash, finite, unstash = block("        ")
        return "\n".join([
            f"    backward_deltas(X, {names['P']}, {names['BUFFERS']}, {names['GRADS']})",
            "    # every value the update computes provably finite: nothing to keep for the way back",
            f"    safe = update_bounded({proof['bounded']}, hyper, t + 1)",
            "    if not safe:", *stash,
            f"    pen = update_from_deltas({proof['update']}, hyper, t + 1)",
            "    if not safe:", *finite, "        if not ok:", *unstash, "            return loss, c, pen, 3, -1",
            "    return loss, c, pen, 0, -1"])


_GLUE = '''
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def loss_and_grads(X, T, {P}, {WS}):
    """Mean loss over the batch plus the l2 penalty, and all gradients (as in training: the
    batch's statistics, the running ones left as they are; Dropout's masks of seed 0, the
    same on every call)."""
    {FORWARD_GRADS}
    total, correct = loss_rows({OUT}, T, {DL})
    backward(X, {P}, {ACTS}, {DELTAS}, {GRADS})
    return total / X.shape[0] + penalty({P}), correct


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def evaluate(X, T, {P}, {WS}, chunk):
    """Σ_n ℓ_n and argmax hits over a data set, in chunks of the workspace's size (T: target
    rows, or class labels one-hot encoded a chunk at a time into Tb)."""
    total, correct = 0.0, 0
    Tb = empty({DL}.shape, {DL}.dtype)
    for start in range(0, X.shape[0], chunk):
        stop = start + chunk if start + chunk < X.shape[0] else X.shape[0]
        nb = stop - start
        forward(X[start:stop], {P}, {ACTS_SLICED})
        t, c = loss_rows({OUT_SLICED}, batch_targets(T, start, nb, Tb), {DL}[:nb])
        total += t
        correct += c
    return total, correct


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def logits(X, {P}, {ACTS}):
    forward(X, {P}, {ACTS})
    return {LAST}
'''


# An epoch's loop over its batches, to each batch's rows and targets (train_epoch, train_epoch_halves);
# GATHERED: what the gathered rows are (train_epoch's batch buffers have a batch's rows exactly).
_GATHER = '''    total, correct = 0.0, 0
    t = step0
    for start in range(0, order.shape[0], batch_size):
        stop = start + batch_size if start + batch_size < order.shape[0] else order.shape[0]
        nb = stop - start
        # Rows in order (no shuffle, or data the caller shuffled) are read where they are;
        # others are gathered into the batch buffers.
        first = order[start]
        run = 0
        while run < nb and order[start + run] == first + run:
            run += 1
        if run == nb:
            Xs, Ts = X[first:first + nb], batch_targets(T, first, nb, Tb)
        else:
            for r in range(nb):
                i = order[start + r]
                for c in range(X.shape[1]):  # (element by element: a row assignment costs
                    Xb[r, c] = X[i, c]       # numba seconds of cold compile for its shape check)
                put_target(T, i, Tb, r)
            Xs, Ts = GATHERED'''

_TRAIN = '''
@njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def train_epoch(X, T, order, batch_size, hyper, step0, seed, {P}, {WS}, {STATES} Xb, Tb):
    """One epoch of mini-batch training over ``order`` (Dropout's masks of step t drawn under
    ``seed + t``).  T holds target rows, or class labels (one-hot encoded a batch at a time).

    Every batch has ``batch_size`` rows, and so have the work buffers, Xb and Tb: a shorter
    last batch runs in a call of its own, with buffers of its rows (see backends/cpu/runtime.py
    epoch_calls).  Nothing is sliced here: each slice costs Numba compile time.

    Returns (Σ loss, correct predictions, updates made, index of the batch whose loss was
    not finite or -1; -2 if ``order`` or the buffers do not hold whole batches).  A
    non-finite batch stops the epoch before its update, so the parameters are the last good
    ones.
    """
    if Xb.shape[0] != batch_size or {DL}.shape[0] != batch_size or order.shape[0] % batch_size != 0:
        return 0.0, 0, 0, -2
{GATHER}
        {FORWARD_EPOCH}{RUNNING_EPOCH}
        loss, c = loss_rows({OUT}, Ts, {DL})
        if not np.isfinite(loss):
            return total, correct, t - step0, start // batch_size
        t += 1
        pen = backward_update(Xs, {P}, {BUFFERS}, {GRADS}, {STATES} hyper, t)
        total += loss + pen * nb
        correct += c
    return total, correct, t - step0, -1


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def train_batch(X, T, hyper, t, seed, {P}, {WS}, {STATES} keep):
    """One step on one batch (Model.train_on_batch) in one call, as a step of train_epoch at
    step t (Dropout's masks drawn under ``seed + t``), with its checks: the batch is checked
    for NaN/inf, the update runs only if the loss is finite, and the parameters and optimizer
    state go back to ``keep`` (stashed just before the update) if the update left any of them
    NaN or infinite.  Where the module has update_bounded, the stash and the check run only
    when it cannot prove the update finite (see backends/cpu/bounds.py).

    The work buffers have the batch's rows (nothing is sliced here: each slice costs Numba
    compile time).  Returns (Σ loss, correct predictions, the l2 penalty before the step,
    status, where): status 0 updated; 1 X holds NaN or inf at flat index ``where``; 2 the
    loss was not finite; 3 the update was undone; 4 the buffers' rows are not the batch's.
    Nothing of the model changes unless status is 0.
    """
    nb = X.shape[0]
    if {DL}.shape[0] != nb:
        return 0.0, 0, 0.0, 4, -1
    bad = first_not_finite(X)
    if bad >= 0:
        return 0.0, 0, 0.0, 1, bad
    {FORWARD_BATCH}
    loss, c = loss_rows({OUT}, T, {DL})
    if not np.isfinite(loss):
        return loss, c, 0.0, 2, -1
{BATCH_UPDATE}


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def slice_grads(X, T, scale, rows, row0, seed, {P}, {WS}):
    """This process's part of a global batch of ``rows`` rows (data-parallel training; its rows
    are rows row0… of the batch, Dropout's masks drawn under ``seed``): the forward pass, Σ ℓ
    over its rows, and gradient sums with δ_L scaled by ``scale`` = its rows / ``rows``, so
    the sums over every process are the global batch's ∂C/∂θ (λθ aside)."""
    nb = X.shape[0]
{SLICE_CALLS}
    loss, c = loss_rows({OUT_SLICED}, T, {DL}[:nb])
    {DL}[:nb] *= scale
    {SLICE_BACKWARD}
    return loss, c
'''


# One batch as two halves on two threads, each half's forward and backward pass a slice_grads
# call with its own work buffers and BLAS on one thread, the update one pass over both halves'
# gradient sums (update_pair).  Measured (2-core AMD EPYC Zen 5, float32, one process, best of
# 5 × 10, against forward + loss + backward_update): the wide CNN of benchmarks/bench_cnn.py
# 13.6-13.8 → 9.5-10.1 ms a step, the small one 0.77-0.78 → 0.46-0.55; with BLAS left on its
# two threads inside the halves, 17.4 and 0.77 (its threads and Numba's take turns).
_HALVES = '''
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def half_grads(X, T, scale, {P}, {WS}):
    """One half of a batch (train_epoch_halves): the forward pass, Σ ℓ over its rows and its
    gradient sums, δ_L scaled by ``scale`` = its share of the batch's rows."""
    nb = X.shape[0]
    {FORWARD_SLICE}
    loss, c = loss_rows({OUT_SLICED}, T, {DL}[:nb])
    for r in range(nb):  # (a loop: an array expression costs Numba seconds of cold compile)
        for k in range({DL}.shape[1]):
            {DL}[r, k] *= scale
    backward_grads(X, {P}, {SLICED}, {GRADS})
    return loss, c


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def both_halves(Xs, Ts, half, {P}, {WS}, {WS_B}):
    """Rows :half and half: of a batch on two threads, each into its own work buffers: (Σ ℓ,
    correct predictions) of the batch.  BLAS must be on one thread (each half calls it)."""
    nb = Xs.shape[0]
    losses = zeros(2, np.float64)
    counts = zeros(2, np.int64)
    for h in prange(2):
        if h == 0:
            l0, c0 = half_grads(Xs[:half], Ts[:half], {FT}(half / nb), {P}, {WS})
            losses[0] = l0
            counts[0] = c0
        else:
            l1, c1 = half_grads(Xs[half:], Ts[half:], {FT}((nb - half) / nb), {P}, {WS_B})
            losses[1] = l1
            counts[1] = c1
    return losses[0] + losses[1], counts[0] + counts[1]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def train_epoch_halves(X, T, order, batch_size, hyper, step0, seed, {P}, {WS}, {STATES} Xb, Tb, {WS_B}):
    """train_epoch with each batch's gradients computed as two halves on two threads
    (both_halves: the first half's rows into the work buffers, the second's into the ``_b``
    ones), then one update from the two gradient sums (update_pair).  The caller holds BLAS to
    one thread.  Same returns as train_epoch; a batch of one row runs whole."""
{GATHER_HALVES}
        if nb < 2:
            loss, c = half_grads(Xs, Ts, {FT}(1.0), {P}, {WS})
        else:
            loss, c = both_halves(Xs, Ts, (nb + 1) // 2, {P}, {WS}, {WS_B})
        if not np.isfinite(loss):
            return total, correct, t - step0, start // batch_size
        t += 1
        if nb < 2:
            pen = update({P}, {GRADS}, {STATES} hyper, t)
        else:
            pen = update_pair({P}, {GRADS}, {GRADS_B}, {STATES} hyper, t)
        total += loss + pen * nb
        correct += c
    return total, correct, t - step0, -1
'''


_EXCHANGE_GLUE = '''
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def slice_deltas(X, T, scale, rows, row0, seed, {P}, {WS}):
    """slice_grads for the δ-exchange step: the forward pass, Σ ℓ over this process's rows, δ of
    every layer (δ_L scaled by its rows / ``rows``) and the gradients update_rows does not carry."""
    nb = X.shape[0]
    {FORWARD_SLICE}
    loss, c = loss_rows({OUT_SLICED}, T, {DL}[:nb])
    {DL}[:nb] *= scale
    backward_deltas(X, {P}, {SLICED}, {GRADS})
    return loss, c
'''


def generate_train_source(derivation: Derivation, dtype: str, optimizer, model_module: str,
                          workspace: tuple | None = None) -> str:
    """The training module text for ``optimizer`` (see :meth:`CpuModule.build_train`)."""
    return CpuModule(derivation, dtype).build_train(optimizer, model_module, workspace)


def generate_source(derivation: Derivation, dtype: str) -> str:
    """The model module text for a derivation (see the module docstring)."""
    return CpuModule(derivation, dtype).build().source
