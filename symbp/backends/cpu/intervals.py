"""Interval arithmetic for the update's overflow proof (``update_bounded`` in the training
modules, printed by :mod:`symbp.backends.cpu.bounds`), as ``@njit`` helpers.

An interval is a (lo, hi) pair of float64 that holds every value an expression can take,
given the extent of every array it reads (:func:`extent32`, :func:`extent64`).  Each
operation's interval is widened by a relative SLACK and an absolute UNDER, more than the
rounding of the kernel's float32 (or float64) operation and of this float64 one together, so
the interval also holds the value the kernel computes.  A NaN anywhere (an array holding one,
inf − inf in a bound) makes the interval (nan, nan), which no check accepts.

:func:`run_bounds` runs a proof: a table with one row per interval (an array's extent, a
hyper-parameter, an operation on earlier rows), each of which must lie within ±limit.  One
compiled interpreter for every model: a model's proof is data, not code to compile.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SLACK = 2.0 ** -16  # relative: an operation's rounding is 2⁻²⁴ (float32) or 2⁻⁵³ (float64)
UNDER = 1e-37  # absolute: an underflow's error, at most float32's smallest normal number
NAN = np.nan


@njit(cache=True)
def _key32(bits):
    """A float32's bits as an int32 that orders as the float does (NaN beyond ±inf)."""
    return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=True)
def _key64(bits):
    return np.int64(bits ^ ((bits >> np.int64(63)) & np.int64(0x7FFFFFFFFFFFFFFF)))


@njit(cache=True)
def _key_range(keys, key, top, bottom):
    """(min, max, NaN?) of the order keys (``key`` of each) of a float array's bits: ``top``
    and ``bottom`` are the keys of +inf and −inf, where the range starts (so an empty array
    gives (+inf, −inf)), and a key beyond either is a NaN.  An integer min/max vectorizes; a
    float one, NaN-aware, does not: 8.8 against 127 µs over the medium MLP's parameters."""
    lo, hi = top, bottom
    for k in range(keys.size):
        v = key(keys[k])
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    return lo, hi, hi > top or lo < bottom


@njit(cache=True)
def extent32(a):
    """(min, max) of a C-contiguous float32 array, as float64; (nan, nan) if it holds a NaN,
    (inf, -inf) if it is empty."""
    lo, hi, nan = _key_range(a.reshape(-1).view(np.int32), _key32, np.int32(0x7F800000), _key32(np.int32(-0x800000)))
    if nan:
        return NAN, NAN
    return float(np.int32(_key32(lo)).view(np.float32)), float(np.int32(_key32(hi)).view(np.float32))


@njit(cache=True)
def extent64(a):
    """extent32 for a float64 array."""
    lo, hi, nan = _key_range(a.reshape(-1).view(np.int64), _key64, np.int64(0x7FF0000000000000),
                             _key64(np.int64(-0x10000000000000)))
    if nan:
        return NAN, NAN
    return float(np.int64(_key64(lo)).view(np.float64)), float(np.int64(_key64(hi)).view(np.float64))


@njit(cache=True)
def _widen(lo, hi, nonneg):
    """[lo, hi] grown by one operation's rounding; ``nonneg``: the operation's result cannot be
    negative whatever the rounding (a sum or product of non-negative values, a square, √)."""
    lo2 = lo - abs(lo) * SLACK - UNDER
    if nonneg and lo >= 0.0 and lo2 < 0.0:
        lo2 = 0.0
    return lo2, hi + abs(hi) * SLACK + UNDER


@njit(cache=True)
def _bad(a):
    return not (a[0] <= a[1])  # (NaN compares false)


@njit(cache=True)
def _corners(p, q, r, s, nonneg):
    """The widened hull of an operation's values at the four corners of its two intervals
    (monotone in each), NaN if one is (0·inf: a bound overflowed)."""
    if p != p or q != q or r != r or s != s:
        return NAN, NAN
    return _widen(min(min(p, q), min(r, s)), max(max(p, q), max(r, s)), nonneg)


