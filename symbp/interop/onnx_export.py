"""ONNX export: a compiled :class:`~symbp.Model` in, an ONNX model (a file) out.

The graph reads ``X`` of shape ``(N, *input_shape)`` (N symbolic) and returns ``logits``
of shape ``(N, outputs)``, what :meth:`Model.decision_function` returns: no softmax or σ is
appended, as a PyTorch or Keras model exports its last layer.  Tensors are float32 (what
serving runtimes run; a float64 model's weights are rounded) unless ``dtype="float64"`` is
asked for, which is valid ONNX but not run everywhere (onnxruntime's CPU provider has no
float64 ``Conv``).  The parameters are initializers named as in ``model.params`` (``W1``, …).

Two registries, one entry per thing exported (add an entry, never touch the driver):

- ``LAYER_EXPORTERS``: a layer's ``to_config()["type"]`` → a function emitting its nodes;
- ``SYMPY_RULES``: a SymPy class → a function emitting ONNX nodes for an activation
  formula ``f(z)``.  Built-in activations are formulas too (``relu(z)``, ``leaky_relu(z, 1/100)``)
  and take the same path; each maps to its ONNX operator.  A SymPy function with no rule is
  an :class:`OnnxExportError` naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sympy as sp

from .._output import check_output_path, write_atomic
from ..spec import ops
from ..spec.activations import z as Z
from ..spec.formula import constant_value

#: The ONNX operator set the graph declares by default (and the oldest it can).
OPSET = 17
INSTALL_HINT = 'pip install "symbp[onnx]" (from a checkout: pip install -e ".[onnx]")'


class OnnxExportError(ValueError):
    """A model holds something ONNX cannot express; the message names it and where."""


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"exporting to ONNX needs the onnx package: {INSTALL_HINT}") from err
    return onnx


class GraphBuilder:
    """Nodes and initializers under construction; every name it hands out is unique."""

    def __init__(self, dtype: np.dtype, opset: int = OPSET) -> None:
        self.onnx = _onnx()
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._constants: dict[tuple, str] = {}
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        """Add ``op(inputs)`` with ``attrs``; returns the name of its (single) output."""
        out = self.fresh(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=f"{op}_{out}", **attrs))
        return out

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def constant(self, value: float) -> str:
        """A scalar in the graph's dtype (each value stored once)."""
        key = ("f", float(value))
        if key not in self._constants:
            self._constants[key] = self.initializer(self.fresh("c"), np.array(value, self.dtype))
        return self._constants[key]

    def int_constant(self, values: tuple[int, ...]) -> str:
        key = ("i", tuple(values))
        if key not in self._constants:
            self._constants[key] = self.initializer(self.fresh("shape"), np.array(values, np.int64))
        return self._constants[key]


# -- activation formulas: SymPy -> ONNX elementwise operators --------------------------------

#: SymPy functions of one argument that are one ONNX operator each.
UNARY_OPS: dict[type, str] = {
    sp.exp: "Exp", sp.log: "Log", sp.tanh: "Tanh", sp.sinh: "Sinh", sp.cosh: "Cosh",
    sp.sin: "Sin", sp.cos: "Cos", sp.tan: "Tan", sp.atan: "Atan", sp.asinh: "Asinh",
    sp.erf: "Erf", sp.Abs: "Abs", sp.sign: "Sign",
    ops.sigmoid: "Sigmoid", ops.softplus: "Softplus", ops.relu: "Relu",
}


class FormulaTranslator:
    """Emits the nodes of ``f(z)`` reading tensor ``z_name``; ``what`` names the formula in
    errors.  Shared subexpressions are emitted once (the memo is keyed by the SymPy node)."""

    def __init__(self, g: GraphBuilder, z_name: str, what: str) -> None:
        self.g = g
        self.what = what
        self.memo: dict[sp.Basic, str] = {Z: z_name}

    def emit(self, expr: sp.Basic) -> str:
        if expr not in self.memo:
            self.memo[expr] = self._emit(expr)
        return self.memo[expr]

    def _emit(self, expr: sp.Basic) -> str:
        if isinstance(expr, sp.Expr) and expr.is_number:
            return self.g.constant(self.number(expr))
        if isinstance(expr, sp.Symbol):
            raise OnnxExportError(f"{self.what}: unknown symbol {expr} (the formula's variable is z)")
        op = UNARY_OPS.get(type(expr))
        if op is not None:
            return self.g.node(op, [self.emit(expr.args[0])])
        for cls in type(expr).__mro__:
            rule = SYMPY_RULES.get(cls)
            if rule is not None:
                return rule(self, expr)
        name = getattr(type(expr), "__name__", str(type(expr)))
        raise OnnxExportError(f"{self.what}: the SymPy function {name} (in {expr}) has no ONNX operator; "
                              f"write the activation with exp, log, tanh, sigmoid, abs, max, … instead")

    def number(self, expr: sp.Expr) -> float:
        value = constant_value(expr)
        if value.imag != 0 or not math.isfinite(value.real):
            raise OnnxExportError(f"{self.what}: the constant {expr} is not a finite real number")
        return value.real


