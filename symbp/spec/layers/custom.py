"""A layer written as one index formula: ``sb.Layer("z[n, k] = Sum(W[k, j]*x[n, j], j) + b[k]", …)``.

The text is parsed by :func:`symbp.spec.formula.parse_index_formula` (never ``eval``), checked
(every index bounded, every array declared and read with its number of indices, the input
read), and stated as the stages every layer states: the formula itself, or, when it holds
more than one contraction or one that is not a plain added term (a gated unit's two
products), one stage per contraction and a last stage combining them, so the planner makes
each contraction a GEMM and the derivation names the gradient of each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .. import activations
from .base import Layer, LayerForm, Stage, positive_int, register, shape_text

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


def _sum_indices() -> tuple:
    """The index symbols a layer's sums run over (bound by their Sum: no clash with other layers)."""
    from ...indices import c, e, h, j, u, v, w

    return (j, u, v, c, h, w, e)


def _grad_indices() -> tuple:
    """The free indices of ∂C/∂θ, by position (θ with up to four indices)."""
    from ...indices import p, q, r, s

    return (p, q, r, s)


_MAX_SUMS, _MAX_GRAD_INDICES = 7, 4  # their lengths, known without SymPy
_NAME = re.compile(r"[A-Za-z]{1,12}\Z")
#: Names the generated modules use for their own arrays and constants (X, T, Z1, A1, d0, …).
_RESERVED = {"x", "n", "X", "T", "Z", "A", "N", "ONE", "ZERO", "HALF", "NEG_INF", "FASTMATH", "np", "nb", "nbf", "math"}


