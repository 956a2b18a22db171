"""Loop fusion (``symbp/lower/fuse.py``): passes over the same (batch, units) entries become one
loop only where that computes the same values.

On IR steps: what merges (elementwise loops, a sum over the batch, a column sum, a loop moved
past a GEMM it does not depend on) and what must not (a read at another entry, a sum read
before it is complete, a step moved past one it depends on).  On generated code: a residual
block's add and BatchNorm's batch mean ride in the loop of the relu before them.  That the
fused kernels compute the right numbers is what every gradient test against PyTorch checks
(BatchNorm, LayerNorm, graph networks, every network of test_every_network).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import sympy as sp

import symbp as sb
from symbp.indices import N
from symbp.lower.fuse import fuse_loops
from symbp.lower.ir import ColSum, Gemm, Loop, Nest

n, i, nu, q, p = (sp.Symbol(s_, integer=True) for s_ in ("n", "i", "nu", "q", "p"))
A, B, C, D, M, X, W, g = (sp.IndexedBase(s_) for s_ in ("A", "B", "C", "D", "M", "X", "W", "g"))


def fuse(steps, buffers=None):
    return fuse_loops(steps, lambda e: e, lambda label: (buffers or {}).get(label, label))


def test_elementwise_loops_merge_and_a_written_entry_is_read_as_its_formula():
    out = fuse([Loop([(n, N), (i, 4)], [(A[n, i], X[n, i] + 1)]),
                Nest([(nu, N), (q, 4)], [(B[nu, q], 2 * A[nu, q])])])
    assert len(out) == 1
    assert out[0].stmts == [(A[n, i], X[n, i] + 1), (B[n, i], 2 * A[n, i])]


def test_a_read_at_another_entry_does_not_merge():
    steps = [Loop([(n, N), (i, 4)], [(A[n, i], X[n, i] + 1)]),
             Nest([(nu, N), (q, 3)], [(B[nu, q], A[nu, q + 1])])]
    assert len(fuse(steps)) == 2  # (also: the extents differ)
    steps[1] = Nest([(nu, N), (q, 4)], [(B[nu, q], A[nu, 3 - q])])
    assert len(fuse(steps)) == 2


def test_a_batch_sum_joins_the_loop_before_it_but_is_complete_before_it_is_read():
    steps = [Loop([(n, N), (i, 4)], [(A[n, i], X[n, i] + 1)]),
             Nest([(q, 4)], [(M[0, q], sp.Integer(0))]),
             Nest([(nu, N), (q, 4)], [(M[0, q], A[nu, q])], accumulate=True),
             Loop([(n, N), (i, 4)], [(B[n, i], A[n, i] - M[0, i])])]
    out = fuse(steps)
    assert [type(s_).__name__ for s_ in out] == ["Nest", "Loop", "Loop"]
    zero, first, second = out
    assert zero.stmts == [(M[0, q], 0)]  # the sum starts before the loop it joined
    assert first.stmts == [(A[n, i], X[n, i] + 1)] and first.adds == [(M[0, i], A[n, i])]
    assert second.stmts == [(B[n, i], A[n, i] - M[0, i])]


def test_a_column_sum_joins_the_loop_that_writes_its_rows():
    out = fuse([Loop([(n, N), (p, 4)], [(D[n, p], 3 * X[n, p])]), ColSum(g, D, N, 4)])
    assert len(out) == 2 and isinstance(out[0], Nest)
    assert out[1].stmts == [(D[n, p], 3 * X[n, p])] and out[1].adds == [(g[p], D[n, p])]


def test_a_loop_moves_past_a_gemm_only_if_independent_of_it():
    first = Loop([(n, N), (i, 4)], [(A[n, i], X[n, i] + 1)])
    gemm = Gemm(C, A, False, W, True)  # reads A, writes C
    reads_a = Loop([(n, N), (i, 4)], [(B[n, i], 2 * A[n, i])])
    reads_c = Loop([(n, N), (i, 4)], [(B[n, i], 2 * C[n, i])])
    sets_a = Loop([(n, N), (i, 4)], [(A[n, i], 2 * X[n, i])])
    out = fuse([first, gemm, reads_a])
    assert len(out) == 2 and out[1] is gemm and len(out[0].stmts) == 2
    assert len(fuse([Loop(first.ranges, list(first.stmts)), gemm, reads_c])) == 3  # needs the GEMM's result
    assert len(fuse([Loop(first.ranges, list(first.stmts)), gemm, sets_a])) == 3  # the GEMM reads the old A


def test_two_names_of_one_buffer_are_one_array():
    """An Add's output is z4 to the layer writing it and a4 to its reader, one buffer: the
    read becomes the written entry's formula."""
    z4, a4 = sp.IndexedBase("z4"), sp.IndexedBase("a4")
    out = fuse([Loop([(n, N), (i, 4)], [(z4[n, i], X[n, i] + 1)]),
                Nest([(nu, N), (q, 4)], [(M[0, q], a4[nu, q])], accumulate=True)],
               {"z4": "Z4", "a4": "Z4"})
    assert len(out) == 1 and out[0].adds == [(M[0, i], z4[n, i])]


