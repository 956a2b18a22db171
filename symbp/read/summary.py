"""A compiled model at a glance, as Keras's ``summary()`` shows one: layers, shapes, parameters.

:func:`summary_rows` reads the network (each layer's type, activation, output shape for one
sample, parameter shapes and count); :func:`summary_text` lays the rows out as aligned text
(``model.summary()``) and :func:`summary_html` as an HTML table (Jupyter's rich display of a
``Model``).  Both end with the loss, the generated module's path and what training the model
has had.
"""

from __future__ import annotations

import html
import re

__all__ = ["Summary", "summary_html", "summary_rows", "summary_text"]

_HEAD = ("layer", "type", "activation", "output shape", "parameters", "param #")


class Summary(str):
    """The summary text; shown as itself (not quoted, ``\\n`` as line breaks) at a prompt."""

    def __repr__(self) -> str:
        return str(self)


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def summary_rows(model) -> list[tuple[str, ...]]:
    """One row per layer, after an ``input`` row: the cells of :data:`_HEAD`, as text."""
    from .explain import describe_layer

    net = model.network
    shapes = net.param_shapes()
    rows = [("input", "", "", _shape(net.shapes[0]), "", "0")]
    for pos, (layer, count) in enumerate(zip(net.layers, net.param_counts()), 1):
        # Parameters are named by kind and layer position: W1, b1, W4 …
        # (running statistics, BatchNorm's, are not trained: not listed, not counted)
        running = {f"{key}{pos}" for key in layer.running_keys}
        params = ", ".join(f"{key} {_shape(sh)}" for key, sh in shapes.items()
                           if re.fullmatch(rf"\D+{pos}", key) and key not in running)
        act = layer.activation.describe() if "activation" in layer.config_keys else ""
        rows.append((str(pos), describe_layer(layer), act, _shape(net.shapes[pos]), params, str(count)))
    return rows


def _footer(model) -> list[str]:
    net = model.network
    target = "cuda" if type(model).__name__ == "CudaModel" else "cpu"
    lines = [f"loss {net.loss.name}" + (f", l2 λ = {net.l2:g}" if net.l2 else ""),
             f"generated module: {model.source_path}"]
    opt = getattr(model, "optimizer", None)
    if model.epoch:
        lines.append(f"trained {model.epoch} epochs" + (f" with {opt.describe()}" if opt is not None else ""))
    else:
        lines.append("not trained yet")
    return [f"Model {net.name!r}: {target}, {model.dtype.name}"] + lines


def summary_text(model) -> Summary:
    """The summary as aligned text (see the module docstring)."""
    rows = [_HEAD] + summary_rows(model)
    total = sum(int(r[-1]) for r in rows[1:])
    rows.append(("total", "", "", "", "", str(total)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(_HEAD))]
    title, *footer = _footer(model)
    rule = "  " + "─" * (sum(widths) + 2 * (len(widths) - 1))
    out = [title, rule]
    for k, r in enumerate(rows):
        if k == len(rows) - 1:
            out.append(rule)
        out.append("  " + "  ".join(c.rjust(widths[i]) if i == len(r) - 1 else c.ljust(widths[i])
                                    for i, c in enumerate(r)).rstrip())
        if k == 0:
            out.append(rule)
    return Summary("\n".join(out + footer))


def summary_html(model) -> str:
    """The summary as one HTML block: a table, then the loss, module path and training."""
    from .html_tables import notebook_html

    esc = html.escape
    rows = summary_rows(model)
    total = sum(int(r[-1]) for r in rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in _HEAD)
    body = "".join("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i == len(r) - 1 else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    body += f'<tr><th colspan="{len(_HEAD) - 1}">total</th><td class="num"><b>{total}</b></td></tr>'
    title, loss, module, trained = _footer(model)
    module = module.split(": ", 1)[1]
    foot = (f"<p>{esc(loss)}; {esc(trained)}.<br>Generated module: <code>{esc(module)}</code></p>")
    return notebook_html(title, f'<table class="grid"><tr>{head}</tr>{body}</table>{foot}')
