"""Fuzzing the generated-module cache: truncate and flip bytes in every file symbp and Numba
keep for a model (the generated module, Numba's index ``.nbi`` and code ``.nbc`` files, and
the ``.nbsum`` manifest of their checksums), then load and run the model in a fresh process.
Every run must exit 0 with the numbers of the clean cache: the damaged file regenerated or
compiled again, never a crash (a damaged ``.nbc`` used to give SIGSEGV, SIGILL or SIGABRT).

Each trial runs in its own subprocess (a crash is a signal) from its own copy of a cache the
module fixture fills once; the trials are few and fixed by a seed, so the file stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

NAME = "cachefuzz"
SEED = 20240612
TIMEOUT = 240  # seconds per run: a recompile takes a few

SCRIPT = """
import json, sys
import numpy as np
import symbp as sb
net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], loss="mse", name=%r)
model = sb.compile(net, dtype="float64", seed=0, cache_dir=sys.argv[1])
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [0.25, -2.0, 1.5]])
T = np.array([[0.0, 1.0], [1.0, -1.0], [0.5, 0.5]])
loss, grads = model.loss_and_grads(X, T)
pred = model.predict(X)
misses = sum(sum(f.stats.cache_misses.values()) for f in (model.kernels.loss_and_grads, model.kernels.logits))
print(json.dumps({"path": str(model.source_path), "loss": loss, "pred": pred.tolist(), "misses": misses,
                  "grads": {k: v.tolist() for k, v in grads.items()}}))
""" % NAME

# (suffix, damage, trials): which files get damaged and how often; "flip" xors one byte at
# an offset spread over the file, "truncate" cuts the file there.  12 trials in all.
PLAN = [
    (".py", "flip", 1), (".py", "truncate", 1),
    (".nbsum", "flip", 1), (".nbsum", "truncate", 1),
    (".nbi", "flip", 1), (".nbi", "truncate", 1),
    (".nbc", "flip", 5), (".nbc", "truncate", 1),
]


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}  # Numba's files beside the module
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run(cache_dir: Path, root: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)], env=_env(root), capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(err.cmd, "timeout", err.stdout or "", err.stderr or "")


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_numbers(a: dict, b: dict) -> bool:
    return (np.allclose(a["loss"], b["loss"], rtol=1e-12, atol=0) and np.allclose(a["pred"], b["pred"], rtol=1e-12)
            and a["grads"].keys() == b["grads"].keys()
            and all(np.allclose(a["grads"][k], b["grads"][k], rtol=1e-12) for k in a["grads"]))


def cache_files(cache_dir: Path, suffix: str) -> list[Path]:
    where = cache_dir if suffix == ".py" else cache_dir / "__pycache__"
    return sorted(where.glob(f"{NAME}-*{suffix}"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory, project_root):
    """A cache holding the module and Numba's files for every function the script calls,
    and the numbers the script prints from it.  Two processes fill it at once: they write
    the same files and record their checksums concurrently, and neither breaks the other."""
    cache_dir = tmp_path_factory.mktemp("fuzz-clean")
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference, other = (result(proc) for proc in pool.map(lambda _: run(cache_dir, project_root), range(2)))
    assert reference["misses"] >= 1 and same_numbers(other, reference)
    again = result(run(cache_dir, project_root))  # the next run loads everything from the cache
    assert again["misses"] == 0 and same_numbers(again, reference)
    return cache_dir, reference


def trials(cache_dir: Path) -> list[tuple[str, str, int]]:
    """(file name relative to the cache, damage, offset): deterministic from SEED."""
    rng = random.Random(SEED)
    out = []
    for suffix, damage, count in PLAN:
        files = cache_files(cache_dir, suffix)
        assert files, f"no {suffix} file in the clean cache"
        for i in range(count):
            f = files[rng.randrange(len(files))]
            size = f.stat().st_size
            # spread the offsets: the i-th trial of a kind falls in the i-th stretch of the file
            offset = min(size - 1, int(size * (i + rng.random()) / count))
            out.append((str(f.relative_to(cache_dir)), damage, offset))
    return out


def damage_file(f: Path, damage: str, offset: int, rng: random.Random) -> None:
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        del data[offset:]
    else:
        data[offset] ^= rng.randrange(1, 256)
    f.write_bytes(bytes(data))


def test_damaged_cache_files_never_crash(clean, project_root, tmp_path):
    src, reference = clean
    plan = trials(src)
    assert len(plan) == sum(count for *_, count in PLAN)
    rng = random.Random(SEED + 1)
    dirs = []
    for i, (name, damage, offset) in enumerate(plan):
        cache_dir = tmp_path / f"trial{i}"
        shutil.copytree(src, cache_dir)
        damage_file(cache_dir / name, damage, offset, rng)
        dirs.append(cache_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each trial is a process of its own
        procs = list(pool.map(lambda d: run(d, project_root), dirs))
    failures = []
    for (name, damage, offset), proc in zip(plan, procs):
        if proc.returncode != 0:
            failures.append(f"{damage} {name} at {offset}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        elif not same_numbers(json.loads(proc.stdout.strip().splitlines()[-1]), reference):
            failures.append(f"{damage} {name} at {offset}: wrong numbers {proc.stdout.strip()[-300:]}")
    assert not failures, f"{len(failures)} of {len(plan)} runs failed:\n" + "\n".join(failures)


def test_recompiled_code_is_recorded_and_reused(clean, project_root, tmp_path):
    """After a flipped code file is compiled again its new checksum is recorded: the next
    run loads everything from the cache."""
    src, reference = clean
    cache_dir = tmp_path / "cache"
    shutil.copytree(src, cache_dir)
    (code,) = [f for f in cache_files(cache_dir, ".nbc") if ".loss_and_grads-" in f.name]
    damage_file(code, "flip", code.stat().st_size // 2, random.Random(SEED))
    first = result(run(cache_dir, project_root))
    assert same_numbers(first, reference) and first["misses"] >= 1
    second = result(run(cache_dir, project_root))
    assert same_numbers(second, reference) and second["misses"] == 0


def test_cli_reports_and_prunes_a_flipped_code_file(clean, tmp_path, capsys):
    from symbp import cache
    from symbp.cli import main

    src, _ = clean
    cache_dir = tmp_path / "cache"
    shutil.copytree(src, cache_dir)
    # the manifest records every index and code file Numba wrote, as sha256sum would
    (manifest,) = cache_files(cache_dir, ".nbsum")
    numba_files = cache_files(cache_dir, ".nbi") + cache_files(cache_dir, ".nbc")
    assert sorted(manifest.read_text().splitlines()) == sorted(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" for f in numba_files)
    assert main(["cache", "--dir", str(cache_dir)]) == 0
    assert "1 current modules; 0 stale, damaged or orphaned files" in capsys.readouterr().out
    codes = cache_files(cache_dir, ".nbc")
    victim = codes[len(codes) // 2]
    damage_file(victim, "flip", victim.stat().st_size // 3, random.Random(SEED))
    (module,) = cache_files(cache_dir, ".py")
    assert cache.damaged_numba_files(module) == [victim]
    assert main(["cache", "--dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 current modules; 1 stale, damaged or orphaned files" in out and "--prune" in out
    assert f"1 of them compiled code whose checksum does not match (damaged): {victim.name}" in out
    assert victim.is_file()  # only reported
    assert main(["cache", "--dir", str(cache_dir), "--prune"]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert not victim.exists() and all(f.is_file() for f in codes if f != victim) and module.is_file()
    assert cache.damaged_numba_files(module) == []
    # a code file nobody recorded (written by hand, or by a symbp before checksums) is damaged too
    stray = victim.with_name(victim.name.replace(".1.nbc", ".7.nbc"))
    stray.write_bytes(b"\x80\x04K\x01.")
    assert cache.damaged_numba_files(module) == [stray]
    assert cache.prune(cache_dir).removed == [stray]


# -- a generated module that does not import -------------------------------------------------
def tiny_net():
    import symbp as sb

    return sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], loss="mse", name=NAME + "imp")


def test_module_that_does_not_import_is_regenerated(tmp_path):
    import symbp as sb
    from symbp import cache

    path = sb.compile(tiny_net(), dtype="float64", cache_dir=tmp_path).source_path
    original = path.read_text()
    sys.modules.pop(cache.module_name(path), None)  # as in a new process
    # intact (its checksum matches) but not Python: e.g. a backslash escape in its docstring
    cache.write_module(path, '"""a formula: z #\\x"""\n' + original.partition("# symbp-generator: ")[0])
    assert cache.is_intact(path)
    model = sb.compile(tiny_net(), dtype="float64", cache_dir=tmp_path)
    assert model.source_path == path and path.read_text() == original
    assert model.predict(np.zeros((1, 3))).shape == (1, 2)


