"""Triton SpMM: y = x @ W.T for a CSR weight W (n_out, n_in): the sparse path of ``sparse_linear`` on GPUs.

x is transposed to (n_in, B) first, so the batch run a nonzero multiplies is contiguous: every gathered load and
every store is coalesced along the batch, whatever the column pattern. One program computes ``BLOCK_O`` output rows
x ``BLOCK_B`` batch columns, walking each row's nonzeros ``BLOCK_K`` at a time and accumulating in fp32.

The dense-masked alternative (DESIGN §1.1: on GPUs a sparse GEMM loses to a tensor-core dense GEMM below roughly
95% unstructured sparsity) needs no kernel here: ``ops/sparse_linear.py`` keeps a persistent dense weight
(``DenseWorkspace``), rewrites only its nonzeros per call (``csr_dense_scatter_``) and runs one dense GEMM.

The same launcher computes dX = G @ W when given the transposed (CSC) index of W and n_out = W's n_in.
Arguments are validated by the caller (``sparsekern/ops``): x (B, n_in) float32 / bfloat16 / float16,
row_ptr int64 (n_out + 1) with row_ptr[0] == 0 and row_ptr[-1] == nnz, col_idx int32 (nnz) in [0, n_in),
values (nnz) in x's dtype, all on one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Batch columns per program: a power of two from 16 (small batches) to 128 (each gathered nonzero then reads a
# contiguous 512-byte fp32 / 256-byte fp16 run of x).
_MIN_BLOCK_B = 16
_MAX_BLOCK_B = 128
_BLOCK_K = 32  # nonzeros of a row per step: the (BLOCK_K, BLOCK_B) gathered tile is at most 4096 elements
_BLOCK_O = 8  # output rows per program: amortises the program start over several rows


@triton.jit
def _round_from_fp32(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even on every backend.

    GPUs round fp32 -> bf16 to nearest even, but the Triton interpreter truncates; the explicit rounding gives
    the same bits on both (and the same as torch's ``.to(torch.bfloat16)``) for a few integer ops per output.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN instead of carrying
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def _block_b(batch: int) -> int:
    return max(_MIN_BLOCK_B, min(_MAX_BLOCK_B, triton.next_power_of_2(max(batch, 1))))


@triton.jit
def _spmm_fwd_kernel(
    xt_ptr,  # (n_in, B): x transposed, so the batch run of one column is contiguous
    row_ptr_ptr,  # (n_out + 1,) int64
    col_idx_ptr,  # (nnz,) int32
    values_ptr,  # (nnz,)
    yt_ptr,  # (n_out, B): y transposed
    n_out,
    B,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_b = tl.program_id(1)
    b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # int64 offsets: n_in * B may exceed 2**31
    b_mask = b < B
    ks = tl.arange(0, BLOCK_K)
    o_first = pid_o * BLOCK_O
    for r in range(0, tl.minimum(BLOCK_O, n_out - o_first)):
        o = o_first + r
        start = tl.load(row_ptr_ptr + o)
        end = tl.load(row_ptr_ptr + o + 1)
        # Per-lane partial sums; one reduction over the nonzero axis per row instead of one per step.
        acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
        for j0 in range(start, end, BLOCK_K):
            j = j0 + ks
            k_mask = j < end
            cols = tl.load(col_idx_ptr + j, mask=k_mask, other=0).to(tl.int64)
            vals = tl.load(values_ptr + j, mask=k_mask, other=0.0).to(tl.float32)
            xv = tl.load(xt_ptr + cols[:, None] * B + b[None, :], mask=k_mask[:, None] & b_mask[None, :], other=0.0)
            acc += vals[:, None] * xv.to(tl.float32)
        y = tl.sum(acc, axis=0)
        tl.store(yt_ptr + o.to(tl.int64) * B + b, _round_from_fp32(y, yt_ptr.dtype.element_ty), mask=b_mask)


def _spmm_fwd(
    x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, n_out: int
) -> torch.Tensor:
    """Sparse path: y (B, n_out) in x's dtype, y[b, o] = sum_{j in row o} values[j] * x[b, col_idx[j]]."""
    batch, n_in = x.shape
    if batch == 0 or n_out == 0:
        return x.new_zeros((batch, n_out))
    xt = x.t().contiguous()
    yt = torch.empty((n_out, batch), dtype=x.dtype, device=x.device)
    block_b = _block_b(batch)
    grid = (triton.cdiv(n_out, _BLOCK_O), triton.cdiv(batch, block_b))
    _spmm_fwd_kernel[grid](
        xt,
        row_ptr,
        col_idx,
        values,
        yt,
        n_out,
        batch,
        BLOCK_O=_BLOCK_O,
        BLOCK_K=_BLOCK_K,
        BLOCK_B=block_b,
    )
    return yt.t().contiguous()
