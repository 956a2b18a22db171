"""Standalone kernels (``symbp.interop.kernels``): the exported folder runs without symbp or SymPy.

Each exported package is imported in a subprocess whose import system refuses ``sympy``,
``symbp`` and every name starting with them (the generated modules' cache names included).
There it predicts, takes one SGD step and trains for two epochs; the numbers come back in an
``.npz`` and are compared with what the model itself computes in this process: predictions
with ``decision_function``/``predict``, the step with θ − lr·∂C/∂θ from ``loss_and_grads``, the
epochs with ``model.fit`` over the same batches (same seed), optimizer state carried over.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import symbp as sb
from symbp.interop.kernels import MARKER, ExportError, _rewrite, export_kernels

# name -> (network, dtype, optimizer, X shape of one sample)
CASES = {
    "mlp64": (lambda: sb.Network(inputs=6, layers=[sb.Dense(5, activation="tanh"), sb.Dense(3)],
                                 loss="softmax_cross_entropy", l2=1e-3, name="export-mlp"),
              "float64", lambda: sb.SGD(lr=0.1), (6,)),
    "mlp32": (lambda: sb.Network(inputs=6, layers=[sb.Dense(5, activation="relu"), sb.Dense(2)],
                                 loss="mse", name="export-mlp-mse"),
              "float32", lambda: sb.SGD(lr=0.05, momentum=0.9), (6,)),
    "cnn32": (lambda: sb.Network(inputs=(1, 6, 6), layers=[sb.Conv2D(2, kernel=3, activation="relu"), sb.MaxPool2D(2),
                                                           sb.Flatten(), sb.Dense(3)],
                                 loss="softmax_cross_entropy", name="export-cnn"),
              "float32", lambda: sb.Adam(lr=0.01), (1, 6, 6)),
    # BatchNorm: its kernels also hold the data-parallel variants, which import _sync.py
    "bn64": (lambda: sb.Network(inputs=6, layers=[sb.Dense(5), sb.BatchNorm(), sb.Dense(3, activation="tanh"),
                                                  sb.Dense(3)], loss="softmax_cross_entropy", name="export-bn"),
             "float64", lambda: sb.SGD(lr=0.1, momentum=0.9), (6,)),
}
N = 27  # three batches of BATCH and a shorter last one (a train_epoch call of its own)
BATCH = 8
LR_STEP = 0.05  # the learning rate of the single train_step

# Run in the subprocess: nothing of symbp or SymPy may be imported there.
_CHILD = textwrap.dedent('''
    import sys

    class _Refuse:
        """Fails every import of sympy, symbp or a name starting with them."""
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("sympy", "symbp")):
                raise ImportError(f"{name} is not available in this test")
            return None

    sys.meta_path.insert(0, _Refuse())
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    sys.path.insert(0, sys.argv[1])
    try:
        import sympy  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import importlib
    import json
    import numpy as np

    data = np.load(sys.argv[2])
    results = {}
    for name in json.loads(sys.argv[3]):
        pkg = importlib.import_module(name)
        X, y, Xt = data[name + "/X"], data[name + "/y"], data[name + "/Xt"]
        results[name + "/logits"] = pkg.decision_function(Xt)
        results[name + "/predict"] = pkg.predict(Xt)
        results[name + "/evaluate"] = np.array(pkg.evaluate(X, y))
        results[name + "/step_loss"] = np.array(pkg.train_step(X[:8], y[:8], lr=float(data["lr_step"])))
        for p in pkg.PARAMS:
            results[name + "/step/" + p] = pkg.params[p].copy()
        pkg.load_weights()  # back to the exported weights and optimizer state
        history = pkg.fit(X, y, epochs=3, initial_epoch=1, batch_size=8, seed=0)
        results[name + "/fit_loss"] = np.array(history["loss"])
        for p in pkg.PARAMS:
            results[name + "/fit/" + p] = pkg.params[p].copy()
        results[name + "/step_count"] = np.array(pkg.step)
        saved = pkg.save_weights(sys.argv[1] + "/" + name + "-saved.npz")
        again = pkg.load_weights(saved)
        results[name + "/saved_equal"] = np.array(all(np.array_equal(again[p], results[name + "/fit/" + p])
                                                      for p in pkg.PARAMS))
    leaked = sorted(m for m in sys.modules if m.startswith(("sympy", "symbp")))
    if leaked:
        raise SystemExit(f"imported: {leaked}")
    np.savez(sys.argv[4], **results)
''')


def _data(name, dtype, sample_shape, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, *sample_shape))
    Xt = rng.normal(size=(7, *sample_shape))
    net = CASES[name][0]()
    if net.loss.task == "multiclass":
        y = np.arange(N) % net.outputs
    else:
        y = rng.normal(size=(N, net.outputs))
    return X, y, Xt


@pytest.fixture(scope="module")
def exported(tmp_path_factory, session_cache_dir):
    """Export each case after one epoch of training, run the child, and collect what the
    model itself computes: {case: (model-side reference dict, child results)}."""
    root = tmp_path_factory.mktemp("export-kernels")
    inputs, refs = {"lr_step": np.array(LR_STEP)}, {}
    for name, (make_net, dtype, make_opt, shape) in CASES.items():
        model = sb.compile(make_net(), dtype=dtype, seed=0, cache_dir=session_cache_dir)
        X, y, Xt = _data(name, dtype, shape)
        model.fit(X, y, optimizer=make_opt(), epochs=1, batch_size=BATCH, seed=0, progress=False)
        export_kernels(model, root / name)
        ref = {"logits": model.decision_function(Xt), "predict": model.predict(Xt),
               "evaluate": np.array(model.evaluate(X, y)), "params": {k: v.copy() for k, v in model.params.items()}}
        loss, grads = model.loss_and_grads(X[:BATCH], y[:BATCH])
        ref["step_loss"], ref["grads"] = loss, grads
        history = model.fit(X, y, epochs=3, initial_epoch=1, batch_size=BATCH, seed=0, progress=False)
        ref["fit_loss"], ref["fit"], ref["step_count"] = np.array(history["loss"]), model.params, model.optimizer.step
        ref["dtype"] = model.dtype
        refs[name] = ref
        inputs.update({f"{name}/X": X, f"{name}/y": y, f"{name}/Xt": Xt})
    np.savez(root / "inputs.npz", **inputs)
    env = dict(os.environ, PYTHONPATH="")  # the BLAS settings symbp made are inherited: same kernels
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(root / "inputs.npz"), json.dumps(list(CASES)),
                           str(root / "out.npz")], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(root / "out.npz") as out:
        got = {k: out[k] for k in out.files}
    return root, refs, got


def _close(a, b, dtype):
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_predictions_match_the_model(exported, name):
    _, refs, got = exported
    ref = refs[name]
    _close(got[f"{name}/logits"], ref["logits"], ref["dtype"])
    np.testing.assert_array_equal(got[f"{name}/predict"], ref["predict"])
    _close(got[f"{name}/evaluate"][0], ref["evaluate"][0], ref["dtype"])
    if not np.isnan(ref["evaluate"][1]):
        assert got[f"{name}/evaluate"][1] == ref["evaluate"][1]


def test_one_sgd_step_is_theta_minus_lr_grad(exported):
    """The plain-SGD export's train_step against θ − lr·∂C/∂θ computed by symbp in-process."""
    _, refs, got = exported
    ref = refs["mlp64"]
    assert got["mlp64/step_loss"] == pytest.approx(ref["step_loss"], rel=1e-12)
    for p, theta in ref["params"].items():
        np.testing.assert_allclose(got[f"mlp64/step/{p}"], theta - LR_STEP * ref["grads"][p], rtol=1e-12, atol=1e-14)
        assert not np.array_equal(got[f"mlp64/step/{p}"], theta)  # the step moved every parameter


