"""Code generation for the image layers (Conv2D, pooling, Flatten, Maxout).

Called by :class:`symbp.codegen._Builder` for every layer that is not Dense.  Activations,
deltas and stage buffers of an image layer are stored flat, ``(batch, C·H·W)`` in C, H, W
order, so Flatten costs nothing (it renames the buffer) and a Dense layer after it reads
that buffer as its input.  Stages that only re-index (the zero padding x̃) are inlined
where they are read; the others get a buffer.
"""

from __future__ import annotations

import sympy as sp

from .conv import Flatten
from .derive import resolve
from .indices import N, n
from .lower import Loop, split_sums
from .lower_image import Nest, WindowArgmax, numeric
from .ops import window_argmax


def setup(builder, ld) -> None:
    """Names, flat layouts and work buffers for image layer ``ld``."""
    names, net = builder.names, builder.d.network
    lid = ld.index
    prev_a = names["x"] if lid == 1 else names[f"a{lid - 1}"]
    if isinstance(ld.layer, Flatten):
        prev_z = names["x"] if lid == 1 else names[f"z{lid - 1}"]
        names[f"z{lid}"], names[f"a{lid}"] = prev_z, prev_a
        names[f"delta{lid}"] = "dZflat" if lid == 1 else names[f"delta{lid - 1}"]
        if lid == 1:
            builder.workspace.append(("dZflat", ("batch", net.widths[lid])))
        return
    shape = net.shapes[lid]
    for key in ld.params:
        names[f"{key}{lid}"] = f"{key}{lid}"
        builder.params.append(f"{key}{lid}")
    names[f"z{lid}"] = f"Z{lid}"
    names[f"a{lid}"] = f"Z{lid}" if ld.layer.activation.is_identity else f"A{lid}"
    names[f"delta{lid}"] = f"dZ{lid}"
    for label in (f"z{lid}", f"a{lid}", f"delta{lid}"):
        if len(shape) == 3:
            builder.flat[label] = shape
    for st in ld.stages[:-1]:
        label = str(st.target.label)
        if _inlined(st):
            continue
        size = _numbers(builder, st.dims)
        names[label] = f"A{label}"  # A…: written by forward, read by backward
        builder.workspace.append((f"A{label}", ("batch", int(sp.prod(size)))))
        if len(size) == 3:
            builder.flat[label] = size
    for label, (gb, _free, _) in ld.stage_grads.items():
        st = next(st for st in ld.stages if str(st.target.label) == label)
        if lid == 1 and _inlined(st):
            continue  # ∂C/∂x̃ of the first layer is never needed
        size = _numbers(builder, st.dims)
        names[str(gb.label)] = f"dZ{gb.label}"
        builder.workspace.append((f"dZ{gb.label}", ("batch", int(sp.prod(size)))))
        if len(size) == 3:
            builder.flat[str(gb.label)] = size
    builder.workspace.append((f"Z{lid}", ("batch", net.widths[lid])))
    if not ld.layer.activation.is_identity:
        builder.workspace.append((f"A{lid}", ("batch", net.widths[lid])))
    builder.workspace.append((f"dZ{lid}", ("batch", net.widths[lid])))


def _numbers(builder, dims) -> tuple:
    return tuple(_size(builder, d_) for d_ in dims)


def _inlined(st) -> bool:
    """A stage that only re-indexes its input (a δ-sum, like the zero padding)."""
    return isinstance(st.formula, sp.Sum) and st.formula.function.has(sp.KroneckerDelta)


def _inline(builder, ld, expr: sp.Expr) -> sp.Expr:
    """Replace reads of inlined stages by their resolved formulas."""
    for st in ld.stages[:-1]:
        if not _inlined(st):
            continue
        ranges = {sym: (0, ext - 1) for sym, ext in zip(st.idx, st.dims)}
        body = resolve(st.formula, ranges)
        expr = expr.replace(
            lambda t, st=st: isinstance(t, sp.Indexed) and t.base.label == st.target.label,
            lambda t, body=body, st=st: body.xreplace(dict(zip((n, *st.idx), t.indices))))
    return expr


def _ranges(builder, idx, dims) -> list:
    return [(n, N)] + [(sym, _size(builder, d_)) for sym, d_ in zip(idx, dims)]


def _fix(builder, ld, expr, ranges) -> sp.Expr:
    return numeric(builder.value(_inline(builder, ld, expr)), builder.d.sizes,
                   {sym: (0, ext - 1) for sym, ext in ranges if sym is not n})


