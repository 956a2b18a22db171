"""Command line: ``symbp train | explain | walkthrough | graph | report SPEC.toml``, ``symbp paths``,
``symbp cache``, ``symbp export SOURCE -o model.onnx`` (or ``--kernels -o DIR``).

The TOML spec mirrors the Python API (see README): top-level ``inputs``, ``loss``, ``l2``,
``name``; ``[[layers]]`` tables with ``type``, ``units``, ``activation`` and optionally
``activation_params``; an optional ``[train]`` table with ``data``, ``epochs``,
``batch_size``, ``lr``, ``seed``, ``dtype``, ``test_size``; an optional ``[walkthrough]``
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
TRAIN_DEFAULTS = {"data": "digits", "epochs": 20, "batch_size": 32, "lr": 0.1, "seed": 0,
                  "dtype": "float32", "test_size": 0.25, "optimizer": "sgd", "optimizer_params": {}}
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
    checkpoint ``.npz`` from ``model.save`` / ``symbp train --save`` (cfg empty; the trained
    model with its parameters and optimizer)."""
    if Path(path).suffix == ".npz":
        from .compile import load

        model = load(path)
        return {}, model.network, model
    cfg = load_spec(path)
    return cfg, network_from_spec(cfg), None


def network_from_spec(cfg: dict):
    """The :class:`~symbp.spec.network.Network` a loaded spec declares (its [train] and
    [walkthrough] tables are for the commands, not the network)."""
    import symbp as sb

    return sb.Network.from_config({k: v for k, v in cfg.items() if k != "walkthrough"})


def load_data(name: str, seed: int, test_size: float):
    """A named data set split into train and held-out parts.

    ``digits`` is scikit-learn's bundled 8×8 digits (no download), scaled to [0, 1]; a path
    to an ``.npz`` with arrays ``X`` and ``y`` is read with ``allow_pickle=False``.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    elif str(name).endswith(".npz"):
        from symbp.train.data import load_npz

        # Member sizes are checked against their headers before anything is inflated.
        X, y = load_npz(name, ("X", "y"))
    else:
        raise ValueError(f"unknown data set {name!r}: use 'digits' or a path to an .npz with X and y")
    stratify = y if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) else None
    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=stratify)


def _train(args) -> int:
    import symbp as sb

    cfg = load_spec(args.spec)
    opts = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    for key in ("epochs", "batch_size", "lr", "seed", "dtype"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    # Where the curves and the checkpoint go is checked before minutes of training, not after.
    if args.plot:
        from symbp._output import check_output_path
        from symbp.read.plots import _pyplot

        _pyplot()  # matplotlib is there
        check_output_path(args.plot, (".png", ".svg", ".pdf"), "plot")
    if args.save:
        from symbp.train.checkpoint import checkpoint_path

        checkpoint_path(args.save)
    start = time.perf_counter()
    net = network_from_spec(cfg)
    Xtr, Xte, ytr, yte = load_data(opts["data"], opts["seed"], opts["test_size"])
    optimizer = spec_optimizer({"train": opts}, args.optimizer, always=True)
    model = sb.compile(net, dtype=opts["dtype"], seed=opts["seed"])
    history = model.fit(Xtr, ytr, optimizer=optimizer, batch_size=opts["batch_size"],
                        epochs=opts["epochs"], validation_data=(Xte, yte), seed=opts["seed"], progress=not args.quiet)
    elapsed = time.perf_counter() - start
    if args.plot:
        import matplotlib.pyplot as plt

        plt.close(history.plot(args.plot, title=f"{net.name}: {optimizer.describe()}"))
        print(f"curves: {args.plot}")
    if args.save:
        print(f"checkpoint: {model.save(args.save)}")
    print(f"model: {net!r}")
    print(f"kernels: {model.source_path}")
    for key, values in history.history.items():
        print(f"final {key}: {values[-1]:.4f}")
    print(f"held-out score: {model.score(Xte, yte):.4f}  ({len(yte)} samples)")
    epochs = opts["epochs"]
    print(f"time: {elapsed:.1f} s (derive, generate, JIT and {epochs} epoch{'' if epochs == 1 else 's'})")
    return 0


def spec_optimizer(cfg: dict, text: str | None, always: bool = False):
    """The optimizer ``symbp train`` runs for this spec: ``text`` (``--optimizer``) or the
    [train] table's, with its lr; None when neither names one, unless ``always``."""
    opts = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    if text is None and "optimizer" not in cfg.get("train", {}) and not always:
        return None
    if text is not None:
        opts["optimizer"], opts["optimizer_params"] = parse_optimizer(text)
    return make_optimizer(opts["optimizer"], {"lr": opts["lr"], **opts["optimizer_params"]})


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
    try:
        return kinds[str(name).lower()](**params)
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
    doc = build(d, scalar=args.scalar, optimizer=optimizer)
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


