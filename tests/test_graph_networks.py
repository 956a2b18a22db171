"""Graph networks: ``sb.Input``, a layer called on a tensor, ``sb.Add`` and ``sb.Concat``.

Loss and every gradient equal PyTorch autograd's in float64 to 1e-10, on networks written by
hand in torch (not through ``to_torch``), with non-zero biases; training follows torch's
optimizers step for step (the update of a layer that reads a tensor two layers back must wait
for that tensor's δ); the TOML form, the errors, checkpoints, the exports and the readers.
"""

from __future__ import annotations

import numpy as np
import pytest
from _support import perturb_params, rel_err

import symbp as sb

torch = pytest.importorskip("torch", reason="PyTorch is the reference")
F = torch.nn.functional


def residual_mlp(d_in=5, width=4, side=3, classes=3, l2=1e-3):
    """h → r (a Dense on h), s (a Dense on h, two layers back from the join), then
    Concat(h + r, s) → Dense: a residual join, a concatenation, a tensor read three times."""
    x = sb.Input(d_in)
    h = sb.Dense(width, activation="relu")(x)
    r = sb.Dense(width, activation="tanh")(h)
    s = sb.Dense(side, activation="sigmoid")(h)
    y = sb.Dense(classes)(sb.Concat()([sb.Add()([h, r]), s]))
    return sb.Network(inputs=x, outputs=y, loss="softmax_cross_entropy", l2=l2)


def torch_residual_mlp(P, X):
    h = torch.relu(X @ P["W1"].T + P["b1"])
    r = torch.tanh(h @ P["W2"].T + P["b2"])
    s = torch.sigmoid(h @ P["W4"].T + P["b4"])
    c = torch.cat([h + r, s], 1)
    return c @ P["W6"].T + P["b6"]


def branching_cnn(l2=1e-3):
    """Two conv branches side by side (Concat over channels), a residual Add with a conv of
    the join, max pooling, Flatten, Dense."""
    x = sb.Input((2, 6, 6))
    a = sb.Conv2D(3, 3, padding=1, activation="relu")(x)
    b = sb.Conv2D(2, 3, padding=1, activation="tanh")(x)
    c = sb.Concat()([a, b])
    r = sb.Add(activation="relu")([c, sb.Conv2D(5, 3, padding=1)(c)])
    y = sb.Dense(3)(sb.Flatten()(sb.MaxPool2D(2)(r)))
    return sb.Network(inputs=x, outputs=y, l2=l2)


def torch_branching_cnn(P, X):
    x = X.reshape(-1, 2, 6, 6)
    a = torch.relu(F.conv2d(x, P["W1"], P["b1"], padding=1))
    b = torch.tanh(F.conv2d(x, P["W2"], P["b2"], padding=1))
    c = torch.cat([a, b], 1)
    r = torch.relu(c + F.conv2d(c, P["W4"], P["b4"], padding=1))
    return F.max_pool2d(r, 2).flatten(1) @ P["W8"].T + P["b8"]


def torch_loss_and_grads(forward, params, X, y, l2, decayed):
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    out = forward(P, torch.tensor(X, dtype=torch.float64))
    loss = F.cross_entropy(out, torch.tensor(y)) + l2 / 2 * sum((P[k] ** 2).sum() for k in decayed)
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in P.items()}


