"""The plan: one derivation in, every buffer named and tagged, every kernel step in order.

:class:`Plan` is target-neutral: it names the arrays of a network (parameters, activations,
stage buffers, deltas, gradients, optimizer state), tags each work buffer with its role,
and lowers the derivation layer by layer (:mod:`symbp.lower.stages`) into the steps of a
forward pass, a loss pass, a backward pass and an optimizer's fused update.  A backend's
module printer (``symbp.backends.<target>.module``) subclasses it and prints the steps.
"""

from __future__ import annotations

import math

import sympy as sp

from ..derive import Derivation
from ..indices import N, l2, n, p
from . import stages
from .ir import Gemm, Loop, RowLoop
from .patterns import fuse_update, row_reductions

T_STEP = sp.Symbol("t", positive=True, integer=True)  # the update's step number, from 1

# An optimizer update loop over at least this many entries runs on all cores (prange).
# Measured on the 2-core machine (Adam, added ms per step over SGD, best runs): the medium MLP
# (784·256 + 256·256 weights, all in L3) +0.175 serial vs +0.23 with prange, since waking
# OpenMP's threads while OpenBLAS's own are still spinning costs more than the loop; the large
# MLP (784·1024 + 1024·1024, past L3, bound by memory bandwidth) +1.5–3.3 serial vs
# +0.9–1.4 with prange.  2^18 entries falls between the two.
PARALLEL_UPDATE_MIN = 1 << 18


