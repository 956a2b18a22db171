"""Notebooks (issue 17, item 1): rich display of symbp's objects, and examples/tour.ipynb run
by a real Jupyter kernel through nbclient."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import symbp as sb
from symbp.train.model import History

graph_module = importlib.import_module("symbp.read.graph_draw")  # where the graph is built and drawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net() -> sb.Network:
    return sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2)], loss="softmax_cross_entropy",
                      name="nb-tiny")


# --------------------------------------------------------------------------------------------
# Each object's _repr_*_, in process
# --------------------------------------------------------------------------------------------
def test_derivation_shows_as_markdown_with_math_and_as_latex():
    d = sb.derive(tiny_net())
    md = d._repr_markdown_()
    assert md == d.markdown()
    blocks = re.findall(r"^\$\$$(.*?)^\$\$$", md, re.S | re.M)
    assert len(blocks) >= 8 and all(r"\begin{aligned}" in b for b in blocks)
    tex = d._repr_latex_()
    assert tex == d.latex() and tex.count(r"\begin{align*}") == tex.count(r"\end{align*}") >= 8
    assert r"\documentclass" not in tex  # a fragment for the notebook, not a document


def test_walkthrough_shows_as_html_tables_with_its_marks(compiled):
    model = compiled(tiny_net(), "float64")
    w = sb.walkthrough(model, x=[0.5, -1.0], t=1)
    page = w._repr_html_()
    assert page.count("<table") == 3  # forward, δ, gradients
    # one ✓ per checked number: 4 δ and 12 gradient entries, all agreeing
    assert page.count("✓") == sum(c.status == "ok" for c in w.checks) == 16
    assert "all agree" in page and "<script" not in page
    w.checks[0].status = "FAILED"
    assert "✗ FAILED" in w._repr_html_() and "SOME DISAGREE" in w._repr_html_()


def test_graph_shows_as_svg_or_says_why_not(compiled, monkeypatch):
    w = sb.walkthrough(compiled(tiny_net(), "float64"), x=[0.5, -1.0], t=1)
    g = w.graph()
    if graph_module.shutil.which("dot"):
        svg = g._repr_svg_()
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and g._repr_html_() is None
    monkeypatch.setattr(graph_module.shutil, "which", lambda name: None)
    assert g._repr_svg_() is None
    page = g._repr_html_()
    assert "dot</code> is not installed" in page and "apt-get install graphviz" in page
    assert page.count("<tr>") == len(g.nodes) + 1  # every node, a header
    cost = next(node for node in g.nodes.values() if node.kind == "cost")
    value = graph_module._num(cost.value)
    assert cost.value > 0 and f'<td class="num">{value}</td><td class="num">1</td>' in page  # ∂C/∂C = 1
    assert "digraph symbp" in page


def test_history_shows_as_png_and_as_nothing_without_matplotlib(monkeypatch):
    h = History()
    assert h._repr_png_() is None  # no epochs yet
    for e in range(5):
        h.record(e, loss=1.0 / (e + 1), accuracy=0.5 + e / 10, val_loss=1.2 / (e + 1), val_accuracy=0.5 + e / 12)
    if _has("matplotlib"):
        import matplotlib.pyplot as plt

        before = plt.get_fignums()
        png = h._repr_png_()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert plt.get_fignums() == before  # closed, or Jupyter's inline backend would show it again
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert h._repr_png_() is None


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_summary_lists_layers_shapes_and_parameters_of_a_cnn():
    """The layout, from the network alone (a stand-in for the compiled model)."""
    from symbp.read.summary import summary_text

    net = sb.Network(inputs=(1, 6, 6), layers=[sb.Conv2D(2, kernel=3, activation="relu"), sb.MaxPool2D(2), sb.Flatten(),
                                               sb.Dense(3)], loss="softmax_cross_entropy", name="nb-cnn")
    stand_in = SimpleNamespace(network=net, source_path=Path("/cache/nb-cnn.py"), dtype=np.dtype("float32"), epoch=0,
                               optimizer=None)
    lines = summary_text(stand_in).splitlines()
    assert lines[0] == "Model 'nb-cnn': cpu, float32"
    rows = {line.split()[0]: line for line in lines if line.strip()[:1].isdigit() or line.strip().startswith(("input", "total"))}
    assert "(1, 6, 6)" in rows["input"]
    assert "Conv2D(2 filters, 3×3" in rows["1"] and "relu" in rows["1"] and "(2, 4, 4)" in rows["1"]
    assert "W1 (2, 1, 3, 3), b1 (2,)" in rows["1"] and rows["1"].endswith(" 20")
    assert "MaxPool2D" in rows["2"] and "(2, 2, 2)" in rows["2"] and rows["2"].endswith(" 0")
    assert "(8,)" in rows["3"] and "W4 (3, 8), b4 (3,)" in rows["4"] and rows["4"].endswith(" 27")
    assert rows["total"].endswith(" 47") and 47 == sum(np.prod(s) for s in net.param_shapes().values())
    assert "generated module: /cache/nb-cnn.py" in lines and "not trained yet" in lines


def test_model_summary_and_its_html_table(compiled):
    model = compiled(tiny_net(), "float32")
    text = model.summary()
    assert isinstance(text, str) and repr(text) == str(text)  # shows as itself at a prompt
    total = sum(p.size for p in model.params.values())
    assert total == 12 and text.splitlines()[-4].split() == ["total", "12"]
    assert f"generated module: {model.source_path}" in text and "not trained yet" in text
    page = model._repr_html_()
    assert page.count("<tr>") == 1 + 3 + 1 and f"<b>{total}</b>" in page and str(model.source_path) in page
    assert "<td>W1 (2, 2), b1 (2,)</td>" in page
    model.fit(np.zeros((4, 2)), [0, 1, 1, 0], optimizer=sb.SGD(lr=0.1), epochs=2, progress=False)
    assert "trained 2 epochs with SGD(lr=0.1)" in model.summary()


# --------------------------------------------------------------------------------------------
# examples/tour.ipynb, executed
# --------------------------------------------------------------------------------------------
def test_tour_notebook_runs_and_shows_math(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="the notebook extra: pip install -e '.[notebook]'")
    nbformat = pytest.importorskip("nbformat", reason="the notebook extra: pip install -e '.[notebook]'")
    pytest.importorskip("ipykernel", reason="the notebook extra: pip install -e '.[notebook]'")
    # "python3" is this interpreter, whatever kernels the user's Jupyter knows (JUPYTER_PATH is
    # searched first); the kernel is a fresh process: a temporary cache, this checkout's symbp.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (symbp tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(os.path.join(ROOT, "examples", "tour.ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError at the first cell that fails
    outputs = [(cell.source, out) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for _, out in outputs if out.output_type == "error"]

    def shown(prefix: str) -> dict:
        found = [out.get("data", {}) for src, out in outputs if src.rstrip().endswith(prefix)
                 and out.output_type == "execute_result"]
        assert len(found) == 1, prefix
        return found[0]

    derivation = shown("\nd")
    assert derivation["text/markdown"].count("$$") >= 16 and r"\delta^{(1)}" in derivation["text/markdown"]
    assert r"\begin{align*}" in derivation["text/latex"]
    assert "<table" in shown("\nmodel")["text/html"]
    assert shown("\nw")["text/html"].count("✓") >= 20
    graph = shown("w.graph()")
    assert graph.get("image/svg+xml", "").startswith("<svg") or "not installed" in graph.get("text/html", "")
    if _has("matplotlib"):
        assert base64.b64decode(shown("\nhistory")["image/png"])[:4] == b"\x89PNG"
    printed = "".join(out.get("text", "") for _, out in outputs if out.output_type == "stream")
    accuracy = float(re.search(r"validation accuracy (\d\.\d+)", printed).group(1))
    assert accuracy > 0.85  # XOR is learnt: a linear model gets about 0.5
    assert "Model 'tour': cpu, float32" in printed and (tmp_path / "tour-run.npz").is_file()
