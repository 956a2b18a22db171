"""Command line: ``symbp train | explain | walkthrough | graph | report SPEC.toml``, ``symbp paths``,
``symbp cache``, ``symbp export SOURCE -o model.onnx`` (or ``--kernels -o DIR``),
``symbp predict | evaluate run.npz DATA`` (a checkpoint on your data file).

The TOML spec mirrors the Python API (see README): top-level ``inputs``, ``loss``, ``l2``,
``name``; ``[[layers]]`` tables with ``type``, ``units``, ``activation`` and optionally
``activation_params``; an optional ``[train]`` table with ``data`` (and ``labels``, ``target``:
see :mod:`symbp.train.datafiles`), ``epochs``, ``batch_size``, ``lr``, ``seed``, ``dtype``,
``test_size``, ``optimizer``, ``optimizer_params``; an optional ``[walkthrough]``
table with the worked example's ``x``, ``t``, ``seed`` and ``params`` (``W1 = [[…]]``, …).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SPEC_HELP = "a TOML spec, or a checkpoint .npz (model.save, symbp train --save): the trained model"
# The extra that installs each optional package a command may need (pyproject.toml).
EXTRAS = {"matplotlib": "plots", "sklearn": "datasets", "skimage": "hog", "numba_cuda": "cuda", "cupy": "cublas"}
BOOLEAN_OPTIONS = ("nesterov", "amsgrad", "centered")  # the optimizers' on/off switches
TRAIN_DEFAULTS = {"data": "digits", "labels": None, "target": None, "epochs": 20, "batch_size": 32, "lr": 0.1,
                  "seed": 0, "dtype": "float32", "test_size": 0.25, "optimizer": "sgd", "optimizer_params": {}}
WALKTHROUGH_KEYS = ("x", "t", "seed", "params")


def _table(cfg: dict, name: str, known, path: Path) -> dict:
    """The spec's ``[name]`` table (empty when absent); any key outside ``known`` is refused."""
    table = cfg.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [{name}] must be a table")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} in [{name}] (known: {', '.join(known)})")
    return table


