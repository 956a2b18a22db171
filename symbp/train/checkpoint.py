"""Checkpoints: one ``.npz`` file that runs no code when read.

It holds the parameters and the optimizer's state as arrays, and one more array ``meta``:
UTF-8 JSON with the network spec, dtype, epoch counter, optimizer (kind, hyper-parameters,
step), schedule, history, and a SHA-256 over the JSON and every array.  Writing goes to a
temporary file in the same folder, then ``os.replace``: a crash mid-save leaves the previous
checkpoint as it was.

Reading (:func:`read`, :func:`contents`) trusts nothing in the file.  The metadata is read
first (at most ``MAX_META`` bytes); the network it declares fixes the exact shape of every
parameter and optimizer state, and each array member's ``.npy`` header must declare that
shape and a real floating dtype *before* its data is inflated (so a bomb is refused after a
few hundred bytes); members the spec does not name are refused.  Then the SHA-256, then the
values: parameters and state finite (``fit`` never leaves them otherwise, and ``save``
refuses to write them), the optimizer's state complete with its step a whole number, the
history one entry per epoch for every metric.  Any problem — a truncated, flipped, edited
or forged file — is a ValueError naming the file and the problem; nothing is returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._output import write_atomic
from .._version import __version__
from ..spec.network import Network
from .data import NPZ_ERRORS, NpzError, check_sizes, npy_header, npz_index, read_npy
from .optim import Optimizer, optimizer_from_config
from .schedules import Schedule, schedule_from_config

FORMAT = "symbp-checkpoint-1"
MAX_META = 64 * 2**20  # bytes of JSON metadata: a history of a million epochs fits
DATA_KEYS = ("data", "labels", "target")  # a training-data record (optional): what symbp train read
_FLOAT_DTYPES = ("float16", "float32", "float64")  # what a parameter or state array may be stored as


def _digest(meta: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class CheckpointNotFound(FileNotFoundError, ValueError):
    """No checkpoint at that path: a FileNotFoundError (what Python code expects of a missing
    file), and a ValueError as every other refusal of a checkpoint is."""


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


def _check_spec_reads_back(net, path) -> None:
    """Refuse to write a spec that load() would refuse: a SymPy activation or loss given as an
    expression is stored as text, and text the formula parser cannot read (a Piecewise, a
    function outside its language) would make the file unloadable."""
    from ..spec.network import Network

    try:
        again = Network.from_config(net.to_config())
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot save the checkpoint {path}: the network spec would not read back ({err}); "
                         "write the formula with symbp's functions (max, min, heaviside, abs, …) or as text") from None
    if again.fingerprint() != net.fingerprint():
        raise ValueError(f"cannot save the checkpoint {path}: the network spec reads back as a different network")


def save(model, path, data: dict | None = None) -> Path:
    """Write ``model`` (spec, parameters, optimizer and its state, schedule, epoch, history);
    ``data`` records what it was trained on (``{"data": path or "digits", "labels": …,
    "target": …}``, as ``symbp train`` reads them), for ``symbp walkthrough run.npz``."""
    path = checkpoint_path(path)
    if data is not None and _check_data(data):
        raise ValueError(f"cannot save the checkpoint {path}: {_check_data(data)}")
    # In the model's dtype, finite, each state shaped like its parameter: never a file that
    # read() would refuse.
    arrays = {f"param/{k}": np.ascontiguousarray(v, dtype=model.dtype) for k, v in model.params.items()}
    opt = model.optimizer
    if opt is not None:
        for pname, states in opt.state.items():
            for sname, arr in states.items():
                arrays[f"state/{pname}/{sname}"] = arr = np.ascontiguousarray(arr, dtype=model.dtype)
                shape = arrays.get(f"param/{pname}", arr).shape
                if arr.shape != shape:
                    raise ValueError(f"cannot save the checkpoint {path}: optimizer state {sname!r} of {pname} has "
                                     f"shape {arr.shape}, the parameter {shape} (was the optimizer used by another model?)")
    for key, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise ValueError(f"cannot save the checkpoint {path}: {_describe(key)} holds NaN or inf")
    _check_spec_reads_back(model.network, path)
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
    if data is not None:
        meta["data"] = {key: data.get(key) for key in DATA_KEYS}
    meta["sha256"] = _digest(meta, arrays)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, meta=blob, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the checkpoint {path}: {err.strerror or err}") from None
    return write_atomic(path, buf.getvalue(), "checkpoint")


@dataclass
class Contents:
    """A verified checkpoint: its metadata and arrays, and the objects they describe."""

    meta: dict
    arrays: dict[str, np.ndarray]
    network: Network
    optimizer: Optimizer | None  # with its step and state (arrays of ``arrays``)
    schedule: Schedule | None


class _Refused(ValueError):
    """A complete message about a checkpoint (raised as it is)."""


def _describe(key: str) -> str:
    kind, _, rest = key.partition("/")
    if kind == "param":
        return f"parameter {rest}"
    pname, _, sname = rest.partition("/")
    return f"optimizer state {sname!r} of {pname}"


def _whole(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**63


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_data(data) -> str | None:
    """What is wrong with a training-data record (None: nothing): file names or None."""
    if not isinstance(data, dict) or set(data) - set(DATA_KEYS) or not isinstance(data.get("data"), str):
        return f"its training-data record must be a table of {', '.join(DATA_KEYS)} with a file name as data"
    if not all(data.get(key) is None or isinstance(data[key], str) for key in DATA_KEYS):
        return "its training-data record must hold file or column names"
    return None


def _check_history(hist) -> str | None:
    """What is wrong with a checkpoint's history entry (None: nothing)."""
    if not isinstance(hist, dict) or not isinstance(hist.get("epoch"), list) or not isinstance(hist.get("metrics"), dict):
        return "its history must be a table with a list 'epoch' and a table 'metrics'"
    epochs, metrics = hist["epoch"], hist["metrics"]
    if not all(_whole(e) for e in epochs):
        return "its history's epochs must be whole numbers >= 0"
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        return "its history's epochs must increase"
    for key, values in metrics.items():
        if not isinstance(values, list) or not all(_number(v) for v in values):
            return f"its history's metric {key!r} must be a list of numbers"
        if len(values) != len(epochs):
            return f"its history's metric {key!r} has {len(values)} values for {len(epochs)} epochs"
    return None


