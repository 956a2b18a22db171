"""Explanations in text, LaTeX and Markdown: the right formulas, shapes, both δ cases, the
scalar view, the vector form (checked numerically against the index form) and the printers.

The expected formulas are written out here by hand, from the textbook: they are the
independent reference for what SymPy derived and the printers show.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy as sp
from scipy.special import expit

import symbp as sb
from symbp.cli import main as cli
from symbp.indices import N, i, n, p, q
from symbp.read import printing
from symbp.read.explain import MAX_SCALAR_UNITS, build, vector_form
from symbp.read.printing import MatVec, Outer, Partial, Vec
from symbp.read.walkthrough import evaluate


@pytest.fixture(scope="module")
def digits():
    """The README's 64-64-10 tanh network with softmax cross-entropy and l2."""
    net = sb.Network(inputs=64, layers=[sb.Dense(64, activation="tanh"), sb.Dense(10)],
                     loss="softmax_cross_entropy", l2=1e-4, name="digits-mlp")
    return sb.derive(net)


@pytest.fixture(scope="module")
def classic():
    """The classic 2-2-2 sigmoid network with the MSE loss."""
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2, activation="sigmoid")],
                     loss="mse", name="classic-2-2-2")
    return sb.derive(net)


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def has_line(text: str, start: str) -> str:
    found = [line for line in lines_of(text) if line.startswith(start)]
    assert found, f"no line starting with {start!r}"
    return found[0]


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def test_text_has_every_part_with_the_textbook_formulas(digits):
    text = digits.explain()
    # forward pass, z = W x + b then a = f(z), in index and vector form, with shapes
    assert has_line(text, "z1[n,i] = Σ_j W1[i,j]·x[n,j] + b1[i]").endswith("(N, 64)")
    assert has_line(text, "a1[n,i] = tanh(z1[n,i])").endswith("(N, 64)")
    assert has_line(text, "z2[n,i] = Σ_j W2[i,j]·a1[n,j] + b2[i]").endswith("(N, 10)")
    assert "z1 = W1·x + b1" in text and "a1 = tanh(z1)" in text
    # local derivatives: ∂z/∂W is the layer's input, f′ of tanh the textbook way
    assert "∂z1[n,i]/∂W1[p,q] = δ_ip·x[n,q]" in text and "forward-pass part" in text
    assert "∂z2[n,i]/∂a1[n,q] = W2[i,q]" in text
    assert "tanh′(z) = 1 - tanh(z)² = 1 - a²" in text
    # the loss and its gradient with respect to the logits
    assert has_line(text, "ℓ_n = log(Σ_j exp(y[n,j])) - Σ_k t[n,k]·y[n,k]").endswith("(N,)")
    assert "∂ℓ_n/∂y[n,p] = softmax[n,p] - t[n,p]" in text
    assert "softmax[n,p] = exp(y[n,p])/Σ_j exp(y[n,j])" in text
    # backward pass from the output layer back, both cases named
    out_case, hidden_case = text.index("Layer 2 (output-layer case)"), text.index("Layer 1 (hidden-layer case)")
    assert out_case < hidden_case
    assert "δ2[n,p] = ∂ℓ_n/∂y[n,p]/N = (softmax[n,p] - t[n,p])/N" in text
    assert "δ1[n,p] = tanh′(z1[n,p])·Σ_i W2[i,p]·δ2[n,i] = (1 - a1[n,p]²)·Σ_i W2[i,p]·δ2[n,i]" in text
    assert "δ1 = (1 - a1²) ⊙ (W2ᵀ·δ2)" in text
    # parameter gradients: δ xᵀ, δ, plus λW; shapes like the parameters
    assert "∂C/∂W1[p,q] = Σ_n,i δ_ip·δ1[n,i]·x[n,q] + λ·W1[p,q] = Σ_n δ1[n,p]·x[n,q] + λ·W1[p,q]" in text
    assert "∂C/∂b1[p] = Σ_n,i δ_ip·δ1[n,i] = Σ_n δ1[n,p]" in text
    assert "(64, 64)" in has_line(text, "∂C/∂W1 = Σ_n δ1[n]·x[n]ᵀ + λ·W1")
    assert "∂C/∂b2 = Σ_n δ2[n]" in text
    # l2 term and its value
    assert "= λ·W[p,q]" in text and "λ = 0.0001" in text
    # shapes and parameter counts
    assert re.search(r"^\s*1\s+Dense\(64\)\s+tanh\s+\(64, 64\)\s+\(64,\)\s+4160\s+\(N, 64\)", text, re.M)
    assert re.search(r"^\s*2\s+Dense\(10\)\s+identity\s+\(10, 64\)\s+\(10,\)\s+650\s+\(N, 10\)", text, re.M)
    assert re.search(r"^\s*total\s+4810$", text, re.M)


