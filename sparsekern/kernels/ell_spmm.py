"""Triton ELL SpMM: y = x @ W.T for a constant fan-in weight W (n_out, n_in) stored as cols / values (n_out, k).

Every row holds exactly k nonzeros, so there is no row_ptr and every program does the same work: one program
computes ``BLOCK_O`` output rows x ``BLOCK_B`` batch columns, walking the k nonzeros of its rows ``BLOCK_T`` at a
time (one trip count for all programs, perfect load balance). Each step loads a (BLOCK_O, BLOCK_T) tile of cols and
values and gathers a (BLOCK_O, BLOCK_T, BLOCK_B) tile of x; products accumulate in fp32 per lane and are reduced
over the nonzero axis once, at the end.

x is transposed to (n_in, B) first, so the batch run a nonzero multiplies is contiguous (coalesced gathers whatever
the column pattern). y is stored straight into its (B, n_out) layout: the BLOCK_O consecutive rows of one batch
column are one contiguous run, so no output transpose is needed.

Tile shape by batch: large batches tile the batch (BLOCK_B 64) and take a few nonzeros per step; small batches
(online inference, B = 1..16) spend the tile on nonzeros and rows instead, so one program reuses each loaded cols /
values tile for its whole batch and never wastes lanes on batch columns that do not exist.

Arguments are validated by the caller (``sparsekern/ops``): x (B, n_in) float32 / bfloat16 / float16, cols int32
(n_out, k) in [0, n_in), values (n_out, k) in x's dtype, all contiguous on one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spmm import _round_from_fp32

_TILE = 2048  # elements of the gathered (BLOCK_O, BLOCK_T, BLOCK_B) tile and of the fp32 accumulator
_MAX_BLOCK_B = 64  # a gathered nonzero reads a contiguous 256-byte fp32 / 128-byte fp16 run of x
_MAX_BLOCK_T = 32
_MAX_BLOCK_O = 64


def _ell_blocks(batch: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_T, BLOCK_B): powers of two whose product is at most _TILE, none larger than needed."""
    block_b = min(_MAX_BLOCK_B, triton.next_power_of_2(max(batch, 1)))
    # At least 4 rows per program (so a program's rows share the launch cost), the rest on nonzeros.
    block_t = min(_MAX_BLOCK_T, triton.next_power_of_2(max(k, 1)), max(1, _TILE // (block_b * 4)))
    block_o = min(_MAX_BLOCK_O, max(1, _TILE // (block_b * block_t)))
    return block_o, block_t, block_b


@triton.jit
def _ell_spmm_fwd_kernel(
    xt_ptr,  # (n_in, B): x transposed, so the batch run of one column is contiguous
    cols_ptr,  # (n_out, K) int32
    values_ptr,  # (n_out, K)
    y_ptr,  # (B, n_out)
    n_out,
    B,
    K,
    BLOCK_O: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_b = tl.program_id(1)
    # int64 offsets: n_in * B and n_out * K may exceed 2**31
    o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    o_mask = o < n_out
    b_mask = b < B
    ts = tl.arange(0, BLOCK_T)
    row = o * K
    acc = tl.zeros((BLOCK_O, BLOCK_T, BLOCK_B), dtype=tl.float32)
    for t0 in range(0, K, BLOCK_T):
        t = t0 + ts
        ot_mask = o_mask[:, None] & (t < K)[None, :]
        j = row[:, None] + t[None, :]
        cols = tl.load(cols_ptr + j, mask=ot_mask, other=0).to(tl.int64)
        vals = tl.load(values_ptr + j, mask=ot_mask, other=0.0).to(tl.float32)
        xv = tl.load(
            xt_ptr + cols[:, :, None] * B + b[None, None, :],
            mask=ot_mask[:, :, None] & b_mask[None, None, :],
            other=0.0,
        )
        acc += vals[:, :, None] * xv.to(tl.float32)
    y = tl.sum(acc, axis=1)  # (BLOCK_O, BLOCK_B)
    tl.store(
        y_ptr + b[None, :] * n_out + o[:, None],
        _round_from_fp32(y, y_ptr.dtype.element_ty),
        mask=o_mask[:, None] & b_mask[None, :],
    )


def _ell_spmm_fwd(x: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y (B, n_out) in x's dtype: y[b, o] = sum_t values[o, t] * x[b, cols[o, t]], accumulated in fp32."""
    batch, _ = x.shape
    n_out, k = cols.shape
    if batch == 0 or n_out == 0 or k == 0:
        return x.new_zeros((batch, n_out))
    xt = x.t().contiguous()
    cols = cols.contiguous()
    values = values.contiguous()
    y = torch.empty((batch, n_out), dtype=x.dtype, device=x.device)
    block_o, block_t, block_b = _ell_blocks(batch, k)
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(batch, block_b))
    _ell_spmm_fwd_kernel[grid](xt, cols, values, y, n_out, batch, k, BLOCK_O=block_o, BLOCK_T=block_t, BLOCK_B=block_b)
    return y
