"""``sparsekern::sddmm``: the gradient of a CSR weight's values, only at its nonzeros (never dense)."""

from __future__ import annotations

import functools

import torch

from .._csr import VALUE_DTYPES, check_csr
from .._validate import check_same_device, check_tensor
from ..reference import sddmm_reference
from ._backend import resolve_tensor


@torch.library.register_fake("sparsekern::sddmm")
def _fake(g, x, row_ptr, col_idx):
    return x.new_empty(col_idx.shape[0])


@functools.cache
def _triton_op():
    from ..kernels.sddmm import _sddmm_fwd

    @torch.library.triton_op("sparsekern::sddmm_triton", mutates_args=())
    def sddmm_triton(g: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
        return _sddmm_fwd(g, x, row_ptr, col_idx)

    sddmm_triton.register_fake(_fake)
    return sddmm_triton


def run(backend: str, g, x, row_ptr, col_idx) -> torch.Tensor:
    """sddmm on a resolved backend, without argument checks (see :func:`sparsekern.ops.spmm.run`: the index was
    validated by every caller; the Triton and CUDA kernels trust it, the C++ one scans it again)."""
    if backend == "reference":
        return sddmm_reference(g, x, row_ptr, col_idx)
    if backend == "triton":
        return _triton_op()(g, x, row_ptr, col_idx)
    return torch.ops.sparsekern.sddmm(g, x, row_ptr, col_idx)


def sddmm(
    g: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Sampled dense-dense matmul: ``out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]]`` at W's nonzeros.

    This is dL/dvalues of ``y = x @ W.T`` with ``g = dL/dy``, computed without forming the dense
    (n_out, n_in) gradient.

    Args:
        g: (B, n_out) contiguous float32, bfloat16 or float16 (float64 runs the reference).
        x: (B, n_in), same dtype.
        row_ptr, col_idx: W's CSR index, as for :func:`spmm`.
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        (nnz) in the inputs' dtype, accumulated in float32.
    """
    fn = "sddmm"
    check_tensor(fn, "g", g, dtypes=VALUE_DTYPES, ndim=2, contiguous=True)
    check_tensor(fn, "x", x, dtypes=(g.dtype,), ndim=2, contiguous=True)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: g and x must have the same batch size, got {g.shape[0]} and {x.shape[0]}")
    check_csr(fn, row_ptr, col_idx, g.shape[1], x.shape[1])
    check_same_device(fn, g=g, x=x, row_ptr=row_ptr, col_idx=col_idx)
    return run(resolve_tensor(fn, x, backend), g, x, row_ptr, col_idx)