def test_sections_come_in_lecture_order(digits):
    text = digits.explain()
    order = [text.index(s) for s in ("Shapes and parameters", "Forward pass", "Loss softmax_cross_entropy",
                                     "Backward pass, from the output layer back", "The l2 term", "Notation")]
    assert order == sorted(order)
    assert "Scalar view" not in text


@pytest.mark.parametrize("activation, derivative", [
    ("sigmoid", "σ′(z) = σ(z)·(1 - σ(z)) = a·(1 - a)"),
    ("relu", "relu′(z) = H(z)"),
    ("softplus", "softplus′(z) = σ(z)"),
    ("elu", "elu′(z) = {1 if z > 0; exp(z) otherwise}"),
    ("z*sigmoid(z)", "f′(z) = σ(z)·(z·(1 - σ(z)) + 1)"),  # a custom formula, simplified
    ("z*tanh(log(1 + exp(z)))", "f′(z) = z·σ(z)/cosh(softplus(z))² + tanh(softplus(z))"),  # mish
    ("z/(1 + abs(z))", "f′(z) = 1/(|z| + 1)²"),  # softsign: z·sign(z) folds to |z|; a lone 1/x² prints as one
    ("erf(z)", "f′(z) = 2·exp(-z²)/√π"),
])
def test_activation_derivatives_read_the_textbook_way(activation, derivative):
    net = sb.Network(inputs=3, layers=[sb.Dense(2, activation=activation), sb.Dense(2)], loss="mse")
    assert derivative in sb.derive(net).explain()


def test_custom_loss_gradient_is_shown_simplified_too():
    net = sb.Network(inputs=2, layers=[sb.Dense(2)], loss="log(cosh(y - t))")
    line = has_line(sb.derive(net).explain(), "∂ℓ_n/∂y[n,p] =")
    formula = line.split("    ")[0]
    assert formula == "∂ℓ_n/∂y[n,p] = -sinh(t[n,p] - y[n,p])/(d₁·cosh(t[n,p] - y[n,p])) = -tanh(t[n,p] - y[n,p])/d₁"


def test_output_activation_shows_the_chain_rule_factor():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid")], loss="mse")
    text = sb.derive(net).explain()
    assert "δ1[n,p] = ∂ℓ_n/∂y[n,p]·σ′(z1[n,p])/N = 2·a1[n,p]·(1 - a1[n,p])·(a1[n,p] - t[n,p])/(N·d₁)" in text
    assert "output-layer case: (1/N)·∂ℓ/∂y ⊙ f′(z)" in text


