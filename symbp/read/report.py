"""One self-contained HTML page: the math, the kernels that run it, the graph, a worked example.

:func:`report` lays out a network's :class:`~symbp.read.explain.Explanation` with every formula as
MathML (SymPy's presentation printer, which browsers render natively) next to the lines of
the generated kernel module that evaluate it; the shapes and parameter counts; the
computational graph of one sample as inline SVG (Graphviz); the worked example with every δ
and gradient checked against finite differences and the kernels; and the whole generated
module.  The page loads nothing from anywhere: no scripts, fonts or style sheets from the
network.

Kernel lines are found in the module the model really runs (``model.source_path``): each
contraction there is preceded by a comment with the SymPy ``Sum`` it implements, which is
matched against the derivation's own ``Sum``; elementwise statements are matched by the
array they assign.  A formula with no matching lines says so rather than guessing.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import sympy as sp

from .._output import check_output_path, write_atomic
from .._version import __version__
from .explain import Equation, Explanation, build, latex_equation
from .html_tables import esc as _esc
from .html_tables import walkthrough_tables
from .printing import MathMLPrinter, Vec
from .printing import text as plain_text

__all__ = ["KernelSnippet", "kernel_snippet", "report"]


# --------------------------------------------------------------------------------------------
# Finding the kernel lines of a formula
# --------------------------------------------------------------------------------------------
@dataclass
class KernelSnippet:
    """Lines of one generated function: ``lines`` are (line number, text, is_match)."""

    function: str
    lines: list
    note: str = ""


def kernel_snippet(source: str, provenance, function: str, targets: tuple = (), sums: tuple = ()) -> KernelSnippet | None:
    """The lines of ``function`` in the generated ``source`` that compute a formula: the kernel
    steps the generator recorded (the module's ``PROVENANCE``) as writing one of ``targets``
    (``Z1``, ``total``, ``dW2`` …) or implementing one of ``sums`` (SymPy's ``str`` of a
    ``Sum``), whole: loop headers, hoisted constants and CSE temporaries with the lines they
    feed.  A step's loop headers are context; its other lines are the match.
    Returns None when no step of the function matches.
    """
    names = {t.rstrip(" +") for t in targets}
    steps = [(first, last) for fn, first, last, writes, formula in provenance
             if fn == function and (names & set(writes) or (formula is not None and formula in sums))]
    if not steps:
        return None
    lines = source.splitlines()
    chosen = sorted({k for first, last in steps for k in range(first, last + 1)})
    out = []
    for pos, k in enumerate(chosen):
        if pos and k != chosen[pos - 1] + 1:
            out.append((None, "…", False))
        text_ = lines[k - 1]
        out.append((k, text_, not text_.strip().startswith(("for ", "if "))))
    return KernelSnippet(function, out)


def _kernel_ref(eq: Equation, d, workspace: set[str]) -> tuple[str, tuple, tuple] | None:
    """(function, targets, sums) of the generated code that evaluates ``eq``'s quantity."""
    q = eq.quantity
    if not q:
        return None
    L = len(d.layers)
    found = [s for part in eq.parts for s in (part.atoms(sp.Sum) if isinstance(part, sp.Basic) else ())]
    # The kernels' comments print a Sum with the image sizes fixed (kh_1 = 3 …): try that form too.
    sums = tuple(dict.fromkeys([str(s) for s in found] + [str(s.subs(d.sizes)) for s in found if d.sizes]))

    def arr(name: str) -> tuple:
        return (name,) if name in workspace else ()

    kind = q[0]
    if kind == "z":
        return "forward", arr(f"Z{q[1]}"), sums
    if kind == "a":
        name = f"A{q[1]}" if f"A{q[1]}" in workspace else f"Z{q[1]}"
        return "forward", arr(name), ()
    if kind == "loss":
        return "loss_rows", ("total +",), ()
    if kind == "dloss" or (kind == "delta" and q[1] == L) or (kind == "fprime" and q[1] == L):
        return "loss_rows", arr(f"dZ{L}"), ()
    if kind in ("delta", "fprime"):
        return "backward", arr(f"dZ{q[1]}"), sums
    if kind == "grad":
        key, l = q[1], q[2]
        return "backward", arr(f"d{key}{l}"), sums
    if kind == "l2":
        return "penalty", ("penalty",), ()
    if kind == "stage":  # an image layer's intermediate stage (x̃, the arg-max, Maxout's pieces)
        return "forward", (), sums
    if kind == "stage_grad":
        return "backward", (), sums
    return None


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
#: A network with layers other than affine maps gets the worked example and the graph while
#: it has at most this many values per sample (input and every layer's output).
EXAMPLE_MAX_VALUES = 512

_CSS = """
:root { --ink: #1f2328; --muted: #57606a; --line: #d0d7de; --soft: #f6f8fa; --accent: #0969da; --mark: #fff3bf; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; font: 15px/1.5 system-ui, -apple-system, "Segoe UI",
       "DejaVu Sans", sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.3em; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 22px 0 6px; color: var(--ink); }
p.lead { color: var(--muted); margin: 0 0 12px; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; margin: 16px 0;
      display: flex; flex-wrap: wrap; gap: 2px 16px; }  /* links wrap to a new row, never off-screen */
nav a { color: var(--accent); text-decoration: none; white-space: nowrap; }
table.grid { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; }
table.grid th { background: var(--soft); }
table.grid td.num { text-align: right; font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 13px; }
.eq { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start;
      border-top: 1px solid var(--soft); padding: 8px 0; }
.eq.nocode { grid-template-columns: minmax(0, 1fr); }
.formula { overflow-x: auto; }
.formula math { display: inline math; font-size: 1.15em; margin: 6px 0; }  /* left-aligned, still display style */
.formula > div.m { margin: 4px 0 2px; }
.meta { color: var(--muted); font-size: 0.88em; }
.meta .shape { font-family: "DejaVu Sans Mono", ui-monospace, monospace; background: var(--soft); border-radius: 4px;
               padding: 0 5px; margin-right: 6px; }
details.tex summary { cursor: pointer; color: var(--muted); font-size: 0.82em; }
details.tex pre { white-space: pre-wrap; word-break: break-all; }
pre.code { margin: 0; background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 6px 0;
           font: 12.5px/1.45 "DejaVu Sans Mono", ui-monospace, monospace; overflow-x: auto; }
pre.code .ln { display: inline-block; width: 3.2em; padding-right: 0.6em; text-align: right; color: #8c959f;
               user-select: none; }
pre.code .hit { background: var(--mark); display: inline-block; min-width: 100%; }
pre.code .row { display: block; padding-right: 10px; }
pre.code .cm { color: #6e7781; }
pre.code .kw { color: #cf222e; }
.where { font-size: 0.8em; color: var(--muted); margin: 0 0 3px; font-family: "DejaVu Sans Mono", monospace; }
.nomatch { font-size: 0.85em; color: var(--muted); font-style: italic; }
figure { margin: 12px 0; overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure.wide svg { max-width: none; height: auto; }  /* unit by unit: full size, scroll sideways */
figure.fit svg { max-width: 100%; height: auto; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 4px 24px; }
.card { overflow-x: auto; overflow-y: hidden; padding: 6px 0; border-top: 1px solid var(--soft); }
.card.wide { grid-column: 1 / -1; }
.card math { display: inline math; font-size: 1.1em; }
table.names td { border: none; padding: 2px 8px; }
table.names td.meta { padding-right: 24px; }
figcaption { color: var(--muted); font-size: 0.9em; margin-top: 6px; }
.ok { color: #1a7f37; } .bad { color: #cf222e; font-weight: 600; }
.notice { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
footer { margin-top: 48px; color: var(--muted); font-size: 0.85em; }
math { font-family: "Latin Modern Math", "STIX Two Math", "DejaVu Math TeX Gyre", "Cambria Math", math; }
@media (max-width: 900px) { .eq { grid-template-columns: minmax(0, 1fr); } }
"""

_KEYWORDS = re.compile(r"\b(for|in|range|if|else|return|def)\b")


def _code_line(text: str) -> str:
    code, sep, comment = text.partition("#")
    out = _KEYWORDS.sub(lambda m: f'<span class="kw">{m.group(0)}</span>', _esc(code))
    if sep:
        out += f'<span class="cm">{_esc(sep + comment)}</span>'
    return out


def _snippet_html(snippet: KernelSnippet, filename: str) -> str:
    rows = []
    for num, text, hit in snippet.lines:
        ln = f'<span class="ln">{num if num is not None else ""}</span>'
        body = _code_line(text) if num is not None else '<span class="cm">…</span>'
        rows.append(f'<span class="row{" hit" if hit else ""}">{ln}{body}</span>')
    return (f'<div class="where">{_esc(filename)} · {_esc(snippet.function)}()</div>'
            f'<pre class="code">{"".join(rows)}</pre>')


def _math(eq: Equation, display: str = "block") -> str:
    pr = MathMLPrinter()
    parts = [pr.doprint(part) for part in eq.parts]
    inner = '<mo>=</mo>'.join(parts[1:])
    inner = parts[0] + ("<mo>&#8592;</mo>" if eq.relation == "←" else "<mo>=</mo>") + inner if len(parts) > 1 else parts[0]
    return f'<math xmlns="http://www.w3.org/1998/Math/MathML" display="{display}"><mrow>{inner}</mrow></math>'


def _equation_html(eq: Equation, kernel: str | None) -> str:
    meta = []
    if eq.shape:
        meta.append(f'<span class="shape">{_esc(eq.shape)}</span>')
    if eq.note:
        meta.append(_esc(eq.note))
    tex = _esc(latex_equation(eq).replace(" &= ", " = ").split(" && ")[0])
    left = (f'<div class="formula"><div class="m">{_math(eq)}</div><div class="meta">{" ".join(meta)}</div>'
            f'<details class="tex"><summary>LaTeX</summary><pre>{tex}</pre></details></div>')
    if kernel is None:
        return f'<div class="eq nocode">{left}</div>'
    return f'<div class="eq">{left}<div class="kernel">{kernel}</div></div>'


def _names_table(block) -> str:
    """The scalar view's names, several to a row."""
    cells = [f'<td>{_math(eq, "inline")}</td><td class="meta">{_esc(eq.note)}</td>' for eq in block.equations]
    per_row = 4
    rows = ["<tr>" + "".join(cells[k : k + per_row]) + "</tr>" for k in range(0, len(cells), per_row)]
    return f'<table class="grid names">{"".join(rows)}</table>'


def _batch_shape(shape: tuple) -> str:
    return "(" + ", ".join(["N", *map(str, shape)]) + ")"


def _shapes_table(doc: Explanation) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("layer", "type", "activation", "W", "b", "parameters", "z, a, δ"))
    rows = []
    for r in doc.shapes:
        cells = "".join(f'<td class="num">{_esc(c)}</td>' if k == 5 else f"<td>{_esc(c)}</td>" for k, c in enumerate(r))
        rows.append(f"<tr>{cells}</tr>")
    rows.append(f'<tr><th colspan="5">total</th><td class="num"><b>{doc.total_params}</b></td><td></td></tr>')
    return f'<table class="grid"><tr>{head}</tr>{"".join(rows)}</table>'


