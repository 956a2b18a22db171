"""Explanations of networks with image layers: sizes, parameter counts, the derived stage
formulas, pooling's routing, LaTeX that compiles, and the report.

The expected numbers are worked out here by hand with the lecture's rule
``(N − F + 2P)/S + 1`` and ``(F·F·C + 1)·K``; the formulas are checked for the pieces a
textbook writes (the padded input indexed by S·h + u in ∂C/∂W).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest
import tomllib

import symbp as sb
from symbp.read.graph import graph
from symbp.read.printing import text as plain
from symbp.read.walkthrough import walkthrough


def digits_cnn(root) -> sb.Network:
    with open(root / "examples" / "digits_cnn.toml", "rb") as fh:
        return sb.Network.from_config(tomllib.load(fh))


@pytest.fixture(scope="module")
def cnn(project_root):
    return sb.derive(digits_cnn(project_root))


@pytest.fixture(scope="module")
def strided():
    """A stride-2, padding-1 convolution, average pooling, Flatten and Maxout."""
    net = sb.Network(inputs=(2, 7, 7), layers=[sb.Conv2D(4, 3, stride=2, padding=1, activation="tanh"),
                                               sb.AvgPool2D(2, stride=1), sb.Flatten(), sb.Maxout(3, 2), sb.Dense(2)],
                     loss="mse", name="strided")
    return sb.derive(net)


def block_text(doc_text: str, title: str) -> str:
    """The lines of one block (from its title to the next block or section title)."""
    lines = doc_text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.strip() == title)
    out = []
    for line in lines[start + 1:]:
        if line.startswith("  ") and not line.startswith("    "):
            break
        out.append(line.strip())
    return "\n".join(out)


def test_digits_cnn_sizes_and_parameter_counts(cnn):
    text = cnn.explain()
    assert "Backpropagation in digits-cnn: (1, 8, 8) → (16, 8, 8) → (16, 4, 4) → 256 → 10" in text
    conv = block_text(text, "Layer 1: Conv2D(16 filters, 3×3, stride 1, padding 1), activation relu")
    # (N − F + 2P)/S + 1 with N = 8, F = 3, P = 1, S = 1; (F·F·C + 1)·K with C = 1, K = 16
    assert "output rows H₁ = (N − F + 2P)/S + 1 = (8 − 3 + 2·1)/1 + 1 = 8" in conv
    assert "(F·F·C + 1)·K = (3·3·1 + 1)·16 = 160" in conv
    assert "input (1, 8, 8) → output (16, 8, 8)" in conv
    pool = block_text(text, "Layer 2: MaxPool2D(2×2, stride 2)")
    assert "output columns W₂ = (N − F)/S + 1 = (8 − 2)/2 + 1 = 4" in pool
    assert "C·H·W = 16·4·4 = 256" in block_text(text, "Layer 3: Flatten()")
    assert "(256 + 1)·10 = 2570" in block_text(text, "Layer 4: Dense(10), activation identity")
    rows = {line.split()[0]: line for line in text.splitlines()[4:10]}
    assert re.search(r"Conv2D\(16 filters, 3×3, stride 1, padding 1\)\s+relu\s+\(16, 1, 3, 3\)\s+\(16,\)\s+160\s+"
                     r"\(N, 16, 8, 8\)", rows["1"])
    assert re.search(r"total\s+2730$", rows["total"])


def test_strided_padded_conv_arithmetic(strided):
    text = strided.explain()
    conv = block_text(text, "Layer 1: Conv2D(4 filters, 3×3, stride 2, padding 1), activation tanh")
    # (7 − 3 + 2)/2 + 1 = 4; (3·3·2 + 1)·4 = 76
    assert "output rows H₁ = (N − F + 2P)/S + 1 = (7 − 3 + 2·1)/2 + 1 = 4" in conv
    assert "(3·3·2 + 1)·4 = 76" in conv
    assert "S₁ = 2" in conv and "P₁ = 1" in conv
    assert "(4 − 2)/1 + 1 = 3" in text  # the average pooling, stride 1
    assert "C·H·W = 4·3·3 = 36" in text
    assert "(in + 1)·units·pieces = (36 + 1)·3·2 = 222" in text
    assert "average pooling spreads δ evenly" in text
    assert "Maxout routes δ to the winning piece" in text


def test_weight_gradient_reads_the_padded_input_at_stride_times_h_plus_u(cnn, strided):
    for d in (cnn, strided):
        text = d.explain()
        line = next(x for x in text.splitlines() if x.strip().startswith("∂C/∂W1[p,q,r,s] ="))
        derived = plain(d.layers[0].grads["W"])
        assert line.strip().endswith(derived)  # the derivation's own object, printed
        # x̃1 indexed by S₁·h + r and S₁·w + s (the filter offset is the free index here)
        assert "x̃1[n,q,r + h·S₁,s + w·S₁]" in derived
        assert "δ1[n,p,h,w]" in derived and "λ·W1[p,q,r,s]" in derived
    # the forward convolution: x̃ at S·h + u
    assert "x̃1[n,c,u + h·S₁,v + w·S₁]" in cnn.explain()


def test_input_gradient_prints_its_guards_as_brackets(strided):
    text = strided.explain()
    line = next(x for x in text.splitlines() if x.strip().startswith("gx̃1[n,q,r,s] = ∂C/∂x̃1[n,q,r,s] ="))
    assert "W1[k,q,r - h·S₁,s - w·S₁]" in line
    assert "[0 ≤ r - h·S₁ ≤ kh₁ - 1]" in line and "[0 ≤ s - w·S₁ ≤ kw₁ - 1]" in line
    assert "transposed convolution" in text
    assert "Piecewise" not in text and "otherwise" not in text


def test_max_pool_routing_is_explained(cnn):
    text = cnn.explain()
    assert "m2[n,k,h,w] = argmax_u,v a1[n,k,u + h·S₂,v + w·S₂]" in text
    delta1 = next(x for x in text.splitlines() if x.strip().startswith("δ1[n,p,r,s] ="))
    assert "= m2[n,p,h,w]]" in delta1  # routed to the arg-max
    assert "routes δ to the arg-max" in text and "the first maximum" in text


def test_scalar_view_refused_for_image_layers(cnn):
    with pytest.raises(ValueError, match="scalar view .* dense network"):
        cnn.explain(scalar=True)


def test_markdown_and_latex(cnn, strided):
    md = cnn.markdown()
    assert "| 1 | Conv2D(16 filters, 3×3, stride 1, padding 1) | relu | (16, 1, 3, 3) | (16,) | 160 | (N, 16, 8, 8) |" in md
    assert "- parameters (W (16, 1, 3, 3), b (16,)): (F·F·C + 1)·K = (3·3·1 + 1)·16 = 160" in md
    for d in (cnn, strided):
        tex = d.latex()
        assert tex.isascii()
        assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
        assert r"\tilde{x}^{(1)}_{n,q,r + h S_{1},s + w S_{1}}" in tex
        assert r"\left[0 \le r - h S_{1} \le kh_{1} - 1\right]" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (texlive-latex-base)")
def test_standalone_latex_compiles(cnn, strided, tmp_path):
    for name, d in (("cnn", cnn), ("strided", strided)):
        (tmp_path / f"{name}.tex").write_text(d.latex(standalone=True), encoding="ascii")
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


def test_walkthrough_and_graph_go_through_image_layers():
    """They refused image layers; now each entry is checked and drawn (issue 13, item 5)."""
    net = sb.Network(inputs=(1, 4, 4), layers=[sb.Conv2D(2, 3), sb.Flatten(), sb.Dense(2)], loss="mse")
    w = walkthrough(net)
    assert w.ok
    assert any(c.entry.startswith("W1") for c in w.checks) and any(c.entry.startswith("delta1") for c in w.checks)
    g = graph(net)
    assert any(node.label == "×" for node in g.nodes.values()) and any(node.label == "+" for node in g.nodes.values())


def test_report_of_the_digits_cnn(compiled, tmp_path, project_root):
    model = compiled(digits_cnn(project_root), "float32")
    page = sb.report(model, tmp_path / "cnn.html")
    assert (tmp_path / "cnn.html").read_text(encoding="utf-8") == page
    assert page.count('<math xmlns="http://www.w3.org/1998/Math/MathML"') > 20
    assert "(3·3·1 + 1)·16 = 160" in page and "(N, 1, 8, 8)" in page
    assert "No computational graph and no worked example" in page
    assert "<mi>x̃</mi>" in html.unescape(page)  # the padded input in the MathML
    matched = int(re.search(r"(\d+) formulas matched to kernel lines", page).group(1))
    assert matched >= 5  # z1, the dense layer, the loss, dW1 …: the rest say they found no line
    with pytest.raises(ValueError, match="a spec the report cannot draw"):
        sb.report(model, graph=True)
