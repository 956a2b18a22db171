"""What a new user tripped on (issue 17, item 6): the learning rate of an optimizer named on the
command line, the training summary, the progress bar, optimizer typos, a diverging lr, the
worked example of a checkpoint, ``--seed`` over a ``[walkthrough]`` table, ``--scalar``'s
advice, the hog example without its extra, leftovers of a killed save, the test cache."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import symbp as sb
from symbp._output import remove_stale_temps, write_atomic
from symbp.cli import main as cli
from symbp.train.callbacks import ProgressBar

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
name = "cli-ux"
inputs = 4
loss = "softmax_cross_entropy"
[[layers]]
units = 5
activation = "tanh"
[[layers]]
units = 3
[train]
data = "data.npz"
epochs = 4
lr = 0.1
"""


@pytest.fixture
def spec(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    np.savez(tmp_path / "data.npz", X=X, y=np.argmax(X[:, :3], axis=1))
    path = tmp_path / "net.toml"
    path.write_text(SPEC)
    return path


def test_an_optimizer_named_on_the_command_line_takes_its_own_lr(spec, tmp_path, capsys):
    run = tmp_path / "adam.npz"
    assert cli(["train", str(spec), "-q", "--optimizer", "adam", "--save", str(run)]) == 0
    assert "lr 0.001 (Adam's default; --lr sets it)" in capsys.readouterr().out
    assert sb.load(run).optimizer.lr == pytest.approx(1e-3)  # not the spec's SGD lr 0.1
    assert cli(["train", str(spec), "-q", "--optimizer", "adam", "--lr", "0.02", "--save", str(run)]) == 0
    assert "lr 0.02 (--lr)" in capsys.readouterr().out
    assert sb.load(run).optimizer.lr == pytest.approx(0.02)
    assert cli(["train", str(spec), "-q", "--optimizer", "adam:lr=0.005", "--save", str(run)]) == 0
    assert sb.load(run).optimizer.lr == pytest.approx(0.005)
    # the spec's own kind keeps the spec's lr
    assert cli(["train", str(spec), "-q", "--optimizer", "sgd:momentum=0.5"]) == 0
    assert "lr 0.1 (the spec's [train] lr)" in capsys.readouterr().out


def test_an_optimizer_typo_names_the_valid_options(spec, capsys):
    assert cli(["train", str(spec), "-q", "--optimizer", "sgd:momentom=0.9"]) == 2
    err = capsys.readouterr().err
    assert "no option 'momentom'; did you mean 'momentum'?" in err
    assert "SGD takes lr, momentum, nesterov, weight_decay" in err and "__init__" not in err


def test_a_learning_rate_that_makes_things_worse_is_reported(spec, capsys):
    assert cli(["train", str(spec), "-q", "--lr", "200"]) == 0
    captured = capsys.readouterr()
    start, end = (float(v) for v in re.search(r"loss ended at ([0-9.e+]+), no lower than where it started "
                                              r"\(([0-9.e+]+)\)", captured.err).groups()[::-1])
    assert end >= start and "the learning rate 200 is probably too large" in captured.err
    assert cli(["train", str(spec), "-q"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_summary_says_what_it_measured(spec, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))  # (empty: this run writes the modules)
    assert cli(["train", str(spec), "-q"]) == 0
    out = capsys.readouterr().out.split("data:")[-1]
    assert [role for _, role in re.findall(r"^  (\S+\.py)  \((.*)\)$", out, re.M)] == [
        "forward pass and loss; new", "backward pass with the SGD update fused in; new"]
    # at once again: the modules written a moment ago (not by this run) come from the cache
    assert cli(["train", str(spec), "-q"]) == 0
    out = capsys.readouterr().out.split("data:")[-1]
    modules = re.findall(r"^  (\S+\.py)  \((.*)\)$", out, re.M)
    assert [role for _, role in modules] == ["forward pass and loss; from the cache",
                                             "backward pass with the SGD update fused in; from the cache"]
    assert all(Path(path).is_file() for path, _ in modules)
    assert "derive" not in out and "load the cached modules" in out
    assert "final val_accuracy" not in out and out.count("held-out score") == 1
    accuracy = float(re.search(r"held-out score: ([0-9.]+) accuracy", out).group(1))
    training = re.search(r"training set: loss [0-9.]+, accuracy ([0-9.]+) \(the last epoch's", out)
    assert training and 0 <= accuracy <= 1


def test_the_kernels_are_compiled_before_the_bar_starts(spec, monkeypatch, capsys):
    """When the bar appears, the training kernel already has its machine code: the first
    epoch's time is an epoch's."""
    seen = []

    class Watching(ProgressBar):
        def __init__(self, epochs, **kwargs):
            modules = [m for m in list(sys.modules.values())  # Adagrad: no other test here trains with it
                       if re.search(r"cli-ux-.*adagrad", str(getattr(m, "__file__", ""))) and hasattr(m, "train_epoch")]
            seen.append([len(m.train_epoch.signatures) for m in modules])
            super().__init__(epochs, file=io.StringIO(), ncols=80)

    monkeypatch.setattr("symbp.train.callbacks.ProgressBar", Watching)
    assert cli(["train", str(spec), "--optimizer", "adagrad"]) == 0
    assert seen and seen[0] and all(n >= 1 for n in seen[0])
    out = capsys.readouterr().out
    assert out.index("compiling the kernels") < out.index("model:")


def test_the_bar_keeps_the_validation_figures_at_80_columns():
    out = io.StringIO()
    bar = ProgressBar(30, file=out, ncols=80)
    for epoch in range(30):
        bar.on_epoch_end(None, epoch, {"loss": 0.123456, "accuracy": 0.98765, "val_loss": 1.2345,
                                       "val_accuracy": 0.97111, "lr": 0.1})
    bar.on_train_end(None)
    last = [line for line in out.getvalue().replace("\r", "\n").splitlines() if line.strip()][-1]
    assert len(last) <= 80 and last.rstrip().endswith("val 1.23 acc 0.971"), last
    assert "30/30" in last


def test_walkthrough_of_a_checkpoint_takes_a_row_of_its_data(spec, tmp_path, capsys):
    run = tmp_path / "run.npz"
    assert cli(["train", str(spec), "-q", "--save", str(run)]) == 0
    capsys.readouterr()
    X = np.load(tmp_path / "data.npz")["X"]
    y = np.load(tmp_path / "data.npz")["y"]
    assert cli(["walkthrough", str(run), "--max-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert f"worked example: row 0 of {tmp_path / 'data.npz'}, target {y[0]}" in out
    assert f"x = [{X[0, 0]:.9g}, {X[0, 1]:.9g}" in out
    assert cli(["walkthrough", str(run), "--row", "7", "--max-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "row 7 of" in out and f"x = [{X[7, 0]:.9g}" in out
    assert cli(["walkthrough", str(run), "--row", "60"]) == 2
    assert "--row 60 is not a row of" in capsys.readouterr().err
    assert cli(["walkthrough", str(run), "--seed", "1", "--max-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "row" not in out.split("Worked example")[0] and f"{X[0, 0]:.9g}" not in out
    # a checkpoint saved from Python records no data: says so, and --data gives the row
    model = sb.load(run)
    model.save(tmp_path / "plain.npz")
    assert cli(["walkthrough", str(tmp_path / "plain.npz"), "--max-rows", "2"]) == 0
    assert "does not record its training data; --data FILE --row N" in capsys.readouterr().out
    assert cli(["walkthrough", str(tmp_path / "plain.npz"), "--data", str(tmp_path / "data.npz"), "--row", "2",
                "--max-rows", "2"]) == 0
    assert f"x = [{X[2, 0]:.9g}" in capsys.readouterr().out


def test_seed_wins_over_the_walkthrough_table(capsys):
    classic = ROOT / "examples" / "classic_2_2_2.toml"
    assert cli(["walkthrough", str(classic)]) == 0
    assert "cost C = 0.298371109" in capsys.readouterr().out
    assert cli(["walkthrough", str(classic), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "note: --seed 3 draws the sample and parameters at random" in out
    assert "0.298371109" not in out and "x = [0.05, 0.1]" not in out
    assert cli(["walkthrough", str(classic), "--seed", "3"]) == 0
    assert capsys.readouterr().out == out  # the seed decides them


def test_scalar_on_a_wide_net_gives_command_line_advice(spec, capsys):
    wide = spec.parent / "wide.toml"
    wide.write_text(SPEC.replace("units = 5", "units = 12"))
    assert cli(["explain", str(wide), "--scalar"]) == 2
    err = capsys.readouterr().err
    assert "leave out --scalar" in err and "scalar=False" not in err


def test_hog_example_without_its_extra_says_what_to_install(tmp_path):
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'skimage':\n"
               "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
               "sys.meta_path.insert(0, Block())\n"
               f"import runpy; runpy.run_path({str(ROOT / 'examples' / 'hog_vs_cnn.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert 'needs scikit-image, from the hog extra: pip install -e ".[hog]"' in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "run.npz"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3600
    leftovers = {
        "dead": tmp_path / f".run.npz.{dead.pid}.k2x9_ab7.tmp",    # a killed writer's, an hour old: removed
        "fresh": tmp_path / f".run.npz.{dead.pid}.q8r2c4zz.tmp",   # written seconds ago: kept for now
        "alive": tmp_path / f".run.npz.{os.getpid()}.aa11bb22.tmp",  # a live writer's: never touched
        "other": tmp_path / ".run.npz.notes",                        # not a temporary name of ours
    }
    for name, path in leftovers.items():
        path.write_bytes(b"partial")
        if name != "fresh":
            os.utime(path, (old, old))
    write_atomic(target, b"whole", "test file")
    assert target.read_bytes() == b"whole"
    assert not leftovers["dead"].exists()
    assert all(leftovers[k].exists() for k in ("fresh", "alive", "other"))
    assert remove_stale_temps(target) == []
    # a checkpoint's save goes through the same writer
    model = sb.compile(sb.Network(inputs=2, layers=[sb.Dense(2)], loss="mse"))
    os.utime(leftovers["fresh"], (old, old))
    model.save(tmp_path / "run")
    assert not leftovers["fresh"].exists() and leftovers["alive"].exists()
    assert sb.load(tmp_path / "run").params["W1"].shape == (2, 2)


def test_the_suite_generates_into_a_temporary_cache():
    from symbp.cache import cache_dir

    cache = Path(os.environ["SYMBP_CACHE_DIR"])
    assert cache_dir() == cache
    assert "symbp-test-cache-" in cache.name and ROOT not in cache.parents
    code = "from symbp.cache import cache_dir; print(cache_dir())"  # a `symbp` subprocess inherits it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == cache
