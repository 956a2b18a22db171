"""ONNX export (symbp/interop/onnx_export.py, ``model.to_onnx``, ``symbp export``): the file
passes ``onnx.checker`` and onnxruntime, an independent runtime, computes
``model.decision_function`` from it to 1e-5 relative in float32."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import sympy as sp
from _interop_nets import NETWORKS, inputs, spread

import symbp as sb
from symbp.cli import load_spec, main, network_from_spec

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra")
ort = pytest.importorskip("onnxruntime", reason="the exported graph is checked with onnxruntime")


def run_onnx(path, X: np.ndarray, dtype=np.float32) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["X"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return session.run(None, {"X": np.asarray(X, dtype)})[0]


def assert_same(got: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    # Relative to each entry, with a floor at rtol·max|ref| for entries that are nearly 0.
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_onnxruntime_computes_decision_function(kind, compiled, tmp_path):
    net = NETWORKS[kind]()
    model = spread(compiled(net, dtype="float32"))
    path = model.to_onnx(tmp_path / f"{kind}.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # The batch dimension is symbolic: one file serves any number of rows.
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == list(net.input_shape)
    for rows in (1, 13):
        X = inputs(net, rows)
        ref = model.decision_function(X)
        assert np.abs(ref).max() > 0.5  # the comparison is not of near-zero outputs
        assert_same(run_onnx(path, X), ref, 1e-5)
    # The weights are initializers named as the model's parameters.
    names = {t.name for t in proto.graph.initializer}
    assert set(model.params) <= names


def test_every_builtin_activation_is_its_onnx_operator(compiled, tmp_path):
    path = compiled(NETWORKS["mlp"](), dtype="float32").to_onnx(tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Gemm", "Tanh", "Gemm", "LeakyRelu", "Gemm", "Elu", "Gemm", "Softplus", "Gemm", "Sigmoid",
                   "Gemm", "Relu", "Gemm"]
    attrs = {n.op_type: {a.name: a.f for a in n.attribute} for n in onnx.load(str(path)).graph.node}
    assert attrs["LeakyRelu"]["alpha"] == pytest.approx(0.2) and attrs["Elu"]["alpha"] == pytest.approx(0.7)


def test_custom_formula_becomes_elementwise_operators(compiled, tmp_path):
    path = compiled(NETWORKS["custom"](), dtype="float32").to_onnx(tmp_path / "c.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Sigmoid", "Softplus", "Sqrt", "Abs", "Max", "Sign", "Cos", "Where", "Greater", "Div"} <= ops


def test_float64_graph_and_newer_opset(compiled, tmp_path):
    model = spread(compiled(NETWORKS["maxout"](), dtype="float64"))
    X = inputs(model.network)
    path = model.to_onnx(tmp_path / "m64.onnx", dtype="float64", opset=18)  # ReduceMax's axes as an input
    assert_same(run_onnx(path, X, np.float64), model.decision_function(X), 1e-12)
    # The default is float32 whatever the model's dtype (what serving runtimes run).
    path32 = model.to_onnx(tmp_path / "m32.onnx")
    assert_same(run_onnx(path32, X), model.decision_function(X), 1e-5)


def test_function_without_onnx_operator_is_named(compiled, tmp_path):
    from symbp.interop.onnx_export import GraphBuilder, OnnxExportError, activation_nodes

    act = sb.Activation(sp.gamma(sp.Symbol("x")))
    with pytest.raises(OnnxExportError, match="SymPy function gamma"):
        activation_nodes(GraphBuilder(np.float32), act, "z1", "layer 1")


def test_failed_export_writes_nothing(compiled, tmp_path, monkeypatch):
    from symbp.interop import onnx_export

    model = compiled(NETWORKS["maxout"](), dtype="float32")
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    monkeypatch.delitem(onnx_export.LAYER_EXPORTERS, "maxout")
    with pytest.raises(ValueError, match="no ONNX exporter for layer type 'maxout'"):
        model.to_onnx(target)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    with pytest.raises(ValueError, match=r"\.onnx"):
        model.to_onnx(tmp_path / "model.txt")
    with pytest.raises(ValueError, match="opset"):
        model.to_onnx(target, opset=9)


def test_without_onnx_the_error_says_what_to_install(compiled, tmp_path, monkeypatch):
    model = compiled(NETWORKS["maxout"](), dtype="float32")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[onnx\]"'):
        model.to_onnx(tmp_path / "m.onnx")


# -- symbp export ----------------------------------------------------------------------------

SPEC = """
name = "export-cli"
inputs = [1, 6, 6]
[[layers]]
type = "conv2d"
filters = 3
kernel = 3
padding = 1
activation = "relu"
[[layers]]
type = "maxpool2d"
size = 2
[[layers]]
type = "flatten"
[[layers]]
units = 4
activation = "z*sigmoid(z)"
[[layers]]
units = 3
"""


def test_cli_exports_a_checkpoint_and_a_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    net = network_from_spec(load_spec(spec))
    X = inputs(net, 7)
    y = np.arange(7) % 3
    model = sb.compile(net, seed=3)
    model.fit(X, y, optimizer=sb.Adam(lr=0.05), epochs=3, progress=False)
    ckpt = model.save(tmp_path / "run.npz")

    assert main(["export", str(ckpt), "-o", str(tmp_path / "run.onnx")]) == 0
    assert "input X (N, 1, 6, 6)" in capsys.readouterr().out
    assert_same(run_onnx(tmp_path / "run.onnx", X), sb.load(ckpt).decision_function(X), 1e-5)

    # A spec exports its untrained initial weights, seeded as sb.compile seeds them.
    assert main(["export", str(spec), "--format", "onnx", "--seed", "3", "-o", str(tmp_path / "init.onnx")]) == 0
    assert "untrained" in capsys.readouterr().out
    assert_same(run_onnx(tmp_path / "init.onnx", X), sb.compile(net, seed=3).decision_function(X), 1e-5)


def test_cli_export_refuses_what_it_cannot_write(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    assert main(["export", str(spec), "-o", str(tmp_path / "model.pt")]) == 2
    assert "cannot tell the format from" in capsys.readouterr().err
    assert main(["export", str(spec), "-o", str(tmp_path / "missing" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(spec), "--kernels", "--format", "onnx", "-o", str(tmp_path / "k")]) == 2
    assert "--kernels" in capsys.readouterr().err


def test_cli_kernels_branch_hands_the_model_to_export_kernels(tmp_path, monkeypatch, capsys):
    import symbp.interop.kernels as kernels

    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    seen = {}

    def fake(model, out_dir):
        seen.update(model=model, out_dir=out_dir)
        return tmp_path / "pkg"

    monkeypatch.setattr(kernels, "export_kernels", fake)
    assert main(["export", str(spec), "--kernels", "--seed", "4", "-o", str(tmp_path / "pkg")]) == 0
    assert seen["out_dir"] == str(tmp_path / "pkg") and f"wrote {tmp_path / 'pkg'}" in capsys.readouterr().out
    expected = sb.compile(network_from_spec(load_spec(spec)), seed=4)
    assert all(np.array_equal(seen["model"].params[k], v) for k, v in expected.params.items())