def _check_meta(meta: dict) -> tuple[str, Network, Optimizer | None, Schedule | None, dict]:
    """Validate the metadata (before any array is inflated): (problem or "", network,
    optimizer, schedule, {array key: shape})."""
    fail = ("", None, None, None, {})

    def problem(text: str):
        return (text,) + fail[1:]

    missing = [k for k in ("network", "dtype", "epoch", "optimizer", "schedule", "base_lr", "history") if k not in meta]
    if missing:
        return problem(f"it lacks {missing[0]!r}")
    if meta.get("dtype") not in ("float32", "float64"):
        return problem(f"its dtype {meta.get('dtype')!r} is not 'float32' or 'float64'")
    try:
        net = Network.from_config(meta["network"])
    except Exception as err:  # noqa: BLE001 - any failure to rebuild a spec read from a file is damage
        return problem(f"its network spec cannot be rebuilt ({type(err).__name__}: {err})")
    shapes = {f"param/{k}": tuple(v) for k, v in net.param_shapes().items()}
    if not _whole(meta.get("epoch")):
        return problem(f"its epoch counter {meta.get('epoch')!r} is not a whole number >= 0")
    base_lr = meta.get("base_lr")
    if base_lr is not None and not (_number(base_lr) and math.isfinite(base_lr) and base_lr > 0):
        return problem(f"its base learning rate {base_lr!r} is not a number > 0")
    opt = None
    if meta.get("optimizer") is not None:
        cfg = meta["optimizer"]
        if not isinstance(cfg, dict) or not _whole(cfg.get("step")):
            return problem("its optimizer entry must be a table with a whole number 'step' >= 0")
        try:
            opt = optimizer_from_config({k: v for k, v in cfg.items() if k != "step"})
        except Exception as err:  # noqa: BLE001
            return problem(f"its optimizer cannot be rebuilt ({type(err).__name__}: {err})")
        opt.step = cfg["step"]
        for pname in net.param_shapes():
            for sname in opt.state_names:
                shapes[f"state/{pname}/{sname}"] = shapes[f"param/{pname}"]
    schedule = None
    if meta.get("schedule") is not None:
        cfg = meta["schedule"]
        try:
            schedule = schedule_from_config(cfg)
        except Exception as err:  # noqa: BLE001
            return problem(f"its schedule cannot be rebuilt ({type(err).__name__}: {err})")
        for key, ok in (("scale", lambda v: _number(v) and math.isfinite(v) and v > 0),
                        ("best", lambda v: v is None or _number(v)),
                        ("bad_epochs", _whole), ("cooldown_left", _whole)):
            if key in cfg and not ok(cfg[key]):
                return problem(f"its schedule's {key} {cfg[key]!r} is not valid")
    bad = _check_history(meta.get("history")) or (meta.get("data") is not None and _check_data(meta["data"]))
    if bad:
        return problem(bad)
    return "", net, opt, schedule, shapes


