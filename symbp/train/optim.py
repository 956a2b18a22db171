"""Optimizers: update rules written as SymPy formulas, fused into the generated backward pass.

Each optimizer says, for one parameter entry θ with gradient g, how its state and θ change,
as an ordered list of ``(target, formula)`` statements.  ``torch.optim``'s definitions and
defaults are followed exactly, so a user switching over gets the same trajectory:

==========  ================================================================================
SGD         g ← g + wd·θ;  b ← μ·b + g;  g ← g + μ·b (nesterov) or b;  θ ← θ − lr·g
Adagrad     s ← s + g²;  θ ← θ − lr/(1 + (t−1)·lr_decay) · g/(√s + ε)
RMSprop     v ← α·v + (1−α)·g²;  (centered: ḡ ← α·ḡ + (1−α)·g, v − ḡ²);  θ ← θ − lr·g/(√· + ε)
Adam        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)
AdamW       θ ← θ(1 − lr·wd), then Adam without weight decay in g
==========  ================================================================================

Hyper-parameters are runtime numbers (a schedule may change ``lr`` between epochs); the
choices that change the formulas (momentum or not, nesterov, amsgrad, centered) decide the
generated code.  State lives in NumPy arrays, ``optimizer.state[param][name]``.
"""

from __future__ import annotations

import functools
import keyword
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp


@functools.cache
def _update_symbols():
    """θ, g and t (the step number, 1 for the first update): the symbols of every update rule
    (SymPy is imported when a formula is first needed, not with symbp)."""
    import sympy as sp

    return sp.Symbol("theta", real=True), sp.Symbol("g", real=True), sp.Symbol("t", positive=True, integer=True)


