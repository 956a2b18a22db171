"""PyTorch weights, both ways: a symbp :class:`~symbp.Model` in, an ``nn.Sequential`` with the
same weights out (:func:`to_torch`); an ``nn.Sequential`` in, a compiled symbp model with its
weights out (:func:`from_torch`).

symbp already lays parameters out as PyTorch does (Dense ``W`` (out, in) as ``Linear.weight``,
Conv2D ``W`` (K, C, kh, kw) as ``Conv2d.weight``), so weights are copied, never transposed.
The layer maps are registries keyed by layer type (``to_config()["type"]``) one way and by
module class the other way.  A custom activation becomes ``FormulaActivation`` (see
:func:`modules`), which evaluates the activation's SymPy expression with torch functions by
the rules of :func:`_torch_rules` (one entry per SymPy class, as a SymPy printer has one
``_print_X`` per class); the expressions it reads are the ones symbp parsed itself, never text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # SymPy is imported where a formula is made, not with symbp
    import sympy as sp

INSTALL_HINT = 'pip install torch (see pytorch.org for the build that fits your machine)'


def _torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"converting to or from PyTorch needs the torch package: {INSTALL_HINT}") from err
    return torch


# -- SymPy formula -> torch ------------------------------------------------------------------

@functools.cache
def _torch_rules() -> dict[type, Callable]:
    """SymPy class → function of the evaluated arguments (tensors), as torch computes it."""
    import sympy as sp

    from ..spec import ops

    torch = _torch()
    F = torch.nn.functional

    def fold(fn):
        return lambda *args: _reduce(fn, args)

    def power(base, e):
        # sqrt as sqrt (correctly rounded, as the kernels' math.sqrt), not exp(½·log x)
        return torch.sqrt(base) if e.ndim == 0 and float(e) == 0.5 else torch.pow(base, e)

    return {
        sp.Add: fold(torch.add), sp.Mul: fold(torch.mul), sp.Pow: power,
        sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.sinh: torch.sinh, sp.cosh: torch.cosh,
        sp.sin: torch.sin, sp.cos: torch.cos, sp.tan: torch.tan, sp.atan: torch.atan, sp.asinh: torch.asinh,
        sp.erf: torch.erf, sp.Abs: torch.abs, sp.sign: torch.sign,
        sp.Max: fold(torch.maximum), sp.Min: fold(torch.minimum),
        ops.sigmoid: torch.sigmoid, ops.softplus: F.softplus, ops.relu: torch.relu,
        ops.leaky_relu: lambda x, s: torch.where(x > 0, x, s * x),
        ops.elu: lambda x, a: torch.where(x > 0, x, a * torch.expm1(x)),
        sp.Heaviside: lambda x, at0=None: torch.heaviside(x, 0.5 * torch.ones_like(x) if at0 is None else at0),
        sp.StrictGreaterThan: torch.gt, sp.StrictLessThan: torch.lt, sp.GreaterThan: torch.ge,
        sp.LessThan: torch.le, sp.Equality: torch.eq, sp.Unequality: torch.ne,
        sp.And: fold(torch.logical_and), sp.Or: fold(torch.logical_or), sp.Not: torch.logical_not,
    }


def _reduce(fn, args):
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out


def _evaluate(expr: sp.Basic, x, rules: dict, memo: dict):
    """``expr`` evaluated at z = ``x`` (a tensor), by the rule of each node's SymPy class."""
    import sympy as sp

    from ..spec.activations import z as Z
    from ..spec.formula import constant_value

    if expr in memo:
        return memo[expr]
    torch = _torch()
    if expr == Z:
        out = x
    elif isinstance(expr, sp.Expr) and expr.is_number:
        out = torch.tensor(constant_value(expr).real, dtype=x.dtype, device=x.device)
    elif isinstance(expr, sp.Piecewise):  # the first true condition wins: a where-chain from the back
        out = _evaluate(expr.args[-1].expr, x, rules, memo)
        for value, cond in reversed(expr.args[:-1]):
            out = torch.where(_evaluate(cond, x, rules, memo), _evaluate(value, x, rules, memo), out)
    else:
        rule = next((rules[c] for c in type(expr).__mro__ if c in rules), None)
        if rule is None:
            raise ValueError(f"the SymPy function {type(expr).__name__} (in {expr}) has no torch rule")
        out = rule(*(_evaluate(a, x, rules, memo) for a in expr.args))
    memo[expr] = out
    return out