def contents(path) -> Contents:
    """Read and verify a checkpoint (see the module's docstring); ValueError if it is damaged."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file() and path.suffix != ".npz" and path.with_name(path.name + ".npz").is_file():
        path = path.with_name(path.name + ".npz")  # what save(path) wrote
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    damaged = f"checkpoint {path} is damaged or not a symbp checkpoint"
    try:
        with zipfile.ZipFile(path) as zf:
            index = npz_index(zf)
            if "meta" not in index:
                raise _Refused(f"checkpoint {path} is not a symbp checkpoint (no metadata)")
            member = npy_header(zf, index.pop("meta"))
            if member.dtype != np.uint8 or len(member.shape) != 1 or member.nbytes > MAX_META:
                raise NpzError(f"its metadata is not a byte string of at most {MAX_META} bytes: {member.describe()}")
            blob = read_npy(zf, member)
            try:
                meta = json.loads(blob.tobytes().decode())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                raise _Refused(f"checkpoint {path} has damaged metadata: {err}") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _Refused(f"checkpoint {path} is not in the {FORMAT} format")
            expected = meta.pop("sha256", None)
            problem, net, opt, schedule, shapes = _check_meta(meta)
            if problem:
                raise _Refused(f"checkpoint {path} is damaged or forged: {problem}")
            members = {}
            for key, info in index.items():
                if key not in shapes:
                    raise _Refused(f"checkpoint {path} is damaged or forged: it holds a member {info.filename!r} "
                                   f"that its network and optimizer do not have")
                m = members[key] = npy_header(zf, info)
                if m.dtype.kind != "f" or m.dtype.name not in _FLOAT_DTYPES or m.shape != shapes[key]:
                    raise _Refused(f"checkpoint {path} is damaged or forged: {_describe(key)} must be a real floating "
                                   f"array of shape {shapes[key]}, the file declares {m.describe()}")
            missing = [k for k in shapes if k.startswith("param/") and k not in members]
            states = [k for k in shapes if k.startswith("state/")]
            if not missing and any(k in members for k in states):
                missing = [k for k in states if k not in members]
            if missing:
                raise _Refused(f"checkpoint {path} is damaged or forged: it lacks {_describe(missing[0])}")
            check_sizes(members.values())
            arrays = {key: read_npy(zf, m) for key, m in members.items()}
    except _Refused:
        raise
    except NpzError as err:
        raise ValueError(f"{damaged}: {err}") from None
    except NPZ_ERRORS as err:
        raise ValueError(f"{damaged} (cannot read it: {type(err).__name__}: {err})") from None
    if expected != _digest(meta, arrays):
        raise ValueError(f"checkpoint {path} failed its integrity check: its content was changed or damaged")
    for key, arr in arrays.items():
        if not np.isfinite(arr).all():
            raise ValueError(f"checkpoint {path} is damaged or forged: {_describe(key)} holds NaN or inf")
    if opt is not None:
        for key, arr in arrays.items():
            if key.startswith("state/"):
                _, pname, sname = key.split("/", 2)
                opt.state.setdefault(pname, {})[sname] = arr
    return Contents(meta, arrays, net, opt, schedule)


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """The verified metadata and arrays of a checkpoint; ValueError if it is damaged."""
    found = contents(path)
    return found.meta, found.arrays
