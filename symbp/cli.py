"""Command line: ``symbp train SPEC.toml`` and ``symbp explain SPEC.toml``.

The TOML spec mirrors the Python API (see README): top-level ``inputs``, ``loss``, ``l2``,
``name``; ``[[layers]]`` tables with ``type``, ``units``, ``activation`` and optionally
``activation_params``; an optional ``[train]`` table with ``data``, ``epochs``,
``batch_size``, ``lr``, ``seed``, ``dtype``, ``test_size``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TRAIN_DEFAULTS = {"data": "digits", "epochs": 20, "batch_size": 32, "lr": 0.1, "seed": 0,
                  "dtype": "float32", "test_size": 0.25}


def load_spec(path: str | Path) -> dict:
    """Read a TOML spec; errors name the file and the problem."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            cfg = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"spec file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"spec file {path} is not valid TOML: {err}") from None
    train = cfg.get("train", {})
    if not isinstance(train, dict):
        raise ValueError(f"{path}: [train] must be a table")
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} in [train] (known: {', '.join(TRAIN_DEFAULTS)})")
    return cfg


def load_data(name: str, seed: int, test_size: float):
    """A named data set split into train and held-out parts.

    ``digits`` is scikit-learn's bundled 8×8 digits (no download), scaled to [0, 1]; a path
    to an ``.npz`` with arrays ``X`` and ``y`` is read with ``allow_pickle=False``.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    elif str(name).endswith(".npz"):
        try:
            with np.load(name, allow_pickle=False) as f:
                X, y = f["X"], f["y"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"cannot read data file {name}: {err}") from None
    else:
        raise ValueError(f"unknown data set {name!r}: use 'digits' or a path to an .npz with X and y")
    stratify = y if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) else None
    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=stratify)


def _train(args) -> int:
    import symbp as sb

    cfg = load_spec(args.spec)
    opts = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    for key in ("epochs", "batch_size", "lr", "seed", "dtype"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    start = time.perf_counter()
    net = sb.Network.from_config(cfg)
    Xtr, Xte, ytr, yte = load_data(opts["data"], opts["seed"], opts["test_size"])
    model = sb.compile(net, dtype=opts["dtype"], seed=opts["seed"])
    history = model.fit(Xtr, ytr, optimizer=sb.SGD(lr=opts["lr"]), batch_size=opts["batch_size"],
                        epochs=opts["epochs"], validation_data=(Xte, yte), seed=opts["seed"], progress=not args.quiet)
    elapsed = time.perf_counter() - start
    print(f"model: {net!r}")
    print(f"kernels: {model.source_path}")
    for key, values in history.history.items():
        print(f"final {key}: {values[-1]:.4f}")
    print(f"held-out score: {model.score(Xte, yte):.4f}  ({len(yte)} samples)")
    print(f"time: {elapsed:.1f} s (derive, generate, JIT and {opts['epochs']} epochs)")
    return 0


def _explain(args) -> int:
    import symbp as sb

    net = sb.Network.from_config(load_spec(args.spec))
    print(sb.derive(net).explain())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="symbp", description="Backpropagation derived by SymPy, run as Numba kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the network a TOML spec declares")
    train.add_argument("spec", help="path to the TOML spec")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--dtype", choices=["float32", "float64"])
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    explain = sub.add_parser("explain", help="print the derived formulas for a TOML spec")
    explain.add_argument("spec")
    explain.set_defaults(func=_explain)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"symbp: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
