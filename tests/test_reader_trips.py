"""What a new user tripped on in the readers (issue 17, item 6): the relu note of explain(),
the report's training curves and navigation bar, the graph caption's spaces, Adam's lr·exp_avg,
and the optimizer paths picture."""

from __future__ import annotations

import html
import importlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.read.explain import build
from symbp.read.paths import CRITICAL_POINTS, SURFACES, critical_points, run_paths, surface, x_s, y_s
from symbp.read.printing import latex, mathml, text
from symbp.read.report import report

graph_module = importlib.import_module("symbp.read.graph_draw")  # where the graph is built and drawn
ROOT = Path(__file__).resolve().parent.parent


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _dump_dom(page: str, tmp_path: Path, width: int) -> str:
    """The DOM after the page's scripts ran, in headless Chromium at ``width`` px."""
    probe = tmp_path / "probe.html"
    probe.write_text(page, encoding="utf-8")
    profile = tempfile.mkdtemp(prefix="symbp-chromium-")
    try:
        done = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
             f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    found = re.search(r'<pre id="symbp-measure">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1), done.stderr[-2000:]
    return html.unescape(found.group(1))


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="no Chromium to render the page (install chromium)")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")


def dense(activation: str) -> sb.Network:
    return sb.Network(inputs=2, layers=[sb.Dense(3, activation=activation), sb.Dense(2)], loss="mse", name="trip")


# --------------------------------------------------------------------------------------------
# explain(): the unit step's note only where a unit step appears
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation, step", [("tanh", False), ("sigmoid", False), ("relu", True),
                                              ("max(0, z)", True), ("z*sigmoid(z)", False)])
def test_relu_note_only_with_a_unit_step(activation, step):
    d = sb.derive(dense(activation))
    for shown in (d.explain(), d.markdown(), d.latex()):
        assert ("unit step" in shown) is step
    assert ("H(z" in d.explain().split("Notation")[0]) is step  # the note explains what is printed


def test_relu_note_in_a_cnn_only_with_relu():
    def cnn(act):
        return sb.Network(inputs=(1, 5, 5), layers=[sb.Conv2D(2, kernel=3, activation=act), sb.Flatten(), sb.Dense(2)],
                          loss="mse")

    assert "unit step" not in sb.derive(cnn("tanh")).explain()
    assert "unit step" in sb.derive(cnn("relu")).explain()


# --------------------------------------------------------------------------------------------
# Adam's rule: lr·exp_avg, never lrexp_avg
# --------------------------------------------------------------------------------------------
def test_products_of_word_symbols_keep_a_visible_sign():
    lr, avg, sq, beta = sp.symbols("lr exp_avg exp_avg_sq beta1")
    assert latex(lr * avg) == r"\mathrm{lr} \cdot \mathrm{exp\_avg}"
    assert re.fullmatch(r"<mrow><mi[^>]*>lr</mi><mo>&#183;</mo><mi[^>]*>exp_avg</mi></mrow>", mathml(lr * avg))
    assert text(lr * avg) == "lr·exp_avg"
    assert latex(beta * sq) == r"\beta_{1} \cdot \mathrm{exp\_avg\_sq}"
    # single letters still multiply by juxtaposition, as in a textbook
    g, t = sp.symbols("g t")
    assert latex(2 * g * t) == "2 g t" and "&#183;" not in mathml(g * t)


def test_adams_update_rule_prints_lr_times_exp_avg():
    doc = build(sb.derive(dense("tanh")), optimizer=sb.Adam())
    theta = [eq for _, _, eq in doc.equations() if eq.quantity[:2] == ("update", "theta")][0]
    tex, mml = latex(theta.parts[1]), mathml(theta.parts[1])
    assert r"\mathrm{lr} \cdot \mathrm{exp\_avg}" in tex and "lrexp" not in tex.replace(" ", "")
    assert re.search(r"<mi[^>]*>lr</mi><mo>&#183;</mo><mi[^>]*>exp_avg</mi>", mml)


# --------------------------------------------------------------------------------------------
# The graph's SVG text keeps its spaces
# --------------------------------------------------------------------------------------------
_MEASURE_GAPS = r"""<pre id="symbp-measure"></pre><script>
// Every pair of neighbouring <text> runs on one line of the caption: the gap between the last
// glyph of one and the first visible glyph of the next.  Where the browser dropped a run's
// edge spaces it has fewer addressable characters than its text: its glyphs start at 0.
const runs = [...document.querySelectorAll("svg text")].filter(t => t.textContent.includes("flowing")
  || t.textContent.includes("value") || t.textContent.includes("gradient"));
const dropped = t => t.getNumberOfChars() !== t.textContent.length;
const out = [];
for (let k = 0; k + 1 < runs.length; k++) {
  const a = runs[k], b = runs[k + 1];
  if (a.getAttribute("y") !== b.getAttribute("y")) continue;
  const first = dropped(b) ? 0 : b.textContent.search(/\S/);
  const last = dropped(a) ? a.getNumberOfChars() - 1 : a.textContent.replace(/\s+$/, "").length - 1;
  out.push([a.textContent, b.textContent, b.getStartPositionOfChar(first).x - a.getEndPositionOfChar(last).x]);
}
document.getElementById("symbp-measure").textContent = JSON.stringify(out);
</script>"""


