"""Fewer passes over image buffers (``symbp/lower/elide.py``): a layout copy elided, the conv's
bias and activation computed inside the max pool's scan.

On IR steps: what is elided or fused and what must not be (a buffer read in between, a GEMM
operand, an alias, windows that leave entries out, a value another step reads).  On generated
code: a relu conv → 2×2 pool → conv → pool net has no pass writing the first conv's
activation nor copying a δ, and its loss, gradients and SGD steps equal PyTorch's in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from _support import rel_err

import symbp as sb
from symbp.indices import N
from symbp.lower.elide import drop_dead_stores, elide_copies, fuse_scans
from symbp.lower.ir import BlockGemm, Gemm, Loop, Nest, WindowArgmax
from symbp.spec.ops import relu

torch = pytest.importorskip("torch")
F = torch.nn.functional

n, k, h, w, u, v, p = (sp.Symbol(s_, integer=True) for s_ in ("n", "k", "h", "w", "u", "v", "p"))
A, B, Z, Zt, G, Wt, M, P, b = (sp.IndexedBase(s_) for s_ in ("A", "B", "Z", "Zt", "G", "Wt", "M", "P", "b"))
IMAGE = [(n, N), (k, 2), (h, 4), (w, 4)]
SHAPES = {"A": (2, 4, 4), "B": (2, 4, 4), "Z": (2, 4, 4), "Zt": (2, 4, 4), "M": (2, 2, 2), "P": (2, 2, 2)}


def elide(steps, private=("A",), buffers=None):
    return elide_copies(steps, lambda lab: (buffers or {}).get(lab, lab), lambda lab: lab in private, SHAPES.get)


def delta_steps():
    """A zeroed, stored into, copied to B, then summed over: the pool's δ and its copy."""
    return [Nest(IMAGE, [(A[n, k, h, w], sp.Integer(0))]),
            Nest(IMAGE, [(A[n, k, h, w], 2 * G[n, k, h, w])]),
            Nest(IMAGE, [(B[n, k, h, w], A[n, k, h, w])]),
            Nest([(p, 2)], [(G[0, p, 0, 0], sp.Sum(A[n, p, h, w], (h, 0, 3), (w, 0, 3), (n, 0, N - 1)))])]


def test_a_copy_is_elided_and_every_step_names_its_target():
    out = elide(delta_steps())
    assert len(out) == 3
    assert out[0].stmts == [(B[n, k, h, w], 0)] and out[1].stmts == [(B[n, k, h, w], 2 * G[n, k, h, w])]
    assert out[2].stmts[0][1] == sp.Sum(B[n, p, h, w], (h, 0, 3), (w, 0, 3), (n, 0, N - 1))
    assert all("A" not in str(s.stmts) for s in out)


def _between(s):
    return s[:1] + [Nest(IMAGE, [(Z[n, k, h, w], B[n, k, h, w])])] + s[1:]


def _part(s):
    return s[:2] + [Nest([(n, N), (k, 1), (h, 4), (w, 4)], [(B[n, k, h, w], A[n, k, h, w])])] + s[3:]


@pytest.mark.parametrize("why, steps, kw", [
    ("B read between A's first write and the copy", _between, {}),
    ("B written after the copy", lambda s: s + [Nest(IMAGE, [(B[n, k, h, w], sp.Integer(1))])], {}),
    ("A a GEMM operand", lambda s: s + [BlockGemm(Wt, A, False, Zt, True, shapes=((8, 2), (8, 2), (2, 2)))], {}),
    ("A not private to the function", lambda s: s, {"private": ()}),
    ("A read by another label too", lambda s: s + [Nest(IMAGE, [(Z[n, k, h, w], P[n, k, h, w])])], {"buffers": {"P": "A"}}),
    ("a copy of part of A", _part, {}),
    ("A read before this function sets it", lambda s: [Nest(IMAGE, [(Z[n, k, h, w], A[n, k, h, w])])] + s, {}),
])
def test_a_copy_stays_where_eliding_it_could_change_a_value(why, steps, kw):
    planned = steps(delta_steps())
    assert elide(planned, **kw) == planned, why


def scan_steps(extent=4, act=None):
    """z = b + zt and a = f(z) over a 4×4 map, then a 2×2 max pool reading a."""
    act = act or relu(Z[n, k, h, w])
    win = [(u, 2), (v, 2)]
    return [Nest(IMAGE[:2] + [(h, extent), (w, extent)], [(Z[n, k, h, w], b[k] + Zt[n, k, h, w]), (A[n, k, h, w], act)]),
            WindowArgmax([(n, N), (k, 2), (h, 2), (w, 2)], M[n, k, h, w], A[n, k, 2 * h + u, 2 * w + v], win, P[n, k, h, w])]


def test_bias_and_activation_move_into_the_scan_and_only_what_is_read_later_is_stored():
    out = fuse_scans(scan_steps(), lambda lab: lab, lambda name: name == "Z")
    assert len(out) == 1 and isinstance(out[0], WindowArgmax)
    at = (n, k, 2 * h + u, 2 * w + v)
    assert out[0].pre == [(Z[at], b[k] + Zt[at])]  # z stored (the backward pass reads it); a in a register
    assert out[0].value == relu(Z[at])
    both = fuse_scans(scan_steps(), lambda lab: lab, lambda name: name in ("Z", "A"))
    assert [t for t, _ in both[0].pre] == [Z[at], A[at]] and both[0].value == A[at]


