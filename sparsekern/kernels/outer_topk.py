"""Triton outer_topk: the k largest |g.T @ x| outside an excluded CSR pattern, without the dense scores.

A kernel computes a ``BLOCK_O x BLOCK_I`` tile of scores per program and does one of four things with it
(``MODE``, in ``_select_tile``); ``_outer_topk_fwd`` launches it up to four times, each pass recomputing the tiles
instead of storing them, so memory stays O(k + n_out + histograms). Two kernels differ only in how they compute
the tile: ``_outer_topk_fwd_kernel`` (exact) and ``_outer_topk_fast_fwd_kernel`` (``tl.dot``, see below).

1. ``_HIST_HI``: histogram of the high 15 bits of every candidate's key (keys as in csrc/include/sparsekern/
   outer_topk.h: the bits of |s|; NaN keys counted in an extra bin, which raises).
2. ``_HIST_LO``: histogram of the low 16 bits of the keys in the bucket that holds the k-th largest. The two
   histograms give the exact k-th largest key T, the number of keys above it and the number equal to it.
3. ``_HIST_TIE_ROWS``: only when more keys equal T than the result still needs: how many equal T in each row,
   so that the lowest flat indices among them (the tie rule) lie in rows up to a cut-off row.
4. ``_COMPACT``: writes every candidate above T, and every one equal to T up to the cut-off row, to compact
   lists (one atomic per program, offsets from a cumulative sum). The host finishes with sorts over O(k + n_in)
   entries.

Exact: scores are summed over the batch in order with a rounded product and a rounded sum per step, the
definition every backend shares (ops/outer_topk.py); launches pass ``enable_fp_fusion=False`` so the GPU compiler
does not fuse them (the interpreter never does).

Fast: ``tl.dot`` over 32 batch rows at a time, float32 accumulation, on tensor cores: float32 inputs enter as TF32
(10-bit mantissa), bf16 / fp16 as they are. The result is the exact top-k of these scores (same passes, same
tie rule), and the same bits run to run on one GPU: fixed blocking, no atomics on scores. Rounding bound against
the float64 score S(o, i), with A(o, i) = sum_b |g[b, o] * x[b, i]| (barring underflow):
    |score - |S|| <= (e_in + (B + 1) * 2**-22) * A,  e_in = 2**-9 + 2**-19 for float32, 0 for bf16 / fp16
(e_in: both factors truncated or rounded to TF32, relative error <= 2**-10 each; bf16 / fp16 products are exact in
float32; (B + 1) * 2**-22 is twice the first-order bound of B float32 additions in any order and rounding mode).
Under the interpreter ``tl.dot`` is a float32 numpy matmul: the same bound holds.

Exclusion lookups are binary searches in the row's sorted columns.
Arguments are validated by the caller: x (B, n_in) and g (B, n_out) contiguous float32 / bfloat16 / float16,
row_ptr int64 (n_out + 1), col_idx int32 with columns ascending and unique per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._backend import triton_interpret

_HIST_HI, _HIST_LO, _HIST_TIE_ROWS, _COMPACT = 0, 1, 2, 3
_LO_BITS = 16
_HI_BINS = 1 << (31 - _LO_BITS)  # keys are 31 bits
_LO_BINS = 1 << _LO_BITS
_INF_KEY = 0x7F800000  # the key of +inf; larger keys are NaN
# The same, as constants the kernel may read (Triton kernels see globals only as tl.constexpr).
_K_LO_BITS = tl.constexpr(_LO_BITS)
_K_HI_BINS = tl.constexpr(_HI_BINS)
_K_LO_BINS = tl.constexpr(_LO_BINS)
_K_INF_KEY = tl.constexpr(_INF_KEY)
_EXACT_BLOCKS = {"BLOCK_O": 32, "BLOCK_I": 64, "BLOCK_N": 32 * 64}
# tl.dot needs every block >= 16; 64 x 64 tiles over 32 batch rows suit one 4-warp program's tensor-core MMAs.
_FAST_BLOCKS = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_N": 64 * 64, "BLOCK_B": 32}


@triton.jit
def _select_tile(
    key,  # (BLOCK_O, BLOCK_I) int32: the bits of |score|
    o,
    i,
    row_ptr_ptr,
    col_idx_ptr,
    hist_ptr,
    out_idx_ptr,
    out_key_ptr,
    counter_ptr,
    n_out,
    n_in,
    search_steps,
    hi,
    threshold,
    last_tie_row,
    capacity,
    MODE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """What a pass does with one tile of keys (``MODE``); the same for every way of computing the scores."""
    o_ok = o < n_out
    i_ok = i < n_in
    # Excluded: a binary search for i among the row's sorted columns [start, end).
    start = tl.load(row_ptr_ptr + o, mask=o_ok, other=0)
    end = tl.load(row_ptr_ptr + o + 1, mask=o_ok, other=0)
    lo = tl.broadcast_to(start[:, None], (BLOCK_O, BLOCK_I))
    hi_ = tl.broadcast_to(end[:, None], (BLOCK_O, BLOCK_I))
    col = i[None, :]
    for _ in range(0, search_steps):
        active = lo < hi_
        mid = (lo + hi_) // 2
        c = tl.load(col_idx_ptr + mid, mask=active, other=0)
        lo = tl.where(active & (c < col), mid + 1, lo)
        hi_ = tl.where(active & (c >= col), mid, hi_)
    found = lo < end[:, None]
    c = tl.load(col_idx_ptr + lo, mask=found, other=-1)
    candidate = o_ok[:, None] & i_ok[None, :] & ~(found & (c == col))

    if MODE == 0:  # _HIST_HI
        bucket = tl.where(key > _K_INF_KEY, _K_HI_BINS, key >> _K_LO_BITS)
        tl.atomic_add(hist_ptr + bucket, tl.full((BLOCK_O, BLOCK_I), 1, tl.int64), mask=candidate)
    elif MODE == 1:  # _HIST_LO
        sel = candidate & ((key >> _K_LO_BITS) == hi)
        tl.atomic_add(hist_ptr + (key & (_K_LO_BINS - 1)), tl.full((BLOCK_O, BLOCK_I), 1, tl.int64), mask=sel)
    elif MODE == 2:  # _HIST_TIE_ROWS
        rows = tl.broadcast_to(o[:, None], (BLOCK_O, BLOCK_I))
        tl.atomic_add(hist_ptr + rows, tl.full((BLOCK_O, BLOCK_I), 1, tl.int64), mask=candidate & (key == threshold))
    else:  # _COMPACT
        flat = o[:, None].to(tl.int64) * n_in + i[None, :]
        above = candidate & (key > threshold)
        tie = candidate & (key == threshold) & (o[:, None] <= last_tie_row)
        flat = tl.reshape(flat, (BLOCK_N,))
        key = tl.reshape(key, (BLOCK_N,))
        above = tl.reshape(above, (BLOCK_N,))
        tie = tl.reshape(tie, (BLOCK_N,))
        # One atomic per program claims a run of slots; a cumulative sum places each entry in it. The slots'
        # order varies run to run; the host's sorts make the result independent of it.
        pos = tl.cumsum(above.to(tl.int64), 0) - 1
        base = tl.atomic_add(counter_ptr, tl.sum(above.to(tl.int64), 0))
        tl.store(out_idx_ptr + base + pos, flat, mask=above)
        tl.store(out_key_ptr + base + pos, key, mask=above)
        pos = tl.cumsum(tie.to(tl.int64), 0) - 1
        base = tl.atomic_add(counter_ptr + 1, tl.sum(tie.to(tl.int64), 0))
        tl.store(out_idx_ptr + capacity + base + pos, flat, mask=tie)


@triton.jit
def _outer_topk_fwd_kernel(
    x_ptr,  # (B, n_in)
    g_ptr,  # (B, n_out)
    row_ptr_ptr,  # (n_out + 1,) int64: excluded pattern
    col_idx_ptr,  # (nnz,) int32, ascending per row
    hist_ptr,  # int64 histogram of this pass (HIST modes)
    out_idx_ptr,  # (2, capacity) int64: flat indices above T, then equal to T (COMPACT)
    out_key_ptr,  # (capacity,) int32: keys of the entries above T (COMPACT)
    counter_ptr,  # (2,) int64: entries written to each list (COMPACT)
    B,
    n_out,
    n_in,
    search_steps,  # ceil(log2(longest excluded row + 1))
    hi,  # HIST_LO: the selected high bucket
    threshold,  # COMPACT / HIST_TIE_ROWS: the k-th largest key T
    last_tie_row,  # COMPACT: ties are kept in rows <= this
    capacity,
    MODE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,  # BLOCK_O * BLOCK_I
):
    """Exact scores: the in-order float32 sum every backend shares."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o < n_out
    i_ok = i < n_in
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    g_row = g_ptr + o  # pointers advance a row per step: 64-bit, whatever B * n
    x_row = x_ptr + i
    for _ in range(0, B):
        gv = tl.load(g_row, mask=o_ok, other=0.0).to(tl.float32)
        xv = tl.load(x_row, mask=i_ok, other=0.0).to(tl.float32)
        acc = acc + gv[:, None] * xv[None, :]  # a rounded product, then a rounded sum
        g_row += n_out
        x_row += n_in
    key = tl.abs(acc).to(tl.int32, bitcast=True)
    _select_tile(
        key, o, i, row_ptr_ptr, col_idx_ptr, hist_ptr, out_idx_ptr, out_key_ptr, counter_ptr, n_out, n_in,
        search_steps, hi, threshold, last_tie_row, capacity, MODE, BLOCK_O, BLOCK_I, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _outer_topk_fast_fwd_kernel(
    x_ptr,
    g_ptr,
    row_ptr_ptr,
    col_idx_ptr,
    hist_ptr,
    out_idx_ptr,
    out_key_ptr,
    counter_ptr,
    B,
    n_out,
    n_in,
    search_steps,
    hi,
    threshold,
    last_tie_row,
    capacity,
    MODE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,  # batch rows per tl.dot (>= 16)
    DOT_F32: tl.constexpr,  # upcast the tiles to float32 before tl.dot (see _dot_in_f32)
):
    """Fast scores: the tile is g[:, o].T @ x[:, i] by ``tl.dot`` over BLOCK_B batch rows at a time, on tensor
    cores (TF32 inputs for float32, bf16 / fp16 natively), float32 accumulation. The blocking and the order of
    the dots are fixed, so a given GPU and Triton give the same bits every run; the arguments as for the exact
    kernel."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok = o < n_out
    i_ok = i < n_in
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        row = b.to(tl.int64)[:, None]  # 64-bit offsets, whatever B * n
        gt = tl.load(g_ptr + row * n_out + o[None, :], mask=b_ok[:, None] & o_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + row * n_in + i[None, :], mask=b_ok[:, None] & i_ok[None, :], other=0.0)
        if DOT_F32:
            gt = gt.to(tl.float32)
            xt = xt.to(tl.float32)
        # zero rows past B add nothing; (BLOCK_O, BLOCK_B) @ (BLOCK_B, BLOCK_I) on tensor cores
        acc = tl.dot(tl.trans(gt), xt, acc, input_precision="tf32", out_dtype=tl.float32)
    key = tl.abs(acc).to(tl.int32, bitcast=True)
    _select_tile(
        key, o, i, row_ptr_ptr, col_idx_ptr, hist_ptr, out_idx_ptr, out_key_ptr, counter_ptr, n_out, n_in,
        search_steps, hi, threshold, last_tie_row, capacity, MODE, BLOCK_O, BLOCK_I, BLOCK_N,
    )  # fmt: skip


def _dot_in_f32(x: torch.Tensor) -> bool:
    """The Triton interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those integers (triton 3.8), so
    there bf16 tiles are upcast first: the same scores, as bf16 products are exact in float32. On a GPU bf16
    goes to the tensor cores as it is."""
    return x.dtype == torch.bfloat16 and triton_interpret()


def _select_bucket(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket, above): the bucket holding the k-th largest of the histogrammed keys (1 <= k <= total) and the
    count in higher buckets (the host side of ``outer_topk::select_bucket`` in outer_topk.h)."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bucket = int((at_or_above >= k).nonzero().max())
    return bucket, int(at_or_above[bucket] - counts[bucket])


def _outer_topk_fwd(
    x: torch.Tensor, g: torch.Tensor, k: int, row_ptr: torch.Tensor, col_idx: torch.Tensor, *, fast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64 (k), score float32 (k)): the k largest scores outside the pattern, ties by lower index.
    fast: scores by ``tl.dot`` (``_outer_topk_fast_fwd_kernel``), else the exact in-order sum."""
    batch, n_in = x.shape
    n_out = g.shape[1]
    device = x.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)
    longest = int((row_ptr[1:] - row_ptr[:-1]).max()) if n_out else 0
    search_steps = max(1, longest).bit_length()
    if fast:
        kernel, blocks = _outer_topk_fast_fwd_kernel, {**_FAST_BLOCKS, "DOT_F32": _dot_in_f32(x)}
    else:
        kernel, blocks = _outer_topk_fwd_kernel, _EXACT_BLOCKS
    grid = (triton.cdiv(n_out, blocks["BLOCK_O"]), triton.cdiv(n_in, blocks["BLOCK_I"]))
    unused_i64 = torch.empty(1, dtype=torch.int64, device=device)
    unused_i32 = torch.empty(1, dtype=torch.int32, device=device)

    def launch(mode, hist, hi=0, threshold=0, last_tie_row=0, out_idx=unused_i64, out_key=unused_i32, counter=None):
        kernel[grid](
            x,
            g,
            row_ptr,
            col_idx,
            hist,
            out_idx,
            out_key,
            unused_i64 if counter is None else counter,
            batch,
            n_out,
            n_in,
            search_steps,
            hi,
            threshold,
            last_tie_row,
            out_idx.numel() // 2,
            MODE=mode,
            **blocks,
            enable_fp_fusion=False,
        )

    hist_hi = torch.zeros(_HI_BINS + 1, dtype=torch.int64, device=device)
    launch(_HIST_HI, hist_hi)
    if int(hist_hi[_HI_BINS]):
        raise ValueError("outer_topk: a score overflowed float32 to NaN (inf - inf); scale x or g down")
    hi, above_hi = _select_bucket(hist_hi[:_HI_BINS], k)
    hist_lo = torch.zeros(_LO_BINS, dtype=torch.int64, device=device)
    launch(_HIST_LO, hist_lo, hi=hi)
    lo, above_lo = _select_bucket(hist_lo, k - above_hi)
    threshold = hi << _LO_BITS | lo
    n_above = above_hi + above_lo
    need, n_ties = k - n_above, int(hist_lo[lo])
    last_tie_row = n_out - 1
    if need < n_ties:  # keep ties only in the rows that hold the `need` lowest flat indices among them
        tie_rows = torch.zeros(n_out, dtype=torch.int64, device=device)
        launch(_HIST_TIE_ROWS, tie_rows, threshold=threshold)
        through = tie_rows.cumsum(0)
        last_tie_row = int((through >= need).nonzero().min())
        n_ties = int(through[last_tie_row])
    capacity = max(n_above, n_ties)
    out_idx = torch.empty(2, capacity, dtype=torch.int64, device=device)
    out_key = torch.empty(capacity, dtype=torch.int32, device=device)
    counter = torch.zeros(2, dtype=torch.int64, device=device)
    launch(
        _COMPACT,
        unused_i64,
        threshold=threshold,
        last_tie_row=last_tie_row,
        out_idx=out_idx,
        out_key=out_key,
        counter=counter,
    )
    ties = torch.sort(out_idx[1, :n_ties]).values[:need]
    index = torch.cat([out_idx[0, :n_above], ties])
    key = torch.cat([out_key[:n_above], torch.full((need,), threshold, dtype=torch.int32, device=device)])
    by_index = torch.sort(index).indices
    order = by_index[torch.sort(key[by_index], descending=True, stable=True).indices]
    return index[order], key[order].view(torch.float32)
