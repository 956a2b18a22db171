"""Input checks: every problem with user data becomes a ValueError/TypeError naming it.

Also the one reader of ``.npz`` files (data sets and checkpoints): :func:`load_npz`.  Unlike
``np.load``, which inflates a member whole before anything can look at it, it reads each
member's size from the zip's central directory and its shape and dtype from the ``.npy``
header (the first bytes of the member), refuses a member whose two sizes disagree, which
does not fit in the memory available, or which inflates like a decompression bomb, and then
reads exactly the declared bytes into an array allocated up front: a lying header or
directory cannot make it read, or allocate, more.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

try:  # zipfile reads LZMA members when Python has lzma
    from lzma import LZMAError
except ImportError:  # pragma: no cover - a Python built without lzma
    LZMAError = OSError


def _check_real(arr: np.ndarray, what: str) -> None:
    """Real numbers (bool counts as 0/1); a complex array would lose its imaginary part."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{what} must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{what} must hold real numbers, got dtype {arr.dtype}")


def as_inputs(X, width, dtype: np.dtype, what: str = "X") -> np.ndarray:
    """``X`` as a C-contiguous (N, width) array of ``dtype``; refuses bad shapes and NaN/inf.

    ``width`` may be an image shape (C, H, W): X is then (N, C, H, W), or flat (N, C·H·W),
    and comes back flat (the kernels' layout, C, H, W order).
    """
    if isinstance(width, tuple):
        shape, width = width, int(np.prod(width))
        try:
            arr = np.asarray(X)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"{what} could not be read as an array: {err}") from None
        if arr.ndim == len(shape):
            arr = arr[None]
        if arr.ndim == len(shape) + 1:
            if arr.shape[1:] != shape:
                raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}), got {arr.shape}")
            X = arr.reshape(arr.shape[0], width)
        elif arr.ndim != 2:
            raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}) or (N, {width}), got {arr.shape}")
    try:
        arr = np.asarray(X)
    except Exception as err:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"{what} could not be read as an array: {err}") from None
    _check_real(arr, what)
    if arr.ndim == 1 and width == arr.shape[0]:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (samples, {width}), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: no samples")
    if arr.shape[1] != width:
        raise ValueError(f"{what} has {arr.shape[1]} features per sample, the network expects {width}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    bad = first_not_finite(arr)
    if bad is not None:
        raise not_finite_error(what, *bad)
    return arr


def not_finite_error(what: str, row: int, column: int) -> ValueError:
    """The error of inputs holding a NaN or inf, first at (row, column)."""
    return ValueError(f"{what} contains NaN or inf (first at row {row}, column {column})")


def label_error(label, classes: int) -> ValueError:
    """The error of a class label outside 0..classes − 1."""
    return ValueError(f"label {label} out of range: the network has {classes} classes (labels 0..{classes - 1})")


# Rows checked at a time: np.isfinite makes a byte per entry.  1 MiB of mask keeps fit's own
# memory small next to the data, and blocks in cache check faster than larger ones.
_CHECK_ROWS_BYTES = 1 << 20


def first_not_finite(arr: np.ndarray) -> tuple | None:
    """The index of the first NaN or inf in a 2-D array, or None; checked a block of rows at a
    time, so that 10⁶ × 784 inputs do not cost a 750 MiB mask on top of the data."""
    rows = max(1, _CHECK_ROWS_BYTES // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], rows):
        block = np.isfinite(arr[start:start + rows])
        if not block.all():
            r, c = np.argwhere(~block)[0]
            return start + int(r), int(c)
    return None


def as_targets(y, n: int, outputs: int | tuple, task: str, dtype: np.dtype, what: str = "y",
               labels: bool = False) -> np.ndarray:
    """Targets as an (n, outputs) array of ``dtype``.

    ``outputs`` may be an image shape (C, H, W) (a network whose last layer makes one): y is
    then (n, C, H, W), or flat (n, C·H·W), and comes back flat.

    ``multiclass``: integer class labels in [0, outputs) or rows of class probabilities;
    ``binary``: values in [0, 1]; ``regression``: any finite values.  A 1-D ``y`` is
    accepted for a single output unit (and as labels for multiclass).  With ``labels``,
    multiclass labels come back as they are, checked, as a 1-D int64 array (the caller's own
    when it is one: no copy) for kernels that one-hot encode a batch at a time.
    """
    try:
        arr = np.asarray(y)
    except Exception as err:  # noqa: BLE001
        raise TypeError(f"{what} could not be read as an array: {err}") from None
    _check_real(arr, what)
    if arr.shape[:1] != (n,):
        got = arr.shape[0] if arr.ndim else "a scalar"
        raise ValueError(f"X has {n} samples but {what} has {got}")
    shape = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = int(np.prod(shape))
    if len(shape) > 1 and arr.shape[1:] == shape:
        arr = arr.reshape(n, outputs)
    if task == "multiclass" and arr.ndim == 1:
        classes = class_labels(arr, outputs, what)
        if labels:
            return classes
        out = np.zeros((n, outputs), dtype=dtype)
        out[np.arange(n), classes] = 1
        return out
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf (first at sample {np.argwhere(~np.isfinite(arr))[0][0]})")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != outputs:
        image = f" or ({n}, {', '.join(map(str, shape))})" if len(shape) > 1 else ""
        raise ValueError(f"{what} must have shape ({n}, {outputs}){image} for {outputs} output units, got {arr.shape}")
    if task == "multiclass":
        if (arr < 0).any() or not np.allclose(arr.sum(axis=1), 1.0, atol=1e-6):
            raise ValueError(f"{what} rows must be one-hot or class probabilities (non-negative, summing to 1)")
    if task == "binary" and ((arr < 0) | (arr > 1)).any():
        raise ValueError(f"{what} must lie in [0, 1] for binary_cross_entropy, got values in [{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=dtype)


def class_labels(arr: np.ndarray, classes: int, what: str = "y") -> np.ndarray:
    """1-D class labels as a C-contiguous int64 array, each checked to lie in 0..classes − 1.
    Integer labels cost nothing more than a min and a max (an int64 array is returned as it
    is); others (floats holding whole numbers, say from a CSV) are checked and converted."""
    if arr.dtype.kind in "iub":
        out = np.ascontiguousarray(arr, dtype=np.int64)
    else:
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(f"{what} contains NaN or inf (first at sample {np.argwhere(~finite)[0][0]})")
        whole = np.mod(arr, 1) == 0
        if not whole.all():
            raise ValueError(f"{what} holds class labels, which must be whole numbers; got {arr[~whole][0].item()!r}")
        out = arr.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= classes):
        raise label_error(out[(out < 0) | (out >= classes)][0], classes)
    return out


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return int(batch_size)


# -- .npz files ------------------------------------------------------------------------------
class NpzError(ValueError):
    """A problem with an ``.npz`` file; the message says what, the caller says which file."""


# What zipfile, zlib and numpy's header parser raise on a damaged file (a flipped
# compression-method bit: NotImplementedError; an encryption bit: RuntimeError).
NPZ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError,
              NotImplementedError, RuntimeError, zlib.error, struct.error, OverflowError, LZMAError, MemoryError)
BOMB_RATIO = 500  # a member larger than BOMB_SIZE inflating more than this many times is refused
BOMB_SIZE = 2**28  # 256 MiB: a real array this large does not shrink 500 times (1 GiB of zeros: 1000 times)
_CHUNK = 2**22  # bytes inflated per read


@dataclass(frozen=True)
class NpyMember:
    """One ``.npy`` member of an ``.npz``, from its header: nothing of its data read yet."""

    key: str  # the name np.load gives it (".npy" dropped)
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    header: int  # bytes of the .npy header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"member {self.info.filename!r} (shape {self.shape}, dtype {self.dtype}, {format_bytes(self.nbytes)})"


class _Counting:
    """A read-only stream that counts the bytes read through it (the .npy header's length)."""

    def __init__(self, fp) -> None:
        self.fp, self.pos = fp, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fp.read(size)
        self.pos += len(data)
        return data


def format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def available_memory() -> int | None:
    """Bytes of memory this process can still get (MemAvailable, capped by a cgroup limit);
    None when the system does not say."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:  # a container's limit (cgroup v2) may be far below the machine's memory
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
                avail = min(avail, max(0, int(limit) - int(fh.read().strip())))
    except (OSError, ValueError):
        pass
    return avail


def npz_index(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The members by the names np.load gives them; two members of one name are refused."""
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if key in out:
            raise NpzError(f"it holds two members named {info.filename!r}")
        out[key] = info
    return out


def _read_npy_header(fp, subject: str) -> tuple:
    """(shape, fortran order, dtype) from the ``.npy`` header at ``fp``'s position, refusing
    another format version, Python objects and dtypes without a fixed item size; the errors
    name ``subject`` (``member 'X'`` of an npz, ``it`` for a file)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise NpzError(f"{subject} is in .npy format version {version}, which is not read")
    except NpzError:
        raise
    except NPZ_ERRORS as err:
        raise NpzError(f"{subject} is not a readable .npy array ({err})") from None
    if dtype.hasobject:
        raise NpzError(f"{subject} holds Python objects, which are never read (allow_pickle=False)")
    if dtype.itemsize == 0 or dtype.shape != ():
        raise NpzError(f"{subject} has an unsupported dtype {dtype}")
    return shape, fortran, dtype


def npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyMember:
    """Shape, dtype and header length of a member, from the first bytes it inflates to; refused
    when they disagree with the size the zip directory declares for it."""
    name = info.filename
    key = name[:-4] if name.endswith(".npy") else name
    if info.flag_bits & 0x1:
        raise NpzError(f"member {name!r} is encrypted")
    try:
        with zf.open(info) as raw:
            fp = _Counting(raw)
            shape, fortran, dtype = _read_npy_header(fp, f"member {name!r}")
    except NpzError:
        raise
    except NPZ_ERRORS as err:  # the member's local header or its deflate stream
        raise NpzError(f"member {name!r} is not a readable .npy array ({err})") from None
    member = NpyMember(key, info, tuple(int(d) for d in shape), dtype, bool(fortran), fp.pos)
    if info.file_size != member.header + member.nbytes:
        raise NpzError(f"member {name!r} declares {info.file_size} bytes uncompressed in the zip directory, but its "
                       f"header describes shape {member.shape} of dtype {dtype}: "
                       f"{member.header + member.nbytes} bytes with the header")
    return member


def check_sizes(members, limit: int | None = None) -> None:
    """Refuse ``members`` whose data would not fit in ``limit`` bytes (by default, the memory
    available now), and any large member that inflates like a decompression bomb."""
    members = list(members)
    total = sum(m.nbytes for m in members)
    if limit is None:
        limit = available_memory()
    if limit is not None and total > limit:
        biggest = max(members, key=lambda m: m.nbytes)
        raise NpzError(f"its arrays need {format_bytes(total)} uncompressed, more than the {format_bytes(limit)} of "
                       f"memory available; the largest is {biggest.describe()}")
    for m in members:
        packed = max(m.info.compress_size, 1)
        if m.nbytes > BOMB_SIZE and m.nbytes > BOMB_RATIO * packed:
            raise NpzError(f"{m.describe()} would inflate from {format_bytes(packed)} to {format_bytes(m.nbytes)} "
                           f"({m.nbytes // packed}×): a decompression bomb, not data (if it is real data, "
                           f"save it with np.savez, uncompressed)")


def read_npy(zf: zipfile.ZipFile, member: NpyMember) -> np.ndarray:
    """The member's array: its declared bytes, read into an array allocated up front; a stream
    that ends early or goes on past them is refused (and zipfile checks its CRC at the end)."""
    name = member.info.filename
    flat = np.empty(math.prod(member.shape), member.dtype)
    raw = memoryview(flat.view(np.uint8))
    with zf.open(member.info) as fp:
        if len(fp.read(member.header)) != member.header:
            raise NpzError(f"member {name!r} ends inside its header")
        pos = 0
        while pos < len(raw):
            got = fp.readinto(raw[pos:pos + _CHUNK])
            if not got:
                raise NpzError(f"member {name!r} ends after {pos} of its {len(raw)} bytes of data")
            pos += got
        if fp.read(1):
            raise NpzError(f"member {name!r} holds more bytes than its header describes")
    return flat.reshape(member.shape[::-1]).transpose() if member.fortran else flat.reshape(member.shape)


def load_npz(path, keys, what: str = "data file") -> tuple[np.ndarray, ...]:
    """The arrays ``keys`` of the ``.npz`` at ``path``, in that order, read safely (see the
    module's docstring); ValueError ``cannot read <what> <path>: <problem>`` otherwise."""
    try:
        with zipfile.ZipFile(path) as zf:
            index = npz_index(zf)
            missing = [k for k in keys if k not in index]
            if missing:
                raise NpzError(f"it has no array {missing[0]!r} (it holds: {', '.join(sorted(index)) or 'nothing'})")
            members = [npy_header(zf, index[k]) for k in keys]
            check_sizes(members)
            return tuple(read_npy(zf, m) for m in members)
    except NPZ_ERRORS as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def npz_names(path, what: str = "data file") -> list[str]:
    """The array names an ``.npz`` holds (from its zip directory: nothing is inflated)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(npz_index(zf))
    except NPZ_ERRORS as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def load_npy(path, what: str = "data file") -> np.ndarray:
    """The array of the ``.npy`` at ``path``, read as :func:`load_npz` reads a member: the
    header's shape and dtype first (no Python objects), the file's size must be exactly the
    header plus the data it declares and fit in the memory available, then the declared
    bytes into an array allocated up front.  ValueError ``cannot read <what> <path>: …``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            shape, fortran, dtype = _read_npy_header(fh, "it")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            if size != fh.tell() + nbytes:
                raise NpzError(f"its header describes shape {shape} of dtype {dtype} ({format_bytes(nbytes)}), "
                               f"but the file holds {format_bytes(max(0, size - fh.tell()))} after the header")
            limit = available_memory()
            if limit is not None and nbytes > limit:
                raise NpzError(f"its array needs {format_bytes(nbytes)}, more than the {format_bytes(limit)} of "
                               "memory available")
            flat = np.empty(math.prod(shape), dtype)
            if fh.readinto(memoryview(flat.view(np.uint8))) != nbytes:
                raise NpzError("it ends inside its data")
    except NPZ_ERRORS as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
