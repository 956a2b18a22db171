"""``gemm``: C ← α·op(A)·op(B) + β·C for C-contiguous arrays, callable from ``@njit`` code.

``np.dot`` inside Numba always uses α = 1, β = 0.  The generated SGD step needs the general
form: W ← (1 − η·λ)·W − η·δᵀa is one GEMM with α = −η and β = 1 − η·λ, which saves a pass
over every weight matrix and its gradient buffer.  This calls the same BLAS entry point
Numba's ``np.dot`` uses (``numba_xxgemm``, SciPy's BLAS), by symbol name, so functions
that call it stay cacheable (no addresses are baked into the compiled code).
"""

from __future__ import annotations

from numba import njit, types
from numba.core.extending import intrinsic, overload
from numba.np.linalg import _BLAS, ensure_blas

ensure_blas()
_sgemm = _BLAS().numba_xxgemm(types.float32)
_dgemm = _BLAS().numba_xxgemm(types.float64)
_N, _T = ord("n"), ord("t")


def _xxgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """BLAS's sgemm or dgemm, by the element type of the pointers (compiled code only)."""
    raise NotImplementedError("_xxgemm is called from @njit code only")


@overload(_xxgemm)
def _xxgemm_typed(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    # Chosen here, at typing time, rather than by a closure over the BLAS function: Numba's
    # cache keys a function on its closure's pickled contents, which differ from process to
    # process for these objects, so a closure would be compiled again (and its cache index
    # grow) in every process.
    xxgemm, kind = (_sgemm, ord("s")) if a.dtype == types.float32 else (_dgemm, ord("d"))

    def impl(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        return xxgemm(kind, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    return impl


@intrinsic
def _data_pointer(typingctx, arr):
    """The data pointer of an array, typed as a pointer to its elements."""
    sig = types.CPointer(arr.dtype)(arr)

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data

    return sig, codegen


@njit(cache=True, inline="always")
def _lead(M):
    """The leading dimension BLAS reads a C-ordered matrix with: its row stride in elements
    (its width for a contiguous array; at least 1, as BLAS requires)."""
    return max(M.strides[0] // M.itemsize, M.shape[1], 1)


@njit(cache=True)
def gemm(A, ta, B, tb, C, alpha, beta, scalars):
    """C = alpha·op(A)@op(B) + beta·C, op(X) = X.T when its flag is true (float32 or float64).

    ``scalars`` is a length-2 array of C's dtype that passes alpha and beta by address
    (the Fortran BLAS convention).  BLAS is column-major, where a C-ordered matrix is
    its own transpose, so the call computes Cᵀ = op(B)ᵀ·op(A)ᵀ.  Each matrix's rows must be
    contiguous; its leading dimension is its row stride, so a block of columns of a larger
    array (``D[:, r0:r1]``, as a data-parallel step reads δ) is passed as it is.
    """
    m, n = C.shape
    k = A.shape[0] if ta else A.shape[1]
    if m == 0 or n == 0:
        return
    scalars[0] = alpha
    scalars[1] = beta
    status = _xxgemm(_T if tb else _N, _T if ta else _N, n, m, k,
                     _data_pointer(scalars), _data_pointer(B), _lead(B), _data_pointer(A), _lead(A),
                     _data_pointer(scalars[1:]), _data_pointer(C), _lead(C))
    if status != 0:
        raise RuntimeError("BLAS gemm failed")


# The generated modules import the name of their dtype (one function serves both).
sgemm = dgemm = gemm


@intrinsic
def _pointer_at(typingctx, arr, offset):
    """The address of element ``offset`` (counted in elements) of an array's data."""
    sig = types.CPointer(arr.dtype)(arr, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.gep(data, [args[1]])

    return sig, codegen


@njit(cache=True)
def gemm_at(A, a0, ar, ac, lda, ta, B, b0, br, bc, ldb, tb, C, c0, cr, cc, ldc, alpha, beta, scalars):
    """C ← alpha·op(A)·op(B) + beta·C for matrices anywhere in their buffers: X is the
    (rows × cols) matrix whose entry (i, j) is X's flat entry x0 + i·ldx + j (a chunk of the
    columns of a batch-inside buffer: its first column's entry, the buffer's row length).
    Buffers are read flat, as their C-ordered memory."""
    k = ar if ta else ac
    if cr == 0 or cc == 0:
        return
    scalars[0] = alpha
    scalars[1] = beta
    status = _xxgemm(_T if tb else _N, _T if ta else _N, cc, cr, k,
                     _data_pointer(scalars), _pointer_at(B, b0), ldb, _pointer_at(A, a0), lda,
                     _data_pointer(scalars[1:]), _pointer_at(C, c0), ldc)
    if status != 0:
        raise RuntimeError("BLAS gemm failed")


sgemm_at = dgemm_at = gemm_at


@njit(cache=True)
def gemm_block(A, ia, ar, ac, ta, B, ib, br, bc, tb, C, ic, cr, cc, alpha, beta, scalars):
    """C[ic] ← alpha·op(A[ia])·op(B[ib]) + beta·C[ic], where X[i] is the block that starts
    at index i of X's first axis, read as a C-ordered (rows × cols) matrix (shapes given
    as ar, ac …): one sample of a (batch, …) buffer, or a whole weight tensor (i = 0).

    The rows of every buffer are contiguous (they are work buffers or their leading
    slices), so a block is addressed by its first element alone.
    """
    gemm_at(A, ia * (A.strides[0] // A.itemsize), ar, ac, ac, ta, B, ib * (B.strides[0] // B.itemsize), br, bc, bc, tb,
            C, ic * (C.strides[0] // C.itemsize), cr, cc, cc, alpha, beta, scalars)


sgemm_block = dgemm_block = gemm_block