# --------------------------------------------------------------------------------------------
# Scalar view
# --------------------------------------------------------------------------------------------
def test_scalar_view_names_every_weight_like_the_lecture(classic):
    text = classic.explain(scalar=True)
    for line in ("w₁ = W1[0,0]    x₁ → h₁", "w₃ = W1[1,0]    x₁ → h₂", "w₅ = W2[0,0]    h₁ → o₁",
                 "w₇ = W2[1,0]    h₁ → o₂", "b₄ = b2[1]      bias of o₂"):
        assert line in text
    assert "z_h₁ = w₁·x₁ + w₂·x₂ + b₁" in text and "h₁ = σ(z_h₁)" in text
    assert "z_o₂ = w₇·h₁ + w₈·h₂ + b₄" in text
    assert "ℓ = (o₁ - t₁)²/2 + (o₂ - t₂)²/2" in text
    assert "∂C/∂z_o₁ = ∂ℓ/∂o₁·σ′(z_o₁)/N = o₁·(1 - o₁)·(o₁ - t₁)/N" in text
    # the example: ∂C/∂z = σ′(z)[w₃ ∂C/∂z′ + w₄ ∂C/∂z″]
    assert ("∂C/∂z_h₁ = σ′(z_h₁)·(w₅·∂C/∂z_o₁ + w₇·∂C/∂z_o₂) = h₁·(1 - h₁)·(w₅·∂C/∂z_o₁ + w₇·∂C/∂z_o₂)"
            in text)
    assert "∂C/∂w₅ = Σ_n h₁·∂C/∂z_o₁" in text  # no λ term: this network has no l2
    assert "∂C/∂b₃ = Σ_n ∂C/∂z_o₁" in text


def test_scalar_view_keeps_the_l2_term_and_orders_names_naturally():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="relu"), sb.Dense(3)], loss="softmax_cross_entropy",
                     l2=0.1)
    text = sb.derive(net).explain(scalar=True)
    assert "∂C/∂w₁ = Σ_n x₁·∂C/∂z_h₁ + λ·w₁" in text
    assert "(w₅·∂C/∂z_o₁ + w₇·∂C/∂z_o₂ + w₉·∂C/∂z_o₃)" in text  # w₉ before w₁₁-style names
    assert "softmax₁ = exp(o₁)/(exp(o₁) + exp(o₂) + exp(o₃))" in text


def test_scalar_view_refuses_wide_layers(digits):
    with pytest.raises(ValueError, match=rf"at most {MAX_SCALAR_UNITS} units per layer; the input has 64"):
        digits.explain(scalar=True)


def test_build_rejects_what_is_not_a_derivation():
    with pytest.raises(TypeError, match="Derivation"):
        build("not a derivation")


# --------------------------------------------------------------------------------------------
# The vector form, checked numerically against the index form
# --------------------------------------------------------------------------------------------
def _eval_vector(expr, env: dict, values: dict):
    """A small evaluator for the vector form: Vec, MatVec, Outer, Σ_n over one sample."""
    if isinstance(expr, Vec):
        arr = env[expr.label]
        return arr[0] if arr.ndim == 2 and expr.label not in ("W1", "W2", "W3") else arr
    if isinstance(expr, MatVec):
        m, v, t = expr.args
        mat = env[m.label]
        return (mat.T if t else mat) @ _eval_vector(v, env, values)
    if isinstance(expr, Outer):
        return np.outer(_eval_vector(expr.args[0], env, values), _eval_vector(expr.args[1], env, values))
    if isinstance(expr, sp.Sum):  # one sample: the batch sum is its only term
        return _eval_vector(expr.function, env, values)
    if isinstance(expr, sp.Add):
        return sum(_eval_vector(a, env, values) for a in expr.args)
    if isinstance(expr, sp.Mul):
        out = 1.0
        for a in expr.args:
            out = out * _eval_vector(a, env, values)
        return out
    if isinstance(expr, sp.Pow):
        return _eval_vector(expr.base, env, values) ** float(expr.exp)
    if isinstance(expr, sp.tanh):
        return np.tanh(_eval_vector(expr.args[0], env, values))
    if isinstance(expr, sb.Activation("sigmoid").expr.func):
        return expit(_eval_vector(expr.args[0], env, values))
    if expr.is_Number:
        return float(expr)
    if expr in values:
        return float(values[expr])
    raise NotImplementedError(expr)