def test_residual_add_and_batch_mean_ride_in_the_relu_loop():
    x = sb.Input(6)
    h = sb.Dense(5, activation="relu")(x)
    r = sb.Dense(5, activation="relu")(sb.BatchNorm()(h))
    net = sb.Network(inputs=x, outputs=sb.Dense(3)(sb.BatchNorm()(sb.Add()([h, r]))))
    src = sb.compile(net).source_path.read_text(encoding="utf-8")
    fwd = src[src.index("def forward_train("):src.index("def update_running(")]
    # the relu of the second Dense, the residual sum Z4 and the batch mean of BatchNorm 5
    # (its running sum) in one loop body
    assert re.search(r"\n {12}A3\[n, i\] = (\w+)\n {12}Z4\[n, i\] = (\w+)\n {12}Am5\[0, i\] \+= \w*\*?\2\n", fwd), fwd
    loops = len(re.findall(r"for (?:n|nu) in range\(nb\)", fwd))
    assert loops == 7, fwd  # 2 BatchNorms × (values + mean, variance, normalised) + the output bias


def test_work_buffers_no_step_uses_are_not_allocated(tmp_path):
    """A conv fused into its pool (relu applied as the pool reads the GEMM's output, the pool's
    δ written straight into the GEMM's) never fills its own z, a and δ: the modules drop them
    from their work buffers and parameter lists, and every buffer kept is named by some
    step of the model or training module."""
    net = sb.Network(inputs=(1, 8, 8), layers=[sb.Conv2D(2, 3, activation="relu"), sb.MaxPool2D(2), sb.Flatten(),
                                               sb.Dense(3)], loss="softmax_cross_entropy")
    model = sb.compile(net, cache_dir=tmp_path)
    names = [w for w, _ in model.kernels.WORKSPACE]
    assert not {"Z1", "A1", "dZ1"} & set(names), names
    assert set(model.kernels.ROLES) == set(names)
    train = Path(model._train_kernels(sb.SGD(lr=0.1)).__file__).read_text(encoding="utf-8")
    src = model.source_path.read_text(encoding="utf-8") + train
    bodies = "\n".join(line for line in src.split("\n") if not line.startswith(("def ", "WORKSPACE", "ROLES")))
    assert all(re.search(rf"\b{w}\b", bodies) for w in names)
    assert not re.search(r"\b(Z1|A1|dZ1)\b", src)
    # and the model trains as before: one epoch's loss is finite and falls
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 64)), rng.integers(0, 3, 40)
    hist = model.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=16, epochs=3, progress=False)
    assert np.isfinite(hist["loss"]).all() and hist["loss"][-1] < hist["loss"][0]
