"""A user's data file in, ``(X, y)`` out: what ``symbp train | predict | evaluate`` read.

=============  =====================================================================================
``digits``     scikit-learn's bundled 8×8 digits (no download), scaled to [0, 1]
``.npz``       arrays ``X`` (samples × features) and ``y`` (``y`` may be absent for ``predict``)
``.npy``       ``X`` alone; its targets come from a second ``.npy`` (``--labels y.npy``)
``.csv``       a header row, then one sample per line, every cell a number; the target is the
``.tsv``       column ``--target NAME`` (default: the last one), the features the others in order
=============  =====================================================================================

Binary files are read by :mod:`symbp.train.data`'s readers (no pickles; sizes checked before
anything is allocated).  A CSV problem — a missing value, a cell that is not a number, a row
with more or fewer cells than the header — is a ValueError naming the file, the line and the
column.  No pandas: the ``csv`` module reads the text, an ``array('d')`` keeps the numbers.
"""

from __future__ import annotations

import csv
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import load_npy, load_npz, npz_names

SUFFIXES = (".npz", ".npy", ".csv", ".tsv")
MISSING = {"", "na", "n/a", "nan", "null", "none", "?", "-"}  # what spreadsheets write for "no value"


@dataclass
class Dataset:
    """Features ``X`` (N, features), targets ``y`` (N,) or (N, k) or None, and where they came from."""

    X: np.ndarray
    y: np.ndarray | None
    source: str  # for messages: "data.csv (target column 'label')"


def _exists(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")


def load_digits_data() -> Dataset:
    """scikit-learn's 8×8 digits (1797 × 64), pixels scaled to [0, 1], labels 0–9."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return Dataset(X / 16.0, y, "digits (scikit-learn's 8×8 digits)")


def read_data(path, labels=None, target: str | None = None, inputs: int | None = None,
              need_targets: bool = True) -> Dataset:
    """Read ``path`` (see the module's docstring); ``labels`` is the targets' ``.npy`` for an
    ``.npy`` of X.  ``inputs`` (the network's input width) lets ``predict`` tell a CSV of
    features alone from one with a target column; ``need_targets`` refuses a file without targets.
    """
    if str(path) == "digits":
        if labels is not None or target is not None:
            raise ValueError("the digits data set has its own labels: --labels and --target are for your files")
        return load_digits_data()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot read data file {path}: symbp reads 'digits', .npz (X and y), .npy (X, with "
                         f"--labels y.npy), .csv or .tsv (with a header row); got {suffix or 'no suffix'!r}")
    _exists(path, "data file")
    if labels is not None and suffix != ".npy":
        raise ValueError(f"--labels (the targets' .npy) goes with an .npy of X; {path.name} holds its own targets")
    if target is not None and suffix not in (".csv", ".tsv"):
        raise ValueError(f"--target names a column of a .csv or .tsv; {path.name} has arrays, not columns")
    if suffix == ".npz":
        data = _read_npz(path, need_targets)
    elif suffix == ".npy":
        data = _read_npy(path, labels, need_targets)
    else:
        data = read_table(path, target, inputs, need_targets)
    if data.y is not None and len(data.y) != len(data.X):
        raise ValueError(f"{data.source}: X has {len(data.X)} samples but y has {len(data.y)}")
    return data


def _read_npz(path: Path, need_targets: bool) -> Dataset:
    names = npz_names(path)
    wanted = ("X", "y") if need_targets or "y" in names else ("X",)
    missing = [k for k in wanted if k not in names]
    if missing:
        raise ValueError(f"cannot read data file {path}: it has no array {missing[0]!r} (it holds: "
                         f"{', '.join(names) or 'nothing'}); symbp reads X (samples × features) and y (targets), "
                         f"as np.savez(path, X=X, y=y) writes them")
    arrays = load_npz(path, wanted)
    return Dataset(arrays[0], arrays[1] if len(arrays) > 1 else None, str(path))


def _read_npy(path: Path, labels, need_targets: bool) -> Dataset:
    X = load_npy(path)
    if labels is None:
        if need_targets:
            raise ValueError(f"{path} holds X only: give its targets as a second .npy, --labels y.npy "
                             f"(in a spec: labels = \"y.npy\" in [train])")
        return Dataset(X, None, str(path))
    labels = Path(labels)
    if labels.suffix.lower() != ".npy":
        raise ValueError(f"--labels must be an .npy file of targets, got {str(labels)!r}")
    _exists(labels, "labels file")
    return Dataset(X, load_npy(labels, "labels file"), f"{path} with labels {labels}")


def _cell(text: str, path: Path, line: int, column: str) -> float:
    """One CSV cell as a finite number; the error names the line and the column."""
    word = text.strip()
    if word.lower() in MISSING:
        shown = "an empty cell" if not word else repr(word)
        raise ValueError(f"{path}, line {line}, column {column!r}: missing value ({shown}); fill it in or "
                         f"drop the row")
    try:
        value = float(word)
    except ValueError:
        raise ValueError(f"{path}, line {line}, column {column!r}: {word!r} is not a number (every cell must be "
                         f"one; class labels as 0, 1, 2, …)") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}, line {line}, column {column!r}: {word!r} is not a finite number")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_table(path, target: str | None = None, inputs: int | None = None, need_targets: bool = True) -> Dataset:
    """A ``.csv`` (comma) or ``.tsv`` (tab) with a header row: the column ``target`` (default:
    the last) is y, the others are X in header order.  With ``inputs`` and no ``target``, a
    file of exactly ``inputs`` columns is X alone (y None), for ``predict``."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    values = array("d")
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next((row for row in reader if row), None)
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: {err}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 text file") from None
        if header is None:
            raise ValueError(f"{path} is empty: it needs a header row and one row per sample")
        names = [name.strip() for name in header]
        if all(_is_number(name) for name in names):
            raise ValueError(f"{path}, line {reader.line_num}: the first row holds numbers, not column names; "
                             f"symbp needs a header row naming the columns (e.g. x1,x2,…,label)")
        if len(names) < 2 and (inputs is None or inputs != 1):
            raise ValueError(f"{path}: the header has {len(names)} column; a sample needs features and a target "
                             f"(is the file {'tab' if delimiter == ',' else 'comma'}-separated? "
                             f"symbp reads .csv with commas, .tsv with tabs)")
        rows = 0
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                if len(row) != len(names):
                    raise ValueError(f"{path}, line {reader.line_num}: {len(row)} cells, the header has {len(names)}")
                values.extend(_cell(text, path, reader.line_num, names[j]) for j, text in enumerate(row))
                rows += 1
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: {err}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a UTF-8 text file (after line {reader.line_num})") from None
    if rows == 0:
        raise ValueError(f"{path} has a header but no samples")
    table = np.frombuffer(values, dtype=np.float64).reshape(rows, len(names))
    if target is None and inputs is not None and len(names) == inputs and not need_targets:
        return Dataset(table.copy(), None, f"{path} (features only)")
    if target is None:
        column = len(names) - 1
    elif target in names:
        if names.count(target) > 1:
            raise ValueError(f"{path}: the header names {target!r} {names.count(target)} times")
        column = names.index(target)
    else:
        raise ValueError(f"{path} has no column {target!r} (its columns: {', '.join(names)})")
    X = np.delete(table, column, axis=1)
    y = table[:, column]
    if np.all(y == np.round(y)):
        y = y.astype(np.int64)  # class labels (a regression target of whole numbers is read the same)
    return Dataset(np.ascontiguousarray(X), y, f"{path} (target column {names[column]!r})")
