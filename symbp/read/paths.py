"""Optimizer paths on a 2-D surface: how SGD, momentum and Adam move differently.

The surface is a formula in ``x`` and ``y`` (parsed safely, see :mod:`symbp.spec.formula`); SymPy
derives its gradient, and each optimizer's own SymPy update rules (the ones fused into the
training kernels) are applied to the point (x, y) step by step.  :func:`plot_paths` draws the
contours with every path in its own colour, dash pattern and marker (so paths along the same
valley all show) and marks the surface's minima (:func:`critical_points`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..spec.formula import parse_formula
from ..spec.ops import drop_point_masses
from ..train.optim import Optimizer, g_s, t_s, theta_s

MAX_STEPS = 100_000  # per path; more cannot be told apart on the picture and takes minutes

SURFACES = {
    "rosenbrock": ("(1 - x)**2 + 100*(y - x**2)**2", (-1.5, 2.0), (-2.0, 2.0, -1.0, 3.0)),
    "beale": ("(1.5 - x + x*y)**2 + (2.25 - x + x*y**2)**2 + (2.625 - x + x*y**3)**2", (1.0, 1.4), (-1.0, 4.0, -1.5, 2.0)),
    "saddle": ("x**2 - y**2", (-1.5, 0.01), (-2.0, 2.0, -2.0, 2.0)),
    "himmelblau": ("(x**2 + y - 11)**2 + (x + y**2 - 7)**2", (0.0, -4.0), (-5.0, 5.0, -5.0, 5.0)),
}

# Where each built-in surface has its minima (rosenbrock: the end of the banana valley; beale
# and himmelblau: the textbook values), and the saddle its stationary point.  A test checks
# that ∇f vanishes at each.
CRITICAL_POINTS = {
    "rosenbrock": [(1.0, 1.0, "minimum")],
    "beale": [(3.0, 0.5, "minimum")],
    "saddle": [(0.0, 0.0, "saddle point")],
    "himmelblau": [(3.0, 2.0, "minimum"), (-2.805118086952745, 3.131312518250573, "minimum"),
                   (-3.779310253377747, -3.283185991286170, "minimum"), (3.584428340330492, -1.848126526964404, "minimum")],
}

x_s, y_s = sp.Symbol("x", real=True), sp.Symbol("y", real=True)


@dataclass
class Path:
    """One optimizer's trajectory: ``points`` has shape (steps + 1, 2); ``values`` f there."""

    label: str
    points: np.ndarray
    values: np.ndarray
    lr: float | None = None  # the optimizer's learning rate, for the legend


def surface(formula: str | sp.Expr) -> tuple[sp.Expr, str]:
    """The SymPy surface for a built-in name or a formula in x and y."""
    if isinstance(formula, str) and formula.strip() in SURFACES:
        name = formula.strip()
        return parse_formula(SURFACES[name][0], {"x": x_s, "y": y_s}, what="surface"), name
    if isinstance(formula, sp.Expr):
        extra = sorted(str(s) for s in formula.free_symbols if str(s) not in ("x", "y"))
        if extra:
            raise ValueError(f"surface {formula}: free symbols may only be x and y, got {', '.join(extra)}")
        return formula.subs({s: {"x": x_s, "y": y_s}[str(s)] for s in formula.free_symbols}), str(formula)
    if not isinstance(formula, str):
        raise TypeError(f"a surface is a name ({', '.join(SURFACES)}) or a formula in x and y, got {type(formula).__name__}")
    if formula.strip().isidentifier() and formula.strip() not in ("x", "y"):
        raise ValueError(f"unknown surface {formula.strip()!r}: use {', '.join(SURFACES)} or a formula in x and y")
    return parse_formula(formula, {"x": x_s, "y": y_s}, what="surface"), formula


