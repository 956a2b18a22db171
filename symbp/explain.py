"""Plain-text (Unicode) explanation of a derivation: the formulas SymPy derived, per layer.

Everything printed is a SymPy object of the :class:`~symbp.derive.Derivation`, the same ones
the kernels were generated from; :class:`TextPrinter` only chooses a compact notation
(Σ for sums, δ for deltas, subscripts for widths).
"""

from __future__ import annotations

import re

from sympy.printing.str import StrPrinter

_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
_GREEK = {"delta": "δ", "lambda": "λ"}


class TextPrinter(StrPrinter):
    """Compact Unicode notation: ``Σ_j W1[i,j]·x[n,j]``, ``δ2[n,p]``, ``d₁``."""

    printmethod = "_symbp_text"  # not _sympystr: Indexed's own would bypass the methods below

    def _print_Symbol(self, expr):
        name = expr.name
        if name.startswith("d_") and name[2:].isdigit():
            return "d" + name[2:].translate(_SUB)
        return _GREEK.get(name, name)

    def _print_IndexedBase(self, expr):
        label = str(expr.label)
        for word, greek in _GREEK.items():
            if label.startswith(word):
                return greek + label[len(word):]
        return label

    def _print_Indexed(self, expr):
        return "%s[%s]" % (self._print(expr.base), ",".join(self._print(i) for i in expr.indices))

    def _print_Sum(self, expr):
        idx = ",".join(self._print(lim[0]) for lim in reversed(expr.limits))
        return "Σ_%s %s" % (idx, self.parenthesize(expr.function, 50))

    def _print_Mul(self, expr):
        return re.sub(r"(?<!\*)\*(?!\*)", "·", super()._print_Mul(expr))

    def _print_sigmoid(self, expr):
        return "σ(%s)" % self._print(expr.args[0])

    def _print_Heaviside(self, expr):
        return "H(%s)" % self._print(expr.args[0])

    def _print_KroneckerDelta(self, expr):
        return "δ_%s%s" % tuple(self._print(a) for a in expr.args)

    def _print_Piecewise(self, expr):
        parts = [f"{self._print(e)} if {self._print(c)}" for e, c in expr.args[:-1]]
        return "{" + "; ".join(parts + [f"{self._print(expr.args[-1].expr)} otherwise"]) + "}"


def fmt(expr) -> str:
    return TextPrinter().doprint(expr)


def explain_text(d) -> str:
    net = d.network
    L = len(d.layers)
    out = [
        f"Network {net.name}: {' → '.join(map(str, net.widths))}, loss {net.loss.name}, l2 λ = {net.l2:g}",
        "Cost  C = (1/N) Σ_n ℓ_n + (λ/2) Σ_l ‖W_l‖²   over a batch of N samples (index n).",
        "",
    ]
    for ld in d.layers:
        l, layer = ld.index, ld.layer
        prev = "x" if l == 1 else f"a{l - 1}"
        act = layer.activation
        out.append(f"Layer {l}: {layer.kind}({layer.units}), activation {act.describe()}")
        out.append(f"  shapes: {prev} (N, {net.widths[l - 1]}), W{l} ({layer.units}, {net.widths[l - 1]}), "
                   f"b{l} ({layer.units},), z{l}, a{l}, δ{l} (N, {layer.units})")
        out.append("  forward pass:")
        out.append(f"    z{l}[n,i] = {fmt(ld.forward)}")
        out.append(f"    a{l}[n,i] = {fmt(ld.output)}")
        out.append("  local derivatives:")
        out.append(f"    ∂z{l}[n,i]/∂W{l}[p,q] = {fmt(ld.local['dz/dW'])}    (the layer's input: the forward-pass part)")
        out.append(f"    ∂z{l}[n,i]/∂b{l}[p] = {fmt(ld.local['dz/db'])}")
        out.append(f"    ∂z{l}[n,i]/∂{prev}[n,q] = {fmt(ld.local['dz/dx'])}")
        deriv = f"    f′(z) = {fmt(act.derivative)}"
        if act.derivative_in_a is not None and not act.is_identity:
            deriv += f" = {fmt(act.derivative_in_a)} with a = f(z)"
        out.append(deriv)
        case = "output layer" if ld.is_output else "hidden layer"
        out.append(f"  backward pass ({case}): δ{l} = ∂C/∂z{l}")
        out.append(f"    δ{l}[n,p] = {fmt(ld.delta_formula)}")
        out.append("  parameter gradients:")
        for key, g in ld.grads.items():
            out.append(f"    ∂C/∂{key}{l}[{'p,q' if key == 'W' else 'p'}] = {fmt(g)}")
        out.append("")
    loss = d.loss
    out.append(f"Loss {net.loss.name} (y = a{L}, the logits; t = targets):")
    out.append(f"    ℓ_n = {fmt(loss.per_sample)}")
    out.append(f"    ∂ℓ_n/∂y[n,p] = {fmt(loss.grad)}")
    for base, definition in loss.definitions.items():
        out.append(f"      where {fmt(base)}[n,p] = {fmt(definition)}")
    out.append(f"    l2 term: ∂/∂W[p,q] (λ/2) Σ W² = {fmt(loss.l2_term)}")
    return "\n".join(out)

