"""Checkpoints: one ``.npz`` file that runs no code when read.

It holds the parameters and the optimizer's state as arrays, and one more array ``meta``:
UTF-8 JSON with the network spec, dtype, epoch counter, optimizer (kind, hyper-parameters,
step), schedule, history, and a SHA-256 over the JSON and every array.  Reading uses
``allow_pickle=False``; a truncated, edited or otherwise damaged file is refused with a
message saying so.  Writing goes to a temporary file in the same folder, then
``os.replace``: a crash mid-save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ._output import write_atomic
from ._version import __version__

FORMAT = "symbp-checkpoint-1"


def _digest(meta: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def checkpoint_path(path) -> Path:
    """Where a checkpoint for ``path`` goes (``.npz`` added when missing); a directory is
    refused, as np.savez would write "<dir>.npz" beside it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint path {path} is a directory: give a file name, e.g. {path / 'model.npz'}")
    # The nearest folder that exists must be one we can write in (save creates the rest):
    # found here, before any training, not after the first epoch.
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write the checkpoint {path}: {folder} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the checkpoint {path}: no permission to write in {folder}")
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save(model, path) -> Path:
    """Write ``model`` (spec, parameters, optimizer and its state, schedule, epoch, history)."""
    path = checkpoint_path(path)
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    opt = model.optimizer
    if opt is not None:
        for pname, states in opt.state.items():
            for sname, arr in states.items():
                arrays[f"state/{pname}/{sname}"] = arr
    meta = {
        "format": FORMAT,
        "symbp": __version__,
        "network": model.network.to_config(),
        "dtype": model.dtype.name,
        "epoch": model.epoch,
        "optimizer": None if opt is None else {**opt.to_config(), "step": opt.step},
        "schedule": None if model.schedule is None else model.schedule.to_config(),
        "base_lr": model.base_lr,
        "history": {"epoch": model.history.epoch, "metrics": model.history.history},
    }
    meta["sha256"] = _digest(meta, arrays)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, meta=blob, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the checkpoint {path}: {err.strerror or err}") from None
    return write_atomic(path, buf.getvalue(), "checkpoint")


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """The verified metadata and arrays of a checkpoint; ValueError if it is damaged."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise ValueError(f"checkpoint {path} is damaged or not a symbp checkpoint (cannot read it: {err})") from None
    if "meta" not in arrays:
        raise ValueError(f"checkpoint {path} is not a symbp checkpoint (no metadata)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path} has damaged metadata: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not in the {FORMAT} format")
    expected = meta.pop("sha256", None)
    if expected != _digest(meta, arrays):
        raise ValueError(f"checkpoint {path} failed its integrity check: its content was changed or damaged")
    return meta, arrays
