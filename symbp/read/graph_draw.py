"""The computational graph of one sample: gates and activations, values and gradients.

:func:`draw` builds the lecture's picture from the derivation: every unit's pre-activation
``z = w·x + … + b`` becomes ``×`` gates feeding a ``+`` gate, its activation a gate of its own
(relu as ``max(0, z)``), and the per-sample loss its own gates.  Each edge carries the value
that flows forward (green) and the gradient ∂C/∂(that value) that flows back along it (red),
found by a reverse sweep over the gates' local derivatives — SymPy's ``diff`` of each gate —
so the rules show: an add gate hands its gradient to every input unchanged, a mul gate hands
each input the gradient times the *other* inputs, a max gate routes it to the larger input.
These edge gradients agree with the δs and gradients the derivation gives
(:func:`symbp.read.walkthrough.walkthrough` checks those against finite differences).

Networks with wider layers collapse to one node per layer, edges labelled with shapes and
the norms of the sample's values and gradients.  Pictures are drawn by Graphviz's ``dot``
(the system package ``graphviz``): :meth:`Graph.svg`, :meth:`Graph.png`, :meth:`Graph.save`;
:attr:`Graph.dot` is the source and needs nothing installed.
"""

from __future__ import annotations

import functools
import html
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .._output import check_output_path, write_atomic
from ..spec import ops
from .printing import Pre, text

__all__ = ["EXPAND_MAX_PARAMS", "EXPAND_MAX_UNITS", "Edge", "Graph", "GraphvizNotFound", "Node", "draw"]

EXPAND_MAX_UNITS = 4  #: drawn unit by unit when no layer (nor the input) is wider than this …
EXPAND_MAX_PARAMS = 40  #: … and the network has at most this many parameters
#: A network with other layers (convolution, pooling, …) is drawn entry by entry when it has
#: at most this many values (input and every layer's output, one sample) …
EXPAND_MAX_ENTRIES = 128
EXPAND_MAX_ENTRY_PARAMS = 64  #: … and at most this many parameters
_EXPAND_LIMIT = 4000  #: collapse=False draws entry by entry up to this many values

_VALUE_COLOR = "#1a7f37"  # green: forward value
_GRAD_COLOR = "#cf222e"  # red: gradient
_FONT = "DejaVu Sans"


class GraphvizNotFound(RuntimeError):
    """Graphviz's ``dot`` program is not installed."""


@dataclass
class Node:
    id: str
    label: str  # the gate's operation or the leaf's name
    kind: str  # "input", "param", "const", "gate", "act", "cost"
    caption: str = ""  # the quantity the gate computes (z_h₁, h₁, ℓ, C)
    value: float | None = None
    grad: float = 0.0
    inputs: list = field(default_factory=list)  # [(child id, local derivative function or None)]
    fn: object = None  # the gate's function of its input values


@dataclass
class Edge:
    src: str
    dst: str
    value: float | None = None  # forward value along the edge
    grad: float | None = None  # ∂C/∂(value), the part that flows back along this edge
    shape: str = ""
    value_norm: float | None = None
    grad_norm: float | None = None
    hidden: bool = False  # computed but not drawn (the l2 term's edges: noted on the weights instead)


