"""Fuzzing the readers of checkpoints and data ``.npz`` files (issue 12, items 11 and 12).

The contract under test: ``sb.load(path)`` either raises ValueError naming the file (the
project's error) or returns a model identical to the one saved (a flip in bytes nothing
reads, such as a zip timestamp) — never another exception, never gigabytes of memory.

* flips: every byte of the zip structure (local headers, central directory, end records)
  and of every ``.npy`` header, plus a seeded sample of data bytes, each XORed with a
  seeded non-zero mask; the compression-method and encryption fields set to each value
  zipfile treats specially (these raised NotImplementedError / RuntimeError before);
* truncations at a spread of lengths and at every length near the end records;
* forged fields with a recomputed digest, so only the content checks can catch them.
  Decisions documented here: parameters and optimizer state must be finite (fit never
  leaves NaN/inf, save refuses them), real floating arrays (float16/32/64, converted to
  the checkpoint's dtype; integer, bool and complex refused) of exactly the declared shape;
  Fortran order is fine; the step and epoch are whole numbers >= 0 (bool refused);
* bombs, built in a few milliseconds from one compressed MiB repeated (each piece ends on a
  full flush, so pieces concatenate; the CRC is left 0: a reader that inflates before
  checking has already paid by the time it sees the CRC), measured by peak RSS in a
  subprocess (``resource.getrusage``);
* ``load_npz`` (the data reader ``symbp train`` uses) agrees with ``np.load`` on honest
  files of every layout.

Every case runs in a few milliseconds: the model is compiled once (the session's
``compiled`` fixture) and ``sb.load`` reuses its generated modules.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import symbp as sb
from symbp.train import checkpoint, data

NET = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], name="ckpt-fuzz")
ROOT = Path(__file__).resolve().parent.parent


# -- the saved model and its comparison ---------------------------------------------------------
@pytest.fixture(scope="module")
def saved(compiled, session_cache_dir, tmp_path_factory):
    """A tiny classifier trained with Adam and a plateau schedule, two epochs with validation
    data and two without (so its history holds NaN), saved once: (folder, path, bytes,
    the model as loaded back)."""
    model = compiled(NET, "float64", seed=3)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 3)), rng.integers(0, 2, 12)
    opt = sb.Adam(lr=0.05)
    model.fit(X, y, optimizer=opt, schedule=sb.ReduceLROnPlateau(monitor="loss", patience=1), batch_size=5,
              epochs=2, validation_data=(X, y), progress=False)
    model.fit(X, y, epochs=4, initial_epoch=2, batch_size=5, progress=False)
    folder = tmp_path_factory.mktemp("ckpt-fuzz")
    path = model.save(folder / "model.npz")
    reference = sb.load(path, cache_dir=session_cache_dir)
    assert_same(reference, model)
    return folder, path, path.read_bytes(), reference


def assert_same(a, b) -> None:
    """Everything a checkpoint holds, compared exactly (NaN equal to NaN)."""
    assert a.network.fingerprint() == b.network.fingerprint() and a.dtype == b.dtype
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert type(a.optimizer) is type(b.optimizer) and a.optimizer.to_config() == b.optimizer.to_config()
    assert a.optimizer.step == b.optimizer.step
    assert a.optimizer.state.keys() == b.optimizer.state.keys()
    for p, states in a.optimizer.state.items():
        assert states.keys() == b.optimizer.state[p].keys()
        for s, arr in states.items():
            np.testing.assert_array_equal(arr, b.optimizer.state[p][s])
    assert a.schedule.to_config() == b.schedule.to_config()
    assert (a.schedule.scale, a.schedule.best, a.schedule.bad_epochs) == (b.schedule.scale, b.schedule.best,
                                                                         b.schedule.bad_epochs)
    assert a.base_lr == b.base_lr and a.epoch == b.epoch
    assert a.history.epoch == b.history.epoch and a.history.history.keys() == b.history.history.keys()
    for k, v in a.history.history.items():
        np.testing.assert_array_equal(v, b.history[k])


def load_outcome(path: Path, cache_dir: Path, reference) -> str:
    """'refused' or 'identical'; any other outcome is raised as an AssertionError."""
    try:
        model = sb.load(path, cache_dir=cache_dir)
    except ValueError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        return "refused"
    except Exception as err:  # noqa: BLE001 - exactly what the fuzz looks for
        raise AssertionError(f"{type(err).__name__}: {err}") from None
    assert_same(model, reference)
    return "identical"


# -- the layout of a zip, for aiming flips --------------------------------------------------------
def structure_offsets(raw: bytes) -> list[int]:
    """Every byte of the local headers, the .npy headers, the central directory and the end
    records of the zip ``raw``."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    out: set[int] = set(range(zf.start_dir, len(raw)))  # central directory and end records
    for info in zf.infolist():
        start = info.header_offset
        name_len, extra_len = struct.unpack("<2H", raw[start + 26:start + 30])
        body = start + 30 + name_len + extra_len
        header = data.npy_header(zf, info).header
        out.update(range(start, body + header))
    return sorted(out)