@njit(cache=True)
def iv_point(x):
    """A scalar the kernel computes from hyper-parameters and literals (rounded to its type)."""
    return _widen(x, x, x >= 0.0)


@njit(cache=True)
def iv_add(a, b):
    if _bad(a) or _bad(b):
        return NAN, NAN
    return _widen(a[0] + b[0], a[1] + b[1], a[0] >= 0.0 and b[0] >= 0.0)


@njit(cache=True)
def iv_mul(a, b):
    if _bad(a) or _bad(b):
        return NAN, NAN
    return _corners(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1],
                    (a[0] >= 0.0 and b[0] >= 0.0) or (a[1] <= 0.0 and b[1] <= 0.0))


@njit(cache=True)
def iv_pow(a, e):
    """a ** e, e an interval too (an exponent read from the step or a hyper-parameter): an
    exact integer takes the integer rule (any sign of a; 1/aⁿ needs 0 outside a), any other
    exponent needs a ≥ 0 (a > 0 where e can be ≤ 0) and takes the corners (a^e is monotone
    in each of a and e there)."""
    if _bad(a) or _bad(e):
        return NAN, NAN
    if e[0] == e[1] and e[0] == np.floor(e[0]) and abs(e[0]) <= 64.0:
        n = int(abs(e[0]))
        if n == 0:
            return 1.0, 1.0
        if a[0] >= 0.0:
            lo, hi, nonneg = a[0] ** n, a[1] ** n, True
        elif a[1] <= 0.0:
            lo, hi, nonneg = (a[1] ** n, a[0] ** n, True) if n % 2 == 0 else (a[0] ** n, a[1] ** n, False)
        elif n % 2 == 0:
            lo, hi, nonneg = 0.0, max(-a[0], a[1]) ** n, True
        else:
            lo, hi, nonneg = a[0] ** n, a[1] ** n, False
        v = _widen(lo, hi, nonneg)
        return v if e[0] > 0.0 else iv_inv(v)
    if a[0] < 0.0 or (a[0] == 0.0 and e[0] <= 0.0):
        return NAN, NAN
    return _corners(a[0] ** e[0], a[0] ** e[1], a[1] ** e[0], a[1] ** e[1], True)


@njit(cache=True)
def iv_inv(a):
    """1/a: 0 must lie outside a."""
    if _bad(a) or not (a[0] > 0.0 or a[1] < 0.0):
        return NAN, NAN
    return _widen(1.0 / a[1], 1.0 / a[0], a[0] > 0.0)


@njit(cache=True)
def iv_exp(a):
    if _bad(a):
        return NAN, NAN
    return _widen(np.exp(a[0]), np.exp(a[1]), True)


@njit(cache=True)
def iv_log(a):
    if _bad(a) or not (a[0] > 0.0):
        return NAN, NAN
    return _widen(np.log(a[0]), np.log(a[1]), False)


@njit(cache=True)
def iv_abs(a):
    if _bad(a):
        return NAN, NAN
    if a[0] >= 0.0:
        return a
    if a[1] <= 0.0:
        return -a[1], -a[0]
    return 0.0, max(-a[0], a[1])


@njit(cache=True)
def iv_max(a, b):
    if _bad(a) or _bad(b):
        return NAN, NAN
    return max(a[0], b[0]), max(a[1], b[1])


@njit(cache=True)
def iv_min(a, b):
    if _bad(a) or _bad(b):
        return NAN, NAN
    return min(a[0], b[0]), min(a[1], b[1])


@njit(cache=True)
def iv_hull(a, b):
    if _bad(a) or _bad(b):
        return NAN, NAN
    return min(a[0], b[0]), max(a[1], b[1])


@njit(cache=True)
def mag(a) -> float:
    """A bound on |x| over a, NaN for a NaN interval (|lo| + |hi|: NaN-propagating)."""
    return abs(a[0]) + abs(a[1])


