"""Training curves: with matplotlib (the optional ``plots`` extra) as PNG, or as plain SVG.

:func:`plot_history` draws a :class:`~symbp.train.model.History` with matplotlib; :func:`history_png`
gives its PNG bytes (Jupyter's rich display); :func:`history_svg` draws the same curves as a
small hand-written SVG that needs nothing installed (the HTML report inlines it).
"""

from __future__ import annotations

import io
import math
import os
import sys
from pathlib import Path

from .._output import atomic_target, check_output_path


def _pyplot():
    try:
        import matplotlib

        # Headless by default, but a backend already chosen stays: Jupyter's kernel names its
        # inline backend in MPLBACKEND, and switching it to Agg would stop figures showing.
        if not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'symbp[plots]'") from None
    return plt


def save_figure(fig, path) -> Path:
    """Save atomically: a temporary file in the same folder, then a rename."""
    path = check_output_path(path, None, "picture")  # any format matplotlib writes
    with atomic_target(path, path.suffix or ".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=(path.suffix.lstrip(".") or "png"))
    return path


def plot_history(history, path=None, title=None):
    plt = _pyplot()
    metrics = history.history
    if not history.epoch:
        raise ValueError("the history is empty: nothing to plot")
    panels = [("loss", "loss")] + ([("accuracy", "accuracy")] if "accuracy" in metrics or "val_accuracy" in metrics else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    epochs = [e + 1 for e in history.epoch]
    for ax, (key, label) in zip(axes[0], panels):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in metrics:
                ax.plot(epochs, metrics[prefix + key], style, marker="o", markersize=3,
                        label="validation" if prefix else "train")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def history_png(history, dpi: int = 100) -> bytes | None:
    """The curves of :func:`plot_history` as PNG bytes; None without matplotlib or epochs."""
    if not history.epoch:
        return None
    try:
        plt = _pyplot()
    except ImportError:
        return None
    fig = plot_history(history)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)  # or Jupyter's inline backend would show it a second time


# --------------------------------------------------------------------------------------------
# SVG, no dependencies
# --------------------------------------------------------------------------------------------
_SERIES = (("", "train", "#0969da", ""), ("val_", "validation", "#cf222e", "6 4"))
_W, _H = 420, 260  # one panel
_L, _R, _T, _B = 58, 14, 28, 40  # margins: tick labels left, title top, epoch axis below


def _ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` round numbers covering [lo, hi] (``whole``: whole numbers only)."""
    step = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(step))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step and not (whole and m * mag % 1))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _panel(history, key: str, x0: float) -> list[str]:
    epochs = [e + 1 for e in history.epoch]
    series = [(label, color, dash, history.history[prefix + key]) for prefix, label, color, dash in _SERIES
              if prefix + key in history.history]
    values = [v for *_, vals in series for v in vals if math.isfinite(v)]
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    e0, e1 = epochs[0], max(epochs[-1], epochs[0] + 1)
    pw, ph = _W - _L - _R, _H - _T - _B
    sx = lambda e: x0 + _L + (e - e0) / (e1 - e0) * pw  # noqa: E731
    sy = lambda v: _T + (hi - v) / (hi - lo) * ph  # noqa: E731
    out = [f'<text x="{x0 + _L}" y="17" font-weight="bold">{key}</text>',
           f'<rect x="{x0 + _L}" y="{_T}" width="{pw}" height="{ph}" fill="none" stroke="#d0d7de"/>']
    for v in _ticks(lo, hi):
        out.append(f'<line x1="{x0 + _L}" x2="{x0 + _L + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{x0 + _L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
    for e in _ticks(e0, e1, 6, whole=True):
        out.append(f'<text x="{sx(e):.1f}" y="{_T + ph + 16}" text-anchor="middle">{int(e)}</text>')
    out.append(f'<text x="{x0 + _L + pw / 2:.1f}" y="{_H - 6}" text-anchor="middle">epoch</text>')
    for k, (label, color, dash, vals) in enumerate(series):
        runs, run = [], []
        for e, v in zip(epochs, vals):
            if math.isfinite(v):
                run.append(f"{sx(e):.1f},{sy(v):.1f}")
            elif run:  # an epoch without this metric (NaN) breaks the line
                runs.append(run)
                run = []
        runs.append(run)
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            elif run:
                out.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="1.8"'
                           + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        ly, lx = 17, x0 + _W - _R - 180 + 82 * k  # the legend, in the top margin
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="1.8"'
                   + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        out.append(f'<text x="{lx + 28}" y="{ly}">{label}</text>')
    return out


def history_svg(history) -> str:
    """Loss (and accuracy) per epoch, train solid and validation dashed, as inline SVG text.

    Needs nothing installed; a metric's NaN epochs (no validation data that epoch) break its
    line.  Raises ValueError for an empty history."""
    if not history.epoch:
        raise ValueError("the history is empty: nothing to plot")
    keys = ["loss"] + (["accuracy"] if "accuracy" in history.history or "val_accuracy" in history.history else [])
    parts = []
    for k, key in enumerate(keys):
        parts += _panel(history, key, k * _W)
    width = _W * len(keys)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_H}" viewBox="0 0 {width} {_H}" '
            f'font-family="system-ui, sans-serif" font-size="11" fill="#1f2328" role="img" '
            f'aria-label="training curves">{"".join(parts)}</svg>')