def test_vector_form_equals_the_index_form_numerically():
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2, activation="sigmoid")],
                     loss="mse", l2=0.3)
    d = sb.derive(net)
    rng = np.random.default_rng(5)
    env = {"x": rng.normal(size=(1, 3)), "t": rng.normal(size=(1, 2))}
    for ld in d.layers:
        env[f"W{ld.index}"] = rng.normal(size=(net.widths[ld.index], net.widths[ld.index - 1]))
        env[f"b{ld.index}"] = rng.normal(size=net.widths[ld.index])
        env[f"z{ld.index}"] = rng.normal(size=(1, net.widths[ld.index]))
        env[f"a{ld.index}"] = rng.normal(size=(1, net.widths[ld.index]))
        env[f"delta{ld.index}"] = rng.normal(size=(1, net.widths[ld.index]))
    values = {N: 1, sp.Symbol("lambda", nonnegative=True): 0.3, **{d.dims[l]: w for l, w in enumerate(net.widths)}}
    checked = 0
    for ld in d.layers:
        for expr, free in [(ld.forward, (i,)), (ld.output, (i,)), (ld.delta_formula, (p,)),
                           (ld.grads["W"], (p, q)), (ld.grads["b"], (p,))]:
            vf = vector_form(expr, free)
            assert vf is not None, expr
            index_value = evaluate(expr, env, ((n,) + free) if free != (p, q) else free, values)
            if free != (p, q):
                index_value = index_value[0]
            np.testing.assert_allclose(_eval_vector(vf.subs(values), env, values), index_value, rtol=1e-12)
            checked += 1
    assert checked == 10
    # W2ᵀ·δ2, not W2·δ2: the transpose sits where the index order says
    assert printing.text(vector_form(d.layers[0].delta_formula, (p,))) == "(1 - a1²) ⊙ (W2ᵀ·δ2)"


def test_vector_form_is_none_where_there_is_none(digits):
    assert vector_form(digits.loss.per_sample, ()) is None  # Σ over output units inside a log
    assert vector_form(digits.layers[0].local["dz/dW"], (p, q)) is None  # a Kronecker delta


# --------------------------------------------------------------------------------------------
# LaTeX and Markdown
# --------------------------------------------------------------------------------------------
def test_latex_is_ascii_balanced_and_textbook(digits):
    tex = digits.latex()
    assert tex.isascii()
    assert tex.count("{") == tex.count("}")
    assert tex.count(r"\begin{align*}") == tex.count(r"\end{align*}") >= 8
    assert r"z^{(1)}_{ni} &= \sum_{j=0}^{d_{0} - 1} W^{(1)}_{ij} x_{nj} + b^{(1)}_{i}" in tex
    assert r"\delta^{(1)}_{np} &= \tanh'\left(z^{(1)}_{np}\right) \sum_{i=0}^{d_{2} - 1} W^{(2)}_{ip} \delta^{(2)}_{ni}" in tex
    assert r"\left(1 - \left(a^{(1)}_{np}\right)^{2}\right)" in tex  # no double superscript a^{(1)}_{np}^{2}
    assert r"\frac{\partial C}{\partial W^{(1)}_{pq}}" in tex
    assert r"\delta^{(1)} &= \left(1 - \left(a^{(1)}\right)^{2}\right) \odot \left(W^{(2) \top} \delta^{(2)}\right)" in tex
    assert r"\operatorname{softmax}_{np} - t_{np}" in tex
    assert r"\text{(N, 64)}" in tex
    assert r"\documentclass" not in tex


def test_latex_activation_derivative():
    net = sb.Network(inputs=2, layers=[sb.Dense(2, activation="sigmoid"), sb.Dense(2)], loss="mse")
    tex = sb.derive(net).latex()
    assert r"\sigma'\left(z\right) &= \sigma\left(z\right) \left(1 - \sigma\left(z\right)\right) = a \left(1 - a\right)" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (texlive-latex-base)")
def test_standalone_latex_compiles(classic, tmp_path):
    tex = classic.latex(scalar=True, standalone=True, optimizer=sb.AdamW(amsgrad=True))  # every optimizer symbol
    assert tex.startswith(r"\documentclass")
    (tmp_path / "doc.tex").write_text(tex, encoding="ascii")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 10_000