class Plan:
    """Buffers and steps of one derivation, for one dtype."""

    #: whether a conv's im2col buffers may hold the batch inside their rows (one GEMM over
    #: the batch in the best form, see stages._col_ranges): a backend whose printer indexes
    #: them (common._inner_index) and whose GEMM takes shapes that count the batch says so
    batch_inner = False

    def __init__(self, d: Derivation, dtype: str) -> None:
        self.d = d
        self.dtype = dtype
        #: print the data-parallel kernels' variant: batch statistics summed over the
        #: processes (a Sync after each), Dropout's draws at the process's rows of the batch
        self.sync = False
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
        self.inner: set[str] = set()  # labels of flat buffers stored with the batch inside (batch_inner)
        self.extents = extents
        #: buffers holding one value for the whole batch (BatchNorm's statistics and their
        #: gradients): stored (1, size) and read at row 0, so that slicing a work buffer to
        #: a short batch ([:nb]) never cuts them
        self.batch_labels: dict[str, int] = {}  # label -> its number of indices (before row 0)
        if len(net.shapes[0]) == 3:
            self.flat["x"] = net.shapes[0]
        for ld in d.layers:
            stages.setup(self, ld)
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

    def value(self, expr: sp.Expr) -> sp.Expr:
        """Fix the compile-time constants (λ, the layer widths) and drop the symbolic shapes
        of indexed bases, so that one array is one SymPy object however it was built."""
        widths = {self.d.dims[l]: w for l, w in enumerate(self.d.network.widths)}
        rule = {k: sp.sympify(v) for k, v in {l2: self.l2_value, **widths, **self.d.sizes}.items()}
        expr = sp.sympify(expr).xreplace(rule)
        expr = expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.shape is not None,
                            lambda e: sp.IndexedBase(e.base.label)[e.indices])
        if self.batch_labels:
            expr = expr.replace(lambda e: isinstance(e, sp.Indexed)
                                and self.batch_labels.get(str(e.base.label)) == len(e.indices),
                                lambda e: sp.IndexedBase(e.base.label)[(0, *e.indices)])
        return expr

    def forward_steps(self, ld, train: bool = False) -> list:
        """Layer ``ld``'s forward pass: outside training (``train=False``) a layer with running
        statistics reads them instead of computing its batch statistics."""
        return stages.forward_steps(self, ld, train)

    def running_steps(self) -> list:
        """The running statistics' updates after a training forward pass (BatchNorm)."""
        return [step for ld in self.d.layers for step in stages.running_steps(self, ld)]

    @property
    def has_modes(self) -> bool:
        """Whether training and inference run different forward passes."""
        return any(ld.eval_subs or any(st.batch for st in ld.stages) for ld in self.d.layers)

    def loss_step(self) -> RowLoop:
        d, out = self.d, self.d.layers[-1]
        delta = out.delta_formula
        if len(out.delta_idx) == 3:
            # An image output's δ is derived at (p, r, s); the loop runs over its flat
            # position p, where every array the formula reads has its entry.
            at = {(n, *out.delta_idx), (n, out.flat_position())}
            delta = delta.replace(lambda e: isinstance(e, sp.Indexed) and e.indices in at, lambda e: e.base[n, p])
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

    def update_steps(self, ld, key: str, gemm_steps: list, g_expr: sp.Expr, opt,
                     rows_of_array: bool = False) -> tuple[list, list]:
        """The optimizer's statements for parameter ``key`` of layer ``ld``.

        Returns (steps that may run now, steps that must wait until the δ of every layer ``ld``
        reads has read the old θ).  An update linear in a GEMM result (plain SGD) rides on that GEMM.
        ``rows_of_array``: the loop over θ's first index runs over the rows of the array passed
        (``W1.shape[0]``), so the update can be given a block of rows (a process's share).
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
        if rows_of_array:
            ranges[0] = (ranges[0][0], sp.Symbol(f"{self.names.get(name, name)}.shape[0]"))
        if len(stmts) == 1 and gemm_steps and isinstance(gemm_steps[0], Gemm):
            fused = fuse_update(gemm_steps[0], stmts[0][1], theta, temp)
            if fused is not None:
                # θ ← β·θ + α·op(A)op(B): one GEMM, no gradient buffer, no extra pass.
                return gemm_steps[1:], ([Loop(ranges, [], penalty)] if penalty else []) + [fused]
        size = math.prod(self.d.network.param_shapes()[name])
        return gemm_steps, [Loop(ranges, stmts, penalty, parallel=size >= PARALLEL_UPDATE_MIN)]

    def grad_steps(self, ld, opt=None, apart: bool | str = False) -> tuple[list, list]:
        """Steps for ∂C/∂θ of layer ``ld``; with an optimizer, also its update steps (second
        list: they run after the δ of every layer it reads has used the old parameters, or,
        ``apart``, after the gradients have been summed over processes; ``apart="exchange"``:
        see :meth:`backward_exchange`)."""
        return stages.grad_steps(self, ld, opt, stages.reads_input(ld), apart)

    def delta_steps(self, ld) -> list:
        return stages.delta_steps(self, ld)

    def backward_steps(self, opt=None) -> list:
        if opt is not None:  # the update rules read the optimizer's hyper-parameters by these names
            self.hyper_symbols = {k: sp.Symbol(f"h_{k}", real=True) for k in opt.hyper}
        steps, updates = self._backward(opt, apart=False)
        return steps + updates

    def backward_apart(self, opt) -> tuple[list, list]:
        """Data-parallel training's two halves: (the backward pass leaving each gradient
        buffer with the sum over this process's rows only, the update steps that read the
        buffers once summed over every process and add λθ there)."""
        self.hyper_symbols = {k: sp.Symbol(f"h_{k}", real=True) for k in opt.hyper}
        return self._backward(opt, apart=True)

    def backward_exchange(self, opt) -> tuple[list, list]:
        """Data-parallel training on one machine with δ exchanged (see
        :mod:`symbp.backends.cpu.node_share`): (the backward pass over this process's rows,
        leaving out each weight gradient whose update a GEMM can carry; the update steps, where
        those GEMMs read δ and the layer input of the global batch and write a block of θ's rows)."""
        self.hyper_symbols = {k: sp.Symbol(f"h_{k}", real=True) for k in opt.hyper}
        return self._backward(opt, apart="exchange")

    def _backward(self, opt, apart: bool | str) -> tuple[list, list]:
        """From the output back: each layer's gradients, then the δ of every layer whose
        readers have all sent theirs.  A layer's update waits until the δ of every layer it
        reads has been computed (they read its old parameters); ``apart``: every update waits
        (second list).  In a chain that is: grads l, δ_{l-1}, update l."""
        layers = self.d.layers
        steps, waiting, updates = [], {}, []
        for pos in range(len(layers) - 1, -1, -1):
            ld = layers[pos]
            grads, later = self.grad_steps(ld, opt, apart=apart)
            steps += grads
            (updates if apart else waiting.setdefault(min(ld.sources), [])).extend(later)
            if pos > 0:
                steps += self.delta_steps(layers[pos - 1])
                # δ of layer pos is the last one layer pos + 1's readers of position pos wait for
                steps += waiting.pop(pos, [])
        steps += waiting.pop(0, [])
        return steps, updates

    def penalty_steps(self) -> list:
        if not self.l2_value:
            return []
        return [
            Loop([(sym, self.extent(ext)) for sym, ext in zip(ld.param_idx[key], ld.param_dims[key])], [],
                 [(sp.Symbol("penalty"), self.value(l2 / 2 * ld.params[key][ld.param_idx[key]] ** 2))])
            for ld in self.d.layers for key in ld.decay
        ]

    def buffers(self) -> dict[str, list[str]]:
        """The argument groups of the generated functions: parameters, work buffers and the
        work buffers by role, the output's buffers, δ_L."""
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
