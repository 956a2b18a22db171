"""Explanations of a derivation in text, LaTeX and Markdown, read off its SymPy objects.

:func:`build` turns a :class:`~symbp.derive.Derivation` into an :class:`Explanation`: the
forward pass, the loss and its gradient with respect to the logits, and the backward pass
from the output layer back, each layer with its local derivatives, its δ (the output-layer
or the hidden-layer case, named as such) and its parameter gradients, every quantity with
its shape.  Every formula is an expression of the derivation — the objects the kernels were
generated from — or the derivation's own pieces put side by side (δ = f′(z)·Σ W·δ′, whose
right-hand side *is* the derived δ).  The vector form (``z1 = W1·x + b1``,
``∂C/∂W1 = Σ_n δ1[n]·x[n]ᵀ``) is translated from the index formulas by
:func:`vector_form`, never typed in.

For networks of at most :data:`MAX_SCALAR_UNITS` units per layer the scalar view names every
unit and weight (x₁, h₁, o₁, w₁ … b₁ …) and writes each neuron's formulas the way lecture
slides do: ``∂C/∂z_h₁ = σ′(z_h₁)·(w₅·∂C/∂z_o₁ + w₇·∂C/∂z_o₂)``.

The renderers :meth:`Explanation.text`, :meth:`Explanation.latex` and
:meth:`Explanation.markdown` print the same document; :mod:`symbp.read.report` renders it as
HTML with MathML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .. import indices
from ..index_sums import resolve
from ..indices import N, as_size, i, j, n, p, q
from ..indices import l2 as l2_symbol
from .printing import MatVec, Outer, Partial, Pre, Prime, TextPrinter, Vec, activation_letter, latex, text

MAX_SCALAR_UNITS = 10  #: the scalar view names every unit of layers up to this width
_STEP_NOTE = "H(z) is the unit step with H(0) = 0 (the derivative of relu at 0, as PyTorch takes it)."

C = sp.Symbol("C")
ELL = sp.IndexedBase("ell")

__all__ = ["Block", "Equation", "Explanation", "MAX_SCALAR_UNITS", "Section", "TextPrinter", "build",
           "fmt", "scalar_names", "vector_form"]


def fmt(expr) -> str:
    """``expr`` in the compact Unicode notation of :class:`~symbp.read.printing.TextPrinter`."""
    return text(expr)


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------
@dataclass
class Equation:
    """``parts[0] = parts[1] = …`` (or ``parts[0] ← parts[1]``), all SymPy expressions.

    ``shape`` is the shape of the left-hand side as text (``"(N, 64)"``), ``note`` a short
    remark (Unicode; the LaTeX renderer translates its few math characters), ``quantity``
    what it computes, e.g. ``("z", 1)``, ``("grad", "W", 2)`` or ``("loss",)``:
    :mod:`symbp.read.report` finds the kernel lines by it.
    """

    parts: list
    shape: str | None = None
    note: str = ""
    quantity: tuple = ()
    relation: str = "="  # between parts[0] and parts[1]: "←" for an update statement


@dataclass
class Block:
    """A titled group of equations; ``kind="names"`` marks the scalar view's table of names.
    ``lines`` are short remarks in words (Unicode) shown before the equations: an image
    layer's output-size arithmetic and parameter count."""

    title: str
    equations: list[Equation] = field(default_factory=list)
    kind: str = ""
    lines: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    intro: str = ""
    anchor: str = ""


@dataclass
class Explanation:
    """A derivation laid out for reading; render with :meth:`text`, :meth:`latex`,
    :meth:`markdown` (or :func:`symbp.read.report.report` for HTML)."""

    title: str
    summary: str
    shapes: list[tuple]  # rows: (layer, type, activation, W shape, b shape, parameters, z/a/δ shape)
    total_params: int
    sections: list[Section]
    legend: list[str]

    def text(self) -> str:
        return _render_text(self)

    def latex(self, standalone: bool = False) -> str:
        return _render_latex(self, standalone)

    def markdown(self) -> str:
        return _render_markdown(self)

    def equations(self):
        """Every equation, in order, with its section and block."""
        for section in self.sections:
            for block in section.blocks:
                for eq in block.equations:
                    yield section, block, eq


# --------------------------------------------------------------------------------------------
# Vector form
# --------------------------------------------------------------------------------------------
class _NoVectorForm(Exception):
    pass


def vector_form(expr: sp.Expr, free: tuple = ()) -> sp.Expr | None:
    """The vector form of one sample's index formula, or None where it has none.

    ``free`` are the formula's free unit indices in order, e.g. ``(p, q)`` for ∂C/∂W[p, q].
    A quantity indexed ``[n, u]`` becomes that sample's column vector; ``Σ_s M[r,s]·v[n,s]``
    becomes ``M·v`` (or ``Mᵀ·v`` when M is indexed ``[s, r]``); ``Σ_n u[n,p]·v[n,q]`` becomes
    ``Σ_n u[n]·v[n]ᵀ``; everything else is elementwise (⊙ between vectors).

    Examples
    --------
    >>> import symbp as sb
    >>> d = sb.derive(sb.Network(inputs=3, layers=[sb.Dense(2)], loss="mse"))
    >>> fmt(vector_form(d.layers[0].forward, (i,)))
    'W1·x + b1'
    """
    try:
        return _vf(expr, tuple(free), None)
    except _NoVectorForm:
        return None


def _vec(e: sp.Indexed, sample) -> Vec:
    label = sp.Symbol(str(e.base.label))
    return Vec(label, sample) if sample is not None else Vec(label)


def _vf(e, free: tuple, sample):
    if isinstance(e, sp.Indexed):
        idx = e.indices
        if idx and idx[0] == n:
            if len(idx) != 2 or (free and idx[1] not in free):
                raise _NoVectorForm
            return _vec(e, sample)
        if len(idx) == 2 and tuple(idx) == tuple(free):
            return _vec(e, None)  # a whole matrix, W[p, q]
        if len(idx) == 1 and (not free or idx[0] in free):
            return _vec(e, None)  # a layer's vector, b[i]
        raise _NoVectorForm
    if isinstance(e, sp.Sum):
        if len(e.limits) != 1:
            raise _NoVectorForm
        s = e.limits[0][0]
        body = e.function
        if s == n:
            return sp.Sum(_batch_body(body, free), e.limits[0])
        return _contraction(body, s, free, sample)
    if not e.args or e.is_Atom:
        if isinstance(e, sp.Symbol) and e in (i, p, q):
            raise _NoVectorForm
        return e
    if isinstance(e, (sp.KroneckerDelta, sp.Piecewise)) and e.has(i, p, q):
        raise _NoVectorForm
    args = [_vf(a, free, sample) for a in e.args]
    try:
        return e.func(*args, evaluate=False)
    except TypeError:
        return e.func(*args)