def _check_formula(expr: sp.Basic, rules: dict, what: str) -> None:
    """Refuse, when the module is built, a formula some node of which has no torch rule."""
    import sympy as sp

    from ..spec.activations import z as Z

    for node in sp.preorder_traversal(expr):
        if node == Z or (isinstance(node, sp.Expr) and node.is_number) or node in (sp.true, sp.false):
            continue
        if isinstance(node, (sp.Piecewise, sp.functions.elementary.piecewise.ExprCondPair)):
            continue  # evaluated by _evaluate itself
        if not any(c in rules for c in type(node).__mro__):
            raise ValueError(f"{what}: the SymPy function {type(node).__name__} (in {expr}) has no torch equivalent")


@functools.cache
def modules():
    """symbp's own torch modules, ``(FormulaActivation, Maxout)``: classes made once, on first
    use, so that symbp imports without torch; they are attributes of this module from then on
    (and on demand, see ``__getattr__``), so ``torch.save`` of a whole module pickles them."""
    torch = _torch()

    class FormulaActivation(torch.nn.Module):
        """f(z) of a custom symbp activation, evaluated with torch functions.

        ``spec`` is the activation as it was declared (the formula text, which symbp's own
        parser reads again, or the SymPy expression); ``expr`` its SymPy expression in ``z``."""

        def __init__(self, activation) -> None:
            super().__init__()
            self.spec = activation.spec
            self.expr = activation.expr
            _check_formula(self.expr, _torch_rules(), f"activation {activation.describe()!r}")

        def forward(self, x):
            return _evaluate(self.expr, x, _torch_rules(), {})

        def extra_repr(self) -> str:
            return f"f(z) = {self.expr}"

    class Maxout(torch.nn.Module):
        """symbp's Maxout: ``linear`` gives (N, units·pieces), row ``i·pieces + e`` piece e of
        unit i, and each unit is the largest of its pieces."""

        def __init__(self, in_features: int, units: int, pieces: int) -> None:
            super().__init__()
            self.units, self.pieces = units, pieces
            self.linear = torch.nn.Linear(in_features, units * pieces)

        def forward(self, x):
            return self.linear(x).unflatten(-1, (self.units, self.pieces)).amax(-1)

        def extra_repr(self) -> str:
            return f"units={self.units}, pieces={self.pieces}"

    class Add(torch.nn.Module):
        """symbp's Add: the elementwise sum of a list of tensors (a residual join)."""

        def forward(self, xs):
            total = xs[0]
            for x in xs[1:]:
                total = total + x
            return total

    class Concat(torch.nn.Module):
        """symbp's Concat: a list of tensors side by side along dim 1 (features or channels)."""

        def forward(self, xs):
            return torch.cat(list(xs), 1)

    class Graph(torch.nn.Module):
        """A symbp graph network: ``nodes[l]`` runs on the outputs at positions ``sources[l]``
        (0: the input, m: node m's output); a merging node gets them as a list."""

        def __init__(self, nodes, sources, merges) -> None:
            super().__init__()
            self.nodes = torch.nn.ModuleList(nodes)
            self.sources = [tuple(src) for src in sources]
            self.merges = list(merges)

        def forward(self, x):
            outs = [x]
            for node, src, merge in zip(self.nodes, self.sources, self.merges):
                outs.append(node([outs[s] for s in src] if merge else outs[src[0]]))
            return outs[-1]

        def extra_repr(self) -> str:
            return "sources=" + ", ".join(f"{pos}←{src}" for pos, src in enumerate(self.sources, 1))

    for cls in (FormulaActivation, Maxout, Add, Concat, Graph):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    return FormulaActivation, Maxout, Add, Concat, Graph


