"""Layers written as one index formula (sb.Layer, issue 14 item 1): parsed safely, derived by
SymPy, lowered to GEMMs where they contract, and equal to PyTorch in float64 to 1e-10 — loss,
every gradient, and trajectories with every optimizer; bad formulas named before any kernel."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from test_optim import CASES

import symbp as sb
from symbp.spec.formula import FormulaError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BIL = "z[n, k] = Sum(W[k, i, j]*x[n, i]*x[n, j], (i, j)) + b[k]"
GLU = "z[n, k] = Sum(U[k, j]*x[n, j], j) * sigmoid(Sum(V[k, j]*x[n, j], j))"
DENSE = "z[n, k] = Sum(W[k, j]*x[n, j], j) + b[k]"


def bil(units=4):
    return sb.Layer(BIL, units=units, params={"W": ("units", "in", "in"), "b": ("units",)}, activation="tanh")


def glu(units=5):
    return sb.Layer(GLU, units=units, params={"U": ("units", "in"), "V": ("units", "in")})


def dense(units=4, activation="relu"):
    return sb.Layer(DENSE, units=units, params={"W": ("units", "in"), "b": ("units",)}, activation=activation)


def net(custom, inputs=5, hidden=3, l2=1e-2):
    """Dense(hidden, tanh) → the custom layer → Dense(3): the custom layer's δ reaches a layer below."""
    return sb.Network(inputs=inputs, layers=[sb.Dense(hidden, activation="tanh"), custom, sb.Dense(3)],
                      loss="softmax_cross_entropy", l2=l2)


def torch_forward(torch, kind, P, X):
    """The same network in PyTorch (float64), from the same weights."""
    h = torch.tanh(X @ P["W1"].T + P["b1"])
    if kind == "bil":
        z = torch.tanh(torch.einsum("kij,ni,nj->nk", P["W2"], h, h) + P["b2"])
    elif kind == "glu":
        z = (h @ P["U2"].T) * torch.sigmoid(h @ P["V2"].T)
    else:
        z = torch.relu(h @ P["W2"].T + P["b2"])
    return z @ P["W3"].T + P["b3"]


def torch_loss_and_grads(kind, model, X, y, l2):
    torch = pytest.importorskip("torch")
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    out = torch_forward(torch, kind, P, torch.tensor(X))
    loss = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    decayed = [k for k in P if k.startswith(("W", "U", "V"))]
    loss = loss + l2 / 2 * sum(P[k].pow(2).sum() for k in decayed)
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in P.items()}


LAYERS = {"bil": bil, "glu": glu, "dense": dense}


@pytest.mark.parametrize("kind", list(LAYERS))
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 7), scale=st.floats(0.2, 2.0))
def test_loss_and_gradients_equal_torch(compiled, kind, seed, rows, scale):
    """Random data, random non-zero weights (biases included), random batch sizes."""
    model = compiled(net(LAYERS[kind]()), "float64", seed=seed % 1000)
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():
        model.params[k] = rng.normal(scale=scale, size=v.shape)
    X, y = rng.normal(size=(rows, 5)), rng.integers(0, 3, rows)
    loss, grads = model.loss_and_grads(X, y)
    ref_loss, ref = torch_loss_and_grads(kind, model, X, y, 1e-2)
    assert abs(loss - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-10, atol=1e-10, err_msg=f"{kind}: d{k}")


@pytest.mark.parametrize("shape", [(2, 1, 3), (6, 4, 2)])
@pytest.mark.parametrize("kind", ["bil", "glu"])
def test_other_shapes_equal_torch(compiled, kind, shape):
    inputs, hidden, units = shape
    custom = bil(units) if kind == "bil" else glu(units)
    model = compiled(net(custom, inputs, hidden), "float64", seed=3)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(5, inputs)), rng.integers(0, 3, 5)
    _, grads = model.loss_and_grads(X, y)
    _, ref = torch_loss_and_grads(kind, model, X, y, 1e-2)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-10, atol=1e-10, err_msg=f"{kind} {shape}: d{k}")
    assert sb.gradcheck(model, X, y) < 1e-6  # finite differences, float64