def test_a_scan_whose_windows_leave_entries_out_is_not_fused():
    steps = scan_steps(extent=5)  # a 5×5 map: 2×2 windows of stride 2 never read row and column 4
    assert fuse_scans(steps, lambda lab: lab, lambda name: False) == steps


def test_a_value_another_step_reads_stays_stored():
    steps = scan_steps() + [Nest(IMAGE, [(B[n, k, h, w], 3 * A[n, k, h, w])])]
    out = fuse_scans(steps, lambda lab: lab, lambda name: name == "Z")
    assert [t.base for t, _ in out[0].pre] == [Z, A]


ROW = [(n, N), (p, 3)]


def bias_relu():
    """A GEMM into Z, then z = b + z and a = relu(z) at each entry (a Dense layer's pass)."""
    return [Gemm(Z, A, False, Wt, True), Loop(ROW, [(Z[n, p], b[p] + Z[n, p]), (B[n, p], relu(Z[n, p]))])]


def test_a_store_no_one_reads_is_dropped_and_its_formula_read_in_its_place():
    out = drop_dead_stores(bias_relu(), lambda lab: lab, lambda name: name == "B")  # (B: the layer's output)
    assert out[1].stmts == [(B[n, p], relu(b[p] + Z[n, p]))] and out[0] == bias_relu()[0]


@pytest.mark.parametrize("why, steps, needed", [
    ("read by a later function", bias_relu(), {"Z"}),
    ("read by another step", bias_relu() + [Loop(ROW, [(G[n, p], 2 * Z[n, p])])], set()),
    ("read at another entry", [Loop(ROW, [(Z[n, p], b[p]), (B[n, p], Z[n, 2 - p])])], set()),
    ("read by the loop's sum", [Loop(ROW, [(Z[n, p], b[p])], [(sp.Symbol("total"), Z[n, p])])], set()),
    ("a step the pass cannot read", bias_relu() + [object()], set()),
])
def test_a_store_someone_reads_stays(why, steps, needed):
    assert drop_dead_stores(steps, lambda lab: lab, lambda name: name in needed | {"B", "G"}) == steps, why


NET = sb.Network(inputs=(1, 14, 14), layers=[sb.Conv2D(3, 3, activation="relu"), sb.MaxPool2D(2),
                                             sb.Conv2D(4, 2, activation="relu"), sb.MaxPool2D(2), sb.Flatten(),
                                             sb.Dense(3)], loss="softmax_cross_entropy", name="elide-two-convs")


def torch_loss(params, X, y):
    a = torch.as_tensor(X).reshape(-1, 1, 14, 14)
    for pos in (1, 3):
        a = F.max_pool2d(torch.relu(F.conv2d(a, params[f"W{pos}"], params[f"b{pos}"])), 2)
    return F.cross_entropy(a.flatten(1) @ params["W6"].T + params["b6"], torch.as_tensor(y))


def test_generated_code_has_no_activation_pass_nor_delta_copy_and_matches_torch(compiled):
    model = compiled(NET)
    writes = {(row[0], row[3]) for row in model.kernels.PROVENANCE}
    forward = [w_ for fn, w_ in writes if fn == "forward"]
    assert not any("A1" in w_ for w_ in forward), forward  # relu of conv 1 lives in the scan's registers
    # the scan stores only its outputs: relu′ at a window's arg-max is read from the window's
    # maximum (H(z) = H(a), a = max there), so z₁ is neither stored nor read back
    assert ("forward", ("Am2", "Z2")) in writes
    assert not any("Z1" in w_ or "A1" in w_ for _, w_ in writes)
    # conv 3's 5×5 map is pooled leaving entries out: its own pass, which stores a₃ alone (the
    # pool's δ reads relu′ at each window's maximum, so no one reads z₃)
    assert ("forward", ("A3",)) in writes
    backward = [w_ for fn, w_ in writes if fn == "backward"]
    assert not any(w_ in (("dZ1",), ("dZ3",)) for w_ in backward), backward  # δ straight into dZt1, dZt3
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(6, 196)), rng.integers(0, 3, 6)
    for key, value in model.params.items():  # non-zero biases
        model.params[key] = value + (0.1 * rng.normal(size=value.shape) if key.startswith("b") else 0)
    tp = {key: torch.tensor(value.copy(), requires_grad=True) for key, value in model.params.items()}
    loss, grads = model.loss_and_grads(X, y)
    ref = torch_loss(tp, X, y)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-12 * abs(ref.item())
    for key in grads:
        assert rel_err(grads[key], tp[key].grad.numpy()) <= 1e-10, key
    opt = torch.optim.SGD(list(tp.values()), lr=0.1)
    for rows in (slice(0, 4), slice(4, 6)):  # a full batch and a short one (the flat index holds nb)
        opt.zero_grad()
        torch_loss(tp, X[rows], y[rows]).backward()
        opt.step()
    model.fit(X, y, optimizer=sb.SGD(lr=0.1), batch_size=4, epochs=1, shuffle=False, progress=False)
    for key, value in tp.items():
        assert rel_err(model.params[key], value.detach().numpy()) <= 1e-10, key
