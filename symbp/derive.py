"""Backpropagation derived by SymPy, one layer at a time, in index notation.

Each layer states its forward formula ``z[n, i]`` (see :mod:`symbp.layers`).  The driver
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

import sympy as sp

from .activations import a as a_sym
from .activations import z as z_sym
from .conv import Stage, image_dims
from .indices import N, i, j, k, n, nonnegative_gap, p, q, r, s, width
from .layers import Dense
from .network import Network
from .ops import drop_point_masses


@dataclass
class LayerDerivation:
    """What SymPy derived for one layer (1-based ``index``); every value is a SymPy object."""

    index: int
    layer: object
    x: sp.IndexedBase  # the layer's input (x for layer 1, a_{l-1} otherwise)
    z: sp.IndexedBase
    a: sp.IndexedBase
    delta: sp.IndexedBase
    params: dict[str, sp.IndexedBase]
    forward: sp.Expr  # z[n, i]
    output: sp.Expr  # a[n, i] = f(z[n, i])
    local: dict[str, sp.Expr]  # ∂z[n,i]/∂W[p,q], ∂z[n,i]/∂b[p], ∂z[n,i]/∂x[n,q], f′
    delta_formula: sp.Expr = None  # δ[n, p]
    grads: dict[str, sp.Expr] = field(default_factory=dict)  # name -> ∂C/∂θ[p, (q)]
    is_output: bool = False
    # -- any index structure (image layers; Dense fills them too) ---------------------
    out_idx: tuple = (i,)  # the forward formula's output indices, z[n, *out_idx]
    delta_idx: tuple = (p,)  # δ[n, *delta_idx]
    param_idx: dict = field(default_factory=dict)  # key -> free indices of ∂C/∂θ
    param_dims: dict = field(default_factory=dict)  # key -> their symbolic extents
    stages: list = field(default_factory=list)  # [conv.Stage]: intermediate formulas, then z
    stage_grads: dict = field(default_factory=dict)  # label -> (IndexedBase g, free idx, ∂C/∂stage)
    in_shape: tuple = ()  # one sample's input shape (numbers)
    out_shape: tuple = ()  # one sample's output shape (numbers)
    param_count: int = 0
    out_dims: tuple = ()  # symbolic output shape, e.g. (C_1, H_1, W_1) or (d_1,)
    ranges: dict = field(default_factory=dict)  # index symbol -> (first, last) where this layer uses it

    def fprime(self, idx: tuple) -> sp.Expr:
        """f′ at this layer, evaluated at the stored z or a for the given indices."""
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


l2 = sp.Symbol("lambda", nonnegative=True)


def resolve(expr: sp.Expr, ranges: dict | None = None) -> sp.Expr:
    """Carry out sums over Kronecker deltas until nothing changes.

    ``Sum.doit`` yields ``Piecewise((e, cond), (0, True))`` because it cannot know where the
    free indices lie.  ``ranges`` (index symbol → (first, last)) says that, and every Sum
    says it for its own dummies: a condition they imply (``q <= d - 1`` for q in 0..d−1) is
    dropped; one they do not imply (``0 <= r - S·h <= kh - 1`` from a strided window, the
    border of a zero padding) stays, as the guard it really is.
    """
    ranges = dict(ranges or {})
    # A point mass (d/dx sign(x) = 2·δ(x)) is zero almost everywhere, and no kernel has it.
    expr = sum_deltas(drop_point_masses(expr), ranges)
    for _ in range(20):
        new = prune_guards(expr.doit(), ranges)
        if new == expr:
            return new
        expr = new
    return expr


def _common_delta(e) -> sp.KroneckerDelta | None:
    """A Kronecker δ that is a factor of every term of every non-zero branch of a Piecewise."""
    if not isinstance(e, sp.Piecewise) or not e.has(sp.KroneckerDelta):
        return None
    common = None
    for arg in e.args:
        for term in sp.Add.make_args(sp.expand_mul(arg.expr)) if arg.expr != 0 else ():
            factors = {f for f in sp.Mul.make_args(term) if isinstance(f, sp.KroneckerDelta)}
            common = factors if common is None else common & factors
    return min(common, key=str) if common else None


def sum_deltas(expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Σ_k Piecewise((δ(k, p)·u, c), (δ(k, p)·v, True)) → Piecewise((u, c), (v, True)) at k = p.

    d/dy of a piecewise function (leaky_relu, elu, max) puts the δ into each branch, where
    ``Sum.doit`` does not look (and SymPy folds any factor pulled out straight back in).
    Done only where the ranges say that p lies within the sum's limits."""
    def collapsed(e):
        if not isinstance(e, sp.Sum) or len(e.limits) != 1:
            return None
        k, lo, hi = e.limits[0]
        delta = _common_delta(e.function)
        if delta is None or k not in delta.args:
            return None
        other = delta.args[1] if delta.args[0] == k else delta.args[0]
        if other.has(k) or not (implied(lo <= other, ranges) and implied(other <= hi, ranges)):
            return None
        return sp.Piecewise(*[(arg.expr.xreplace({delta: sp.S.One}).xreplace({k: other}), arg.cond.xreplace({k: other}))
                              for arg in e.function.args])

    return expr.replace(lambda e: collapsed(e) is not None, collapsed)