CASES = {
    "residual_mlp": (residual_mlp, torch_residual_mlp),
    "branching_cnn": (branching_cnn, torch_branching_cnn),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_torch(case, compiled):
    make, forward = CASES[case]
    net = make()
    model = compiled(net, "float64", seed=3)
    perturb_params(model, seed=4)  # non-zero biases
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(7, net.widths[0])), rng.integers(0, 3, 7)
    loss, grads = model.loss_and_grads(X, y)
    decayed = [k for k in model.params if k.startswith("W")]
    ref_loss, ref = torch_loss_and_grads(forward, model.params, X, y, net.l2, decayed)
    assert abs(loss - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    assert set(grads) == set(ref)
    for key in ref:
        assert rel_err(grads[key], ref[key]) <= 1e-10, key
    assert sb.gradcheck(model, X, y) < 1e-6


@pytest.mark.parametrize("widths", [(3, 2, 2), (6, 5, 1)], ids=["narrow", "wide"])
def test_random_widths(widths, compiled):
    """Other widths of the same graph (the δ of Concat's second input is an offset slice)."""
    d_in, width, side = widths
    net = residual_mlp(d_in, width, side, classes=2, l2=0.0)
    model = compiled(net, "float64", seed=1)
    perturb_params(model, seed=2)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(5, d_in)), rng.integers(0, 2, 5)
    loss, grads = model.loss_and_grads(X, y)
    ref_loss, ref = torch_loss_and_grads(torch_residual_mlp, model.params, X, y, 0.0, [])
    assert abs(loss - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    for key in ref:
        assert rel_err(grads[key], ref[key]) <= 1e-10, key


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_training_follows_torch_step_for_step(opt, compiled):
    """Three steps: plain SGD rides on the weight-gradient GEMM, so a layer's update must wait
    until every layer it reads has its δ (W4 of s, which reads h, before δ of h is computed
    would give the wrong δ)."""
    net = residual_mlp()
    model = compiled(net, "float64", seed=7)
    perturb_params(model, seed=8)
    rng = np.random.default_rng(9)
    X, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    mine, theirs = {
        "sgd": (sb.SGD(0.1), lambda ps: torch.optim.SGD(ps, 0.1)),
        "momentum": (sb.SGD(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9)),
        "adam": (sb.Adam(0.01), lambda ps: torch.optim.Adam(ps, 0.01)),
    }[opt]
    model.fit(X, y, optimizer=mine, batch_size=4, epochs=1, shuffle=False, progress=False)
    topt = theirs(list(P.values()))
    for start in range(0, 12, 4):
        topt.zero_grad()
        out = torch_residual_mlp(P, torch.tensor(X[start:start + 4]))
        loss = F.cross_entropy(out, torch.tensor(y[start:start + 4]))
        loss = loss + net.l2 / 2 * sum((v ** 2).sum() for k, v in P.items() if k.startswith("W"))
        loss.backward()
        topt.step()
    for key, value in P.items():
        assert rel_err(model.params[key], value.detach().numpy()) <= 1e-10, key


def test_a_tensor_added_to_itself(compiled):
    """Add([h, h]) is 2h: one source read twice gets its gradient once, doubled by the formula."""
    x = sb.Input(3)
    h = sb.Dense(2, activation="tanh")(x)
    net = sb.Network(inputs=x, outputs=sb.Dense(2)(sb.Add()([h, h])), loss="mse")
    model = compiled(net, "float64", seed=0)
    perturb_params(model, seed=1)
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    P = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    hh = torch.tanh(torch.tensor(X) @ P["W1"].T + P["b1"])
    out = (2 * hh) @ P["W3"].T + P["b3"]
    ((out - torch.tensor(Y)) ** 2).sum(1).mul(0.5).mean().backward()
    loss, grads = model.loss_and_grads(X, Y)
    for key, value in P.items():
        assert rel_err(grads[key], value.grad.numpy()) <= 1e-10, key


def test_a_chain_written_functionally_is_the_same_network():
    x = sb.Input(4)
    y = sb.Dense(2)(sb.Dense(3, activation="relu")(x))
    functional = sb.Network(inputs=x, outputs=y)
    chain = sb.Network(inputs=4, layers=[sb.Dense(3, activation="relu"), sb.Dense(2)])
    assert not functional.is_graph
    assert functional.fingerprint() == chain.fingerprint()


# -- TOML ---------------------------------------------------------------------------------------
GRAPH_TOML = """
inputs = 5
loss = "softmax_cross_entropy"
l2 = 0.001

[[layers]]
name = "h"
units = 4
activation = "relu"

[[layers]]
name = "r"
units = 4
activation = "tanh"

[[layers]]
name = "s"
inputs = ["h"]
units = 3
activation = "sigmoid"

[[layers]]
name = "sum"
type = "add"
inputs = ["h", "r"]

[[layers]]
name = "both"
type = "concat"
inputs = ["sum", "s"]

[[layers]]
units = 3
"""


def test_toml_declares_the_same_graph(tmp_path):
    import tomllib

    net = sb.Network.from_config(tomllib.loads(GRAPH_TOML))
    assert net.sources == [(0,), (1,), (1,), (1, 2), (4, 3), (5,)]
    assert net.names == ["h", "r", "s", "sum", "both", "dense6"]
    again = sb.Network.from_config(net.to_config())
    assert again.sources == net.sources and again.fingerprint() == net.fingerprint()
    functional = residual_mlp()  # the same layers, ordered h, r, add, s, concat, out
    assert sorted(map(repr, functional.layers)) == sorted(map(repr, net.layers))


def test_toml_tables_in_any_order_are_sorted():
    import tomllib

    cfg = tomllib.loads(GRAPH_TOML)
    layers = cfg["layers"]
    layers[3], layers[4] = layers[4], layers[3]  # "both" above "sum", which it reads
    layers[5]["inputs"] = ["both"]  # a table without inputs reads the table above it: here "sum"
    net = sb.Network.from_config(cfg)
    assert [n_ for n_ in net.names] == ["h", "r", "s", "sum", "both", "dense6"]


def _toml_with(*changes):
    import tomllib

    cfg = tomllib.loads(GRAPH_TOML)
    for pos, key, value in changes:
        if value is None:
            cfg["layers"][pos].pop(key, None)
        else:
            cfg["layers"][pos][key] = value
    return cfg


@pytest.mark.parametrize("changes, message", [
    ([(0, "inputs", ["both"])], "cycle"),
    ([(2, "inputs", ["nowhere"])], "reads 'nowhere', which no layer is named"),
    ([(2, "inputs", ["s"])], "reads itself"),
    ([(1, "name", "h")], "also layer 1's"),
    ([(1, "name", "input")], "name must be a word"),
    ([(3, "inputs", ["h", "s"])], "Add needs inputs of one shape"),
    ([(3, "inputs", ["h"])], "merging layer reads two or more"),
    ([(2, "inputs", ["h", "r"])], "a layer reads one earlier layer"),
    ([(4, "inputs", ["sum", "r"])], "is read by no layer: an unused branch"),
], ids=["cycle", "unknown", "itself", "duplicate", "reserved", "add-shapes", "one-into-add", "two-into-dense",
        "unused"])
def test_toml_errors_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sb.Network.from_config(_toml_with(*changes))


def test_toml_output_read_by_another_layer():
    cfg = _toml_with((5, "inputs", ["both"]))
    cfg["layers"].insert(5, {"name": "extra", "inputs": ["dense7"], "units": 2})
    with pytest.raises(ValueError, match=r"the last layer \('dense7'\) is the output, but layer 6 \('extra'\) reads it"):
        sb.Network.from_config(cfg)


# -- errors of the functional form ------------------------------------------------------------
def test_functional_errors():
    x = sb.Input(4)
    h = sb.Dense(3)(x)
    with pytest.raises(ValueError, match="Add needs inputs of one shape"):
        sb.Network(inputs=x, outputs=sb.Dense(2)(sb.Add()([h, sb.Dense(2)(x)])))
    with pytest.raises(TypeError, match="takes a list of tensors"):
        sb.Add()(h)
    with pytest.raises(TypeError, match="takes one tensor"):
        sb.Dense(2)([h, h])
    with pytest.raises(ValueError, match="at least two"):
        sb.Concat()([h])
    with pytest.raises(TypeError, match="sb.Input"):
        sb.Dense(2)(np.zeros(3))
    shared = sb.Dense(3)
    with pytest.raises(ValueError, match="used at two places"):
        sb.Network(inputs=x, outputs=sb.Add()([shared(x), shared(h)]))
    with pytest.raises(ValueError, match="a network has one input"):
        sb.Network(inputs=x, outputs=sb.Add()([h, sb.Dense(3)(sb.Input(4))]))
    with pytest.raises(ValueError, match="outputs=…, not layers"):
        sb.Network(inputs=x, layers=[sb.Dense(2)], outputs=h)
    with pytest.raises(ValueError, match="goes with inputs=sb.Input"):
        sb.Network(inputs=4, layers=[sb.Dense(2)], outputs=h)
    with pytest.raises(ValueError, match="along axis 1"):
        sb.Concat(axis=2)
    image = sb.Input((1, 6, 6))
    with pytest.raises(ValueError, match="images of one height and width"):
        sb.Network(inputs=image, outputs=sb.Concat()([sb.Conv2D(1, 3)(image), sb.Conv2D(1, 1)(image)]))


# -- checkpoints, exports, readers --------------------------------------------------------------
def test_checkpoint_round_trip(compiled, tmp_path):
    model = compiled(residual_mlp(), "float64", seed=1)
    perturb_params(model, seed=2)
    model.save(tmp_path / "graph.npz")
    back = sb.load(tmp_path / "graph.npz")
    assert back.network.sources == model.network.sources
    X = np.random.default_rng(0).normal(size=(6, 5))
    np.testing.assert_array_equal(back.decision_function(X), model.decision_function(X))


@pytest.mark.parametrize("case", CASES)
def test_to_torch_and_onnx_compute_the_logits(case, compiled, tmp_path):
    make, _ = CASES[case]
    net = make()
    model = compiled(net, "float64", seed=1)
    perturb_params(model, seed=2)
    X = np.random.default_rng(0).normal(size=(4, net.widths[0]))
    module = model.to_torch()
    with torch.no_grad():
        out = module(torch.tensor(X.reshape(-1, *net.input_shape))).numpy()
    assert rel_err(out, model.decision_function(X)) <= 1e-12
    ort = pytest.importorskip("onnxruntime")
    dtype = "float64" if case == "residual_mlp" else "float32"  # onnxruntime's CPU Conv is float32 only
    path = model.to_onnx(tmp_path / "m.onnx", dtype=dtype)
    logits = ort.InferenceSession(str(path)).run(None, {"X": X.reshape(-1, *net.input_shape).astype(dtype)})[0]
    assert rel_err(logits, model.decision_function(X)) <= (1e-12 if dtype == "float64" else 1e-5)


def test_explain_says_what_each_layer_reads_and_sums():
    text = sb.derive(residual_mlp()).explain()
    assert "inputs a1 (4,) and a2 (4,) → output (4,)" in text  # the Add
    assert "the add gate copies δ unchanged to every input" in text
    assert "the sum of ∂C/∂a sent back by layers 2 (Dense(4)), 3 (Add()), 4 (Dense(3))" in text  # h, read thrice
    assert "δ1[n,p] = H(a1[n,p])·(Σ_i W2[i,p]·δ2[n,i] + Σ_i W4[i,p]·δ4[n,i] + δ3[n,p])" in text  # relu′ read from a
    assert "δ4[n,p] = δ5[n,p + d₃]·σ′(z4[n,p])" in text  # s gets its slice of the Concat's δ


def test_walkthrough_and_graph_agree_with_finite_differences():
    net = residual_mlp(3, 2, 2, classes=2)
    w = sb.walkthrough(net)
    assert w.ok, str(w)
    collapsed = sb.graph(net, collapse=True)
    join = next(nid for nid, node in collapsed.nodes.items() if node.label == "+" and node.caption.startswith("z3"))
    into = collapsed.edges_into(join)
    assert len(into) == 2 and into[0].grad_norm == pytest.approx(into[1].grad_norm)  # the add gate copies δ
    entries = sb.graph(net, collapse=False)
    for name, grad in w.grads.items():
        for idx in np.ndindex(*grad.shape):
            node = entries.entry(f"{name}[{','.join(map(str, idx))}]")
            assert node.grad == pytest.approx(grad[idx], rel=1e-9, abs=1e-12), (name, idx)


# -- random graphs: the derivation against torch autograd ------------------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
ACTIVATIONS = ("relu", "tanh", "sigmoid", None)


@st.composite
def random_graphs(draw):
    """A random DAG of Dense, Add and Concat on a flat input; every dangling tensor is joined
    into the output, so no branch is unused."""
    x = sb.Input(draw(st.integers(1, 4)))
    tensors = [(x, x.shape)]
    read = set()
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["dense", "dense", "add", "concat"]))
        pick = draw(st.integers(0, len(tensors) - 1))
        if kind == "dense" or len(tensors) < 2:
            units = draw(st.integers(1, 4))
            tensors.append((sb.Dense(units, activation=draw(st.sampled_from(ACTIVATIONS)))(tensors[pick][0]), units))
            read.add(pick)
            continue
        other = draw(st.integers(0, len(tensors) - 1))
        if kind == "add":
            same = [k for k, (_, w) in enumerate(tensors) if w == tensors[pick][1]]
            other = same[other % len(same)]  # possibly pick itself: Add([h, h])
            tensors.append((sb.Add(activation=draw(st.sampled_from(ACTIVATIONS)))([tensors[pick][0], tensors[other][0]]),
                            tensors[pick][1]))
        else:
            tensors.append((sb.Concat()([tensors[pick][0], tensors[other][0]]), tensors[pick][1] + tensors[other][1]))
        read.update({pick, other})
    dangling = [t for k, (t, _) in enumerate(tensors) if k not in read and k > 0] or [tensors[-1][0]]
    top = dangling[0] if len(dangling) == 1 else sb.Concat()(dangling)
    classes = draw(st.integers(2, 3))
    net = sb.Network(inputs=x, outputs=sb.Dense(classes)(top), l2=draw(st.sampled_from([0.0, 0.01])))
    return net, draw(st.integers(0, 2**16))


