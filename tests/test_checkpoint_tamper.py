"""Checkpoints and data files that lie (issue 12, items 11 and 12): flipped bytes, truncations,
decompression bombs and forged fields with a recomputed digest.  Each is refused with the
project's ValueError naming the file, or (a flip in bytes nothing reads) loads the same
model; never another exception, never gigabytes of memory.  Also: a history stays one entry
per epoch across fits with and without validation data.
"""

from __future__ import annotations

import io
import json
import math
import tracemalloc
import zipfile

import numpy as np
import pytest

import symbp as sb
from symbp import checkpoint
from symbp.data import load_npz


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny trained model with Adam state, a schedule-free history with and without
    validation epochs, saved once; its bytes and the model."""
    root = tmp_path_factory.mktemp("ckpt")
    net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], loss="mse")
    model = sb.compile(net, dtype="float64", seed=1, cache_dir=root / "cache")
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    model.fit(X, Y, optimizer=sb.Adam(lr=0.01), epochs=2, batch_size=8, validation_data=(X, Y), progress=False)
    model.fit(X, Y, epochs=3, initial_epoch=2, batch_size=8, progress=False)
    path = model.save(root / "run.npz")
    return root, path, path.read_bytes(), model, (X, Y)


def same_model(a, b) -> bool:
    return (a.params.keys() == b.params.keys() and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
            and a.optimizer.step == b.optimizer.step and a.history.epoch == b.history.epoch)


def test_history_one_entry_per_epoch_across_fits(saved):
    _, path, _, model, (X, Y) = saved
    h = model.history
    assert h.epoch == [0, 1, 2]
    assert all(len(v) == len(h.epoch) for v in h.history.values())
    assert not math.isnan(h["val_loss"][1]) and math.isnan(h["val_loss"][2])  # epoch 2 had no validation
    loaded = sb.load(path, cache_dir=path.parent / "cache")
    assert loaded.history.epoch == h.epoch
    np.testing.assert_array_equal(loaded.history["val_loss"], h["val_loss"])  # NaN survives the round trip
    # Resuming inside the recorded epochs truncates every list alike (it raised IndexError).
    loaded.fit(X, Y, epochs=3, initial_epoch=1, batch_size=8, validation_data=(X, Y), progress=False)
    assert loaded.history.epoch == [0, 1, 2]
    assert all(len(v) == 3 for v in loaded.history.history.values())
    assert not math.isnan(loaded.history["val_loss"][2])


def test_flipped_and_truncated_checkpoints_are_refused_or_identical(saved):
    root, path, data, model, _ = saved
    rng = np.random.default_rng(12)
    offsets = sorted(set(rng.integers(0, len(data), 48).tolist()) | {0, 4, 30, len(data) - 1, len(data) - 22})
    outcomes = {"refused": 0, "identical": 0}
    target = root / "tampered.npz"
    for off in offsets:
        bad = bytearray(data)
        bad[off] ^= 0x5A
        target.write_bytes(bytes(bad))
        try:
            loaded = sb.load(target, cache_dir=root / "cache")
        except ValueError as err:
            assert str(target) in str(err), err
            outcomes["refused"] += 1
            continue
        assert same_model(loaded, model), f"a flip at byte {off} loaded a different model"
        outcomes["identical"] += 1
    for cut in (0, 10, 100, len(data) // 3, len(data) // 2, len(data) - 23, len(data) - 1):
        target.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="tampered.npz"):
            sb.load(target, cache_dir=root / "cache")
    assert outcomes["refused"] >= len(offsets) // 2, outcomes


def _members(data: bytes) -> tuple[dict, dict]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    meta.pop("sha256")
    return meta, arrays


def _forge(path, meta: dict, arrays: dict) -> None:
    """A checkpoint whose digest is right for its (edited) content: only the checks of the
    content itself can catch it."""
    meta = dict(meta, sha256=checkpoint._digest(meta, arrays))
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    path.write_bytes(buf.getvalue())


FORGERIES = {
    "complex W1": (lambda m, a: a.update({"param/W1": a["param/W1"] * (1 + 1j)}), "real floating"),
    "W1 of the wrong shape": (lambda m, a: a.update({"param/W1": np.zeros((5, 3))}), "shape"),
    "integer b1": (lambda m, a: a.update({"param/b1": np.arange(4)}), "real floating"),
    "NaN in W2": (lambda m, a: a["param/W2"].__setitem__((0, 0), np.nan), "NaN"),
    "state of the wrong shape": (lambda m, a: a.update({"state/W1/exp_avg": np.zeros((2, 2))}), "shape"),
    "a missing state": (lambda m, a: a.pop("state/b2/exp_avg_sq"), "lacks"),
    "an extra member": (lambda m, a: a.update({"param/W9": np.zeros(2)}), "W9"),
    "history metrics = 5": (lambda m, a: m["history"].update(metrics=5), "history"),
    "history lists misaligned": (lambda m, a: m["history"]["metrics"]["loss"].pop(), "history"),
    "a negative step": (lambda m, a: m["optimizer"].update(step=-3), "step"),
    "dtype float16": (lambda m, a: m.update(dtype="float16"), "dtype"),
    "no network": (lambda m, a: m.pop("network"), "network"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_checkpoints_are_refused(saved, name):
    root, _, data, _, _ = saved
    meta, arrays = _members(data)
    edit, words = FORGERIES[name]
    edit(meta, arrays)
    target = root / f"forged-{name.replace(' ', '_')}.npz"
    _forge(target, meta, arrays)
    with pytest.raises(ValueError, match=words) as err:
        sb.load(target, cache_dir=root / "cache")
    assert str(target) in str(err.value)


def _bomb(path, member: str, header_shape: tuple, inflated: int) -> None:
    """An npz whose ``member`` has a .npy header for ``header_shape`` float64 but whose
    deflated stream inflates to ``inflated`` bytes of zeros (written in chunks: the test
    itself never holds them)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": header_shape})
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open(member, "w", force_zip64=True) as fp:
            fp.write(header.getvalue())
            for _ in range(inflated >> 20):
                fp.write(chunk)


@pytest.mark.parametrize("declared", ["honest", "lying"])
def test_data_file_bombs_are_refused_before_inflating(tmp_path, declared):
    # 512 MiB of zeros packs into ~0.5 MB.  "honest": the header declares all of it (an array
    # of 2**26 float64); "lying": it declares 4×3 values and the stream goes on for the rest.
    path = tmp_path / "bomb.npz"
    shape = (1 << 26,) if declared == "honest" else (4, 3)
    _bomb(path, "X.npy", shape, 1 << 29)
    with zipfile.ZipFile(path, "a") as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros(4))
        zf.writestr("y.npy", buf.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="bomb.npz"):
            load_npz(path, ("X", "y"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB while refusing a bomb"


def test_checkpoint_bomb_is_refused_before_inflating(saved, tmp_path):
    root, _, data, _, _ = saved
    meta, arrays = _members(data)
    path = tmp_path / "bomb.npz"
    _forge(path, meta, arrays)
    # Replace W1 by a member whose header says (4, 3) and whose stream inflates to 512 MiB.
    with zipfile.ZipFile(path) as zf:
        keep = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != "param/W1.npy"}
    _bomb(path, "param/W1.npy", (4, 3), 1 << 29)
    with zipfile.ZipFile(path, "a") as zf:
        for name, blob in keep.items():
            zf.writestr(name, blob)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="bomb.npz"):
            sb.load(path, cache_dir=root / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB while refusing a bomb"
