"""Sums over Kronecker deltas (``symbp/index_sums.py``): ``delta_sums`` gives what SymPy's
``Sum.doit`` gives, without the ``solve`` (and its ``simplify``, and the ``sympy.physics``
import that brings) doit runs to find each δ's root.

The generated modules and ``explain()`` of every network the tests build were compared byte
for byte with and without it when it was written; here: the same results as doit on the
shapes the derivation produces, the Sums it must leave to doit, and a derivation that no
longer imports ``sympy.physics``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sympy as sp

from symbp.index_sums import delta_sums

i, j, p, q, h, u, r, c, w = (sp.Symbol(s_, integer=True, nonnegative=True) for s_ in "ijpqhurcw")
n = sp.Symbol("n", integer=True)
S, K, D, H, P_ = (sp.Symbol(s_, integer=True, positive=True) for s_ in ("S", "K", "D", "H", "P"))
W, a, x, g = (sp.IndexedBase(s_) for s_ in ("W", "a", "x", "g"))
KD = sp.KroneckerDelta

CASES = {
    "dense weight": sp.Sum(KD(i, p) * KD(j, q) * a[n, j], (j, 0, D - 1)),
    "two limits": sp.Sum(KD(i, p) * KD(j, q) * W[i, j], (i, 0, D - 1), (j, 0, K - 1)),
    "root with coefficient -1": sp.Sum(KD(r, S * h + u) * W[c, u], (u, 0, K - 1)),
    "root under a product": sp.Sum(KD(i, H * (S * c + h) + w) * KD(q, w) * g[n, i], (w, 0, H - 1)),
    "a factor times a guard": sp.Sum(g[n, i] * sp.Piecewise((KD(i, p) * a[n, q], q <= D - 1), (0, True)), (i, 0, K - 1)),
    "a limit past the δ's": sp.Sum(KD(i, p) * a[n, q] * g[n, i], (i, 0, D - 1), (n, 0, P_ - 1)),
    "padding": sp.Sum(KD(r, h - P_) * x[n, h], (h, 0, H + 2 * P_ - 1)),
    "a δ times a sum without δ's": sp.Sum(KD(i, p) * (a[n, i] + g[n, i]), (i, 0, D - 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_delta_sums_give_what_doit_gives(name):
    expr = CASES[name]
    assert delta_sums(expr) == expr.doit()
    assert not delta_sums(expr).has(sp.Sum) or name == "a limit past the δ's"


@pytest.mark.parametrize("why, expr", [
    ("a δ times a sum of δ's (doit sums term by term)", sp.Sum(KD(j, p) * (KD(i, j) * a[n, i] + g[n, j]), (j, 0, D - 1))),
    ("a root with coefficient 2", sp.Sum(KD(2 * i, p) * a[n, i], (i, 0, D - 1))),
    ("a guard on the summed index", sp.Sum(sp.Piecewise((KD(i, p) * a[n, i], i <= q), (0, True)), (i, 0, D - 1))),
    ("no δ at all", sp.Sum(a[n, i], (i, 0, D - 1))),
])
def test_sums_off_that_path_are_left_to_doit(why, expr):
    assert delta_sums(expr) == expr, why


def test_deriving_a_cnn_does_not_import_sympy_physics():
    code = ("import sys, symbp as sb\n"
            "net = sb.Network(inputs=(1, 12, 12), layers=[sb.Conv2D(4, 3, padding=1, activation='relu'), sb.MaxPool2D(2),"
            " sb.Flatten(), sb.Dense(3)], loss='softmax_cross_entropy')\n"
            "sb.derive(net)\n"
            "print('sympy.physics' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