@needs_dot
def test_graph_svg_text_keeps_the_spaces_between_font_runs(compiled):
    w = sb.walkthrough(compiled(dense("sigmoid"), "float64"), x=[0.5, -1.0], t=[0.2, 0.7])
    svg = w.graph().svg()
    runs = re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)
    assert any(r.startswith("&#160;flowing forward") for r in runs)
    assert not [r for r in runs if r != r.strip(" ")]  # a plain edge space would be dropped


@needs_dot
@needs_chromium
@pytest.mark.parametrize("fixed", [True, False])
def test_graph_caption_words_stay_apart_in_chromium(compiled, tmp_path, monkeypatch, fixed):
    """Measured in Chromium: with Graphviz's own SVG ("fixed" False) "value" runs into
    "flowing"; with the spaces kept every pair of runs has a space's width between them."""
    if not fixed:
        monkeypatch.setattr(graph_module, "_keep_edge_spaces", lambda svg: svg)
    w = sb.walkthrough(compiled(dense("sigmoid"), "float64"), x=[0.5, -1.0], t=[0.2, 0.7])
    page = f"<!DOCTYPE html><html><body>{w.graph().svg()}{_MEASURE_GAPS}</body></html>"
    gaps = json.loads(_dump_dom(page, tmp_path, 1400))
    pairs = {(a.strip(" \u00a0"), b.strip(" \u00a0")[:7]): gap for a, b, gap in gaps}
    assert {("value", "flowing"), ("gradient ∂C/∂value", "flowing"), ("flowing forward and the", "gradien")} <= set(pairs)
    # about a space's width (3.5 px at 11 pt) between any two runs, or touching
    assert all(gap > 2 for gap in pairs.values()) is fixed, pairs


# --------------------------------------------------------------------------------------------
# The report: the checkpoint's curves, a navigation bar that wraps
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(compiled, tmp_path_factory):
    model = compiled(dense("tanh"), "float64")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    model.fit(X[:30], y[:30], optimizer=sb.Adam(lr=0.01), epochs=4, validation_data=(X[30:], y[30:]), progress=False)
    path = model.save(tmp_path_factory.mktemp("ckpt") / "run.npz")
    return model, path


def test_report_of_a_checkpoint_shows_its_training_curves(trained_checkpoint):
    model, path = trained_checkpoint
    loaded = sb.load(path)
    assert loaded.history.epoch == [0, 1, 2, 3]
    page = report(loaded, graph=False)
    section = page[page.index('<h2 id="training">'):page.index('<h2 id="forward">')]
    assert '<a href="#training">Training</a>' in page
    assert "4 epochs with Adam(lr=0.01)" in section
    svg = section[section.index("<svg"):section.index("</svg>")]
    # regression: one loss panel, a polyline for train and one for validation, 4 points each
    polylines = re.findall(r'<polyline points="([^"]+)"', svg)
    assert len(polylines) == 2 and all(len(p.split()) == 4 for p in polylines)
    # the drawn train curve goes down as the recorded losses do (SVG y grows downwards)
    ys = [float(pt.split(",")[1]) for pt in polylines[0].split()]
    losses = loaded.history["loss"]
    assert np.all(np.sign(np.diff(ys)) == -np.sign(np.diff(losses)))
    last_loss = f"{losses[-1]:.4g}"
    assert f'<td>loss</td><td class="num">{last_loss}</td>' in section
    for forbidden in ("<script", "src=", "url(", "<link"):
        assert forbidden not in section


def test_report_of_an_untrained_model_has_no_training_section(compiled):
    page = report(compiled(dense("tanh"), "float64"), graph=False)
    assert 'id="training"' not in page and "#training" not in page


_MEASURE_NAV = """<pre id="symbp-measure"></pre><script>
const links = [...document.querySelectorAll("nav a")].map(a => {
  const r = a.getBoundingClientRect(); return [a.textContent, r.left, r.right, r.top];
});
document.getElementById("symbp-measure").textContent =
  JSON.stringify({width: document.documentElement.clientWidth, links});
</script>"""


