"""Image layers against PyTorch (conv2d, max_pool2d, avg_pool2d, a Maxout from torch ops) in
float64, gradcheck, shape refusals, and Adam training equal to torch.optim.Adam."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _support import rel_err

import symbp as sb

torch = pytest.importorskip("torch")
F = torch.nn.functional

# name -> (input shape, layer list, loss, l2); each is compiled once per session.
NETS = {
    "s2p1-maxpool-ce": ((2, 7, 7), lambda: [sb.Conv2D(3, 3, stride=2, padding=1, activation="tanh"), sb.MaxPool2D(2),
                                           sb.Flatten(), sb.Dense(3)], "softmax_cross_entropy", 0.1),
    "rect-avgpool-maxout-mse": ((1, 6, 5), lambda: [sb.Conv2D(2, (3, 2), padding=(1, 0), activation="relu"),
                                                    sb.AvgPool2D(2, stride=1), sb.Conv2D(2, 2), sb.Flatten(),
                                                    sb.Maxout(3, 2), sb.Dense(2)], "mse", 0.0),
    "overlap-pool-s2": ((1, 9, 9), lambda: [sb.Conv2D(2, 3, stride=2, padding=1, activation="sigmoid"),
                                            sb.MaxPool2D(3, stride=1), sb.Flatten(), sb.Dense(4)], "softmax_cross_entropy", 0.0),
    # columns of 18 and 27 entries (where the batch cannot go inside, as on CUDA, both convs in
    # the stacked layout), the second with the input gradient (col2im) and a stride;
    # its 5×5 output pooled 2×2 leaves a row and a column no window reads (δ 0 there)
    "stacked-two-convs": ((2, 9, 9), lambda: [sb.Conv2D(3, 3, padding=1, activation="relu"),
                                              sb.Conv2D(4, 3, stride=2, padding=1, activation="tanh"), sb.MaxPool2D(2),
                                              sb.Flatten(), sb.Dense(3)], "softmax_cross_entropy", 0.05),
    # an image-shaped output (the loss reads it flat): δ_L derived at (p, r, s), the loss row
    # loop at the flat position; a rectangular map, so H and W cannot be swapped unseen
    "conv-output-mse": ((2, 5, 7), lambda: [sb.Conv2D(3, 3, activation="tanh")], "mse", 0.1),
    "pool-conv-output-ce": ((1, 8, 6), lambda: [sb.MaxPool2D(2), sb.Conv2D(2, (2, 3), padding=1, activation="sigmoid")],
                            "softmax_cross_entropy", 0.0),
}


def build(name):
    shape, layers, loss, l2 = NETS[name]
    return sb.Network(inputs=shape, layers=layers(), loss=loss, l2=l2, name=name)


def torch_forward(net, params, X):
    a = torch.as_tensor(X)
    acts = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda t: t}
    for pos, layer in enumerate(net.layers, 1):
        if isinstance(layer, sb.Conv2D):
            a = F.conv2d(a, params[f"W{pos}"], params[f"b{pos}"], stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, sb.MaxPool2D):
            a = F.max_pool2d(a, layer.size, layer.stride)
        elif isinstance(layer, sb.AvgPool2D):
            a = F.avg_pool2d(a, layer.size, layer.stride)
        elif isinstance(layer, sb.Flatten):
            a = a.flatten(1)
        elif isinstance(layer, sb.Maxout):
            a = (a @ params[f"W{pos}"].T + params[f"b{pos}"]).view(a.shape[0], layer.units, layer.pieces).max(dim=2).values
        else:
            a = a @ params[f"W{pos}"].T + params[f"b{pos}"]
        a = acts[layer.activation.describe() if hasattr(layer, "activation") else "identity"](a)
    return a.flatten(1)  # an image output as symbp's loss and predictions read it


def torch_loss(net, params, X, y):
    out = torch_forward(net, params, X)
    if net.loss.name == "softmax_cross_entropy":
        loss = F.cross_entropy(out, torch.as_tensor(y))
    else:
        loss = F.mse_loss(out, torch.as_tensor(y))
    if net.l2:
        loss = loss + net.l2 / 2 * sum((v ** 2).sum() for k, v in params.items() if k.startswith("W"))
    return loss


def data(net, n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, *net.input_shape))
    y = rng.integers(0, net.outputs, n) if net.loss.name == "softmax_cross_entropy" else rng.normal(size=(n, net.outputs))
    return X, y


@pytest.mark.parametrize("name", list(NETS))
def test_loss_and_grads_equal_torch(compiled, name):
    net = build(name)
    model = compiled(net)
    for seed in range(2):
        X, y = data(net, seed=seed)
        loss, grads = model.loss_and_grads(X, y)
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
        ref = torch_loss(net, tp, X, y)
        ref.backward()
        assert abs(loss - ref.item()) <= 1e-10 * abs(ref.item())
        for k in grads:
            assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k
        assert np.allclose(model.decision_function(X), torch_forward(net, tp, X).detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("name", list(NETS))
def test_gradcheck(compiled, name):
    net = build(name)
    model = compiled(net)
    X, y = data(net, seed=3)
    assert sb.gradcheck(model, X, y) < 1e-6


def test_conv_layouts_as_planned(compiled):
    """The CPU lays every im2col conv out with the batch inside its matrices: one GEMM over the
    batch per product, conversions row by row."""
    for name in ("stacked-two-convs", "rect-avgpool-maxout-mse"):
        src = compiled(build(name)).source_path.read_text()
        assert "one GEMM with the batch inside its matrices" in src
        assert "per sample n" not in src and "stacked into one GEMM" not in src


@pytest.mark.parametrize("layout, comment", [("sample", "per sample n"), ("stacked", "stacked into one GEMM"),
                                             ("inner", "the batch inside its matrices")])
def test_every_conv_layout_trains_like_torch(tmp_path, monkeypatch, layout, comment):
    """Each im2col layout (forced; the CUDA target prints the first two) gives PyTorch's
    gradients and SGD steps, a short last batch included (the batch-inside layout's index
    counts the run's batch)."""
    from symbp.lower import stages

    monkeypatch.setattr(stages, "CONV_LAYOUT", layout)
    net = build("stacked-two-convs")
    model = sb.compile(net, dtype="float64", seed=0, cache_dir=tmp_path)  # (the cache key does not see the layout)
    assert comment in model.source_path.read_text()
    X, y = data(net, n=7)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    loss, grads = model.loss_and_grads(X, y)
    ref = torch_loss(net, tp, X, y)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-10 * abs(ref.item())
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k
    opt = torch.optim.SGD(list(tp.values()), lr=0.1)
    for rows in (slice(0, 4), slice(4, 7)):  # batches of 4 and 3
        opt.zero_grad()
        torch_loss(net, tp, X[rows], y[rows]).backward()
        opt.step()
    model.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=4, epochs=1, shuffle=False, progress=False)
    for k, v in tp.items():
        assert rel_err(model.params[k], v.detach().numpy()) <= 1e-10, k