@dataclass
class Graph:
    """A computational graph ready to draw; see the module docstring.

    Attributes
    ----------
    nodes : dict of str to Node
    edges : list of Edge
    collapsed : bool
        One node per layer (True) or one gate per operation and unit (False).
    title : str
    """

    nodes: dict
    edges: list
    collapsed: bool
    title: str
    #: entry by entry (networks with image layers): every entry's node by its name,
    #: ``"z1[0,1,2]"``, ``"a1[0,1,2]"``, ``"W1[0,0,1,1]"``, ``"x[0,2,3]"`` (wiring shares a node)
    entries: dict = field(default_factory=dict)

    def entry(self, name: str) -> Node:
        """The node of entry ``name`` (``"z1[0,1,2]"``): see :attr:`entries`."""
        if name not in self.entries:
            raise KeyError(f"no entry {name!r}")
        return self.nodes[self.entries[name]]

    def node(self, caption_or_label: str) -> Node:
        """The node whose caption (or, failing that, label) is ``caption_or_label``."""
        for node in self.nodes.values():
            if node.caption == caption_or_label:
                return node
        for node in self.nodes.values():
            if node.label == caption_or_label:
                return node
        raise KeyError(f"no node {caption_or_label!r}")

    def edges_into(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == node_id]

    def edges_from(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.src == node_id]

    # -- drawing ---------------------------------------------------------------------------
    @property
    def dot(self) -> str:
        """The Graphviz source."""
        return _to_dot(self)

    def svg(self) -> str:
        """The picture as SVG text (no XML prolog: ready to inline in HTML)."""
        out = _run_dot(self.dot, "svg").decode("utf-8")
        start = out.find("<svg")
        return _keep_edge_spaces(out[start:] if start >= 0 else out)

    def png(self, dpi: int = 144) -> bytes:
        """The picture as PNG bytes."""
        return _run_dot(self.dot, "png", [f"-Gdpi={int(dpi)}"])

    def save(self, path, dpi: int = 144):
        """Write ``.svg``, ``.png`` or ``.dot`` (chosen by the suffix), atomically."""
        path = check_output_path(path, (".svg", ".png", ".dot"), "graph")
        suffix = path.suffix.lower()
        data = self.dot if suffix == ".dot" else self.svg() if suffix == ".svg" else self.png(dpi)
        return write_atomic(path, data, "graph")

    def _repr_svg_(self) -> str | None:
        """Jupyter's rich display: the picture, inline; None without Graphviz (see _repr_html_)."""
        return self.svg() if shutil.which("dot") else None

    def _repr_html_(self) -> str | None:
        """Without Graphviz's ``dot``, Jupyter shows this instead of a picture: a notice saying
        so, every node with its value and gradient as a table, and the DOT source."""
        if shutil.which("dot"):
            return None  # the SVG is shown
        rows = "".join(f"<tr><td>{_esc(node.label)}</td><td>{_esc(node.caption)}</td>"
                       f'<td class="num">{_esc(_num(node.value))}</td><td class="num">{_esc(_num(node.grad))}</td></tr>'
                       for node in self.nodes.values())
        body = ("<p>No picture: Graphviz's <code>dot</code> is not installed (apt-get install graphviz, brew install "
                "graphviz or conda install graphviz). The nodes, from the inputs to the cost:</p>"
                '<table class="grid"><tr><th>node</th><th>computes</th><th>value</th><th>∂C/∂value</th></tr>'
                f"{rows}</table><details><summary>DOT source</summary><pre>{_esc(self.dot)}</pre></details>")
        from .html_tables import notebook_html

        return notebook_html(self.title, body)


_TEXT_ELEMENT = re.compile(r"(<text\b[^>]*>)([^<]*)(</text>)")


def _keep_edge_spaces(svg: str) -> str:
    """Graphviz splits a label with several fonts into one ``<text>`` per run, each placed by
    its own metrics, and puts the space between two runs at the edge of one of them
    (``" flowing forward"``).  SVG drops a text element's leading and trailing spaces, so in
    a browser whose font is a little wider the runs touch: "valueflowing".  A no-break space
    is kept, and is as wide."""
    def fix(m: re.Match) -> str:
        body = m.group(2)
        core = body.strip(" ")
        if not core:
            return m.group(0)
        lead, trail = len(body) - len(body.lstrip(" ")), len(body) - len(body.rstrip(" "))
        return f"{m.group(1)}{'&#160;' * lead}{core}{'&#160;' * trail}{m.group(3)}"

    return _TEXT_ELEMENT.sub(fix, svg)


