"""Triton 2:4 (fp32: 1:2) compression to torch's CUTLASS semi-structured layout.

Bit-identical to ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass`` and
to the C++ ``sparsekern::semi24_compress``. Elements are moved as raw integer bits, so -0.0 and NaN payloads
survive exactly and one kernel serves fp16 / bf16 / int8 / fp32.

One program compresses one metadata row group (32 rows, int8: 16) x ``BLOCK_C`` metadata columns: it reads
the dense tile once, writes the packed values as whole rows of the tile and the metadata as contiguous runs,
and reports the first group with too many nonzeros through a single atomic_min.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._semi24_common import FIRST_BAD_NONE, block_meta_cols, group_code, meta_offset, report_first_bad, semi24_format


@triton.jit
def _pick(x3, lane, GROUP: tl.constexpr):
    """x3[r, g, lane[r, g]]: a per-group lane select, as a masked sum over the (tiny) group axis."""
    lanes = tl.arange(0, GROUP)[None, None, :]
    return tl.sum(tl.where(lanes == lane[:, :, None], x3, 0), axis=2).to(x3.dtype)


@triton.jit
def _semi24_compress_fwd_kernel(
    dense_ptr,  # (m, k) raw bits
    packed_ptr,  # (m, k // 2) raw bits
    meta_ptr,  # (m, k_meta) int16 / int32, reordered
    first_bad_ptr,  # (1,) int64, FIRST_BAD_NONE on entry
    m,
    k,
    GROUP: tl.constexpr,  # 4, or 2 for fp32 pairs
    CODES: tl.constexpr,  # codes per metadata element: 4 (int16) or 8 (int32)
    MAGNITUDE: tl.constexpr,  # bits that make an element nonzero (floats: all but the sign)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,  # metadata columns per tile
):
    NG: tl.constexpr = BLOCK_C * CODES  # groups per tile row
    KEEP: tl.constexpr = GROUP // 2  # values kept per group
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64 offsets: m * k may exceed 2**31
    cols = pid_c * (NG * GROUP) + tl.arange(0, NG * GROUP)

    x = tl.load(dense_ptr + rows[:, None] * k + cols[None, :])
    x3 = tl.reshape(x, (BLOCK_M, NG, GROUP))
    nz = ((x3 & MAGNITUDE) != 0).to(tl.int32)
    flags = tl.sum(nz << tl.arange(0, GROUP)[None, None, :], axis=2)  # bit j = element j nonzero
    if GROUP == 4:
        code = group_code(flags & 1, (flags >> 1) & 1, (flags >> 3) & 1)
    else:
        code = group_code(flags & 1, flags & 1, flags >> 1)
    idx0 = code & 3
    idx1 = code >> 2

    if GROUP == 4:
        vals = tl.reshape(tl.join(_pick(x3, idx0, GROUP), _pick(x3, idx1, GROUP)), (BLOCK_M, NG * 2))
    else:
        vals = _pick(x3, idx0 // 2, GROUP)  # a pair is coded as 4 halves: the kept float is idx0 / 2
    pcols = pid_c * (NG * KEEP) + tl.arange(0, NG * KEEP)
    tl.store(packed_ptr + rows[:, None] * (k // 2) + pcols[None, :], vals)

    # Codes -> metadata words, lowest group in the lowest nibble (disjoint nibbles: the sum is an OR).
    shifts = 4 * tl.arange(0, CODES)[None, None, :]
    words = tl.sum(tl.reshape(code, (BLOCK_M, BLOCK_C, CODES)) << shifts, axis=2)
    mcols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    moffs = meta_offset(rows[:, None], mcols[None, :], m, CODES == 8)
    tl.store(meta_ptr + moffs, words.to(meta_ptr.dtype.element_ty))

    groups = pid_c * NG + tl.arange(0, NG)
    bad = tl.sum(nz, axis=2) > KEEP
    report_first_bad(first_bad_ptr, bad, rows, groups, k // GROUP, m.to(tl.int64) * (k // GROUP))


def _semi24_compress_fwd(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Compresses a (m, k) 2:4-sparse (fp32: 1:2) matrix into ``(packed, meta, first_bad)``.

    ``first_bad`` is the flat index ``row * groups_per_row + group`` of the first group (row-major order)
    holding too many nonzeros, or -1; when it is not -1 the outputs are not a valid compression. Shapes are
    validated by the caller: m a multiple of 32 (int8: 16), k a multiple of 2 metadata elements.
    """
    fmt = semi24_format(dense.dtype)
    dense = dense.contiguous()
    m, k = dense.shape
    k_meta = k // fmt.elems_per_meta
    packed = torch.empty((m, k // 2), dtype=fmt.bits, device=dense.device)
    meta = torch.empty((m, k_meta), dtype=fmt.meta_dtype, device=dense.device)
    first_bad = torch.full((1,), FIRST_BAD_NONE, dtype=torch.int64, device=dense.device)
    if m and k:
        block_c = block_meta_cols(k_meta, fmt)
        grid = (m // fmt.meta_rows, k_meta // block_c)
        _semi24_compress_fwd_kernel[grid](
            dense.view(fmt.bits),
            packed,
            meta,
            first_bad,
            m,
            k,
            GROUP=fmt.group,
            CODES=fmt.codes_per_meta,
            MAGNITUDE=fmt.magnitude,
            BLOCK_M=fmt.meta_rows,
            BLOCK_C=block_c,
        )
    bad = int(first_bad.item())
    return packed.view(dense.dtype), meta, -1 if bad == FIRST_BAD_NONE else bad
