"""Your own data on the command line: ``symbp train --data`` (.npz, .npy pairs, .csv, .tsv and
the spec's ``[train] data``), ``symbp predict`` and ``symbp evaluate``; bad files are named
with the line and column; every flag of every subcommand says what it does."""

from __future__ import annotations

import argparse
import csv
import re

import numpy as np
import pytest

import symbp as sb
from symbp.cli import build_parser
from symbp.cli import main as cli
from symbp.train.datafiles import read_data

SPEC = """
name = "cli-data"
inputs = 4
loss = "{loss}"
[[layers]]
units = 6
activation = "tanh"
[[layers]]
units = {outputs}
[train]
epochs = 3
lr = 0.1
"""


def blobs(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in four features, whole-number labels."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, np.argmax(X[:, :3], axis=1)


def write_csv(path, X, y, names=None, delimiter=","):
    """X's exact float64 values (repr) and y as whole-number labels, under a header."""
    names = names or [f"x{j}" for j in range(X.shape[1])] + ["label"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(names)
        for row, label in zip(X, y):
            w.writerow([repr(float(v)) for v in row] + [int(label)])


def held_out(out: str) -> str:
    return re.search(r"held-out score: .*", out).group(0)


@pytest.fixture
def project(tmp_path):
    """A spec in proj/ reading proj/data/train.npz, and the same data as .npy, .csv and .tsv."""
    X, y = blobs()
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    np.savez(proj / "data" / "train.npz", X=X, y=y)
    np.save(proj / "data" / "X.npy", X)
    np.save(proj / "data" / "y.npy", y)
    write_csv(proj / "data" / "train.csv", X, y)
    write_csv(proj / "data" / "train.tsv", X, y, delimiter="\t")
    # the label first: --target names it
    with open(proj / "data" / "first.csv", "w") as fh:
        fh.write("label,x0,x1,x2,x3\n" + "".join(f"{t}," + ",".join(map(repr, map(float, row))) + "\n"
                                                for t, row in zip(y, X)))
    (proj / "net.toml").write_text(SPEC.format(loss="softmax_cross_entropy", outputs=3)
                                   + 'data = "data/train.npz"\n')
    return proj, X, y


def test_every_format_trains_to_the_same_numbers(project, tmp_path, monkeypatch, capsys):
    """The same samples as .npz, an .npy pair, .csv, .tsv, or a CSV whose target is named:
    the same split, the same training, the same held-out score."""
    proj, X, y = project
    monkeypatch.chdir(tmp_path)  # the spec's data path is read from the spec's folder, not here
    assert cli(["train", "proj/net.toml", "-q"]) == 0
    out = capsys.readouterr().out
    reference = held_out(out)
    assert f"data: {proj / 'data' / 'train.npz'}" in out
    d = proj / "data"
    for flags in (["--data", str(d / "X.npy"), "--labels", str(d / "y.npy")], ["--data", str(d / "train.csv")],
                  ["--data", str(d / "train.tsv")], ["--data", str(d / "first.csv"), "--target", "label"]):
        assert cli(["train", "proj/net.toml", "-q", *flags]) == 0, capsys.readouterr().err
        assert held_out(capsys.readouterr().out) == reference, flags
    # the same keys in the spec's [train] table
    spec = proj / "net2.toml"
    spec.write_text(SPEC.format(loss="softmax_cross_entropy", outputs=3)
                    + 'data = "data/first.csv"\ntarget = "label"\n')
    assert cli(["train", str(spec), "-q"]) == 0
    assert held_out(capsys.readouterr().out) == reference


def test_a_missing_spec_data_file_names_where_it_looked(project, tmp_path, monkeypatch, capsys):
    proj, _, _ = project
    (proj / "net.toml").write_text(SPEC.format(loss="softmax_cross_entropy", outputs=3) + 'data = "nope.npz"\n')
    monkeypatch.chdir(tmp_path)
    assert cli(["train", "proj/net.toml", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"data file {proj / 'nope.npz'} does not exist" in err and "the spec's folder" in err


def test_predict_and_evaluate_agree_with_the_model(project, tmp_path, capsys):
    proj, X, y = project
    run = tmp_path / "run.npz"
    assert cli(["train", str(proj / "net.toml"), "-q", "--save", str(run)]) == 0
    capsys.readouterr()
    model = sb.load(run)
    # evaluate: loss as the model computes it, accuracy counted here
    assert cli(["evaluate", str(run), str(proj / "data" / "train.csv")]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"loss: ([-0-9.e]+)", out).group(1))
    accuracy = float(re.search(r"accuracy: ([0-9.e-]+)", out).group(1))
    assert loss == pytest.approx(model.evaluate(X, y)[0], rel=1e-5)
    assert accuracy == pytest.approx(np.mean(model.predict(X) == y), abs=1e-6)
    # predict: the labels and the softmax of the logits, computed here
    for source in ("train.csv", "X.npy", "train.npz"):
        out_csv = tmp_path / f"p-{source}.csv"
        assert cli(["predict", str(run), str(proj / "data" / source), "-o", str(out_csv)]) == 0, \
            capsys.readouterr().err
        rows = list(csv.reader(out_csv.open()))
        assert rows[0] == ["prediction", "p_0", "p_1", "p_2"]
        table = np.array(rows[1:], dtype=float)
        z = model.decision_function(X).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_array_equal(table[:, 0], np.argmax(z, axis=1))
        np.testing.assert_allclose(table[:, 1:], p, rtol=1e-6, atol=1e-8)
    # features alone (no target column) predict the same
    features = tmp_path / "features.csv"
    features.write_text("x0,x1,x2,x3\n" + "".join(",".join(map(repr, map(float, row))) + "\n" for row in X))
    capsys.readouterr()
    assert cli(["predict", str(run), str(features)]) == 0  # to stdout
    printed = np.array([line.split(",") for line in capsys.readouterr().out.split()[1:]], dtype=float)
    np.testing.assert_array_equal(printed[:, 0], model.predict(X))
    # a spec is not a trained model
    assert cli(["predict", str(proj / "net.toml"), str(features)]) == 2
    assert "needs a trained model" in capsys.readouterr().err


def test_evaluate_gives_r2_for_regression(tmp_path, capsys):
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 4))
    y = X @ np.array([0.5, -1.0, 2.0, 0.0]) + 0.1 * rng.normal(size=80)
    with open(tmp_path / "reg.csv", "w") as fh:  # a real-valued target column
        fh.write("a,b,c,d,target\n" + "".join(",".join(map(repr, [*map(float, r), float(t)])) + "\n"
                                             for r, t in zip(X, y)))
    spec = tmp_path / "reg.toml"
    spec.write_text(SPEC.format(loss="mse", outputs=1).replace("epochs = 3", "epochs = 20")
                    + 'data = "reg.csv"\n')
    assert cli(["train", str(spec), "-q", "--save", str(tmp_path / "reg.npz")]) == 0
    assert "R²" in capsys.readouterr().out
    assert cli(["evaluate", str(tmp_path / "reg.npz"), str(tmp_path / "reg.csv")]) == 0
    out = capsys.readouterr().out
    model = sb.load(tmp_path / "reg.npz")
    r2 = float(re.search(r"R²: ([-0-9.e]+)", out).group(1))
    assert r2 == pytest.approx(r2_score(y, model.predict(X).ravel()), rel=1e-5)
    assert "accuracy" not in out


@pytest.mark.parametrize("text, message", [
    ("a,b,label\n1,2,0\n3,,1\n", "line 3, column 'b': missing value (an empty cell)"),
    ("a,b,label\n1,2,0\n3,NA,1\n", "line 3, column 'b': missing value ('NA')"),
    ("a,b,label\n1,2,0\n\n3,x7,1\n", "line 4, column 'b': 'x7' is not a number"),
    ("a,b,label\n1,2,0\n3,4,1,5\n", "line 3: 4 cells, the header has 3"),
    ("a,b,label\n1,2\n", "line 2: 2 cells, the header has 3"),
    ("1,2,0\n3,4,1\n", "line 1: the first row holds numbers, not column names"),
    ("a,b,label\n1,inf,0\n", "line 2, column 'b': 'inf' is not a finite number"),
    ("a,b,label\n", "has a header but no samples"),
    ("", "is empty"),
])
def test_a_bad_csv_is_named_with_its_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_data(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_binary_files_and_flags_are_named(tmp_path, capsys):
    X, y = blobs(12)
    np.savez(tmp_path / "other.npz", features=X, labels=y)
    with pytest.raises(ValueError, match=r"no array 'X' \(it holds: features, labels\)"):
        read_data(tmp_path / "other.npz")
    np.save(tmp_path / "X.npy", X)
    with pytest.raises(ValueError, match="holds X only: give its targets as a second .npy, --labels y.npy"):
        read_data(tmp_path / "X.npy")
    np.save(tmp_path / "short.npy", y[:5])
    with pytest.raises(ValueError, match="X has 12 samples but y has 5"):
        read_data(tmp_path / "X.npy", labels=tmp_path / "short.npy")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "X.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match="but the file holds"):
        read_data(tmp_path / "cut.npy", labels=tmp_path / "short.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects, which are never read"):
        read_data(tmp_path / "objects.npy", need_targets=False)
    with pytest.raises(ValueError, match="symbp reads 'digits', .npz"):
        read_data(tmp_path / "data.xlsx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_data(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="--target names a column of a .csv"):
        read_data(tmp_path / "other.npz", target="y")
    write_csv(tmp_path / "t.csv", X, y)
    with pytest.raises(ValueError, match=r"has no column 'species' \(its columns: x0, x1, x2, x3, label\)"):
        read_data(tmp_path / "t.csv", target="species")
    # data that does not fit the network is refused before anything compiles, naming the file
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC.format(loss="softmax_cross_entropy", outputs=2))
    assert cli(["train", str(spec), "-q", "--data", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert "t.csv (target column 'label') does not fit the network: label 2 out of range" in err
    assert "compiling" not in capsys.readouterr().out


def _actions(parser: argparse.ArgumentParser, path: str = "symbp"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield path, action
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{path} {name} has no help line"
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    seen = set()
    for path, action in _actions(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{path}: {name} has no help text"
        seen.add((path, name))
    for must in (("symbp train", "--data"), ("symbp train", "--target"), ("symbp train", "--labels"),
                 ("symbp predict", "data"), ("symbp predict", "-o/--output"), ("symbp evaluate", "model"),
                 ("symbp walkthrough", "--row"), ("symbp train", "--epochs")):
        assert must in seen, must