def _is_guard(e) -> bool:
    return isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].expr == 0 and e.args[1].cond == sp.true


def prune_guards(expr: sp.Expr, ranges: dict) -> sp.Expr:
    """Drop the conditions of ``Piecewise((e, cond), (0, True))`` that the index ranges
    imply, merging nested guards; see :func:`resolve`."""
    if not isinstance(expr, sp.Basic) or expr.is_Atom or not expr.has(sp.Piecewise):
        return expr
    if isinstance(expr, sp.Sum):
        inner = dict(ranges)
        for sym, lo, hi in expr.limits:
            inner[sym] = (lo, hi)
        body = prune_guards(expr.function, inner)
        return expr if body == expr.function else sp.Sum(body, *expr.limits)
    if _is_guard(expr):
        body, cond = expr.args[0].expr, expr.args[0].cond
        body = prune_guards(body, ranges)
        conds = list(sp.And.make_args(cond))
        if _is_guard(body):
            conds += list(sp.And.make_args(body.args[0].cond))
            body = body.args[0].expr
        # A factor δ(a, b) of the body makes it zero unless a = b: judge the conditions there.
        eqs = [f_.args[0] - f_.args[1] for f_ in sp.Mul.make_args(body) if isinstance(f_, sp.KroneckerDelta)]
        kept = [c_ for c_ in conds if not (implied(c_, ranges) or implied(_on(c_, eqs), ranges))]
        if not kept:
            return body
        return sp.Piecewise((body, sp.And(*kept)), (0, True))
    return expr.func(*[prune_guards(a, ranges) for a in expr.args])


def _on(cond, eqs: list):
    """``cond`` with each equation ``diff = 0`` solved for one of its unit-coefficient symbols."""
    for diff in eqs:
        for sym in sorted(diff.free_symbols & cond.free_symbols, key=str):
            coeff = sp.expand(diff).coeff(sym)
            if coeff in (1, -1):
                cond = cond.subs(sym, sp.expand(sym - diff / coeff))
                break
    return cond


def implied(cond, ranges: dict) -> bool:
    """True when the integer index ranges guarantee ``cond`` (a linear inequality)."""
    if cond == sp.true:
        return True
    gap = nonnegative_gap(cond)
    if gap is None:
        return False
    low = {}
    for sym, (lo, hi) in ranges.items():
        if not gap.has(sym):
            continue
        coeff = gap.coeff(sym)
        if coeff.free_symbols & set(ranges) or sp.expand(gap - coeff * sym).has(sym):
            return False  # not linear in the indices: do not guess
        if coeff.is_nonnegative:
            low[sym] = lo
        elif coeff.is_nonpositive:
            low[sym] = hi
        else:
            return False
    bound = sp.expand(gap.xreplace(low))
    return bool(bound.is_nonnegative)


