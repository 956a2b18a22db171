"""Backpropagation derived by SymPy, one layer at a time, in index notation.

Each layer states its forward formula ``z[n, i]`` (see :mod:`symbp.spec.layers`).  The driver
here differentiates that formula with respect to each parameter and the layer's input, and
chains the local results with the textbook recurrence

    δ_L = (1/N) ∂ℓ/∂y ⊙ f_L′(z_L)                       (output layer)
    δ_l = f_l′(z_l) ⊙ Σ_i δ_{l+1}[n, i] W_{l+1}[i, ·]   (hidden layer)
    ∂C/∂θ_l = Σ_{n,i} δ_l[n, i] ∂z_l[n, i]/∂θ_l

where C = (1/N) Σ_n ℓ_n + (λ/2) Σ_l ‖W_l‖².  Widths stay symbols (d_0, d_1, …), so the
derivation costs the same for 16 units as for 4096; sums over Kronecker deltas are resolved
by SymPy (``Sum.doit``), which turns ∂z/∂W into the familiar δ xᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .spec.layers import image_dims
from .spec.network import Network

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@dataclass
class LayerDerivation:
    """What SymPy derived for one layer (1-based ``index``); every value is a SymPy object."""

    index: int
    layer: object
    x: sp.IndexedBase  # the layer's (first) input: x, or the output a_m of the layer it reads
    z: sp.IndexedBase
    a: sp.IndexedBase
    delta: sp.IndexedBase
    params: dict[str, sp.IndexedBase]
    forward: sp.Expr  # z[n, i]
    output: sp.Expr  # a[n, i] = f(z[n, i])
    local: dict[str, sp.Expr]  # "dz/dW": ∂z[n,i]/∂W[p,q], "dz/dx", "dxpad1/dx", …, "da/dz": f′ (see local_key)
    delta_formula: sp.Expr = None  # δ[n, p]
    grads: dict[str, sp.Expr] = field(default_factory=dict)  # name -> ∂C/∂θ[p, (q)]
    is_output: bool = False
    # -- any index structure (image layers; Dense fills them too) ---------------------
    out_idx: tuple = ()  # the forward formula's output indices, z[n, *out_idx] (Dense: (i,))
    delta_idx: tuple = ()  # δ[n, *delta_idx] (Dense: (p,))
    param_idx: dict = field(default_factory=dict)  # key -> free indices of ∂C/∂θ
    param_dims: dict = field(default_factory=dict)  # key -> their symbolic extents
    stages: list = field(default_factory=list)  # [conv.Stage]: intermediate formulas, then z
    stage_grads: dict = field(default_factory=dict)  # label -> (IndexedBase g, free idx, ∂C/∂stage)
    in_shape: tuple = ()  # one sample's input shape (numbers)
    out_shape: tuple = ()  # one sample's output shape (numbers)
    param_count: int = 0
    out_dims: tuple = ()  # symbolic output shape, e.g. (C_1, H_1, W_1) or (d_1,)
    ranges: dict = field(default_factory=dict)  # index symbol -> (first, last) where this layer uses it
    decay: tuple = ()  # the parameters l2 applies to
    view: bool = False  # z is the input's values reshaped (Flatten): the same buffer
    # -- where it sits in the network (a graph: any earlier outputs; a chain: the one before) ----
    sources: tuple = ()  # the positions it reads: 0 the network input, m layer m's output
    inputs: tuple = ()  # their bases (x, a_m), one per source; ``x`` is the first
    in_dims: tuple = ()  # their symbolic extents as the formula reads them, one tuple per source
    sent: dict = field(default_factory=dict)  # position -> ∂C/∂(its output) through this layer (free p, …)
    # -- statistics kept across batches (BatchNorm), see LayerForm ----------------------------
    running: dict = field(default_factory=dict)
    running_updates: list = field(default_factory=list)
    eval_subs: dict = field(default_factory=dict)

    @property
    def affine(self) -> tuple[str, str] | None:
        """(weight key, bias key) when the layer is one affine map of its flat input,
        ``z[n, i] = Σ_j W[i, j]·x[n, j] + b[i]`` (the contraction the lowering makes a GEMM):
        the readers' vector form and scalar view apply to it.  None for any other layer."""
        import sympy as sp

        from .indices import n

        if len(self.stages) != 1 or len(self.out_idx) != 1 or len(self.params) != 2:
            return None
        (i_,), by_base = self.out_idx, {base: key for key, base in self.params.items()}
        weight = bias = None
        for term in sp.Add.make_args(self.forward):
            if isinstance(term, sp.Sum) and len(term.limits) == 1:
                j_ = term.limits[0][0]
                factors = sp.Mul.make_args(term.function)
                w_ = [f for f in factors if isinstance(f, sp.Indexed) and f.base in by_base and f.indices == (i_, j_)]
                x_ = [f for f in factors if isinstance(f, sp.Indexed) and f.base == self.x and f.indices == (n, j_)]
                if len(factors) == 2 and w_ and x_:
                    weight = by_base[w_[0].base]
                    continue
            if isinstance(term, sp.Indexed) and term.base in by_base and term.indices == (i_,):
                bias = by_base[term.base]
                continue
            return None
        return (weight, bias) if weight and bias and weight != bias else None

    def local_key(self, stage, wrt) -> str:
        """The key of ``local`` for ∂stage/∂wrt: the last stage is ``z``, the layer input ``x``,
        a parameter its key (``"dz/dW"``), another stage its label (``"dz/dxpad1"``)."""
        top = "z" if stage is self.stages[-1] or stage is self.z else str(stage.target.label)
        name = wrt if isinstance(wrt, str) else "x" if wrt is self.x else str(wrt.label)
        return f"d{top}/d{name}"

    def flat_position(self) -> sp.Expr:
        """Where δ[n, p, r, s] of an image output sits in its row, (p·H + r)·W + s: the
        loss reads an image flat, as the kernels store it."""
        (c, r, s), (_, H, W) = self.delta_idx, self.out_dims
        return (c * H + r) * W + s

    def fprime(self, idx: tuple) -> sp.Expr:
        """f′ at this layer, evaluated at the stored z or a for the given indices."""
        from .spec.activations import a as a_sym
        from .spec.activations import z as z_sym

        act = self.layer.activation
        return act.backward_formula().subs({a_sym: self.a[idx], z_sym: self.z[idx]})


