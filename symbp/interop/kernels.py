"""A compiled model in, a folder that runs it without symbp out: ``export_kernels(model, "mynet")``.

The folder is a Python package; it needs NumPy and Numba, and SciPy because Numba's BLAS
binding (which the generated matrix products call, through ``_blas.py``) loads SciPy's BLAS.
It does not need symbp or SymPy::

    mynet/
      __init__.py   predict, decision_function, predict_proba, evaluate, train_step, fit,
                    load_weights, save_weights (the wrapper below, filled in for this model)
      _model.py     the generated forward pass, loss and backward pass (symbp's own file)
      _train.py     the generated training epoch with the optimizer's update fused in
      _blas.py      a copy of symbp/backends/cpu/blas.py (GEMM callable from @njit code)
      _dots.py      a copy of symbp/backends/cpu/dots.py (a conv weight gradient's small GEMM)
      _guard.py     a copy of symbp/backends/cpu/guard.py (the one-batch step's checks)
      _sync.py      a copy of symbp/backends/cpu/sync.py (what data-parallel kernels call; a
                    network with BatchNorm or Dropout imports it, nothing in the folder runs it)
      _targets.py   a copy of symbp/backends/cpu/targets.py (a batch's targets: rows, or labels)
      _arrays.py    a copy of symbp/backends/cpu/arrays.py (the kernels' scratch arrays, flat views)
      weights.npz   the parameters (and the optimizer's state and step), plain arrays
      README.md     what is in the folder

The generated files are copied, not regenerated: their imports are read with :mod:`ast` and
those that name symbp (``symbp.backends.cpu.blas``, ``.dots``, ``.guard``, ``.sync``, ``.targets`` and ``.arrays``, the model
module a training module imports by its cache name) are pointed at the copies in the folder.  An import this module does not
know how to replace fails the export, naming it, so a change to the generator shows up as a
clear error rather than a folder that breaks on import.

Writing is all or nothing: the folder is built beside ``out_dir`` under a temporary name and
renamed into place.  An existing ``out_dir`` is replaced only when it is empty or a previous
export (it holds the marker file ``.symbp-kernels``); anything else is refused.
"""

from __future__ import annotations

import ast
import importlib
import json
import keyword
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import cache
from .._version import __version__

MARKER = ".symbp-kernels"  # written into every export: a folder holding it may be replaced
_ALLOWED = {"__future__", "math", "numpy", "numba"}  # what the copied files may import as they are


class ExportError(ValueError):
    """The model's generated code cannot be exported as it stands (named in the message)."""


def export_kernels(model, out_dir: str | os.PathLike, *, optimizer=None) -> Path:
    """Write ``model``'s kernels and weights into the folder ``out_dir``; returns its path.

    Parameters
    ----------
    model : symbp.Model
        A compiled model (a CUDA model is exported with its CPU kernels, generated here).
    out_dir : path
        The folder to create; its name is the package name (``import mynet``), so it must be
        a Python identifier.  An existing empty folder or previous export is replaced.
    optimizer : symbp.Optimizer, optional
        Whose training step goes into the folder; by default the model's own (the one it
        last trained or was loaded with), else ``SGD(lr=0.01)`` as :meth:`Model.fit` uses.

    Raises
    ------
    FileExistsError
        ``out_dir`` exists and is neither empty nor a previous export.
    ExportError
        A generated file imports something this exporter does not know how to replace.
    """
    from ..train.model import Model
    from ..train.optim import SGD, Optimizer

    if not isinstance(model, Model):
        raise TypeError(f"export_kernels takes a compiled symbp.Model, got {type(model).__name__}")
    opt = optimizer if optimizer is not None else model.optimizer or SGD(lr=0.01)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"optimizer must be a symbp optimizer such as sb.SGD(lr=0.1), got {type(opt).__name__}")
    out = _check_target(out_dir)
    model = _cpu_model(model)
    params = {name: np.array(arr, dtype=model.dtype) for name, arr in zip(model.kernels.PARAMS, model._param_list())}
    files = _package_files(model, model._train_kernels(opt), opt, out.name)

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        with open(tmp / "weights.npz", "wb") as fh:
            np.savez(fh, **params, **_optimizer_arrays(opt, model))
        (tmp / MARKER).write_text(json.dumps({"symbp": __version__, "network": model.network.name,
                                               "dtype": model.dtype.name, "optimizer": repr(opt)}) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- where the folder goes ---------------------------------------------------------------------
def _check_target(out_dir) -> Path:
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a string or a path, got {type(out_dir).__name__}")
    out = Path(out_dir).absolute()
    name = out.name
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"the export folder's name {name!r} is the package name (import {name}), so it must be a "
                         f"Python identifier: letters, digits and _, not starting with a digit")
    if name in {"numpy", "numba", "scipy"} | set(getattr(sys, "stdlib_module_names", ())) or \
            name.startswith(("symbp", "sympy")):
        raise ValueError(f"the export folder's name {name!r} would shadow the module {name!r} when imported; "
                         f"choose another name")
    if not out.parent.is_dir():
        raise ValueError(f"cannot export to {out}: the directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot export to {out}: the directory {out.parent} is not writable")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"cannot export to {out}: it is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"cannot export to {out}: the folder exists, is not empty and is not a previous "
                              f"symbp export (no {MARKER} file); name a new or empty folder")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old export is moved aside first and removed
    after, so a reader sees the old folder or the new one (or, for an instant, none)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cpu_model(model):
    """The model itself, or for a CUDA model its CPU twin with the same parameters."""
    from ..compile import compile as compile_model
    from ..train.model import Model

    if type(model) is Model:
        return model
    twin = compile_model(model.network, dtype=model.dtype.name, seed=None, cache_dir=model.source_path.parent)
    twin.params = {name: np.array(arr, dtype=model.dtype) for name, arr in model.params.items()}
    return twin