def __getattr__(name: str):
    # Unpickling a saved module looks its class up here before anything called modules().
    names = ("FormulaActivation", "Maxout", "Add", "Concat", "Graph")
    if name in names:
        return dict(zip(names, modules()))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _activation_module(activation):
    """The torch module of a symbp activation; None for the identity."""
    nn = _torch().nn
    if activation is None or activation.is_identity:
        return None
    if activation.custom:
        return modules()[0](activation)
    build = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus,
             "leaky_relu": lambda slope: nn.LeakyReLU(slope), "elu": lambda alpha: nn.ELU(alpha)}[activation.name]
    return build(**activation.params)


# -- symbp -> torch ----------------------------------------------------------------------------

def _copy(param, value: np.ndarray) -> None:
    torch = _torch()
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def _dense_to(layer, in_shape, p, dtype):
    lin = _torch().nn.Linear(in_shape[0], layer.units, dtype=dtype)
    _copy(lin.weight, p["W"])
    _copy(lin.bias, p["b"])
    return lin


def _conv_to(layer, in_shape, p, dtype):
    conv = _torch().nn.Conv2d(in_shape[0], layer.filters, layer.kernel, layer.stride, layer.padding, dtype=dtype)
    _copy(conv.weight, p["W"])
    _copy(conv.bias, p["b"])
    return conv


def _maxout_to(layer, in_shape, p, dtype):
    mod = modules()[1](in_shape[0], layer.units, layer.pieces).to(dtype)
    _copy(mod.linear.weight, p["W"])
    _copy(mod.linear.bias, p["b"])
    return mod


def _layernorm_to(layer, in_shape, p, dtype):
    norm = _torch().nn.LayerNorm(in_shape[0], eps=layer.eps, dtype=dtype)
    _copy(norm.weight, p["g"])
    _copy(norm.bias, p["b"])
    return norm


def _batchnorm_to(layer, in_shape, p, dtype):
    nn = _torch().nn
    norm = (nn.BatchNorm1d if len(in_shape) == 1 else nn.BatchNorm2d)(in_shape[0], eps=layer.eps,
                                                                      momentum=layer.momentum, dtype=dtype)
    _copy(norm.weight, p["g"])
    _copy(norm.bias, p["b"])
    _copy(norm.running_mean, p["rmean"])
    _copy(norm.running_var, p["rvar"])
    return norm


#: Layer type → ``(layer, input shape, its params by key, torch dtype) → nn.Module``.  The
#: module is made in the model's dtype before the weights are copied in: never rounded.
TO_TORCH: dict[str, Callable] = {
    "dense": _dense_to,
    "conv2d": _conv_to,
    "maxpool2d": lambda layer, s, p, dtype: _torch().nn.MaxPool2d(layer.size, layer.stride),
    "avgpool2d": lambda layer, s, p, dtype: _torch().nn.AvgPool2d(layer.size, layer.stride),
    "flatten": lambda layer, s, p, dtype: _torch().nn.Flatten(),
    "maxout": _maxout_to,
    "layernorm": _layernorm_to,
    "batchnorm": _batchnorm_to,
    "dropout": lambda layer, s, p, dtype: _torch().nn.Dropout(layer.p),
    "add": lambda layer, s, p, dtype: modules()[2](),
    "concat": lambda layer, s, p, dtype: modules()[3](),
}