def _add(t: FormulaTranslator, expr: sp.Add) -> str:
    # Terms with a minus sign become Sub: z - 1 reads Sub(z, 1), not Add(z, Mul(-1, 1)).
    terms = sorted(expr.args, key=lambda a: a.could_extract_minus_sign())
    first = terms[0]
    acc = t.emit(first) if not first.could_extract_minus_sign() else t.g.node("Neg", [t.emit(-first)])
    for term in terms[1:]:
        acc = (t.g.node("Sub", [acc, t.emit(-term)]) if term.could_extract_minus_sign()
               else t.g.node("Add", [acc, t.emit(term)]))
    return acc


def _mul(t: FormulaTranslator, expr: sp.Mul) -> str:
    coeff, factors = expr.as_coeff_mul()
    num, den = [], []
    for f in factors:
        if f.is_Pow and f.exp.is_number and f.exp < 0:
            den.append(f.base ** -f.exp)
        else:
            num.append(f)
    if abs(coeff) != 1:
        num.insert(0, abs(coeff))
    acc = t.emit(num[0]) if num else None
    for f in num[1:]:
        acc = t.g.node("Mul", [acc, t.emit(f)])
    for f in den:
        acc = t.g.node("Reciprocal", [t.emit(f)]) if acc is None else t.g.node("Div", [acc, t.emit(f)])
    return t.g.node("Neg", [acc]) if coeff < 0 else acc


def _pow(t: FormulaTranslator, expr: sp.Pow) -> str:
    base, e = expr.args
    x = t.emit(base)
    if e.is_number:
        value = t.number(e)
        if value == 2:
            return t.g.node("Mul", [x, x])
        if value == 0.5:
            return t.g.node("Sqrt", [x])
        if value == -1:
            return t.g.node("Reciprocal", [x])
        if value == -0.5:
            return t.g.node("Reciprocal", [t.g.node("Sqrt", [x])])
    return t.g.node("Pow", [x, t.emit(e)])


def _variadic(op: str) -> Callable:
    def rule(t: FormulaTranslator, expr: sp.Expr) -> str:
        return t.g.node(op, [t.emit(a) for a in expr.args])
    return rule


def _scalar_attr(op: str, attr: str) -> Callable:
    """leaky_relu(x, s) → LeakyRelu(x, alpha=s), elu(x, α) → Elu(x, alpha=α): the parameter
    must be a number (the ONNX operator takes it as an attribute)."""
    def rule(t: FormulaTranslator, expr: sp.Expr) -> str:
        x, param = expr.args
        if not param.is_number:
            raise OnnxExportError(f"{t.what}: {expr.func.__name__}'s parameter {param} must be a number for ONNX")
        return t.g.node(op, [t.emit(x)], **{attr: t.number(param)})
    return rule


_RELATIONS = {sp.StrictGreaterThan: "Greater", sp.StrictLessThan: "Less", sp.GreaterThan: "GreaterOrEqual",
              sp.LessThan: "LessOrEqual", sp.Equality: "Equal"}


def _relation(t: FormulaTranslator, expr: sp.Basic) -> str:
    if isinstance(expr, sp.Unequality):
        return t.g.node("Not", [t.g.node("Equal", [t.emit(expr.lhs), t.emit(expr.rhs)])])
    return t.g.node(_RELATIONS[type(expr)], [t.emit(expr.lhs), t.emit(expr.rhs)])


def _piecewise(t: FormulaTranslator, expr: sp.Piecewise) -> str:
    # The first true condition wins: build the Where chain from the last piece back.
    *pieces, (last, cond) = expr.args
    if cond != sp.true:
        raise OnnxExportError(f"{t.what}: {expr} has no 'otherwise' piece (undefined for some z)")
    acc = t.emit(last)
    for value, cond in reversed(pieces):
        acc = t.g.node("Where", [t.emit(cond), t.emit(value), acc])
    return acc


