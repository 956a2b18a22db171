"""Training curves with matplotlib (the optional ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

from ._output import atomic_target, check_output_path


def _pyplot():
    try:
        import matplotlib

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