def to_torch(model):
    """An ``nn.Sequential`` computing ``model.decision_function``, with copies of its weights,
    in its dtype (a graph network: symbp's ``Graph`` module, one ``nn.Sequential`` per layer).
    It reads ``X`` shaped ``(N, *input_shape)`` ((N, C, H, W) for images)."""
    torch = _torch()
    net = model.network
    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[np.dtype(model.dtype)]
    nodes = []
    for pos, layer in enumerate(net.layers, 1):
        kind = layer.to_config()["type"]
        if kind not in TO_TORCH:
            raise ValueError(f"layer {pos} ({layer!r}): no PyTorch module for layer type {kind!r} "
                             f"(known: {', '.join(TO_TORCH)})")
        in_shape = net.in_shape(pos)
        p = {key: np.asarray(model.params[f"{key}{pos}"]) for key in layer.param_shapes(in_shape)}
        act = _activation_module(getattr(layer, "activation", None))
        nodes.append([TO_TORCH[kind](layer, in_shape, p, dtype)] + ([act] if act is not None else []))
    if net.is_graph:
        return modules()[4]([torch.nn.Sequential(*mods) for mods in nodes], net.sources,
                            [layer.merges for layer in net.layers]).eval()
    return torch.nn.Sequential(*[mod for mods in nodes for mod in mods]).eval()


# -- torch -> symbp ----------------------------------------------------------------------------

