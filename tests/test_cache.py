"""The generated-module cache: file naming, reuse within and across processes, and
detection of damaged files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import symbp as sb

NAME = "cachetest"


def cache_net(**overrides) -> sb.Network:
    spec = {"inputs": 3, "layers": [sb.Dense(4, activation="tanh"), sb.Dense(2)], "loss": "mse", "name": NAME}
    spec.update(overrides)
    return sb.Network(**spec)


def module_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.py"))


# -- in-process -------------------------------------------------------------------------------
def test_file_name_and_location(tmp_path):
    model = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path)
    path = model.source_path
    assert path.parent == tmp_path
    assert path.is_file()
    assert re.fullmatch(rf"{NAME}-float64-[0-9a-f]{{8,}}\.py", path.name), path.name
    assert module_files(tmp_path) == [path]
    # without a name the file is named after the widths
    unnamed = sb.compile(cache_net(name=None), dtype="float32", cache_dir=tmp_path).source_path
    assert re.fullmatch(r"mlp-3-4-2-float32-[0-9a-f]{8,}\.py", unnamed.name), unnamed.name


def test_unsafe_name_stays_inside_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    path = sb.compile(cache_net(name="../../evil name/x"), dtype="float64", cache_dir=cache).source_path
    assert path.parent == cache
    assert "/" not in path.name and " " not in path.name and not path.name.startswith(".")


def test_numpy_dtype_objects_accepted(tmp_path):
    model = sb.compile(cache_net(), dtype=np.float32, cache_dir=tmp_path)
    assert model.dtype == np.float32
    assert "-float32-" in model.source_path.name
    assert model.source_path == sb.compile(cache_net(), dtype="float32", cache_dir=tmp_path).source_path


def test_env_var_sets_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / "from-env"))
    path = sb.compile(cache_net(), dtype="float64").source_path
    assert path.parent == tmp_path / "from-env"
    assert path.is_file()
    # an explicit cache_dir wins over the variable
    explicit = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path / "explicit").source_path
    assert explicit.parent == tmp_path / "explicit"


def test_compile_again_reuses_file(tmp_path, monkeypatch):
    first = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path).source_path
    before = first.stat().st_mtime_ns, first.read_bytes()

    import symbp.backends.cpu.module

    def no_codegen(*args, **kwargs):
        raise AssertionError("the module was generated again although an intact one exists")

    monkeypatch.setattr(symbp.backends.cpu.module, "generate_source", no_codegen)
    again = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path).source_path  # a new, equal Network
    assert again == first
    assert (again.stat().st_mtime_ns, again.read_bytes()) == before
    assert module_files(tmp_path) == [first]


def test_different_spec_or_dtype_gives_different_file(tmp_path):
    variants = {
        "base": (cache_net(), "float64"),
        "float32": (cache_net(), "float32"),
        "l2": (cache_net(l2=0.1), "float64"),
        "activation": (cache_net(layers=[sb.Dense(4, activation="relu"), sb.Dense(2)]), "float64"),
        "activation-param": (cache_net(layers=[sb.Dense(4, activation="elu", alpha=0.5), sb.Dense(2)]), "float64"),
        "activation-param2": (cache_net(layers=[sb.Dense(4, activation="elu", alpha=0.6), sb.Dense(2)]), "float64"),
        "width": (cache_net(layers=[sb.Dense(5, activation="tanh"), sb.Dense(2)]), "float64"),
        "loss": (cache_net(loss="log(cosh(y - t))"), "float64"),
        "inputs": (cache_net(inputs=4), "float64"),
    }
    paths = {key: sb.compile(net, dtype=dtype, cache_dir=tmp_path).source_path for key, (net, dtype) in variants.items()}
    assert len(set(paths.values())) == len(variants), paths
    assert module_files(tmp_path) == sorted(paths.values())
    assert "float32" in paths["float32"].name and "float64" in paths["base"].name
    texts = {key: p.read_text() for key, p in paths.items()}
    assert len(set(texts.values())) == len(texts)  # different code, not just different names


DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "garbage-appended": lambda text: text + "garbage = 1 / 0\n",
    "edited": lambda text: 'raise RuntimeError("a damaged generated module was executed")\n' + text,
    "checksum-removed": lambda text: "\n".join(line for line in text.splitlines() if "checksum" not in line) + "\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_module_is_regenerated(tmp_path, damage):
    path = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path).source_path
    original = path.read_text()
    damaged = DAMAGE[damage](original)
    assert damaged != original
    path.write_text(damaged)
    again = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path)
    assert again.source_path == path
    assert path.read_text() == original
    assert module_files(tmp_path) == [path]  # no stray temporary files either
    assert not list(tmp_path.glob(".*tmp"))


# -- across processes -------------------------------------------------------------------------
SCRIPT = """
import json, sys
import numpy as np
import symbp as sb
net = sb.Network(inputs=3, layers=[sb.Dense(4, activation="tanh"), sb.Dense(2)], loss="mse", name=%r)
model = sb.compile(net, dtype="float64")
model.params = {"W1": np.linspace(-1, 1, 12).reshape(4, 3), "b1": np.array([0.1, -0.2, 0.3, -0.4]),
                "W2": np.linspace(0.5, -0.5, 8).reshape(2, 4), "b2": np.array([0.05, -0.05])}
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
T = np.array([[0.0, 1.0], [1.0, -1.0]])
loss, grads = model.loss_and_grads(X, T)
stats = model.kernels.loss_and_grads.stats
model.fit(X, T, optimizer=sb.SGD(lr=0.1), batch_size=2, epochs=1, progress=False)  # the training module too
print(json.dumps({"path": str(model.source_path), "loss": loss,
                  "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "sympy": "sympy" in sys.modules, "trained": bool(np.isfinite(model.params["W1"]).all())}))
""" % NAME


def expected_loss() -> float:
    W1, b1 = np.linspace(-1, 1, 12).reshape(4, 3), np.array([0.1, -0.2, 0.3, -0.4])
    W2, b2 = np.linspace(0.5, -0.5, 8).reshape(2, 4), np.array([0.05, -0.05])
    X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    T = np.array([[0.0, 1.0], [1.0, -1.0]])
    y = np.tanh(X @ W1.T + b1) @ W2.T + b2
    return float(((y - T) ** 2).mean())


def run_process(cache_dir: Path, root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}  # no NUMBA_CACHE_DIR etc.
    env["SYMBP_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_process(tmp_path_factory, project_root):
    cache_dir = tmp_path_factory.mktemp("cross-process")
    result = run_process(cache_dir, project_root)
    return cache_dir, result, snapshot(cache_dir)


def test_first_process_writes_module_and_numba_cache(first_process):
    cache_dir, result, _ = first_process
    path = Path(result["path"])
    assert path.parent == cache_dir and path.is_file()
    assert result["loss"] == pytest.approx(expected_loss(), rel=1e-12)
    assert result["misses"] >= 1 and result["hits"] == 0  # compiled here, nothing to reuse yet
    pycache = cache_dir / "__pycache__"
    assert list(pycache.glob(f"{path.stem}.*.nbi")), sorted(os.listdir(pycache))
    assert list(pycache.glob(f"{path.stem}.*.nbc")), sorted(os.listdir(pycache))


def test_second_process_reuses_module_and_machine_code(first_process, project_root):
    cache_dir, first, before = first_process
    second = run_process(cache_dir, project_root)
    assert second["path"] == first["path"]
    assert second["loss"] == first["loss"]
    assert second["misses"] == 0 and second["hits"] >= 1  # Numba loaded the machine code
    assert snapshot(cache_dir) == before  # nothing rewritten: module, index and code files
    # SymPy derives; a process that finds every module in the cache trains without importing it
    assert first["sympy"] and not second["sympy"] and second["trained"]


def test_import_leaves_sympy_and_the_readers_until_named(project_root):
    """``import symbp`` loads no SymPy; the readers (sb.report, sb.graph, …) load when first named."""
    code = ("import sys, json, symbp as sb\n"
            "before = 'sympy' in sys.modules\n"
            "net = sb.Network(inputs=2, layers=[sb.Dense(3, activation='relu'), sb.Dense(2)], loss='mse')\n"
            "declared = 'sympy' in sys.modules\n"
            "names = [callable(getattr(sb, n)) for n in ('report', 'graph', 'walkthrough', 'Walkthrough', 'optimizer_paths')]\n"
            "print(json.dumps([before, declared, 'sympy' in sys.modules, names, 'report' in dir(sb), sb.derive.__module__]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(project_root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, declared, after, names, listed, derive_module = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not before and not declared and after  # the readers print SymPy: it comes with them
    assert names == [True] * 5 and listed and derive_module == "symbp.derive"


def test_damaged_module_regenerated_in_new_process(first_process, project_root, tmp_path):
    src_dir, first, _ = first_process
    cache_dir = tmp_path / "cache"
    shutil.copytree(src_dir, cache_dir)
    path = cache_dir / Path(first["path"]).name
    original = path.read_text()
    # a damaged module that would raise if it were ever executed, and one cut in half
    for damage in ("edited", "truncated"):
        path.write_text(DAMAGE[damage](original))
        result = run_process(cache_dir, project_root)
        assert Path(result["path"]) == path
        assert result["loss"] == pytest.approx(expected_loss(), rel=1e-12)
        assert path.read_text() == original, damage


@pytest.mark.parametrize("damage", ["code-truncated", "index-garbage"])
def test_damaged_numba_cache_is_compiled_again(first_process, project_root, tmp_path, damage):
    """Numba unpickles its cache files unchecked: a cut one would fail the first call."""
    src_dir, first, _ = first_process
    cache_dir = tmp_path / "cache"
    shutil.copytree(src_dir, cache_dir)
    stem = Path(first["path"]).stem
    suffix = ".nbc" if damage == "code-truncated" else ".nbi"
    files = sorted((cache_dir / "__pycache__").glob(f"{stem}.*{suffix}"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:20] if suffix == ".nbc" else b"garbage")
    result = run_process(cache_dir, project_root)
    assert result["loss"] == pytest.approx(expected_loss(), rel=1e-12)
    assert result["misses"] >= 1  # compiled again, and cached again:
    again = run_process(cache_dir, project_root)
    assert again["misses"] == 0 and again["hits"] >= 1 and again["loss"] == result["loss"]


# -- pruning ----------------------------------------------------------------------------------
def test_prune_removes_only_what_cannot_come_up_again(tmp_path, capsys):
    from symbp import cache
    from symbp.cli import main

    model = sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path)
    model.predict(np.zeros((1, 3)))  # Numba writes its compiled code beside the module
    live = model.source_path
    compiled = sorted((tmp_path / "__pycache__").glob(f"{live.stem}.*"))
    assert compiled
    source = live.read_text().rpartition("# symbp-generator: ")[0]

    def stamped(name: str, stamp: str) -> Path:
        """An intact module (its checksum matches) that carries ``stamp``."""
        body = source + "# symbp-generator: " + stamp + "\n"
        path = tmp_path / name
        path.write_text(body + "# symbp-checksum: " + hashlib.sha256(body.encode()).hexdigest() + "\n")
        assert cache.is_intact(path)
        return path

    # a module an older generator wrote (its stamp differs), with compiled code of its own
    old = stamped(f"{NAME}-float64-0123456789abcdef.py", "symbp=0.0.1 numba=0.1 generator=0")
    # CUDA modules: one of the installed numba-cuda (kept), one of another version (stale)
    cuda_live = stamped(f"{NAME}-float32-cuda-00112233.py", cache.generator_stamp("cuda"))
    cuda_old = stamped(f"{NAME}-float32-cuda-44556677.py", cache.generator_stamp() + " numba-cuda=0.0.1")
    old_nbc = tmp_path / "__pycache__" / f"{old.stem}.predict-1.py311.1.nbc"
    old_nbc.write_bytes(b"x" * 100)
    # a damaged module, an orphaned compiled file, and a file symbp did not write
    damaged = tmp_path / f"{NAME}-float32-fedcba9876543210.py"
    damaged.write_text(live.read_text()[:-20])
    orphan = tmp_path / "__pycache__" / "gone-float32-00.forward-3.py311.nbi"
    orphan.write_bytes(b"y")
    foreign = tmp_path / "notes.py"
    foreign.write_text("x = 1\n")

    assert main(["cache", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 current modules; 5 stale, damaged or orphaned files" in out and "--prune" in out
    assert old.is_file() and orphan.is_file()  # only reported

    result = cache.prune(tmp_path)
    assert set(result.removed) == {old, old_nbc, damaged, orphan, cuda_old}
    assert result.kept == 2 and result.freed > 100 and cuda_live.is_file()
    assert live.is_file() and foreign.is_file() and all(f.is_file() for f in compiled)
    # what is left still loads without regenerating
    before = live.stat().st_mtime_ns
    sb.compile(cache_net(), dtype="float64", cache_dir=tmp_path)
    assert live.stat().st_mtime_ns == before

    assert main(["cache", "--dir", str(tmp_path), "--clear"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not live.exists() and not any((tmp_path / "__pycache__").iterdir()) and foreign.is_file()


def test_cli_version_and_cache_of_a_missing_directory(tmp_path, capsys):
    from symbp.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"symbp {sb.__version__}, sympy ") and "numba " in out
    assert main(["cache", "--dir", str(tmp_path / "none")]) == 0
    assert "no such directory" in capsys.readouterr().out and not (tmp_path / "none").exists()


def test_the_generator_key_covers_every_module_generation_reads():
    """The module key hashes the generator's source, found by following its imports: the
    network spec, every layer file and the helpers the generated code imports are in it,
    the readers that only print formulas and the training loop are not."""
    from symbp import cache

    names = {path.relative_to(cache._PKG_DIR).as_posix() for path in cache.generator_files()}
    for needed in ("spec/network.py", "derive.py", "lower/plan.py", "lower/stages.py", "spec/layers/dense.py",
                   "spec/layers/conv2d.py", "spec/layers/base.py", "backends/cpu/blas.py", "backends/cpu/emit.py",
                   "backends/cuda/module.py", "train/optim.py", "backends/cpu/dots.py", "backends/cpu/targets.py",
                   "backends/cpu/guard.py", "backends/cpu/arrays.py"):
        assert needed in names, needed
    for reader in ("train/model.py", "cli.py", "read/report.py", "read/walkthrough.py", "__init__.py"):
        assert reader not in names, reader


HELPERS_SCRIPT = """
import json
import numpy as np
from symbp.backends.cpu import blas
out = {}
for dtype in (np.float32, np.float64):
    A, B = np.ones((3, 4), dtype), np.ones((4, 2), dtype)
    C, scal = np.zeros((3, 2), dtype), np.empty(2, dtype)
    blas.gemm(A, False, B, False, C, 1.0, 0.0, scal)
    blas.gemm_block(A, 0, 3, 4, False, B, 0, 4, 2, False, C, 0, 3, 2, 1.0, 1.0, scal)
    out[str(C.dtype)] = C.tolist()
for f in (blas.gemm, blas.gemm_block):
    out[f.__name__] = [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
print(json.dumps(out))
"""


def test_blas_helpers_are_cached_across_processes(tmp_path, project_root):
    """symbp's GEMM binding compiles once, then every later process loads it: a process that
    compiled it anew each time (as a closure over the BLAS function did: Numba keys a closure
    on its pickled contents, which differed per process) paid it on every cold compile and
    grew the cache index without bound."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(project_root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", HELPERS_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["float32"] == first["float64"] == [[8.0, 8.0]] * 3
    assert first["gemm"] == [0, 2] and first["gemm_block"] == [0, 2]  # compiled: one per dtype
    assert second["gemm"] == [2, 0] and second["gemm_block"] == [2, 0]  # loaded from the cache
    files = sorted(p.name for p in tmp_path.rglob("*.nbc"))
    # one machine code file per dtype for gemm, gemm_block and the gemm_at it calls, written once
    assert len(files) == 6 and {f.split("-")[0] for f in files} == {"blas.gemm", "blas.gemm_at", "blas.gemm_block"}, files
