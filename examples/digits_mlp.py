"""Train a 64-64-10 MLP on scikit-learn's bundled digits with symbp.

    python examples/digits_mlp.py

Prints the derived formulas, trains for 30 epochs and reports held-out accuracy.
"""

import time

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import symbp as sb


def main(epochs: int = 30, verbose: bool = True) -> float:
    start = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)

    net = sb.Network(inputs=64, layers=[sb.Dense(64, activation="tanh"), sb.Dense(10)],
                     loss="softmax_cross_entropy", l2=1e-4, name="digits-mlp")
    if verbose:
        print(sb.derive(net).explain(), end="\n\n")
    model = sb.compile(net, target="cpu", dtype="float32", seed=0)
    model.fit(X_train, y_train, optimizer=sb.SGD(lr=0.1), batch_size=32, epochs=epochs,
              validation_data=(X_test, y_test), shuffle=True, seed=0, progress=verbose)
    accuracy = model.score(X_test, y_test)
    if verbose:
        print(f"generated kernels: {model.source_path}")
        print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} digits, {time.perf_counter() - start:.1f} s in all")
    return accuracy


if __name__ == "__main__":
    main()
