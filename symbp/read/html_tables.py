"""HTML for the readers' tables: the worked example's checks and a notebook output block.

Shared by the report page (:mod:`symbp.read.report`) and the notebook displays
(``Walkthrough._repr_html_``, ``Model._repr_html_``, ``Graph``); nothing here imports them.
"""

from __future__ import annotations

import html
import math


def divmod_index(flat: int, shape: tuple) -> list[int]:
    """The C-order indices of entry ``flat`` of an array of ``shape``."""
    out = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        out.append(rest)
    return out[::-1]


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "—"
    return f"{float(v):.9g}"


def err(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.1e}"


MARK = {"ok": "✓", "FAILED": "✗ FAILED", "kink": "~ kink", "unchecked": "not checked"}


def walkthrough_tables(w) -> str:
    """The worked example's tables as HTML."""
    net = w.network
    vec = lambda v: "[" + ", ".join(num(float(x)) for x in v[: 4 * w.max_rows]) + (  # noqa: E731
        f", … {len(v) - 4 * w.max_rows} more" if len(v) > 4 * w.max_rows else "") + "]"
    out = [f'<p>x = <code>{esc(vec(w.x))}</code>, t = <code>{esc(vec(w.t))}</code>'
           + (f", λ = {net.l2:g}" if net.l2 else "") + f"; cost C = <b>{esc(num(w.loss))}</b>"
           + (f" (the generated kernels: {esc(num(w.kernel_loss))})" if w.kernel_loss is not None else "") + ".</p>"]
    out.append("<h3>Forward pass</h3>")
    rows = ['<tr><th>layer</th><th>unit</th><th>z</th><th>a = f(z)</th></tr>']
    for l in range(1, len(w.z) + 1):
        for u in range(min(len(w.z[l - 1]), w.max_rows)):
            rows.append(f"<tr><td>{l}</td><td>{esc(w.unit_names[l][u])}</td><td class=num>{num(float(w.z[l - 1][u]))}</td>"
                        f"<td class=num>{num(float(w.a[l - 1][u]))}</td></tr>")
        if len(w.z[l - 1]) > w.max_rows:
            rows.append(f"<tr><td>{l}</td><td colspan=3>… {len(w.z[l - 1]) - w.max_rows} more units</td></tr>")
    out.append(f'<table class="grid">{"".join(rows)}</table>')
    if any(getattr(w, "stages", ())):
        out.append("<h3>Intermediate stages (each layer's formulas before z)</h3>")
        rows = ["<tr><th>layer</th><th>entry</th><th>value</th></tr>"]
        for l, stages in enumerate(w.stages, 1):
            for label, value in stages.items():
                flat = value.reshape(-1)
                for u in range(min(flat.size, w.max_rows)):
                    idx = ",".join(str(int(v)) for v in divmod_index(u, value.shape))
                    rows.append(f"<tr><td>{l}</td><td>{esc(label)}[{idx}]</td><td class=num>{num(float(flat[u]))}</td></tr>")
                if flat.size > w.max_rows:
                    rows.append(f"<tr><td>{l}</td><td colspan=2>… {flat.size - w.max_rows} more of {esc(label)}</td></tr>")
        out.append(f'<table class="grid">{"".join(rows)}</table>')

    def status(c) -> str:
        cls = "ok" if c.status in ("ok", "kink", "unchecked") else "bad"
        return f'<td class="{cls}">{esc(MARK[c.status])}</td>'

    out.append("<h3>Backward pass: δ = ∂C/∂z, from the output layer back</h3>")
    rows = ["<tr><th>layer</th><th>unit</th><th>δ</th><th>finite difference</th><th>rel. error</th><th></th></tr>"]
    deltas = [c for c in w.checks if c.entry.startswith("delta")]
    shown: dict = {}
    for c in deltas:
        l = int(c.entry[5 : c.entry.index("[")])
        shown[l] = shown.get(l, 0) + 1
        if shown[l] > w.max_rows:
            continue
        rows.append(f"<tr><td>{l}</td><td>{esc(c.label[2:])}</td><td class=num>{num(c.value)}</td>"
                    f"<td class=num>{num(c.numeric)}</td><td class=num>{err(c.error)}</td>{status(c)}</tr>")
    out.append(f'<table class="grid">{"".join(rows)}</table>')
    out.append("<h3>Parameter gradients</h3>")
    kern = w.kernel_loss is not None
    head = ["θ", "entry", "value", "∂C/∂θ", "finite difference", "rel. error"] + (["kernels", "rel. error"] if kern else [])
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "<th></th></tr>"]
    per: dict = {}
    for c in w.checks:
        if c.entry.startswith("delta"):
            continue
        name = c.entry.split("[")[0]
        per[name] = per.get(name, 0) + 1
        if per[name] > w.max_rows:
            continue
        cells = [c.label[len("∂C/∂"):], c.entry]
        nums = [c.theta, c.value, c.numeric]
        row = "".join(f"<td>{esc(x)}</td>" for x in cells) + "".join(f"<td class=num>{num(x)}</td>" for x in nums)
        row += f"<td class=num>{err(c.error)}</td>"
        if kern:
            row += f"<td class=num>{num(c.kernel)}</td><td class=num>{err(c.kernel_error)}</td>"
        rows.append(f"<tr>{row}{status(c)}</tr>")
    out.append(f'<table class="grid">{"".join(rows)}</table>')
    hidden = sum(max(0, v - w.max_rows) for v in per.values())
    checked = sum(c.status in ("ok", "FAILED", "kink") for c in w.checks)
    verdict = '<span class="ok">all agree</span>' if w.ok else '<span class="bad">SOME DISAGREE</span>'
    out.append(f"<p>{checked} numbers checked against five-point finite differences (tolerance {w.tolerance:g}): "
               f"{verdict}; largest relative difference {w.max_error:.1e}"
               + (f"; {hidden} more gradient entries are not listed" if hidden else "") + ".</p>")
    return "\n".join(out)


_NOTEBOOK_CSS = """
.symbp-nb table.grid { border-collapse: collapse; margin: 6px 0; font-variant-numeric: tabular-nums; }
.symbp-nb table.grid th, .symbp-nb table.grid td { border: 1px solid #d0d7de; padding: 2px 8px; text-align: left; }
.symbp-nb table.grid th { background: #f6f8fa; }
.symbp-nb table.grid td.num { text-align: right; font-family: ui-monospace, monospace; }
.symbp-nb .ok { color: #1a7f37; } .symbp-nb .bad { color: #cf222e; font-weight: 600; }
"""


def notebook_html(title: str, body: str) -> str:
    """``body`` (HTML using the report's table classes) as one Jupyter output: a scoped style,
    a bold title; nothing loaded from anywhere."""
    return (f'<div class="symbp-nb"><style>{_NOTEBOOK_CSS}</style><p><b>{esc(title)}</b></p>\n{body}</div>')


def walkthrough_html(w) -> str:
    """A :class:`~symbp.read.walkthrough.Walkthrough` as one HTML block (Jupyter's rich display)."""
    net = w.network
    title = f"Worked example: {net.name} ({' → '.join(map(str, net.widths))}, loss {net.loss.name}), one sample"
    return notebook_html(title, walkthrough_tables(w))
