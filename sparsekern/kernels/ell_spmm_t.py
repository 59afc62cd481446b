"""Triton ELL SpMM with the transposed weight: dX = G @ W for a constant fan-in W (n_out, n_in) in cols / values.

dX is a scatter over W's rows (column i of W collects the (o, t) with cols[o, t] == i). It is computed as a gather,
deterministically and without atomics: the launcher builds W's transposed index on the device, a stable sort of the
flattened cols (``perm``: for every input column its nonzeros' flat positions o * k + t, in ascending o) and the
column pointers ``col_ptr`` (searchsorted of 0..n_in in the sorted cols), O(nnz) work and no host sync. One
program then computes ``BLOCK_I`` input columns x ``BLOCK_B`` batch columns, each input column summing its
nonzeros ``BLOCK_J`` (32 to 128, more for small batches) at a time in fp32 in ascending o: the same bits on every run.

g is transposed to (n_out, B) first, so every gathered row of g is a contiguous batch run; dx is written as
(n_in, B) and transposed back. The values are read through perm inside the kernel (no permuted copy).

A caller that runs many backward passes on one mask can build the index once with :func:`_ell_transpose_index`
and pass it as ``index=``; the result is the same.

Arguments are validated by the caller (``sparsekern/ops``): g (B, n_out) float32 / bfloat16 / float16, cols
int32 (n_out, k) in [0, n_in), values (n_out, k) in g's dtype, all contiguous on one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spmm import _round_from_fp32

_MAX_BLOCK_B = 128  # a gathered row of g is a contiguous 512-byte fp32 / 256-byte fp16 run
_TILE = 4096  # elements of the gathered (BLOCK_J, BLOCK_B) tile and of the fp32 accumulator
_MIN_BLOCK_J = 32
_MAX_BLOCK_J = 128  # small batches spend the tile on nonzeros instead of batch lanes that do not exist
_BLOCK_I = 8  # input columns per program


def _ell_transpose_index(cols: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W's transposed index from its ELL cols (n_out, k): (col_ptr int64 (n_in + 1), perm (nnz) int32 or int64).

    perm lists, input column by input column, the flat positions o * k + t of the nonzeros in that column, in
    ascending o (the sort is stable); col_ptr[i]:col_ptr[i + 1] is column i's run of perm."""
    flat = cols.reshape(-1)
    sorted_cols, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(n_in + 1, dtype=sorted_cols.dtype, device=cols.device)
    col_ptr = torch.searchsorted(sorted_cols, bounds)
    if flat.numel() < 2**31:
        perm = perm.to(torch.int32)  # half the index reads
    return col_ptr, perm


@triton.jit
def _ell_spmm_t_fwd_kernel(
    gt_ptr,  # (n_out, B): g transposed
    col_ptr_ptr,  # (n_in + 1,) int64
    perm_ptr,  # (nnz,) int32 / int64: flat positions o * K + t, column by column
    values_ptr,  # (n_out * K,)
    dxt_ptr,  # (n_in, B): dx transposed
    n_in,
    B,
    K,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_b = tl.program_id(1)
    b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # int64 offsets: n_out * B may exceed 2**31
    b_mask = b < B
    js = tl.arange(0, BLOCK_J)
    i_first = pid_i * BLOCK_I
    for r in range(0, tl.minimum(BLOCK_I, n_in - i_first)):
        i = i_first + r
        start = tl.load(col_ptr_ptr + i)
        end = tl.load(col_ptr_ptr + i + 1)
        acc = tl.zeros((BLOCK_J, BLOCK_B), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_J):
            j = j0 + js
            j_mask = j < end
            p = tl.load(perm_ptr + j, mask=j_mask, other=0).to(tl.int64)
            o = p // K
            vals = tl.load(values_ptr + p, mask=j_mask, other=0.0).to(tl.float32)
            gv = tl.load(gt_ptr + o[:, None] * B + b[None, :], mask=j_mask[:, None] & b_mask[None, :], other=0.0)
            acc += vals[:, None] * gv.to(tl.float32)
        dx = tl.sum(acc, axis=0)
        tl.store(dxt_ptr + i.to(tl.int64) * B + b, _round_from_fp32(dx, dxt_ptr.dtype.element_ty), mask=b_mask)


def _ell_spmm_t_fwd(
    g: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    n_in: int,
    *,
    index: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """dx (B, n_in) in g's dtype: dx[b, i] = sum over cols[o, t] == i of g[b, o] * values[o, t], in fp32.

    Deterministic (no atomics). ``index``: W's transposed index from ``_ell_transpose_index(cols, n_in)``, built
    here when not given."""
    batch, _ = g.shape
    _, k = cols.shape
    if batch == 0 or n_in == 0 or cols.numel() == 0:
        return g.new_zeros((batch, n_in))
    col_ptr, perm = index if index is not None else _ell_transpose_index(cols, n_in)
    gt = g.t().contiguous()
    values = values.contiguous()
    dxt = torch.empty((n_in, batch), dtype=g.dtype, device=g.device)
    block_b = min(_MAX_BLOCK_B, triton.next_power_of_2(batch))
    block_j = min(_MAX_BLOCK_J, max(_MIN_BLOCK_J, _TILE // block_b))
    grid = (triton.cdiv(n_in, _BLOCK_I), triton.cdiv(batch, block_b))
    _ell_spmm_t_fwd_kernel[grid](
        gt, col_ptr, perm, values, dxt, n_in, batch, k, BLOCK_I=_BLOCK_I, BLOCK_J=block_j, BLOCK_B=block_b
    )
    return dxt.t().contiguous()