def test_history_is_aligned_and_survives_the_round_trip(saved, session_cache_dir):
    folder, path, _, reference = saved
    h = reference.history
    assert h.epoch == [0, 1, 2, 3]
    assert all(len(v) == 4 for v in h.history.values()), {k: len(v) for k, v in h.history.items()}
    assert all(math.isnan(v) for v in h["val_loss"][2:]) and not any(math.isnan(v) for v in h["val_loss"][:2])
    # pandas/Keras readers line the lists up by position
    rows = list(zip(h.epoch, *h.history.values()))
    assert len(rows) == 4
    # Resuming inside the recorded epochs (truncate) and then with validation data again.
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(12, 3)), rng.integers(0, 2, 12)
    model = sb.load(path, cache_dir=session_cache_dir)
    model.fit(X, y, epochs=4, initial_epoch=3, batch_size=5, validation_data=(X, y), progress=False)
    assert model.history.epoch == [0, 1, 2, 3]
    assert math.isnan(model.history["val_loss"][2]) and not math.isnan(model.history["val_loss"][3])
    model.fit(X, y, epochs=3, initial_epoch=1, batch_size=5, progress=False)  # no validation: NaN again
    assert model.history.epoch == [0, 1, 2] and all(len(v) == 3 for v in model.history.history.values())
    assert math.isnan(model.history["val_loss"][1]) and not math.isnan(model.history["val_loss"][0])
    again = sb.load(model.save(folder / "resumed.npz"), cache_dir=session_cache_dir)
    assert again.history.epoch == [0, 1, 2]
    np.testing.assert_array_equal(again.history["val_loss"], model.history["val_loss"])


def test_flipped_bytes_are_refused_or_load_the_same_model(saved, session_cache_dir):
    folder, _, raw, reference = saved
    rng = np.random.default_rng(2024)
    aimed = structure_offsets(raw)
    rest = sorted(set(range(len(raw))) - set(aimed))
    offsets = aimed + sorted(rng.choice(rest, size=min(150, len(rest)), replace=False).tolist())
    masks = rng.integers(1, 256, size=len(offsets))
    target = folder / "flipped.npz"
    counts, failures = {"refused": 0, "identical": 0}, []
    for off, mask in zip(offsets, masks):
        bad = bytearray(raw)
        bad[off] ^= int(mask)
        target.write_bytes(bad)
        try:
            counts[load_outcome(target, session_cache_dir, reference)] += 1
        except AssertionError as err:
            failures.append(f"byte {off} ^ {int(mask):#04x}: {err}")
    print(f"{len(offsets)} flips ({len(aimed)} aimed at the zip and .npy structure): {counts}")
    assert not failures, f"{len(failures)} of {len(offsets)} flips: " + "; ".join(failures[:5])
    assert len(offsets) >= 1000 and counts["refused"] > len(offsets) // 2, counts


