"""Optimizer paths on 2-D surfaces (issue 5, item 6)."""

import numpy as np
import pytest

import symbp as sb
from symbp.read.paths import run_paths


def test_sgd_path_is_gradient_descent_on_the_derived_gradient():
    # f = (x - 1)^2 + 3 y^2: ∇f = (2(x - 1), 6y), so one SGD step is explicit.
    (path,), _ = run_paths("(x - 1)**2 + 3*y**2", [sb.SGD(lr=0.1)], start=(0.0, 1.0), steps=3)
    expected = [np.array([0.0, 1.0])]
    for _ in range(3):
        x, y = expected[-1]
        expected.append(np.array([x - 0.1 * 2 * (x - 1), y - 0.1 * 6 * y]))
    np.testing.assert_allclose(path.points, np.array(expected), rtol=0, atol=1e-15)
    np.testing.assert_allclose(path.values, [(x - 1) ** 2 + 3 * y**2 for x, y in expected], atol=1e-15)


def test_adam_path_matches_torch_adam():
    torch = pytest.importorskip("torch")
    (path,), _ = run_paths("rosenbrock", [sb.Adam(lr=0.05)], start=(-1.5, 2.0), steps=25)
    p = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(25):
        opt.zero_grad()
        ((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2).backward()
        opt.step()
    np.testing.assert_allclose(path.points[-1], p.detach().numpy(), rtol=0, atol=1e-12)


def test_momentum_goes_further_than_plain_sgd_on_rosenbrock():
    plain, heavy = run_paths("rosenbrock", [sb.SGD(lr=1e-3), sb.SGD(lr=1e-3, momentum=0.9)], steps=300)[0]
    assert heavy.values[-1] < plain.values[-1] / 10


def test_divergent_path_stops_at_last_finite_point():
    (path,), _ = run_paths("x**2 + y**2", [sb.SGD(lr=5.0)], start=(1.0, 1.0), steps=2000)
    assert np.isfinite(path.points).all() and len(path.points) < 2001


def test_a_formula_starts_where_the_gradient_is_not_zero():
    # x² + 10y² has its minimum at the origin: from there no optimizer would move.
    (path,), _ = run_paths("x**2 + 10*y**2", [sb.Adam(lr=0.05)], steps=50)
    assert tuple(path.points[0]) == (-1.5, 1.0) and path.values[-1] < path.values[0] / 10
    # here the first candidate is the minimum itself, so the next one is taken
    (path,), _ = run_paths("(x + 1.5)**2 + (y - 1)**2", [sb.SGD(lr=0.1)], steps=5)
    assert tuple(path.points[0]) == (1.0, 1.0) and path.values[-1] < path.values[0]


def test_png_and_gif_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = sb.optimizer_paths("saddle", [sb.SGD(lr=0.05), sb.Adam(lr=0.05)], steps=40,
                               path=tmp_path / "p.png", gif=tmp_path / "p.gif")
    assert len(paths) == 2
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gif", "p.png"]


@pytest.mark.parametrize("formula, match", [
    ("x**2 + z", "unknown symbol 'z'"),
    ("x**2 +", "does not parse"),
    ("__import__('os')", "unknown function"),
    ("rosenbrok", "unknown surface 'rosenbrok': use rosenbrock, beale, saddle, himmelblau or a formula in x and y"),
])
def test_bad_surface_is_refused(formula, match):
    with pytest.raises(ValueError, match=match):
        run_paths(formula, [sb.SGD(lr=0.1)], steps=2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one optimizer"):
        run_paths("saddle", [], steps=2)
    with pytest.raises(TypeError, match="symbp optimizers"):
        run_paths("saddle", ["adam"], steps=2)
    with pytest.raises(ValueError, match="start"):
        run_paths("saddle", [sb.SGD(lr=0.1)], start=(1.0,), steps=2)
    with pytest.raises(ValueError, match="steps"):
        run_paths("saddle", [sb.SGD(lr=0.1)], steps=0)