def _example(cfg: dict, args, model=None) -> dict:
    """The worked example's x, t, params and seed: flags over the spec's [walkthrough] table;
    a checkpoint's ``model`` gives its trained parameters (in float64, like every example)."""
    table = cfg.get("walkthrough", {})
    if model is not None:
        table = {"params": {k: v.astype("float64") for k, v in model.params.items()}}
    seed = args.seed if args.seed is not None else table.get("seed", 0)
    x = _numbers(args.x, "--x") if args.x is not None else table.get("x")
    t = _numbers(args.t, "--t") if args.t is not None else table.get("t")
    if t is not None and isinstance(t, list) and len(t) == 1:
        t = t[0]
    return {"x": x, "t": t, "params": table.get("params"), "seed": seed}


def _walkthrough(args) -> int:
    import symbp as sb
    from symbp.read.walkthrough import walkthrough

    cfg, net, model = load_source(args.spec)
    target = sb.compile(net, dtype="float64") if args.kernels else net
    w = walkthrough(target, **_example(cfg, args, model))
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
    w = walkthrough(net, **_example(cfg, args, model))
    collapse = True if args.collapse else False if args.expand else None
    path = graph(w, collapse=collapse).save(args.output)
    print(f"wrote {path}")
    return 0


def _report(args) -> int:
    from symbp.read.report import report

    cfg, net, model = load_source(args.spec)
    output = args.output or f"{Path(args.spec).stem}.html"
    example = _example(cfg, args)
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


def _add_example_flags(cmd) -> None:
    cmd.add_argument("--x", nargs="+", metavar="X", help="the sample's inputs (default: the spec's [walkthrough] x, "
                                                         "else random)")
    cmd.add_argument("--t", nargs="+", metavar="T", help="its target: a class label, or one number per output")
    cmd.add_argument("--seed", type=int, help="seed for the random sample and parameters (default 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="symbp", description="Backpropagation derived by SymPy, run as Numba kernels.")
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the network a TOML spec declares")
    train.add_argument("spec", help="path to the TOML spec")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--dtype", choices=["float32", "float64"])
    train.add_argument("--optimizer", help='e.g. "adam" or "sgd:momentum=0.9,nesterov=true" (lr comes from --lr)')
    train.add_argument("--plot", metavar="PNG", help="draw loss and accuracy per epoch (needs matplotlib)")
    train.add_argument("--save", metavar="NPZ", help="write a checkpoint after training (sb.load reads it)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    explain = sub.add_parser("explain", help="print the derived formulas for a TOML spec (or a checkpoint .npz)")
    explain.add_argument("spec", help=SPEC_HELP)
    explain.add_argument("--format", choices=["text", "latex", "markdown"], default="text")
    explain.add_argument("--scalar", action="store_true", help="also every neuron's formulas with named weights "
                                                               "(layers of at most 10 units)")
    explain.add_argument("--standalone", action="store_true", help="LaTeX: a complete document")
    explain.add_argument("-o", "--output", help="write to this file instead of printing")
    explain.add_argument("--optimizer", help='also its update rule, e.g. "adam" or "sgd:momentum=0.9" (lr from the '
                                             "spec's [train] table); by default the [train] table's optimizer, if any")
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
    rep.add_argument("--dtype", choices=["float32", "float64"], default="float32")
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
    paths.add_argument("--steps", type=int, default=200)
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
    args = parser.parse_args(argv)
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
        message = str(err) or type(err).__name__
        if isinstance(err, SyntaxError):
            message = f"{type(err).__name__}: {message}"
        top = (getattr(err, "name", None) or "").split(".")[0]
        if isinstance(err, ModuleNotFoundError) and top in EXTRAS:
            message += f" (pip install 'symbp[{EXTRAS[top]}]')"
        print(f"symbp: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