def _batch_body(body, free):
    """Σ_n of one sample's terms: u[n,p]·v[n,q] → u[n]·v[n]ᵀ, u[n,p] → u[n]."""
    coeff, tensors = [], []
    for f in sp.Mul.make_args(body):
        (tensors if f.has(sp.Indexed) else coeff).append(f)
    if len(tensors) == 1 and len(free) == 1:
        return sp.Mul(*coeff) * _vf(tensors[0], free, n)
    if len(tensors) == 2 and len(free) == 2 and all(isinstance(t, sp.Indexed) for t in tensors):
        left = next((t for t in tensors if free[0] in t.indices), None)
        right = next((t for t in tensors if free[1] in t.indices and t is not left), None)
        if left is None or right is None or left.indices[0] != n or right.indices[0] != n:
            raise _NoVectorForm
        return sp.Mul(*coeff) * Outer(_vec(left, n), _vec(right, n))
    raise _NoVectorForm


def _contraction(body, s, free, sample):
    """Σ_s M[r,s]·v[n,s] → M·v, Σ_s M[s,r]·v[n,s] → Mᵀ·v (r the free unit index)."""
    coeff, tensors = [], []
    for f in sp.Mul.make_args(body):
        (tensors if f.has(sp.Indexed) else coeff).append(f)
    if len(tensors) != 2 or not all(isinstance(t, sp.Indexed) for t in tensors) or len(free) != 1:
        raise _NoVectorForm
    matrix = next((t for t in tensors if n not in t.indices), None)
    vector = next((t for t in tensors if t is not matrix), None)
    if matrix is None or vector is None or len(matrix.indices) != 2 or tuple(vector.indices) != (n, s):
        raise _NoVectorForm
    r = free[0]
    if tuple(matrix.indices) == (r, s):
        transposed = 0
    elif tuple(matrix.indices) == (s, r):
        transposed = 1
    else:
        raise _NoVectorForm
    return sp.Mul(*coeff) * MatVec(_vec(matrix, None), _vec(vector, sample), sp.Integer(transposed))


