"""The HTML report: self-contained, every formula beside the kernel lines that evaluate it,
the math really rendered by a browser (headless Chromium), and no half-written files."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import sympy as sp
from _support import NetSpec

import symbp as sb
from symbp.cli import main as cli
from symbp.read.report import kernel_snippet, report

SPEC = """name = "swish-report"
inputs = 2
loss = "mse"
l2 = 0.01

[[layers]]
units = 3
activation = "z*sigmoid(z)"

[[layers]]
units = 2
activation = "sigmoid"

[walkthrough]
x = [0.5, -1.0]
t = [0.2, 0.7]
"""


def swish_net() -> sb.Network:
    """A custom activation in the hidden layer, a sigmoid output, MSE and l2."""
    return sb.Network(inputs=2, layers=[sb.Dense(3, activation="z*sigmoid(z)"), sb.Dense(2, activation="sigmoid")],
                      loss="mse", l2=0.01, name="swish-report")


@pytest.fixture(scope="module")
def page(compiled, tmp_path_factory):
    model = compiled(swish_net(), "float64")
    path = tmp_path_factory.mktemp("report") / "report.html"
    text = report(model, path, x=[0.5, -1.0], t=[0.2, 0.7])
    assert path.read_text(encoding="utf-8") == text
    return model, path, text


def test_page_is_self_contained(page):
    _, _, text = page
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    for forbidden in ("<script", "<link", "src=", "url(", "@import", "<iframe"):
        assert forbidden not in text, forbidden
    urls = set(re.findall(r"https?://[^\s\"'<>]+", text))
    assert urls <= {"http://www.w3.org/1998/Math/MathML", "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_page_has_math_shapes_graph_and_the_worked_example(page):
    model, _, text = page
    assert text.count("<math ") >= 60
    assert "<svg" in text and "z_h₁" in text  # the expanded graph, inline
    assert re.search(r"<td>1</td><td>Dense\(3\)</td><td>z\*sigmoid\(z\)</td><td>\(3, 2\)</td><td>\(3,\)</td>"
                     r'<td class="num">9</td>', text)
    assert '<td class="num"><b>17</b></td>' in text  # 9 + 8 parameters
    assert "all agree" in text and "the generated kernels: " in text
    assert f"{model.source_path.parent.name}/{model.source_path.name}" in text
    # the custom activation's derivative, simplified, as MathML: σ(z)·(z·(1 − σ(z)) + 1)
    plain = html.unescape(text)
    assert "<mi>f</mi><mo>′</mo>" in plain
    assert ("<mrow><mi>σ</mi><mo>\u2061</mo><mrow><mo>(</mo><mrow><mi>z</mi></mrow><mo>)</mo></mrow></mrow>"
            "<mo>\u2062</mo><mrow><mo>(</mo><mrow><mrow><mi>z</mi>") in plain
    # its LaTeX is one click away, for slides
    assert r"f'\left(z\right) = \sigma\left(z\right) \left(z \left(1 - \sigma\left(z\right)\right) + 1\right)" in plain


def _rows(text: str) -> list[str]:
    return re.findall(r'<div class="eq">(.*?)</div></div>\n', text, re.S)


def test_each_formula_sits_beside_the_kernel_lines_that_evaluate_it(page):
    model, _, text = page
    source = model.source_path.read_text(encoding="utf-8")
    d = model.derivation
    rows = [html.unescape(r) for r in re.findall(r'<div class="eq">(.*?)\n(?=<div class="eq|<h[23]|<h2)', text, re.S)]
    assert len(rows) >= 12

    def row_for(*fragments: str) -> str:
        found = [r for r in rows if all(f in r for f in fragments)]
        assert found, fragments
        return found[0]

    # z1: the contraction's comment carries the derivation's own Sum, then the bias loop
    z1 = row_for("Z1[n, i] =")
    assert str(d.layers[0].forward.atoms(sp.Sum).pop()) in z1 and "forward()" in z1
    # δ1, the hidden-layer case, with the custom f′ fused into the backward loop
    delta1 = row_for("dZ1[n, p] =", "hidden-layer case")
    assert str(_hidden_sum(d)) in delta1 and "backward()" in delta1
    code_rows = [re.sub(r"<[^>]+>", "", r) for r in delta1.split('<span class="row')[1:]]
    hits = [r for r, raw in zip(code_rows, delta1.split('<span class="row')[1:]) if raw.startswith(' hit"')]
    assert any("dZ1[n, p] =" in r for r in hits) and any("sigmoid(Z1[n, p])" in r for r in code_rows)
    # the output layer's δ comes from loss_rows, the bias gradient from a column sum
    assert "loss_rows()" in row_for("dZ2[n, p] =")
    assert "db2[p] +=" in row_for("db2[p] +=")
    # every matched line really is in the generated module
    for line in re.findall(r'<span class="ln">(\d+)</span>', text)[:40]:
        assert 1 <= int(line) <= len(source.splitlines())


def _hidden_sum(d):
    return d.layers[0].delta_formula.atoms(sp.Sum).pop()


def test_kernel_snippet_brings_loop_headers_and_temporaries(compiled):
    """The generator records which lines each kernel step writes (the module's PROVENANCE);
    a formula's snippet is its steps whole: the GEMM's comment and call, the loop headers
    (as context), hoisted constants and CSE temporaries, never the function's preamble."""
    model = compiled(NetSpec("snippet-tanh-mse", 3, ((4, "tanh"), (2, "identity")), "mse"), "float64")
    source = model.source_path.read_text(encoding="utf-8")
    prov = model.kernels.PROVENANCE
    snip = kernel_snippet(source, prov, "backward", ("dZ1",), ("Sum(W2[i, p]*delta2[n, i], (i, 0, d_2 - 1))",))
    texts = [(t.strip(), hit) for _, t, hit in snip.lines if _ is not None]
    assert ("gemm(dZ2, False, W2, False, dZ1, ONE, ZERO, scal)", True) in texts
    assert ("for n in range(nb):", False) in texts
    assert any(t.startswith("dZ1[n, p] =") and hit for t, hit in texts)
    assert ("nb = X.shape[0]", False) not in texts and not any(t.startswith('"""') for t, _ in texts)
    for k, text, _ in snip.lines:  # every line is the module's own
        assert k is None or source.splitlines()[k - 1] == text
    assert kernel_snippet(source, prov, "forward", ("dZ1",)) is None
    assert kernel_snippet(source, prov, "backward", ("Q9",)) is None


# --------------------------------------------------------------------------------------------
# The math renders: headless Chromium
# --------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def _run_chromium(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="symbp-chromium-")
    try:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args],
            cwd=cwd, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