def _optimizer_arrays(opt, model) -> dict[str, np.ndarray]:
    """The optimizer's step and state as ``step`` and ``state/<param>/<name>`` arrays."""
    arrays = {"step": np.array(opt.step, np.int64)}
    for pname, shape in zip(model.kernels.PARAMS, model._param_shapes):
        for sname in opt.state_names:
            arr = opt.state.get(pname, {}).get(sname)
            arr = np.full(shape, opt.state_init(sname)) if arr is None else np.broadcast_to(arr, shape)
            arrays[f"state/{pname}/{sname}"] = np.ascontiguousarray(arr, dtype=model.dtype)
    return arrays


# -- the files ---------------------------------------------------------------------------------
def _package_files(model, train, opt, package: str) -> dict[str, str]:
    """File name -> text of every Python and text file of the folder (``train``: the
    loaded training module for ``opt``)."""
    from ..backends.cpu import KERNEL_HELPERS

    _check_train_module(train, model.kernels, opt)
    train_path = Path(train.__file__)
    helpers, copies = {}, {}  # symbp's modules the generated code imports -> their copies in the folder
    for name in KERNEL_HELPERS:
        mod, copy = importlib.import_module(f"symbp.backends.cpu.{name}"), f"_{name}"
        where = mod.__name__.replace(".", "/") + ".py"  # the generated code imports it by this name
        text = Path(mod.__file__).read_text(encoding="utf-8")
        _rewrite(text, where, {})  # it must import only what the folder has
        helpers[mod.__name__] = (f".{copy}", _top_level_names(text, where))
        copies[f"{copy}.py"] = f"# Copied from symbp {__version__} ({where}) by symbp's kernel export.\n" + text
    model_text = _generated_text(model.source_path)
    train_text = _generated_text(train_path)
    train_map = {**helpers,
                 cache.module_name(model.source_path): ("._model", _top_level_names(model_text, model.source_path.name))}
    return {
        "__init__.py": _wrapper(model, opt, package),
        "_model.py": _rewrite(model_text, model.source_path.name, helpers),
        "_train.py": _rewrite(train_text, train_path.name, train_map),
        **copies,
        "README.md": _readme(model, opt, package),
    }


def _generated_text(path: Path) -> str:
    """A generated module's text without symbp's stamp and checksum lines, checked intact."""
    if not cache.is_intact(path):
        raise ExportError(f"the generated module {path} is damaged or was edited (its checksum does not match); "
                          f"compile the model again to regenerate it")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith(("# symbp-checksum: ", "# symbp-generator: "))]
    header = f"# Copied from {path.name} (symbp {__version__}) by symbp's kernel export; imports point into this folder.\n"
    return header + "".join(kept)