def torch_graph(net, P, X):
    """The network run by torch, read from its layers and sources (an interpreter written
    here, not symbp's to_torch)."""
    outs = [X]
    for pos, (layer, src) in enumerate(zip(net.layers, net.sources), 1):
        ins = [outs[s_] for s_ in src]
        if isinstance(layer, sb.Dense):
            z = ins[0] @ P[f"W{pos}"].T + P[f"b{pos}"]
        elif isinstance(layer, sb.Add):
            z = ins[0] + ins[1]
        else:
            z = torch.cat(ins, 1)
        act = layer.activation.name if not layer.activation.is_identity else None
        outs.append({"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, None: lambda v: v}[act](z))
    return outs[-1]


@hypothesis.given(random_graphs())
def test_random_graphs_derive_torch_gradients(case):
    net, seed = case
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(0.0, 0.7, v.shape) for k, v in net.init_params(seed, np.dtype("float64")).items()}
    x, t = rng.normal(size=net.widths[0]), int(rng.integers(0, net.outputs))
    w = sb.walkthrough(net, x=x, t=t, params=params, max_checks=1)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out = torch_graph(net, P, torch.tensor(x[None, :]))
    loss = F.cross_entropy(out, torch.tensor([t])) + net.l2 / 2 * sum((P[k] ** 2).sum() for k in P if k.startswith("W"))
    loss.backward()
    assert w.loss == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
    for key, value in P.items():
        assert rel_err(w.grads[key], value.grad.numpy()) <= 1e-10, key


@hypothesis.settings(max_examples=4)
@hypothesis.given(random_graphs())
def test_random_graphs_compile_to_torch_gradients_and_steps(compiled, case):
    """The kernels of random graphs: loss and gradients, then two SGD steps with momentum."""
    net, seed = case
    model = compiled(net, "float64", seed=seed)
    perturb_params(model, seed=seed + 1)
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(6, net.widths[0])), rng.integers(0, net.outputs, 6)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}

    def torch_loss(rows):
        out = torch_graph(net, P, torch.tensor(X[rows]))
        return F.cross_entropy(out, torch.tensor(y[rows])) + net.l2 / 2 * sum(
            (P[k] ** 2).sum() for k in P if k.startswith("W"))

    loss, grads = model.loss_and_grads(X, y)
    ref = torch_loss(slice(None))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-10)
    for key, value in P.items():
        assert rel_err(grads[key], value.grad.numpy()) <= 1e-10, key
    opt = torch.optim.SGD(list(P.values()), 0.1, momentum=0.9)
    model.fit(X, y, optimizer=sb.SGD(0.1, momentum=0.9), batch_size=3, epochs=1, shuffle=False, progress=False)
    for rows in (slice(0, 3), slice(3, 6)):
        opt.zero_grad()
        torch_loss(rows).backward()
        opt.step()
    for key, value in P.items():
        assert rel_err(model.params[key], value.detach().numpy()) <= 1e-10, key


def test_one_tensor_flattened_twice(compiled):
    """Two Flattens of one image tensor (and two of the input): each Flatten's δ is a part of
    its source's, not the source's own buffer, which only a sole reader may share."""
    x = sb.Input((1, 4, 4))
    c = sb.Conv2D(2, 3, padding=1, activation="tanh")(x)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(5, 16)), rng.integers(0, 3, 5)
    for source in (c, x):
        net = sb.Network(inputs=x, outputs=sb.Dense(3)(sb.Concat()([sb.Dense(4)(sb.Flatten()(source)),
                                                                    sb.Dense(4)(sb.Flatten()(source))])))
        model = compiled(net, "float64", seed=1)
        perturb_params(model, seed=2)
        assert sb.gradcheck(model, X, y) < 1e-6