def _heaviside(t: FormulaTranslator, expr: sp.Heaviside) -> str:
    x = t.emit(expr.args[0])
    at0 = t.number(expr.args[1]) if len(expr.args) > 1 else 0.5
    zero, one = t.g.constant(0.0), t.g.constant(1.0)
    inner = t.g.node("Where", [t.g.node("Equal", [x, zero]), t.g.constant(at0), zero])
    return t.g.node("Where", [t.g.node("Greater", [x, zero]), one, inner])


#: SymPy class → rule emitting its nodes (beside the one-operator functions of UNARY_OPS).
SYMPY_RULES: dict[type, Callable] = {
    sp.Add: _add, sp.Mul: _mul, sp.Pow: _pow,
    sp.Max: _variadic("Max"), sp.Min: _variadic("Min"),
    ops.leaky_relu: _scalar_attr("LeakyRelu", "alpha"), ops.elu: _scalar_attr("Elu", "alpha"),
    sp.Piecewise: _piecewise, sp.Heaviside: _heaviside,
    sp.And: _variadic("And"), sp.Or: _variadic("Or"), sp.Not: _variadic("Not"),
    **{rel: _relation for rel in (*_RELATIONS, sp.Unequality)},
}


def activation_nodes(g: GraphBuilder, activation, x: str, what: str) -> str:
    """The nodes of ``activation`` applied to tensor ``x``; returns the result's name."""
    if activation is None or activation.is_identity:
        return x
    return FormulaTranslator(g, x, f"{what}, activation {activation.describe()}").emit(activation.expr)


# -- layers: one exporter per layer type ---------------------------------------------------------