# --------------------------------------------------------------------------------------------
# Building the explanation
# --------------------------------------------------------------------------------------------
def _shape(*dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _fprime_parts(ld) -> list:
    """f′(z) = (derived f′) [= (f′ in a) with a = f(z)]."""
    act = ld.layer.activation
    z = sp.Symbol("z", real=True)
    parts = [Prime(activation_letter(act), z), act.derivative]
    if act.derivative_in_a is not None and not act.is_identity and act.derivative_in_a != act.derivative:
        parts.append(act.derivative_in_a)
    return parts


def _readers(d, ld) -> list:
    """The layers that read layer ``ld``'s output (in a chain: the one above it)."""
    return [m for m in d.layers if ld.index in m.sources]


def _upstream(d, ld):
    """The hidden-layer δ divided by its f′: the Σ_i W·δ part (W the weight of the one layer
    reading it, whatever its name), or None."""
    readers = _readers(d, ld)
    if len(readers) != 1:
        return None
    fp = ld.fprime((n, p))
    up = ld.delta_formula / fp
    bases = {str(b.label) for b in (x.base for x in up.atoms(sp.Indexed))}
    above = readers[0]
    weight = [str(above.params[above.affine[0]].label)] if above.affine else []
    return up if bases and bases <= {*weight, f"delta{above.index}"} else None


def _hidden_note(d, ld, dense: bool = False) -> str:
    """What the hidden-layer case multiplies f′(z) by: what the layer reading it sends back,
    or the sum of what each sends back (a tensor read by several layers); ``dense``: the
    dense layout, which says Wᵀ·δ of a dense layer above."""
    readers = _readers(d, ld)
    if len(readers) > 1:
        return ("hidden-layer case: f′(z) ⊙ (the sum of ∂C/∂a sent back by layers "
                + ", ".join(f"{m.index} ({describe_layer(m.layer)})" for m in readers) + ")")
    (above,) = readers
    if dense and above.affine and above.index == ld.index + 1:
        return "hidden-layer case: f′(z) ⊙ (Wᵀ·δ of the layer above)"
    note = "hidden-layer case: f′(z) ⊙ (∂C/∂a sent back by layer %d, %s)" % (above.index, describe_layer(above.layer))
    extra = above.layer.notes.get("sent_back", _routing_note(above.layer))
    return note + ("; " + extra if extra else "")


def _vector_eq(lhs, index_expr, free, shape, quantity, note="") -> Equation | None:
    vf = vector_form(index_expr, free)
    return None if vf is None else Equation([lhs, vf], shape, note, quantity)


def build(d, scalar: bool = False, optimizer=None) -> Explanation:
    """Lay out the derivation ``d`` for reading (see the module docstring).

    Parameters
    ----------
    d : Derivation
    scalar : bool
        Add the scalar view (every unit and weight named); the network must have at most
        :data:`MAX_SCALAR_UNITS` units in its input and in every layer.
    optimizer : Optimizer, optional
        Add its update rule (the statements the training kernels fuse into the backward pass).
    """
    from ..train.optim import Optimizer

    # A Derivation (not imported: derive's reading methods call this module)
    if not all(hasattr(d, attr) for attr in ("network", "layers", "loss", "dims")):
        raise TypeError(f"expected a symbp Derivation (from sb.derive(net)), got {type(d).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a symbp optimizer such as sb.Adam(), got {type(optimizer).__name__}")
    doc = _build(d, scalar)
    if not any(isinstance(part, sp.Basic) and part.has(sp.Heaviside) for _, _, eq in doc.equations() for part in eq.parts):
        # The unit step is relu's (or a custom max's) derivative: a tanh net never shows one.
        doc.legend = [line for line in doc.legend if line != _STEP_NOTE]
    if optimizer is not None:
        doc.sections.append(_update_section(d, optimizer))
        doc.legend.append("θ ← e replaces θ by the value of e; the statements of an update rule run in order.")
    return doc


def _build(d, scalar: bool) -> Explanation:
    net = d.network
    widths = net.widths
    L = len(d.layers)
    # The vector form and the scalar view read each layer as one affine map and its activation.
    if not all(ld.affine for ld in d.layers):
        if scalar:
            ld = next(x for x in d.layers if not x.affine)
            raise ValueError(f"the scalar view names every unit and weight of a dense network (each layer one "
                             f"affine map); layer {ld.index} is {ld.layer!r} (use scalar=False for the index form "
                             f"of its stages)")
        return _build_image(d)
    if scalar:
        _check_scalar_size(net)
    shapes = []
    total = 0
    for ld in d.layers:
        l = ld.index
        count = widths[l] * widths[l - 1] + widths[l]
        total += count
        shapes.append((str(l), ld.layer.describe(), ld.layer.activation.describe(),
                       _shape(widths[l], widths[l - 1]), _shape(widths[l]), str(count), _shape("N", widths[l])))
    summary = (f"{' → '.join(map(str, widths))}, loss {net.loss.name}, l2 λ = {net.l2:g}, "
               f"{total} parameters")
    sections = [_forward_section(d), _loss_section(d), _backward_section(d), _l2_section(d)]
    if scalar:
        sections.append(_scalar_section(d))
    legend = [
        "n indexes the N samples of a batch; i, j, p, q index units; the widths d₀, d₁, … stay symbols "
        "until the kernels fix them.",
        "δ_ip (two index letters) is the Kronecker delta: 1 if i = p, else 0.",
        f"δl[n,p] = ∂C/∂zl[n,p] is layer l's error signal; the output layer is layer {L}.",
        "In the vector form x, z, a, δ are one sample's column vectors, ᵀ transposes and ⊙ is the "
        "elementwise product.",
        _STEP_NOTE,
    ]
    return Explanation(f"Backpropagation in {net.name}", summary, shapes, total, sections, legend)


def _forward_section(d) -> Section:
    sec = Section("Forward pass", anchor="forward",
                  intro="Each layer computes z = W·x + b from its input, then a = f(z) elementwise.")
    for ld in d.layers:
        sec.blocks.append(_dense_forward_block(d, ld))
    return sec


def _dense_forward_block(d, ld) -> Block:
    l, w = ld.index, d.network.widths[ld.index]
    block = Block(f"Layer {l}: {ld.layer.describe()}, activation {ld.layer.activation.describe()}")
    block.equations.append(Equation([ld.z[n, i], ld.forward], _shape("N", w), quantity=("z", l)))
    block.equations.append(Equation([ld.a[n, i], ld.output], _shape("N", w), quantity=("a", l)))
    note = "one sample, column vectors"
    for lhs, expr, q_ in ((ld.z, ld.forward, ("z", l)), (ld.a, ld.output, ("a", l))):
        eq = _vector_eq(Vec(sp.Symbol(str(lhs.label))), expr, (i,), _shape(w), q_, note)
        if eq is not None:
            block.equations.append(eq)
            note = ""
    return block


def _loss_section(d) -> Section:
    net, loss = d.network, d.loss
    L, K = len(d.layers), net.widths[-1]
    sec = Section(f"Loss {net.loss.name}", anchor="loss",
                  intro=f"y = a{L} are the logits (the last layer's output) and t the targets; "
                        "C averages the per-sample loss over the batch.")
    block = Block("Per-sample loss and its gradient with respect to the logits")
    block.equations.append(Equation([ELL[n], loss.per_sample], "(N,)", quantity=("loss",)))
    grad_parts = [Partial(ELL[n], loss.y[n, p]), loss.grad]
    try:
        from ..spec.ops import simplest

        shorter = simplest(loss.grad)
        if sp.count_ops(shorter) < sp.count_ops(loss.grad) and shorter != loss.grad:
            grad_parts.append(shorter)
    except Exception:  # noqa: BLE001 - a failed simplification just leaves the form out
        pass
    block.equations.append(Equation(grad_parts, _shape("N", K), "the loss gradient with respect to the logits",
                                    quantity=("dloss",)))
    for base, definition in loss.definitions.items():
        block.equations.append(Equation([base[n, p], definition], _shape("N", K), "where"))
    eq = _vector_eq(Partial(sp.Symbol("ell"), Vec(sp.Symbol("y"))), loss.grad, (p,), _shape(K), ("dloss",),
                    "one sample")
    if eq is not None:
        block.equations.append(eq)
    sec.blocks.append(block)
    return sec


def _backward_section(d) -> Section:
    L = len(d.layers)
    sec = Section("Backward pass, from the output layer back", anchor="backward",
                  intro=f"δl = ∂C/∂zl. The output-layer case starts the recurrence at layer {L}; "
                        "the hidden-layer case carries it down through the weights, Wᵀ·δ.")
    for ld in reversed(d.layers):
        sec.blocks += _dense_backward_blocks(d, ld)
    return sec


def _dense_backward_blocks(d, ld) -> list[Block]:
    net = d.network
    blocks = []
    l, w, (w_in,) = ld.index, net.widths[ld.index], ld.in_shape
    xin = ld.x
    case = "output-layer case" if ld.is_output else "hidden-layer case"
    local = Block(f"Layer {l} ({case}): local derivatives")
    wk, bk = ld.affine  # Dense's W and b, or a formula layer's own names for them
    local.equations += [
        Equation([Partial(ld.z[n, i], ld.params[wk][p, q]), ld.local[f"dz/d{wk}"]], f"per sample ({w}) × ({w}, {w_in})",
                 "the layer's input: the forward-pass part"),
        Equation([Partial(ld.z[n, i], ld.params[bk][p]), ld.local[f"dz/d{bk}"]], f"per sample ({w}) × ({w},)"),
        Equation([Partial(ld.z[n, i], xin[n, q]), ld.local["dz/dx"]], f"per sample ({w}) × ({w_in},)",
                 "what carries δ down to the layer below"),
        Equation(_fprime_parts(ld), _shape("N", w), "∂a/∂z, elementwise" + (
            "; written with a = f(z)" if len(_fprime_parts(ld)) > 2 else ""), quantity=("fprime", l)),
    ]
    blocks.append(local)
    back = Block(f"Layer {l} ({case}): δ{l} = ∂C/∂z{l}")
    act = ld.layer.activation
    fp = sp.Integer(1) if act.is_identity else Prime(activation_letter(act), ld.z[n, p])
    if ld.is_output:
        chain = Partial(ELL[n], d.loss.y[n, p]) * fp / N
        back.equations.append(Equation([ld.delta[n, p], chain, ld.delta_formula], _shape("N", w),
                                       "output-layer case: (1/N)·∂ℓ/∂y ⊙ f′(z)", ("delta", l)))
    else:
        up = _upstream(d, ld)
        parts = [ld.delta[n, p]] + ([fp * up] if up is not None and not act.is_identity else []) + [ld.delta_formula]
        back.equations.append(Equation(parts, _shape("N", w), _hidden_note(d, ld, dense=True), ("delta", l)))
    eq = _vector_eq(Vec(sp.Symbol(f"delta{l}")), ld.delta_formula, (p,), _shape(w), ("delta", l), "one sample")
    if eq is not None:
        back.equations.append(eq)
    blocks.append(back)
    grads = Block(f"Layer {l}: parameter gradients")
    W, b, delta = ld.params[wk], ld.params[bk], ld.delta
    fan_out = d.dims[l]
    chain_W = sp.Sum(delta[n, i] * ld.local[f"dz/d{wk}"], (i, 0, fan_out - 1), (n, 0, N - 1))
    l2 = ld.grads[wk] - _resolved_data_part(ld)
    grads.equations.append(Equation([Partial(C, W[p, q]), chain_W + l2, ld.grads[wk]], _shape(w, w_in),
                                    "summed over the batch; the Kronecker δ keeps only i = p", ("grad", wk, l)))
    chain_b = sp.Sum(delta[n, i] * ld.local[f"dz/d{bk}"], (i, 0, fan_out - 1), (n, 0, N - 1))
    grads.equations.append(Equation([Partial(C, b[p]), chain_b, ld.grads[bk]], _shape(w), quantity=("grad", bk, l)))
    for key, free, shape in ((wk, (p, q), _shape(w, w_in)), (bk, (p,), _shape(w))):
        eq = _vector_eq(Partial(C, Vec(sp.Symbol(f"{key}{l}"))), ld.grads[key], free, shape, ("grad", key, l),
                        "" if key == bk else "Σ over the samples n of the batch")
        if eq is not None:
            grads.equations.append(eq)
    blocks.append(grads)
    return blocks


def _resolved_data_part(ld):
    """The data term of ∂C/∂W (the Σ_n), without the l2 term."""
    sums = [t for t in sp.Add.make_args(ld.grads[ld.affine[0]]) if t.has(sp.Sum)]
    return sp.Add(*sums)


def _l2_section(d) -> Section:
    net = d.network
    W = sp.IndexedBase("W")
    lam = sp.Symbol("lambda", nonnegative=True)
    d_out, d_in = sp.symbols("d_out d_in", integer=True, positive=True)
    half_norm = lam / 2 * sp.Sum(W[i, j] ** 2, (j, 0, d_in - 1), (i, 0, d_out - 1))
    sec = Section("The l2 term", anchor="l2",
                  intro=f"(λ/2) Σ_l ‖W_l‖² is added to the cost (λ = {net.l2:g}); biases are not decayed.")
    block = Block("Its contribution to every weight gradient")
    block.equations.append(Equation([Partial(half_norm, W[p, q]), d.loss.l2_term], "like W",
                                    quantity=("l2",)))
    sec.blocks.append(block)
    return sec


def _update_section(d, opt) -> Section:
    """The optimizer's update statements: ``opt.formulas()``, the rules the training module's
    kernels are generated from (there over each parameter's entries, here over θ and g)."""
    names = ", ".join(f"{key}{ld.index}" for ld in d.layers for key in ld.params)  # not running statistics
    settings = ", ".join(f"{fmt(sp.Symbol(k))} = {v:g}" for k, v in opt.hyper.items())
    state = ", ".join(fmt(sp.Symbol(s_)) for s_ in opt.state_names)
    intro = (f"After the backward pass, every parameter θ ({names}) with its gradient g = ∂C/∂θ takes this step, "
             f"fused into the same generated kernel; t counts the steps from 1. Settings: {settings}.")
    if state:
        intro += (f" State per parameter, shaped like it: {state} (opt.state[name]), starting at "
                  + ", ".join(f"{opt.state_init(s_):g}" for s_ in opt.state_names) + ".")
    sec = Section(f"Update rule: {opt.describe()}", anchor="update", intro=intro)
    block = Block("One step, in order")
    for target, value in opt.formulas():
        block.equations.append(Equation([target, value], "like θ", quantity=("update", str(target)), relation="←"))
    sec.blocks.append(block)
    return sec


# --------------------------------------------------------------------------------------------
# Networks with image layers
# --------------------------------------------------------------------------------------------
def _pair_text(pair, sep: str = "×") -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}{sep}{pair[1]}"


