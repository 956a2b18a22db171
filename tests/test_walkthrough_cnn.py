"""The worked example and the graph on small image networks: every δ (each (channel, row, col)
entry) and every gradient the derivation gives, evaluated from its own formulas, against
five-point finite differences and the generated kernels; the graph's gates carry the same
numbers; a wrong derivation fails."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

import symbp as sb
from symbp.read.graph import graph
from symbp.read.walkthrough import walkthrough

wt = importlib.import_module("symbp.read.walkthrough")  # the module: symbp.read.walkthrough is also the function

NETS = {
    "conv-maxpool": lambda: sb.Network(inputs=(1, 4, 4), layers=[sb.Conv2D(2, 2), sb.MaxPool2D(2), sb.Flatten(),
                                                                 sb.Dense(3)], loss="softmax_cross_entropy"),
    "conv-relu-padded": lambda: sb.Network(inputs=(1, 4, 4), layers=[
        sb.Conv2D(2, 2, padding=1, activation="relu"), sb.MaxPool2D(2), sb.Flatten(), sb.Dense(3)],
        loss="softmax_cross_entropy", l2=0.01),
    "conv-avgpool-maxout": lambda: sb.Network(inputs=(1, 4, 4), layers=[
        sb.Conv2D(2, 2, activation="tanh"), sb.AvgPool2D(2), sb.Flatten(), sb.Maxout(2, 2), sb.Dense(2)],
        loss="mse", l2=0.1),
    "strided-2ch": lambda: sb.Network(inputs=(2, 4, 5), layers=[
        sb.Conv2D(2, (2, 3), stride=(2, 1), padding=(1, 0), activation="sigmoid"), sb.Flatten(), sb.Dense(2)],
        loss="mse"),
    # the last layer a conv: the loss reads its image flat
    "conv-output": lambda: sb.Network(inputs=(1, 3, 4), layers=[sb.Conv2D(2, 2, padding=1, activation="tanh")],
                                      loss="mse", l2=0.1),
}


@pytest.fixture(scope="module", params=sorted(NETS))
def example(request):
    net = NETS[request.param]()
    model = sb.compile(net, dtype="float64", seed=1)
    return net, model, walkthrough(model, seed=1)


def test_every_delta_and_gradient_checked(example):
    net, model, w = example
    assert w.ok and w.max_error < 1e-6
    deltas = [c for c in w.checks if c.entry.startswith("delta")]
    assert len(deltas) == sum(net.widths[1:])  # every entry of every layer, image layers included
    assert all(c.status == "ok" for c in w.checks)  # no kink excuses, nothing unchecked
    grads = [c for c in w.checks if not c.entry.startswith("delta")]
    assert len(grads) == sum(v.size for v in model.params.values())
    assert all(c.kernel_error is not None and c.kernel_error < 1e-9 for c in grads)
    # image entries are named by their indices
    assert any(c.label == "δ z1[k=1, h=0, w=1]" and c.entry == "delta1[1,0,1]" for c in deltas)


def test_gradients_equal_the_kernels(example):
    net, model, w = example
    loss, grads = model.loss_and_grads(w.x[None, :], w.t[None, :])
    assert abs(loss - w.loss) <= 1e-10 * max(1.0, abs(loss))
    assert set(grads) == set(w.grads)
    for key, g in grads.items():
        np.testing.assert_allclose(w.grads[key], g, rtol=0, atol=1e-10)
    # the forward values too: the last layer against the kernels' logits
    np.testing.assert_allclose(w.a[-1], model.decision_function(w.x[None, :])[0], rtol=0, atol=1e-10)


def test_stages_and_tables(example):
    net, model, w = example
    assert len(w.z[0]) == net.widths[1]
    stage_names = {name for stages in w.stages for name in stages}
    assert stage_names  # the padded input, a window's arg-max or Maxout's pieces
    w.max_rows = 3
    shown = str(w)
    assert "z1[k=0, h=0, w=0]" in shown and "more" in shown and "all agree" in shown
    assert "Intermediate stages" in shown
    assert len(shown.splitlines()) < 120  # bounded by max_rows
    html = w._repr_html_()
    assert "z1[k=0, h=0, w=0]" in html and "Intermediate stages" in html


def test_graph_gates_carry_the_walkthroughs_numbers(example):
    net, model, w = example
    g = graph(w, collapse=False)
    assert not g.collapsed
    for key, arr in w.params.items():
        for pos in np.ndindex(*arr.shape):
            node = g.entry(f"{key}[{','.join(map(str, pos))}]")
            assert node.grad == pytest.approx(w.grads[key][pos], rel=1e-9, abs=1e-12)
    for l in range(1, len(net.layers) + 1):
        for u, pos in enumerate(np.ndindex(*net.shapes[l])):
            node = g.entry(f"z{l}[{','.join(map(str, pos))}]")
            assert node.value == pytest.approx(w.z[l - 1][u], rel=1e-12, abs=1e-12)
            assert node.grad == pytest.approx(w.delta[l - 1][u], rel=1e-9, abs=1e-12)
    cost = next(n for n in g.nodes.values() if n.kind == "cost")
    assert cost.value == pytest.approx(w.loss, rel=1e-12)
    collapsed = graph(w, collapse=True)
    assert collapsed.collapsed and "digraph" in collapsed.dot


def test_conv_window_is_mul_and_add_gates_and_pool_a_max_gate():
    net = NETS["conv-maxpool"]()
    w = walkthrough(net, seed=0)
    g = graph(w)
    assert not g.collapsed  # small: drawn entry by entry by default
    z = g.entry("z1[1,2,0]")  # filter 1 at row 2, column 0
    assert z.label == "+"
    into = [g.nodes[e.src] for e in g.edges_into(z.id)]
    muls = [n for n in into if n.label == "×"]
    assert len(muls) == 4 and [n.label for n in into if n.kind == "param"] == ["b1[1]"]
    pairs = {frozenset(g.nodes[e.src].label for e in g.edges_into(m.id)) for m in muls}
    assert pairs == {frozenset({f"W1[1,0,{u},{v}]", f"x[0,{2 + u},{v}]"}) for u in (0, 1) for v in (0, 1)}
    for e in g.edges_into(z.id):  # add distributes
        assert e.grad == pytest.approx(w.delta[0][np.ravel_multi_index((1, 2, 0), net.shapes[1])])
    pool = g.entry("z2[0,0,0]")
    assert pool.label == "max" and len(g.edges_into(pool.id)) == 4
    grads = [e.grad for e in g.edges_into(pool.id)]
    assert sum(x != 0 for x in grads) == 1 and sum(grads) == pytest.approx(pool.grad)  # routed to the arg-max
    # the window's largest input receives it
    vals = [e.value for e in g.edges_into(pool.id)]
    assert grads[int(np.argmax(vals))] == pytest.approx(pool.grad)


def test_avg_pool_is_add_and_scale():
    net = NETS["conv-avgpool-maxout"]()
    g = graph(walkthrough(net, seed=0))
    avg = g.entry("z2[0,0,0]")
    assert avg.label == "× 1/4"
    (add,) = [g.nodes[e.src] for e in g.edges_into(avg.id)]
    assert add.label == "+" and len(g.edges_into(add.id)) == 4
    assert g.entry("z4[0]").label == "max"  # Maxout: the max of its pieces


def test_a_wrong_derivation_fails(monkeypatch):
    net = NETS["conv-relu-padded"]()
    good = sb.derive(net)
    assert walkthrough(net, seed=1).ok

    def wrong(change):
        d = copy.deepcopy(good)
        change(d)
        monkeypatch.setattr(wt, "derive", lambda _net: d)
        return walkthrough(net, seed=1)

    w = wrong(lambda d: d.layers[0].grads.update(W=d.layers[0].grads["W"] * 1.001))  # one grad formula off
    assert not w.ok and all(c.status == "FAILED" for c in w.checks if c.entry.startswith("W1") and c.value != 0)
    assert all(c.status == "ok" for c in w.checks if c.entry.startswith("delta"))
    # the max pool's routing sent to the wrong window position: some δ of layer 1 fails
    d_bad = good.layers[0].delta_formula
    from symbp.spec.ops import route
    w = wrong(lambda d: setattr(d.layers[0], "delta_formula",
                                d_bad.replace(route, lambda m, j: route(m, j + 1))))
    assert not w.ok and any(c.status == "FAILED" for c in w.checks if c.entry.startswith("delta1"))