def forward_steps(builder, ld) -> list:
    if isinstance(ld.layer, Flatten):
        return []
    steps = []
    for st in ld.stages:
        if _inlined(st):
            continue
        ranges = _ranges(builder, st.idx, st.dims)
        target = st.target[(n, *st.idx)]
        if isinstance(st.formula, window_argmax):
            value, *window = st.formula.args
            win = [(sym, int(builder.value(hi)) + 1) for sym, _, hi in window]
            steps.append(WindowArgmax(ranges, target, _fix(builder, ld, value, ranges + win), win))
            continue
        expr = _fix(builder, ld, st.formula, ranges)
        if len(st.idx) == 1:
            try:  # a dense map (Maxout's pieces): a GEMM and a fused loop
                pre, fused = split_sums(expr, st.target, (n, st.idx[0]), lambda s_, t_=st.target: t_)
                if all(not isinstance(x_, Nest) for x_ in pre):
                    stmts = [(target, fused)]
                    if st is ld.stages[-1] and not ld.layer.activation.is_identity:
                        stmts.append((ld.a[(n, *st.idx)], builder.value(ld.output)))
                    steps += pre + [Loop(ranges, stmts)]
                    continue
            except NotImplementedError:
                pass
        stmts = [(target, expr)]
        if st is ld.stages[-1] and not ld.layer.activation.is_identity:
            stmts.append((ld.a[(n, *st.idx)], builder.value(ld.output)))
        steps.append(Nest(ranges, stmts))
    return steps


def grad_steps(builder, ld, opt, first: bool) -> tuple[list, list]:
    """Stage gradients (∂C/∂x̃ only when a layer before needs it), then ∂C/∂θ."""
    steps = []
    for label, (gb, free, formula) in ld.stage_grads.items():
        st = next(st for st in ld.stages if str(st.target.label) == label)
        if first and _inlined(st):
            continue  # ∂C/∂x̃ of the first layer: nobody reads it
        ranges = _ranges(builder, free, st.dims)
        steps.append(Nest(ranges, [(gb[(n, *free)], _fix(builder, ld, formula, ranges))]))
    now, later = [], []
    for key in ld.params:
        g = builder.grad_base(ld, key)
        idx = ld.param_idx[key]
        expr = builder.value(ld.grads[key])
        extents = {sym: _size(builder, d_) for sym, d_ in zip(idx, ld.param_dims[key])}
        try:
            gsteps, g_expr = split_sums(expr, g, idx, lambda s_, g_=g: g_, extents)
        except (NotImplementedError, TypeError, KeyError):
            data = sp.Add(*[t for t in sp.Add.make_args(expr) if t.has(sp.Sum)])
            prange = [(sym, _size(builder, d_)) for sym, d_ in zip(idx, ld.param_dims[key])]
            fixed = numeric(_inline(builder, ld, data), builder.d.sizes, {sym: (0, e_ - 1) for sym, e_ in prange})
            gsteps = [Nest(prange, [(g[idx], fixed)])]
            g_expr = g[idx] + (expr - data)
        if opt is None:
            prange = [(sym, _size(builder, d_)) for sym, d_ in zip(idx, ld.param_dims[key])]
            now += gsteps + ([Loop(prange, [(g[idx], g_expr)])] if g_expr != g[idx] else [])
        else:
            a_, b_ = builder.update_steps(ld, key, gsteps, g_expr, opt)
            now += a_
            later += b_
    return steps + now, later


def delta_steps(builder, ld) -> list:
    """δ of image layer ``ld`` from what the layer after it sent back."""
    if isinstance(ld.layer, Flatten) and ld.index == 1:
        return []
    idx = (n, *ld.delta_idx)
    ranges = _ranges(builder, ld.delta_idx, ld.out_dims)
    expr = _fix(builder, ld, ld.delta_formula, ranges)
    target = ld.delta[idx]
    if isinstance(expr, sp.Indexed) and builder.names.get(str(expr.base.label)) == builder.names[f"delta{ld.index}"]:
        return []  # the layer after is a Flatten: the same memory, nothing to do
    if len(ld.delta_idx) == 1:
        try:
            pre, fused = split_sums(expr, ld.delta, idx, lambda s_: ld.delta)
            return pre + [Loop(ranges, [(target, fused)])]
        except NotImplementedError:
            pass
    return [Nest(ranges, [(target, expr)])]


def _size(builder, dim) -> int:
    """A dimension (a size symbol or a number) as a number."""
    return int(builder.value(dim) if isinstance(dim, sp.Basic) else dim)