@pytest.mark.parametrize("name, stores", [("s2p1-maxpool-ce", 1), ("stacked-two-convs", 3), ("overlap-pool-s2", 3)])
def test_max_pool_backward_stores(compiled, name, stores):
    """δ of the layer a max pool reads: windows that tile their input store it in one pass
    (f′ applied there); windows that leave entries out zero those entries first (the 5×5 map
    under 2×2 windows: its last row, then its last column) and store the rest; overlapping
    windows zero, add up, then f′ multiplies (the torch comparisons above check all three
    give the gradient).  The conv's δ goes straight into the layout its GEMMs read (dZt, the
    batch inside): no pass copies it there (lower/elide.py)."""
    model = compiled(build(name))
    pooled = next(pos for pos, layer in enumerate(model.network.layers, 1) if isinstance(layer, sb.MaxPool2D))
    src = model.source_path.read_text()
    backward = src[src.index("def backward("):]
    backward = backward[:backward.index("\n@njit")]
    written = re.findall(rf"^\s+(dZ{pooled - 1}|dZt{pooled - 1}_flat)\[.*\] \+?= ", backward, re.M)
    assert written == [f"dZt{pooled - 1}_flat"] * stores


def test_max_pool_passes_a_nan_on_like_torch(compiled):
    """The scan keeps the window's maximum (no second pass reading it back): a NaN in a window
    still reaches the output, as PyTorch's max pooling gives, and as Maxout's does."""
    for name, key in (("s2p1-maxpool-ce", "W1"), ("rect-avgpool-maxout-mse", "W5")):  # (a tanh conv; the Maxout)
        net = build(name)
        model = compiled(net)
        X, _ = data(net, seed=5)
        keep = model.params[key].copy()
        try:
            model.params[key][0] = np.nan
            out = model.decision_function(X)
            tp = {k: torch.tensor(v) for k, v in model.params.items()}
            ref = torch_forward(net, tp, X).numpy()
        finally:
            model.params[key][...] = keep
        assert np.isnan(ref).any()
        assert np.array_equal(np.isnan(out), np.isnan(ref))