@pytest.mark.parametrize("field", ["central", "local"])
def test_compression_method_and_encryption_bits_are_damage(saved, session_cache_dir, field):
    """Every value zipfile handles differently; NotImplementedError (method 1, 99, ...) and
    RuntimeError (the encryption bit) escaped before."""
    folder, _, raw, reference = saved
    zf = zipfile.ZipFile(io.BytesIO(raw))
    info = zf.infolist()[1]  # param/W1
    if field == "central":
        at = [i for i in range(zf.start_dir, len(raw) - 46) if raw[i:i + 4] == b"PK\x01\x02"][1]
        flags, method = at + 8, at + 10
    else:
        flags, method = info.header_offset + 6, info.header_offset + 8
    target = folder / f"method-{field}.npz"
    outcomes = []
    for value in (1, 6, 8, 9, 12, 14, 93, 95, 97, 98, 99, 0xFFFF):
        bad = bytearray(raw)
        bad[method:method + 2] = struct.pack("<H", value)
        target.write_bytes(bad)
        outcomes.append(load_outcome(target, session_cache_dir, reference))
    for bit in (0x1, 0x40, 0x2000):  # encrypted, strong encryption, masked header
        bad = bytearray(raw)
        bad[flags:flags + 2] = struct.pack("<H", struct.unpack("<H", raw[flags:flags + 2])[0] | bit)
        target.write_bytes(bad)
        outcomes.append(load_outcome(target, session_cache_dir, reference))
    if field == "central":  # zipfile goes by the central directory: a stored member read as compressed fails
        assert outcomes[:12] == ["refused"] * 12, outcomes


def test_truncated_and_extended_files(saved, session_cache_dir):
    folder, _, raw, reference = saved
    target = folder / "cut.npz"
    lengths = sorted(set(range(0, len(raw), 61)) | set(range(len(raw) - 120, len(raw))))
    for n in lengths:
        target.write_bytes(raw[:n])
        assert load_outcome(target, session_cache_dir, reference) == "refused", n
    for tail in (b"\0", b"PK\x05\x06", bytes(100), raw[-22:]):  # bytes after the end record
        target.write_bytes(raw + tail)
        load_outcome(target, session_cache_dir, reference)


# -- forged fields: the digest is recomputed, only the content checks can refuse -------------------
def members(raw: bytes) -> tuple[dict, dict]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    meta.pop("sha256")
    return meta, arrays


def forge(path: Path, meta, arrays: dict, extra: dict | None = None) -> None:
    blob = dict(meta, sha256=checkpoint._digest(meta, arrays)) if isinstance(meta, dict) else meta
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(blob).encode(), dtype=np.uint8), **arrays)
    if extra:
        with zipfile.ZipFile(buf, "a") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: that is the point
            for name, content in extra.items():
                zf.writestr(name, content)
    path.write_bytes(buf.getvalue())


def _set(key, value):
    return lambda m, a: a.__setitem__(key, value(a[key]))


def _meta(*keys, value):
    def edit(m, a):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return edit