@needs_chromium
@pytest.mark.parametrize("width", [1280, 700])
def test_report_navigation_wraps_with_every_link_on_screen(trained_checkpoint, tmp_path, width):
    model, _ = trained_checkpoint
    page = report(model, graph=False, optimizer=sb.Adam())
    m = json.loads(_dump_dom(page.replace("</main></body>", "</main>" + _MEASURE_NAV + "</body>"), tmp_path, width))
    names = [name for name, *_ in m["links"]]
    assert "Worked example" in names and "Generated module" in names and len(names) >= 8
    assert all(0 <= left and right <= m["width"] for _, left, right, _ in m["links"]), m
    assert len({round(top) for *_, top in m["links"]}) >= 2  # more than one row: it wrapped


# --------------------------------------------------------------------------------------------
# symbp paths: every path visible, the minimum marked
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SURFACES))
def test_each_stated_critical_point_is_one(name):
    f, _ = surface(name)
    value = sp.lambdify((x_s, y_s), f)
    grad = [sp.lambdify((x_s, y_s), sp.diff(f, v)) for v in (x_s, y_s)]
    hessian = sp.lambdify((x_s, y_s), sp.hessian(f, (x_s, y_s)))
    for x, y, kind in CRITICAL_POINTS[name]:
        assert max(abs(g(x, y)) for g in grad) < 1e-9, (name, x, y)
        eig = np.linalg.eigvalsh(np.asarray(hessian(x, y), dtype=float))
        if kind == "minimum":
            assert eig.min() > 0 and abs(value(x, y)) < 1e-12  # these minima all have f = 0
        else:
            assert eig.min() < 0 < eig.max()


def test_critical_points_of_a_quadratic_formula_come_from_sympy():
    assert critical_points(surface("x**2 + 10*y**2")[0]) == [(0.0, 0.0, "minimum")]
    assert critical_points(surface("(x - 1)**2 + 3*(y + 2)**2")[0]) == [(1.0, -2.0, "minimum")]
    assert critical_points(surface("x*y")[0]) == [(0.0, 0.0, "saddle point")]
    assert critical_points(surface("x**2")[0]) == []  # a line of minima: nothing to mark
    assert critical_points(surface("sin(x) + y**2")[0]) == []  # not solved: no mark rather than a guess


def _pixels_near(rgb: np.ndarray, color: str, tol: int = 40) -> int:
    target = np.array([int(color[k:k + 2], 16) for k in (1, 3, 5)])
    return int(np.sum(np.abs(rgb.astype(int) - target).max(axis=-1) <= tol))


def test_rosenbrock_picture_shows_every_path_and_the_minimum(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots extra: pip install -e '.[plots]'")
    import matplotlib.pyplot as plt

    from symbp.cli import make_optimizer
    from symbp.read.paths import _LOOKS, plot_paths

    # the command line's default four, which used to hide SGD and RMSprop under Adam
    opts = [make_optimizer("sgd", {"lr": 1e-3}), make_optimizer("sgd", {"lr": 1e-3, "momentum": 0.9}),
            make_optimizer("rmsprop", {"lr": 1e-2}), make_optimizer("adam", {"lr": 5e-2})]
    paths, f = run_paths("rosenbrock", opts, steps=200)
    fig = plot_paths(paths, f, tmp_path / "p.png", bounds=SURFACES["rosenbrock"][2])
    try:
        ax = fig.axes[0]
        labels = ax.get_legend().get_texts()
        legend = [t.get_text() for t in labels]
        assert legend[:4] == [f"{d}: f = {p.values[-1]:.3g} after 200 steps" for d, p in
                              zip(["SGD(lr=0.001)", "SGD(momentum=0.9, lr=0.001)", "RMSprop(lr=0.01)", "Adam(lr=0.05)"],
                                  paths)]
        assert "minimum (1, 1)" in legend and "start" in legend
        minimum = [ln for ln in ax.lines if ln.get_label() == "minimum (1, 1)"][0]
        assert list(minimum.get_xdata()) == [1.0] and list(minimum.get_ydata()) == [1.0]
        styles = {(ln.get_color(), str(ln.get_linestyle()), ln.get_marker()) for ln in ax.lines
                  if ln.get_label() in legend[:4]}
        assert len(styles) == 4
        fig.canvas.draw()
        together = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # Rendered: at least half of what each path shows when drawn alone still shows beside the
    # others (the old picture showed 8% of RMSprop's and 39% of SGD's, under Adam's).
    for k, p in enumerate(paths):
        alone = plot_paths([p], f, bounds=SURFACES["rosenbrock"][2])
        alone.canvas.draw()
        solo = _pixels_near(np.asarray(alone.canvas.buffer_rgba())[..., :3], _LOOKS[0][0])
        plt.close(alone)
        shown = _pixels_near(together, _LOOKS[k][0])
        assert solo > 200 and shown >= 0.5 * solo, (p.label, shown, solo)


def test_readme_paths_commands_write_different_pictures():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("symbp paths ")]
    assert len(commands) >= 2
    outputs = [re.search(r"(?:-o|--output) (\S+)", line).group(1) for line in commands]
    assert len(set(outputs)) == len(outputs)
