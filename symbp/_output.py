"""Writing reports and pictures: refuse a bad path up front, then write all or nothing."""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STALE_AFTER = 60.0  # seconds a dead writer's temporary file is left alone (a shared disk's clock, another host)


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
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
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


def _temp_prefix(path: Path) -> str:
    """``.<name>.<pid>.``: a hidden temporary name beside ``path`` that says which process
    writes it, so that a later write can tell a dead writer's leftover from a live one's."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: never guess, keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files that writers of ``path`` killed mid-write left beside it
    (``.<name>.<pid>.*``, by :func:`write_atomic` or :func:`atomic_target`): those whose
    process is gone and that nothing touched for :data:`STALE_AFTER` seconds.  A live
    writer's file is never touched.  Returns what was removed."""
    path = Path(path)
    removed = []
    now = time.time()
    # mkstemp's names: the prefix, 8 random characters, the suffix (.tmp, or .png for a picture)
    ours = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[a-z0-9_]{8}\.\w+")
    # Before names carried the pid: a day untouched is proof enough that its writer is gone.
    older = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for tmp in path.parent.glob(glob.escape(f".{path.name}.") + "*"):
        match = ours.fullmatch(tmp.name)
        if match is not None:
            wait = STALE_AFTER
            if _alive(int(match.group(1))):
                continue
        elif older.fullmatch(tmp.name):
            wait = 86400.0
        else:
            continue
        try:
            if now - tmp.stat().st_mtime < wait or not tmp.is_file():
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


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
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
