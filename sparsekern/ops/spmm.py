"""``sparsekern::spmm``: y = x @ W.T for a CSR weight W; also dX = G @ W through W's transposed index."""

from __future__ import annotations

import functools

import torch

from .._csr import VALUE_DTYPES, check_csr
from .._validate import check_same_device, check_tensor
from ..reference import spmm_reference
from . import _backend


@torch.library.register_fake("sparsekern::spmm")
def _fake(x, row_ptr, col_idx, values, n_out):
    return x.new_empty(x.shape[0], n_out)


@functools.cache
def _triton_op():
    from ..kernels.spmm import _spmm_fwd

    @torch.library.triton_op("sparsekern::spmm_triton", mutates_args=())
    def spmm_triton(
        x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, n_out: int
    ) -> torch.Tensor:
        return _spmm_fwd(x, row_ptr, col_idx, values, n_out)

    spmm_triton.register_fake(_fake)
    return spmm_triton


def run(backend: str, x, row_ptr, col_idx, values, n_out: int) -> torch.Tensor:
    """spmm on a resolved backend, without argument checks (callers have checked). The Triton and CUDA kernels
    trust the index (reading it would cost a device sync): every caller validated it first (``check_csr`` or
    ``check_index``); the C++ kernel scans it again."""
    if backend == "reference":
        return spmm_reference(x, row_ptr, col_idx, values, n_out)
    if backend == "triton":
        return _triton_op()(x, row_ptr, col_idx, values, n_out)
    return torch.ops.sparsekern.spmm(x, row_ptr, col_idx, values, n_out)


def spmm(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    n_out: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse-dense matmul ``y = x @ W.T`` for ``W`` (n_out, n_in) given in CSR.

    Args:
        x: (B, n_in) contiguous float32, bfloat16 or float16 (float64 runs the reference).
        row_ptr: int64 (n_out + 1), from 0 to nnz, nondecreasing.
        col_idx: int32 (nnz), column of each nonzero, in [0, n_in), ascending and unique within each row
            (the whole index is validated in O(nnz) on every call; ValueError names the fault).
        values: (nnz) values in x's dtype.
        n_out: rows of W.
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        (B, n_out) in x's dtype, accumulated in float32.

    Example::

        >>> from sparsekern.ops.spmm import spmm
        >>> mask = torch.rand(8, 16) < 0.2
        >>> row_ptr, col_idx = sparsekern._csr.csr_from_mask(mask)
        >>> values = torch.randn(int(mask.sum()))
        >>> x = torch.randn(4, 16)
        >>> y = spmm(x, row_ptr, col_idx, values, 8)
        >>> w = torch.zeros(8, 16).masked_scatter_(mask, values)  # the dense weight: CSR order is row-major
        >>> torch.allclose(y, x @ w.t(), atol=1e-6)
        True
    """
    fn = "spmm"
    check_tensor(fn, "x", x, dtypes=VALUE_DTYPES, ndim=2, contiguous=True)
    check_tensor(fn, "values", values, dtypes=(x.dtype,), ndim=1, contiguous=True)
    if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 0:
        raise ValueError(f"{fn}: n_out must be a non-negative int, got {n_out!r}")
    check_csr(fn, row_ptr, col_idx, n_out, x.shape[1])
    if values.numel() != col_idx.numel():
        raise ValueError(
            f"{fn}: values ({values.numel()}) and col_idx ({col_idx.numel()}) must have one entry per nonzero"
        )
    check_same_device(fn, x=x, row_ptr=row_ptr, col_idx=col_idx, values=values)
    return run(_backend.resolve_tensor(fn, x, backend), x, row_ptr, col_idx, values, n_out)
