"""Shared by the window layers (Conv2D, pooling): input checks and output sizes.

A window that does not fit at the edge is dropped (PyTorch's default, ``ceil_mode=False``).
"""

from __future__ import annotations


def window_count(axis: str, size: int, kernel: int, stride: int, pad: int, owner: str) -> int:
    padded = size + 2 * pad
    if kernel > padded:
        what = f"padded input {size} + 2·{pad} = {padded}" if pad else f"input {size}"
        raise ValueError(f"{owner}: the {axis} window {kernel} is larger than the {what}")
    return (padded - kernel) // stride + 1


def need_3d(layer, in_shape: tuple) -> tuple[int, int, int]:
    """``in_shape`` when it is an image (C, H, W); an error naming ``layer`` otherwise."""
    if len(in_shape) != 3:
        raise ValueError(f"{layer!r} needs a 3-D input (C, H, W), got shape {tuple(in_shape)}")
    return in_shape


def window_size_lines(ld, text, kernel, stride, padding, rule: str) -> list[str]:
    """The lecture's output-size arithmetic, per axis, for a window layer ``ld``."""
    lines = []
    for axis, size, F, S, P, out, sym in zip(("rows", "columns"), ld.in_shape[1:], kernel, stride, padding,
                                             ld.out_shape[1:], ld.out_dims[1:]):
        numer = f"{size} − {F} + 2·{P}" if "2P" in rule else f"{size} − {F}"
        exact = (size - F + 2 * P) % S == 0
        value = f"({numer})/{S} + 1 = {out}" if exact else (
            f"⌊({numer})/{S}⌋ + 1 = {out} (the last {(size - F + 2 * P) % S} that do not fill a window are dropped)")
        lines.append(f"output {axis} {text(sym)} = {rule} = {value}")
    return lines