FORGED = {  # name: (edit(meta, arrays), words the error must contain)
    "complex W1": (_set("param/W1", lambda w: w * (1 + 1j)), "real floating"),
    "complex state": (_set("state/W1/exp_avg", lambda w: w.astype(complex)), "real floating"),
    "integer b1": (_set("param/b1", lambda w: np.arange(w.size)), "real floating"),
    "bool b2": (_set("param/b2", lambda w: w > 0), "real floating"),
    "float128 W2": (_set("param/W2", lambda w: w.astype(np.longdouble)), "real floating"),
    "W1 transposed": (_set("param/W1", lambda w: w.T.copy()), "shape"),
    "W1 flattened": (_set("param/W1", lambda w: w.reshape(-1)), "shape"),
    "state of the wrong shape": (_set("state/W2/exp_avg_sq", lambda w: np.zeros((2, 2))), "shape"),
    "a missing parameter": (lambda m, a: a.pop("param/b1"), "lacks parameter b1"),
    "a missing state": (lambda m, a: a.pop("state/b1/exp_avg"), "lacks optimizer state"),
    "state of an unknown name": (lambda m, a: a.update({"state/W1/momentum": a["param/W1"]}), "momentum"),
    "state with no optimizer": (_meta("optimizer", value=None), "state/W1/exp_avg"),
    "NaN in W1": (lambda m, a: a["param/W1"].__setitem__((0, 0), np.nan), "NaN"),
    "inf in a state": (lambda m, a: a["state/b2/exp_avg_sq"].__setitem__(0, np.inf), "NaN or inf"),
    "history.metrics = 5": (_meta("history", "metrics", value=5), "history"),
    "history = []": (_meta("history", value=[]), "history"),
    "history epochs not increasing": (_meta("history", "epoch", value=[0, 1, 1, 3]), "increase"),
    "history epoch a bool": (_meta("history", "epoch", value=[0, 1, 2, True]), "whole numbers"),
    "history value a string": (lambda m, a: m["history"]["metrics"]["loss"].__setitem__(0, "low"), "numbers"),
    "history list too short": (lambda m, a: m["history"]["metrics"]["val_loss"].pop(), "3 values for 4 epochs"),
    "step -1": (_meta("optimizer", "step", value=-1), "step"),
    "step 2.5": (_meta("optimizer", "step", value=2.5), "step"),
    "step true": (_meta("optimizer", "step", value=True), "step"),
    "epoch 'ten'": (_meta("epoch", value="ten"), "epoch counter"),
    "base_lr NaN": (_meta("base_lr", value=math.nan), "base learning rate"),
    "dtype complex128": (_meta("dtype", value="complex128"), "dtype"),
    "unknown optimizer": (_meta("optimizer", "name", value="sgd2"), "optimizer"),
    "Adam beta2 = 7": (_meta("optimizer", "hyper", "beta2", value=7.0), "optimizer"),
    "network = 5": (_meta("network", value=5), "network spec"),
    "network of 3 layers": (lambda m, a: m["network"]["layers"].append(dict(m["network"]["layers"][-1])), "W3"),
    "schedule best 'x'": (_meta("schedule", "best", value="x"), "best"),
    "no history": (lambda m, a: m.pop("history"), "lacks 'history'"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_fields_are_refused(saved, session_cache_dir, name):
    folder, _, raw, _ = saved
    meta, arrays = members(raw)
    edit, words = FORGED[name]
    edit(meta, arrays)
    target = folder / "forged.npz"
    forge(target, meta, arrays)
    with pytest.raises(ValueError) as err:
        sb.load(target, cache_dir=session_cache_dir)
    assert str(target) in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("case", ["not a table", "another format", "a raw member", "a pickled member",
                                  "two members of one name", "a header declaring 2**60 values"])
def test_forged_containers_are_refused(saved, session_cache_dir, case):
    folder, _, raw, _ = saved
    meta, arrays = members(raw)
    target = folder / "forged.npz"
    extra = None
    if case == "not a table":
        meta = [meta]
    elif case == "another format":
        meta["format"] = "symbp-checkpoint-2"
    elif case == "a raw member":
        extra = {"notes.txt": b"hello"}
    elif case == "a pickled member":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        extra = {"param/W9.npy": buf.getvalue()}
    elif case == "two members of one name":
        buf = io.BytesIO()
        np.save(buf, arrays["param/W1"])
        extra = {"param/W1.npy": buf.getvalue()}
    else:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**30, 2**30)})
        extra = {"param/W1.npy": header.getvalue()}
        arrays.pop("param/W1")
    forge(target, meta, arrays, extra)
    with pytest.raises(ValueError) as err:
        sb.load(target, cache_dir=session_cache_dir)
    assert str(target) in str(err.value), err.value


@pytest.mark.parametrize("how", ["fortran order", "float32 arrays", "big-endian arrays"])
def test_equivalent_layouts_load(saved, session_cache_dir, how):
    """Real floating arrays of the right shape in another layout load, converted to the
    checkpoint's dtype (a float32 array in a float64 checkpoint: its float32 values)."""
    folder, _, raw, reference = saved
    meta, arrays = members(raw)
    convert = {"fortran order": np.asfortranarray, "float32 arrays": lambda a: a.astype(np.float32),
               "big-endian arrays": lambda a: a.astype(">f8")}[how]
    arrays = {k: convert(v) for k, v in arrays.items()}
    target = folder / "layout.npz"
    forge(target, meta, arrays)
    model = sb.load(target, cache_dir=session_cache_dir)
    for k, v in model.params.items():
        assert v.dtype == np.float64 and v.flags.c_contiguous
        np.testing.assert_array_equal(v, arrays[f"param/{k}"].astype(np.float64))
    if how != "float32 arrays":
        assert_same(model, reference)