def describe_layer(layer) -> str:
    """The layer with its hyper-parameters: ``Conv2D(8 filters, 5×5, stride 1, padding 0)``."""
    return layer.describe()


def _shape_text(shape: tuple) -> str:
    return str(shape[0]) if len(shape) == 1 else _shape(*shape)


def _size_lines(ld) -> list[str]:
    """Input → output shape, with the layer's own output-size arithmetic and parameter count."""
    if ld.layer.merges or ld.sources != (ld.index - 1,):  # a graph: say which tensors it reads
        ins = " and ".join(f"{base.label} {_shape(*shape)}" for base, shape in
                           zip(ld.inputs, ld.in_shape if ld.layer.merges else (ld.in_shape,)))
        first = f"input{'s' if ld.layer.merges else ''} {ins} → output {_shape(*ld.out_shape)}"
    else:
        first = f"input {_shape(*ld.in_shape)} → output {_shape(*ld.out_shape)}"
    return [first, *ld.layer.size_lines(ld, text)]


def _sizes_line(d, ld) -> str:
    """The numbers of the size symbols this layer's formulas use (kh₁ = 3, S₁ = 1, …)."""
    used = set()
    for st in ld.stages:
        used |= st.formula.free_symbols | set().union(*(as_size(x).free_symbols for x in st.dims))
    for g in ld.grads.values():
        used |= g.free_symbols
    order = ["C", "H", "W", "d", "kh", "kw", "S", "Sc", "P", "Pc", "pieces"]
    known = sorted((sym for sym in used if sym in d.sizes),
                   key=lambda x: (int(str(x).split("_")[-1]), order.index(str(x).split("_")[0])
                                  if str(x).split("_")[0] in order else 99))
    return "sizes: " + ", ".join(f"{text(sym)} = {d.sizes[sym]}" for sym in known) if known else ""