def test_markdown_has_tables_headings_and_math_blocks(digits):
    md = digits.markdown()
    assert md.startswith("# Backpropagation in digits-mlp\n")
    assert "| 1 | Dense(64) | tanh | (64, 64) | (64,) | 4160 | (N, 64) |" in md
    assert "| **total** | | | | | **4810** | |" in md
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:5] == ["## Shapes and parameters", "## Forward pass", "## Loss softmax_cross_entropy",
                            "## Backward pass, from the output layer back", "## The l2 term"]
    assert "### Layer 1 (hidden-layer case): δ1 = ∂C/∂z1" in md
    blocks = re.findall(r"^\$\$\n\\begin\{aligned\}\n(.*?)\n\\end\{aligned\}\n\$\$$", md, re.M | re.S)
    assert len(blocks) == md.count("\\begin{aligned}") >= 8
    assert any(r"\delta^{(2)}_{np} &= \frac{1}{N} \frac{\partial \ell_{n}}{\partial y_{np}}" in b for b in blocks)


@pytest.mark.parametrize("opt", [sb.Adam(lr=0.01, weight_decay=0.1, amsgrad=True),
                                 sb.SGD(lr=0.1, momentum=0.9, nesterov=True),
                                 sb.FormulaOptimizer("theta - lr*m", state={"m": "beta*m + g"}, lr=0.1, beta=0.9)])
def test_explained_update_rule_is_the_step_the_kernels_take(compiled, opt):
    """Evaluate the statements explain() prints on θ, g and the state, in order: they must give
    the parameters and state of one fused training step (full batch, t = 1)."""
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], loss="mse", name="upd")
    model = compiled(net, "float64", seed=2)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    doc = build(sb.derive(net), optimizer=opt)
    section = doc.sections[-1]
    assert section.title == f"Update rule: {opt.describe()}" and section.anchor == "update"
    statements = [(eq.parts[0], eq.parts[1]) for eq in section.blocks[0].equations]
    assert statements == opt.formulas() and {eq.relation for eq in section.blocks[0].equations} == {"←"}
    before = {k: v.copy() for k, v in model.params.items()}
    _, grads = model.loss_and_grads(X, y)
    model.fit(X, y, optimizer=opt, batch_size=len(X), epochs=1, shuffle=False, progress=False)
    hyper = {sp.Symbol(k, real=True): v for k, v in opt.hyper.items()}
    for name, theta in before.items():
        values = {"theta": theta, "g": grads[name], "t": 1.0,
                  **{s_: np.full(theta.shape, opt.state_init(s_)) for s_ in opt.state_names}}
        for target, value in statements:
            value = value.subs(hyper)
            args = sorted(value.free_symbols, key=str)
            values[str(target)] = sp.lambdify(args, value, "numpy")(*(values[str(a)] for a in args)) * np.ones(theta.shape)
        np.testing.assert_allclose(values["theta"], model.params[name], rtol=1e-12, atol=1e-15)
        for s_ in opt.state_names:
            np.testing.assert_allclose(values[s_], opt.state[name][s_], rtol=1e-12, atol=1e-15)