# -- bombs -------------------------------------------------------------------------------------
def deflate_zeros(prefix: bytes, zeros: int) -> bytes:
    """A raw deflate stream inflating to ``prefix`` and ``zeros`` zero bytes: one compressed
    MiB repeated (~1 KB per MiB), so a 3 GiB bomb takes milliseconds and 3 MB to build."""
    def piece(payload: bytes, mode: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(payload) + c.flush(mode)

    n, rest = divmod(zeros, 1 << 20)
    return (piece(prefix, zlib.Z_FULL_FLUSH) + piece(bytes(1 << 20), zlib.Z_FULL_FLUSH) * n
            + piece(bytes(rest), zlib.Z_FINISH))


def write_zip(path: Path, entries: list) -> None:
    """A zip of ``(name, method, packed bytes, crc, declared size)`` entries (sizes < 4 GiB)."""
    out, central = bytearray(), bytearray()
    for name, method, packed, crc, size in entries:
        nm = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(packed), size,
                               len(nm), 0, 0, 0, 0, 0, len(out)) + nm
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(packed), size, len(nm), 0)
        out += nm + packed
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central),
                                 len(out), 0)
    path.write_bytes(bytes(out))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def stored(name: str, blob: bytes) -> tuple:
    return (name, zipfile.ZIP_STORED, blob, zlib.crc32(blob), len(blob))