def torch_trajectory(kind, params, make_opt, X, y, steps, l2):
    torch = pytest.importorskip("torch")
    P = {k: torch.tensor(v.copy(), dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = make_opt(torch, list(P.values()))
    decayed = [k for k in P if k.startswith(("W", "U", "V"))]
    for _ in range(steps):
        opt.zero_grad()
        out = torch_forward(torch, kind, P, torch.tensor(X))
        loss = torch.nn.functional.cross_entropy(out, torch.tensor(y))
        (loss + l2 / 2 * sum(P[k].pow(2).sum() for k in decayed)).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in P.items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", ["bil", "glu"])
def test_every_optimizer_matches_torch(compiled, kind, name):
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
    ours, theirs = CASES[name]
    model = compiled(net(LAYERS[kind]()), "float64", seed=4)
    expected = torch_trajectory(kind, model.params, theirs, X, y, 6, 1e-2)
    model.fit(X, y, optimizer=ours(), batch_size=len(X), epochs=6, shuffle=False, progress=False)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-10, err_msg=f"{kind} {name}: {k}")


def test_contractions_become_gemms(compiled):
    """glu's two products are two GEMMs forward, and the δ it sends down is GEMM, then GEMM
    with β = 1 on top; a Dense written as a formula generates the built-in Dense's kernels."""
    model = compiled(net(glu()), "float64")
    src = model.source_path.read_text()
    forward = src[src.index("def forward"):src.index("def loss_rows")]
    assert "gemm(A1, False, U2, True, As2a, ONE, ZERO, scal)" in forward
    assert "gemm(A1, False, V2, True, As2b, ONE, ZERO, scal)" in forward
    backward = src[src.index("def backward"):src.index("def penalty")]
    assert "gemm(dZgs2a, False, U2, False, dZ1, ONE, ZERO, scal)" in backward
    assert "gemm(dZgs2b, False, V2, False, dZ1, ONE, ONE, scal)" in backward
    built_in = sb.Network(inputs=5, layers=[sb.Dense(4, activation="relu"), sb.Dense(3)], loss="softmax_cross_entropy")
    written = sb.Network(inputs=5, layers=[dense(4), sb.Dense(3)], loss="softmax_cross_entropy")

    def body(model):
        text = model.source_path.read_text()
        return text[text.index('DTYPE ='):text.index("# symbp-checksum")]

    assert body(compiled(built_in)) == body(compiled(written))


def test_sympy_equation_and_toml_round_trip(tmp_path):
    W, x, b, z = (sp.IndexedBase(c_) for c_ in "Wxbz")
    n, k, j = sp.symbols("n k j", integer=True)
    layer = sb.Layer(sp.Eq(z[n, k], sp.Sum(W[k, j] * x[n, j], (j, 0, sp.Symbol("d") - 1)) + b[k]), units=3,
                     params={"W": ("units", "in"), "b": ("units",)}, activation="tanh")
    assert layer.formula == "z[n, k] = b[k] + Sum(W[k, j]*x[n, j], j)"
    spec = tmp_path / "custom.toml"
    spec.write_text('inputs = 4\nloss = "mse"\n\n[[layers]]\ntype = "formula"\n'
                    f'formula = "{BIL}"\nunits = 2\nparams = {{ W = ["units", "in", "in"], b = ["units"] }}\n'
                    'activation = "tanh"\ninit = { b = "zeros" }\n')
    from symbp.cli import load_spec, network_from_spec

    loaded = network_from_spec(load_spec(spec))
    (custom,) = loaded.layers
    assert custom.formula == BIL and custom.params == {"W": ("units", "in", "in"), "b": ("units",)}
    again = sb.Network.from_config(loaded.to_config())
    assert again.fingerprint() == loaded.fingerprint()
    params = loaded.init_params(0, np.dtype("float64"))
    assert np.all(params["b1"] == 0) and np.abs(params["W1"]).max() <= 1 / 4  # fan_in = in·in = 16
    with pytest.raises(sb.spec.formula.FormulaError, match="a sum runs over a whole index, from 0"):
        sb.Layer(sp.Eq(z[n, k], sp.Sum(W[k, j] * x[n, j], (j, 1, 3))), units=3, params={"W": ("units", "in")})


@pytest.mark.parametrize("formula, params, words", [
    ("z[n, k] = Sum(W[k, j]*x[n, j], j) + b[m]", {"W": ("units", "in"), "b": ("units",)}, "index m is neither summed"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], j)", {"W": ("units", "in"), "b": ("units",)}, "parameter b is declared but"),
    ("z[n, k] = Sum(W[k]*x[n, j], j)", {"W": ("units", "in")}, r"W has 2 indices, it is read as W\[k\]"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], j) + c[k]", {"W": ("units", "in")}, "unknown array 'c'"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], i)", {"W": ("units", "in")}, "Sum over i, which its body does not read"),
    ("z[n, k] = Sum(W[k, j], j)", {"W": ("units", "in")}, "does not read the input"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], j)*x[n, j]", {"W": ("units", "in")}, "index j is neither summed"),
    ("z[n, k] = Sum(W[j, k]*x[n, j], j)", {"W": ("units", "in")}, r"index k runs over units in z\[n, k\] but over in"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], j)*Sum(W[k, j]*Sum(x[n, j], j), j)", {"W": ("units", "in")}, "inside another Sum"),
    ("z[n, k] = x[n, k+1]", {}, "plain index names"),
    ("z[k, n] = Sum(W[k, j]*x[n, j], j)", {"W": ("units", "in")}, r"the left-hand side must be z\[n, k\]"),
    ("z[n, k] = Sum(W[k, j]*x[n, j], j)", {"W": ("units", "in"), "X": ("units",)}, "parameter name 'X'"),
    ("z[n, k] = __import__('os')", {"W": ("units", "in")}, "string literals|unknown function"),
])
def test_bad_formulas_are_named(formula, params, words):
    with pytest.raises((FormulaError, ValueError), match=words):
        sb.Layer(formula, units=3, params=params or {"W": ("units", "in")})


