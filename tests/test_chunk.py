"""A conv's δ a chunk of samples at a time (symbp.lower.chunk): the first conv's pool scatter,
bias sum and weight gradient run over a few samples at a time, with the chunk's δ at the head
of its buffer.  The sums over the batch become sums over the chunks: loss, gradients and a
few training steps (SGD fused into the backward pass, Adam on gradients) against PyTorch, on
batches that split into several chunks and a short last one."""

from __future__ import annotations

import numpy as np
import pytest
from _support import rel_err

import symbp as sb
from symbp.lower import chunk

torch = pytest.importorskip("torch")
F = torch.nn.functional


def net(pool=2):
    # a 6×7 map: 2×2 windows leave its last column out (zeroed in each chunk), 3×3 ones tile it
    # in rows and leave one column
    return sb.Network(inputs=(2, 8, 9), layers=[sb.Conv2D(3, 3, activation="relu"), sb.MaxPool2D(pool),
                                                sb.Flatten(), sb.Dense(4)], loss="softmax_cross_entropy")


@pytest.fixture(scope="module")
def two_sample_chunks(tmp_path_factory):
    """Models compiled with chunks of 2 samples (3 × 6 × 7 float64 entries of δ each)."""
    made = {}

    def compiled(pool=2, dtype="float64"):
        if (pool, dtype) not in made:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(chunk, "CHUNK_BYTES", 2 * 3 * 6 * 7 * np.dtype(dtype).itemsize)
                made[pool, dtype] = sb.compile(net(pool), dtype=dtype, seed=4,
                                               cache_dir=tmp_path_factory.mktemp(f"chunks{pool}{dtype}"))
        return made[pool, dtype]
    return compiled


def torch_logits(params, X, pool):
    a = F.max_pool2d(torch.relu(F.conv2d(torch.as_tensor(X).reshape(-1, 2, 8, 9), params["W1"], params["b1"])), pool)
    return a.flatten(1) @ params["W4"].T + params["b4"]


@pytest.mark.parametrize("pool", [2, 3])
def test_the_first_conv_backward_runs_in_chunks(two_sample_chunks, pool):
    src = two_sample_chunks(pool).source_path.read_text()
    assert "dZt1 holds 2 samples at a time" in src
    assert "for n0 in range(0, nb, 2):" in src and "dots_add(dZt1, Acol1, acc_dW1" in src
    assert "gemm_dots(" not in src  # (the conv's one weight gradient goes through the chunks)


@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("rows", [5, 6, 1])
def test_chunked_loss_and_gradients_equal_torch(two_sample_chunks, pool, rows):
    model = two_sample_chunks(pool)
    rng = np.random.default_rng(rows)
    model.params["b1"] = rng.normal(size=3) * 0.3
    X, y = rng.normal(size=(rows, 2 * 8 * 9)), rng.integers(0, 4, rows)
    for w in model._workspace(rows):  # stale buffers: a chunk must zero what its windows leave out
        w.fill(np.nan)
    loss, grads = model.loss_and_grads(X, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    ref = F.cross_entropy(torch_logits(tp, X, pool), torch.as_tensor(y))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_chunked_training_equals_torch(two_sample_chunks, opt):
    """Three steps on batches of 5 (chunks 2, 2, 1): SGD's update fused into the backward pass
    (W ← W − η·Σ_chunks), Adam's from the gradients (dW ← Σ_chunks)."""
    model = two_sample_chunks(2)
    rng = np.random.default_rng(7)
    model.params["b1"] = rng.normal(size=3) * 0.3
    X, y = rng.normal(size=(15, 2 * 8 * 9)), rng.integers(0, 4, 15)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in model.params.items()}
    if opt == "sgd":
        mine, theirs = sb.SGD(lr=0.1, momentum=0.5), torch.optim.SGD(tp.values(), lr=0.1, momentum=0.5)
    else:
        mine, theirs = sb.Adam(lr=0.01), torch.optim.Adam(tp.values(), lr=0.01)
    model.fit(X, y, optimizer=mine, batch_size=5, epochs=1, shuffle=False, progress=False)
    for b in range(3):
        theirs.zero_grad()
        F.cross_entropy(torch_logits(tp, X[5 * b:5 * b + 5], 2), torch.as_tensor(y[5 * b:5 * b + 5])).backward()
        theirs.step()
    for k, v in tp.items():
        assert rel_err(model.params[k], v.detach().numpy()) <= 1e-10, k


