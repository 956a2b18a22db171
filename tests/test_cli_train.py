"""The training-side command line: train with an optimizer, curves, checkpoints; paths."""

import os

import numpy as np
import pytest

import symbp as sb
from symbp.cli import main as cli
from symbp.cli import parse_optimizer

SPEC = """
name = "cli-net"
inputs = 64
loss = "softmax_cross_entropy"
[[layers]]
units = 8
activation = "relu"
[[layers]]
units = 10
[train]
epochs = 2
lr = 0.05
"""


def test_parse_optimizer():
    assert parse_optimizer("adam:lr=0.05,amsgrad=true") == ("adam", {"lr": 0.05, "amsgrad": True})
    assert parse_optimizer("sgd") == ("sgd", {})
    with pytest.raises(ValueError, match="must be a number"):
        parse_optimizer("sgd:momentum=lots")
    with pytest.raises(ValueError, match="amsgrad must be true or false, got '2'"):
        parse_optimizer("adam:amsgrad=2")


def test_train_refuses_bad_output_paths_before_training(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    monkeypatch.setattr("symbp.cli.load_data", lambda *a: pytest.fail("training started"))
    assert cli(["train", str(spec), "-q", "--plot", str(tmp_path / "missing" / "c.png")]) == 2
    assert "the directory" in capsys.readouterr().err
    assert cli(["train", str(spec), "-q", "--plot", str(tmp_path / "c.txt")]) == 2
    assert "must end in .png, .svg, .pdf" in capsys.readouterr().err
    assert cli(["train", str(spec), "-q", "--save", str(tmp_path)]) == 2
    assert "is a directory: give a file name" in capsys.readouterr().err


def test_train_with_optimizer_plot_and_checkpoint(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    code = cli(["train", str(spec), "-q", "--optimizer", "sgd:momentum=0.9", "--plot", str(tmp_path / "c.png"),
                "--save", str(tmp_path / "ck.npz")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "held-out score" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.png").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    model = sb.load(tmp_path / "ck.npz")
    assert isinstance(model.optimizer, sb.SGD) and model.optimizer.hyper["momentum"] == 0.9
    assert model.epoch == 2 and len(model.history["loss"]) == 2
    # The checkpoint stands in for a spec: explain shows its own update rule, the worked
    # example runs on its trained parameters.
    assert cli(["explain", str(tmp_path / "ck.npz")]) == 0
    out = capsys.readouterr().out
    assert "Update rule: SGD(lr=0.05, momentum=0.9)" in out and "momentum_buffer ←" in out
    assert cli(["walkthrough", str(tmp_path / "ck.npz"), "--max-rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "all agree" in out
    w1 = model.params["W1"].astype(np.float64)
    assert f"{w1[0, 0]:.9g}" in out  # the trained weight, not a fresh initialisation


def test_commands_name_what_is_wrong_with_their_input(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    binary = tmp_path / "data.toml"
    binary.write_bytes(b"PK\x03\x04\xf9\xff binary")
    assert cli(["explain", str(binary)]) == 2
    assert "is not a TOML text file" in capsys.readouterr().err
    assert cli(["explain", str(tmp_path / "broken.npz")]) == 2
    assert "broken.npz" in capsys.readouterr().err
    assert cli(["explain", str(spec), "--standalone"]) == 2
    assert "use it with --format latex" in capsys.readouterr().err

    def no_matplotlib(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr("symbp.cli._paths", no_matplotlib)
    assert cli(["paths", "beale"]) == 2
    assert "pip install 'symbp[plots]'" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """``symbp explain SPEC | head -1``: the reader leaves before symbp writes."""
    import subprocess
    import sys

    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    proc = subprocess.Popen([sys.executable, "-m", "symbp", "explain", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the child has derived anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_train_refuses_unknown_optimizer(tmp_path, capsys):
    spec = tmp_path / "net.toml"
    spec.write_text(SPEC)
    assert cli(["train", str(spec), "-q", "--optimizer", "lion"]) == 2
    assert "unknown optimizer 'lion'" in capsys.readouterr().err


def test_paths_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    code = cli(["paths", "(x - 1)**2 + y**2", "--optimizer", "sgd:lr=0.1", "--optimizer", "adam:lr=0.1",
                "--start", "0", "1", "--steps", "30", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    # Gradient descent on this bowl converges towards (1, 0).
    sgd_line = next(line for line in text.splitlines() if line.startswith("SGD"))
    x_end = float(sgd_line.split("ends at (")[1].split(",")[0])
    assert np.isclose(x_end, 1.0, atol=1e-2)


def test_paths_refuses_unsafe_surface(tmp_path, capsys):
    assert cli(["paths", "__import__('os').getcwd()", "-o", str(tmp_path / "p.png")]) == 2
    assert "unsupported syntax" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