def _label_kind(label: str) -> str:
    return label.rstrip("0123456789")


def _image_forward_block(d, ld) -> Block:
    l, layer = ld.index, ld.layer
    act = layer.activation
    title = f"Layer {l}: {describe_layer(layer)}" + ("" if act.is_identity else f", activation {act.describe()}")
    block = Block(title, lines=_size_lines(ld))
    sizes = _sizes_line(d, ld)
    if sizes:
        block.lines.append(sizes)
    for st in ld.stages:
        parts = [st.at(st.idx), st.formula]
        resolved = resolve(st.formula, {**ld.ranges, **{x: (0, ext - 1) for x, ext in zip(st.idx, st.dims)}})
        if resolved.has(sp.Piecewise):  # the padding's border made explicit
            parts.append(resolved)
        is_z = st.target is ld.z
        note = layer.notes.get("z" if is_z else f"stage:{_label_kind(str(st.target.label))}", "")
        quantity = ("z", l) if is_z else ("stage", str(st.target.label), l)
        block.equations.append(Equation(parts, _dims_shape(d, st.dims, st.batch), note, quantity))
    if not act.is_identity:
        block.equations.append(Equation([ld.a[(n, *ld.out_idx)], ld.output], _shape("N", *ld.out_shape),
                                        quantity=("a", l)))
    return block


def _dims_shape(d, dims, batch: bool = False) -> str:
    """A stage's shape: (N, …) per sample, (…) for one value of the whole batch."""
    return _shape(*([] if batch else ["N"]), *(as_size(x).subs(d.sizes) for x in dims))


def _free_for(ndim: int) -> tuple:
    """The free indices of ∂/∂ a source of ``ndim`` indices per sample (none: a per-sample number)."""
    return {0: (), 3: (q, indices.r, indices.s)}.get(ndim, (q,))


def _routing_note(layer) -> str:
    return layer.notes.get("routing", "")


def _image_backward_blocks(d, ld) -> list[Block]:
    l, layer = ld.index, ld.layer
    act = layer.activation
    case = "output-layer case" if ld.is_output else "hidden-layer case"
    local = Block(f"Layer {l} ({case}): local derivatives")
    stage_of = {str(st.target.label): st for st in ld.stages}
    for key, expr in ld.local.items():
        if key == "da/dz":
            continue
        top, wrt = key.split("/")
        st = ld.stages[-1] if top == "dz" else stage_of[top[1:]]
        wrt = wrt[1:]
        topic = "local:" + ("z" if st.target is ld.z else _label_kind(str(st.target.label))) + "/"
        if wrt in ld.params:
            base, idx = ld.params[wrt], ld.param_idx[wrt]
            note = layer.notes.get(topic + wrt, "")
        else:
            inputs = {"x" if base_ is ld.x else str(base_.label): (base_, dims_) for base_, dims_ in zip(ld.inputs, ld.in_dims)}
            src = next((x.target for x in ld.stages if str(x.target.label) == wrt), None)
            if src is None:  # a layer input: the first is keyed "x", another by its label (a merging layer)
                src, dims = inputs[wrt]
            else:
                dims = next(x.dims for x in ld.stages if x.target is src)
            batch = any(x.batch for x in ld.stages if x.target is src)  # a batch value has no n
            base, idx = src, (() if batch else (n,)) + tuple(_free_for(len(dims)))
            if src in ld.inputs:  # how δ reaches the input, unless the layer says more about this step
                note = layer.notes.get(topic + "x", _routing_note(layer))
            else:
                note = layer.notes.get(topic + _label_kind(str(src.label)), "")
        local.equations.append(Equation([Partial(st.at(st.idx), base[idx]), expr], None, note))
    if not act.is_identity:
        parts = _fprime_parts(ld)
        local.equations.append(Equation(parts, _shape("N", *ld.out_shape), "∂a/∂z, elementwise", ("fprime", l)))
    blocks = [local] if local.equations else []
    didx = (n, *ld.delta_idx)
    back = Block(f"Layer {l} ({case}): δ{l} = ∂C/∂z{l}")
    fp = sp.Integer(1) if act.is_identity else Prime(activation_letter(act), ld.z[didx])
    if ld.is_output:
        chain = Partial(ELL[n], d.loss.y[n, p]) * fp / N
        back.equations.append(Equation([ld.delta[didx], chain, ld.delta_formula], _shape("N", *ld.out_shape),
                                       "output-layer case: (1/N)·∂ℓ/∂y ⊙ f′(z)", ("delta", l)))
    else:
        back.equations.append(Equation([ld.delta[didx], ld.delta_formula], _shape("N", *ld.out_shape),
                                       _hidden_note(d, ld), ("delta", l)))
    blocks.append(back)
    if ld.stage_grads:
        inner = Block(f"Layer {l}: gradients of its intermediate stages")
        for label, (gb, free, formula) in ld.stage_grads.items():
            st = stage_of[label]
            note = layer.notes.get(f"stage_grad:{_label_kind(label)}", "")
            inner.equations.append(Equation([gb[free] if st.batch else gb[(n, *free)], Partial(C, st.at(free)), formula],
                                            _dims_shape(d, st.dims, st.batch), note, ("stage_grad", label, l)))
        blocks.append(inner)
    if ld.params:
        grads = Block(f"Layer {l}: parameter gradients")
        for key, base in ld.params.items():
            idx = ld.param_idx[key]
            st = next(x for x in ld.stages if x.formula.has(base))
            g = ld.delta if st.target is ld.z else ld.stage_grads[str(st.target.label)][0]
            limits = [(x, 0, ext - 1) for x, ext in zip(st.idx, st.dims)]
            chain = sp.Sum(g[(n, *st.idx)] * ld.local[ld.local_key(st, key)], *limits, (n, 0, N - 1))
            data = sp.Add(*[t for t in sp.Add.make_args(ld.grads[key]) if t.has(sp.Sum)])
            parts = [Partial(C, base[idx]), chain + (ld.grads[key] - data), ld.grads[key]]
            shape = _shape(*d.network.param_shapes()[f"{key}{l}"])
            note = layer.notes.get(f"grad:{key}", layer.notes.get("grad", "summed over the batch"))
            grads.equations.append(Equation(parts, shape, note, ("grad", key, l)))
        blocks.append(grads)
    return blocks


