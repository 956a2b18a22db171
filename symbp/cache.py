"""The ``generated/`` cache: one module file per model, written atomically, imported by path.

A module's file name carries a hash of everything that decides its text (the network spec,
dtype, symbp's and Numba's versions, and the generator's own source), so an unchanged model
is never regenerated and a changed one never reuses stale code.  Its last line is a
checksum of the rest: a truncated or edited file is detected, regenerated and never run.
Importing by path under a stable module name lets Numba's ``cache=True`` keep the compiled
machine code beside the file, so a second process skips compilation too.

Numba loads its files (``__pycache__/<stem>.<function>-….nbi|nbc``) without any check, and
one flipped byte in machine code crashes the process.  So each file's sha256 is recorded, as
Numba writes it, in a manifest ``__pycache__/<stem>.nbsum`` (``sha256sum``'s format), and a file whose digest is not
recorded there is deleted before Numba would read it: the function is compiled again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numba

from ._output import write_atomic
from ._version import __version__
from .backends.cpu import KERNEL_HELPERS

ENV_VAR = "SYMBP_CACHE_DIR"
_CHECKSUM = "# symbp-checksum: "
_STAMP = "# symbp-generator: "
#: How many times this process wrote each module file (the CLI's summary tells the modules a
#: run generated from those it found in the cache by this, not by file times).
WRITES: dict[Path, int] = {}
_PKG_DIR = Path(__file__).resolve().parent
_NUMBA_SUFFIXES = (".nbi", ".nbc")  # Numba's index and code files
_MANIFEST_SUFFIX = ".nbsum"  # ours: their digests


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
#: The modules that write generated code, and the helpers generated code imports (their code
#: is compiled into a cached kernel: a kernel cached against an older helper would keep running
#: it); with everything they import from symbp (found by reading their import statements, so a
#: new dependency is never missed) they make up the generator whose source goes into every
#: module key.  The package's own ``__init__`` only re-exports: a ``from . import x`` does not
#: pull it in.
_GENERATORS = ("symbp.backends.cpu.module", "symbp.backends.cuda.module",
               *(f"symbp.backends.cpu.{name}" for name in KERNEL_HELPERS))


def _module_path(name: str) -> Path | None:
    """The source file of symbp module ``name`` (a package's ``__init__.py``), or None."""
    rel = Path(*name.split(".")[1:])
    for path in (_PKG_DIR / rel / "__init__.py", (_PKG_DIR / rel).with_suffix(".py")):
        if path.is_file():
            return path
    return None


_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+(symbp[\w.]*)", re.M)


def _symbp_imports(name: str, path: Path) -> set[str]:
    """The symbp modules the file of module ``name`` imports, at any depth in the file.

    Read with a regular expression, not ``ast`` (5× faster: this runs at every cold start); an
    import written inside a string is counted too, which can only add a file to the key."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    text = path.read_text(encoding="utf-8")
    found = set(_IMPORT.findall(text))
    for base, names in _FROM_IMPORT.findall(text):
        dots = len(base) - len(base.lstrip("."))
        if dots:
            parts = package.split(".")
            rest = base[dots:]
            base = ".".join(parts[:len(parts) - dots + 1] + ([rest] if rest else []))
        if base == "symbp" or base.startswith("symbp."):
            found.add(base)
            for item in names.strip("()").split(","):  # a submodule, when it is one
                item = item.split("#")[0].split(" as ")[0].strip()
                if item.isidentifier():
                    found.add(f"{base}.{item}")
    return found


def generator_files() -> list[Path]:
    """The source files of the generator: :data:`_GENERATORS` and what they import, transitively."""
    seen, todo, files = set(), list(_GENERATORS), {}
    while todo:
        name = todo.pop()
        if name in seen or name == "symbp":
            continue
        seen.add(name)
        path = _module_path(name)
        if path is not None:
            files[name] = path
            todo += sorted(_symbp_imports(name, path) - seen)
    return [files[name] for name in sorted(files)]


def _generator_digest() -> str:
    h = hashlib.sha256()
    for path in generator_files():
        h.update(path.relative_to(_PKG_DIR).as_posix().encode())
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
    WRITES[path.resolve()] = WRITES.get(path.resolve(), 0) + 1


def _stamp(text: str) -> str | None:
    _, sep, tail = text.rpartition(_STAMP)
    return tail.split("\n", 1)[0].strip() if sep else None


@dataclass
class PruneResult:
    removed: list  # paths of removed files (modules and Numba's files beside them)
    freed: int  # bytes
    kept: int  # modules left
    damaged_code: list = field(default_factory=list)  # of removed: Numba files of kept modules, digest unrecorded


def prune(directory: str | os.PathLike | None = None, everything: bool = False, dry_run: bool = False) -> PruneResult:
    """Delete the generated modules the running symbp would never load again: damaged files,
    and files written by another symbp or Numba version or another generator source (their
    hash can no longer come up).  ``everything``: delete every module.  Numba's compiled
    files go with their module, and so do compiled files whose module is gone and those whose
    digest the module's manifest does not record (damaged).  Only files symbp names (``*.py``
    with a checksum line, ``__pycache__/*.nbi|nbc|nbsum``) are touched.
    ``dry_run``: only report what would go."""
    root = cache_dir(directory)
    removed, freed, kept, damaged_code = {}, 0, 0, []  # removed: path -> None, in the order met
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
        if everything or not _intact(text) or _stamp(text) not in current or not _parses(text, path):
            _drop_numba_cache(path, drop)
            drop(path)
        else:
            stems.add(path.stem)
            kept += 1
            for f in damaged_numba_files(path):
                drop(f)
                damaged_code.append(f)
    pycache = root / "__pycache__"
    if pycache.is_dir():
        for f in sorted(pycache.iterdir()):
            if f.suffix in (*_NUMBA_SUFFIXES, _MANIFEST_SUFFIX) and f.name.split(".", 1)[0] not in stems:
                drop(f)
    return PruneResult(list(removed), freed, kept, damaged_code)


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


def _parses(text: str, path: Path) -> bool:
    """Whether Python can compile the module's text (an intact file may still not: see
    :func:`load_or_generate`)."""
    try:
        compile(text, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def _drop_numba_cache(path: Path, unlink=lambda f: f.unlink(missing_ok=True)) -> None:
    """Numba's compiled files for a module (``__pycache__/<stem>.<function>-…``) and their
    manifest."""
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


def model_module(net, dtype: str, target: str, directory, generate, key_extra: str = "", tag: str = ""):
    """The generated model module of ``net`` for ``target``: imported from the cache, or
    derived, generated (``generate(derivation)`` gives the source) and written first.

    Returns (module, its path, the derivation when one was made here, else None), so the
    model can keep the derivation instead of deriving again for its training modules."""
    key = module_key(net.fingerprint() + key_extra, dtype, target)
    path = cache_dir(directory) / f"{net.name}-{dtype}{tag}-{key}.py"
    derived = []

    def source() -> str:
        from .derive import derive

        derived.append(derive(net))
        return generate(derived[0])

    module = load_or_generate(path, source, target)
    return module, path, derived[0] if derived else None


def load_or_generate(path: Path, generate, target: str = "cpu") -> ModuleType:
    """Import ``path``; (re)write it first from ``generate()`` if missing or damaged.  Numba's
    compiled files for it whose digest is not recorded are dropped (and compiled again).

    A module that is intact but does not import (SyntaxError, ImportError) is written again
    from ``generate()`` once; if that text does not import either, RuntimeError names the
    file and the error."""
    if not is_intact(path):
        if path.exists():
            _drop_numba_cache(path)
        write_module(path, generate(), target)
    else:
        _drop_damaged_numba_files(path.parent / "__pycache__", path.stem)
    try:
        module = import_module(path)
    except (SyntaxError, ImportError) as err:
        if _outside_dependency(err):
            raise
        _drop_numba_cache(path)
        write_module(path, generate(), target)
        try:
            module = import_module(path)
        except (SyntaxError, ImportError) as err:
            if _outside_dependency(err):
                raise
            raise RuntimeError(f"the generated module {path} cannot be imported: {_describe(err)}") from None
    guard_numba_cache(module, path)
    return module


def _outside_dependency(err: BaseException) -> bool:
    """A package the module imports is missing (e.g. numba-cuda): not the file's fault."""
    return isinstance(err, ModuleNotFoundError) and not (err.name or "").startswith("symbp_gen_")


def _describe(err: BaseException) -> str:
    if isinstance(err, SyntaxError):
        return f"{type(err).__name__}: {err.msg} (line {err.lineno})"
    return f"{type(err).__name__}: {err}"


# -- checksums of Numba's files ----------------------------------------------------------------
def _numba_files(pycache: Path, stem: str, base: str | None = None) -> list[Path]:
    """Numba's index and code files of module ``stem`` in ``pycache``, or only those of one
    function (``base``: Numba's ``<stem>.<function>-<line>.pyXY``)."""
    try:
        names = sorted(os.listdir(pycache))
    except OSError:
        return []
    prefix = (base if base is not None else stem) + "."
    return [pycache / n for n in names if n.startswith(prefix) and n.endswith(_NUMBA_SUFFIXES)]


def _manifest_path(pycache: Path, stem: str) -> Path:
    return pycache / f"{stem}{_MANIFEST_SUFFIX}"


def _read_manifest(manifest: Path) -> dict[str, str]:
    """File name -> sha256 of Numba's files as recorded.  The manifest is ``sha256sum``'s
    format (``<sha256>  <name>`` a line; ``sha256sum -c`` checks it in ``__pycache__``): a
    damaged line only unrecords its own file, a missing manifest every file."""
    try:
        text = manifest.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    files = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) and name:
            files[name] = digest
    return files


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # gone (another process replaces or drops it): not damage
        return None


def _damaged(pycache: Path, stem: str, base: str | None = None) -> list[Path]:
    recorded = _read_manifest(_manifest_path(pycache, stem))
    out = []
    for f in _numba_files(pycache, stem, base):
        digest = _sha256(f)
        if digest is not None and recorded.get(f.name) != digest:
            out.append(f)
    return out


def damaged_numba_files(path: Path) -> list[Path]:
    """Numba's files beside the module ``path`` whose sha256 its manifest does not record:
    changed since Numba wrote them, or written when no digest was recorded."""
    return _damaged(path.parent / "__pycache__", path.stem)


def _drop_damaged_numba_files(pycache: Path, stem: str, base: str | None = None) -> None:
    for f in _damaged(pycache, stem, base):
        f.unlink(missing_ok=True)


def _record(pycache: Path, stem: str, name: str) -> None:
    """Record the digest of ``name`` as it is now in the module's manifest (read, updated and
    written atomically, under a lock on the directory where the OS has ``flock``; entries of
    files gone are forgotten).  The file hashed is the one on disk, so when two processes
    write it the digest recorded last is that of the file left there."""
    manifest = _manifest_path(pycache, stem)
    with _locked(pycache):
        digest = _sha256(pycache / name)
        if digest is None:
            return  # dropped meanwhile: nothing to record
        files = _read_manifest(manifest)
        files[name] = digest
        files = {n: d for n, d in files.items() if (pycache / n).is_file()}
        try:
            write_atomic(manifest, "".join(f"{d}  {n}\n" for n, d in sorted(files.items())), "Numba cache manifest")
        except (OSError, ValueError):
            pass  # not recorded: the file is compiled again next time


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive ``flock`` on ``directory`` (none where there is no ``fcntl``, or it fails:
    then two processes may lose one manifest entry, which costs a compilation, nothing worse)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def guard_numba_cache(module: ModuleType, path: Path) -> None:
    """Make each ``cache=True`` function of ``module`` record the digest of every file Numba
    writes for it, and check the function's files against the manifest each time before
    Numba reads them.  Hooks Numba's ``IndexDataCacheFile`` (CPU and numba-cuda share its
    shape); a function whose cache lacks the hooks has its files compiled anew each process
    (they stay unrecorded), never loaded unchecked."""
    stem = path.stem
    for obj in list(vars(module).values()):
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        if cache_file is None or getattr(getattr(obj, "py_func", None), "__module__", None) != module.__name__:
            continue  # not a cached function, or one imported from another module
        if getattr(cache_file, "_symbp_guarded", False):
            continue
        try:
            pycache = Path(cache_file._cache_path)
            base = cache_file._index_name[: -len(".nbi")]
            open_for_write, load = cache_file._open_for_write, cache_file.load
        except AttributeError:
            continue
        cache_file._open_for_write = _recording(open_for_write, pycache, stem)
        cache_file.load = _checking(load, pycache, stem, base)
        cache_file._symbp_guarded = True


def _recording(open_for_write, pycache: Path, stem: str):
    @contextlib.contextmanager
    def recording(filepath):
        with open_for_write(filepath) as fh:
            yield fh
        _record(pycache, stem, os.path.basename(filepath))  # written whole and renamed into place

    return recording


def _checking(load, pycache: Path, stem: str, base: str):
    def checked_load(key):
        _drop_damaged_numba_files(pycache, stem, base)
        return load(key)

    return checked_load