def _stepper(opt: Optimizer):
    """A numeric update for one coordinate, built from the optimizer's SymPy rules."""
    state = {name: sp.Symbol(f"state_{name}", real=True) for name in opt.state_names}
    hyper = opt.symbols()
    rules = opt.rules(theta_s, g_s, state, hyper, t_s)
    args = [theta_s, g_s, t_s, *state.values(), *hyper.values()]
    # lambdify prints these SymPy objects (built from whitelisted formulas) as NumPy code.
    fns = [(target, sp.lambdify(args, expr, modules="numpy")) for target, expr in rules]
    order = list(state.values())

    def step(theta: np.ndarray, g: np.ndarray, t: int, values: dict) -> np.ndarray:
        env = {theta_s: theta, g_s: g, t_s: t, **{s: values[s] for s in order},
               **{hyper[k]: v for k, v in opt.hyper.items()}}
        for target, fn in fns:
            env[target] = fn(*[env[a] for a in args])
            if target in values:
                values[target] = env[target]
        return env[theta_s]

    return step, {s: np.full(2, opt.state_init(name)) for name, s in state.items()}


def optimizer_paths(formula, optimizers: Sequence[Optimizer], start=None, steps: int = 200, path=None, gif=None,
                    bounds=None) -> list[Path]:
    """Run each optimizer from ``start`` on a 2-D surface and optionally draw the paths.

    Parameters
    ----------
    formula : str or sympy.Expr
        ``"rosenbrock"``, ``"beale"``, ``"saddle"``, ``"himmelblau"`` or a formula in x and y.
    optimizers : list of Optimizer
        Each runs with its own update rules (the SymPy formulas the training kernels use).
    start : (x, y), optional
        Defaults to the named surface's classic starting point; for a formula, the first of
        :data:`DEFAULT_STARTS` where f is finite and its gradient is not zero.
    path, gif : path, optional
        Write the contour plot with the paths as PNG, and an animation as GIF.

    Examples
    --------
    >>> paths = optimizer_paths("rosenbrock", [SGD(lr=1e-3), Adam(lr=0.05)], steps=50, path="paths.png")
    """
    paths, f = run_paths(formula, optimizers, start, steps)
    if path is not None or gif is not None:
        import matplotlib.pyplot as plt

        fig = plot_paths(paths, f, path, bounds=bounds, gif=gif)
        plt.close(fig)
    return paths


# Where a formula's paths start when no start is given: the first of these points with a finite
# value and a gradient that is not zero (x² + 10y² has its minimum at the origin: starting
# there, no optimizer would move).
DEFAULT_STARTS = ((-1.5, 1.0), (1.0, 1.0), (0.5, -1.5), (0.0, 0.0))


def _default_start(value, grad) -> tuple[float, float]:
    with np.errstate(all="ignore"):
        for point in DEFAULT_STARTS:
            f0, g0 = np.asarray(value(*point), dtype=float), np.asarray(grad(*point), dtype=float)
            if np.isfinite(f0).all() and np.isfinite(g0).all() and np.any(g0 != 0):
                return point
    return DEFAULT_STARTS[0]


def run_paths(formula, optimizers: Sequence[Optimizer], start=None, steps: int = 200) -> tuple[list[Path], sp.Expr]:
    """The paths and the surface f(x, y), without drawing."""
    f, _ = surface(formula)
    if not optimizers:
        raise ValueError("optimizer_paths needs at least one optimizer")
    for opt in optimizers:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"optimizers must be symbp optimizers such as sb.Adam(lr=0.05), got {type(opt).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if not f.free_symbols & {x_s, y_s}:
        raise ValueError(f"the surface {formula!r} is constant: it must depend on x or y")
    # sign(x) differentiates to δ(x), which has no numeric value: 0, as in the kernels.
    grad = sp.lambdify((x_s, y_s), [drop_point_masses(sp.diff(f, s)) for s in (x_s, y_s)], modules="numpy")
    value = sp.lambdify((x_s, y_s), f, modules="numpy")
    if start is None:
        start = SURFACES[str(formula).strip()][1] if str(formula).strip() in SURFACES else _default_start(value, grad)
    start = np.asarray(start, dtype=float)
    if start.shape != (2,) or not np.isfinite(start).all():
        raise ValueError(f"start must be a finite point (x, y), got {start!r}")
    paths = []
    for opt in optimizers:
        step, values = _stepper(opt)
        point = start.copy()
        points = [point.copy()]
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(1, steps + 1):
                g = np.asarray(grad(*point), dtype=float)
                point = np.asarray(step(point, g, t, values), dtype=float)
                if not np.isfinite(point).all():
                    break  # diverged: the path ends where it left the finite plane
                points.append(point.copy())
            pts = np.array(points)
            values_along = np.array([value(*p) for p in pts], dtype=float)
        paths.append(Path(opt.describe(), pts, values_along, opt.hyper.get("lr")))
    return paths, f