def _build_image(d) -> Explanation:
    """The explanation of a network with image layers: stages, sizes and routing per layer."""
    net = d.network
    L = len(d.layers)
    shapes = []
    param_shapes = net.param_shapes()
    for ld in d.layers:
        l, layer = ld.index, ld.layer
        wk, bk = ld.affine or ("W", "b")  # the table's weight and bias columns
        Wsh, bsh = param_shapes.get(f"{wk}{l}"), param_shapes.get(f"{bk}{l}")
        shapes.append((str(l), describe_layer(layer), layer.activation.describe(), _shape(*Wsh) if Wsh else "—",
                       _shape(*bsh) if bsh else "—", str(ld.param_count), _shape("N", *ld.out_shape)))
    total = sum(ld.param_count for ld in d.layers)
    summary = (f"{' → '.join(_shape_text(sh) for sh in net.shapes)}, loss {net.loss.name}, l2 λ = {net.l2:g}, "
               f"{total} parameters")
    fwd = Section("Forward pass", anchor="forward",
                  intro="Each layer's stages in index notation, for sample n of the batch; the last stage is z, "
                        "then a = f(z) elementwise. Sizes stay symbols in the formulas; their numbers are listed.")
    for ld in d.layers:
        fwd.blocks.append(_dense_forward_block(d, ld) if ld.affine else _image_forward_block(d, ld))
        if ld.affine:
            fwd.blocks[-1].lines = _dense_size_lines(ld)
    back = Section("Backward pass, from the output layer back", anchor="backward",
                   intro=f"δl = ∂C/∂zl. The output-layer case starts the recurrence at layer {L}; each layer below "
                         "gets f′(z) ⊙ what the layer above sends back: Wᵀ·δ through a dense layer, the transposed "
                         "convolution through a convolution, δ routed to the arg-max through max pooling, spread "
                         "evenly through average pooling, reshaped through Flatten.")
    for ld in reversed(d.layers):
        back.blocks += _dense_backward_blocks(d, ld) if ld.affine else _image_backward_blocks(d, ld)
    sections = [fwd, _loss_section(d), back, _l2_section(d)]
    legend = [
        "n indexes the N samples of a batch; for images c, u, v run over a filter's input channel, rows and "
        "columns, k, h, w over an output channel and position, and p, q, r, s are the free indices of a "
        "derivative (∂C/∂W[p,q,r,s]); i, j, p, q index the units of flat layers.",
        "Shapes are channels first, one sample (C, H, W); W of a convolution is (K, C, kh, kw), as PyTorch's.",
        "x̃l is layer l's zero-padded input; gx̃l = ∂C/∂x̃l (and gyl for Maxout's pieces) are named gradients "
        "the kernels compute into buffers.",
        "[lo ≤ e ≤ hi] is the Iverson bracket: 1 where the condition holds, else 0; [j = m] routes a max: 1 only "
        "at the arg-max m.",
        "δ_ip (two index letters) and δ(a, b) are the Kronecker delta: 1 if the two are equal, else 0.",
        f"δl = ∂C/∂zl is layer l's error signal; the output layer is layer {L}.",
        _STEP_NOTE,
    ]
    return Explanation(f"Backpropagation in {net.name}", summary, shapes, total, sections, legend)


def _dense_size_lines(ld) -> list[str]:
    fan_in, units = ld.in_shape[0], ld.layer.units
    return [_size_lines(ld)[0],
            f"parameters (W {_shape(units, fan_in)}, b {_shape(units)}): (in + 1)·out = ({fan_in} + 1)·{units} "
            f"= {ld.param_count}"]


# --------------------------------------------------------------------------------------------
# Scalar view
# --------------------------------------------------------------------------------------------
_HIDDEN_LETTERS = "hgurvs"


def _check_scalar_size(net) -> None:
    for pos, width in enumerate(net.widths):
        if width > MAX_SCALAR_UNITS:
            what = "the input" if pos == 0 else f"layer {pos}"
            raise ValueError(f"the scalar view names every unit, so it needs at most {MAX_SCALAR_UNITS} units per "
                             f"layer; {what} has {width} (use scalar=False for the index and vector forms)")


@dataclass
class ScalarNames:
    """Names of the scalar view: ``units[l][u]`` (l = 0 for the inputs), ``weights[(l, i, j)]``,
    ``biases[(l, i)]``, ``targets[k]``; ``mapping`` replaces one sample's indexed quantities."""

    units: list[list[sp.Symbol]]
    weights: dict
    biases: dict
    targets: list[sp.Symbol]
    mapping: dict


def scalar_names(d) -> ScalarNames:
    """Lecture names for one sample: inputs x₁…, hidden units h₁… (then g, u, …), outputs
    o₁…, weights w₁… numbered row by row through the layers (W1[0,0] = w₁, W1[0,1] = w₂,
    …), biases b₁…, targets t₁…."""
    net = d.network
    L = len(d.layers)
    letters = {0: "x", L: "o"}
    hidden = list(range(1, L))
    if len(hidden) > len(_HIDDEN_LETTERS):
        raise ValueError(f"the scalar view names at most {len(_HIDDEN_LETTERS)} hidden layers; this network has "
                         f"{len(hidden)}")
    for pos, l in enumerate(hidden):
        letters[l] = _HIDDEN_LETTERS[pos]
    units = [[sp.Symbol(f"{letters[l]}_{u + 1}") for u in range(w)] for l, w in enumerate(net.widths)]
    targets = [sp.Symbol(f"t_{k + 1}") for k in range(net.widths[-1])]
    mapping: dict = {}
    for u in range(net.widths[0]):
        mapping[d.x[n, u]] = units[0][u]
    weights, biases = {}, {}
    wk = bk = 0
    for ld in d.layers:
        l = ld.index
        for u in range(net.widths[l]):
            mapping[ld.a[n, u]] = units[l][u]
            mapping[ld.z[n, u]] = Pre(units[l][u])
            mapping[ld.delta[n, u]] = Partial(C, Pre(units[l][u]))
            for v in range(net.widths[l - 1]):
                wk += 1
                weights[(l, u, v)] = sp.Symbol(f"w_{wk}")
                mapping[ld.params[ld.affine[0]][u, v]] = weights[(l, u, v)]
            bk += 1
            biases[(l, u)] = sp.Symbol(f"b_{bk}")
            mapping[ld.params[ld.affine[1]][u]] = biases[(l, u)]
    for k in range(net.widths[-1]):
        mapping[d.loss.t[n, k]] = targets[k]
        mapping[d.loss.y[n, k]] = units[L][k]
        for base in d.loss.definitions:
            mapping[base[n, k]] = sp.Symbol(f"{base.label}_{k + 1}")
    return ScalarNames(units, weights, biases, targets, mapping)