def _training_html(model) -> str:
    """The curves of the model's history (a checkpoint keeps it) and its last epoch's metrics."""
    from .plots import history_svg

    h = model.history
    last = {k: v[-1] for k, v in h.history.items() if v and k != "lr"}
    opt = getattr(model, "optimizer", None)
    cells = "".join(f'<tr><td>{_esc(k)}</td><td class="num">{v:.4g}</td></tr>' for k, v in last.items())
    return (f"<p>{len(h.epoch)} epochs" + (f" with {_esc(opt.describe())}" if opt is not None else "")
            + " (the model's history, which its checkpoint keeps). The last epoch:</p>"
            + f'<table class="grid">{cells}</table>'
            + f'<figure class="fit">{history_svg(h)}<figcaption>Loss and accuracy per epoch: training (solid), '
            "validation (dashed) where the fit had validation data.</figcaption></figure>")


def report(
    source,
    path=None,
    *,
    dtype: str = "float32",
    x=None,
    t=None,
    params=None,
    seed: int | None = 0,
    graph: bool | str = "auto",
    cache_dir=None,
    optimizer=None,
) -> str:
    """The HTML report of a network; written to ``path`` (atomically) when given.

    Parameters
    ----------
    source : Network or Model
        A network is compiled (``sb.compile(net, dtype=dtype, cache_dir=cache_dir)``) so that
        the page shows the kernel module that really runs.
    path : str or path-like, optional
        Where to write the page (``.html``); checked before anything is computed.
    x, t, params, seed
        The worked example's sample, target and parameters (see
        :func:`symbp.read.walkthrough.walkthrough`); random with ``seed`` where not given.
    graph : bool or "auto"
        Include the computational graph (needs Graphviz's ``dot``); ``"auto"`` includes it
        when ``dot`` is installed and says on the page why it is missing otherwise.
    optimizer : Optimizer, optional
        Show its update rule; by default a trained model's own optimizer, if it has one.

    Returns
    -------
    str
        The page.
    """
    from ..compile import compile as compile_model
    from ..spec.network import Network
    from ..train.model import Model
    from .graph import GraphvizNotFound
    from .graph import graph as make_graph
    from .walkthrough import walkthrough

    if path is not None:
        path = check_output_path(path, (".html", ".htm"), "report")
    if graph not in (True, False, "auto"):
        raise ValueError(f"graph must be True, False or 'auto', got {graph!r}")
    if isinstance(source, Model):
        model = source
    elif isinstance(source, Network):
        try:
            model = compile_model(source, dtype=dtype, cache_dir=cache_dir)
        except NotImplementedError as err:
            raise ValueError(f"cannot generate kernels for this network, so there is no code to show: {err}") from None
    else:
        raise TypeError(f"report() takes a symbp Network or a compiled Model, got {type(source).__name__}")
    net = model.network
    d = model.derivation
    from .explain import MAX_SCALAR_UNITS

    dense = all(ld.affine for ld in d.layers)
    scalar = dense and max(net.widths) <= MAX_SCALAR_UNITS
    # The worked example (and the graph drawn from it) goes entry by entry: every dense
    # network, and networks of other layers while they are small.
    example = dense or sum(net.widths) <= EXAMPLE_MAX_VALUES
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    doc = build(d, scalar=scalar, optimizer=optimizer)
    # The update rule runs in the training module: its lines for the first parameter stand
    # beside the statements (CPU target; the CUDA modules are laid out differently).
    update_code, update_provenance = None, ()
    if optimizer is not None and type(model) is Model:
        train_path = Path(model._train_kernels(optimizer).__file__)
        update_code = (train_path.read_text(encoding="utf-8"), f"{train_path.parent.name}/{train_path.name}",
                       model.kernels.PARAMS[0], set(optimizer.state_names))
        update_provenance = getattr(model._train_kernels(optimizer), "PROVENANCE", ())
    source_text = model.source_path.read_text(encoding="utf-8")
    filename = f"{model.source_path.parent.name}/{model.source_path.name}"
    namespace = getattr(model, "kernels", None)
    workspace = {name for name, _ in getattr(namespace, "WORKSPACE", ())}
    # which lines compute what, as the generator recorded it (the CUDA modules keep none)
    provenance = getattr(namespace, "PROVENANCE", ())
    w = walkthrough(model, x=x, t=t, params=params, seed=seed) if example else None
    if not example and graph is True:
        raise ValueError("a spec the report cannot draw: the computational graph goes unit by unit through dense "
                         f"layers only, and this network has image layers with more than {EXAMPLE_MAX_VALUES} values "
                         "per sample (use graph='auto' or False)")

    figure = ""
    if graph and example:
        try:
            g = make_graph(w)
            svg = g.svg()
            kind = "one node per layer" if g.collapsed else "one gate per operation and unit"
            fit = "fit" if g.collapsed else "wide"
            figure = (f'<figure class="{fit}">{svg}<figcaption>The computational graph of the worked example\'s '
                      f"sample ({kind}). "
                      + ("Each edge carries the value flowing forward (green) and the gradient ∂C/∂value flowing back "
                         "(red): an add gate hands its gradient to every input, a mul gate hands each input the gradient "
                         "times the other input, a max gate routes it to the larger input."
                         if not g.collapsed else "Edges: shapes, the norm of the value (green) and of its gradient (red).")
                      + "</figcaption></figure>")
        except GraphvizNotFound as err:
            if graph is True:
                raise
            warnings.warn(f"report without the graph: {err}", stacklevel=2)
            figure = f'<p class="notice">No graph: {_esc(err)}</p>'

    body = [f"<h1>{_esc(doc.title)}</h1>",
            f'<p class="lead">{_esc(doc.summary)}. Kernels: <code>{_esc(filename)}</code> ({_esc(model.dtype.name)}), '
            f"generated by symbp {_esc(__version__)} from the same SymPy expressions as every formula below.</p>"]
    history = getattr(model, "history", None)
    trained = history is not None and bool(history.epoch)
    toc = [("shapes", "Shapes and parameters")] + [("training", "Training")] * trained
    toc += [("graph", "Computational graph")] if figure else []
    toc += [(s.anchor, s.title) for s in doc.sections] + [("example", "Worked example")] * example
    toc += [("module", "Generated module")]
    body.append("<nav>" + "\n".join(f'<a href="#{a}">{_esc(title)}</a>' for a, title in toc) + "</nav>")
    body += ['<h2 id="shapes">Shapes and parameters</h2>', _shapes_table(doc),
             f"<p>Input x: {_esc(_batch_shape(net.input_shape))}; targets t: (N, {net.outputs}); "
             "N is the batch size.</p>"]
    if not example:
        body.append('<p class="notice">No computational graph and no worked example: both go unit by unit through '
                    f"dense layers, and this network has image layers with more than {EXAMPLE_MAX_VALUES} values per "
                    "sample. Every formula below is still the derivation's, "
                    "beside the kernel lines that evaluate it where they could be matched.</p>")
    if trained:
        body += ['<h2 id="training">Training</h2>', _training_html(model)]
    if figure:
        body += ['<h2 id="graph">Computational graph</h2>', figure]
    matched = 0
    for section in doc.sections:
        body.append(f'<h2 id="{_esc(section.anchor)}">{_esc(section.title)}</h2>')
        if section.intro:
            body.append(f"<p>{_esc(section.intro)}</p>")
        in_scalar = section.anchor == "scalar"
        for block in section.blocks:
            body.append(f"<h3>{_esc(block.title)}</h3>")
            if block.lines:
                body.append('<ul class="meta">' + "".join(f"<li>{_esc(line)}</li>" for line in block.lines) + "</ul>")
            if block.kind == "names":
                body.append(_names_table(block))
                continue
            if in_scalar:
                body.append('<div class="cards">' + "".join(
                    f'<div class="card{" wide" if len(" = ".join(map(plain_text, eq.parts))) > 60 else ""}">{_math(eq)}</div>'
                    for eq in block.equations) + "</div>")
                continue
            for eq in block.equations:
                kernel = None
                vector = any(isinstance(part, sp.Basic) and part.has(Vec) for part in eq.parts)
                ref = None if in_scalar or vector else _kernel_ref(eq, d, workspace)
                text_, file_ = source_text, filename
                if eq.quantity[:1] == ("update",):
                    ref = None
                    if update_code is not None:
                        text_, file_, first, states = update_code
                        name = eq.quantity[1]
                        array = f"{name}_{first}" if name in states else first if name == "theta" else None
                        ref = None if array is None else ("backward_update", (array,), ())
                if ref is not None:
                    prov = update_provenance if text_ is not source_text else provenance
                    snippet = kernel_snippet(text_, prov, *ref)
                    if snippet is None:
                        kernel = f'<p class="nomatch">No line of {_esc(ref[0])}() matched this formula.</p>'
                    else:
                        matched += 1
                        kernel = _snippet_html(snippet, file_)
                body.append(_equation_html(eq, kernel))
    if w is not None:
        body += ['<h2 id="example">Worked example</h2>', walkthrough_tables(w)]
    body += ['<h2 id="module">Generated module</h2>',
             f"<details><summary>{_esc(filename)} ({len(source_text.splitlines())} lines)</summary>"
             f'<pre class="code">' + "".join(f'<span class="row"><span class="ln">{k}</span>{_code_line(line)}</span>'
                                             for k, line in enumerate(source_text.splitlines(), 1)) + "</pre></details>"]
    body += ["<h2>Notation</h2>", "<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in doc.legend) + "</ul>",
             f"<footer>symbp {_esc(__version__)} · formulas printed with SymPy {_esc(sp.__version__)}'s MathML "
             f"presentation printer · {matched} formulas matched to kernel lines.</footer>"]
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>symbp report: {_esc(net.name)}</title>", f"<style>{_CSS}</style>", "</head>", "<body><main>",
        *body, "</main></body>", "</html>", ""])
    if path is not None:
        write_atomic(path, page, "report")
    return page
