"""A small CNN on the bundled 8x8 digits: Conv2D(16, 3×3, padding 1) + relu, 2×2 max pool,
Dense(10).  Held-out accuracy on a 75/25 stratified split (random_state=0).

    python examples/digits_cnn.py
"""

import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import symbp as sb
from symbp.cli import load_spec, make_optimizer


def main() -> float:
    start = time.perf_counter()
    cfg = load_spec(Path(__file__).with_name("digits_cnn.toml"))
    net = sb.Network.from_config(cfg)
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).reshape(-1, *net.input_shape)  # (N, 1, 8, 8)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    model = sb.compile(net, dtype="float32", seed=0)
    train = cfg["train"]
    optimizer = make_optimizer(train["optimizer"], {"lr": train["lr"], **train["optimizer_params"]})
    model.fit(Xtr, ytr, optimizer=optimizer, batch_size=train["batch_size"],
              epochs=train["epochs"], seed=0, progress=False)
    acc = model.score(Xte, yte)
    print(f"{net!r}")
    print(f"held-out accuracy: {acc:.4f} ({len(yte)} samples), {time.perf_counter() - start:.1f} s "
          f"(derive, generate, JIT, train)")
    return acc


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
