"""Triton SDDMM: the gradient of a CSR weight's values, out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]].

g (B, n_out) and x (B, n_in) are transposed to (n_out, B) and (n_in, B) first, so each nonzero reads two
contiguous batch runs (coalesced loads whatever the column pattern). One program owns ``BLOCK_J`` consecutive
nonzeros, which balances the work whatever the row lengths; the row of every nonzero comes from an int32
array the launcher expands from row_ptr. Products accumulate in fp32 over the batch, ``BLOCK_B`` at a time.

Arguments are validated by the caller (``sparsekern/ops``): g (B, n_out) and x (B, n_in) of one dtype
(float32 / bfloat16 / float16), row_ptr int64 (n_out + 1) with row_ptr[-1] == nnz, col_idx int32 (nnz).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spmm import _round_from_fp32

_BLOCK_J = 64  # nonzeros per program
_MIN_BLOCK_B = 16
_MAX_BLOCK_B = 64  # the (BLOCK_J, BLOCK_B) fp32 accumulator stays at 4096 elements


@triton.jit
def _sddmm_fwd_kernel(
    gt_ptr,  # (n_out, B): g transposed
    xt_ptr,  # (n_in, B): x transposed
    rows_ptr,  # (nnz,) int32: the row of every nonzero
    col_idx_ptr,  # (nnz,) int32
    out_ptr,  # (nnz,)
    nnz,
    B,
    BLOCK_J: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < nnz
    # int64 offsets: n_in * B may exceed 2**31
    g_rows = gt_ptr + tl.load(rows_ptr + j, mask=j_mask, other=0).to(tl.int64) * B
    x_rows = xt_ptr + tl.load(col_idx_ptr + j, mask=j_mask, other=0).to(tl.int64) * B
    acc = tl.zeros((BLOCK_J, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = j_mask[:, None] & (b < B)[None, :]
        gv = tl.load(g_rows[:, None] + b[None, :], mask=mask, other=0.0)
        xv = tl.load(x_rows[:, None] + b[None, :], mask=mask, other=0.0)
        acc += gv.to(tl.float32) * xv.to(tl.float32)
    tl.store(out_ptr + j, _round_from_fp32(tl.sum(acc, axis=1), out_ptr.dtype.element_ty), mask=j_mask)


def _sddmm_fwd(g: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """out (nnz,) in g's dtype: out[j] = sum_b g[b, row(j)] * x[b, col_idx[j]], accumulated in fp32."""
    batch, n_out = g.shape
    nnz = col_idx.numel()
    if nnz == 0 or batch == 0:
        return g.new_zeros((nnz,))
    # The row of every nonzero; nnz is known on the host, so output_size spares a device sync.
    rows = torch.repeat_interleave(
        torch.arange(n_out, dtype=torch.int32, device=g.device), row_ptr.diff(), output_size=nnz
    )
    gt = g.t().contiguous()
    xt = x.t().contiguous()
    out = torch.empty((nnz,), dtype=g.dtype, device=g.device)
    block_b = max(_MIN_BLOCK_B, min(_MAX_BLOCK_B, triton.next_power_of_2(batch)))
    _sddmm_fwd_kernel[(triton.cdiv(nnz, _BLOCK_J),)](
        gt, xt, rows, col_idx, out, nnz, batch, BLOCK_J=_BLOCK_J, BLOCK_B=block_b
    )
    return out
