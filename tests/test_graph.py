"""The computational graph: the lecture's gate rules hold on every edge, the gradients it
carries are the walkthrough's, wide layers collapse, and the pictures are drawn atomically."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest

import symbp as sb
from symbp.cli import main as cli
from symbp.read.graph import GraphvizNotFound, graph
from symbp.read.walkthrough import walkthrough

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")


@pytest.fixture(scope="module")
def classic():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2, activation="sigmoid")],
                     loss="mse", name="classic-2-2-2")
    w = walkthrough(net, x=[0.05, 0.10], t=[0.01, 0.99],
                    params={"W1": [[0.15, 0.20], [0.25, 0.30]], "b1": [0.35, 0.35],
                            "W2": [[0.40, 0.45], [0.50, 0.55]], "b2": [0.60, 0.60]})
    return w, graph(w)


def test_add_distributes_and_mul_switches(classic):
    w, g = classic
    add = g.node("z_h₁")
    assert add.label == "+" and add.value == pytest.approx(0.3775)
    into = g.edges_into(add.id)
    assert len(into) == 3  # w₁·x₁, w₂·x₂ and b₁
    for e in into:  # add distributes: every input receives δ_h₁ unchanged
        assert e.grad == pytest.approx(w.delta[0][0], rel=1e-12)
    mul = next(g.nodes[e.src] for e in into if g.nodes[e.src].label == "×" and
               {g.nodes[x.src].label for x in g.edges_into(e.src)} == {"w₁", "x₁"})
    edges = {g.nodes[e.src].label: e for e in g.edges_into(mul.id)}
    # mul switches: w₁ receives δ·x₁, x₁ receives δ·w₁
    assert edges["w₁"].grad == pytest.approx(w.delta[0][0] * 0.05, rel=1e-12)
    assert edges["x₁"].grad == pytest.approx(w.delta[0][0] * 0.15, rel=1e-12)
    assert edges["w₁"].value == 0.15 and edges["x₁"].value == 0.05


def test_edge_gradients_are_the_walkthroughs(classic):
    w, g = classic
    leaves = {n.label: n for n in g.nodes.values() if n.kind == "param"}
    names = {"w₁": ("W1", 0, 0), "w₄": ("W1", 1, 1), "w₅": ("W2", 0, 0), "w₈": ("W2", 1, 1)}
    for label, (key, r, c) in names.items():
        assert leaves[label].grad == pytest.approx(w.grads[key][r, c], rel=1e-12)
    assert leaves["b₃"].grad == pytest.approx(w.grads["b2"][0], rel=1e-12)
    for l, letter in ((1, "h"), (2, "o")):
        for u in range(2):
            node = g.node(f"z_{letter}{'₁₂'[u]}")
            assert node.grad == pytest.approx(w.delta[l - 1][u], rel=1e-12)
            assert node.value == pytest.approx(w.z[l - 1][u], rel=1e-12)
    cost = next(n for n in g.nodes.values() if n.kind == "cost")
    assert cost.value == pytest.approx(w.loss, rel=1e-12) and cost.grad == 1.0
    # a fan-out node sums what comes back along its edges: ∂C/∂h₁ = w₅ δ_o₁ + w₇ δ_o₂
    h1 = g.node("h₁")
    back = [e.grad for e in g.edges_from(h1.id)]
    assert len(back) == 2 and h1.grad == pytest.approx(sum(back))
    assert h1.grad == pytest.approx(0.40 * w.delta[1][0] + 0.50 * w.delta[1][1], rel=1e-12)


def test_max_gate_routes():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="relu"), sb.Dense(1)], loss="mse", l2=0.1)
    params = {"W1": [[1.0, 0.5], [-1.0, -0.5]], "b1": [0.1, 0.1], "W2": [[0.3, -0.7]], "b2": [0.2]}
    w = walkthrough(net, x=[1.0, 2.0], t=[0.0], params=params)
    g = graph(w)
    live, dead = g.node("h₁"), g.node("h₂")  # z_h₁ = 2.1 > 0, z_h₂ = -1.9 < 0
    assert live.label == dead.label == "max"
    for node, passes in ((live, True), (dead, False)):  # max routes the gradient to the larger input
        edges = {g.nodes[e.src].kind: e for e in g.edges_into(node.id)}
        assert edges["const"].value == 0.0
        assert edges["gate"].grad == pytest.approx(node.grad if passes else 0.0)
        assert edges["const"].grad == pytest.approx(0.0 if passes else node.grad)
    assert live.grad != 0.0 and dead.grad != 0.0
    assert g.node("z_h₂").grad == 0.0 and w.delta[0][1] == 0.0
    # the l2 term reaches every weight: ∂C/∂w = data part + λ·w, noted on the weight
    w1 = next(n for n in g.nodes.values() if n.label == "w₁")
    assert w1.grad == pytest.approx(w.grads["W1"][0, 0], rel=1e-12)
    assert w1.caption == "l2: λ·w = 0.1" and "l2: λ·w = 0.1" in g.dot


def test_wide_networks_collapse_to_one_node_per_layer():
    net = sb.Network(inputs=8, layers=[sb.Dense(6, activation="tanh"), sb.Dense(3)], loss="softmax_cross_entropy",
                     l2=0.01)
    w = walkthrough(net, seed=2)
    g = graph(w)
    assert g.collapsed
    labels = sorted(n.label for n in g.nodes.values())
    assert labels.count("×") == 2 and labels.count("+") == 2 and "tanh" in labels
    shapes = {e.shape for e in g.edges}
    assert {"(8,)", "(6, 8)", "(6,)", "(3, 6)", "(3,)"} <= shapes
    dz = next(e for e in g.edges if g.nodes[e.dst].caption == "a1")  # z1 → tanh carries δ1
    assert dz.grad_norm == pytest.approx(np.linalg.norm(w.delta[0]))
    assert not graph(w, collapse=False).collapsed  # up to 10 units a layer can still be expanded
    wide = walkthrough(sb.Network(inputs=12, layers=[sb.Dense(2)], loss="mse"), seed=0, max_checks=1)
    with pytest.raises(ValueError, match="more than 10; use collapse=True"):
        graph(wide, collapse=False)
    with pytest.raises(TypeError, match="Walkthrough, Network or Model"):
        graph({"inputs": 2})


@needs_dot
def test_pictures_are_written_whole(classic, tmp_path):
    _, g = classic
    svg = g.svg()
    assert svg.startswith("<svg") and "z_h₁" in svg and "0.08217" in svg  # ∂C/∂w₅ on its edge
    png = g.save(tmp_path / "graph.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert g.save(tmp_path / "graph.svg").read_text().startswith("<?xml") or "<svg" in (tmp_path / "graph.svg").read_text()
    assert g.save(tmp_path / "graph.dot").read_text() == g.dot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.dot", "graph.png", "graph.svg"]  # no temp files


def test_bad_output_paths_are_refused(classic, tmp_path):
    _, g = classic
    with pytest.raises(ValueError, match="must end in .svg, .png, .dot"):
        g.save(tmp_path / "graph.pdf")
    with pytest.raises(ValueError, match="does not exist"):
        g.save(tmp_path / "missing" / "graph.svg")
    with pytest.raises(ValueError, match="it is a directory"):
        (tmp_path / "d.svg").mkdir()
        g.save(tmp_path / "d.svg")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        g.save(tmp_path / "file" / "graph.svg")
    with pytest.raises(TypeError, match="path must be a string"):
        g.save(3)


def test_missing_graphviz_is_a_clear_error(classic, monkeypatch):
    _, g = classic
    # sb.graph is the function; the module is reached through sys.modules.
    monkeypatch.setattr(importlib.import_module("symbp.read.graph_draw").shutil, "which", lambda name: None)
    with pytest.raises(GraphvizNotFound, match="apt-get install graphviz"):
        g.svg()
    assert g.dot.startswith("digraph")  # the source needs nothing installed


@needs_dot
def test_cli_graph(tmp_path, capsys):
    spec = tmp_path / "net.toml"
    spec.write_text('inputs = 2\nloss = "mse"\n[[layers]]\nunits = 2\nactivation = "relu"\n[[layers]]\nunits = 1\n')
    assert cli(["graph", str(spec), "-o", str(tmp_path / "g.svg"), "--seed", "1"]) == 0
    assert "max" in (tmp_path / "g.svg").read_text()
    assert cli(["graph", str(spec), "-o", str(tmp_path / "g.gif")]) == 2
    assert "must end in .svg, .png, .dot" in capsys.readouterr().err


def test_cli_graph_of_an_image_network(tmp_path, capsys):
    from symbp.cli import main as cli

    spec = tmp_path / "cnn.toml"
    spec.write_text('inputs = [1, 4, 4]\nloss = "ce"\n[[layers]]\ntype = "conv2d"\nfilters = 2\nkernel = 3\n'
                    '[[layers]]\ntype = "flatten"\n[[layers]]\nunits = 2\n')
    if shutil.which("dot") is None:
        pytest.skip("drawing needs Graphviz's dot")
    assert cli(["graph", str(spec), "-o", str(tmp_path / "g.svg")]) == 0
    assert (tmp_path / "g.svg").read_text(encoding="utf-8").lstrip().startswith(("<?xml", "<svg"))
