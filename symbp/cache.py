"""The ``generated/`` cache: one module file per model, written atomically, imported by path.

A module's file name carries a hash of everything that decides its text (the network spec,
dtype, symbp's and Numba's versions, and the generator's own source), so an unchanged model
is never regenerated and a changed one never reuses stale code.  Its last line is a
checksum of the rest: a truncated or edited file is detected, regenerated and never run.
Importing by path under a stable module name lets Numba's ``cache=True`` keep the compiled
machine code beside the file, so a second process skips compilation too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickletools
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numba

from ._output import write_atomic
from ._version import __version__

ENV_VAR = "SYMBP_CACHE_DIR"
_CHECKSUM = "# symbp-checksum: "
_STAMP = "# symbp-generator: "
_PKG_DIR = Path(__file__).resolve().parent


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where generated modules go: the argument, else ``$SYMBP_CACHE_DIR``, else the
    project's ``generated/`` when symbp runs from a checkout, else ``~/.cache/symbp``."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    checkout = _PKG_DIR.parent / "generated"
    if (checkout / "README.md").is_file():
        return checkout
    return Path.home() / ".cache" / "symbp" / "generated"


# The modules whose text decides what code is generated; editing any other file (the CLI,
# the explanations) leaves the cache valid.
_GENERATOR_FILES = ("activations.py", "codegen.py", "codegen_cuda.py", "codegen_image.py", "lower_image.py",
                    "conv.py", "derive.py", "formula.py", "indices.py", "layers.py",
                    "losses.py", "lower.py", "ops.py", "optim.py", "backends")


def _generator_digest() -> str:
    h = hashlib.sha256()
    for name in _GENERATOR_FILES:
        target = _PKG_DIR / name
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            if path.is_file():
                h.update(path.name.encode())
                h.update(path.read_bytes())
    return h.hexdigest()


_GENERATOR_DIGEST = None


def module_key(fingerprint: str, dtype: str, target: str) -> str:
    """The hash in a module's file name."""
    parts = [fingerprint, dtype, target, generator_stamp(target)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generator_stamp(target: str = "cpu") -> str:
    """What of the module key does not depend on the model: symbp's and Numba's versions,
    the generator's source and, for the CUDA target, numba-cuda's version.  Written into
    each module so :func:`prune` can tell the files the current symbp would never ask for
    again."""
    global _GENERATOR_DIGEST
    if _GENERATOR_DIGEST is None:
        _GENERATOR_DIGEST = _generator_digest()
    stamp = f"symbp={__version__} numba={numba.__version__} generator={_GENERATOR_DIGEST[:16]}"
    if target == "cuda":
        stamp += f" numba-cuda={_numba_cuda_version()}"
    return stamp


def _numba_cuda_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numba-cuda")
    except PackageNotFoundError:
        return "none"


def write_module(path: Path, source: str, target: str = "cpu") -> None:
    """Write ``source``, the target's generator stamp and a checksum line atomically (a
    reader sees all or nothing)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. SYMBP_CACHE_DIR names a file
        raise ValueError(f"cannot use the cache directory {path.parent}: {err.strerror or err} "
                         f"(set cache_dir= or SYMBP_CACHE_DIR to a directory)") from None
    body = source if source.endswith("\n") else source + "\n"
    body += _STAMP + generator_stamp(target) + "\n"
    write_atomic(path, body + _CHECKSUM + _checksum(body) + "\n", "generated module")


def _stamp(text: str) -> str | None:
    _, sep, tail = text.rpartition(_STAMP)
    return tail.split("\n", 1)[0].strip() if sep else None


@dataclass
class PruneResult:
    removed: list  # paths of removed files (modules and Numba's files beside them)
    freed: int  # bytes
    kept: int  # modules left


def prune(directory: str | os.PathLike | None = None, everything: bool = False, dry_run: bool = False) -> PruneResult:
    """Delete the generated modules the running symbp would never load again: damaged files,
    and files written by another symbp or Numba version or another generator source (their
    hash can no longer come up).  ``everything``: delete every module.  Numba's compiled
    files go with their module, and so do compiled files whose module is gone.  Only files
    symbp names (``*.py`` with a checksum line, ``__pycache__/*.nbi|nbc``) are touched.
    ``dry_run``: only report what would go."""
    root = cache_dir(directory)
    removed, freed, kept = {}, 0, 0  # removed: path -> None, in the order met
    current = {generator_stamp(target) for target in ("cpu", "cuda")}

    def drop(f: Path) -> None:
        nonlocal freed
        if f in removed:  # a dry run meets a module's compiled files twice
            return
        try:
            size = f.stat().st_size
            if not dry_run:
                f.unlink()
        except FileNotFoundError:
            return
        removed[f] = None
        freed += size

    if not root.is_dir():
        return PruneResult([], 0, 0)
    stems = set()
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if _CHECKSUM not in text:
            continue  # not a file symbp wrote: leave it
        if everything or not _intact(text) or _stamp(text) not in current:
            _drop_numba_cache(path, drop)
            drop(path)
        else:
            stems.add(path.stem)
            kept += 1
    pycache = root / "__pycache__"
    if pycache.is_dir():
        for f in sorted(pycache.iterdir()):
            if f.suffix in (".nbi", ".nbc") and f.name.split(".", 1)[0] not in stems:
                drop(f)
    return PruneResult(list(removed), freed, kept)


def is_intact(path: Path) -> bool:
    """True when the file exists and its checksum line matches its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return _intact(text)


def _intact(text: str) -> bool:
    body, sep, tail = text.rpartition(_CHECKSUM)
    return bool(sep) and tail.strip() == _checksum(body)


def _drop_numba_cache(path: Path, unlink=lambda f: f.unlink(missing_ok=True)) -> None:
    """Numba's compiled files for a module (``__pycache__/<stem>.<function>-…``)."""
    pycache = path.parent / "__pycache__"
    if pycache.is_dir():
        for f in pycache.glob(f"{path.stem}.*"):
            unlink(f)


def module_name(path: Path) -> str:
    """The stable import name of a generated file: a training module imports its model
    module by this name."""
    return "symbp_gen_" + "".join(c if c.isalnum() else "_" for c in path.stem)


def import_module(path: Path) -> ModuleType:
    """Import a generated file by path under its stable name (:func:`module_name`)."""
    name = module_name(path)
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_or_generate(path: Path, generate, target: str = "cpu") -> ModuleType:
    """Import ``path``; (re)write it first from ``generate()`` if missing or damaged.  Numba's
    compiled files for it are dropped (and compiled again) if any of them is damaged."""
    if not is_intact(path):
        if path.exists():
            _drop_numba_cache(path)
        write_module(path, generate(), target)
    elif not _numba_cache_intact(path):
        _drop_numba_cache(path)
    return import_module(path)


def _numba_cache_intact(path: Path) -> bool:
    """Whether each of Numba's files for this module is whole: an index (``.nbi``) is two
    pickles, a code file (``.nbc``) one.  Numba itself unpickles them without a check, so a
    truncated file would fail the first call with an UnpicklingError.  The pickles are only
    walked opcode by opcode (:func:`pickletools.genops`), never loaded: nothing is run."""
    pycache = path.parent / "__pycache__"
    if not pycache.is_dir():
        return True
    for f in pycache.glob(f"{path.stem}.*"):
        count = {".nbi": 2, ".nbc": 1}.get(f.suffix)
        if count is None:
            continue
        try:
            data = f.read_bytes()
            stream = io.BytesIO(data)
            for _ in range(count):
                for _op in pickletools.genops(stream):
                    pass
            if stream.tell() != len(data):
                return False
        except FileNotFoundError:
            continue  # another process is replacing it
        except Exception:  # noqa: BLE001 - any damage: truncated, garbage, unknown opcode
            return False
    return True