_MEASURE = """<pre id="symbp-measure"></pre><script>
const box = e => e.getBoundingClientRect();
const out = {math: [], frac: [], under: [], sub: []};
for (const m of document.querySelectorAll("math")) {
  const r = box(m); out.math.push([r.width, r.height, getComputedStyle(m).display]);
}
for (const f of document.querySelectorAll("mfrac")) {
  const [a, b] = [box(f.children[0]), box(f.children[1])]; out.frac.push([a.bottom, b.top]);
}
for (const u of document.querySelectorAll("munderover")) {
  const [s, lo, hi] = [box(u.children[0]), box(u.children[1]), box(u.children[2])];
  out.under.push([s.top, s.bottom, lo.bottom, hi.top]);
}
for (const s of document.querySelectorAll("msub, msubsup")) {
  const [b, i] = [box(s.children[0]), box(s.children[1])]; out.sub.push([b.bottom, i.bottom, b.right, i.left]);
}
document.getElementById("symbp-measure").textContent = JSON.stringify(out);
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="no Chromium to render the page (install the chromium package)")
def test_math_renders_in_chromium(page, tmp_path):
    """Chromium lays MathML out natively: a fraction's numerator sits above its denominator,
    a sum's lower limit below the Σ, a subscript lower than its base.  A browser without
    MathML would put each pair side by side on one line, and this test would fail."""
    _, path, text = page
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</main></body>", "</main>" + _MEASURE + "</body>"), encoding="utf-8")
    done = _run_chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path)
    found = re.search(r'<pre id="symbp-measure">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1), done.stderr[-2000:]
    m = json.loads(html.unescape(found.group(1)))
    assert len(m["math"]) == text.count("<math ")
    assert all(d in ("math", "inline math", "block math") for _, _, d in m["math"])
    assert all(w > 8 and h > 8 for w, h, _ in m["math"])
    assert len(m["frac"]) >= 30 and all(num_bottom <= den_top + 1 for num_bottom, den_top in m["frac"])
    # Σ's limits: below and above it in display style, or to its lower and upper right inside a fraction
    assert len(m["under"]) >= 10 and all(lo_bottom > s_bottom + 1 and hi_top < s_top - 1
                                         for s_top, s_bottom, lo_bottom, hi_top in m["under"])
    assert len(m["sub"]) >= 100 and all(sub_bottom > base_bottom and sub_left >= base_right - 1
                                        for base_bottom, sub_bottom, base_right, sub_left in m["sub"])
    shot = tmp_path / "report.png"
    done = _run_chromium([f"--screenshot={shot}", "--window-size=1300,2600", path.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 100_000, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, no half-written report
# --------------------------------------------------------------------------------------------
def test_bad_output_paths_are_refused_before_any_work(tmp_path):
    net = swish_net()
    with pytest.raises(ValueError, match="does not exist"):
        report(net, tmp_path / "missing" / "r.html")
    with pytest.raises(ValueError, match="must end in .html, .htm"):
        report(net, tmp_path / "r.pdf")
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(ValueError, match="it is a directory"):
        report(net, tmp_path / "dir.html")
    with pytest.raises(TypeError, match="Network or a compiled Model"):
        report("net.toml", tmp_path / "r.html")
    with pytest.raises(ValueError, match="graph must be True, False or 'auto'"):
        report(net, tmp_path / "r.html", graph="yes")


def test_failure_leaves_no_half_written_report(compiled, tmp_path):
    model = compiled(swish_net(), "float64")
    old = tmp_path / "r.html"
    old.write_text("the previous report")
    with pytest.raises(ValueError, match=r"params\['W2'\] has shape \(2, 2\), expected \(2, 3\)"):
        report(model, old, params={"W1": [[1.0, 0.0]] * 3, "b1": [0.0] * 3, "W2": [[1.0, 0.0]] * 2, "b2": [0.0] * 2})
    assert old.read_text() == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_a_network_without_kernels_cannot_be_reported(tmp_path):
    u = sp.Symbol("u")
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation=sp.LambertW(u)), sb.Dense(1)], loss="mse")
    with pytest.raises(ValueError, match="cannot generate kernels for this network.*LambertW"):
        report(net, tmp_path / "r.html", cache_dir=tmp_path)
    assert not (tmp_path / "r.html").exists()


def test_cli_report(session_cache_dir, tmp_path, monkeypatch, capsys, page):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(session_cache_dir))
    spec = tmp_path / "swish.toml"
    spec.write_text(SPEC)
    out = tmp_path / "out.html"
    assert cli(["report", str(spec), "-o", str(out), "--dtype", "float64", "--no-graph"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "<svg" not in text and text.count("<math ") >= 60 and "all agree" in text
    assert "x = <code>[0.5, -1]</code>" in text  # the spec's [walkthrough] sample
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.replace('type = "dense"', "").replace("units = 3", 'units = 3\ntype = "conv"'))
    assert cli(["report", str(bad), "-o", str(tmp_path / "bad.html")]) == 2
    assert "unknown layer type 'conv'" in capsys.readouterr().err
    assert not (tmp_path / "bad.html").exists()


def test_report_shows_a_trained_models_update_rule(compiled):
    model = compiled(swish_net(), "float64")
    assert 'id="update"' not in report(model, graph=False)
    x = [[0.5, -1.0], [1.0, 0.25]]
    model.fit(x, [[0.1, 0.2], [0.0, 1.0]], optimizer=sb.RMSprop(lr=0.01, centered=True), epochs=1,
              progress=False)
    page = report(model, graph=False)
    assert 'id="update"' in page and "Update rule: RMSprop(centered=True)" in page
    assert page.count("<mo>&#8592;</mo>") == 3  # square_avg, grad_avg, θ
    # each statement beside the training module's lines that run it (for W1)
    section = page[page.index('id="update"'):page.index('id="example"')]
    train_file = Path(model._train_kernels(model.optimizer).__file__).name
    assert section.count(f"{train_file} · backward_update()") == 3 and "nomatch" not in section
    code = html.unescape(re.sub(r"<[^>]+>", "", section))
    for line in ("square_avg_W1[p, q] = ", "grad_avg_W1[p, q] = ", "W1[p, q] = "):
        assert line in code, line


def test_report_finds_plain_sgd_in_its_gemm(compiled):
    """Plain SGD has no update loop: it rides on the weight-gradient GEMM, found by its comment."""
    model = compiled(swish_net(), "float64")
    model.fit([[0.5, -1.0]], [[0.1, 0.2]], optimizer=sb.SGD(lr=0.1), epochs=1, progress=False)
    section = report(model, graph=False)
    section = html.unescape(re.sub(r"<[^>]+>", "", section[section.index('id="update"'):section.index('id="example"')]))
    # the net's l2 = 0.01 rides along: W1 ← (1 − lr·λ)·W1 − lr·δᵀx
    assert "# W1 ← (1 - h_lr/100)·W1 + (-h_lr)·dZ1ᵀ·X" in section and "gemm(dZ1, True, X, False, W1" in section