def bomb(name: str, shape: tuple, inflated: int, declared: int | None = None, dtype: str = "<f8") -> tuple:
    """A deflated member: a .npy header for ``shape`` then ``inflated`` zero bytes; the zip
    directory declares ``declared`` bytes (by default what it inflates to); CRC 0."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    head = header.getvalue()
    size = len(head) + inflated if declared is None else declared
    return (name, zipfile.ZIP_DEFLATED, deflate_zeros(head, inflated), 0, size)


GIB3 = 3 << 30


def bomb_files(folder: Path, raw: bytes) -> dict[str, tuple[str, Path]]:
    """kind ('data'/'checkpoint'), path of each bomb."""
    y = stored("y.npy", npy_bytes(np.zeros(4)))
    files = {
        # a header honest about its 3 GiB of zeros
        "data: honest 3 GiB": ("data", [bomb("X.npy", (GIB3 // 8,), GIB3), y]),
        # the header and the directory say 12 values; the stream goes on for 3 GiB
        "data: lying header and directory": ("data", [bomb("X.npy", (4, 3), GIB3, declared=128 + 96), y]),
        # the header says 12 values, the directory 3 GiB
        "data: lying header": ("data", [bomb("X.npy", (4, 3), GIB3), y]),
        # the header says 3 GiB, the directory 12 values
        "data: lying directory": ("data", [bomb("X.npy", (GIB3 // 8,), GIB3, declared=128 + 96), y]),
    }
    zf = zipfile.ZipFile(io.BytesIO(raw))
    honest = [stored(i.filename, zf.read(i)) for i in zf.infolist()]
    files["checkpoint: W1 inflating to 3 GiB"] = (
        "checkpoint", [e if e[0] != "param/W1.npy" else bomb("param/W1.npy", (4, 3), GIB3) for e in honest])
    files["checkpoint: W1 declaring 3 GiB"] = (
        "checkpoint", [e if e[0] != "param/W1.npy" else bomb("param/W1.npy", (GIB3 // 8,), GIB3) for e in honest])
    files["checkpoint: an extra 3 GiB member"] = (
        "checkpoint", honest + [bomb("param/W9.npy", (GIB3 // 8,), GIB3)])
    files["checkpoint: 3 GiB of metadata"] = (
        "checkpoint", [e if e[0] != "meta.npy" else bomb("meta.npy", (GIB3,), GIB3, dtype="|u1") for e in honest])
    out = {}
    for k, (label, (kind, entries)) in enumerate(files.items()):
        out[label] = (kind, folder / f"bomb{k}.npz")
        write_zip(out[label][1], entries)
    return out


RSS_PROBE = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import symbp as sb
    from symbp.train.data import load_npz

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    cases = json.loads(sys.argv[2])
    report = {}
    for label, kind, path in cases:
        before = peak()
        try:
            if kind == "data":
                arrays = load_npz(path, ("X", "y"))
                outcome = "read " + ", ".join(f"{a.shape}" for a in arrays)
            else:
                sb.load(path, cache_dir=sys.argv[3])
                outcome = "loaded"
        except ValueError as err:
            outcome = "ValueError: " + str(err)
        except Exception as err:
            outcome = type(err).__name__ + ": " + str(err)
        report[label] = [peak() - before, outcome]
    print(json.dumps(report))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from getrusage in bytes: Linux")
def test_bombs_are_refused_with_bounded_memory(saved, session_cache_dir, tmp_path):
    _, _, raw, _ = saved
    bombs = bomb_files(tmp_path, raw)
    assert max(p.stat().st_size for _, p in bombs.values()) < 4 << 20  # each a few MB on disk
    cases = [[label, kind, str(path)] for label, (kind, path) in bombs.items()]
    run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(ROOT), json.dumps(cases), str(session_cache_dir)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for label, (grew, outcome) in report.items():
        assert grew < 64 << 20, f"{label}: peak memory grew by {grew / 2**20:.0f} MiB ({outcome})"
        path = str(bombs[label][1])
        if label == "data: lying header and directory":
            # Consistent on its face: read up to the declared 96 bytes, then the CRC (left 0)
            # refuses it; either way nothing past the declared size is inflated.
            assert outcome.startswith("ValueError") and path in outcome, outcome
        else:
            assert outcome.startswith("ValueError: ") and path in outcome, f"{label}: {outcome}"
        member = "meta.npy" if "metadata" in label else "W9" if "extra" in label else "X.npy" if "data" in label \
            else "W1"
        assert member in outcome, f"{label}: the error does not name the member: {outcome}"


def test_data_beyond_available_memory_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez(path, X=np.ones((1000, 64)), y=np.zeros(1000))
    monkeypatch.setattr(data, "available_memory", lambda: 100_000)
    with pytest.raises(ValueError, match=r"cannot read data file .*big\.npz: its arrays need 507\.8 KiB uncompressed, "
                                         r"more than the 97\.7 KiB of memory available; the largest is member 'X\.npy'"):
        data.load_npz(path, ("X", "y"))
    monkeypatch.setattr(data, "available_memory", lambda: None)  # unknown: no limit but the bomb checks
    X, y = data.load_npz(path, ("X", "y"))
    assert X.shape == (1000, 64) and y.shape == (1000,)


# -- load_npz against np.load on honest files ---------------------------------------------------
HONEST = {
    "X": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "y": np.array([0, 1, 1], dtype=">i4"),
    "flags": np.array([True, False, True]),
    "small": np.arange(-3, 3, dtype=np.int8),
    "empty": np.zeros((0, 5)),
    "scalar": np.float64(2.5),
    "names": np.array(["a", "bcd"]),
    "cube": np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float16),
    "complex": np.array([1 + 2j, 3 - 4j]),
    "records": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
}


@pytest.mark.parametrize("writer", ["savez", "savez_compressed"])
def test_load_npz_agrees_with_np_load(tmp_path, writer):
    path = tmp_path / "honest.npz"
    getattr(np, writer)(path, **HONEST)
    keys = tuple(HONEST)
    got = data.load_npz(path, keys)
    with np.load(path, allow_pickle=False) as f:
        for key, arr in zip(keys, got):
            want = f[key]
            assert arr.dtype == want.dtype and arr.shape == want.shape, key
            assert arr.flags.f_contiguous == want.flags.f_contiguous or arr.ndim < 2, key
            np.testing.assert_array_equal(arr, want)
    with pytest.raises(ValueError, match=r"cannot read data file .*honest\.npz: it has no array 'Z' \(it holds: X, "):
        data.load_npz(path, ("X", "Z"))


def test_load_npz_refuses_pickles_and_non_zip_files(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match=r"pickled\.npz: member 'X\.npy' holds Python objects"):
        data.load_npz(path, ("X", "y"))
    for content in (b"", b"X,y\n1,2\n", b"PK\x05\x06" + bytes(18)):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"cannot read data file .*pickled\.npz"):
            data.load_npz(path, ("X", "y"))