def _dense(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    return g.node("Gemm", [x, params["W"], params["b"]], hint=f"z{pos}", transB=1)


def _conv2d(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    (ph, pw) = layer.padding
    return g.node("Conv", [x, params["W"], params["b"]], hint=f"z{pos}", kernel_shape=list(layer.kernel),
                  strides=list(layer.stride), pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)


def _maxpool2d(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    return g.node("MaxPool", [x], hint=f"z{pos}", kernel_shape=list(layer.size), strides=list(layer.stride))


def _avgpool2d(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    return g.node("AveragePool", [x], hint=f"z{pos}", kernel_shape=list(layer.size), strides=list(layer.stride))


def _flatten(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    # (N, C, H, W) → (N, C·H·W) in C order: entry (c, h, w) at (c·H + h)·W + w, symbp's order.
    return g.node("Flatten", [x], hint=f"z{pos}", axis=1)


def _maxout(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    # Row i·pieces + e of W is piece e of unit i: (N, units·pieces) → (N, units, pieces) → max.
    y = g.node("Gemm", [x, params["W"], params["b"]], hint=f"y{pos}", transB=1)
    grouped = g.node("Reshape", [y, g.int_constant((0, layer.units, layer.pieces))], hint=f"pieces{pos}")
    if g.opset >= 18:  # ReduceMax's axes became an input in opset 18
        return g.node("ReduceMax", [grouped, g.int_constant((2,))], hint=f"z{pos}", keepdims=0)
    return g.node("ReduceMax", [grouped], hint=f"z{pos}", axes=[2], keepdims=0)


def _layernorm(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    if g.opset < 17:
        raise OnnxExportError(f"layer {pos} ({layer.describe()}): LayerNormalization needs opset 17 or newer, "
                              f"this export asks for {g.opset}")
    return g.node("LayerNormalization", [x, params["g"], params["b"]], hint=f"z{pos}", axis=-1, epsilon=layer.eps)


def _batchnorm(g: GraphBuilder, layer, x: str, params: dict, pos: int) -> str:
    """Inference: the running statistics (ONNX's BatchNormalization in its test mode)."""
    return g.node("BatchNormalization", [x, params["g"], params["b"], params["rmean"], params["rvar"]],
                  hint=f"z{pos}", epsilon=layer.eps, momentum=1 - layer.momentum)


def _add_layer(g: GraphBuilder, layer, xs: list, params: dict, pos: int) -> str:
    total = xs[0]
    for other in xs[1:]:
        total = g.node("Add", [total, other], hint=f"z{pos}")
    return total


def _concat(g: GraphBuilder, layer, xs: list, params: dict, pos: int) -> str:
    return g.node("Concat", list(xs), hint=f"z{pos}", axis=1)


#: Layer type (``to_config()["type"]``) → exporter ``(graph, layer, x, params, position) → z``;
#: ``params`` maps the layer's keys (``W``, ``b``) to initializer names; a merging layer gets
#: a list of inputs as ``x``.  The activation is added after it by the driver.
LAYER_EXPORTERS: dict[str, Callable] = {
    "dense": _dense, "conv2d": _conv2d, "maxpool2d": _maxpool2d, "avgpool2d": _avgpool2d,
    "flatten": _flatten, "maxout": _maxout, "layernorm": _layernorm, "batchnorm": _batchnorm,
    "dropout": lambda g, layer, x, params, pos: x,  # inference: the identity
    "add": _add_layer, "concat": _concat,
}


# -- the driver ------------------------------------------------------------------------------

def build(model, opset: int = OPSET, dtype: str = "float32"):
    """The ``onnx.ModelProto`` of ``model`` with tensors of ``dtype`` (checked with ``onnx.checker``)."""
    onnx = _onnx()
    from .._version import __version__

    if str(dtype) not in ("float32", "float64"):
        raise ValueError(f"the ONNX model's dtype must be 'float32' or 'float64', got {dtype!r}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int from {OPSET} to {newest} (this onnx package's newest), got {opset!r}")
    net = model.network
    dtype = np.dtype(dtype)
    g = GraphBuilder(dtype, opset)
    outs = ["X"]  # by position: the tensor name of the input, then of each layer's output
    for pos, layer in enumerate(net.layers, 1):
        kind = layer.to_config()["type"]
        exporter = LAYER_EXPORTERS.get(kind)
        if exporter is None:
            raise OnnxExportError(f"layer {pos} ({layer!r}): no ONNX exporter for layer type {kind!r} "
                                  f"(exported: {', '.join(LAYER_EXPORTERS)})")
        params = {}
        for key in layer.param_shapes(net.in_shape(pos)):
            params[key] = g.initializer(f"{key}{pos}", np.asarray(model.params[f"{key}{pos}"], dtype))
        reads = [outs[s_] for s_ in net.sources[pos - 1]]
        x = exporter(g, layer, reads if layer.merges else reads[0], params, pos)
        outs.append(activation_nodes(g, getattr(layer, "activation", None), x, f"layer {pos} ({layer!r})"))
    x = outs[-1]
    # The node computing the result is renamed "logits" (nothing else reads it); where the
    # result is not the last node's output, an Identity names it instead.
    if not (g.nodes and g.nodes[-1].output[0] == x):
        g.node("Identity", [x])
    g.nodes[-1].output[0] = "logits"
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph = onnx.helper.make_graph(
        g.nodes, net.name,
        [onnx.helper.make_tensor_value_info("X", elem, ["N", *net.input_shape])],
        [onnx.helper.make_tensor_value_info("logits", elem, ["N", net.outputs])],
        initializer=g.initializers,
    )
    proto = onnx.helper.make_model(graph, producer_name="symbp", producer_version=__version__,
                                   opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   doc_string=f"{net!r}; output: the logits (Model.decision_function)")
    # Opset 17 came with IR version 8: older runtimes refuse a newer IR needlessly.
    if opset == OPSET:
        proto.ir_version = min(proto.ir_version, 8)
    onnx.helper.set_model_props(proto, {"symbp_network": json.dumps(net.to_config(), default=str),
                                        "loss": net.loss.name})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_onnx(model, path, opset: int = OPSET, dtype: str = "float32") -> Path:
    """Write ``model`` as an ONNX file at ``path`` (``.onnx``); returns the path.

    Input ``X`` (N, *input_shape), output ``logits`` (N, outputs), both ``dtype``.
    The file is written to a temporary name and renamed: never half a model.
    """
    path = check_output_path(path, (".onnx",), "ONNX model")
    proto = build(model, opset, dtype)
    if proto.ByteSize() >= 2**31:
        raise OnnxExportError(f"the model is {proto.ByteSize() / 2**30:.1f} GiB: beyond the 2 GiB an ONNX file holds "
                              f"in one piece")
    return write_atomic(path, proto.SerializeToString(), "ONNX model")
