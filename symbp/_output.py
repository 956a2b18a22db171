"""Writing reports and pictures: refuse a bad path up front, then write all or nothing."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_path(path, suffixes: tuple[str, ...] | None, what: str) -> Path:
    """``path`` as a Path after checking that a ``what`` can be written there.

    Raises TypeError for a non-path, ValueError naming the problem otherwise: a suffix
    outside ``suffixes`` (None: any), a directory in the way, a missing or unwritable directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the {what} path must be a string or a path, got {type(path).__name__}")
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"the {what} file must end in {', '.join(suffixes)}; got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"cannot write the {what} to {path}: it is a directory")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"cannot write the {what} to {path}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write the {what} to {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the {what} to {path}: the directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write the {what} to {path}: the file is read-only")
    return path


def write_atomic(path: Path, data: str | bytes, what: str) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: a reader
    (or a crash) never sees half a file.  The file gets the usual permissions (0666 & ~umask)."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise ValueError(f"cannot write the {what} to {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _publish(tmp: str, path: Path) -> None:
    """Give ``tmp`` the usual permissions (mkstemp makes it 0600) and rename it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextmanager
def atomic_target(path: Path, suffix: str):
    """A temporary file name beside ``path`` for writers that want a name (matplotlib's
    savefig, an animation); renamed into place with the usual permissions when the block
    succeeds, removed when it fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
