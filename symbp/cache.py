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
import os
import sys
from pathlib import Path
from types import ModuleType

import numba

from ._output import write_atomic
from ._version import __version__

ENV_VAR = "SYMBP_CACHE_DIR"
_CHECKSUM = "# symbp-checksum: "
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
    global _GENERATOR_DIGEST
    if _GENERATOR_DIGEST is None:
        _GENERATOR_DIGEST = _generator_digest()
    parts = [fingerprint, dtype, target, __version__, numba.__version__, _GENERATOR_DIGEST]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_module(path: Path, source: str) -> None:
    """Write ``source`` plus its checksum line atomically (a reader sees all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = source if source.endswith("\n") else source + "\n"
    write_atomic(path, body + _CHECKSUM + _checksum(body) + "\n", "generated module")


def is_intact(path: Path) -> bool:
    """True when the file exists and its checksum line matches its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, tail = text.rpartition(_CHECKSUM)
    return bool(sep) and tail.strip() == _checksum(body)


def _drop_numba_cache(path: Path) -> None:
    pycache = path.parent / "__pycache__"
    if pycache.is_dir():
        for f in pycache.glob(f"{path.stem}.*"):
            f.unlink(missing_ok=True)


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


def load_or_generate(path: Path, generate) -> ModuleType:
    """Import ``path``; (re)write it first from ``generate()`` if missing or damaged."""
    if not is_intact(path):
        if path.exists():
            _drop_numba_cache(path)
        write_module(path, generate())
    return import_module(path)
