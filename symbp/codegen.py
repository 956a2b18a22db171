"""Code generation: a :class:`~symbp.derive.Derivation` becomes one readable Python module.

The module holds, as ``@njit(cache=True)`` functions:

``forward``          z_l = a_{l-1} W_lᵀ + b_l and a_l = f(z_l), layer by layer
``loss_rows``        the per-sample loss and δ_L (the loss gradient at the logits) in one pass
``backward``         every ∂C/∂θ and the δ recurrence
``backward_sgd``     the same with the SGD update fused into the gradient loops
``loss_and_grads``, ``evaluate``, ``train_epoch_sgd``   the glue a model calls

Every formula the functions evaluate is printed from the derivation's SymPy expressions;
the module's header lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ._version import __version__
from .backends.cpu import NumbaPrinter, emit, helper_source
from .derive import Derivation, l2
from .indices import N, i, n, p, q
from .lower import Gemm, Loop, RowLoop, fuse_update, row_reductions, split_sums

lr = sp.Symbol("lr", positive=True)


class SGDRule:
    """θ ← θ − η g: the update every fused SGD loop evaluates (η is ``lr``)."""

    name = "sgd"

    @staticmethod
    def update(theta: sp.Expr, g: sp.Expr) -> sp.Expr:
        return theta - lr * g


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
        names: dict = {"x": "X", "t": "T", N: "nbf", lr: "lr"}
        extents: dict = {N: "nb"}
        self.params, self.workspace = [], []
        for ld in d.layers:
            lid = ld.index
            extents[d.dims[lid]] = f"d{lid}"
            names[f"W{lid}"], names[f"b{lid}"] = f"W{lid}", f"b{lid}"
            names[f"z{lid}"], names[f"delta{lid}"] = f"Z{lid}", f"dZ{lid}"
            names[f"a{lid}"] = f"Z{lid}" if ld.layer.activation.is_identity else f"A{lid}"
            self.params += [f"W{lid}", f"b{lid}"]
            self.workspace.append((f"Z{lid}", ("batch", net.widths[lid])))
            if not ld.layer.activation.is_identity:
                self.workspace.append((f"A{lid}", ("batch", net.widths[lid])))
            self.workspace.append((f"dZ{lid}", ("batch", net.widths[lid])))
        for ld in d.layers:
            lid = ld.index
            self.workspace += [(f"dW{lid}", (net.widths[lid], net.widths[lid - 1])), (f"db{lid}", (net.widths[lid],))]
            names[f"gW{lid}"], names[f"gb{lid}"] = f"dW{lid}", f"db{lid}"
        extents[d.dims[0]] = "d0"
        self.names, self.extents = names, extents

    @staticmethod
    def grad_base(ld, key: str) -> sp.IndexedBase:
        return sp.IndexedBase(f"g{key}{ld.index}")

    def printer(self) -> NumbaPrinter:
        pr = NumbaPrinter(self.dtype, dict(self.names))
        pr.extents = dict(self.extents)
        return pr

    def value(self, expr: sp.Expr) -> sp.Expr:
        """Fix the compile-time constants: λ and the layer widths."""
        widths = {self.d.dims[l]: w for l, w in enumerate(self.d.network.widths)}
        return expr.subs({l2: self.l2_value, **widths})

    # -- steps -------------------------------------------------------------------------
    def forward_steps(self, ld) -> list:
        steps, expr = split_sums(ld.forward, ld.z, (n, i), lambda s: ld.z)
        stmts = [(ld.z[n, i], self.value(expr))]
        if not ld.layer.activation.is_identity:
            stmts.append((ld.a[n, i], self.value(ld.output)))
        return steps + [Loop([(n, N), (i, self.d.dims[ld.index])], stmts)]

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
            [(out.delta[n, p], delta)],
            argmax_match=(out.a, d.loss.t) if task == "multiclass" else None,
            threshold_match=(out.a, d.loss.t) if task == "binary" else None,
        )

    def grad_steps(self, ld, fused_rule=None) -> tuple[list, list]:
        """Steps for ∂C/∂W_l, ∂C/∂b_l; with ``fused_rule`` the update loops come separately,
        to run after δ_{l-1} has used the old W_l."""
        gW, gb = self.grad_base(ld, "W"), self.grad_base(ld, "b")
        W, b = ld.params["W"], ld.params["b"]
        steps, w_expr = split_sums(self.value(ld.grads["W"]), gW, (p, q), lambda s: gW)
        more, b_expr = split_sums(self.value(ld.grads["b"]), gb, (p,), lambda s: gb)
        steps += more
        w_ranges = [(p, self.d.dims[ld.index]), (q, self.d.dims[ld.index - 1])]
        b_ranges = [(p, self.d.dims[ld.index])]
        if fused_rule is None:
            if w_expr != gW[p, q]:
                steps.append(Loop(w_ranges, [(gW[p, q], w_expr)]))
            return steps, []
        penalty = [(sp.Symbol("penalty"), self.value(l2 / 2 * W[p, q] ** 2))] if self.l2_value else []
        w_target = self.value(W[p, q])  # with the widths substituted, as in w_expr
        w_update = fused_rule.update(w_target, w_expr)
        fused = fuse_update(steps[0], w_update, w_target, gW[p, q]) if isinstance(steps[0], Gemm) else None
        if fused is not None:
            # The update rides on the GEMM (β·W + α·δᵀa): no gradient buffer, no extra pass.
            steps = steps[1:]
            w_steps = ([Loop(w_ranges, [], penalty)] if penalty else []) + [fused]
        else:
            w_steps = [Loop(w_ranges, [(w_target, w_update)], penalty)]
        updates = w_steps + [Loop(b_ranges, [(b[p], fused_rule.update(b[p], b_expr))])]
        return steps, updates

    def delta_steps(self, ld) -> list:
        steps, expr = split_sums(ld.delta_formula, ld.delta, (n, p), lambda s: ld.delta)
        return steps + [Loop([(n, N), (p, self.d.dims[ld.index])], [(ld.delta[n, p], self.value(expr))])]

    def backward_steps(self, fused_rule=None) -> list:
        steps = []
        for pos in range(len(self.d.layers) - 1, -1, -1):
            ld = self.d.layers[pos]
            grads, updates = self.grad_steps(ld, fused_rule)
            steps += grads
            if pos > 0:
                steps += self.delta_steps(self.d.layers[pos - 1])
            steps += updates
        return steps

    def penalty_steps(self) -> list:
        if not self.l2_value:
            return []
        return [
            Loop([(p, self.d.dims[ld.index]), (q, self.d.dims[ld.index - 1])], [],
                 [(sp.Symbol("penalty"), self.value(l2 / 2 * ld.params["W"][p, q] ** 2))])
            for ld in self.d.layers
        ]

    # -- printing ----------------------------------------------------------------------
    def function(self, name: str, args: list[str], prologue: list[str], steps: list, epilogue: list[str], doc: str) -> str:
        pr = self.printer()
        body = list(prologue)
        for step in steps:
            body += emit(step, pr)
        body += epilogue
        self.helpers |= pr.helpers_used
        lines = ["@njit(cache=True)", f"def {name}({', '.join(args)}):", f'    """{doc}"""']
        lines += ["    " + line if line else "" for line in body]
        return "\n".join(lines) + "\n"

    def build(self) -> ModuleLayout:
        self.helpers: set[str] = set()
        P, WS = self.params, [w[0] for w in self.workspace]
        acts = [w[0] for w in self.workspace if w[0].startswith(("Z", "A"))]
        deltas = [w[0] for w in self.workspace if w[0].startswith("dZ")]
        grads = [w[0] for w in self.workspace if w[0].startswith(("dW", "db"))]
        last = self.names[f"a{len(self.d.layers)}"]
        # δ_L may read z_L as well as a_L (relu′, a custom f′): pass both when they differ.
        out_bufs = sorted({f"Z{len(self.d.layers)}", last})
        ft = "np.float32" if self.dtype == "float32" else "np.float64"
        batch = ["nb = X.shape[0]", f"scal = np.empty(2, {ft})  # alpha and beta, passed to BLAS by address"]
        fns = [
            self.function("forward", ["X"] + P + acts, batch,
                          [s for ld in self.d.layers for s in self.forward_steps(ld)], [],
                          "Forward pass over a batch; fills Z (pre-activations) and A (outputs)."),
            self.function("loss_rows", out_bufs + ["T", deltas[-1]],
                          [f"nb = {last}.shape[0]", f"nbf = {ft}(nb)", "total = 0.0", "correct = 0"],
                          [self.loss_step()], ["return total, correct"],
                          "Σ_n ℓ_n over the batch and δ_L = ∂C/∂z_L; counts correct predictions for classifiers."),
            self.function("backward", ["X"] + P + acts + deltas + grads, batch, self.backward_steps(), [],
                          "∂C/∂θ for every parameter, given δ_L from loss_rows."),
            self.function("penalty", P, ["penalty = 0.0"], self.penalty_steps(), ["return penalty"],
                          "(λ/2) Σ_l ‖W_l‖²."),
            self.function("backward_sgd", ["X"] + P + acts + deltas + grads + ["lr"],
                          batch + ["penalty = 0.0"], self.backward_steps(SGDRule), ["return penalty"],
                          "Backward pass with θ ← θ − lr·∂C/∂θ fused in; returns the l2 penalty before the step."),
        ]
        fns.append(_GLUE.format(P=", ".join(P), WS=", ".join(WS), ACTS=", ".join(acts), DELTAS=", ".join(deltas),
                                GRADS=", ".join(grads), LAST=last, DL=deltas[-1], OUT=", ".join(out_bufs),
                                OUT_SLICED=", ".join(f"{b}[:nb]" for b in out_bufs),
                                ACTS_SLICED=", ".join(f"{w}[:nb]" for w in acts),
                                SLICED=", ".join(f"{w}[:nb]" for w in acts + deltas)))
        header = self.header()
        consts = [f"d{l} = {w}" for l, w in enumerate(self.d.network.widths)]
        one = f"{ft}(1.0)"
        src = "\n".join([
            header, "import math", "", "import numpy as np", "from numba import njit", "",
            f"from symbp.backends.blas import {'sgemm' if self.dtype == 'float32' else 'dgemm'} as gemm", "",
            f"ONE = {one}", f"ZERO = {ft}(0.0)", f"HALF = {ft}(0.5)",
            *consts, "",
            "# What the model passes in: its parameters, then the work buffers (\"batch\" = batch size).",
            f"PARAMS = {tuple(P)!r}",
            f"WORKSPACE = {tuple(self.workspace)!r}",
            f"DTYPE = {self.dtype!r}", "", helper_source(self.helpers), *fns,
        ])
        return ModuleLayout(P, self.workspace, src)

    def header(self) -> str:
        d = self.d
        lines = [f"symbp-generated module for {d.network.name} ({self.dtype}); symbp {__version__}.",
                 "Do not edit: regenerated from the network spec when it changes.", "", "Formulas (SymPy):"]
        for ld in d.layers:
            lines += [f"  layer {ld.index} ({ld.layer.kind}, {ld.layer.activation.describe()}):",
                      f"    z{ld.index}[n, i] = {ld.forward}", f"    a{ld.index}[n, i] = {ld.output}",
                      f"    delta{ld.index}[n, p] = {ld.delta_formula}"]
            for key, g in ld.grads.items():
                lines.append(f"    dC/d{key}{ld.index} = {g}")
        lines += [f"  loss per sample: {d.loss.per_sample}", f"  dloss/dy[n, p] = {d.loss.grad}"]
        for base, definition in d.loss.definitions.items():
            lines.append(f"    where {base}[n, p] = {definition}")
        lines.append(f"  l2: lambda = {d.network.l2}")
        return '"""' + "\n".join(lines).replace('"""', "'''") + '\n"""'


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


@njit(cache=True)
def train_epoch_sgd(X, T, order, batch_size, lr, {P}, {WS}, Xb, Tb):
    """One epoch of mini-batch SGD in batches of ``order``; returns Σ loss and argmax hits."""
    total, correct = 0.0, 0
    for start in range(0, X.shape[0], batch_size):
        stop = min(start + batch_size, X.shape[0])
        nb = stop - start
        for r in range(nb):
            Xb[r] = X[order[start + r]]
            Tb[r] = T[order[start + r]]
        forward(Xb[:nb], {P}, {ACTS_SLICED})
        t, c = loss_rows({OUT_SLICED}, Tb[:nb], {DL}[:nb])
        pen = backward_sgd(Xb[:nb], {P}, {SLICED}, {GRADS}, lr)
        total += t + pen * nb
        correct += c
    return total, correct
'''


def generate_source(derivation: Derivation, dtype: str) -> str:
    """The module text for a derivation (see the module docstring)."""
    return _Builder(derivation, dtype).build().source
