"""Code generation: a :class:`~symbp.derive.Derivation` becomes one readable Python module.

The module holds, as ``@njit(cache=True)`` functions:

``forward``          z_l = a_{l-1} W_lᵀ + b_l and a_l = f(z_l), layer by layer
``loss_rows``        the per-sample loss and δ_L (the loss gradient at the logits) in one pass
``backward``         every ∂C/∂θ and the δ recurrence
``loss_and_grads``, ``evaluate``, ``logits``   the glue a model calls

and, per optimizer, a training module (:meth:`_Builder.build_train`) with the backward pass
and that optimizer's update rule fused in, and the epoch loop.

Every formula the functions evaluate is printed from the derivation's SymPy expressions;
the module's header lists them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import sympy as sp

from . import codegen_image
from ._version import __version__
from .backends.cpu import NumbaPrinter, emit, helper_source
from .derive import Derivation
from .indices import N, l2, n, p
from .lower import Gemm, Loop, RowLoop, fuse_update, row_reductions

T_STEP = sp.Symbol("t", positive=True, integer=True)  # the update's step number, from 1

# An optimizer update loop over at least this many entries runs on all cores (prange).
# Measured on the 2-core machine (Adam, added ms per step over SGD, best runs): the medium MLP
# (784·256 + 256·256 weights, all in L3) +0.175 serial vs +0.23 with prange, since waking
# OpenMP's threads while OpenBLAS's own are still spinning costs more than the loop; the large
# MLP (784·1024 + 1024·1024, past L3, bound by memory bandwidth) +1.5–3.3 serial vs
# +0.9–1.4 with prange.  2^18 entries falls between the two.
PARALLEL_UPDATE_MIN = 1 << 18


def one_line(text: str) -> str:
    """``text`` on one line: its line breaks shown as ``\\n`` (a user's formula may hold some)."""
    return text.replace("\r\n", "\\n").replace("\r", "\\r").replace("\n", "\\n")


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r"}


def docstring(text: str) -> str:
    """``text`` as a triple-quoted string literal whose value is exactly ``text``, whatever it
    holds (it carries users' formulas into generated modules' docstrings).

    A backslash is doubled (``\\x``, ``\\N{…}``, ``\\u12`` or a trailing ``\\`` would otherwise be
    an escape, often a SyntaxError); a quote before another quote or the end is escaped, so
    no ``\"\"\"`` closes the literal early; characters that are not printable (NUL, lone
    surrogates, other line separators) are written as escapes.  Printable text, newlines
    and single quotes stay as they are, readable in the source.
    """
    out = []
    for pos, ch in enumerate(text):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch == '"':
            out.append('\\"' if pos + 1 == len(text) or text[pos + 1] == '"' else ch)
        elif ch == "\n" or ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"""' + "".join(out) + '"""'


_EMPTY_ARG = re.compile(r"(?<=[(,]) ?,|, (?=\))|\( (?=\w)")


def tidy_args(src: str) -> str:
    """The glue templates with an empty group of names (no parameters: a fixed feature
    extractor) left no ``f(X, , Z1)``: each empty slot and its comma removed."""
    while True:
        new = _EMPTY_ARG.sub(lambda m: "(" if m.group(0).startswith("(") else "", src)
        if new == src:
            return src
        src = new


@dataclass
class ModuleLayout:
    """What a model needs to call the generated functions."""

    params: list[str]  # argument order of the parameters
    workspace: list[tuple[str, tuple]]  # (name, shape); "batch" stands for the batch size
    source: str


class _Builder:
    def __init__(self, d: Derivation, dtype: str) -> None:
        self.d = d
        self.dtype = dtype
        net = d.network
        self.l2_value = sp.nsimplify(net.l2, rational=True) if net.l2 else sp.Integer(0)
        names: dict = {"x": "X", "t": "T", N: "nbf"}
        # Widths keep their names in loop bounds (``for i in range(d1)``): module constants.
        extents: dict = {N: "nb", **{d.dims[l]: f"d{l}" for l in range(len(net.widths))}}
        self.params, self.workspace = [], []
        #: work buffer -> its role: "activation" (written by the forward pass, read by the
        #: backward one), "delta" (∂C/∂ of an activation or stage), "gradient" (∂C/∂θ)
        self.roles: dict[str, str] = {}
        self.names, self.flat = names, {}  # flat: label -> (C, H, W) of a buffer stored (batch, C·H·W)
        self.extents = extents
        if len(net.shapes[0]) == 3:
            self.flat["x"] = net.shapes[0]
        for ld in d.layers:
            codegen_image.setup(self, ld)
        shapes = net.param_shapes()
        for ld in d.layers:
            lid = ld.index
            for key in ld.params:
                self.buffer(f"d{key}{lid}", shapes[f"{key}{lid}"], "gradient")
                names[f"g{key}{lid}"] = f"d{key}{lid}"

    def buffer(self, name: str, shape: tuple, role: str) -> None:
        """Add a work buffer (``"batch"`` in ``shape`` stands for the batch size)."""
        self.workspace.append((name, shape))
        self.roles[name] = role

    def extent(self, dim) -> sp.Expr | int:
        """A loop extent: a width keeps its symbol (printed as its module constant), any
        other size becomes its number."""
        if dim in self.extents:
            return dim
        return int(self.value(dim) if isinstance(dim, sp.Basic) else dim)

    @staticmethod
    def grad_base(ld, key: str) -> sp.IndexedBase:
        return sp.IndexedBase(f"g{key}{ld.index}")

    def printer(self) -> NumbaPrinter:
        pr = NumbaPrinter(self.dtype, dict(self.names))
        pr.extents = dict(self.extents)
        pr.flat = dict(self.flat)
        return pr

    def value(self, expr: sp.Expr) -> sp.Expr:
        """Fix the compile-time constants (λ, the layer widths) and drop the symbolic shapes
        of indexed bases, so that one array is one SymPy object however it was built."""
        widths = {self.d.dims[l]: w for l, w in enumerate(self.d.network.widths)}
        expr = expr.subs({l2: self.l2_value, **widths, **self.d.sizes})
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.shape is not None,
                            lambda e: sp.IndexedBase(e.base.label)[e.indices])

    # -- steps -------------------------------------------------------------------------
    def forward_steps(self, ld) -> list:
        return codegen_image.forward_steps(self, ld)

    def loss_step(self) -> RowLoop:
        d, out = self.d, self.d.layers[-1]
        delta = out.delta_formula
        for base, definition in d.loss.definitions.items():
            delta = delta.subs(base[n, p], definition.subs(d.loss.y, out.a))
        per_sample = d.loss.per_sample.subs(d.loss.y, out.a)
        reductions, (value, delta) = row_reductions([self.value(per_sample), self.value(delta)], n)
        task = d.network.loss.task
        return RowLoop(
            n, N, reductions, [(sp.Symbol("total"), value)], p, d.dims[-1],
            [(self.value(out.delta[n, p]), delta)],
            argmax_match=(out.a, d.loss.t) if task == "multiclass" else None,
            threshold_match=(out.a, d.loss.t) if task == "binary" else None,
        )

    def update_steps(self, ld, key: str, gemm_steps: list, g_expr: sp.Expr, opt) -> tuple[list, list]:
        """The optimizer's statements for parameter ``key`` of layer ``ld``.

        Returns (steps that may run now, steps that must wait until δ_{l-1} has read the
        old W_l).  An update linear in a GEMM result (plain SGD) rides on that GEMM.
        """
        theta = self.value(ld.params[key][ld.param_idx[key]])
        idx = theta.indices
        name = f"{key}{ld.index}"
        state = {s_: sp.IndexedBase(f"{s_}_{name}")[idx] for s_ in opt.state_names}
        for s_ in opt.state_names:
            self.names[f"{s_}_{name}"] = f"{s_}_{name}"
        stmts = opt.rules(theta, g_expr, state, self.hyper_symbols, T_STEP)
        ranges = [(sym, self.extent(ext)) for sym, ext in zip(ld.param_idx[key], ld.param_dims[key])]
        penalty = [(sp.Symbol("penalty"), self.value(l2 / 2 * theta**2))] if key in ld.decay and self.l2_value else []
        temp = self.grad_base(ld, key)[idx]
        if len(stmts) == 1 and gemm_steps and isinstance(gemm_steps[0], Gemm):
            fused = fuse_update(gemm_steps[0], stmts[0][1], theta, temp)
            if fused is not None:
                # θ ← β·θ + α·op(A)op(B): one GEMM, no gradient buffer, no extra pass.
                return gemm_steps[1:], ([Loop(ranges, [], penalty)] if penalty else []) + [fused]
        size = math.prod(self.d.network.param_shapes()[name])
        return gemm_steps, [Loop(ranges, stmts, penalty, parallel=size >= PARALLEL_UPDATE_MIN)]

    def grad_steps(self, ld, opt=None) -> tuple[list, list]:
        """Steps for ∂C/∂θ of layer ``ld``; with an optimizer, also its update steps (second
        list: they run after δ_{l-1} has used the old parameters)."""
        return codegen_image.grad_steps(self, ld, opt, ld.index == 1)

    def delta_steps(self, ld) -> list:
        return codegen_image.delta_steps(self, ld)

    def backward_steps(self, opt=None) -> list:
        steps = []
        for pos in range(len(self.d.layers) - 1, -1, -1):
            ld = self.d.layers[pos]
            grads, updates = self.grad_steps(ld, opt)
            steps += grads
            if pos > 0:
                steps += self.delta_steps(self.d.layers[pos - 1])
            steps += updates
        return steps

    def penalty_steps(self) -> list:
        if not self.l2_value:
            return []
        return [
            Loop([(sym, self.extent(ext)) for sym, ext in zip(ld.param_idx[key], ld.param_dims[key])], [],
                 [(sp.Symbol("penalty"), self.value(l2 / 2 * ld.params[key][ld.param_idx[key]] ** 2))])
            for ld in self.d.layers for key in ld.decay
        ]

    # -- printing ----------------------------------------------------------------------
    def function(self, name: str, args: list[str], prologue: list[str], steps: list, epilogue: list[str], doc: str) -> str:
        pr = self.printer()
        body = list(prologue)
        for step in steps:
            body += emit(step, pr)
        body += epilogue
        self.helpers |= pr.helpers_used
        parallel = any(getattr(step, "parallel", False) for step in steps)
        flags = 'cache=True, fastmath=FASTMATH, error_model="numpy"' + (", parallel=True" if parallel else "")
        lines = [f"@njit({flags})", f"def {name}({', '.join(args)}):", f'    """{doc}"""']
        lines += ["    " + line if line else "" for line in body]
        return "\n".join(lines) + "\n"

    def _buffers(self) -> dict[str, list[str]]:
        ws = [w[0] for w in self.workspace]
        last = self.names[f"a{len(self.d.layers)}"]
        return {
            "P": self.params, "WS": ws,
            "acts": [w for w in ws if self.roles[w] == "activation"],
            "deltas": [w for w in ws if self.roles[w] == "delta"],
            "grads": [w for w in ws if self.roles[w] == "gradient"],
            "last": [last],
            # δ_L may read z_L as well as a_L (relu′, a custom f′): pass both when they differ.
            "out": sorted({self.names[f"z{len(self.d.layers)}"], last}),
            "dl": [self.names[f"delta{len(self.d.layers)}"]],  # δ_L, which loss_rows writes
        }

    def _blas_import(self) -> str:
        kind = "s" if self.dtype == "float32" else "d"
        return f"from symbp.backends.blas import {kind}gemm as gemm, {kind}gemm_block as gemm_block"

    @property
    def float_type(self) -> str:
        return "np.float32" if self.dtype == "float32" else "np.float64"

    def _prelude(self) -> list[str]:
        return ["nb = X.shape[0]", f"scal = np.empty(2, {self.float_type})  # alpha and beta, passed to BLAS by address"]

    def build(self) -> ModuleLayout:
        """The model module: forward, loss, gradients, evaluation."""
        self.helpers: set[str] = set()
        B = self._buffers()
        P, acts, deltas, grads, out = B["P"], B["acts"], B["deltas"], B["grads"], B["out"]
        ft = self.float_type
        fns = [
            self.function("forward", ["X"] + P + acts, self._prelude(),
                          [s for ld in self.d.layers for s in self.forward_steps(ld)], [],
                          "Forward pass over a batch; fills Z (pre-activations) and A (outputs)."),
            self.function("loss_rows", out + ["T", B["dl"][0]],
                          [f"nb = {B['last'][0]}.shape[0]", f"nbf = {ft}(nb)", "total = 0.0", "correct = 0"],
                          [self.loss_step()], ["return total, correct"],
                          "Σ_n ℓ_n over the batch and δ_L = ∂C/∂z_L; counts correct predictions for classifiers."),
            self.function("backward", ["X"] + P + acts + deltas + grads, self._prelude(), self.backward_steps(), [],
                          "∂C/∂θ for every parameter, given δ_L from loss_rows."),
            self.function("penalty", P, ["penalty = 0.0"], self.penalty_steps(), ["return penalty"],
                          "(λ/2) Σ_l ‖W_l‖²."),
        ]
        fns.append(tidy_args(_GLUE.format(**self._glue_names(B))))
        consts = [f"d{l} = {w}" for l, w in enumerate(self.d.network.widths)]
        src = "\n".join([
            self.header(), "import math", "", "import numpy as np", "from numba import njit", "",
            self._blas_import(), "",
            f"ONE = {ft}(1.0)", f"ZERO = {ft}(0.0)", f"HALF = {ft}(0.5)",
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
        return ModuleLayout(P, self.workspace, src)

    @staticmethod
    def _glue_names(B: dict) -> dict:
        def join(names, sliced=False):
            return ", ".join(f"{w}[:nb]" if sliced else w for w in names)

        return {
            "P": join(B["P"]), "WS": join(B["WS"]), "ACTS": join(B["acts"]), "DELTAS": join(B["deltas"]),
            "GRADS": join(B["grads"]), "LAST": B["last"][0], "DL": B["dl"][0], "OUT": join(B["out"]),
            "OUT_SLICED": join(B["out"], True), "ACTS_SLICED": join(B["acts"], True),
            "SLICED": join(B["acts"] + B["deltas"], True),
        }

    def build_train(self, opt, model_module: str) -> str:
        """The training module for one optimizer: the backward pass with its update rule
        fused in, and the epoch loop.  It imports the forward pass and loss from the model
        module (``model_module``, already imported under that name)."""
        self.helpers = set()
        B = self._buffers()
        self.hyper_symbols = {k: sp.Symbol(f"h_{k}", real=True) for k in opt.hyper}
        states = [f"{s_}_{name}" for name in B["P"] for s_ in opt.state_names]
        ft = self.float_type
        read_hyper = [f"h_{k} = {ft}(hyper[{i}])" for i, k in enumerate(opt.hyper)]
        update = self.function(
            "backward_update", ["X"] + B["P"] + B["acts"] + B["deltas"] + B["grads"] + states + ["hyper", "t"],
            self._prelude() + read_hyper + ["penalty = 0.0"], self.backward_steps(opt), ["return penalty"],
            f"Backward pass with the {opt.name} update fused in (step t); returns the l2 penalty before the step.")
        rules = "\n".join(f"    {target} <- {expr}" for target, expr in opt.formulas())
        names = self._glue_names(B)
        names["STATES"] = ", ".join(states) + ("," if states else "")
        consts = ", ".join(f"d{l}" for l in range(len(self.d.network.widths)))
        src = "\n".join([
            docstring(f"symbp-generated training step for {self.d.network.name} ({self.dtype}) with {one_line(repr(opt))}."
                      "\n\nUpdate rule (SymPy), for each parameter theta with gradient g, at step t:\n" + rules + "\n"),
            "import math", "", "import numpy as np", "from numba import njit, prange", "",
            self._blas_import(),
            f"from {model_module} import FASTMATH, ONE, ZERO, HALF, {consts}, forward, loss_rows", "",
            f"STATES = {tuple(states)!r}", f"HYPER = {tuple(opt.hyper)!r}", "",
            helper_source(self.helpers), update, tidy_args(_TRAIN.format(**names)),
        ])
        return src

    def header(self) -> str:
        d = self.d
        lines = [f"symbp-generated module for {d.network.name} ({self.dtype}); symbp {__version__}.",
                 "Do not edit: regenerated from the network spec when it changes.", "", "Formulas (SymPy):"]
        for ld in d.layers:
            # describe() of a custom activation is the user's text, comments included.
            lines.append(f"  layer {ld.index} ({ld.layer.kind}, {one_line(ld.layer.activation.describe())}):")
            lines += [f"    {st.target[(n, *st.idx)]} = {st.formula}" for st in ld.stages]
            lines += [f"    {ld.a[(n, *ld.out_idx)]} = {ld.output}", f"    {ld.delta[(n, *ld.delta_idx)]} = {ld.delta_formula}"]
            for key, g in ld.grads.items():
                lines.append(f"    dC/d{key}{ld.index} = {g}")
        lines += [f"  loss per sample: {d.loss.per_sample}", f"  dloss/dy[n, p] = {d.loss.grad}"]
        for base, definition in d.loss.definitions.items():
            lines.append(f"    where {base}[n, p] = {definition}")
        lines.append(f"  l2: lambda = {d.network.l2}")
        return docstring("\n".join(lines) + "\n")


_GLUE = '''
@njit(cache=True)
def loss_and_grads(X, T, {P}, {WS}):
    """Mean loss over the batch plus the l2 penalty, and all gradients."""
    forward(X, {P}, {ACTS})
    total, correct = loss_rows({OUT}, T, {DL})
    backward(X, {P}, {ACTS}, {DELTAS}, {GRADS})
    return total / X.shape[0] + penalty({P}), correct


@njit(cache=True)
def evaluate(X, T, {P}, {WS}, chunk):
    """Σ_n ℓ_n and argmax hits over a data set, in chunks of the workspace's size."""
    total, correct = 0.0, 0
    for start in range(0, X.shape[0], chunk):
        stop = min(start + chunk, X.shape[0])
        nb = stop - start
        forward(X[start:stop], {P}, {ACTS_SLICED})
        t, c = loss_rows({OUT_SLICED}, T[start:stop], {DL}[:nb])
        total += t
        correct += c
    return total, correct


@njit(cache=True)
def logits(X, {P}, {ACTS}):
    forward(X, {P}, {ACTS})
    return {LAST}
'''


_TRAIN = '''
@njit(cache=True)
def train_epoch(X, T, order, batch_size, hyper, step0, {P}, {WS}, {STATES} Xb, Tb):
    """One epoch of mini-batch training over ``order``.

    Returns (Σ loss, correct predictions, updates made, index of the batch whose loss was
    not finite or -1).  A non-finite batch stops the epoch before its update, so the
    parameters are the last good ones.
    """
    total, correct = 0.0, 0
    t = step0
    for start in range(0, X.shape[0], batch_size):
        stop = min(start + batch_size, X.shape[0])
        nb = stop - start
        for r in range(nb):
            Xb[r] = X[order[start + r]]
            Tb[r] = T[order[start + r]]
        forward(Xb[:nb], {P}, {ACTS_SLICED})
        loss, c = loss_rows({OUT_SLICED}, Tb[:nb], {DL}[:nb])
        if not np.isfinite(loss):
            return total, correct, t - step0, start // batch_size
        t += 1
        pen = backward_update(Xb[:nb], {P}, {SLICED}, {GRADS}, {STATES} hyper, t)
        total += loss + pen * nb
        correct += c
    return total, correct, t - step0, -1
'''


def generate_train_source(derivation: Derivation, dtype: str, optimizer, model_module: str) -> str:
    """The training module text for ``optimizer`` (see :meth:`_Builder.build_train`)."""
    return _Builder(derivation, dtype).build_train(optimizer, model_module)


def generate_source(derivation: Derivation, dtype: str) -> str:
    """The model module text for a derivation (see the module docstring)."""
    return _Builder(derivation, dtype).build().source