# A grammar of index formulas, mostly right and sometimes wrong (a read at the wrong indices,
# an undeclared array, a free index): each must either train and match finite differences,
# or be refused with the parser's (or the layer's) own error — never another exception.
_CORES = ["Sum(W[k, j]*x[n, j], j)", "Sum(V[k, i, j]*x[n, i]*x[n, j], (i, j))", "Sum(W[k, j]*{f}(x[n, j]), j)",
          "{f}(Sum(W[k, j]*x[n, j], j))", "Sum(W[k, j]*x[n, j]*x[n, j], j)", "b[k]*Sum(W[k, j]*x[n, j], j)"]
_FUNCS = ["tanh", "sigmoid", "softplus", "sin", "exp"]
_WRONG = [("x[n, j]", "x[n, k]"), ("W[k, j]", "W[j, k]"), ("b[k]", "c[k]"), ("Sum(", "Sum(x[n, m]*"),
          ("(i, j))", "(i, j, i))"), ("W[k, j]", "W[k]")]


@st.composite
def formulas(draw):
    def core():
        return draw(st.sampled_from(_CORES)).replace("{f}", draw(st.sampled_from(_FUNCS)))

    body = core()
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from([" + ", " * ", " - "]))
        body = f"({body}){op}{draw(st.sampled_from([core(), 'b[k]', '0.5']))}"
    if draw(st.booleans()):
        body = f"{draw(st.sampled_from(_FUNCS))}({body})"
    if draw(st.integers(0, 3)) == 0:
        old, new = draw(st.sampled_from(_WRONG))
        body = body.replace(old, new, 1)
    return f"z[n, k] = {body}"


# Each example generates and JIT-compiles a network (seconds): 8 in a default run, the
# profile's count with --hypothesis-profile=long.
_EXAMPLES = hypothesis.settings.default.max_examples
_EXAMPLES = 8 if _EXAMPLES <= 12 else _EXAMPLES


@given(formulas())
@hypothesis.settings(deadline=None, max_examples=_EXAMPLES)
def test_random_formulas_compile_and_match_finite_differences_or_are_refused(formula):
    params = {"W": ("units", "in"), "b": ("units",), "V": ("units", "in", "in")}
    used = {k: v for k, v in params.items() if f"{k}[" in formula}
    try:
        layer = sb.Layer(formula, units=2, params=used)
    except (FormulaError, ValueError) as err:
        assert "layer formula" in str(err) or "Layer" in str(err), err
        return
    model = sb.compile(sb.Network(inputs=3, layers=[sb.Dense(3, activation="tanh"), layer, sb.Dense(2)],
                                  loss="mse"), dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(4, 3)) * 0.5, rng.normal(size=(4, 2))
    loss, _ = model.loss_and_grads(X, y)
    assert np.isfinite(loss), formula
    assert sb.gradcheck(model, X, y) < 1e-6, formula


def test_explain_shows_the_stages_and_their_gradients():
    """The readers go through a custom layer like a built-in one: its sizes, its stages, the
    gradient of each stage and of each parameter, as SymPy derived them."""
    text = sb.derive(net(glu(3), inputs=4, hidden=3)).explain()
    assert "parameters (U (3, 3), V (3, 3)): units·in + units·in = 3·3 + 3·3 = 18" in text
    assert "s2a[n,i] = Σ_j U2[i,j]·a1[n,j]" in text and "z2[n,i] = s2a[n,i]·σ(s2b[n,i])" in text
    assert "gs2a[n,q] = ∂C/∂s2a[n,q] = δ2[n,q]·σ(s2b[n,q])" in text
    assert "∂C/∂V2[p,q] = Σ_n,i δ_ip·gs2b[n,i]·a1[n,q] + λ·V2[p,q] = Σ_n gs2b[n,p]·a1[n,q] + λ·V2[p,q]" in text


def test_readers_take_an_affine_layers_own_parameter_names(tmp_path):
    """An affine formula layer whose weight and bias are not called W and b gets the dense
    readers (vector form, scalar view, worked example, graph, report) under its own names."""
    layer = sb.Layer("z[n, k] = Sum(M[k, j]*x[n, j], j) + c[k]", units=3, params={"M": ("units", "in"),
                                                                                 "c": ("units",)}, activation="tanh")
    network = sb.Network(inputs=4, layers=[layer, sb.Dense(2)], loss="softmax_cross_entropy")
    d = sb.derive(network)
    assert d.layers[0].affine == ("M", "c")
    text = d.explain(scalar=True)
    assert "∂C/∂M1[p,q] = Σ_n,i δ_ip·δ1[n,i]·x[n,q] + λ·M1[p,q] = Σ_n δ1[n,p]·x[n,q] + λ·M1[p,q]" in text
    w = sb.walkthrough(network)
    assert w.ok, w.max_error
    sb.graph(w)
    sb.report(network, tmp_path / "m.html")
    page = (tmp_path / "m.html").read_text()
    assert "M1" in page and "dM1" in page  # the gradient's lines in the kernel, found under its own name
