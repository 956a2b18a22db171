"""The bundled examples do what the README says: train on the digits to the stated accuracy."""

import re
from pathlib import Path

import pytest

from symbp.cli import main as cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("spec, floor", [("digits_mlp.toml", 0.96), ("digits_cnn.toml", 0.98), ("digits_resnet.toml", 0.975)])
def test_example_spec_trains_to_its_accuracy(spec, floor, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path))
    assert cli(["train", str(EXAMPLES / spec), "-q"]) == 0
    out = capsys.readouterr().out
    score = float(re.search(r"held-out score: ([0-9.]+)", out).group(1))
    assert score >= floor, out