@pytest.mark.parametrize("name", list(CASES))
def test_fit_follows_model_fit(exported, name):
    """Two more epochs (same batches, optimizer state and step carried in weights.npz) end at
    the parameters model.fit reaches, with the same per-epoch losses."""
    _, refs, got = exported
    ref = refs[name]
    _close(got[f"{name}/fit_loss"], ref["fit_loss"], ref["dtype"])
    for p, theta in ref["fit"].items():
        _close(got[f"{name}/fit/{p}"], theta, ref["dtype"])
    assert int(got[f"{name}/step_count"]) == ref["step_count"]
    assert got[f"{name}/saved_equal"]


def test_folder_holds_no_symbp_import_and_plain_weights(exported):
    root, refs, _ = exported
    for name in CASES:
        folder = root / name
        for py in folder.glob("*.py"):
            imported = set()
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, ast.Import):
                    imported.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    imported.add("." * node.level + (node.module or ""))
            assert imported <= {"__future__", "math", "numpy", "numba", "numba.core.extending", "numba.extending",
                                "numba.np.linalg", "os", "tempfile", "pathlib", ".", "._blas", "._dots", "._guard", "._sync",
                                "._targets", "._arrays", "._model"}, (py.name, imported)
        with np.load(folder / "weights.npz", allow_pickle=False) as npz:  # plain arrays, no pickles
            assert set(refs[name]["params"]) <= set(npz.files)
        assert (folder / MARKER).is_file()


