"""Triton ELL SDDMM: the gradient of a constant fan-in weight's values, out[o, t] = sum_b g[b, o] * x[b, cols[o, t]].

g (B, n_out) and x (B, n_in) are transposed to (n_out, B) and (n_in, B) first, so every load is a contiguous batch
run. One program owns a (BLOCK_O rows, BLOCK_T nonzeros) tile of the (n_out, k) output: per batch step it loads the
(BLOCK_O, BLOCK_B) tile of g once and reuses it, from registers, for all BLOCK_T nonzeros of each row (the equal rows
make the tile rectangular), gathers the (BLOCK_O, BLOCK_T, BLOCK_B) tile of x, and accumulates in fp32; the batch
axis is reduced once at the end. Deterministic: a fixed summation order per output.

Arguments are validated by the caller (``sparsekern/ops``): g (B, n_out) and x (B, n_in) of one dtype (float32 /
bfloat16 / float16), cols int32 (n_out, k) in [0, n_in), contiguous, on one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .spmm import _round_from_fp32

_TILE = 4096  # elements of the gathered tile and of the fp32 accumulator
_MAX_BLOCK_B = 64
_MAX_BLOCK_T = 16
_MAX_BLOCK_O = 64  # keeps enough programs for small batches


def _ell_sddmm_blocks(batch: int, k: int) -> tuple[int, int, int]:
    block_b = min(_MAX_BLOCK_B, triton.next_power_of_2(max(batch, 1)))
    block_t = min(_MAX_BLOCK_T, triton.next_power_of_2(max(k, 1)))
    block_o = min(_MAX_BLOCK_O, max(1, _TILE // (block_b * block_t)))
    return block_o, block_t, block_b


@triton.jit
def _ell_sddmm_fwd_kernel(
    gt_ptr,  # (n_out, B): g transposed
    xt_ptr,  # (n_in, B): x transposed
    cols_ptr,  # (n_out, K) int32
    out_ptr,  # (n_out, K)
    n_out,
    B,
    K,
    BLOCK_O: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    # int64 offsets: n_in * B and n_out * K may exceed 2**31
    o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o_mask = o < n_out
    ot_mask = o_mask[:, None] & (t < K)[None, :]
    j = o[:, None] * K + t[None, :]
    x_rows = xt_ptr + tl.load(cols_ptr + j, mask=ot_mask, other=0).to(tl.int64) * B  # (BLOCK_O, BLOCK_T)
    g_rows = gt_ptr + o * B
    acc = tl.zeros((BLOCK_O, BLOCK_T, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_mask = b < B
        gv = tl.load(g_rows[:, None] + b[None, :], mask=o_mask[:, None] & b_mask[None, :], other=0.0)
        xv = tl.load(x_rows[:, :, None] + b[None, None, :], mask=ot_mask[:, :, None] & b_mask[None, None, :], other=0.0)
        acc += gv.to(tl.float32)[:, None, :] * xv.to(tl.float32)
    tl.store(out_ptr + j, _round_from_fp32(tl.sum(acc, axis=2), out_ptr.dtype.element_ty), mask=ot_mask)


def _ell_sddmm_fwd(g: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out (n_out, k) in g's dtype: out[o, t] = sum_b g[b, o] * x[b, cols[o, t]], accumulated in fp32."""
    batch, _ = g.shape
    n_out, k = cols.shape
    if batch == 0 or cols.numel() == 0:
        return g.new_zeros((n_out, k))
    gt = g.t().contiguous()
    xt = x.t().contiguous()
    cols = cols.contiguous()
    out = torch.empty((n_out, k), dtype=g.dtype, device=g.device)
    block_o, block_t, block_b = _ell_sddmm_blocks(batch, k)
    grid = (triton.cdiv(n_out, block_o), triton.cdiv(k, block_t))
    _ell_sddmm_fwd_kernel[grid](gt, xt, cols, out, n_out, batch, k, BLOCK_O=block_o, BLOCK_T=block_t, BLOCK_B=block_b)
    return out