def _instantiate(d, expr, names: ScalarNames, index: dict | None = None):
    """``expr`` at concrete unit indices with the widths fixed, unit sums expanded and every
    quantity renamed (sums over the batch stay sums)."""
    fixed = {d.dims[l]: w for l, w in enumerate(d.network.widths)}
    if not d.network.l2:
        fixed[l2_symbol] = 0  # no weight decay: leave the λ terms out of the slide
    e = expr.subs(fixed).subs(index or {})
    e = e.replace(lambda s: isinstance(s, sp.Sum) and s.limits[0][0] != n, lambda s: s.doit())
    by_key = {(str(k.base.label), tuple(k.indices)): v for k, v in names.mapping.items()}

    def rename(x):
        key = (str(x.base.label), tuple(x.indices))
        if key not in by_key:
            raise ValueError(f"scalar view: no name for {x}")
        return by_key[key]

    return e.replace(lambda x: isinstance(x, sp.Indexed), rename)


def _scalar_section(d) -> Section:
    net = d.network
    L = len(d.layers)
    names = scalar_names(d)
    sec = Section("Scalar view: every unit and weight named", anchor="scalar",
                  intro="One sample; the sums over n add up the samples of a batch (with one sample, N = 1 "
                        "and they disappear).")
    legend = Block("Names", kind="names")
    for u, x in enumerate(names.units[0]):
        legend.equations.append(Equation([x, d.x[n, u]], note="input"))
    for ld in d.layers:
        l = ld.index
        for u in range(net.widths[l]):
            for v in range(net.widths[l - 1]):
                legend.equations.append(Equation([names.weights[(l, u, v)], ld.params[ld.affine[0]][u, v]],
                                                 note=f"{fmt(names.units[l - 1][v])} → {fmt(names.units[l][u])}"))
        for u in range(net.widths[l]):
            legend.equations.append(Equation([names.biases[(l, u)], ld.params[ld.affine[1]][u]],
                                             note=f"bias of {fmt(names.units[l][u])}"))
    sec.blocks.append(legend)
    fwd = Block("Forward pass")
    for ld in d.layers:
        l = ld.index
        for u, unit in enumerate(names.units[l]):
            fwd.equations.append(Equation([Pre(unit), _instantiate(d, ld.forward, names, {i: u})], quantity=("z", l)))
            fwd.equations.append(Equation([unit, _instantiate(d, ld.output, names, {i: u})], quantity=("a", l)))
    sec.blocks.append(fwd)
    loss = Block("Loss")
    ell = sp.Symbol("ell")
    loss.equations.append(Equation([ell, _instantiate(d, d.loss.per_sample, names)], quantity=("loss",)))
    for k, unit in enumerate(names.units[L]):
        loss.equations.append(Equation([Partial(ell, unit), _instantiate(d, d.loss.grad, names, {p: k})], quantity=("dloss",)))
    for base, definition in d.loss.definitions.items():
        for k in range(net.widths[-1]):
            loss.equations.append(Equation([sp.Symbol(f"{base.label}_{k + 1}"), _instantiate(d, definition, names, {p: k})],
                                           note="where"))
    sec.blocks.append(loss)
    for ld in reversed(d.layers):
        l = ld.index
        case = "output-layer case" if ld.is_output else "hidden-layer case"
        block = Block(f"Backward pass, layer {l} ({case})")
        up = None if ld.is_output else _upstream(d, ld)
        for u, unit in enumerate(names.units[l]):
            fp = Prime(activation_letter(ld.layer.activation), Pre(unit))
            if ld.is_output:
                middle = Partial(ell, unit) * fp / N
            else:
                middle = fp * _instantiate(d, up, names, {p: u}) if up is not None else None
            parts = [Partial(C, Pre(unit))] + ([middle] if middle is not None else [])
            parts.append(_instantiate(d, ld.delta_formula, names, {p: u}))
            block.equations.append(Equation(parts, quantity=("delta", l)))
        sec.blocks.append(block)
    grads = Block("Parameter gradients")
    for ld in d.layers:
        l, (wk, bk) = ld.index, ld.affine
        for u in range(net.widths[l]):
            for v in range(net.widths[l - 1]):
                w = names.weights[(l, u, v)]
                grads.equations.append(Equation([Partial(C, w), _instantiate(d, ld.grads[wk], names, {p: u, q: v})],
                                                quantity=("grad", wk, l)))
        for u in range(net.widths[l]):
            grads.equations.append(Equation([Partial(C, names.biases[(l, u)]), _instantiate(d, ld.grads[bk], names, {p: u})],
                                            quantity=("grad", bk, l)))
    sec.blocks.append(grads)
    return sec


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
_TEXT_COLUMN = 60  # shapes and notes line up here (longer formulas put them on the next line)