# -- where the folder goes, and what cannot be exported ------------------------------------------
@pytest.fixture(scope="module")
def small_model(session_cache_dir):
    return sb.compile(CASES["mlp64"][0](), dtype="float64", seed=0, cache_dir=session_cache_dir)


def test_refuses_a_folder_that_is_not_an_export(tmp_path, small_model):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous symbp export"):
        export_kernels(small_model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_replaces_a_previous_export_and_an_empty_folder(tmp_path, small_model):
    target = tmp_path / "net"
    target.mkdir()
    export_kernels(small_model, target)  # empty: fine
    old = dict(np.load(target / "weights.npz"))
    small_model.params["W1"] = small_model.params["W1"] + 1.0
    export_kernels(small_model, target)  # a previous export: replaced
    with np.load(target / "weights.npz") as npz:
        np.testing.assert_array_equal(npz["W1"], old["W1"] + 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


@pytest.mark.parametrize("bad", ["my-net", "3net", "class", "numpy", "symbp_net"])
def test_refuses_a_name_that_cannot_be_imported(tmp_path, small_model, bad):
    with pytest.raises(ValueError, match=repr(bad)):
        export_kernels(small_model, tmp_path / bad)
    assert not (tmp_path / bad).exists()


@pytest.mark.parametrize("source, named", [
    ("import scipy\n", "import scipy"),
    ("from symbp.read.walkthrough import walkthrough\n", "from symbp.read.walkthrough import"),
    ("import symbp.backends.cpu.blas\n", "import symbp.backends.cpu.blas"),
    ("from symbp.backends.cpu.blas import sgemm as gemm, cgemm\n", "cgemm"),
    ("x = symbp.backends\n", "'symbp'"),
])
def test_an_unknown_import_fails_naming_it(source, named):
    with pytest.raises(ExportError, match=named.replace(".", r"\.")):
        _rewrite(source, "gen.py", {"symbp.backends.cpu.blas": ("._blas", {"sgemm"})})


def test_imports_are_rewritten_in_place():
    text = "import numpy as np\nfrom symbp.backends.cpu.blas import (\n    sgemm as gemm,\n)\nx = 1\n"
    out = _rewrite(text, "gen.py", {"symbp.backends.cpu.blas": ("._blas", {"sgemm"})})
    assert out == "import numpy as np\nfrom ._blas import sgemm as gemm\nx = 1\n"


def test_cli_exports_a_checkpoint(tmp_path, small_model, monkeypatch):
    """``symbp export run.npz --kernels -o DIR`` writes the same folder."""
    from symbp import cli

    small_model.save(tmp_path / "run.npz")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "run.npz", "--kernels", "-o", "clinet"]) == 0
    with np.load(tmp_path / "clinet" / "weights.npz") as npz:
        for p, theta in small_model.params.items():
            np.testing.assert_array_equal(npz[p], theta)
    assert (tmp_path / "clinet" / "__init__.py").is_file() and (tmp_path / "clinet" / "_model.py").is_file()