def test_max_pool_ties_go_to_the_first_maximum_like_torch(compiled):
    net = build("overlap-pool-s2")
    model = compiled(net)
    model.params["W1"][...] = 0.0  # every conv output equals its bias: all windows tie
    X, y = data(net)
    _, grads = model.loss_and_grads(X, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    torch_loss(net, tp, X, y).backward()
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k


def test_flat_inputs_accepted_and_wrong_shapes_refused(compiled):
    net = build("s2p1-maxpool-ce")
    model = compiled(net)
    X, y = data(net)
    assert np.allclose(model.decision_function(X), model.decision_function(X.reshape(len(X), -1)))
    with pytest.raises(ValueError, match=r"\(N, 2, 7, 7\)"):
        model.decision_function(np.zeros((3, 1, 7, 7)))
    with pytest.raises(ValueError, match="98"):
        model.decision_function(np.zeros((3, 97)))


@pytest.mark.parametrize("layers, message", [
    ([sb.Conv2D(2, 3, stride=2)], r"\(8 − 3 \+ 2·0\)/2 \+ 1 = 3.5"),
    ([sb.Conv2D(2, 11, padding=1)], "window 11 is larger than the padded input 8 \\+ 2·1 = 10"),
    ([sb.MaxPool2D(9)], "window 9 is larger than the input 8"),
    ([sb.Conv2D(2, 3), sb.Dense(3)], r"Flatten\(\) before it \(giving 72 features\)"),
    ([sb.Flatten(), sb.MaxPool2D(2)], r"3-D input \(C, H, W\), got shape \(64,\)"),
    ([sb.Maxout(3, 2)], "put sb.Flatten"),
])
def test_bad_shapes_refused_with_the_numbers(layers, message):
    with pytest.raises(ValueError, match=message):
        sb.Network(inputs=(1, 8, 8), layers=layers)


def test_shapes_and_parameter_counts():
    net = sb.Network(inputs=(3, 32, 32), layers=[sb.Conv2D(10, 5, stride=1, padding=2), sb.MaxPool2D(2),
                                                 sb.Flatten(), sb.Dense(10)])
    assert net.shapes == [(3, 32, 32), (10, 32, 32), (10, 16, 16), (2560,), (10,)]
    assert net.param_counts()[0] == (5 * 5 * 3 + 1) * 10


def test_config_round_trip():
    net = build("rect-avgpool-maxout-mse")
    again = sb.Network.from_config(net.to_config())
    assert again.fingerprint() == net.fingerprint()
    with pytest.raises(ValueError, match="unknown key 'units' for conv2d"):
        sb.Network.from_config({"inputs": [1, 8, 8], "layers": [{"type": "conv2d", "filters": 2, "kernel": 3, "units": 3}]})


def test_derivation_keeps_the_stride_guard():
    d = sb.derive(build("s2p1-maxpool-ce"))
    gx = d.layers[0].stage_grads["xpad1"][2]
    import sympy

    assert gx.has(sympy.Piecewise)  # 0 ≤ r − S·h ≤ kh − 1 is real
    assert "Piecewise" not in str(d.layers[0].grads["W"])  # q ≤ C − 1 etc. are implied: dropped


def test_adam_on_a_cnn_equals_torch_adam(compiled):
    net = build("s2p1-maxpool-ce")
    model = compiled(net)
    X, y = data(net, n=8)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    opt = torch.optim.Adam(list(tp.values()), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        torch_loss(net, tp, X, y).backward()
        opt.step()
    model.fit(X, y, optimizer=sb.Adam(lr=0.01), batch_size=8, epochs=3, shuffle=False, progress=False)
    for k, v in tp.items():
        assert rel_err(model.params[k], v.detach().numpy()) <= 1e-10, k


# Plain SGD (its update rides on the weight GEMM) and Adam (an elementwise update, its
# training module already compiled above): the two ways an update is lowered.  Every other
# optimizer is covered on dense nets by test_optim.py; each one here cost ~10 s of JIT.
@pytest.mark.parametrize("opt", [sb.SGD(lr=0.05), sb.Adam(lr=0.01)], ids=lambda o: o.name)
def test_training_lowers_the_loss(compiled, opt):
    net = build("s2p1-maxpool-ce")
    model = compiled(net)
    X, y = data(net, n=24)
    before = model.evaluate(X, y)[0]
    model.fit(X, y, optimizer=opt, batch_size=8, epochs=15, progress=False)
    assert model.evaluate(X, y)[0] < before


def test_an_image_output_takes_image_shaped_targets(compiled):
    net = build("conv-output-mse")
    model = compiled(net)
    assert net.output_shape == (3, 3, 5)
    X, y = data(net, n=4, seed=5)
    flat = model.loss_and_grads(X, y)
    image = model.loss_and_grads(X, y.reshape(4, 3, 3, 5))
    assert flat[0] == image[0] and all(np.array_equal(flat[1][k], image[1][k]) for k in flat[1])
    with pytest.raises(ValueError, match=r"y must have shape \(4, 45\) or \(4, 3, 3, 5\) .* got \(4, 3, 5, 3\)"):
        model.loss_and_grads(X, y.reshape(4, 3, 5, 3))


@pytest.mark.parametrize("size, stride", [(2, None), ((2, 3), None), ((3, 2), (2, 2)), (2, (2, 3))])
def test_max_pool_ties_between_rows_and_columns_go_where_torch_sends_them(tmp_path, size, stride):
    """Windows side by side along a row are scanned a column at a time (down the column, then
    across): ties between entries of other rows and columns ((0, 1) against (1, 0)) must still
    go to the first in row-major order.  A 1×1 conv over two channels with weights (1, 1)
    sums small integers split at random between the channels: ties everywhere, and the
    weight gradient tells which entry got δ (the channels differ between tied entries).  Rows of
    34 columns: scanned a column at a time (ROW_FORM_MIN) but for the strided case."""
    net = sb.Network(inputs=(2, 6, 34), layers=[sb.Conv2D(1, 1, activation="relu"), sb.MaxPool2D(size, stride),
                                               sb.Flatten(), sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64", seed=2, cache_dir=tmp_path)
    model.params["W1"][...] = 1.0
    model.params["b1"][...] = 0.0
    rng = np.random.default_rng(9)
    total = rng.integers(-1, 3, size=(5, 1, 6, 34)).astype(float)
    share = rng.integers(0, 2, size=total.shape) * total
    X = np.concatenate([share, total - share], axis=1)
    y = rng.normal(size=(5, 2))
    for w in model._workspace(len(X)):  # stale work buffers (the strided windows leave gaps)
        w.fill(np.nan)
    loss, grads = model.loss_and_grads(X, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    kh, kw = (size, size) if isinstance(size, int) else size
    a = F.max_pool2d(torch.relu(F.conv2d(torch.tensor(X), tp["W1"], tp["b1"])), (kh, kw), stride or (kh, kw))
    ref = F.mse_loss(a.flatten(1) @ tp["W4"].T + tp["b4"], torch.tensor(y))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k


CONV_POOL_ACTS = {"relu": torch.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.01), "tanh": torch.tanh,
                  "sigmoid": torch.sigmoid, "elu": F.elu, "softplus": F.softplus,
                  "max(z, 0.1*z)": lambda z: torch.maximum(z, 0.1 * z), "z*sigmoid(z)": lambda z: z * torch.sigmoid(z)}


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("act", sorted(CONV_POOL_ACTS))
def test_conv_activation_pool_equals_torch(tmp_path, act, size):
    """A conv's activation before a max pool: f′ read at each window's maximum where it is
    written in a (relu's H(z) = H(a), tanh, σ, leaky relu), from z where it is not (elu,
    softplus, swish); 2×2 windows tile the 8×34 map (bias and activation in the pool's scan,
    a row of windows at a time), 3×3 ones leave entries out."""
    net = sb.Network(inputs=(2, 8, 34), layers=[sb.Conv2D(3, 3, padding=1, activation=act), sb.MaxPool2D(size),
                                                sb.Flatten(), sb.Dense(4)], loss="softmax_cross_entropy")
    model = sb.compile(net, dtype="float64", seed=1, cache_dir=tmp_path)
    rng = np.random.default_rng(3)
    model.params["b1"] = rng.normal(size=3) * 0.5
    X, y = rng.normal(size=(5, 2 * 8 * 34)), rng.integers(0, 4, 5)
    for w in model._workspace(len(X)):  # stale work buffers: what no window reaches is zeroed
        w.fill(np.nan)
    loss, grads = model.loss_and_grads(X, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    a = F.max_pool2d(CONV_POOL_ACTS[act](F.conv2d(torch.tensor(X).reshape(5, 2, 8, 34), tp["W1"], tp["b1"], padding=1)), size)
    ref = F.cross_entropy(a.flatten(1) @ tp["W4"].T + tp["b4"], torch.tensor(y))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k