def _run_dot(source: str, fmt: str, extra: list[str] | None = None) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizNotFound("drawing the graph needs Graphviz's `dot` program, which is not on PATH; install "
                               "the system package (apt-get install graphviz, brew install graphviz, or conda "
                               "install graphviz), or use Graph.dot for the source")
    try:
        done = subprocess.run([exe, f"-T{fmt}", *(extra or [])], input=source.encode("utf-8"), capture_output=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError("Graphviz's dot took more than 120 s to lay out the graph") from None
    if done.returncode != 0:
        raise RuntimeError(f"Graphviz's dot failed: {done.stderr.decode('utf-8', 'replace').strip()}")
    return done.stdout


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def draw(w, collapse: bool | None = None) -> Graph:
    """The computational graph of the sample of Walkthrough ``w`` (see :func:`symbp.read.graph.graph`)."""
    net = w.network
    dense = all(ld.affine for ld in w.derivation.layers)
    params = int(sum(np.prod(s) for s in net.param_shapes().values()))
    if dense:
        small = max(net.widths) <= EXPAND_MAX_UNITS and params <= EXPAND_MAX_PARAMS
    else:
        small = sum(net.widths) <= EXPAND_MAX_ENTRIES and params <= EXPAND_MAX_ENTRY_PARAMS
    if collapse is None:
        collapse = not small
    if not isinstance(collapse, bool):
        raise TypeError(f"collapse must be True, False or None, got {collapse!r}")
    if not dense:
        if collapse:
            return _collapsed_layers(w)
        if sum(net.widths) > _EXPAND_LIMIT:
            raise ValueError(f"cannot draw entry by entry: the network has {sum(net.widths)} values per sample, more "
                             f"than {_EXPAND_LIMIT}; use collapse=True (one node per layer)")
        return _entries(w)
    if not collapse:
        from .explain import MAX_SCALAR_UNITS

        if max(net.widths) > MAX_SCALAR_UNITS:
            raise ValueError(f"cannot draw unit by unit: a layer has {max(net.widths)} units, more than "
                             f"{MAX_SCALAR_UNITS}; use collapse=True (one node per layer)")
        return _expanded(w)
    return _collapsed(w)


class _Builder:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.order: list[str] = []

    def add(self, node: Node) -> Node:
        self.nodes[node.id] = node
        self.order.append(node.id)
        return node

    def new_id(self) -> str:
        return f"n{len(self.nodes)}"


_OP_LABEL = {sp.Add: "+", sp.Mul: "×", sp.Max: "max", sp.Min: "min", sp.exp: "exp", sp.log: "log",
             ops.sigmoid: "σ", sp.tanh: "tanh"}


def _numeric(expr: sp.Expr, dummies: list) -> object:
    from .index_eval import NUMPY_FUNCTIONS

    return sp.lambdify(dummies, expr, modules=[NUMPY_FUNCTIONS, "numpy"])


def _expanded(w) -> Graph:
    from .explain import _instantiate, scalar_names

    d, net = w.derivation, w.network
    names = scalar_names(d)
    b = _Builder()
    ref: dict = {}  # symbol or Pre(...) -> node id
    values: dict = {}
    for j, sym in enumerate(names.units[0]):
        node = b.add(Node(b.new_id(), text(sym), "input", value=float(w.x[j])))
        ref[sym] = node.id
    targets = {sym: float(w.t[k]) for k, sym in enumerate(names.targets)}
    for ld in d.layers:
        l = ld.index
        W, bias = (w.params[f"{key}{l}"] for key in ld.affine)  # W1, b1 for Dense; a formula layer's own names
        for u in range(net.widths[l]):
            for j in range(net.widths[l - 1]):
                sym = names.weights[(l, u, j)]
                values[sym] = float(W[u, j])
            values[names.biases[(l, u)]] = float(bias[u])
    memo: dict = {}

    def leaf_param(sym) -> str:
        if sym not in ref:
            ref[sym] = b.add(Node(b.new_id(), text(sym), "param", value=values[sym])).id
        return ref[sym]

    def is_variable(e) -> bool:
        return any(s in ref or s in values for s in e.free_symbols) or e.has(Pre)

    def build(e, caption: str = "", kind: str = "gate") -> str:
        if e in ref:
            return ref[e]
        if isinstance(e, sp.Symbol) and e in values:
            return leaf_param(e)
        if e in memo and not caption:
            return memo[e]
        if isinstance(e, ops.relu):
            e = sp.Max(sp.Integer(0), e.args[0], evaluate=False)
        args = list(e.args)
        var = [a for a in args if is_variable(a)]
        const = [a for a in args if not is_variable(a)]
        dummies = [sp.Dummy(f"u{k}") for k in range(len(var))]
        if isinstance(e, (sp.Max, sp.Min)):
            child_ids = []
            for a in args:
                if is_variable(a):
                    child_ids.append(build(a))
                else:
                    child_ids.append(b.add(Node(b.new_id(), text(a), "const", value=float(a.subs(targets)))).id)
            dummies = [sp.Dummy(f"u{k}") for k in range(len(args))]
            local = e.func(*dummies)
            label = _OP_LABEL.get(e.func, type(e).__name__)
        else:
            it = iter(dummies)
            local = e.func(*[next(it) if is_variable(a) else a for a in args])
            child_ids = [build(a) for a in var]
            label = _gate_label(e, const)
        numeric_local = local.subs(targets)
        node = b.add(Node(b.new_id(), label, kind, caption=caption, fn=_numeric(numeric_local, dummies)))
        for cid, dm in zip(child_ids, dummies):
            node.inputs.append((cid, _numeric(sp.diff(numeric_local, dm), dummies)))
        if not caption:
            memo[e] = node.id
        return node.id

    for ld in d.layers:
        l = ld.index
        for u, unit in enumerate(names.units[l]):
            z_expr = _instantiate(d, ld.forward, names, {_i(): u})
            ref[Pre(unit)] = build(z_expr, caption=text(Pre(unit)))
            a_expr = _instantiate(d, ld.output, names, {_i(): u})
            if a_expr == Pre(unit):  # identity: the unit is its z
                ref[unit] = ref[Pre(unit)]
                b.nodes[ref[unit]].caption += f" = {text(unit)}"
            else:
                ref[unit] = build(a_expr, caption=text(unit), kind="act")
    ell = _instantiate(d, d.loss.per_sample, names)
    cost_id = build(ell, caption="ℓ" if net.l2 else "C = ℓ", kind="gate")
    if net.l2:
        lam = net.l2
        weights = [s for s in values if str(s).startswith("w_")]
        pen = b.add(Node(b.new_id(), "λ/2·Σw²", "gate", caption=f"l2, λ = {lam:g}",
                         fn=lambda *ws: 0.5 * lam * sum(v * v for v in ws)))
        for pos, s in enumerate(weights):
            pen.inputs.append((leaf_param(s), functools.partial(_l2_local, lam, pos)))
        total = b.add(Node(b.new_id(), "+", "gate", caption="C", fn=lambda a_, b_: a_ + b_))
        total.inputs = [(cost_id, lambda a_, b_: 1.0), (pen.id, lambda a_, b_: 1.0)]
        cost_id = total.id
    b.nodes[cost_id].kind = "cost"
    g = _sweep(b, cost_id, collapsed=False, title=f"{net.name}: one sample")
    if net.l2:
        for e in g.edges:
            if e.dst == pen.id:
                e.hidden = True  # drawn as a note on each weight: edges from every weight would hide the picture
                g.nodes[e.src].caption = f"l2: λ·w = {_num(e.grad)}"
    return g


def _l2_local(lam: float, pos: int, *ws: float) -> float:
    """∂/∂w_pos of (λ/2) Σ w²."""
    return lam * ws[pos]


def _i():
    from ..indices import i

    return i


def _gate_label(e, const: list) -> str:
    if isinstance(e, sp.Pow):
        exp = e.args[1]
        if exp == -1:
            return "1/x"
        return "x" + text(sp.Symbol("x") ** exp)[1:] if exp.is_Integer and 1 < exp < 10 else f"^{text(exp)}"
    base = _OP_LABEL.get(e.func)
    if base is None:
        base = text(e.func(*[sp.Symbol("·") for _ in e.args])).split("(")[0] if isinstance(e, sp.Function) else type(e).__name__
    if const and isinstance(e, sp.Add):
        c = sp.Add(*const)
        return f"− {text(-c)}" if _neg(c) else f"+ {text(c)}"
    if const and isinstance(e, sp.Mul):
        c = sp.Mul(*const)
        return f"× {'(' + text(c) + ')' if (c.is_Add or _neg(c)) else text(c)}"
    if const and isinstance(e, sp.Function):
        return f"{base}(·, {', '.join(text(c) for c in const)})"
    return base


def _neg(c) -> bool:
    return bool(c.could_extract_minus_sign())


def _sweep(b: _Builder, cost_id: str, collapsed: bool, title: str) -> Graph:
    """Values forward in creation order, gradients backward from C; one edge per input."""
    nodes = b.nodes
    for nid in b.order:
        node = nodes[nid]
        if node.inputs:
            args = [nodes[c].value for c, _ in node.inputs]
            node.value = float(node.fn(*args))
    nodes[cost_id].grad = 1.0
    edges = []
    for nid in reversed(b.order):
        node = nodes[nid]
        if not node.inputs:
            continue
        args = [nodes[c].value for c, _ in node.inputs]
        for cid, local in node.inputs:
            g = node.grad * float(local(*args))
            nodes[cid].grad += g
            edges.append(Edge(cid, nid, nodes[cid].value, g))
    edges.reverse()
    for node in nodes.values():
        if node.kind == "const":
            node.grad = 0.0
    return Graph(nodes, edges, collapsed, title)


def _collapsed(w) -> Graph:
    """One node per layer: x → (W·) → (+ b) → f → … → ℓ → C, labelled with shapes and norms."""
    from ..indices import i, n, p, q
    from .index_eval import evaluate

    d, net = w.derivation, w.network
    nodes: dict = {}
    edges: list = []
    add = functools.partial(_add_node, nodes)

    prev, prev_val = add("x", "input", caption=f"({net.inputs},)"), w.x
    for ld in d.layers:
        l, width = ld.index, net.widths[ld.index]
        wname, bname = (f"{key}{l}" for key in ld.affine)  # W1, b1 for Dense; a formula layer's own names
        W = w.params[wname]
        Wn = add(wname, "param", caption=str(W.shape))
        bn = add(bname, "param", caption=f"({width},)")
        mul = add("×", "gate", caption=f"{wname}·{'x' if l == 1 else f'a{l - 1}'}")
        plus = add("+", "gate", caption=f"z{l}")
        # ∂C/∂(layer input)[q] = Σ_i δ[n,i]·∂z[n,i]/∂x[n,q], with the derivation's local derivative
        up = sp.Sum(ld.delta[n, i] * ld.local["dz/dx"], (i, 0, width - 1))
        g_in = evaluate(up, {wname: W, f"delta{l}": w.delta[l - 1][None, :]}, (n, q))
        edges.append(Edge(prev, mul, shape=f"({net.widths[l - 1]},)", value_norm=_norm(prev_val),
                          grad_norm=_norm(g_in) if l > 1 else None))
        edges.append(Edge(Wn, mul, shape=str(W.shape), value_norm=_norm(W), grad_norm=_norm(w.grads[wname])))
        edges.append(Edge(mul, plus, shape=f"({width},)", grad_norm=_norm(w.delta[l - 1])))
        edges.append(Edge(bn, plus, shape=f"({width},)", value_norm=_norm(w.params[bname]),
                          grad_norm=_norm(w.grads[bname])))
        act = ld.layer.activation
        if act.is_identity:
            out = plus
            nodes[plus].caption += f" = a{l}"
        else:
            out = add("f" if act.custom else act.describe(), "act", caption=f"a{l}")
            edges.append(Edge(plus, out, shape=f"({width},)", value_norm=_norm(w.z[l - 1]),
                              grad_norm=_norm(w.delta[l - 1])))
        prev, prev_val = out, w.a[l - 1]
    env = {"y": w.a[-1][None, :], "t": w.t[None, :]}
    for base, definition in d.loss.definitions.items():
        env[str(base.label)] = evaluate(definition.subs(_widths(d)), env, (n, p))
    dl = evaluate(d.loss.grad.subs(_widths(d)), env, (n, p))
    _add_cost(w, nodes, edges, prev, f"({net.outputs},)", _norm(dl))
    return Graph(nodes, edges, True, f"{net.name}: one node per layer")


# --------------------------------------------------------------------------------------------
# Any layer, entry by entry: the stages' own formulas, instantiated
# --------------------------------------------------------------------------------------------
class _WindowMax(sp.Function):  # noqa: N801 - a gate, not a formula anyone prints
    """The largest argument; its gradient goes to the first largest (as window_argmax rules)."""


def _number(v: float) -> sp.Expr:
    return sp.Integer(int(v)) if v.is_integer() else sp.Float(v)


def _first_max(k: int, *vals: float) -> float:
    return 1.0 if int(np.argmax(vals)) == k else 0.0


def _expand(e):
    """Every Sum over numeric limits written out as the Add of its terms."""
    if isinstance(e, sp.Sum):
        (var, lo, hi), *rest = e.limits
        inner = sp.Sum(e.function, *rest) if rest else e.function
        return sp.Add(*[_expand(inner.xreplace({var: sp.Integer(k)})) for k in range(int(lo), int(hi) + 1)])
    if e.args and not isinstance(e, sp.Indexed):
        return _rebuild(e, [_expand(a) for a in e.args])
    return e


def _rebuild(e, args):
    """``e.func(*args)``, except that a number times a sum stays that product (SymPy would
    spread 1/4 over the sum: the average pool is a + gate and one × 1/4)."""
    if isinstance(e, sp.Mul) and any(isinstance(a, sp.Add) for a in args):
        return sp.Mul(*args, evaluate=False)
    return e.func(*args)


def _maxes(e):
    """Σ_j route(m, j)·v_j — a window's value at its arg-max m — as the max gate it is:
    max(v_0, v_1, …) in the window's order (ties: the first, as the arg-max rules)."""
    if not e.args or isinstance(e, sp.Indexed):
        return e
    terms = sp.Add.make_args(e)
    groups: dict = {}
    rest = []
    for term in terms:
        routes = [f for f in sp.Mul.make_args(term) if isinstance(f, ops.route)]
        if len(routes) == 1:
            r_ = routes[0]
            others = [f for f in sp.Mul.make_args(term) if f is not r_]
            groups.setdefault(r_.args[0], []).append((int(r_.args[1]), sp.Mul(*others)))
        else:
            rest.append(term)
    if not groups:
        return _rebuild(e, [_maxes(a) for a in e.args])
    maxes = [_WindowMax(*[_maxes(v) for _, v in sorted(g, key=lambda kv: kv[0])]) for g in groups.values()]
    return sp.Add(*[_maxes(t) for t in rest], *maxes)


def _entry_text(label: str, idx) -> str:
    return f"{label}[{','.join(str(int(v)) for v in idx)}]"


def _entries(w) -> Graph:
    """Every entry of every stage a gate (or wiring): a convolution's output is a + gate over
    its window's × gates of weight and input and its bias, a max pool's a max gate over its
    window, an average pool's a + gate and × 1/(kh·kw), a reshape just wiring; each found by
    writing out the derivation's own stage formula for that entry."""
    from ..indices import N
    from ..indices import l2 as l2_symbol
    from ..indices import n as n_
    from ..indices import seed as SEED
    from .index_eval import NUMPY_FUNCTIONS

    d, net = w.derivation, w.network
    values = {N: 1, l2_symbol: net.l2, SEED: 0, **{d.dims[l]: wd for l, wd in enumerate(net.widths)}, **d.sizes}
    fixed = lambda e: sp.sympify(e).subs(values)  # noqa: E731
    stage_of: dict = {}  # label -> (formula, its indices, caption prefix)
    for ld in d.layers:
        for st in ld.stages:
            if not st.formula.has(ops.window_argmax):  # an arg-max: it lives in the max gate
                stage_of[str(st.target.label)] = (fixed(st.formula), st.idx, st.batch)
        stage_of[f"a{ld.index}"] = (fixed(ld.output), ld.out_idx, False)
    params = w.params
    decayed = [str(ld.params[key].label) for ld in d.layers for key in ld.decay]
    last = f"a{len(d.layers)}"
    b = _Builder()
    ref: dict = {}
    memo: dict = {}
    names: dict = {}
    x_img = w.x.reshape(net.input_shape)
    for pos in np.ndindex(*net.input_shape):
        ref[sp.Indexed("x", 0, *pos)] = b.add(Node(b.new_id(), _entry_text("x", pos), "input",
                                                   value=float(x_img[pos]))).id
    for name, arr in params.items():
        for pos in np.ndindex(*arr.shape):
            ref[sp.Indexed(name, *pos)] = b.add(Node(b.new_id(), _entry_text(name, pos), "param",
                                                     value=float(arr[pos]))).id

    def entry(e) -> str:
        key = sp.Indexed(str(e.base.label), *e.indices)
        if key in ref:
            return ref[key]
        label, idx = str(e.base.label), [int(v) for v in e.indices]
        if label == "y":  # the loss reads the last layer flat
            shape = net.shapes[-1]
            return entry(sp.Indexed(last, 0, *np.unravel_index(idx[1], shape)))
        if label not in stage_of:
            raise KeyError(f"no gate for {e}")
        formula, sidx, batch = stage_of[label]
        at = idx if batch else idx[1:]  # a batch stage (BatchNorm's mean) has no sample index
        expr = _maxes(_expand(formula.xreplace({n_: sp.Integer(0), **dict(zip(sidx, map(sp.Integer, at)))})))
        expr = expr.replace(lambda e: isinstance(e, ops.dropout_mask),  # the draw loss_and_grads makes
                            lambda e: sp.Float(float(NUMPY_FUNCTIONS["dropout_mask"](float(e.args[0]),
                                                                                     *map(int, e.args[1:])))))
        caption = _entry_text(label, at)
        if isinstance(expr, sp.Indexed):  # wiring: a reshape, the padding's copy, an identity
            ref[key] = entry(expr)
            node = b.nodes[ref[key]]
            if node.kind in ("gate", "act"):
                node.caption += f" = {caption}"
        elif not expr.has(sp.Indexed):  # a constant entry: the padding's 0
            ref[key] = b.add(Node(b.new_id(), text(expr), "const", caption=caption, value=float(expr))).id
        else:
            ref[key] = build(expr, caption, "act" if label.startswith("a") else "gate")
        names[caption] = ref[key]
        return ref[key]

    def build(e, caption: str = "", kind: str = "gate") -> str:
        if isinstance(e, sp.Indexed):
            return entry(e)
        if e in memo and not caption:
            return memo[e]
        if isinstance(e, ops.relu):
            e = _WindowMax(sp.Integer(0), e.args[0])
        args = list(e.args)
        if isinstance(e, _WindowMax):
            child_ids = [build(a) if a.has(sp.Indexed) else
                         b.add(Node(b.new_id(), text(a), "const", value=float(a))).id for a in args]
            node = b.add(Node(b.new_id(), "max", kind, caption=caption, fn=lambda *v: float(max(v))))
            for k_, cid in enumerate(child_ids):
                node.inputs.append((cid, functools.partial(_first_max, k_)))
        else:
            var = [a for a in args if a.has(sp.Indexed)]
            const = [a for a in args if not a.has(sp.Indexed)]
            dummies = [sp.Dummy(f"u{k_}") for k_ in range(len(var))]
            it = iter(dummies)
            local = e.func(*[next(it) if a.has(sp.Indexed) else a for a in args])
            child_ids = [build(a) for a in var]
            node = b.add(Node(b.new_id(), _gate_label(e, const), kind, caption=caption, fn=_numeric(local, dummies)))
            for cid, dm in zip(child_ids, dummies):
                node.inputs.append((cid, _numeric(sp.diff(local, dm), dummies)))
        if not caption:
            memo[e] = node.id
        return node.id

    for ld in d.layers:  # layer by layer, so the nodes come in the order of the forward pass
        for pos in np.ndindex(*net.shapes[ld.index]):
            entry(sp.Indexed(f"a{ld.index}", 0, *pos))
    ell = _expand(fixed(d.loss.per_sample).xreplace({n_: sp.Integer(0)}))
    ell = ell.replace(lambda e: isinstance(e, sp.Indexed) and e.base.label == d.loss.t.label,  # the targets: numbers
                      lambda e: _number(float(w.t[int(e.indices[1])])))
    cost_id = build(ell, caption="ℓ" if net.l2 else "C = ℓ")
    if net.l2:
        lam = net.l2
        weights = [ref[sp.Indexed(name, *pos)] for name in decayed for pos in np.ndindex(*params[name].shape)]
        pen = b.add(Node(b.new_id(), "λ/2·Σw²", "gate", caption=f"l2, λ = {lam:g}",
                         fn=lambda *ws: 0.5 * lam * sum(v * v for v in ws)))
        for pos, wid in enumerate(weights):
            pen.inputs.append((wid, functools.partial(_l2_local, lam, pos)))
        total = b.add(Node(b.new_id(), "+", "gate", caption="C", fn=lambda a_, b_: a_ + b_))
        total.inputs = [(cost_id, lambda a_, b_: 1.0), (pen.id, lambda a_, b_: 1.0)]
        cost_id = total.id
    b.nodes[cost_id].kind = "cost"
    g = _sweep(b, cost_id, collapsed=False, title=f"{net.name}: one sample")
    g.entries = {**{b.nodes[nid].label: nid for nid in b.order if b.nodes[nid].kind in ("input", "param")}, **names}
    if net.l2:
        for e in g.edges:
            if e.dst == pen.id:
                e.hidden = True
                g.nodes[e.src].caption = f"l2: λ·w = {_num(e.grad)}"
    return g


def _collapsed_layers(w) -> Graph:
    """One node per layer of any kind: x → layer (its parameters feeding it) → f → … → ℓ → C,
    edges labelled with shapes and the norms of the sample's values and gradients."""
    from ..indices import N
    from ..indices import l2 as l2_symbol
    from ..indices import n as n_
    from .index_eval import evaluate

    d, net = w.derivation, w.network
    values = {N: 1, l2_symbol: net.l2, **{d.dims[l]: wd for l, wd in enumerate(net.widths)}, **d.sizes}
    nodes: dict = {}
    edges: list = []
    add = functools.partial(_add_node, nodes)

    def upstream(ld) -> float | None:
        """‖∂C/∂a‖ of layer ``ld``: its δ formula with f′ set to 1, checked against δ = f′·that."""
        act = ld.layer.activation
        if act.is_identity:
            return _norm(w.delta[ld.index - 1])
        idx = (n_, *ld.delta_idx)
        fp = ld.fprime(idx)
        up = ld.delta_formula.subs(fp, 1)
        if up.has(ld.z) or (fp.has(ld.a) and up.has(ld.a)):  # f′ did not come out whole
            return None
        env = w.values
        try:
            ranges = dict(zip(ld.delta_idx, net.shapes[ld.index]))
            val = evaluate(up.subs(values), env, idx, ranges=ranges)
            fpv = evaluate(fp.subs(values), env, idx, ranges=ranges)
        except (KeyError, ValueError, NotImplementedError):
            return None
        if not np.allclose((val * fpv).reshape(-1), w.delta[ld.index - 1], rtol=1e-9, atol=1e-12):
            return None
        return _norm(val)

    def sent(ld, m: int) -> float | None:
        """‖the part of ∂C/∂a_m that layer ``ld`` sends back‖ (a tensor read by several layers)."""
        if len(net.consumers(m)) == 1:
            return upstream(d.layers[m - 1])
        src = d.layers[m - 1]
        try:
            val = evaluate(ld.sent[m].subs(values), w.values, (n_, *src.delta_idx),
                           ranges=dict(zip(src.delta_idx, net.shapes[m])))
        except (KeyError, ValueError, NotImplementedError):
            return None
        return _norm(val)

    shape = lambda s: "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"  # noqa: E731
    outs = {0: (add("x", "input", caption=shape(net.shapes[0])), w.x)}  # position -> (node, value)
    for ld in d.layers:
        l = ld.index
        # an add gate for a residual join: it copies its gradient to every branch
        layer = add("+" if ld.layer.kind == "Add" else ld.layer.describe(), "gate", caption=f"z{l}")
        for m in dict.fromkeys(ld.sources):
            prev, prev_val = outs[m]
            edges.append(Edge(prev, layer, shape=shape(net.shapes[m]), value_norm=_norm(prev_val),
                              grad_norm=sent(ld, m) if m else None))
        for key in ld.params:
            name = f"{key}{l}"
            pn = add(name, "param", caption=str(w.params[name].shape))
            edges.append(Edge(pn, layer, shape=str(w.params[name].shape), value_norm=_norm(w.params[name]),
                              grad_norm=_norm(w.grads[name])))
        act = ld.layer.activation
        if act.is_identity:
            out = layer
            nodes[layer].caption += f" = a{l}"
        else:
            out = add("f" if act.custom else act.describe(), "act", caption=f"a{l}")
            edges.append(Edge(layer, out, shape=shape(net.shapes[l]), value_norm=_norm(w.z[l - 1]),
                              grad_norm=_norm(w.delta[l - 1])))
        outs[l] = (out, w.a[l - 1])
    _add_cost(w, nodes, edges, outs[len(d.layers)][0], shape(net.shapes[-1]), upstream(d.layers[-1]))
    return Graph(nodes, edges, True, f"{net.name}: one node per layer")


def _norm(v) -> float:
    """The Euclidean norm of a sample's values or gradients (the collapsed graph's labels)."""
    return float(np.linalg.norm(np.asarray(v, np.float64)))


def _add_node(nodes: dict, label, kind, caption="", value=None) -> str:
    nid = f"n{len(nodes)}"
    nodes[nid] = Node(nid, label, kind, caption=caption, value=value)
    return nid


def _add_cost(w, nodes: dict, edges: list, prev: str, out_shape: str, grad_norm) -> None:
    """The collapsed graph's end: the output and t into the loss ℓ, then + λ/2·Σ‖W‖² when
    the network has l2; the last node is the cost C, valued at the sample's cost."""
    net = w.network
    loss = _add_node(nodes, f"ℓ: {net.loss.name}", "gate", caption="ℓ")
    tn = _add_node(nodes, "t", "const", caption=f"({net.outputs},)")
    edges.append(Edge(prev, loss, shape=out_shape, value_norm=_norm(w.a[-1]), grad_norm=grad_norm))
    edges.append(Edge(tn, loss, shape=f"({net.outputs},)", value_norm=_norm(w.t)))
    cost = loss
    if net.l2:
        cost = _add_node(nodes, "+ λ/2·Σ‖W‖²", "gate", caption="C")
        edges.append(Edge(loss, cost, shape="scalar"))
    nodes[cost].kind = "cost"
    nodes[cost].value = w.loss
    if cost == loss:
        nodes[cost].caption = "C = ℓ"


def _widths(d) -> dict:
    from ..indices import N

    return {N: 1, **{d.dims[l]: wd for l, wd in enumerate(d.network.widths)}}


# --------------------------------------------------------------------------------------------
# DOT
# --------------------------------------------------------------------------------------------
def _num(v: float | None) -> str:
    if v is None:
        return ""
    if v == 0:
        return "0"
    return f"{v:.4g}".replace("-", "−")


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


_STYLE = {
    "input": 'shape=box, style="rounded,filled", fillcolor="#dbeafe", color="#3b82f6"',
    "param": 'shape=box, style="rounded,filled", fillcolor="#fef3c7", color="#d97706"',
    "const": 'shape=box, style="rounded,dashed", color="#9ca3af", fontcolor="#4b5563"',
    "gate": 'shape=circle, style=filled, fillcolor="#f3f4f6", color="#374151", margin=0.02',
    "act": 'shape=ellipse, style=filled, fillcolor="#ede9fe", color="#7c3aed"',
    "cost": 'shape=doublecircle, style=filled, fillcolor="#fee2e2", color="#b91c1c", margin=0.02',
}


def _to_dot(g: Graph) -> str:
    lines = [
        "digraph symbp {",
        f'  graph [rankdir=LR, fontname="{_FONT}", fontsize=12, nodesep=0.3, ranksep=0.55, pad=0.2, '
        f"labelloc=b, label=<{_legend(g)}>];",
        f'  node [fontname="{_FONT}", fontsize=12];',
        f'  edge [fontname="{_FONT}", fontsize=10, arrowsize=0.6, color="#6b7280"];',
    ]
    for node in g.nodes.values():
        label = f"<b>{_esc(node.label)}</b>"
        if node.caption and node.caption != node.label:
            color = _GRAD_COLOR if node.caption.startswith("l2:") else "#374151"
            label += f'<br/><font point-size="10" color="{color}">{_esc(node.caption)}</font>'
        if node.kind == "cost" and node.value is not None:
            label += f'<br/><font point-size="10" color="{_VALUE_COLOR}">{_esc(_num(node.value))}</font>'
        style = _STYLE.get(node.kind, _STYLE["gate"])
        if node.kind in ("gate", "cost") and len(node.label) > 3:  # a circle round a long label is huge
            style = style.replace("shape=circle", "shape=box").replace("shape=doublecircle", "shape=box, peripheries=2")
            style = style.replace('style=filled', 'style="rounded,filled"')
        lines.append(f"  {node.id} [label=<{label}>, {style}];")
    inputs = [nid for nid, node in g.nodes.items() if node.kind == "input"]
    if inputs:
        lines.append("  { rank=same; " + "; ".join(inputs) + "; }")
    for e in g.edges:
        if e.hidden:
            continue
        parts = []
        if g.collapsed:
            if e.shape:
                parts.append(f'<font color="#374151">{_esc(e.shape)}</font>')
            if e.value_norm is not None:
                parts.append(f'<font color="{_VALUE_COLOR}">‖·‖ {_esc(_num(e.value_norm))}</font>')
            if e.grad_norm is not None:
                parts.append(f'<font color="{_GRAD_COLOR}">‖∂‖ {_esc(_num(e.grad_norm))}</font>')
        else:
            if e.value is not None:
                parts.append(f'<font color="{_VALUE_COLOR}">{_esc(_num(e.value))}</font>')
            if e.grad is not None:
                parts.append(f'<font color="{_GRAD_COLOR}">{_esc(_num(e.grad))}</font>')
        label = "<br/>".join(parts)
        lines.append(f"  {e.src} -> {e.dst} [label=<{label}>];" if label else f"  {e.src} -> {e.dst};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend(g: Graph) -> str:
    if g.collapsed:
        return (f'<font point-size="11">{_esc(g.title)}: shapes, <font color="{_VALUE_COLOR}">‖value‖</font> and '
                f'<font color="{_GRAD_COLOR}">‖gradient ∂C/∂value‖</font> of one sample</font>')
    return (f'<font point-size="11">{_esc(g.title)}: on each edge the <font color="{_VALUE_COLOR}">value</font> '
            f'flowing forward and the <font color="{_GRAD_COLOR}">gradient ∂C/∂value</font> flowing back</font>')