@dataclass
class LossDerivation:
    y: sp.IndexedBase
    t: sp.IndexedBase
    per_sample: sp.Expr  # ℓ_n
    grad: sp.Expr  # ∂ℓ_n/∂y[n, p], with softmax[n, p] named where it appears
    definitions: dict  # IndexedBase -> its formula over [n, p], e.g. softmax
    l2_term: sp.Expr  # ∂/∂W[p,q] of (λ/2) Σ W², i.e. λ W[p, q]


class Derivation:
    """The symbolic backpropagation of a :class:`~symbp.spec.network.Network`.

    Attributes
    ----------
    layers : list of LayerDerivation
    loss : LossDerivation
    """

    def __init__(self, net: Network) -> None:
        import sympy as sp

        from .indices import N, width

        self.network = net
        L = len(net.layers)
        self.dims = [width(l) for l in range(L + 1)]
        #: symbol -> number for every size the formulas keep symbolic
        self.sizes: dict = {}
        in_dims = self._input_dims()
        x_prev = sp.IndexedBase("x", shape=(N, *in_dims), real=True)
        self.x = x_prev
        self.layers: list[LayerDerivation] = []
        counts = net.param_counts()
        bases, dims = {0: x_prev}, {0: in_dims}  # by position: what a layer reads, and its extents
        for l, layer in enumerate(net.layers, 1):
            src = net.sources[l - 1]
            if layer.merges:
                ld = self._layer(l, layer, tuple(bases[s_] for s_ in src), tuple(dims[s_] for s_ in src))
            else:
                ld = self._layer(l, layer, bases[src[0]], dims[src[0]])
            ld.sources = src
            ld.in_shape, ld.out_shape = net.in_shape(l), net.shapes[l]
            ld.param_count = counts[l - 1]
            self.layers.append(ld)
            bases[l], dims[l] = ld.a, ld.out_dims
        self.loss = self._derive_loss()
        self._chain()

    def _input_dims(self) -> tuple:
        """(d_0,) for a flat input, (C_0, H_0, W_0) for an image; their numbers go to sizes."""
        shape = self.network.shapes[0]
        syms = (self.dims[0],) if len(shape) == 1 else image_dims(0)
        self.sizes.update(dict(zip(syms, shape)))
        return syms

    def _layer(self, l, layer, x_prev, in_dims) -> LayerDerivation:
        """Layer ``l``'s stages, each differentiated by SymPy (they are chained in _chain)."""
        import sympy as sp

        from .index_sums import resolve
        from .indices import N, n, p, r, s
        from .spec.activations import z as z_sym

        form = layer.symbolic(l, x_prev, in_dims)
        inputs, read_dims = (x_prev, in_dims) if layer.merges else ((x_prev,), (in_dims,))
        self.sizes.update(form.sizes)
        zst = form.stages[-1]
        out_dims, shape = tuple(zst.dims), self.network.shapes[l]
        # Every size symbol of the output gets its number.  A flat output is d_l to the layer
        # after it, whatever its stage computes it from (Flatten's C·H·W): the layers after
        # read widths d_0, d_1, … as an MLP's do.
        self.sizes.update({sym: val for sym, val in zip(out_dims, shape) if isinstance(sym, sp.Symbol)})
        if len(shape) == 1:
            self.sizes[self.dims[l]] = self.network.widths[l]
            out_dims = (self.dims[l],)
        z = zst.target
        # A flat output is a matrix (N, d_l); an image's stays unshaped, since the loss (or a
        # Flatten) may read it flat, a[n, p], as the kernels store it.
        shaped = {"shape": (N, *out_dims)} if len(out_dims) == 1 else {}
        a = sp.IndexedBase(f"a{l}", real=True, **shaped)
        delta = sp.IndexedBase(f"delta{l}", real=True, **shaped)
        out_idx = zst.idx
        delta_idx = (p, r, s) if len(out_idx) == 3 else (p,)
        ranges = {n: (0, N - 1)}
        ranges.update({sym: (0, ext - 1) for sym, ext in zip(out_idx, out_dims)})
        ranges.update({sym: (0, ext - 1) for sym, ext in zip(delta_idx, out_dims)})
        ld = LayerDerivation(
            l, layer, inputs[0], z, a, delta, dict(form.params), zst.formula,
            layer.activation.expr.subs(z_sym, z[(n, *out_idx)]), {}, is_output=l == len(self.network.layers),
            out_idx=out_idx, delta_idx=delta_idx, param_idx=dict(form.param_idx), param_dims=dict(form.param_dims),
            stages=list(form.stages), out_dims=out_dims, ranges=ranges, decay=tuple(form.decay), view=form.view,
            inputs=inputs, in_dims=tuple(form.in_dims or read_dims),
            running=dict(form.running), running_updates=list(form.running_updates), eval_subs=dict(form.eval_subs),
        )
        for key, base in form.params.items():
            idx = form.param_idx[key]
            rng = {**ranges, **{sym: (0, ext - 1) for sym, ext in zip(idx, form.param_dims[key])}}
            for st in form.stages:
                if st.formula.has(base):
                    ld.local[ld.local_key(st, key)] = resolve(sp.diff(st.formula, base[idx]), rng)
        ld.local["da/dz"] = layer.activation.derivative
        return ld

    def _derive_loss(self) -> LossDerivation:
        import sympy as sp

        from .index_sums import resolve
        from .indices import N, i, j, l2, n, p, q

        K = self.dims[-1]
        # Real, as the scalar template's y and t are: otherwise SymPy differentiates |y − t|
        # through re() and im() and an L1 loss has no kernel.
        y = sp.IndexedBase("y", shape=(N, K), real=True)
        t = sp.IndexedBase("t", shape=(N, K), real=True)
        per_sample = self.network.loss.per_sample(y, t, K)
        grad = resolve(sp.diff(per_sample, y[n, p]), {p: (0, K - 1), n: (0, N - 1)})
        definitions = {}
        if self.network.loss.is_softmax:
            softmax = sp.IndexedBase("softmax", shape=(N, K), real=True)
            definition = sp.exp(y[n, p]) / sp.Sum(sp.exp(y[n, j]), (j, 0, K - 1))
            named = grad.subs(definition, softmax[n, p])
            if named != grad:
                grad, definitions = named, {softmax: definition}
        else:
            grad = sp.factor_terms(grad)
        W = sp.IndexedBase("W")
        d_out, d_in = sp.symbols("d_out d_in", integer=True, positive=True)
        l2_term = resolve(sp.diff(l2 / 2 * sp.Sum(W[i, j] ** 2, (i, 0, d_out - 1), (j, 0, d_in - 1)), W[p, q]),
                          {p: (0, d_out - 1), q: (0, d_in - 1)})
        return LossDerivation(y, t, per_sample, grad, definitions, l2_term)

    def _l2_grad(self, ld, key: str) -> sp.Expr:
        """∂/∂θ of (λ/2) Σ θ² for parameter ``key`` of this layer, whatever its number of indices."""
        import sympy as sp

        from .index_sums import resolve
        from .indices import l2

        W, idx, dims = ld.params[key], ld.param_idx[key], ld.param_dims[key]
        if len(idx) == 2:
            return self.loss.l2_term.subs(sp.IndexedBase("W"), W)
        dummies = sp.symbols(f"j0:{len(idx)}", integer=True, nonnegative=True)
        total = l2 / 2 * sp.Sum(W[dummies] ** 2, *[(d_, 0, ext - 1) for d_, ext in zip(dummies, dims)])
        return resolve(sp.diff(total, W[idx]), {sym: (0, ext - 1) for sym, ext in zip(idx, dims)})

    def _chain(self) -> None:
        """Walk the layers from the output back, chaining local derivatives.

        For each layer: δ = f′(z) ⊙ (the sum of what the layers reading it send back, or
        the loss gradient); then back through the layer's stages (z last): ∂C/∂θ = Σ δ·∂stage/∂θ
        for the parameters a stage reads, and Σ δ·∂stage/∂source for its sources (an earlier
        stage, whose gradient gets a name, or a layer input, which becomes a part of the δ of
        the layer that wrote it).  A tensor read by two layers (a residual branch) gets the sum
        of both parts: the chain rule over every path.  Whatever the number of indices, every
        ∂ is SymPy's.
        """
        import sympy as sp

        from .indices import N, n

        sent: dict[int, list] = {}  # position -> the parts of ∂C/∂a it has been sent so far
        for ld in reversed(self.layers):
            idx = (n, *ld.delta_idx)
            if ld.is_output:
                # δ_L = (1/N) ∂ℓ/∂y · f′(z_L): the loss sees a_L as its logits y.
                dl_dy = self.loss.grad.subs(self.loss.y, ld.a)
                if len(ld.delta_idx) == 3:
                    dl_dy = self._at_image_position(dl_dy, ld)
                ld.delta_formula = dl_dy / N * ld.fprime(idx)
            else:
                ld.delta_formula = ld.fprime(idx) * sp.Add(*sent[ld.index])
            ld.sent = self._chain_stages(ld)
            for pos, part in ld.sent.items():
                sent.setdefault(pos, []).append(part)

    def _at_image_position(self, dl_dy: sp.Expr, ld) -> sp.Expr:
        """∂ℓ/∂y of an image-shaped output at its position (p, r, s): the loss reads the
        output flat (y[n, p], p < C·H·W, as the kernels store it), so ``a[n, p]`` becomes
        ``a[n, p, r, s]`` and the targets (or a softmax) are read at the flat position
        (p·H + r)·W + s, where f′ reads z and a too."""
        import sympy as sp

        from .indices import n, p

        c, r, s = ld.delta_idx
        flat = ld.flat_position()
        return dl_dy.replace(
            lambda e: isinstance(e, sp.Indexed) and e.indices == (n, p),
            lambda e: ld.a[n, c, r, s] if e.base == ld.a else e.base[n, flat])

    def _chain_stages(self, ld) -> dict:
        """∂C/∂θ and the stage gradients of layer ``ld``; returns what it sends back to each
        position it reads (a formula in δ of ``ld``, free indices p, (r, s))."""
        import sympy as sp

        from .index_sums import resolve
        from .indices import N, n, p, q, r, s

        grad_of = {str(ld.z.label): ld.delta}  # stage label -> IndexedBase of ∂C/∂(stage)
        free_for = {0: (), 1: (q,), 3: (q, r, s)}  # by the source's rank: a per-sample stage has none
        upstream = {}  # input base -> what it is sent
        for st in reversed(ld.stages):
            g = grad_of.get(str(st.target.label))
            if g is None:
                continue  # nothing flows back through it (an arg-max: piecewise constant)
            chain_limits = [(sym, 0, ext - 1) for sym, ext in zip(st.idx, st.dims)]
            g_at = g[st.idx] if st.batch else g[(n, *st.idx)]
            samples = [] if st.batch else [(n, 0, N - 1)]  # a per-sample stage's δ sums over the batch
            for key, base in ld.params.items():
                if st.formula.has(base):
                    pidx = ld.param_idx[key]
                    rng = {sym: (0, ext - 1) for sym, ext in zip(pidx, ld.param_dims[key])}
                    local = ld.local[ld.local_key(st, key)]
                    grad = resolve(sp.Sum(g_at * local, *chain_limits, *samples), rng)
                    # A parameter read by several stages: the sum over them (λθ added once).
                    if key in ld.grads:
                        ld.grads[key] += grad
                    else:
                        ld.grads[key] = grad + self._l2_grad(ld, key) if key in ld.decay else grad
            dims_of = dict(zip(ld.inputs, ld.in_dims))
            sources = [s_.target for s_ in ld.stages if s_ is not st and st.formula.has(s_.target)] + list(dims_of)
            for src in sources:
                if not st.formula.has(src):
                    continue
                stage = next((s_ for s_ in ld.stages if s_.target is src), None)
                if stage is not None and not _reads_anything(stage, ld):
                    continue  # a constant of the step (Dropout's mask): no gradient to carry
                src_dims = dims_of[src] if stage is None else stage.dims
                free = free_for[len(src_dims)]
                rng = {sym: (0, ext - 1) for sym, ext in zip(free, src_dims)}
                batch = stage is not None and stage.batch  # one value for the whole batch (a BatchNorm mean)
                local = resolve(sp.diff(st.formula, src[free] if batch else src[(n, *free)]),
                                {**rng, n: (0, N - 1), **{sym: (0, hi) for sym, _, hi in chain_limits}})
                if local == 0:
                    continue
                ld.local[ld.local_key(st, src)] = local
                summand = g_at * local
                # What every sample's stage sends to a batch value sums over the samples too.
                limits = chain_limits + (samples if batch else [])
                contrib = resolve(sp.Sum(summand, *limits), rng) if limits else resolve(summand, rng)
                # An input read by several stages (a gated unit's two products) gets the sum
                # of what each sends back: the chain rule over every path.
                if src in dims_of:
                    upstream[src] = upstream[src] + contrib if src in upstream else contrib
                else:
                    gb = sp.IndexedBase(f"g{src.label}")
                    grad_of[str(src.label)] = gb
                    before = ld.stage_grads.get(str(src.label))
                    ld.stage_grads[str(src.label)] = (gb, free, contrib if before is None else before[2] + contrib)
        # Later stages first: a stage's gradient may read the gradient of a later stage that
        # reads it (a norm's mean gets a part through its variance); kernels and readers
        # compute them in this order.
        position = {str(st_.target.label): k for k, st_ in enumerate(ld.stages)}
        ld.stage_grads = dict(sorted(ld.stage_grads.items(), key=lambda kv: -position[kv[0]]))
        sent = {}
        for pos, base, dims in zip(ld.sources, ld.inputs, ld.in_dims):
            if base not in upstream:
                raise NotImplementedError(f"layer {ld.index} ({ld.layer!r}): no gradient reaches its input {base}")
            # The named stage gradients (∂C/∂x̃, ∂C/∂y) stay names: the kernels compute them
            # into buffers.  Rename q → p: the result is a part of the δ of the layer before.
            rng = {sym: (0, ext - 1) for sym, ext in zip(free_for[len(dims)], dims)}
            sent[pos] = resolve(upstream[base], rng).subs(q, p)
        return sent

    # -- reading ---------------------------------------------------------------------
    def explain(self, scalar: bool = False, optimizer=None) -> str:
        """Plain-text explanation: the forward pass, the loss, then from the output layer back
        each layer's local derivatives, δ and parameter gradients, with shapes; ``scalar=True``
        adds every neuron's formulas with named weights (small networks); ``optimizer``
        (``sb.Adam()``, …) adds its update rule, as the training kernels run it."""
        from .read.explain import build

        return build(self, scalar, optimizer).text()

    def latex(self, scalar: bool = False, standalone: bool = False, optimizer=None) -> str:
        """The explanation as LaTeX (``align*`` blocks; ``standalone=True``: a full document)."""
        from .read.explain import build

        return build(self, scalar, optimizer).latex(standalone)

    def markdown(self, scalar: bool = False, optimizer=None) -> str:
        """The explanation as Markdown with ``$$`` LaTeX math blocks."""
        from .read.explain import build

        return build(self, scalar, optimizer).markdown()

    def _repr_markdown_(self) -> str:
        """Jupyter's rich display: :meth:`markdown`, whose ``$$`` blocks MathJax renders."""
        return self.markdown()

    def _repr_latex_(self) -> str:
        """LaTeX for front ends that prefer it (nbconvert to PDF): :meth:`latex`, no preamble."""
        return self.latex()

    def __repr__(self) -> str:
        return f"Derivation({self.network!r})"


def _reads_anything(stage, ld) -> bool:
    """Whether a stage reads a layer input, a parameter or another stage (else its value is
    a constant of the step, such as a dropout mask)."""
    bases = [*ld.inputs, *ld.params.values(), *(s_.target for s_ in ld.stages if s_ is not stage)]
    return any(stage.formula.has(b) for b in bases)


def derive(net: Network) -> Derivation:
    """Derive the gradients of every parameter of ``net`` with SymPy.

    Examples
    --------
    >>> import symbp as sb
    >>> d = sb.derive(sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2)], loss="mse"))
    >>> d.layers[0].local["da/dz"]
    σ(z)*(1 - σ(z))
    """
    if not isinstance(net, Network):
        raise TypeError(f"derive() takes a symbp.Network, got {type(net).__name__}")
    return Derivation(net)


__all__ = ["Derivation", "LayerDerivation", "LossDerivation", "derive"]