def _top_level_names(text: str, where) -> set[str]:
    """Names a module defines at its top level (what another file may import from it)."""
    names = set()
    for node in ast.parse(text, str(where)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _rewrite(text: str, where, mapping: dict[str, tuple[str, set[str]]]) -> str:
    """``text`` with each ``from <module> import …`` whose module is in ``mapping`` pointed at
    the relative module mapped to (every imported name must exist there).  Imports of
    :data:`_ALLOWED` modules stay; any other import, or a mapped module imported another way,
    raises :class:`ExportError` naming it.  A use of the names ``symbp`` or ``sympy`` does too."""
    tree = ast.parse(text, str(where))
    lines = text.splitlines(keepends=True)
    edits = []  # (first line, last line, indent, new text), 0-based line numbers
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in _ALLOWED:
                    raise ExportError(f"{where}, line {node.lineno}: 'import {alias.name}' is not something the "
                                      f"export knows how to replace (it may import only {', '.join(sorted(_ALLOWED))}, "
                                      f"and symbp's BLAS or model module with 'from … import …')")
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.level == 0 and module.split(".")[0] in _ALLOWED:
                continue
            if module not in mapping:
                raise ExportError(f"{where}, line {node.lineno}: 'from {module} import …' is not something the "
                                  f"export knows how to replace (known: {', '.join(sorted(mapping)) or 'none'})")
            target, available = mapping[module]
            missing = [a.name for a in node.names if a.name not in available]
            if missing:
                raise ExportError(f"{where}, line {node.lineno}: imports {', '.join(missing)} from {module}, "
                                  f"which its copy in the export does not define")
            new = ast.ImportFrom(module=target.lstrip("."), names=node.names, level=len(target) - len(target.lstrip(".")))
            first, last = node.lineno - 1, node.end_lineno - 1
            prefix = lines[first].encode("utf-8")[: node.col_offset].decode("utf-8")
            suffix = lines[last].encode("utf-8")[node.end_col_offset:].decode("utf-8")
            if prefix.strip() or suffix.strip():
                raise ExportError(f"{where}, line {node.lineno}: the import shares its line with other code")
            edits.append((first, last, prefix, ast.unparse(new)))
        elif isinstance(node, ast.Name) and node.id in ("symbp", "sympy"):
            raise ExportError(f"{where}, line {node.lineno}: uses the name {node.id!r}, which the export cannot provide")
    for first, last, indent, new in sorted(edits, reverse=True):
        lines[first : last + 1] = [indent + new + "\n"]
    out = "".join(lines)
    ast.parse(out, str(where))  # the rewritten text must still be Python
    return out


def _check_train_module(train, kernels, opt) -> None:
    """The training module's argument lists are what the wrapper will pass."""
    states = tuple(f"{s}_{p}" for p in kernels.PARAMS for s in opt.state_names)
    if tuple(getattr(train, "STATES", ())) != states or tuple(getattr(train, "HYPER", ())) != tuple(opt.hyper):
        raise ExportError(f"the training module {train.__file__} expects state {getattr(train, 'STATES', None)} and "
                          f"hyper-parameters {getattr(train, 'HYPER', None)}, the optimizer has {states} and "
                          f"{tuple(opt.hyper)}")
    if not hasattr(train, "train_epoch"):
        raise ExportError(f"the training module {train.__file__} has no train_epoch")


def _arguments(function) -> tuple[str, ...]:
    """The argument names of a generated ``@njit`` function."""
    code = getattr(function, "py_func", function).__code__
    return code.co_varnames[: code.co_argcount]


def _wrapper(model, opt, package: str) -> str:
    """The package's ``__init__.py``: :data:`_WRAPPER` with this model's facts filled in."""
    kernels, net = model.kernels, model.network
    workspace = [name for name, _ in kernels.WORKSPACE]
    logits_args = _arguments(kernels.logits)[1 + len(kernels.PARAMS):]
    unknown = [a for a in logits_args if a not in workspace]
    if _arguments(kernels.logits)[1 : 1 + len(kernels.PARAMS)] != tuple(kernels.PARAMS) or unknown:
        raise ExportError(f"the model module's logits takes {_arguments(kernels.logits)}, not X, the parameters "
                          f"{kernels.PARAMS} and work buffers")
    facts = {
        "NAME": net.name,
        "INPUTS": net.inputs,
        "OUTPUTS": net.outputs,
        "TASK": net.loss.task,
        "PARAM_SHAPES": dict(zip(kernels.PARAMS, model._param_shapes)),
        "LOGITS_BUFFERS": tuple(logits_args),
        "OPTIMIZER": repr(opt),
        "HYPER": dict(opt.hyper),
        "STATE_NAMES": tuple(opt.state_names),
        "STATE_INIT": {s: float(opt.state_init(s)) for s in opt.state_names},
    }
    constants = "\n".join(f"{k} = {v!r}" for k, v in facts.items())
    return _WRAPPER.format(package=package, net=net.name, dtype=model.dtype.name, version=__version__,
                           optimizer=repr(opt), constants=constants)


def _readme(model, opt, package: str) -> str:
    return (f"# {package}: {model.network.name} ({model.dtype.name}), exported by symbp {__version__}\n\n"
            f"Standalone Numba kernels: needs NumPy, Numba and SciPy (Numba's BLAS binding loads SciPy's BLAS "
            f"for the matrix products), not symbp or SymPy. From the folder that holds `{package}/`:\n\n"
            f"```python\nimport {package}\n{package}.predict(X)              # as symbp's model.predict\n"
            f"{package}.decision_function(X)    # the logits\n"
            f"{package}.fit(X, y, epochs=5, batch_size=32)   # {opt!r}, fused into _train.py\n"
            f"{package}.save_weights()          # back into weights.npz\n```\n\n"
            f"`_model.py` and `_train.py` are symbp's generated files (their headers hold the formulas); "
            f"`_blas.py` is symbp's GEMM binding, `_dots.py` the small GEMM of a conv's weight gradient, "
            f"`_guard.py` its step checks, `_targets.py` how a batch's targets are read, `_arrays.py` the "
            f"kernels' scratch arrays and flat views, "
            f"`_sync.py` what a data-parallel fit's kernels call (unused here). Numba caches the compiled code in "
            f"`__pycache__/` here.\n")


# The package's __init__.py; {constants} are this model's facts, written as Python literals.
_WRAPPER = '''"""{package}: the {net} network ({dtype}) as standalone Numba kernels, exported by symbp {version}.

Needs NumPy, Numba and SciPy (Numba's BLAS binding, which the matrix products in _blas.py
call, loads SciPy's BLAS); not symbp, not SymPy.  The weights are read from weights.npz
beside this file when the package is imported.

    import {package}
    {package}.predict(X)                  # class labels (raw outputs for regression), as model.predict
    {package}.decision_function(X)        # the logits, (N, outputs)
    {package}.train_step(X, y)            # one update on one batch; returns its loss
    {package}.fit(X, y, epochs=5, batch_size=32, seed=0)   # as model.fit: same batches, same updates
    {package}.save_weights()              # write params (and optimizer state) back to weights.npz

Training uses {optimizer}, fused into _train.py; pass lr= to change the learning rate.
X is (N, features), or (N, C, H, W) for an image network; y as symbp takes it (class labels
or one-hot rows for softmax cross-entropy, (N, outputs) or (N,) values otherwise).
"""

import os
import tempfile
from pathlib import Path

import numpy as np

from . import _model as kernels
from . import _train as train_kernels

{constants}
DTYPE = np.dtype(kernels.DTYPE)
PARAMS = tuple(kernels.PARAMS)
WEIGHTS = Path(__file__).with_name("weights.npz")
_EVAL_CHUNK = 1024  # rows per prediction pass: bounds the work buffers
_LOGITS_AT = [[name for name, _ in kernels.WORKSPACE].index(b) for b in LOGITS_BUFFERS]  # logits' buffers

params = {{}}  # name -> array, in PARAMS order; load_weights() fills it
state = {{}}  # optimizer state: param -> state name -> array
step = 0  # optimizer updates so far (Adam's bias correction counts them)
_buffers = {{}}


def load_weights(path=None):
    """Read the parameters (and optimizer state) from ``path`` (default: weights.npz beside
    this file) into this module; returns the parameters, a dict of arrays."""
    global step
    with np.load(WEIGHTS if path is None else path, allow_pickle=False) as npz:
        found = {{name: npz[name] for name in npz.files}}
    loaded = {{}}
    for name, shape in PARAM_SHAPES.items():
        if name not in found:
            raise ValueError(f"the weights file has no {{name!r}}; it holds {{sorted(found)}}")
        if found[name].shape != tuple(shape):
            raise ValueError(f"{{name}} has shape {{found[name].shape}} in the weights file, expected {{tuple(shape)}}")
        loaded[name] = np.ascontiguousarray(found[name], dtype=DTYPE)
    params.clear()
    params.update(loaded)
    state.clear()
    for name, shape in PARAM_SHAPES.items():
        state[name] = {{s: np.ascontiguousarray(found.get(f"state/{{name}}/{{s}}", np.full(shape, STATE_INIT[s])), dtype=DTYPE)
                       for s in STATE_NAMES}}
    step = int(found.get("step", 0))
    return params


def save_weights(path=None):
    """Write the parameters, optimizer state and step to ``path`` (default: weights.npz
    beside this file) atomically; returns the path."""
    path = Path(WEIGHTS if path is None else path)
    arrays = dict(params, step=np.array(step, np.int64))
    for name, states in state.items():
        for s, arr in states.items():
            arrays[f"state/{{name}}/{{s}}"] = arr
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{{path.name}}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _inputs(X):
    X = np.asarray(X)
    if isinstance(INPUTS, tuple):
        if X.ndim == len(INPUTS):
            X = X[None]
        if X.ndim == len(INPUTS) + 1 and X.shape[1:] == INPUTS:
            X = X.reshape(X.shape[0], -1)
    width = int(np.prod(INPUTS))
    if X.ndim == 1 and X.shape[0] == width:
        X = X[None]
    if X.ndim != 2 or X.shape[1] != width or X.shape[0] == 0:
        image = f" or (N, {{', '.join(map(str, INPUTS))}})" if isinstance(INPUTS, tuple) else ""
        raise ValueError(f"X must have shape (N, {{width}}){{image}} with N >= 1, got {{X.shape}}")
    X = np.ascontiguousarray(X, dtype=DTYPE)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or inf")
    return X


def _targets(y, n):
    y = np.asarray(y)
    if y.shape[:1] != (n,):
        raise ValueError(f"X has {{n}} samples but y has shape {{y.shape}}")
    if TASK == "multiclass" and y.ndim == 1:
        labels = y.astype(np.int64)
        if (labels != y).any() or (labels < 0).any() or (labels >= OUTPUTS).any():
            raise ValueError(f"y holds class labels, which must be whole numbers in 0..{{OUTPUTS - 1}}")
        T = np.zeros((n, OUTPUTS), DTYPE)
        T[np.arange(n), labels] = 1
        return T
    T = y.reshape(n, 1) if y.ndim == 1 else y
    if T.shape != (n, OUTPUTS):
        raise ValueError(f"y must have shape ({{n}}, {{OUTPUTS}}), got {{y.shape}}")
    T = np.ascontiguousarray(T, dtype=DTYPE)
    if not np.isfinite(T).all():
        raise ValueError("y contains NaN or inf")
    return T


def _workspace(rows):
    """Work buffers for ``rows`` samples, reused across calls."""
    cap = max((c for c in _buffers if c >= rows), default=None)
    if cap is None:
        _buffers.clear()
        _buffers[rows] = [np.empty(tuple(rows if d == "batch" else d for d in shape), DTYPE)
                          for _, shape in kernels.WORKSPACE]
        cap = rows
    return _buffers[cap]


def _sized(rows):
    """The work buffers with their batch dimension cut to exactly ``rows``."""
    return [w[:rows] if shape[0] == "batch" else w for w, (_, shape) in zip(_workspace(rows), kernels.WORKSPACE)]


def _param_list():
    return [params[name] for name in PARAMS]


def _state_list():
    return [state[name][s] for name in PARAMS for s in STATE_NAMES]


def decision_function(X):
    """The network's raw outputs (logits), shape (N, outputs)."""
    X = _inputs(X)
    out = np.empty((X.shape[0], OUTPUTS), DTYPE)
    for start in range(0, X.shape[0], _EVAL_CHUNK):
        chunk = X[start : start + _EVAL_CHUNK]
        ws = _sized(len(chunk))
        out[start : start + len(chunk)] = kernels.logits(chunk, *_param_list(), *(ws[i] for i in _LOGITS_AT))
    return out


def predict_proba(X):
    """Class probabilities: softmax of the logits, or sigmoid for binary cross-entropy."""
    z = decision_function(X).astype(np.float64)
    if TASK == "multiclass":
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    if TASK == "binary":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    raise ValueError("predict_proba needs a classification loss; this network is a regression")


def predict(X):
    """Class labels (softmax cross-entropy), 0/1 per output (binary), raw outputs (regression)."""
    z = decision_function(X)
    if TASK == "multiclass":
        return z.argmax(axis=1)
    if TASK == "binary":
        out = (z > 0).astype(np.int64)
        return out[:, 0] if out.shape[1] == 1 else out
    return z


def _accuracy(rows, correct):
    if TASK == "multiclass":
        return correct / rows
    if TASK == "binary":
        return correct / (rows * OUTPUTS)
    return float("nan")


def evaluate(X, y):
    """(mean loss with the l2 term, accuracy) on a data set; accuracy is NaN for regression."""
    X = _inputs(X)
    T = _targets(y, X.shape[0])
    chunk = min(_EVAL_CHUNK, X.shape[0])
    total, correct = kernels.evaluate(X, T, *_param_list(), *_workspace(chunk), chunk)
    return float(total / X.shape[0] + kernels.penalty(*_param_list())), _accuracy(X.shape[0], correct)


def _epoch(X, T, order, batch_size, lr, mask_seed=0):
    """One pass of the generated training epoch (Dropout's masks under ``mask_seed``); returns
    (Σ loss, correct)."""
    global step
    hyper = dict(HYPER)
    if lr is not None:
        hyper["lr"] = float(lr)
    rows = min(batch_size, X.shape[0])
    Xb = np.empty((rows, X.shape[1]), DTYPE)
    Tb = np.empty((rows, T.shape[1]), DTYPE)
    saved = ([p.copy() for p in _param_list()], [s.copy() for s in _state_list()], step)
    total, correct, bad = 0.0, 0, -1
    # The whole batches in one call, a shorter last batch in a second: train_epoch slices no
    # buffer, so every batch of a call has its buffers' rows.
    whole = len(order) - len(order) % rows
    for lo, hi in ((0, whole), (whole, len(order))):
        if hi == lo or bad >= 0:
            continue
        n = min(rows, hi - lo)
        t, c, done, bad = train_kernels.train_epoch(
            X, T, order[lo:hi], n, np.array(list(hyper.values()), DTYPE), step, mask_seed,
            *_param_list(), *_sized(n), *_state_list(), Xb[:n], Tb[:n])
        total, correct, step = total + t, correct + c, step + int(done)
        bad = lo // rows + bad if bad >= 0 else bad
    if bad >= 0 or not all(np.isfinite(a).all() for a in _param_list() + _state_list()):
        for arr, old in zip(_param_list() + _state_list(), saved[0] + saved[1]):
            arr[...] = old
        step = saved[2]
        raise FloatingPointError(f"the loss or the parameters became NaN or infinite (batch {{bad}}); the "
                                 f"parameters are restored to the start of the epoch: try a smaller lr")
    return total, correct


def train_step(X, y, lr=None):
    """One update on the batch (X, y); returns the batch's loss before the update (with l2)."""
    X = _inputs(X)
    T = _targets(y, X.shape[0])
    total, _ = _epoch(X, T, np.arange(X.shape[0]), X.shape[0], lr)
    return float(total) / X.shape[0]


def fit(X, y, epochs=1, batch_size=32, lr=None, shuffle=True, seed=0, initial_epoch=0):
    """Mini-batch training over epochs ``initial_epoch … epochs − 1``, as symbp's model.fit:
    epoch e visits the rows in the order ``np.random.default_rng([seed, e]).permutation(N)``.

    Returns a dict of per-epoch lists: ``loss`` (mean over the samples, with l2) and, for
    classifiers, ``accuracy``.
    """
    X = _inputs(X)
    T = _targets(y, X.shape[0])
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {{batch_size}}")
    n = X.shape[0]
    history = {{"loss": []}} if TASK == "regression" else {{"loss": [], "accuracy": []}}
    for epoch in range(initial_epoch, epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        # Dropout's masks of the epoch, as symbp's fit draws them
        mask_seed = int(np.random.default_rng([seed, epoch, 1]).integers(2**40))
        total, correct = _epoch(X, T, order, int(batch_size), lr, mask_seed)
        history["loss"].append(float(total) / n)
        if "accuracy" in history:
            history["accuracy"].append(_accuracy(n, correct))
    return history


load_weights()
'''