def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _needs(mod, what: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{mod}: symbp has no {what}")


def _from_linear(mod, sb):
    _needs(mod, "Dense without a bias (bias=False)", mod.bias is not None)
    return sb.Dense(mod.out_features), {"W": mod.weight, "b": mod.bias}


def _from_conv(mod, sb):
    _needs(mod, "Conv2D without a bias (bias=False)", mod.bias is not None)
    _needs(mod, "dilated convolution (dilation ≠ 1)", _pair(mod.dilation) == (1, 1))
    _needs(mod, "grouped convolution (groups ≠ 1)", mod.groups == 1)
    _needs(mod, f"padding_mode={mod.padding_mode!r} (only zeros)", mod.padding_mode == "zeros")
    padding = mod.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        _needs(mod, "padding='same' with an even kernel", all(k % 2 for k in _pair(mod.kernel_size)))
        padding = tuple(k // 2 for k in _pair(mod.kernel_size))
    # exact=False: PyTorch drops the rows a stride leaves over, where symbp's default refuses them.
    layer = sb.Conv2D(mod.out_channels, _pair(mod.kernel_size), _pair(mod.stride), _pair(padding), exact=False)
    return layer, {"W": mod.weight, "b": mod.bias}


def _from_pool(kind: str):
    def convert(mod, sb):
        _needs(mod, "padded pooling (padding ≠ 0)", _pair(mod.padding) == (0, 0))
        _needs(mod, "ceil_mode=True pooling", not mod.ceil_mode)
        if kind == "MaxPool2D":
            _needs(mod, "dilated pooling (dilation ≠ 1)", _pair(mod.dilation) == (1, 1))
            _needs(mod, "pooling with return_indices=True", not mod.return_indices)
        else:
            _needs(mod, "divisor_override", mod.divisor_override is None)
        stride = mod.stride if mod.stride is not None else mod.kernel_size
        return getattr(sb, kind)(_pair(mod.kernel_size), stride=_pair(stride)), {}
    return convert


def _from_flatten(mod, sb):
    _needs(mod, f"Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}) (only the default 1, -1)",
           (mod.start_dim, mod.end_dim) == (1, -1))
    return sb.Flatten(), {}


def _from_maxout(mod, sb):
    return sb.Maxout(mod.units, mod.pieces), {"W": mod.linear.weight, "b": mod.linear.bias}


def _from_layernorm(mod, sb):
    _needs(mod, "LayerNorm over more than the last dimension", len(mod.normalized_shape) == 1)
    _needs(mod, "LayerNorm without its affine parameters (elementwise_affine=False)", mod.weight is not None)
    _needs(mod, "LayerNorm without a bias (bias=False)", mod.bias is not None)
    return sb.LayerNorm(eps=float(mod.eps)), {"g": mod.weight, "b": mod.bias}


def _from_batchnorm(mod, sb):
    _needs(mod, "BatchNorm without its affine parameters (affine=False)", mod.affine)
    _needs(mod, "BatchNorm without running statistics (track_running_stats=False)", mod.track_running_stats)
    _needs(mod, "BatchNorm with a cumulative average (momentum=None)", mod.momentum is not None)
    return sb.BatchNorm(momentum=float(mod.momentum), eps=float(mod.eps)), {
        "g": mod.weight, "b": mod.bias, "rmean": mod.running_mean, "rvar": mod.running_var}


def _from_softplus(mod):
    _needs(mod, "Softplus with beta ≠ 1", mod.beta == 1)
    return "softplus", {}


#: Activation module class name → ``module → (symbp activation name, its parameters)``.
ACTIVATIONS_FROM: dict[str, Callable] = {
    "ReLU": lambda m: ("relu", {}), "Tanh": lambda m: ("tanh", {}), "Sigmoid": lambda m: ("sigmoid", {}),
    "LeakyReLU": lambda m: ("leaky_relu", {"slope": float(m.negative_slope)}),
    "ELU": lambda m: ("elu", {"alpha": float(m.alpha)}), "Softplus": _from_softplus,
}


def _layers_from(torch):
    nn = torch.nn
    return {nn.Linear: _from_linear, nn.Conv2d: _from_conv, nn.MaxPool2d: _from_pool("MaxPool2D"),
            nn.AvgPool2d: _from_pool("AvgPool2D"), nn.Flatten: _from_flatten, nn.LayerNorm: _from_layernorm,
            nn.BatchNorm1d: _from_batchnorm, nn.BatchNorm2d: _from_batchnorm,
            nn.Dropout: lambda mod, sb: (sb.Dropout(float(mod.p)), {})}


def _with_activation(layer, name: str, params: dict):
    """``layer`` (a Dense or Conv2D) rebuilt with activation ``name``."""
    cfg = layer.to_config()
    cfg.pop("type")
    return type(layer).from_config({**cfg, "activation": name, "activation_params": params}, "from_torch")


def _monotone(name, params: dict) -> bool:
    """Whether f is a built-in non-decreasing activation: then max(f(x)) = f(max(x)), and f
    may move before a max pool."""
    return (name in ("relu", "tanh", "sigmoid", "softplus", "leaky_relu", "elu")
            and params.get("slope", 0) >= 0 and params.get("alpha", 0) >= 0)


def from_torch(module, inputs=None, loss: str = "softmax_cross_entropy", l2: float = 0.0, name: str | None = None,
               dtype: str = "float32", cache_dir=None):
    """A compiled symbp :class:`~symbp.Model` computing the ``nn.Sequential`` ``module``, with its weights.

    Parameters
    ----------
    module : torch.nn.Sequential
        Of ``Linear``, ``Conv2d``, ``MaxPool2d``, ``AvgPool2d``, ``Flatten`` (and the Maxout that
        :meth:`Model.to_torch` writes); ``ReLU``, ``Tanh``, ``Sigmoid``, ``LeakyReLU``, ``ELU``,
        ``Softplus`` after a ``Linear`` or ``Conv2d`` become that layer's activation (after a
        ``MaxPool2d`` too, moved before it: the same function), ``Identity`` is dropped.
        Any other module is an error naming it.
    inputs : int or (C, H, W), optional
        One sample's shape; by default the first ``Linear``'s ``in_features``.
    loss, l2, name, dtype, cache_dir
        As for :class:`~symbp.Network` and :func:`~symbp.compile`.
    """
    torch = _torch()
    import symbp as sb

    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(f"from_torch takes a torch.nn.Sequential, got {type(module).__name__}")
    converters = _layers_from(torch)
    layers, weights = [], []
    for pos, mod in enumerate(_flat(module), 1):
        kind = type(mod).__name__
        where = f"module {pos} ({mod})"
        if isinstance(mod, torch.nn.Identity):
            continue
        formula, maxout = modules()[:2]
        if kind in ACTIVATIONS_FROM or isinstance(mod, formula):
            act, params = (mod.spec, {}) if isinstance(mod, formula) else ACTIVATIONS_FROM[kind](mod)
            target = len(layers) - 1
            if target >= 1 and layers[target].selects_inputs and _monotone(act, params):
                target -= 1  # f(maxpool(x)) = maxpool(f(x)) for a non-decreasing f
            if target < 0 or "activation" not in type(layers[target]).config_keys:
                before = "nothing" if not layers else repr(layers[-1])
                raise ValueError(f"{where}: an activation must follow a Linear or Conv2d (symbp puts it on that "
                                 f"layer); here it follows {before}")
            if not layers[target].activation.is_identity:
                raise ValueError(f"{where}: {layers[target]!r} already has an activation; symbp layers take one each")
            layers[target] = _with_activation(layers[target], act, params)
            continue
        convert = next((fn for cls, fn in converters.items() if type(mod) is cls), None)
        if isinstance(mod, maxout):
            convert = _from_maxout
        if convert is None:
            known = ", ".join([c.__name__ for c in converters] + list(ACTIVATIONS_FROM)
                              + ["Identity", "and symbp's Maxout and FormulaActivation"])
            raise ValueError(f"{where}: symbp has no layer for torch.nn.{kind} (supported: {known})")
        try:
            layer, params = convert(mod, sb)
        except ValueError as err:
            raise ValueError(f"module {pos}: {err}") from None
        layers.append(layer)
        weights.append(params)
    if not layers:
        raise ValueError("from_torch: the Sequential holds no layer symbp can build")
    if inputs is None:
        first = next(iter(_flat(module)), None)
        if not isinstance(first, torch.nn.Linear):
            raise ValueError("from_torch needs inputs=(C, H, W) (one sample's shape) when the first module is not "
                             "a Linear")
        inputs = first.in_features
    net = sb.Network(inputs, _exact_where_whole(layers, inputs), loss=loss, l2=l2, name=name)
    shapes = net.param_shapes()
    arrays = {}
    for pos, params in enumerate(weights, 1):
        for key, tensor in params.items():
            value = tensor.detach().cpu().numpy()
            if value.shape != shapes[f"{key}{pos}"]:
                raise ValueError(f"layer {pos} ({net.layers[pos - 1]!r}): the torch weight has shape {value.shape}, "
                                 f"the network needs {shapes[f'{key}{pos}']} (inputs={inputs!r})")
            arrays[f"{key}{pos}"] = value
    model = sb.compile(net, dtype=dtype, seed=0, cache_dir=cache_dir)  # only once the weights fit
    model.params = {name: np.ascontiguousarray(value, dtype=model.dtype) for name, value in arrays.items()}
    return model


def _exact_where_whole(layers: list, inputs) -> list:
    """Each Conv2D with ``exact=True`` (symbp's default) where its stride leaves no row or
    column over for this input; ``exact=False`` (PyTorch's rule: drop them) only where it does."""
    shape = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    out = []
    for layer in layers:
        if getattr(layer, "exact", True) is False and len(shape) == 3:
            whole = all((size - F + 2 * P) % S == 0 for size, F, S, P in
                        zip(shape[1:], layer.kernel, layer.stride, layer.padding))
            if whole:
                cfg = layer.to_config()
                cfg.pop("type")
                cfg.pop("exact")
                layer = type(layer).from_config(cfg, "from_torch")
        try:
            shape = tuple(layer.output_shape(shape))
        except ValueError:
            shape = ()  # the Network names the problem, with the layer's position
        out.append(layer)
    return out


def _flat(module):
    """The modules of a Sequential, nested Sequentials opened."""
    torch = _torch()
    for mod in module:
        if isinstance(mod, torch.nn.Sequential):
            yield from _flat(mod)
        else:
            yield mod