@njit(cache=True)
def fits(a, limit) -> bool:
    """Whether every value of a lies within ±limit (false for NaN)."""
    return a[0] >= -limit and a[1] <= limit and a[0] <= a[1]


# The rows of a proof (run_bounds): (op, a, b, c, d, e, f); row k's interval is register k, and
# a, b, ... name earlier rows (or, as said, an array's extent, a constant, a hyper-parameter).
IV_EXTENT = 0  # the extent of array a (ext[a]): exact, no widening
IV_EXACT = 1  # the constant consts[a], exact (an integer literal)
IV_POINT = 2  # the constant consts[a] as the kernel rounds it
IV_HYPER = 3  # hyper-parameter a, as the kernel reads it
IV_STEP = 4  # the step number t, exact
IV_ADD = 5  # a + b
IV_MUL = 6  # a · b
IV_POW = 7  # a ** b
IV_INV = 8  # 1 / a
IV_EXP = 9  # exp(a)
IV_LOG = 10  # log(a)
IV_ABS = 11  # |a|
IV_MAX = 12  # max(a, b)
IV_MIN = 13  # min(a, b)
IV_HULL = 14  # a ∪ b: an array a statement updates, before and after
# θ ← β·θ + α·op(A)op(B), a GEMM of ks[d] products a term: θ a, A b, B c, α e, β f.  Each
# partial sum of the products is at most k·|A|·|B|, doubled for the rounding of up to 2²²
# terms ((1 + 2⁻²⁴)^(2²²) < 1.3); more terms are not proven.  α·A and α·B are bounded too.
IV_GEMM = 15


@njit(cache=True)
def run_bounds(program, consts, ext, ks, hyper, t, limit) -> bool:
    """Whether every row of ``program`` has an interval within ±limit (false at the first that
    has not): ``ext`` the extents of the arrays (rows of (lo, hi)), ``ks`` the GEMMs' term
    counts, ``hyper`` the hyper-parameters as the kernel reads them, ``t`` the step."""
    lo = np.empty(program.shape[0])
    hi = np.empty(program.shape[0])
    for k in range(program.shape[0]):
        op, a, b = program[k, 0], program[k, 1], program[k, 2]
        if op == IV_EXTENT:
            v = (ext[a, 0], ext[a, 1])
        elif op == IV_EXACT:
            v = (consts[a], consts[a])
        elif op == IV_POINT:
            v = iv_point(consts[a])
        elif op == IV_HYPER:
            v = iv_point(float(hyper[a]))
        elif op == IV_STEP:
            v = (float(t), float(t))
        elif op == IV_ADD:
            v = iv_add((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_MUL:
            v = iv_mul((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_POW:
            v = iv_pow((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_INV:
            v = iv_inv((lo[a], hi[a]))
        elif op == IV_EXP:
            v = iv_exp((lo[a], hi[a]))
        elif op == IV_LOG:
            v = iv_log((lo[a], hi[a]))
        elif op == IV_ABS:
            v = iv_abs((lo[a], hi[a]))
        elif op == IV_MAX:
            v = iv_max((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_MIN:
            v = iv_min((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_HULL:
            v = iv_hull((lo[a], hi[a]), (lo[b], hi[b]))
        elif op == IV_GEMM:
            n = ks[program[k, 4]]
            if n > 4194304:
                return False
            size_a, size_b = mag((lo[b], hi[b])), mag((lo[program[k, 3]], hi[program[k, 3]]))
            s = 2.0 * n * size_a * size_b
            scale = mag((lo[program[k, 5]], hi[program[k, 5]]))
            first = scale * s
            second = mag((lo[program[k, 6]], hi[program[k, 6]])) * mag((lo[a], hi[a]))
            # (a BLAS may scale an operand by α before the products: the reference one does)
            if not (s <= limit and first <= limit and second <= limit and scale * size_a <= limit
                    and scale * size_b <= limit):
                return False
            v = (-(first + second), first + second)
        else:
            return False
        if not fits(v, limit):
            return False
        lo[k], hi[k] = v
    return True