@pytest.mark.parametrize("text", ['"""z #\\x"""\n', "def f(:\n    pass\n", "import symbp_gen_no_such_module\n"])
def test_module_that_never_imports_raises_a_clear_error(tmp_path, text):
    from symbp import cache

    path = tmp_path / "broken-float64-0123456789abcdef.py"
    calls = []

    def generate():
        calls.append(1)
        return text

    cache.write_module(path, text)
    with pytest.raises(RuntimeError) as err:
        cache.load_or_generate(path, generate)
    message = str(err.value)
    assert str(path) in message and "cannot be imported" in message and "\n" not in message
    assert ("SyntaxError" in message and "line 1" in message) or "No module named" in message
    assert calls == [1]  # regenerated once, then refused
    assert cache.module_name(path) not in sys.modules


def test_cli_names_a_module_that_does_not_import(tmp_path, monkeypatch, capsys):
    """The CLI prints one line, not a traceback."""
    from symbp import cache
    from symbp.cli import main

    def broken(path, generate, target="cpu"):
        raise SyntaxError("unexpected character after line continuation character", (str(path), 1, 5, "", 1, 6))

    monkeypatch.setattr(cache, "import_module", lambda path: broken(path, None))
    spec = tmp_path / "net.toml"
    spec.write_text('inputs = 3\nloss = "mse"\n[[layers]]\ntype = "dense"\nunits = 2\n')
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["walkthrough", str(spec), "--kernels"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("symbp: error: ") and err.count("\n") == 1, err
    assert "cannot be imported" in err and "SyntaxError" in err and "line 1" in err