def test_update_rule_reads_in_text_latex_and_the_cli(classic, tmp_path, capsys):
    text = classic.explain(optimizer=sb.Adam())
    assert "Update rule: Adam()" in text
    assert "exp_avg ← β₁·exp_avg + g·(1 - β₁)" in text and "θ ← θ - lr·exp_avg/((1 - β₁^t)·" in text
    # a word symbol beside another factor keeps a visible · (TeX would set β₁exp_avg touching)
    assert r"\mathrm{exp\_avg} &\leftarrow \beta_{1} \cdot \mathrm{exp\_avg}" in classic.latex(optimizer=sb.Adam())
    assert "Update rule" not in classic.explain()
    spec = tmp_path / "net.toml"
    spec.write_text('inputs = 2\nloss = "mse"\n[[layers]]\nunits = 2\n[train]\nlr = 0.5\n')
    assert cli(["explain", str(spec), "--optimizer", "sgd:momentum=0.9"]) == 0
    out = capsys.readouterr().out
    assert "Update rule: SGD(lr=0.5, momentum=0.9)" in out and "momentum_buffer ← momentum·momentum_buffer + g" in out
    assert cli(["explain", str(spec)]) == 0 and "Update rule" not in capsys.readouterr().out
    spec.write_text(spec.read_text() + 'optimizer = "adagrad"\n')  # the [train] table's own optimizer
    assert cli(["explain", str(spec)]) == 0 and "Update rule: Adagrad(lr=0.5)" in capsys.readouterr().out
    assert cli(["explain", str(spec), "--optimizer", "adamx"]) == 2 and "unknown optimizer 'adamx'" in capsys.readouterr().err
    with pytest.raises(TypeError, match="optimizer must be a symbp optimizer"):
        classic.explain(optimizer="adam")


def test_derivation_methods_and_cli_formats(classic, tmp_path, capsys):
    assert classic.explain(scalar=True).startswith("Backpropagation in classic-2-2-2")
    assert "Scalar view" in classic.markdown(scalar=True)
    spec = tmp_path / "net.toml"
    spec.write_text('inputs = 2\nloss = "mse"\n[[layers]]\nunits = 2\nactivation = "sigmoid"\n')
    assert cli(["explain", str(spec), "--format", "latex"]) == 0
    assert r"\sigma\left(z\right)" in capsys.readouterr().out
    out = tmp_path / "net.md"
    assert cli(["explain", str(spec), "--format", "markdown", "--scalar", "-o", str(out)]) == 0
    assert "z_{h_{1}}" not in out.read_text() or "## Scalar view" in out.read_text()
    assert cli(["explain", str(spec), "--format", "markdown", "-o", str(tmp_path / "missing" / "x.md")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["explain", str(spec), "--format", "latex", "-o", str(tmp_path / "x.md")]) == 2
    assert "must end in .tex" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Printers
# --------------------------------------------------------------------------------------------
def test_printers_agree_on_notation():
    W, delta = sp.IndexedBase("W2"), sp.IndexedBase("delta1")
    j_ = sp.Symbol("j", integer=True)
    cases = [
        (sp.KroneckerDelta(i, p), "δ_ip", r"\delta_{ip}", "<msub><mi>δ</mi><mrow><mi>i</mi><mi>p</mi></mrow></msub>"),
        (sp.Heaviside(sp.Symbol("z"), 0), "H(z)", r"H\left(z\right)", "<mi>H</mi>"),
        (Partial(sp.Symbol("C"), W[p, q]), "∂C/∂W2[p,q]", r"\frac{\partial C}{\partial W^{(2)}_{pq}}", "<mfrac>"),
        (delta[n, p], "δ1[n,p]", r"\delta^{(1)}_{np}", "<msubsup><mi>δ</mi>"),
        (sp.Sum(W[i, j_], (j_, 0, sp.Symbol("d_1") - 1)), "Σ_j W2[i,j]", r"\sum_{j=0}^{d_{1} - 1} W^{(2)}_{ij}",
         "<munderover><mo>∑</mo>"),
    ]
    for expr, text, tex, mml in cases:
        assert printing.text(expr) == text
        assert printing.latex(expr) == tex
        assert mml in html.unescape(printing.mathml(expr))
    pw = sp.Piecewise((1, sp.Symbol("z") > 0), (sp.Rational(1, 100), True))
    assert printing.text(pw) == "{1 if z > 0; 1/100 otherwise}"
    assert printing.latex(pw) == r"\begin{cases} 1 & \text{if } z > 0 \\ \frac{1}{100} & \text{otherwise} \end{cases}"
    assert "<mtable" in printing.mathml(pw) and "otherwise" in printing.mathml(pw)
    assert printing.mathml(W[i, p], display="block").startswith('<math xmlns="http://www.w3.org/1998/Math/MathML" '
                                                                 'display="block">')