def _dims(value, name: str) -> tuple:
    """A parameter's declared extents: each ``"units"``, ``"in"`` or a positive int."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"Layer params[{name!r}] must be a non-empty list of extents such as "
                         f"('units', 'in'), got {value!r}")
    if len(value) > _MAX_GRAD_INDICES:
        raise ValueError(f"Layer params[{name!r}] has {len(value)} indices; at most {_MAX_GRAD_INDICES} are supported")
    out = []
    for d_ in value:
        if d_ in ("units", "in"):
            out.append(d_)
        else:
            out.append(positive_int(d_, f"params[{name!r}] extent", "Layer"))
    return tuple(out)


def _init_rule(value, name: str):
    if isinstance(value, str) and value in ("zeros", "ones"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Layer init[{name!r}] must be a bound b >= 0 (uniform on [-b, b]), 'zeros' or 'ones', "
                         f"got {value!r}")
    return float(value)


@register
class FormulaLayer(Layer):
    """A layer declared by one index formula (``sb.Layer``).

    Parameters
    ----------
    formula : str or sympy.Eq
        ``"z[n, k] = …"`` (or ``Eq(z[n, k], …)`` of SymPy Indexed objects, each Sum from 0):
        ``x[n, j]`` is the layer input (a flat one), ``n`` the sample,
        the other left index the output unit; the right-hand side is the activation formula
        language plus array reads at index names and ``Sum(body, j)`` / ``Sum(body, (i, j))``.
    units : int
        The output width.
    params : dict
        Parameter name → its extents, each ``"units"``, ``"in"`` (the input width) or a
        number: ``{"W": ("units", "in"), "b": ("units",)}``.
    activation : as for Dense
    init : dict, optional
        Parameter name → a bound b (uniform on [−b, b]), ``"zeros"`` or ``"ones"``.  By
        default PyTorch's ``Linear`` rule: U(±1/√fan_in), fan_in the product of the extents
        the parameter's sum runs over (for one outside every sum, the layer's largest such
        product).
    decay : list of str, optional
        The parameters the network's l2 term applies to; by default those with two or more
        indices (weights, not biases).
    """

    type_name = "formula"
    kind = "Layer"
    config_keys = ("formula", "units", "params", "activation", "init", "decay")
    required = ("formula", "units", "params")

    def __init__(self, formula: str, units: int, params: Mapping, activation: object = None,
                 init: Mapping | None = None, decay=None, **activation_params: float) -> None:
        from ..formula import index_formula_text, parse_index_formula
        from ..ops import FORMULA_FUNCTIONS

        self.units = positive_int(units, "units", "Layer")
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"Layer params must be a dict of parameter name -> extents, such as "
                             f"{{'W': ('units', 'in')}}, got {params!r}")
        self.params = {}
        for name, dims in params.items():
            if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED or name.startswith("d"):
                raise ValueError(f"Layer parameter name {name!r} must be 1-12 letters, not starting with 'd' and "
                                 f"not one of {', '.join(sorted(_RESERVED))} (the generated code's own names)")
            self.params[name] = _dims(dims, name)
        # SymPy's Eq(z[n, k], …) goes through its text: one parser, one set of checks.
        self.formula = formula if isinstance(formula, str) else index_formula_text(formula)
        formula = self.formula
        parsed = parse_index_formula(formula, {"x": 2, **{k: len(d_) for k, d_ in self.params.items()}},
                                     FORMULA_FUNCTIONS)
        self._check(parsed)
        self.parsed = parsed
        self.activation = activations.get(activation, **activation_params)
        self.activation_params = dict(self.activation.params)
        self.init_rules = {}
        for name, rule in dict(init or {}).items():
            if name not in self.params:
                raise ValueError(f"Layer init names {name!r}, which is not a parameter ({', '.join(self.params)})")
            self.init_rules[name] = _init_rule(rule, name)
        if decay is None:
            decay = [k for k, d_ in self.params.items() if len(d_) >= 2]
        if isinstance(decay, str) or not all(k in self.params for k in decay):
            raise ValueError(f"Layer decay must list parameters ({', '.join(self.params)}), got {decay!r}")
        self.decay = tuple(decay)

    # -- checks --------------------------------------------------------------------------
    def _fail(self, why: str):
        from ..formula import FormulaError

        text = self.formula if len(self.formula) <= 80 else self.formula[:77] + "..."
        raise FormulaError(f'layer formula "{text}": {why}')

    def _check(self, f) -> None:
        if len(f.indices) != 2 or f.indices[0] != "n":
            self._fail(f"the left-hand side must be {f.target}[n, k]: the sample index n, then one output index")
        out = f.indices[1]
        self.out_index = out
        extents: dict[str, object] = {out: "units"}
        where: dict[str, str] = {out: f"{f.target}[n, {out}]"}
        for name, idx in f.reads:
            dims = ("batch", "in") if name == "x" else self.params[name]
            if name == "x" and idx[0] != "n":
                self._fail(f"x is read as x[{', '.join(idx)}]: its first index is the sample, n")
            for pos, (ix, dim) in enumerate(zip(idx, dims)):
                if ix == "n":
                    if name != "x" or pos != 0:
                        self._fail(f"n is the sample index: only x[n, …] may use it, not {name}[{', '.join(idx)}]")
                    continue
                if ix in extents and extents[ix] != dim:
                    self._fail(f"index {ix} runs over {extents[ix]} in {where[ix]} but over {dim} in "
                               f"{name}[{', '.join(idx)}]")
                extents.setdefault(ix, dim)
                where.setdefault(ix, f"{name}[{', '.join(idx)}]")
        if not any(name == "x" for name, _ in f.reads):
            self._fail("it does not read the input x[n, j]: a layer must depend on its input")
        unread = [k for k in self.params if not any(name == k for name, _ in f.reads)]
        if unread:
            self._fail(f"parameter {unread[0]} is declared but the formula does not read it")
        if out in f.summed:
            self._fail(f"{out} is the output index and cannot also be summed over")
        if len(f.summed) > _MAX_SUMS:
            self._fail(f"at most {_MAX_SUMS} summation indices are supported")
        # The free index names (an array's label is a symbol too, but not an integer one).
        # (A Sum binds its index: SymPy leaves it out of the free symbols, unless it is also
        # read outside the Sum, where it has no value.)
        used = {str(sym) for sym in f.body.free_symbols if sym.is_integer} - {"n"} - {f"extent_{k}" for k in f.summed}
        if out not in used:
            self._fail(f"the right-hand side does not use the output index {out}: every output unit would be the same")
        loose = sorted(used - {out})
        if loose:
            self._fail(f"index {loose[0]} is neither summed over nor on the left-hand side: its value is undefined")
        self.extents = extents

    # -- shapes --------------------------------------------------------------------------
    def output_shape(self, in_shape: tuple) -> tuple[int]:
        if len(in_shape) != 1:
            raise ValueError(f"{self.describe()} takes a flat input (x[n, j]) but gets shape {tuple(in_shape)}: "
                             f"put sb.Flatten() before it (giving {int(np.prod(in_shape))} features)")
        return (self.units,)

    def _number(self, dim, fan_in: int) -> int:
        return self.units if dim == "units" else fan_in if dim == "in" else dim

    def param_shapes(self, in_shape: tuple) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._number(d_, in_shape[0]) for d_ in dims) for k, dims in self.params.items()}

    # -- the stages ----------------------------------------------------------------------
    def symbolic(self, l: int, x: sp.IndexedBase, in_dims: tuple) -> LayerForm:
        """The formula with this layer's names (W → W_l, k → i, sums over j, u, v, …) as
        stages: one, or one per contraction plus the one combining them."""
        import sympy as sp

        from ...indices import N, i, n, width

        (fan_in,), fan_out = in_dims, width(l)
        size = {"units": fan_out, "in": fan_in}

        def extent(dim):
            return size[dim] if isinstance(dim, str) else sp.Integer(dim)

        bases = {k: sp.IndexedBase(f"{k}{l}", shape=tuple(extent(d_) for d_ in dims), real=True)
                 for k, dims in self.params.items()}
        bases["x"] = x
        names = {self.out_index: i, "n": n, **dict(zip(self.parsed.summed, _sum_indices()))}
        index = {sp.Symbol(k_, integer=True, nonnegative=True): v_ for k_, v_ in names.items()}
        ext = {sp.Symbol(f"extent_{k_}", integer=True, positive=True): extent(self.extents[k_])
               for k_ in self.parsed.summed}
        # The bases first, keeping the user's index names; then every index at once
        # (simultaneously: the user's i may become j while their j becomes u).
        body = self.parsed.body.replace(lambda t: isinstance(t, sp.Indexed),
                                        lambda t: bases[str(t.base.label)][t.indices])
        body = body.xreplace({**index, **ext})
        z = sp.IndexedBase(f"z{l}", shape=(N, fan_out), real=True)
        stages = []
        for m, term in enumerate(self._hoisted(body)):
            target = sp.IndexedBase(f"s{l}{'abcdefg'[m]}", shape=(N, fan_out), real=True)  # s1a, s1b, …
            stages.append(Stage(target, (i,), term, (fan_out,)))
            body = body.xreplace({term: target[n, i]})
        stages.append(Stage(z, (i,), body, (fan_out,)))
        params = {k: bases[k] for k in self.params}
        return LayerForm(params, {k: _grad_indices()[:len(d_)] for k, d_ in self.params.items()},
                         {k: tuple(extent(d_) for d_ in dims) for k, dims in self.params.items()},
                         stages, decay=self.decay)

    @staticmethod
    def _hoisted(body: sp.Expr) -> list[sp.Expr]:
        """The sums to give stages of their own: none when the formula is one sum plus terms
        without one (Dense: the lowering fuses the rest into the GEMM's loop), else every
        outermost sum over the output index (a sample-wide sum, free of i, stays inline)."""
        import sympy as sp

        from ...indices import i

        sums = [t for t in sp.preorder_traversal(body) if isinstance(t, sp.Sum)]
        outer = [t for t in sums if not any(o is not t and o.has(t) for o in sums)]
        terms = sp.Add.make_args(body)
        if len(outer) <= 1 and all(t in terms or not t.has(sp.Sum) for t in outer):
            return []
        return [t for t in dict.fromkeys(outer) if i in t.free_symbols]

    # -- initialisation ------------------------------------------------------------------
    def _fan_ins(self, fan_in: int) -> dict[str, int]:
        """Each parameter's fan_in: the product of the extents of the sums it is read in."""
        import sympy as sp

        found: dict[str, int] = {}
        sums = [t for t in sp.preorder_traversal(self.parsed.body) if isinstance(t, sp.Sum)]
        for t in sums:
            prod = math.prod(self._number(self.extents[str(lim[0])], fan_in) for lim in t.limits)
            for ind in t.function.atoms(sp.Indexed):
                name = str(ind.base.label)
                if name in self.params:
                    found[name] = max(found.get(name, 0), prod)
        largest = max(found.values(), default=fan_in)
        return {k: found.get(k, largest) for k in self.params}

    def init(self, rng: np.random.Generator, in_shape: tuple, dtype) -> dict[str, np.ndarray]:
        shapes, fans = self.param_shapes(in_shape), self._fan_ins(in_shape[0])
        out = {}
        for k, shape in shapes.items():
            rule = self.init_rules.get(k, 1.0 / math.sqrt(fans[k]))
            if rule == "zeros":
                out[k] = np.zeros(shape, dtype)
            elif rule == "ones":
                out[k] = np.ones(shape, dtype)
            else:
                out[k] = rng.uniform(-rule, rule, shape).astype(dtype)
        return out

    # -- text ------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"Layer({self.units}: {self.formula})"

    def size_lines(self, ld, text) -> list[str]:
        """``parameters (W (3, 4, 4), b (3,)): units·in·in + units = 3·4·4 + 3 = 51``."""
        shapes = self.param_shapes(ld.in_shape)
        words = " + ".join("·".join(str(d_) for d_ in dims) for dims in self.params.values())
        numbers = " + ".join("·".join(str(v_) for v_ in shapes[k]) for k in self.params)
        listed = ", ".join(f"{k} {shape_text(*shapes[k])}" for k in self.params)
        return [f"parameters ({listed}): {words} = {numbers} = {ld.param_count}"]

    def to_config(self) -> dict:
        cfg = {"type": "formula", "formula": self.formula, "units": self.units,
               "params": {k: list(d_) for k, d_ in self.params.items()}, **self.activation.layer_config()}
        if self.init_rules:
            cfg["init"] = dict(self.init_rules)
        if self.decay != tuple(k for k, d_ in self.params.items() if len(d_) >= 2):
            cfg["decay"] = list(self.decay)
        return cfg

    def __repr__(self) -> str:
        return (f"Layer({self.formula!r}, units={self.units}, params={ {k: d_ for k, d_ in self.params.items()} }, "
                f"activation={self.activation.describe()!r})")