def critical_points(f: sp.Expr) -> list[tuple[float, float, str]]:
    """The minima (and saddle points) of the surface ``f`` to mark: a built-in surface's known
    ones, or, for a quadratic formula, the one point where SymPy solves ∇f = 0, classified by
    the Hessian; empty for anything else (solving a general ∇f = 0 may not end)."""
    for name, (formula, *_rest) in SURFACES.items():
        if f == parse_formula(formula, {"x": x_s, "y": y_s}, what="surface"):
            return list(CRITICAL_POINTS[name])
    try:
        poly = sp.Poly(f, x_s, y_s)
    except sp.PolynomialError:
        return []
    if poly.total_degree() != 2:
        return []
    grad = [sp.diff(f, v) for v in (x_s, y_s)]
    solutions = sp.solve(grad, [x_s, y_s], dict=True)
    if len(solutions) != 1 or set(solutions[0]) != {x_s, y_s}:
        return []  # a valley of minima (x² alone) or none: no single point to mark
    eig = [complex(e) for e in sp.hessian(f, (x_s, y_s)).eigenvals(multiple=True)]
    kind = ("minimum" if all(e.real > 0 for e in eig) else "maximum" if all(e.real < 0 for e in eig)
            else "saddle point" if all(e.real != 0 for e in eig) else None)
    if kind is None:
        return []
    sol = solutions[0]
    return [(float(sol[x_s]), float(sol[y_s]), kind)]


# One look per path, so that paths lying on top of each other still show: a colour, a dash
# pattern and a marker each; the longest path is drawn first and widest, the shorter ones
# over it and narrower.
_LOOKS = [("#1f77b4", "-", "o"), ("#ff7f0e", "--", "s"), ("#2ca02c", ":", "^"), ("#d62728", "-.", "D"),
          ("#9467bd", (0, (5, 1, 1, 1)), "v"), ("#8c564b", (0, (1, 1)), "P"), ("#e377c2", "-", "X"),
          ("#17becf", "--", "*")]


_PLURAL = {"minimum": "minima", "maximum": "maxima", "saddle point": "saddle points"}


def _legend_label(p: Path) -> str:
    label = p.label
    if p.lr is not None and "lr=" not in label:  # the default lr is left out of describe(): say it
        head = label[:-1]
        label = head + (", " if not head.endswith("(") else "") + f"lr={p.lr:g})"
    return f"{label}: f = {p.values[-1]:.3g} after {len(p.points) - 1} steps"