def __getattr__(name: str):
    """``theta_s``, ``g_s`` and ``t_s`` (see :func:`_update_symbols`), made on first use."""
    if name in ("theta_s", "g_s", "t_s"):
        return _update_symbols()[("theta_s", "g_s", "t_s").index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, owner="optimizer") -> float:
    """A validated hyper-parameter; the error names the owner, the parameter and the value."""
    name = "learning rate lr" if name == "lr" else name
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{owner}: {name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{owner}: {name} must be {'<' if high_open else '<='} {high:g}, got {value:g}")
    return value


def _flag(name: str, value, owner: str) -> bool:
    """A validated on/off option: only a real boolean (``bool`` or ``numpy.bool_``).

    ``bool("false")`` is True, so a string (from a TOML file, a form, a command line) or a
    number is refused rather than read as "on"; the error names the owner and the option.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be true or false, got {value!r}")
    return bool(value)


# Names the generated update code uses itself: hyper-parameter k is the local ``h_k`` and
# state s of parameter W1 the array ``s_W1`` (parameters are a letter and a layer number).
_PARAM_NAME = re.compile(r"[A-Za-z]+[0-9]+")


def _check_names(state: Mapping, hyper: Mapping, owner: str) -> None:
    """Refuse state and hyper-parameter names that formulas cannot name or that collide in
    the generated code: non-strings, non-identifiers, keywords, the reserved theta/g/t,
    a name used twice, names equal after NFKC normalisation (Python reads ``ｍ`` as ``m``,
    in the formulas and in the generated code alike), and a state ``h`` beside a
    hyper-parameter named like a parameter (both ``h_W1``)."""
    reserved = {"theta", "g", "t"}
    named = [(kind, key) for kind, names in (("state", state), ("hyper-parameter", hyper)) for key in names]
    for _, key in named:
        why = ("it is not a Python identifier" if not isinstance(key, str) or not key.isidentifier() else
               "it is a Python keyword" if keyword.iskeyword(key) else
               "reserved: theta, g and t are the update's own" if key in reserved else None)
        if why:
            raise ValueError(f"{owner}: {key!r} cannot be a state or hyper-parameter name ({why})")
    seen: dict[str, tuple[str, str]] = {}  # NFKC form -> (kind, name as given)
    for kind, key in named:  # first every pair of colliding names, each named ...
        normal = unicodedata.normalize("NFKC", key)
        if normal in seen:
            other_kind, other = seen[normal]
            same = "the same name" if other == key else \
                f"the same name {normal!r} as Python reads them (Unicode NFKC normalisation)"
            raise ValueError(f"{owner}: {other_kind} name {other!r} and {kind} name {key!r} are {same}; rename one")
        seen[normal] = (kind, key)
    for kind, key in named:  # ... then a lone name that formulas could not spell
        normal = unicodedata.normalize("NFKC", key)
        if normal != key:
            raise ValueError(f"{owner}: {kind} name {key!r} reads as {normal!r} in Python "
                             f"(Unicode NFKC normalisation): write {normal!r}")
    if "h" in state:
        clash = next((k for k in hyper if _PARAM_NAME.fullmatch(k)), None)
        if clash is not None:
            raise ValueError(f"{owner}: state name 'h' and hyper-parameter name {clash!r} would both be named "
                             f"h_{clash} in the generated code; rename one")


class Optimizer:
    """Base class; subclasses fill ``hyper``, ``state_names`` and :meth:`rules`.

    Attributes
    ----------
    hyper : dict of str to float
        Runtime hyper-parameters, in the order the kernels receive them.
    state : dict of str to dict of str to numpy.ndarray
        Per-parameter state, created on the first :meth:`symbp.Model.fit`.
    step : int
        Updates applied so far (``t`` in the formulas is ``step + 1`` during an update).
    """

    name = "optimizer"
    state_names: tuple[str, ...] = ()

    def __init__(self, **hyper: float) -> None:
        self.hyper = dict(hyper)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.step = 0

    # -- the formulas --------------------------------------------------------------------
    def symbols(self) -> dict[str, sp.Symbol]:
        import sympy as sp

        return {k: sp.Symbol(k, real=True) for k in self.hyper}

    def rules(self, theta: sp.Expr, g: sp.Expr, state: Mapping[str, sp.Expr], h: Mapping[str, sp.Symbol], t: sp.Expr) -> list:
        """Ordered ``(target, formula)`` statements updating ``state`` entries and ``theta``.

        A target that is a plain :class:`sympy.Symbol` is a named intermediate (not stored).
        """
        raise NotImplementedError

    def structure(self) -> dict:
        """The choices that change the generated code (not the numbers)."""
        return {}

    def state_init(self, name: str) -> float:
        return 0.0

    def key(self) -> str:
        """Identifies the generated update code: the optimizer kind and its structure."""
        parts = [self.name] + [f"{k}={v}" for k, v in sorted(self.structure().items())]
        return "-".join(str(p) for p in parts)

    def formulas(self) -> list:
        """The update statements for a generic parameter θ with gradient g (for reading)."""
        import sympy as sp

        state = {s: sp.Symbol(s, real=True) for s in self.state_names}
        theta_s, g_s, t_s = _update_symbols()
        return self.rules(theta_s, g_s, state, self.symbols(), t_s)

    # -- configuration -------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyper["lr"] = _number("lr", value, low=0, low_open=True, owner=self.name)

    def options(self) -> dict:
        """Constructor arguments other than the hyper-parameters (for checkpoints)."""
        return {}

    def to_config(self) -> dict:
        return {"name": self.name, "hyper": dict(self.hyper), "options": self.options()}

    def describe(self) -> str:
        """A short label: the kind and the settings that differ from its defaults."""
        try:
            defaults = type(self)()
        except (TypeError, ValueError):
            defaults = None
        changed = [f"{k}={v:g}" for k, v in self.hyper.items() if defaults is None or defaults.hyper.get(k) != v]
        changed += [f"{k}={v}" for k, v in self.options().items() if defaults is None or defaults.options().get(k) != v]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.hyper.items())
        flags = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args}{', ' + flags if flags else ''})"


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` (dampening 0).

    Parameters
    ----------
    lr : float
        Learning rate, > 0 (1e-3 by default, as in torch.optim.SGD).
    momentum : float
        Heavy-ball momentum μ in [0, 1); 0 keeps no state.
    nesterov : bool
        Nesterov momentum (needs momentum > 0).
    weight_decay : float
        Adds wd·θ to the gradient.
    """

    name = "sgd"

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(
            lr=_number("lr", lr, low=0, low_open=True, owner="SGD"),
            momentum=_number("momentum", momentum, low=0, high=1, high_open=True, owner="SGD"),
            weight_decay=_number("weight_decay", weight_decay, low=0, owner="SGD"),
        )
        self.nesterov = _flag("nesterov", nesterov, "SGD")
        if self.nesterov and self.hyper["momentum"] == 0:
            raise ValueError("SGD: nesterov momentum needs momentum > 0")
        self.state_names = ("momentum_buffer",) if self.hyper["momentum"] else ()

    def options(self) -> dict:
        return {"nesterov": self.nesterov}

    def structure(self) -> dict:
        return {"momentum": bool(self.hyper["momentum"]), "nesterov": self.nesterov,
                "weight_decay": bool(self.hyper["weight_decay"])}

    def rules(self, theta, g, state, h, t):
        out = []
        if self.hyper["weight_decay"]:
            g = g + h["weight_decay"] * theta
        if self.hyper["momentum"]:
            buf = state["momentum_buffer"]
            out.append((buf, h["momentum"] * buf + g))
            g = g + h["momentum"] * buf if self.nesterov else buf
        out.append((theta, theta - h["lr"] * g))
        return out


class Adagrad(Optimizer):
    """Adagrad, as ``torch.optim.Adagrad``."""

    name = "adagrad"
    state_names = ("sum",)

    def __init__(self, lr: float = 0.01, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        super().__init__(
            lr=_number("lr", lr, low=0, low_open=True, owner="Adagrad"),
            lr_decay=_number("lr_decay", lr_decay, low=0, owner="Adagrad"),
            weight_decay=_number("weight_decay", weight_decay, low=0, owner="Adagrad"),
            eps=_number("eps", eps, low=0, owner="Adagrad"),
        )
        self.initial_accumulator_value = _number("initial_accumulator_value", initial_accumulator_value, low=0,
                                                 owner="Adagrad")

    def structure(self) -> dict:
        return {"weight_decay": bool(self.hyper["weight_decay"])}

    def state_init(self, name: str) -> float:
        return self.initial_accumulator_value

    def options(self) -> dict:
        return {"initial_accumulator_value": self.initial_accumulator_value}

    def rules(self, theta, g, state, h, t):
        import sympy as sp

        if self.hyper["weight_decay"]:
            g = g + h["weight_decay"] * theta
        s = state["sum"]
        clr = h["lr"] / (1 + (t - 1) * h["lr_decay"])
        return [(s, s + g**2), (theta, theta - clr * g / (sp.sqrt(s) + h["eps"]))]


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop``."""

    name = "rmsprop"

    def __init__(self, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False) -> None:
        super().__init__(
            lr=_number("lr", lr, low=0, low_open=True, owner="RMSprop"),
            alpha=_number("alpha", alpha, low=0, high=1, owner="RMSprop"),
            eps=_number("eps", eps, low=0, owner="RMSprop"),
            weight_decay=_number("weight_decay", weight_decay, low=0, owner="RMSprop"),
            momentum=_number("momentum", momentum, low=0, high=1, high_open=True, owner="RMSprop"),
        )
        self.centered = _flag("centered", centered, "RMSprop")
        self.state_names = ("square_avg",) + (("grad_avg",) if self.centered else ()) + (
            ("momentum_buffer",) if self.hyper["momentum"] else ())

    def options(self) -> dict:
        return {"centered": self.centered}

    def structure(self) -> dict:
        return {"centered": self.centered, "momentum": bool(self.hyper["momentum"]),
                "weight_decay": bool(self.hyper["weight_decay"])}

    def rules(self, theta, g, state, h, t):
        import sympy as sp

        if self.hyper["weight_decay"]:
            g = g + h["weight_decay"] * theta
        a = h["alpha"]
        v = state["square_avg"]
        out = [(v, a * v + (1 - a) * g**2)]
        if self.centered:
            gbar = state["grad_avg"]
            out.append((gbar, a * gbar + (1 - a) * g))
            avg = sp.sqrt(v - gbar**2) + h["eps"]
        else:
            avg = sp.sqrt(v) + h["eps"]
        if self.hyper["momentum"]:
            buf = state["momentum_buffer"]
            out += [(buf, h["momentum"] * buf + g / avg), (theta, theta - h["lr"] * buf)]
        else:
            out.append((theta, theta - h["lr"] * g / avg))
        return out


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (weight decay added to the gradient)."""

    name = "adam"
    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, beta1: float | None = None,
                 beta2: float | None = None) -> None:
        owner = type(self).__name__
        if beta1 is not None or beta2 is not None:  # the flat form a checkpoint stores
            betas = (beta1 if beta1 is not None else betas[0], beta2 if beta2 is not None else betas[1])
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        super().__init__(
            lr=_number("lr", lr, low=0, low_open=True, owner=owner),
            beta1=_number("beta1", betas[0], low=0, high=1, high_open=True, owner=owner),
            beta2=_number("beta2", betas[1], low=0, high=1, high_open=True, owner=owner),
            eps=_number("eps", eps, low=0, owner=owner),
            weight_decay=_number("weight_decay", weight_decay, low=0, owner=owner),
        )
        self.amsgrad = _flag("amsgrad", amsgrad, owner)
        self.state_names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def options(self) -> dict:
        return {"amsgrad": self.amsgrad}

    def structure(self) -> dict:
        return {"amsgrad": self.amsgrad, "weight_decay": bool(self.hyper["weight_decay"])}

    def rules(self, theta, g, state, h, t):
        import sympy as sp

        out = []
        if self.hyper["weight_decay"]:
            if self.decoupled:
                decayed = sp.Symbol("theta_decayed", real=True)
                out.append((decayed, theta * (1 - h["lr"] * h["weight_decay"])))
                theta_read = decayed
            else:
                g = g + h["weight_decay"] * theta
                theta_read = theta
        else:
            theta_read = theta
        b1, b2 = h["beta1"], h["beta2"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        out += [(m, b1 * m + (1 - b1) * g), (v, b2 * v + (1 - b2) * g**2)]
        v_used = v
        if self.amsgrad:
            vmax = state["max_exp_avg_sq"]
            out.append((vmax, sp.Max(vmax, v)))
            v_used = vmax
        step_size = h["lr"] / (1 - b1**t)
        denom = sp.sqrt(v_used) / sp.sqrt(1 - b2**t) + h["eps"]
        out.append((theta, theta_read - step_size * m / denom))
        return out


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: decoupled weight decay θ ← θ(1 − lr·wd) first."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, beta1: float | None = None,
                 beta2: float | None = None) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad, beta1, beta2)


