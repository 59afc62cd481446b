"""Triton inverse of the 2:4 (fp32: 1:2) compression: CUTLASS semi-structured layout back to dense.

Bit-identical to ``torch.sparse._semi_structured_conversions.sparse_semi_structured_to_dense_cutlass`` and
to the C++ ``sparsekern::semi24_decompress``: kept values are copied as raw bits, every other position is
written as +0, so the output needs no separate zero-fill pass.

Same tiling as the compress kernel: one program per metadata row group (32 rows, int8: 16) x ``BLOCK_C``
metadata columns, whose metadata is read as contiguous runs. Codes that name no valid column pair are
reported through a single atomic_min; the dense contents of such a group are unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._semi24_common import FIRST_BAD_NONE, block_meta_cols, meta_offset, report_first_bad, semi24_format


@triton.jit
def _semi24_decompress_fwd_kernel(
    packed_ptr,  # (m, k // 2) raw bits
    meta_ptr,  # (m, k_meta) int16 / int32, reordered
    dense_ptr,  # (m, k) raw bits
    first_bad_ptr,  # (1,) int64, FIRST_BAD_NONE on entry
    m,
    k,
    GROUP: tl.constexpr,  # 4, or 2 for fp32 pairs
    CODES: tl.constexpr,  # codes per metadata element: 4 (int16) or 8 (int32)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,  # metadata columns per tile
):
    NG: tl.constexpr = BLOCK_C * CODES  # groups per tile row
    KEEP: tl.constexpr = GROUP // 2  # values kept per group
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64 offsets: m * k may exceed 2**31

    # Metadata words -> one 4-bit code per group, lowest group in the lowest nibble.
    mcols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    words = tl.load(meta_ptr + meta_offset(rows[:, None], mcols[None, :], m, CODES == 8)).to(tl.int32)
    shifts = 4 * tl.arange(0, CODES)[None, None, :]
    code = tl.reshape((words[:, :, None] >> shifts) & 0xF, (BLOCK_M, NG))
    idx0 = code & 3
    idx1 = code >> 2

    pcols = pid_c * (NG * KEEP) + tl.arange(0, NG * KEEP)
    vals = tl.load(packed_ptr + rows[:, None] * (k // 2) + pcols[None, :])
    lanes = tl.arange(0, GROUP)[None, None, :]
    if GROUP == 4:
        valid = idx0 < idx1
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_M, NG, 2)))
        x3 = tl.where(lanes == idx0[:, :, None], v0[:, :, None], 0)
        x3 = tl.where(lanes == idx1[:, :, None], v1[:, :, None], x3)
    else:
        valid = (code == 0x4) | (code == 0xE)  # a pair is coded as 4 halves: the kept float is idx0 / 2
        x3 = tl.where(lanes == (idx0 // 2)[:, :, None], vals[:, :, None], 0)
    cols = pid_c * (NG * GROUP) + tl.arange(0, NG * GROUP)
    x = tl.reshape(x3, (BLOCK_M, NG * GROUP)).to(dense_ptr.dtype.element_ty)
    tl.store(dense_ptr + rows[:, None] * k + cols[None, :], x)

    groups = pid_c * NG + tl.arange(0, NG)
    report_first_bad(first_bad_ptr, ~valid, rows, groups, k // GROUP, m.to(tl.int64) * (k // GROUP))


def _semi24_decompress_fwd(packed: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rebuilds the (m, k) dense matrix from ``(packed, meta)``; returns ``(dense, first_bad)``.

    ``first_bad`` is the flat index ``row * groups_per_row + group`` of the first group (row-major order)
    whose metadata code is invalid, or -1. Shapes and the metadata dtype are validated by the caller.
    """
    fmt = semi24_format(packed.dtype)
    packed = packed.contiguous()
    meta = meta.contiguous()
    m, k = packed.shape[0], packed.shape[1] * 2
    k_meta = k // fmt.elems_per_meta
    dense = torch.empty((m, k), dtype=fmt.bits, device=packed.device)
    first_bad = torch.full((1,), FIRST_BAD_NONE, dtype=torch.int64, device=packed.device)
    if m and k:
        block_c = block_meta_cols(k_meta, fmt)
        grid = (m // fmt.meta_rows, k_meta // block_c)
        _semi24_decompress_fwd_kernel[grid](
            packed.view(fmt.bits),
            meta,
            dense,
            first_bad,
            m,
            k,
            GROUP=fmt.group,
            CODES=fmt.codes_per_meta,
            BLOCK_M=fmt.meta_rows,
            BLOCK_C=block_c,
        )
    bad = int(first_bad.item())
    return dense.view(packed.dtype), -1 if bad == FIRST_BAD_NONE else bad