def plot_paths(paths: list[Path], f: sp.Expr, path=None, bounds=None, title: str | None = None, gif=None):
    """Contours of f with each optimizer's path; PNG to ``path``, an animated GIF to ``gif``.

    Every path has its own colour, dash pattern and marker, its end point drawn large; the
    start is a black star and the surface's minima (see :func:`critical_points`) gold stars."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    marks = critical_points(f)
    pts = np.concatenate([p.points for p in paths])
    if bounds is None:
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        pad = np.maximum((hi - lo) * 0.15, 0.5)
        bounds = (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])
    xs = np.linspace(bounds[0], bounds[1], 300)
    ys = np.linspace(bounds[2], bounds[3], 300)
    gx, gy = np.meshgrid(xs, ys)
    value = sp.lambdify((x_s, y_s), f, modules="numpy")
    with np.errstate(all="ignore"):
        gz = np.broadcast_to(np.asarray(value(gx, gy), dtype=float), gx.shape)
    finite = gz[np.isfinite(gz)]
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    if finite.size and finite.min() >= 0:
        levels = np.geomspace(max(finite.min(), 1e-3), finite.max(), 30) if finite.max() > 0 else 30
        ax.contour(gx, gy, gz, levels=levels, cmap="viridis", linewidths=0.6, alpha=0.6, zorder=1)
    else:
        ax.contour(gx, gy, gz, levels=30, cmap="viridis", linewidths=0.6, alpha=0.6, zorder=1)
    # Longest first, underneath; each later (shorter) one on top of it and narrower.
    length = [float(np.sum(np.hypot(*np.diff(p.points, axis=0).T))) for p in paths]
    order = sorted(range(len(paths)), key=lambda k: -length[k])
    lines = [None] * len(paths)
    for rank, k in enumerate(order):
        p = paths[k]
        color, dash, marker = _LOOKS[k % len(_LOOKS)]
        width = 1.2 + 2.4 * (len(paths) - 1 - rank) / max(len(paths) - 1, 1)
        every = max(1, len(p.points) // 12)
        (line,) = ax.plot(p.points[:, 0], p.points[:, 1], color=color, linestyle=dash, linewidth=width, marker=marker,
                          markersize=4, markevery=every, label=_legend_label(p), zorder=3 + rank, alpha=0.9)
        (end,) = ax.plot(*p.points[-1], marker=marker, color=color, markersize=10, markeredgecolor="black",
                         linestyle="none", zorder=50 + rank)  # over the minimum's star: reached it
        lines[k] = (line, end)
    ax.plot(*paths[0].points[0], "k*", markersize=14, label="start", zorder=40, linestyle="none")
    for kind in dict.fromkeys(m[2] for m in marks):
        at = [(x, y) for x, y, k in marks if k == kind]
        where = ", ".join(f"({x:.3g}, {y:.3g})" for x, y in at)
        ax.plot([x for x, _ in at], [y for _, y in at], marker="*" if kind == "minimum" else "X", color="gold",
                markeredgecolor="black", markersize=16, linestyle="none", zorder=41,
                label=f"{_PLURAL[kind] if len(at) > 1 else kind} {where}")
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or f"f(x, y) = {f}", fontsize=9)
    # Outside the axes (inside, it covers part of the surface), the paths in the order given.
    handles, labels = ax.get_legend_handles_labels()
    first = [order.index(k) for k in range(len(paths))] + list(range(len(paths), len(handles)))
    ax.legend([handles[i] for i in first], [labels[i] for i in first], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    if gif is not None:
        _animate(fig, lines, paths, gif)
    return fig


def _animate(fig, lines, paths, gif) -> None:
    from pathlib import Path as _P

    from matplotlib.animation import FuncAnimation, PillowWriter

    from .._output import atomic_target

    frames = max(len(p.points) for p in paths)
    stride = max(1, math.ceil(frames / 120))  # at most ~120 frames keeps the GIF small

    def update(i):
        for (line, end), p in zip(lines, paths):
            k = min(i * stride + 1, len(p.points))
            line.set_data(p.points[:k, 0], p.points[:k, 1])
            end.set_data([p.points[k - 1, 0]], [p.points[k - 1, 1]])  # the head of the path so far
        return [a for pair in lines for a in pair]

    anim = FuncAnimation(fig, update, frames=math.ceil(frames / stride), blit=False)
    gif = _P(gif)
    with atomic_target(gif, ".gif") as tmp:
        anim.save(tmp, writer=PillowWriter(fps=20))