def _render_text(doc: Explanation) -> str:
    out = [f"{doc.title}: {doc.summary}",
           "Cost  C = (1/N) Σ_n ℓ_n + (λ/2) Σ_l ‖W_l‖²   over a batch of N samples (index n).", ""]
    out.append("Shapes and parameters")
    header = ("layer", "type", "activation", "W", "b", "parameters", "z, a, δ")
    rows = [header] + [tuple(r) for r in doc.shapes] + [("total", "", "", "", "", str(doc.total_params), "")]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        out.append("  " + "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip())
    for section in doc.sections:
        out += ["", section.title]
        if section.intro:
            out.append("  " + section.intro)
        for block in section.blocks:
            out.append("  " + block.title)
            out += ["    " + line for line in block.lines]
            lines = [_joined(eq, fmt) for eq in block.equations]
            col = min(max((len(s) for s in lines), default=0), _TEXT_COLUMN)
            for s, eq in zip(lines, block.equations):
                tail = "  ".join(x for x in (eq.shape or "", eq.note) if x)
                if not tail:
                    out.append("    " + s)
                elif len(s) <= col:
                    out.append("    " + s.ljust(col) + "    " + tail)
                else:
                    out += ["    " + s, "    " + " " * (col + 4) + tail]
    out += ["", "Notation"] + ["  " + line for line in doc.legend]
    return "\n".join(out)


def _joined(eq: Equation, show) -> str:
    """``lhs = rhs = …`` (or ``lhs ← rhs``) with each part printed by ``show``."""
    parts = [show(part) for part in eq.parts]
    return " ".join([parts[0], eq.relation, " = ".join(parts[1:])]) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------
# LaTeX and Markdown
# --------------------------------------------------------------------------------------------
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---"}


_TEX_MATH = {"≤": r"\le", "⌊": r"\lfloor", "⌋": r"\rfloor", "−": "-",
             "δ": r"\delta", "λ": r"\lambda", "∂": r"\partial", "Σ": r"\Sigma", "ℓ": r"\ell", "σ": r"\sigma",
             "ᵀ": r"^{\top}", "⊙": r"\odot", "→": r"\to", "‖": r"\|", "·": r"\cdot", "′": "'", "…": r"\dots",
             "×": r"\times", "θ": r"\theta", "β": r"\beta", "α": r"\alpha", "γ": r"\gamma", "ε": r"\epsilon",
             "←": r"\leftarrow", "√": r"\surd", "⁰": "^0", "¹": "^1", "²": "^2", **{chr(0x2080 + k): f"_{k}" for k in range(10)}}


def _tex_text(s: str) -> str:
    """Text for LaTeX: specials escaped, the notes' few math characters in math mode (ASCII out)."""
    out = []
    for c in s.replace("x̃", "\0"):
        if c == "\0":
            out.append(r"$\tilde{x}$")
        elif c in _TEX_MATH:
            out.append("$%s$" % _TEX_MATH[c])
        else:
            out.append(_TEX_SPECIAL.get(c, c))
    return "".join(out).replace("$$", "")


def _tex_shape(shape: str | None) -> str:
    if not shape:
        return ""
    return r"\text{%s}" % _tex_text(shape)


def latex_equation(eq: Equation, ascii_only: bool = True) -> str:
    """One equation as an ``align`` row: ``lhs &= rhs = … && \text{shape, note}``.

    ``ascii_only`` puts the note's math characters in math mode (for pdflatex); otherwise
    they stay Unicode, which MathJax and KaTeX show as they are (Markdown)."""
    parts = [latex(part) for part in eq.parts]
    row = parts[0] + (r" &\leftarrow " if eq.relation == "←" else " &= ") + " = ".join(parts[1:])
    tail = ", ".join(x for x in (eq.shape, eq.note) if x)
    if tail:
        text = _tex_text(tail) if ascii_only else "".join(_TEX_SPECIAL.get(c, c) for c in tail)
        row += r" && \text{%s}" % text
    return row


def _render_latex(doc: Explanation, standalone: bool) -> str:
    body = [f"% {_tex_text(doc.title)}", "% Generated by symbp from the SymPy derivation.",
            r"\noindent\textbf{%s.} %s." % (_tex_text(doc.title), _tex_text(doc.summary)),
            r"\[ C = \frac{1}{N} \sum_{n} \ell_{n} + \frac{\lambda}{2} \sum_{l} \lVert W^{(l)} \rVert^{2} \]", ""]
    body += [r"\begin{tabular}{lllllrl}", r"layer & type & activation & $W$ & $b$ & parameters & $z, a, \delta$ \\ \hline"]
    for r in doc.shapes:
        body.append(" & ".join(_tex_text(c) for c in r) + r" \\")
    body += [r"\hline total & & & & & %d & \\" % doc.total_params, r"\end{tabular}", ""]
    for section in doc.sections:
        body.append(r"\subsection*{%s}" % _tex_text(section.title))
        if section.intro:
            body.append(_tex_text(section.intro))
        for block in section.blocks:
            body.append(r"\paragraph{%s}" % _tex_text(block.title))
            if block.lines:
                body.append(r"\begin{itemize}" + "".join(r"\item %s" % _tex_text(line) for line in block.lines)
                            + r"\end{itemize}")
            rows = [latex_equation(eq) for eq in block.equations]
            body += [r"\begin{align*}", " \\\\\n".join(rows), r"\end{align*}"]
        body.append("")
    body.append(r"\paragraph{Notation} " + " ".join(_tex_text(line) for line in doc.legend))
    tex = "\n".join(body) + "\n"
    if not standalone:
        return tex
    return "\n".join([
        r"\documentclass[10pt]{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}",
        r"\usepackage{amsmath,amssymb}", r"\allowdisplaybreaks", r"\begin{document}", tex, r"\end{document}", ""])


def _render_markdown(doc: Explanation) -> str:
    out = [f"# {doc.title}", "", f"{doc.summary}.", "",
           r"$$C = \frac{1}{N} \sum_{n} \ell_{n} + \frac{\lambda}{2} \sum_{l} \lVert W^{(l)} \rVert^{2}$$", "",
           "## Shapes and parameters", "",
           "| layer | type | activation | W | b | parameters | z, a, δ |", "|---|---|---|---|---|---:|---|"]
    for r in doc.shapes:
        out.append("| " + " | ".join(r) + " |")
    out += [f"| **total** | | | | | **{doc.total_params}** | |", ""]
    for section in doc.sections:
        out += [f"## {section.title}", ""]
        if section.intro:
            out += [section.intro, ""]
        for block in section.blocks:
            out += [f"### {block.title}", ""] + [f"- {line}" for line in block.lines] + (["", "$$"] if block.lines else ["$$"])
            out.append(r"\begin{aligned}")
            out.append(" \\\\\n".join(latex_equation(eq, ascii_only=False) for eq in block.equations))
            out += [r"\end{aligned}", "$$", ""]
    out += ["## Notation", ""] + [f"- {line}" for line in doc.legend]
    return "\n".join(out) + "\n"