class Derivation:
    """The symbolic backpropagation of a :class:`~symbp.network.Network`.

    Attributes
    ----------
    layers : list of LayerDerivation
    loss : LossDerivation
    """

    def __init__(self, net: Network) -> None:
        self.network = net
        L = len(net.layers)
        dims = [width(l) for l in range(L + 1)]
        self.dims = dims
        #: symbol -> number for every size the formulas keep symbolic (not the Dense widths)
        self.sizes: dict = {}
        in_dims = self._shape_symbols(0)
        x_prev = sp.IndexedBase("x", shape=(N, *in_dims), real=True)
        self.x = x_prev
        self.layers: list[LayerDerivation] = []
        for l, layer in enumerate(net.layers, 1):
            if isinstance(layer, Dense):
                ld = self._dense(l, layer, x_prev, dims)
            else:
                ld = self._staged(l, layer, x_prev, in_dims)
            ld.in_shape, ld.out_shape = net.shapes[l - 1], net.shapes[l]
            ld.param_count = net.param_counts()[l - 1]
            self.layers.append(ld)
            x_prev, in_dims = ld.a, ld.out_dims
        self.loss = self._derive_loss()
        self._chain()

    def _shape_symbols(self, l: int) -> tuple:
        shape = self.network.shapes[l]
        if len(shape) == 1:
            return (self.dims[l],)
        syms = image_dims(l)
        if l and hasattr(self.network.layers[l - 1], "size"):  # pooling keeps the channels
            syms = (image_dims(l - 1)[0], *syms[1:])
        self.sizes.update(dict(zip(syms, shape)))
        return syms

    def _dense(self, l, layer, x_prev, dims) -> LayerDerivation:
        W = sp.IndexedBase(f"W{l}", shape=(dims[l], dims[l - 1]), real=True)
        b = sp.IndexedBase(f"b{l}", shape=(dims[l],), real=True)
        z = sp.IndexedBase(f"z{l}", shape=(N, dims[l]), real=True)
        a = sp.IndexedBase(f"a{l}", shape=(N, dims[l]), real=True)
        delta = sp.IndexedBase(f"delta{l}", shape=(N, dims[l]), real=True)
        fwd = layer.forward_formula(x_prev, W, b, dims[l - 1])
        ranges = {n: (0, N - 1), i: (0, dims[l] - 1), p: (0, dims[l] - 1), q: (0, dims[l - 1] - 1)}
        local = {
            "dz/dW": resolve(sp.diff(fwd, W[p, q]), ranges),
            "dz/db": resolve(sp.diff(fwd, b[p]), ranges),
            "dz/dx": resolve(sp.diff(fwd, x_prev[n, q]), ranges),
            "da/dz": layer.activation.derivative,
        }
        return LayerDerivation(
            l, layer, x_prev, z, a, delta, {"W": W, "b": b}, fwd,
            layer.activation.expr.subs(z_sym, z[n, i]), local, is_output=l == len(self.network.layers),
            param_idx={"W": (p, q), "b": (p,)}, param_dims={"W": (dims[l], dims[l - 1]), "b": (dims[l],)},
            stages=[Stage(z, (i,), fwd, (dims[l],))], out_dims=(dims[l],), ranges=ranges,
        )

    def _staged(self, l, layer, x_prev, in_dims) -> LayerDerivation:
        """An image layer: its stages, each differentiated by SymPy (chained in _chain)."""
        out_dims = self._shape_symbols(l)
        form = layer.symbolic(l, x_prev, in_dims, self.network.shapes[l], self.network.shapes[l - 1])
        self.sizes.update(form.sizes)
        if len(out_dims) == 1:
            self.sizes[self.dims[l]] = self.network.widths[l]
            out_dims = form.stages[-1].dims
        zst = form.stages[-1]
        z = zst.target
        a = sp.IndexedBase(f"a{l}", real=True)
        delta = sp.IndexedBase(f"delta{l}", real=True)
        out_idx = zst.idx
        delta_idx = (p, r, s) if len(out_idx) == 3 else (p,)
        ranges = {n: (0, N - 1)}
        ranges.update({sym: (0, ext - 1) for sym, ext in zip(out_idx, out_dims)})
        ranges.update({sym: (0, ext - 1) for sym, ext in zip(delta_idx, out_dims)})
        local = {}
        for key, base in form.params.items():
            idx = form.param_idx[key]
            rng = {**ranges, **{sym: (0, ext - 1) for sym, ext in zip(idx, form.param_dims[key])}}
            for st in form.stages:
                if st.formula.has(base):
                    local[f"d{st.target.label}/d{key}"] = resolve(sp.diff(st.formula, base[(n, *idx)[1:]]), rng)
        local["da/dz"] = layer.activation.derivative
        return LayerDerivation(
            l, layer, x_prev, z, a, delta, dict(form.params), zst.formula,
            layer.activation.expr.subs(z_sym, z[(n, *out_idx)]), local, is_output=l == len(self.network.layers),
            out_idx=out_idx, delta_idx=delta_idx, param_idx=dict(form.param_idx), param_dims=dict(form.param_dims),
            stages=list(form.stages), out_dims=tuple(out_dims), ranges=ranges,
        )

    def _derive_loss(self) -> LossDerivation:
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

    def _l2_grad(self, ld) -> sp.Expr:
        """∂/∂W of (λ/2) Σ W² for this layer's W, whatever its number of indices."""
        W, idx, dims = ld.params["W"], ld.param_idx["W"], ld.param_dims["W"]
        if len(idx) == 2:
            return self.loss.l2_term.subs(sp.IndexedBase("W"), W)
        dummies = sp.symbols(f"j0:{len(idx)}", integer=True, nonnegative=True)
        total = l2 / 2 * sp.Sum(W[dummies] ** 2, *[(d_, 0, ext - 1) for d_, ext in zip(dummies, dims)])
        return resolve(sp.diff(total, W[idx]), {sym: (0, ext - 1) for sym, ext in zip(idx, dims)})

    def _chain(self) -> None:
        """Walk the layers from the output back, chaining local derivatives.

        For each layer: δ = f′(z) ⊙ (what the next layer sends back, or the loss gradient);
        then back through the layer's stages (z last): ∂C/∂θ = Σ δ·∂stage/∂θ for the
        parameters a stage reads, and Σ δ·∂stage/∂source for its sources (an earlier stage,
        whose gradient gets a name, or the layer input, which becomes the upstream of the
        layer before).  Whatever the number of indices, every ∂ is SymPy's.
        """
        upstream = None
        for ld in reversed(self.layers):
            idx = (n, *ld.delta_idx)
            if ld.is_output:
                # δ_L = (1/N) ∂ℓ/∂y · f′(z_L): the loss sees a_L as its logits y.
                dl_dy = self.loss.grad.subs(self.loss.y, ld.a)
                ld.delta_formula = dl_dy / N * ld.fprime(idx)
            else:
                ld.delta_formula = ld.fprime(idx) * upstream
            if isinstance(ld.layer, Dense):
                upstream = self._chain_dense(ld)
            else:
                upstream = self._chain_stages(ld)

    def _chain_dense(self, ld) -> sp.Expr:
        W = ld.params["W"]
        d = ld.delta
        fan_out = self.dims[ld.index]
        ranges = ld.ranges
        ld.grads["W"] = resolve(sp.Sum(d[n, i] * ld.local["dz/dW"], (i, 0, fan_out - 1), (n, 0, N - 1)), ranges) + (
            self.loss.l2_term.subs(sp.IndexedBase("W"), W)
        )
        ld.grads["b"] = resolve(sp.Sum(d[n, i] * ld.local["dz/db"], (i, 0, fan_out - 1), (n, 0, N - 1)), ranges)
        # ∂C/∂a_{l-1}[n, q], renamed to index p: it becomes the next layer's δ upstream.
        up = resolve(sp.Sum(d[n, i] * ld.local["dz/dx"], (i, 0, fan_out - 1)), ranges)
        return up.subs(q, p)

    def _chain_stages(self, ld) -> sp.Expr:
        in_dims = self.layers[ld.index - 2].out_dims if ld.index > 1 else self._shape_symbols(0)
        grad_of = {str(ld.z.label): ld.delta}  # stage label -> IndexedBase of ∂C/∂(stage)
        free_for = {1: (q,), 3: (q, r, s)}
        upstream = None
        for st in reversed(ld.stages):
            g = grad_of.get(str(st.target.label))
            if g is None:
                continue  # nothing flows back through it (an arg-max: piecewise constant)
            chain_limits = [(sym, 0, ext - 1) for sym, ext in zip(st.idx, st.dims)]
            for key, base in ld.params.items():
                if st.formula.has(base):
                    pidx = ld.param_idx[key]
                    rng = {sym: (0, ext - 1) for sym, ext in zip(pidx, ld.param_dims[key])}
                    local = ld.local[f"d{st.target.label}/d{key}"]
                    grad = resolve(sp.Sum(g[(n, *st.idx)] * local, *chain_limits, (n, 0, N - 1)), rng)
                    ld.grads[key] = grad + self._l2_grad(ld) if key == "W" else grad
            sources = [s_.target for s_ in ld.stages if s_ is not st and st.formula.has(s_.target)] + [ld.x]
            for src in sources:
                if not st.formula.has(src):
                    continue
                src_dims = in_dims if src is ld.x else next(s_.dims for s_ in ld.stages if s_.target is src)
                free = free_for[len(src_dims)]
                rng = {sym: (0, ext - 1) for sym, ext in zip(free, src_dims)}
                local = resolve(sp.diff(st.formula, src[(n, *free)]), {**rng, **{sym: (0, hi) for sym, _, hi in chain_limits}})
                if local == 0:
                    continue
                ld.local[f"d{st.target.label}/d{src.label}"] = local
                contrib = resolve(sp.Sum(g[(n, *st.idx)] * local, *chain_limits), rng)
                if src is ld.x:
                    upstream = contrib
                else:
                    gb = sp.IndexedBase(f"g{src.label}")
                    grad_of[str(src.label)] = gb
                    ld.stage_grads[str(src.label)] = (gb, free, contrib)
        if upstream is None:
            raise NotImplementedError(f"layer {ld.index} ({ld.layer!r}): no gradient reaches its input")
        # The named stage gradients (∂C/∂x̃, ∂C/∂y) stay names: the kernels compute them into
        # buffers.  Rename q → p: the result is the δ upstream of the layer before.
        rng = {sym: (0, ext - 1) for sym, ext in zip(free_for[len(in_dims)], in_dims)}
        return resolve(upstream, rng).subs(q, p)

    # -- reading ---------------------------------------------------------------------
    def explain(self, scalar: bool = False, optimizer=None) -> str:
        """Plain-text explanation: the forward pass, the loss, then from the output layer back
        each layer's local derivatives, δ and parameter gradients, with shapes; ``scalar=True``
        adds every neuron's formulas with named weights (small networks); ``optimizer``
        (``sb.Adam()``, …) adds its update rule, as the training kernels run it."""
        from .explain import build

        return build(self, scalar, optimizer).text()

    def latex(self, scalar: bool = False, standalone: bool = False, optimizer=None) -> str:
        """The explanation as LaTeX (``align*`` blocks; ``standalone=True``: a full document)."""
        from .explain import build

        return build(self, scalar, optimizer).latex(standalone)

    def markdown(self, scalar: bool = False, optimizer=None) -> str:
        """The explanation as Markdown with ``$$`` LaTeX math blocks."""
        from .explain import build

        return build(self, scalar, optimizer).markdown()

    def __repr__(self) -> str:
        return f"Derivation({self.network!r})"


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


__all__ = ["Derivation", "LayerDerivation", "LossDerivation", "derive", "k", "l2", "resolve"]