def load_spec(path: str | Path) -> dict:
    """Read a TOML spec; errors name the file and the problem."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            cfg = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"spec file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"spec file {path} is a directory") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"spec file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"spec file {path} is not a TOML text file (explain, walkthrough, graph and report "
                         f"also read a checkpoint .npz)") from None
    _table(cfg, "train", TRAIN_DEFAULTS, path)
    example = _table(cfg, "walkthrough", WALKTHROUGH_KEYS, path)
    if "params" in example and not isinstance(example["params"], dict):
        raise ValueError(f"{path}: [walkthrough] params must be a table such as params = {{ W1 = [[…]], b1 = […] }}")
    return cfg


def load_source(path: str | Path):
    """``(cfg, net, model)`` for a command's SPEC argument: a TOML spec (model None), or a
    checkpoint ``.npz`` from ``model.save`` / ``symbp train --save`` (the trained model with
    its parameters and optimizer; cfg holds only the [train] data it was trained on, if recorded)."""
    if Path(path).suffix == ".npz":
        from .compile import load
        from .train import checkpoint

        model = load(path)
        # What it was trained on (symbp train --save records it): its [train] table, as a spec's.
        data = checkpoint.contents(path).meta.get("data")
        return ({"train": data} if data else {}), model.network, model
    cfg = load_spec(path)
    return cfg, network_from_spec(cfg), None


def network_from_spec(cfg: dict):
    """The :class:`~symbp.spec.network.Network` a loaded spec declares (its [train] and
    [walkthrough] tables are for the commands, not the network)."""
    import symbp as sb

    return sb.Network.from_config({k: v for k, v in cfg.items() if k != "walkthrough"})


def data_source(args, cfg: dict, spec: Path, rank: int = 0) -> dict:
    """Where ``symbp train`` reads its data: ``--data``/``--labels``/``--target`` (paths as
    given, from the current folder), else the spec's [train] ``data``/``labels``/``target``
    (paths from the spec's folder, so ``symbp train own/own.toml`` works from anywhere).
    Paths come back absolute: a checkpoint records them, a walkthrough reads them again."""
    train = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    given = {key: getattr(args, key, None) for key in ("data", "labels", "target")}
    if given["data"] is None and given["labels"] is not None:
        raise ValueError("--labels gives the targets of an .npy named by --data: give --data X.npy too")
    from_flags = given["data"] is not None
    source = given if from_flags else {key: train[key] for key in ("data", "labels", "target")}
    base = Path.cwd() if from_flags else spec.absolute().parent
    # A path with {rank} names one shard per process (data-parallel training, sharded).
    source["sharded"] = isinstance(source["data"], str) and "{rank}" in source["data"]
    if source["sharded"]:
        source["pattern"] = source["data"]
    for key in ("data", "labels"):
        value = source[key]
        if value is None or (key == "data" and value == "digits"):
            continue
        if not isinstance(value, str):
            raise ValueError(f"{spec}: [train] {key} must be a file name, got {value!r}")
        if "{rank}" in value:
            value = value.replace("{rank}", str(rank))
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            where = "" if from_flags else f" (the spec's {key} = {value!r}, read from the spec's folder {base})"
            raise FileNotFoundError(f"{'data' if key == 'data' else 'labels'} file {path} does not exist{where}")
        source[key] = str(path.resolve())
    return source


def load_data(source: dict, seed: int, test_size: float, classify: bool = True):
    """``(X_train, X_held_out, y_train, y_held_out, description)`` of ``source`` (see
    :func:`data_source`; read by :mod:`symbp.train.datafiles`), split with ``seed``;
    stratified by class for a classifier."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from symbp.train.datafiles import read_data

    data = read_data(source["data"], source.get("labels"), source.get("target"))
    y = data.y
    stratify = y if classify and y.ndim == 1 and np.issubdtype(y.dtype, np.integer) else None
    if stratify is not None and np.unique(y, return_counts=True)[1].min() < 2:
        stratify = None  # a class with one sample cannot be on both sides
    try:
        parts = train_test_split(data.X, y, test_size=test_size, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise ValueError(f"cannot split {data.source} ({len(y)} samples) with test_size={test_size}: {err}") from None
    return (*parts, data.source)


def _train(args) -> int:
    """``symbp train``; under ``mpiexec``/``srun`` every process trains its part of each batch
    (data-parallel, :mod:`symbp.distributed`) and rank 0 alone prints and writes."""
    import contextlib
    import io

    from symbp import distributed

    comm = distributed.world()
    rank = 0 if comm is None else comm.Get_rank()
    quiet = contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        with distributed.together(comm):  # a bad spec or shard on one process stops them all
            run = _train_setup(args, comm)
        print("compiling the kernels …", end="", flush=True)
        Xtr, _, ytr, _ = run["data"]
        run["model"], run["compiled"] = _compile_for_training(run["net"], run["opts"], run["optimizer"], Xtr, ytr,
                                                              comm, run["sharded"])
        print(f" {run['compiled']['seconds']:.1f} s", flush=True)
        return _train_run(args, run, comm)


def _train_setup(args, comm) -> dict:
    """Everything before the first epoch, each check before minutes of training: the spec,
    the data (this process's shard when the data path has ``{rank}``), the output paths,
    the compiled modules."""
    cfg = load_spec(args.spec)
    opts = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    for key in ("epochs", "batch_size", "lr", "seed", "dtype"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    rank = 0 if comm is None else comm.Get_rank()
    source = data_source(args, cfg, Path(args.spec), rank)
    sharded, pattern = source.pop("sharded"), source.pop("pattern", None)
    if sharded and comm is None:
        raise ValueError(f"the data path {pattern!r} names a shard per process ({{rank}}): start the "
                         "processes with mpiexec -n N (or srun -n N)")
    # Where the curves and the checkpoint go is checked before minutes of training, not after.
    if args.plot and rank == 0:
        from symbp._output import check_output_path
        from symbp.read.plots import _pyplot

        _pyplot()  # matplotlib is there
        check_output_path(args.plot, (".png", ".svg", ".pdf"), "plot")
    if args.save and rank == 0:
        from symbp.train.checkpoint import checkpoint_path

        checkpoint_path(args.save)
    net = network_from_spec(cfg)
    optimizer, lr_from = train_optimizer(cfg, args.optimizer, args.lr)
    Xtr, Xte, ytr, yte, described = load_data(source, opts["seed"], opts["test_size"], net.loss.task != "regression")
    ranks = "" if comm is None else f" on each of {comm.Get_size()} processes" if sharded else ""
    print(f"data: {described}: {len(ytr)} samples to train on, {len(yte)} held out{ranks}")
    check_data(net, described, (Xtr, ytr), (Xte, yte))
    if comm is not None:
        print(f"data-parallel: {comm.Get_size()} processes, each computing its part of every batch of "
              f"{opts['batch_size']}" + (" from its own shard" if sharded else ""))
    print(f"optimizer: {optimizer.describe()}; lr {optimizer.lr:g} ({lr_from})")
    return {"opts": opts, "source": source, "sharded": sharded, "net": net, "optimizer": optimizer,
            "data": (Xtr, Xte, ytr, yte)}


def _train_run(args, run: dict, comm) -> int:
    import symbp as sb
    from symbp import distributed

    model, optimizer, opts, net = run["model"], run["optimizer"], run["opts"], run["net"]
    Xtr, Xte, ytr, yte = run["data"]
    rank = 0 if comm is None else comm.Get_rank()
    start_loss = model.evaluate(Xtr, ytr)[0]
    # The bar starts once everything is compiled, so its rate and time left are the epochs'.
    bar = [] if args.quiet or rank != 0 else [sb.train.callbacks.ProgressBar(opts["epochs"])]
    start = time.perf_counter()
    history = model.fit(Xtr, ytr, optimizer=optimizer, batch_size=opts["batch_size"], epochs=opts["epochs"],
                        validation_data=(Xte, yte), seed=opts["seed"], progress=False, callbacks=bar,
                        comm=comm, sharded=run["sharded"])
    trained = time.perf_counter() - start
    end_loss = model.evaluate(Xtr, ytr)[0]
    held_out = _held_out(model, Xte, yte, comm if run["sharded"] else None)
    with distributed.together(comm):  # a full disk on rank 0 stops every process, with its message
        if rank != 0:
            return 0
        if args.plot:
            import matplotlib.pyplot as plt

            plt.close(history.plot(args.plot, title=f"{net.name}: {optimizer.describe()}"))
            print(f"curves: {args.plot}")
        if args.save:
            from symbp.train import checkpoint

            print(f"checkpoint: {checkpoint.save(model, args.save, data=run['source'])}")
        print(f"model: {net!r}")
        _print_summary(model, history, run["compiled"], trained, held_out)
        if not end_loss < start_loss:
            print(f"warning: the training loss ended at {end_loss:.4g}, no lower than where it started "
                  f"({start_loss:.4g}): the learning rate {optimizer.lr:g} is probably too large; try a smaller --lr",
                  file=sys.stderr)
    return 0


def _held_out(model, Xte, yte, comm) -> tuple[float, float, int, str]:
    """(score, loss, samples, what was scored) of the held-out data: a sharded run's parts on
    every process together (accuracy and loss; R² is rank 0's part)."""
    classify = model.network.loss.task != "regression"
    loss, accuracy = model.evaluate(Xte, yte)
    # A classifier's score is that accuracy (Model.score): one pass over the data, not two.
    score, rows = accuracy if classify else model.score(Xte, yte), len(yte)
    if comm is None:
        return score, loss, rows, f"{rows} samples not trained on"
    every = comm.allgather((score * rows, loss * rows, rows))
    total = sum(r for _, _, r in every)
    if classify:
        score = sum(s for s, _, _ in every) / total
    loss = sum(l_ for _, l_, _ in every) / total
    return score, loss, total, (f"{total} samples not trained on, the held-out parts of {comm.Get_size()} shards"
                                + ("" if classify else "; R² of rank 0's part"))


def check_data(net, described: str, *parts) -> None:
    """Refuse data the network cannot take (its width, its targets) before anything compiles;
    the error names the file."""
    import numpy as np

    from symbp.train.data import as_inputs, as_targets

    for X, y in parts:
        try:
            X = as_inputs(X, net.inputs, np.dtype(np.float64))
            as_targets(y, X.shape[0], net.output_shape, net.loss.task, np.dtype(np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{described} does not fit the network: {err}") from None


def _compile_for_training(net, opts: dict, optimizer, X, y, comm=None, sharded: bool = False):
    """The model, compiled before the progress bar starts (so its first epoch is an epoch):
    its modules generated or read from the cache, and Numba's JIT run on one batch of a
    throwaway copy (on every process of ``comm``: the data-parallel kernels).
    Returns (model, {module path: role, ..., "seconds": s, "new": n})."""
    import symbp as sb
    from symbp import cache
    from symbp.train.optim import optimizer_from_config

    start, writes = time.perf_counter(), dict(cache.WRITES)
    model = sb.compile(net, dtype=opts["dtype"], seed=opts["seed"])
    rows = min(opts["batch_size"], len(y))
    warm = sb.compile(net, dtype=opts["dtype"], seed=opts["seed"])  # the same modules, its own weights
    warm.fit(X[:rows], y[:rows], optimizer=optimizer_from_config(optimizer.to_config()), batch_size=rows,
             epochs=1, validation_data=(X[:rows], y[:rows]), progress=False, comm=comm, sharded=sharded)
    modules = {Path(model.source_path): "forward pass and loss"}
    train_module = getattr(model._train_kernels(optimizer), "__file__", None)
    if train_module:
        modules[Path(train_module)] = f"backward pass with the {type(optimizer).__name__} update fused in"
    # The modules this run wrote; the others came from the cache.
    new = [p for p in modules if cache.WRITES.get(p.resolve(), 0) > writes.get(p.resolve(), 0)]
    return model, {"modules": modules, "new": new, "seconds": time.perf_counter() - start}


def _print_summary(model, history, compiled: dict, trained: float, held_out: tuple) -> None:
    """What ``symbp train`` made: the generated modules, where the time went, and the scores
    (the training set's from the last epoch, the held-out set's once, with what it is)."""
    print("generated modules:")
    for path, role in compiled["modules"].items():
        print(f"  {path}  ({role}; {'new' if path in compiled['new'] else 'from the cache'})")
    how = (f"derive, generate and JIT-compile {len(compiled['new'])} new module{'s' * (len(compiled['new']) != 1)}"
           if compiled["new"] else "load the cached modules and JIT-compile or load Numba's cached code")
    epochs = len(history.epoch)
    print(f"time: {compiled['seconds']:.1f} s to {how}, then {trained:.1f} s for {epochs} epoch{'s' * (epochs != 1)}")
    metrics = history.history
    if epochs:
        part = f"loss {metrics['loss'][-1]:.4f}" + (f", accuracy {metrics['accuracy'][-1]:.4f}"
                                                   if "accuracy" in metrics else "")
        print(f"training set: {part} (the last epoch's, averaged while the weights changed)")
    classify = model.network.loss.task != "regression"
    score, loss, _, what = held_out
    print(f"held-out score: {score:.4f} {'accuracy' if classify else 'R²'}, loss {loss:.4f} "
          f"({what}; val_ in the curves)")


def train_optimizer(cfg: dict, text: str | None, lr: float | None = None):
    """``symbp train``'s optimizer and where its learning rate comes from: ``--lr``, else an
    ``lr=`` in ``--optimizer``, else the spec's [train] lr when the optimizer is the spec's
    kind (sgd unless it names another), else the optimizer's own default — an lr tuned for
    SGD (0.1) is far too large for Adam (its default 0.001)."""
    train = cfg.get("train", {})
    opts = {**TRAIN_DEFAULTS, **train}
    name, params = opts["optimizer"], dict(opts["optimizer_params"])
    spec_kind = str(name).lower()
    if text is not None:
        name, params = parse_optimizer(text)
    if lr is not None:
        params["lr"], lr_from = lr, "--lr"
    elif text is not None and "lr" in params:
        lr_from = "--optimizer's lr="
    elif "lr" in params:
        lr_from = "the spec's optimizer_params"
    elif str(name).lower() == spec_kind:
        params["lr"] = opts["lr"]
        lr_from = "the spec's [train] lr" if "lr" in train else "symbp train's default; --lr sets it"
    else:
        optimizer = make_optimizer(name, params)
        return optimizer, f"{type(optimizer).__name__}'s default; --lr sets it"
    return make_optimizer(name, params), lr_from


def spec_optimizer(cfg: dict, text: str | None, always: bool = False):
    """The optimizer ``symbp train`` runs for this spec: ``text`` (``--optimizer``) or the
    [train] table's, with its lr (see :func:`train_optimizer`); None when neither names one,
    unless ``always``."""
    if text is None and "optimizer" not in cfg.get("train", {}) and not always:
        return None
    return train_optimizer(cfg, text)[0]


def _versions() -> str:
    """symbp's version and those of the libraries its generated code depends on."""
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    parts = [f"symbp {__version__}"]
    for package in ("sympy", "numba", "numpy", "numba-cuda"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def make_optimizer(name: str, params: dict):
    """An optimizer from its name (sgd, adam, ...) and keyword arguments; errors name both."""
    import symbp as sb

    kinds = {"sgd": sb.SGD, "adagrad": sb.Adagrad, "rmsprop": sb.RMSprop, "adam": sb.Adam, "adamw": sb.AdamW}
    if str(name).lower() not in kinds:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(kinds)})")
    if not isinstance(params, dict):
        raise ValueError(f"optimizer_params must be a table, got {params!r}")
    kind = kinds[str(name).lower()]
    import inspect

    options = [p for p in inspect.signature(kind.__init__).parameters if p != "self"]
    unknown = [key for key in params if key not in options]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], options, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"optimizer {name}: no option {unknown[0]!r}; {hint}{kind.__name__} takes "
                         f"{', '.join(options)}")
    try:
        return kind(**params)
    except TypeError as err:
        raise ValueError(f"optimizer {name}: {err}") from None


def parse_optimizer(text: str) -> tuple[str, dict]:
    """``"adam:lr=0.05,amsgrad=true"`` → ("adam", {"lr": 0.05, "amsgrad": True})."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"optimizer {text!r}: expected name:key=value,..., got {item!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            params[key.strip()] = low == "true"
        elif key.strip() in BOOLEAN_OPTIONS:
            raise ValueError(f"optimizer {text!r}: {key.strip()} must be true or false, got {value!r}")
        else:
            try:
                params[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"optimizer {text!r}: {key.strip()} must be a number, got {value!r}") from None
    return name.strip(), params


def _paths(args) -> int:
    import matplotlib.pyplot as plt

    from .read.paths import SURFACES, plot_paths, run_paths

    optimizers = [make_optimizer(*parse_optimizer(spec)) for spec in args.optimizer] or [
        make_optimizer("sgd", {"lr": 1e-3}), make_optimizer("sgd", {"lr": 1e-3, "momentum": 0.9}),
        make_optimizer("rmsprop", {"lr": 1e-2}), make_optimizer("adam", {"lr": 5e-2})]
    start = tuple(args.start) if args.start else None
    paths, f = run_paths(args.surface, optimizers, start, args.steps)
    bounds = SURFACES[args.surface][2] if args.surface in SURFACES and not args.auto_bounds else None
    plt.close(plot_paths(paths, f, args.output, bounds=bounds, gif=args.gif))
    for p in paths:
        x, y = p.points[-1]
        print(f"{p.label:36s} {len(p.points) - 1:5d} steps  ends at ({x:.4g}, {y:.4g})  f = {p.values[-1]:.4g}")
    print(f"picture: {args.output}" + (f"  animation: {args.gif}" if args.gif else ""))
    return 0


def _explain(args) -> int:
    import symbp as sb
    from symbp.read.explain import build

    if args.standalone and args.format != "latex":
        raise ValueError("--standalone makes a complete LaTeX document: use it with --format latex")
    cfg, net, model = load_source(args.spec)
    optimizer = spec_optimizer(cfg, args.optimizer)
    if model is not None:
        d = model.derivation
        optimizer = optimizer or model.optimizer  # a checkpoint's own rule unless --optimizer names one
    else:
        d = sb.derive(net)
    try:
        doc = build(d, scalar=args.scalar, optimizer=optimizer)
    except ValueError as err:
        # The reader's advice names its Python argument; here the switch is a flag.
        raise ValueError(str(err).replace("use scalar=False", "leave out --scalar")) from None
    out = {"text": doc.text, "markdown": doc.markdown, "latex": lambda: doc.latex(args.standalone)}[args.format]()
    if args.output:
        from symbp._output import check_output_path, write_atomic

        suffixes = {"text": (".txt",), "markdown": (".md", ".markdown"), "latex": (".tex",)}[args.format]
        path = check_output_path(args.output, suffixes, f"{args.format} explanation")
        write_atomic(path, out if out.endswith("\n") else out + "\n", f"{args.format} explanation")
        print(f"wrote {path}")
    else:
        print(out)
    return 0


def _numbers(values, what: str):
    if values is None:
        return None
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(float(part))
            except ValueError:
                raise ValueError(f"{what} must be numbers, got {part!r}") from None
    return out


def _example(cfg: dict, args, model=None, net=None) -> dict:
    """The worked example's x, t, params and seed, and a line saying where the sample came from.

    Flags first: ``--x``/``--t``; ``--data FILE --row N`` a row of a data file; ``--seed``
    draws the sample (and a spec's parameters) at random, over the spec's [walkthrough] table.
    Then the spec's [walkthrough] table.  A checkpoint's ``model`` gives its trained parameters
    (in float64, like every example) and, when it records what it was trained on (``symbp
    train --save``), row 0 of that data (``--row`` another): a real sample, not noise."""
    table = dict(cfg.get("walkthrough", {}))
    note = None
    if args.seed is not None and any(key in table for key in ("x", "t", "params")):
        drawn = "sample and parameters" if "params" in table else "sample"
        note = f"note: --seed {args.seed} draws the {drawn} at random; the spec's [walkthrough] values are not used"
        table = {}
    if model is not None:
        table = {"params": {k: v.astype("float64") for k, v in model.params.items()}}
    seed = args.seed if args.seed is not None else table.get("seed", 0)
    x = _numbers(args.x, "--x") if args.x is not None else table.get("x")
    t = _numbers(args.t, "--t") if args.t is not None else table.get("t")
    data, row = getattr(args, "data", None), getattr(args, "row", None)
    recorded = cfg.get("train", {}) if model is not None and args.seed is None else {}
    if data is not None and args.x is not None:
        raise ValueError("--x and --data both give the sample: give one of them")
    if x is None and (data is not None or recorded.get("data")):
        source = {"data": data} if data is not None else recorded
        x, label, note = _data_row(source, 0 if row is None else row, net if net is not None else model.network)
        t = label if t is None else t
        if data is None:
            note += " (the data this checkpoint was trained on; --row N picks another, --seed a random one)"
    elif row is not None:
        raise ValueError("--row picks a row of --data FILE (or of the data a checkpoint was trained on): give --data")
    elif model is not None and x is None and args.seed is None:
        note = ("note: a random sample (seed 0): this checkpoint does not record its training data; "
                "--data FILE --row N works a row of yours through")
    if t is not None and isinstance(t, list) and len(t) == 1:
        t = t[0]
    if note:
        print(note)
    return {"x": x, "t": t, "params": table.get("params"), "seed": seed}


def _data_row(source: dict, row: int, net) -> tuple[list, object, str]:
    """Row ``row`` of a data file (see :mod:`symbp.train.datafiles`): (x, its target or None, a
    line saying which row it is)."""
    import math

    from symbp.train.datafiles import read_data

    width = math.prod(net.input_shape)
    data = read_data(source["data"], source.get("labels"), source.get("target"), inputs=width, need_targets=False)
    n = len(data.X)
    if not 0 <= row < n:
        raise ValueError(f"--row {row} is not a row of {data.source}: it has rows 0 to {n - 1}")
    x = data.X[row].reshape(-1)
    if x.size != width:
        raise ValueError(f"{data.source} has {x.size} features per sample; the network takes {width}")
    t = None if data.y is None else data.y[row].tolist()
    shown = "" if t is None else f", target {t}"
    return x.tolist(), t, f"worked example: row {row} of {data.source}{shown}"


def _walkthrough(args) -> int:
    import symbp as sb
    from symbp.read.walkthrough import walkthrough

    cfg, net, model = load_source(args.spec)
    target = sb.compile(net, dtype="float64") if args.kernels else net
    w = walkthrough(target, **_example(cfg, args, model, net))
    w.max_rows = args.max_rows
    print(w.table("markdown" if args.markdown else "text"))
    if args.graph:
        path = w.graph().save(args.graph)
        print(f"\ngraph: {path}")
    return 0 if w.ok else 1


def _graph(args) -> int:
    from symbp.read.graph import graph
    from symbp.read.walkthrough import walkthrough

    cfg, net, model = load_source(args.spec)
    w = walkthrough(net, **_example(cfg, args, model, net))
    collapse = True if args.collapse else False if args.expand else None
    path = graph(w, collapse=collapse).save(args.output)
    print(f"wrote {path}")
    return 0


def _report(args) -> int:
    from symbp.read.report import report

    cfg, net, model = load_source(args.spec)
    output = args.output or f"{Path(args.spec).stem}.html"
    example = _example(cfg, args, model, net)
    if model is not None:
        example["params"] = None  # the report takes a checkpoint's trained parameters from the model
    # A checkpoint is reported as trained: its dtype, parameters and (unless --optimizer) optimizer.
    report(model if model is not None else net, output, dtype=args.dtype, graph=False if args.no_graph else "auto",
           optimizer=spec_optimizer(cfg, args.optimizer), **example)
    print(f"wrote {output}")
    return 0


def _cache(args) -> int:
    from . import cache

    root = cache.cache_dir(args.dir)
    if args.prune or args.clear:
        result = cache.prune(root, everything=args.clear)
        what = "every module" if args.clear else "modules this symbp would not load again"
        print(f"{root}: removed {len(result.removed)} files ({result.freed / 1e6:.1f} MB): {what}; "
              f"{result.kept} modules kept")
        return 0
    if not root.is_dir():
        print(f"{root}: no such directory (nothing cached there yet)")
        return 0
    stale = cache.prune(root, dry_run=True)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
    print(f"{root}: {stale.kept} current modules; {len(stale.removed)} stale, damaged or orphaned files "
          f"({stale.freed / 1e6:.1f} MB of {size / 1e6:.1f} MB)")
    if stale.damaged_code:
        names = ", ".join(f.name for f in stale.damaged_code[:3]) + (", …" if len(stale.damaged_code) > 3 else "")
        print(f"  {len(stale.damaged_code)} of them compiled code whose checksum does not match (damaged): {names}")
    if stale.removed:
        print("  'symbp cache --prune' deletes them")
    return 0


def _export(args) -> int:
    """``symbp export SOURCE -o OUT``: an ONNX file (the format from OUT's suffix or
    ``--format``), or with ``--kernels`` a folder holding a NumPy + Numba module and the weights."""
    fmt = "kernels" if args.kernels else args.format
    if args.kernels and args.format not in (None, "kernels"):
        raise ValueError(f"--kernels writes a folder of kernels, not --format {args.format}: give one of them")
    if fmt is None:
        suffix = Path(args.output).suffix.lower()
        if suffix != ".onnx":
            raise ValueError(f"cannot tell the format from {args.output!r}: name an .onnx file, give --format onnx, "
                             f"or --kernels with a folder")
        fmt = "onnx"
    if fmt == "onnx":  # a bad path is refused before any compiling
        from symbp._output import check_output_path

        check_output_path(args.output, (".onnx",), "ONNX model")
        from symbp.interop.onnx_export import _onnx

        _onnx()  # the onnx package is there
    cfg, net, model = load_source(args.source)
    if model is None:
        import symbp as sb

        train = cfg.get("train", {})
        seed = args.seed if args.seed is not None else train.get("seed", 0)
        model = sb.compile(net, dtype=train.get("dtype", "float32"), seed=seed)
        print(f"note: {args.source} is a spec, so the weights are the untrained initial ones (seed {seed}); "
              f"export a checkpoint (symbp train … --save run.npz) for trained ones")
    if fmt == "kernels":
        from symbp.interop.kernels import export_kernels

        print(f"wrote {export_kernels(model, args.output)}")
        return 0
    path = model.to_onnx(args.output, opset=args.opset)
    shape = ", ".join(map(str, ("N", *net.input_shape)))
    print(f"wrote {path}: ONNX opset {args.opset}, input X ({shape}) float32 -> output logits (N, {net.outputs})")
    return 0


def _trained(path: str, command: str):
    """The model of a checkpoint, for predict and evaluate (a spec has no trained weights)."""
    if Path(path).suffix != ".npz":
        raise ValueError(f"{command} needs a trained model: a checkpoint .npz (symbp train SPEC --save run.npz), "
                         f"got {path}")
    return load_source(path)[2]


def _read_for(model, args, need_targets: bool):
    import math

    from symbp.train.datafiles import read_data

    width = math.prod(model.network.input_shape)
    return read_data(args.data, getattr(args, "labels", None), args.target, inputs=width, need_targets=need_targets)


def prediction_table(model, X) -> tuple[list[str], list[list]]:
    """``(header, rows)`` of ``symbp predict``: the prediction (a class label, 0/1 per output,
    or the raw outputs for regression), then each class's probability for a classifier."""
    import numpy as np

    task, k = model.network.loss.task, model.network.outputs
    pred = np.asarray(model.predict(X)).reshape(len(X), -1)
    names = ["prediction"] if pred.shape[1] == 1 else [f"prediction_{j}" for j in range(pred.shape[1])]
    columns = [pred]
    if task in ("multiclass", "binary"):
        columns.append(model.predict_proba(X))
        names += [f"p_{j}" for j in range(k)] if task == "multiclass" else (
            ["probability"] if k == 1 else [f"probability_{j}" for j in range(k)])
    rows = []
    for i in range(len(X)):
        rows.append([int(v) if task != "regression" and c is pred else float(v) for c in columns for v in c[i]])
    return names, rows


def _predict(args) -> int:
    import csv
    import io

    model = _trained(args.model, "predict")
    data = _read_for(model, args, need_targets=False)
    names, rows = prediction_table(model, data.X)
    delimiter = "\t" if args.output and Path(args.output).suffix.lower() == ".tsv" else ","
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(names)
    writer.writerows([f"{v:.9g}" if isinstance(v, float) else v for v in row] for row in rows)
    if args.output is None:
        sys.stdout.write(buf.getvalue())
        return 0
    from symbp._output import check_output_path, write_atomic

    path = check_output_path(args.output, (".csv", ".tsv"), "predictions")
    write_atomic(path, buf.getvalue(), "predictions")
    print(f"wrote {path}: {len(rows)} rows ({', '.join(names[:4])}{', …' if len(names) > 4 else ''}) "
          f"for {data.source}")
    return 0


def _evaluate(args) -> int:
    model = _trained(args.model, "evaluate")
    data = _read_for(model, args, need_targets=True)
    loss, accuracy = model.evaluate(data.X, data.y)
    print(f"data: {data.source}, {len(data.X)} samples")
    print(f"loss: {loss:.6g}  ({model.network.loss.name}, with the l2 term)")
    if model.network.loss.task == "regression":
        print(f"R²: {model.score(data.X, data.y):.6g}  (1 predicts every target exactly, 0 no better than their mean)")
    else:
        print(f"accuracy: {accuracy:.6g}")
    return 0


def _add_data_flags(cmd, data: str, labels: bool = True) -> None:
    if labels:
        cmd.add_argument("--labels", metavar="NPY", help=f"the targets, as a second .npy, when {data} is an .npy of X")
    cmd.add_argument("--target", metavar="COLUMN", help=f"the target column when {data} is a .csv/.tsv (default: "
                                                        "the last column)")


def _add_example_flags(cmd) -> None:
    cmd.add_argument("--x", nargs="+", metavar="X", help="the sample's inputs (default: the spec's [walkthrough] x, "
                                                         "else random)")
    cmd.add_argument("--t", nargs="+", metavar="T", help="its target: a class label, or one number per output")
    cmd.add_argument("--seed", type=int, help="seed for a random sample and parameters (default 0); wins over the "
                                              "spec's [walkthrough] values")
    cmd.add_argument("--data", metavar="FILE", help="take the sample from a row of this data file (.npz, .npy, "
                                                    ".csv, .tsv); a checkpoint uses the data it was trained on")
    cmd.add_argument("--row", type=int, help="which row of --data (default 0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``symbp`` command line: one subcommand per job, every flag with its help."""
    parser = argparse.ArgumentParser(prog="symbp", description="Backpropagation derived by SymPy, run as Numba kernels.")
    parser.add_argument("--version", action="version", version=_versions(), help="print the versions of symbp and of "
                                                                                 "the libraries it generates code for")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (symbp COMMAND -h "
                                                                                       "for its flags)")
    train = sub.add_parser("train", help="train the network a TOML spec declares")
    train.add_argument("spec", help="path to the TOML spec")
    train.add_argument("--data", metavar="FILE", help="what to train on: digits (scikit-learn's 8x8 digits), an .npz "
                       "with arrays X and y, an .npy of X with --labels y.npy, or a .csv/.tsv with a header row "
                       "(the target: --target, else the last column). Default: the spec's [train] data, read from "
                       "the spec's folder")
    _add_data_flags(train, "--data")
    train.add_argument("--epochs", type=int, help="epochs to train (default: the spec's [train] epochs, else 20)")
    train.add_argument("--batch-size", dest="batch_size", type=int, help="samples per update (default: the spec's, "
                                                                          "else 32)")
    train.add_argument("--lr", type=float, help="learning rate (default: the spec's [train] lr for the spec's "
                                                "optimizer, the optimizer's own default for another --optimizer)")
    train.add_argument("--seed", type=int, help="seed of the initial weights, the split and the shuffling "
                                                "(default: the spec's, else 0)")
    train.add_argument("--dtype", choices=["float32", "float64"], help="the kernels' float type (default: the "
                                                                       "spec's, else float32)")
    train.add_argument("--optimizer", help='e.g. "adam" or "sgd:momentum=0.9,nesterov=true"; its lr: --lr, else '
                                           'lr= here, else the spec\'s lr if it is the spec\'s kind of optimizer, '
                                           "else the optimizer's own default")
    train.add_argument("--plot", metavar="PNG", help="draw loss and accuracy per epoch (needs matplotlib)")
    train.add_argument("--save", metavar="NPZ", help="write a checkpoint after training (sb.load reads it)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    explain = sub.add_parser("explain", help="print the derived formulas for a TOML spec (or a checkpoint .npz)")
    explain.add_argument("spec", help=SPEC_HELP)
    explain.add_argument("--format", choices=["text", "latex", "markdown"], default="text",
                         help="plain Unicode text (default), LaTeX, or Markdown with $$ math")
    explain.add_argument("--scalar", action="store_true", help="also every neuron's formulas with named weights "
                                                               "(layers of at most 10 units)")
    explain.add_argument("--standalone", action="store_true", help="LaTeX: a complete document")
    explain.add_argument("-o", "--output", help="write to this file instead of printing")
    explain.add_argument("--optimizer", help='also its update rule, e.g. "adam" or "sgd:momentum=0.9" (lr as for '
                                             "train); by default the [train] table's optimizer, if any")
    explain.set_defaults(func=_explain)
    walk = sub.add_parser("walkthrough", help="one sample's values, deltas and gradients, each checked against "
                                              "finite differences")
    walk.add_argument("spec", help=SPEC_HELP)
    _add_example_flags(walk)
    walk.add_argument("--kernels", action="store_true", help="also compare with the generated kernels (compiles them)")
    walk.add_argument("--graph", metavar="FILE", help="also draw the computational graph (.svg, .png or .dot)")
    walk.add_argument("--markdown", action="store_true", help="print Markdown tables")
    walk.add_argument("--max-rows", dest="max_rows", type=int, default=16, help="rows per layer or parameter")
    walk.set_defaults(func=_walkthrough)
    gr = sub.add_parser("graph", help="draw one sample's computational graph with Graphviz")
    gr.add_argument("spec", help=SPEC_HELP)
    gr.add_argument("-o", "--output", required=True, help="the picture: .svg, .png or .dot")
    _add_example_flags(gr)
    shape = gr.add_mutually_exclusive_group()
    shape.add_argument("--collapse", action="store_true", help="one node per layer")
    shape.add_argument("--expand", action="store_true", help="one gate per unit (layers of at most 10 units)")
    gr.set_defaults(func=_graph)
    rep = sub.add_parser("report", help="a self-contained HTML page: formulas, kernels, graph, worked example")
    rep.add_argument("spec", help=SPEC_HELP)
    rep.add_argument("-o", "--output", help="the page (.html); default: SPEC's name with .html, here")
    rep.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                     help="the dtype of the kernels the page shows (default float32)")
    rep.add_argument("--optimizer", help="also its update rule (as for explain)")
    rep.add_argument("--no-graph", dest="no_graph", action="store_true", help="leave the graph out")
    _add_example_flags(rep)
    rep.set_defaults(func=_report)
    paths = sub.add_parser("paths", help="draw how optimizers move on a 2-D surface (SymPy derives its gradient)")
    paths.add_argument("surface", help="rosenbrock, beale, saddle, himmelblau, or a formula in x and y")
    paths.add_argument("--optimizer", action="append", default=[], metavar="SPEC",
                       help='repeatable, e.g. --optimizer "adam:lr=0.05" --optimizer "sgd:lr=0.001,momentum=0.9"')
    paths.add_argument("--start", nargs=2, type=float, metavar=("X", "Y"),
                       help="where every path starts (default: the surface's classic start; for a formula the first "
                            "of (-1.5, 1), (1, 1), (0.5, -1.5) where the gradient is not zero)")
    paths.add_argument("--steps", type=int, default=200, help="updates per optimizer (default 200)")
    paths.add_argument("--auto-bounds", dest="auto_bounds", action="store_true", help="fit the view to the paths")
    paths.add_argument("-o", "--output", default="paths.png", help="the picture (PNG)")
    paths.add_argument("--gif", help="also an animation (GIF)")
    paths.set_defaults(func=_paths)
    cch = sub.add_parser("cache", help="what the generated-module cache holds; --prune deletes stale modules")
    cch.add_argument("--dir", help="the cache directory (default: $SYMBP_CACHE_DIR, else generated/ or ~/.cache/symbp)")
    act = cch.add_mutually_exclusive_group()
    act.add_argument("--prune", action="store_true", help="delete modules from other symbp/Numba versions or "
                                                          "generator sources, damaged ones, and orphaned compiled code")
    act.add_argument("--clear", action="store_true", help="delete every generated module")
    cch.set_defaults(func=_cache)
    exp = sub.add_parser("export", help="write a model for serving: an ONNX file, or (--kernels) a folder with a "
                                         "standalone NumPy + Numba module")
    exp.add_argument("source", help="a checkpoint .npz (the trained weights) or a TOML spec (untrained initial weights)")
    exp.add_argument("-o", "--output", required=True, help="the .onnx file, or with --kernels the folder to write")
    exp.add_argument("--format", choices=["onnx", "kernels"], help="what to write (default: from the output's suffix; "
                                                                  "kernels is the same as --kernels)")
    exp.add_argument("--kernels", action="store_true", help="write a folder with a module that needs only NumPy and "
                                                            "Numba (predict and a training step) and the weights")
    exp.add_argument("--opset", type=int, default=17, help="the ONNX operator set version (default 17)")
    exp.add_argument("--seed", type=int, help="for a spec: seed of the initial weights (default: its [train] seed, "
                                              "else 0)")
    exp.set_defaults(func=_export)
    pred = sub.add_parser("predict", help="a trained model's predictions for a data file, as CSV")
    pred.add_argument("model", help="a checkpoint .npz (symbp train SPEC --save run.npz)")
    pred.add_argument("data", help="the samples: an .npz with X (y is ignored), an .npy of X, or a .csv/.tsv with a "
                                   "header (a column beyond the network's inputs is taken as the target and left out)")
    pred.add_argument("--target", metavar="COLUMN", help="a .csv/.tsv column to leave out of the features (by "
                                                         "default the last one when the file has one column more "
                                                         "than the network's inputs)")
    pred.add_argument("-o", "--output", help="the predictions file (.csv or .tsv): a column prediction, and p_0, p_1, "
                                             "… (each class's probability) for a classifier; default: print them")
    pred.set_defaults(func=_predict)
    ev = sub.add_parser("evaluate", help="a trained model's loss and accuracy (or R²) on a data file")
    ev.add_argument("model", help="a checkpoint .npz (symbp train SPEC --save run.npz)")
    ev.add_argument("data", help="samples with targets: an .npz with X and y, an .npy of X with --labels, or a "
                                 ".csv/.tsv with a header (the target: --target, else the last column)")
    _add_data_flags(ev, "DATA")
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`symbp explain … | head`): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, RuntimeError, ImportError, ArithmeticError, OSError, MemoryError,
            SyntaxError) as err:
        # ArithmeticError: training diverged (FloatingPointError) or a number overflowed;
        # OSError: a path the user gave cannot be read or written; MemoryError: too big a net;
        # SyntaxError: generated code Python cannot parse (the cache names the module instead
        # when it imports one).
        if getattr(err, "symbp_rank", 0):
            return 2  # every process of a data-parallel run has this error: rank 0 prints it
        agreed = hasattr(err, "symbp_rank")
        message = str(err) or type(err).__name__
        if isinstance(err, SyntaxError):
            message = f"{type(err).__name__}: {message}"
        top = (getattr(err, "name", None) or "").split(".")[0]
        if isinstance(err, ModuleNotFoundError) and top in EXTRAS:
            message += f" (pip install 'symbp[{EXTRAS[top]}]')"
        print(f"symbp: error: {message}", file=sys.stderr)
        if not agreed:
            _abort_other_processes()
        return 2


def _abort_other_processes() -> None:
    """An error only this process of an MPI launch has (the ones every process agreed on
    return before this) would leave the others waiting in a collective: end the job."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(2)


if __name__ == "__main__":
    sys.exit(main())
