"""``sparsekern::csr_dense_scatter_`` and ``sparsekern::csr_dense_gather``: a CSR weight's values into and out of
a dense (n_rows, n_cols) matrix, bit for bit. The dense path of the sparse linear layer scatters W's nonzeros
before its GEMM and gathers dW at the nonzeros after it.

CPU tensors run the C++ kernel (whole rows per worker, int32 columns; 2.5-3x torch's scatter_/index_select on
int64 flat indices, see csrc/cpu/csr_dense.cpp). Other devices use torch's scatter_/index_select on integer
views (``reference.csr_dense_*_reference``): sparsekern has no GPU kernel for this copy. On the CPU without the
compiled extension the same torch code runs, and a warning says so once.
"""

from __future__ import annotations

import torch

from .. import _extension
from ..reference import csr_dense_gather_reference, csr_dense_scatter_reference
from ._backend import warn_once


@torch.library.register_fake("sparsekern::csr_dense_scatter_")
def _scatter_fake(dense, values, row_ptr, col_idx, shadow=None):
    return None


@torch.library.register_fake("sparsekern::csr_dense_gather")
def _gather_fake(dense, row_ptr, col_idx):
    return dense.new_empty(col_idx.shape[0])


def _use_kernel(fn: str, t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return False
    if not _extension.available():
        warn_once(f"sparsekern.{fn}: using torch's scatter/gather ({_extension.unavailable_reason})")
        return False
    return True


def csr_dense_scatter_(dense, values, row_ptr, col_idx, shadow=None) -> None:
    """``dense[r, c] = values[j]`` at every nonzero ``j`` = (r, c) of the CSR index; the rest of ``dense``
    untouched.

    ``shadow``: optional (nnz) copy of the values of the previous scatter into this ``dense`` (which ``dense``
    still holds at the nonzeros). The kernel then writes only the rows whose values differ from it bit-wise;
    either way ``shadow`` ends equal to ``values``.

    Internal: no argument checks, the caller holds a checked ``CSRIndex`` (the C++ kernel scans the index again
    and refuses one that would write outside ``dense``; torch's scatter_ checks its bounds). ``dense`` is a contiguous
    (n_rows, n_cols) tensor in ``values``' dtype, ``row_ptr`` int64 (n_rows + 1) and ``col_idx`` int32 (nnz) the
    CSR index, on ``dense``'s device.
    """
    if _use_kernel("csr_dense_scatter_", dense):
        torch.ops.sparsekern.csr_dense_scatter_(dense, values, row_ptr, col_idx, shadow)
    else:
        csr_dense_scatter_reference(dense, values, row_ptr, col_idx, shadow)


def csr_dense_gather(dense, row_ptr, col_idx) -> torch.Tensor:
    """``values[j] = dense[r, c]`` at every nonzero ``j`` = (r, c) of the CSR index, as (nnz) in ``dense``'s
    dtype. Internal, with the arguments of :func:`csr_dense_scatter_`.
    """
    if _use_kernel("csr_dense_gather", dense):
        return torch.ops.sparsekern.csr_dense_gather(dense, row_ptr, col_idx)
    return csr_dense_gather_reference(dense, row_ptr, col_idx)