class FormulaOptimizer(Optimizer):
    """An optimizer defined by formulas, compiled like the built-ins.

    Parameters
    ----------
    update : str or sympy.Expr
        The new θ, in ``theta``, ``g`` (the gradient), ``t`` (the step, from 1), the state
        names and the hyper-parameter names.
    state : dict of str to str or (str, float)
        Each state's new value (same variables), optionally with its initial value; updated
        in the given order before θ.
    name : str
        Used in the generated module's name.
    **hyper : float
        Hyper-parameters, e.g. ``lr=0.1``.

    Examples
    --------
    Heavy-ball momentum written by hand:

    >>> opt = FormulaOptimizer("theta - lr*m", state={"m": "beta*m + g"}, lr=0.1, beta=0.9)
    """

    def describe(self) -> str:
        return f"{self.name[len('formula-'):]}({', '.join(f'{k}={v:g}' for k, v in self.hyper.items())})"

    def __init__(self, update, state: Mapping | None = None, name: str = "custom", **hyper: float) -> None:
        import sympy as sp

        if "lr" not in hyper:
            raise ValueError("a formula optimizer needs an 'lr' hyper-parameter")
        state = dict(state or {})
        owner = f"optimizer {name!r}"
        _check_names(state, hyper, owner)
        # lr > 0 as for the built-ins (and as the lr setter a schedule uses demands).
        super().__init__(**{k: _number(k, v, low=0, low_open=True, owner=owner) if k == "lr" else
                            _number(k, v, owner=owner) for k, v in hyper.items()})
        self.name = "formula-" + "".join(c if c.isalnum() else "-" for c in str(name))
        self.state_names = tuple(state)
        self._init = {}
        theta_s, g_s, t_s = _update_symbols()
        variables = {"theta": theta_s, "g": g_s, "t": t_s, **self.symbols(),
                     **{s: sp.Symbol(s, real=True) for s in state}}
        self._state_exprs = {}
        for key, spec in state.items():
            text, init = (spec if isinstance(spec, tuple) else (spec, 0.0))
            self._init[key] = _number(f"initial {key}", init, owner=f"optimizer {name!r}")
            self._state_exprs[key] = self._parse(text, variables, f"state {key!r}")
        self._update = self._parse(update, variables, "update")
        self._source = {"update": str(update), "state": {k: [str(v[0] if isinstance(v, tuple) else v), self._init[k]]
                                                        for k, v in state.items()}}

    @staticmethod
    def _parse(text, variables, what):
        import sympy as sp

        from ..spec.formula import FormulaError, constant_problem, parse_formula

        if isinstance(text, sp.Expr):
            unknown = sorted(str(s) for s in text.free_symbols if str(s) not in variables)
            if unknown:
                raise ValueError(f"optimizer {what} {text}: unknown symbol {unknown[0]!r}")
            problem = constant_problem(text)
            if problem:
                raise FormulaError(f"optimizer {what} {text}: {problem}")
            return text.subs({s: variables[str(s)] for s in text.free_symbols})
        return parse_formula(text, variables, what=f"optimizer {what}")

    def state_init(self, name: str) -> float:
        return self._init[name]

    def structure(self) -> dict:
        # The formulas themselves decide the code: hash them into the key.
        import hashlib

        return {"formulas": hashlib.sha256(repr(self._source).encode()).hexdigest()[:10]}

    def rules(self, theta, g, state, h, t):
        import sympy as sp

        theta_s, g_s, t_s = _update_symbols()
        subs = {theta_s: theta, g_s: g, t_s: t, **{sp.Symbol(k, real=True): v for k, v in h.items()}}
        subs.update({sp.Symbol(k, real=True): v for k, v in state.items()})
        out = [(state[k], e.xreplace(subs)) for k, e in self._state_exprs.items()]
        return out + [(theta, self._update.xreplace(subs))]

    def to_config(self) -> dict:
        return {"name": "formula", "hyper": dict(self.hyper),
                "options": {"title": self.name[len("formula-"):], **self._source}}


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "rmsprop": RMSprop, "adam": Adam, "adamw": AdamW}


def optimizer_from_config(cfg: Mapping) -> Optimizer:
    """Rebuild an optimizer saved by :meth:`Optimizer.to_config` (checkpoints)."""
    try:
        name, hyper, options = cfg["name"], dict(cfg["hyper"]), dict(cfg["options"])
    except (KeyError, TypeError):
        raise ValueError(f"malformed optimizer entry {cfg!r}") from None
    if name == "formula":
        state = {k: (v[0], v[1]) for k, v in options["state"].items()}
        return FormulaOptimizer(options["update"], state=state, name=options["title"], **hyper)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)}, formula)")
    return OPTIMIZERS[name](**hyper, **options)