def test_plain_sgd_fuses_its_update_into_the_chunks(two_sample_chunks, tmp_path):
    """Plain SGD: W ← W − η·Σ_chunks δ·colᵀ applied once after the chunks (β = 1); float32
    agrees with float64."""
    m64, m32 = two_sample_chunks(2), two_sample_chunks(2, "float32")
    src = m64.source_path.parent.glob("*-sgd-*.py")
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(10, 2 * 8 * 9)), rng.integers(0, 4, 10)
    start = {k: v.copy() for k, v in m64.params.items()}
    for k, v in start.items():
        m32.params[k] = v.astype(np.float32)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in start.items()}
    theirs = torch.optim.SGD(tp.values(), lr=0.05)
    for m in (m64, m32):
        m.fit(X, y, optimizer=sb.SGD(lr=0.05), batch_size=5, epochs=1, shuffle=False, progress=False)
    for b in range(2):
        theirs.zero_grad()
        F.cross_entropy(torch_logits(tp, X[5 * b:5 * b + 5], 2), torch.as_tensor(y[5 * b:5 * b + 5])).backward()
        theirs.step()
    assert any("dots_finish(acc_W1, W1, -h_lr, ONE)" in p.read_text() for p in src)
    for k, v in tp.items():
        assert rel_err(m64.params[k], v.detach().numpy()) <= 1e-10, k
        assert rel_err(m32.params[k], v.detach().numpy()) <= 1e-4, k


def two_convs():
    return sb.Network(inputs=(1, 12, 12), layers=[sb.Conv2D(4, 3, activation="relu"), sb.MaxPool2D(2),
                                                  sb.Conv2D(5, 3, padding=1, activation="tanh"), sb.MaxPool2D(2),
                                                  sb.Flatten(), sb.Dense(3)], loss="softmax_cross_entropy")


@pytest.fixture(scope="module")
def two_conv_chunks(tmp_path_factory):
    """The two-conv net, chunks of 2 samples for its second conv's columns (4·3·3 × 5 × 5 each)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk, "CHUNK_BYTES", 2 * 36 * 25 * 8)
        return sb.compile(two_convs(), dtype="float64", seed=1, cache_dir=tmp_path_factory.mktemp("two"))


def test_a_later_conv_chunks_its_columns_not_its_delta(two_conv_chunks):
    """The second conv's δ is read by its weight gradient and its input gradient (Wᵀ·δ, which
    needs W before the update): it stays whole; its columns Wᵀ·δ and their col2im run in chunks."""
    src = two_conv_chunks.source_path.read_text()
    assert "dZcol3 holds 2 samples at a time" in src and "dZt3 holds" not in src
    assert "gemm_at(W3, 0, 5, 36, 36, True, dZt3, n0 * 25, 5, cn * 25, nb * 25, False, dZcol3, 0, 36, cn * 25" in src


@pytest.mark.parametrize("rows", [5, 2, 1])
def test_chunked_columns_give_torch_gradients(two_conv_chunks, rows):
    model = two_conv_chunks
    rng = np.random.default_rng(rows + 10)
    for k in ("b1", "b3"):
        model.params[k] = rng.normal(size=model.params[k].shape) * 0.3
    X, y = rng.normal(size=(rows, 144)), rng.integers(0, 3, rows)
    for w in model._workspace(rows):  # stale buffers: each chunk zeroes its samples' δ first
        w.fill(np.nan)
    loss, grads = model.loss_and_grads(X, y)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    a = F.max_pool2d(torch.relu(F.conv2d(torch.as_tensor(X).reshape(-1, 1, 12, 12), tp["W1"], tp["b1"])), 2)
    a = F.max_pool2d(torch.tanh(F.conv2d(a, tp["W3"], tp["b3"], padding=1)), 2)
    ref = F.cross_entropy(a.flatten(1) @ tp["W6"].T + tp["b6"], torch.as_tensor(y))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for k in grads:
        assert rel_err(grads[k], tp[k].grad.numpy()) <= 1e-10, k
