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
from .indices import N, i, j, k, n, p, q, width
from .network import Network


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


def resolve(expr: sp.Expr) -> sp.Expr:
    """Carry out sums over Kronecker deltas until nothing changes.

    ``Sum.doit`` yields ``Piecewise((e, q <= d - 1), (0, True))`` because it cannot know that
    the free index q is in range; every free index here is, by construction, so the
    ``e`` branch is the value.
    """
    for _ in range(20):
        new = _drop_range_guards(expr.doit())
        if new == expr:
            return new
        expr = new
    return expr


def _drop_range_guards(expr: sp.Expr) -> sp.Expr:
    def is_guard(e):
        return isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].expr == 0 and e.args[1].cond == sp.true

    return expr.replace(is_guard, lambda e: e.args[0].expr)


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
        x_prev = sp.IndexedBase("x", shape=(N, dims[0]))
        self.x = x_prev
        self.layers: list[LayerDerivation] = []
        for l, layer in enumerate(net.layers, 1):
            W = sp.IndexedBase(f"W{l}", shape=(dims[l], dims[l - 1]))
            b = sp.IndexedBase(f"b{l}", shape=(dims[l],))
            z = sp.IndexedBase(f"z{l}", shape=(N, dims[l]))
            a = sp.IndexedBase(f"a{l}", shape=(N, dims[l]))
            delta = sp.IndexedBase(f"delta{l}", shape=(N, dims[l]))
            fwd = layer.forward_formula(x_prev, W, b, dims[l - 1])
            local = {
                "dz/dW": resolve(sp.diff(fwd, W[p, q])),
                "dz/db": resolve(sp.diff(fwd, b[p])),
                "dz/dx": resolve(sp.diff(fwd, x_prev[n, q])),
                "da/dz": layer.activation.derivative,
            }
            ld = LayerDerivation(
                l, layer, x_prev, z, a, delta, {"W": W, "b": b}, fwd,
                layer.activation.expr.subs(z_sym, z[n, i]), local, is_output=l == L,
            )
            self.layers.append(ld)
            x_prev = a
        self.loss = self._derive_loss()
        self._chain()

    def _derive_loss(self) -> LossDerivation:
        out = self.layers[-1]
        K = self.dims[-1]
        y = sp.IndexedBase("y", shape=(N, K))
        t = sp.IndexedBase("t", shape=(N, K))
        per_sample = self.network.loss.per_sample(y, t, K)
        grad = resolve(sp.diff(per_sample, y[n, p]))
        definitions = {}
        if self.network.loss.is_softmax:
            softmax = sp.IndexedBase("softmax", shape=(N, K))
            definition = sp.exp(y[n, p]) / sp.Sum(sp.exp(y[n, j]), (j, 0, K - 1))
            named = grad.subs(definition, softmax[n, p])
            if named != grad:
                grad, definitions = named, {softmax: definition}
        else:
            grad = sp.factor_terms(grad)
        W = out.params["W"]
        l2_term = resolve(sp.diff(l2 / 2 * sp.Sum(W[i, j] ** 2, (i, 0, K - 1), (j, 0, self.dims[-2] - 1)), W[p, q]))
        return LossDerivation(y, t, per_sample, grad, definitions, l2_term.subs(W, sp.IndexedBase("W")))

    def _chain(self) -> None:
        """Walk the layers from the output back, chaining local derivatives."""
        upstream = None
        for ld in reversed(self.layers):
            idx = (n, p)
            if ld.is_output:
                # δ_L = (1/N) ∂ℓ/∂y · f′(z_L): the loss sees a_L as its logits y.
                dl_dy = self.loss.grad.subs(self.loss.y, ld.a)
                ld.delta_formula = dl_dy / N * ld.fprime(idx)
            else:
                ld.delta_formula = ld.fprime(idx) * upstream
            W = ld.params["W"]
            d = ld.delta
            fan_out = self.dims[ld.index]
            ld.grads["W"] = resolve(sp.Sum(d[n, i] * ld.local["dz/dW"], (i, 0, fan_out - 1), (n, 0, N - 1))) + (
                self.loss.l2_term.subs(sp.IndexedBase("W"), W)
            )
            ld.grads["b"] = resolve(sp.Sum(d[n, i] * ld.local["dz/db"], (i, 0, fan_out - 1), (n, 0, N - 1)))
            # ∂C/∂a_{l-1}[n, q], renamed to index p: it becomes the next layer's δ upstream.
            up = resolve(sp.Sum(d[n, i] * ld.local["dz/dx"], (i, 0, fan_out - 1)))
            upstream = up.subs(q, p)

    # -- reading ---------------------------------------------------------------------
    def explain(self, scalar: bool = False) -> str:
        """Plain-text explanation: the forward pass, the loss, then from the output layer back
        each layer's local derivatives, δ and parameter gradients, with shapes; ``scalar=True``
        adds every neuron's formulas with named weights (small networks)."""
        from .explain import build

        return build(self, scalar).text()

    def latex(self, scalar: bool = False, standalone: bool = False) -> str:
        """The explanation as LaTeX (``align*`` blocks; ``standalone=True``: a full document)."""
        from .explain import build

        return build(self, scalar).latex(standalone)

    def markdown(self, scalar: bool = False) -> str:
        """The explanation as Markdown with ``$$`` LaTeX math blocks."""
        from .explain import build

        return build(self, scalar).markdown()

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
