"""Pieces shared by the Triton 2:4 compress and decompress kernels.

The format is torch's CUTLASS semi-structured layout (``torch.sparse._semi_structured_conversions`` is the
oracle); these are the Triton twins of ``csrc/include/sparsekern/semi24.h``:

- every group of 4 (fp32: pair) gets a 4-bit code ``idx0 | idx1 << 2``, the columns of the two kept values;
- codes are packed 4 per int16 (fp16, bf16, fp32) or 8 per int32 (int8), lowest group in the lowest nibble;
- the logical (m, k_meta) code matrix is stored reordered (``meta_offset``).

Tiling: a program covers ``BLOCK_M`` rows = one metadata row group (32 rows for int16 metadata, 16 for
int32) and an even number of metadata columns. Every row group x column pair of logical metadata is one
contiguous 128-byte run of the output, so a tile's metadata accesses cover whole runs (permuted only inside
each run) instead of scattering over the tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._semi24 import FORMATS, Semi24Format

# Sentinel of the 1-element first-bad buffer: atomic_min of flat group indices leaves it untouched when valid.
FIRST_BAD_NONE = torch.iinfo(torch.int64).max

# Columns of dense covered by one tile row: tiles stay modest (32 x 128 elements) for registers on a GPU
# and for speed under TRITON_INTERPRET=1.
_TILE_COLS = 128


def semi24_format(dtype: torch.dtype) -> Semi24Format:
    try:
        return FORMATS[dtype]
    except KeyError:
        raise TypeError(f"semi24: expected float16, bfloat16, int8 or float32 values, got {dtype}") from None


def block_meta_cols(k_meta: int, fmt: Semi24Format) -> int:
    """Metadata columns per tile: the largest power of two that divides k_meta and fits ``_TILE_COLS``."""
    cols = max(1, _TILE_COLS // fmt.elems_per_meta)
    while k_meta % cols:
        cols //= 2
    return cols


@triton.jit
def meta_offset(r, c, m, META_INT32: tl.constexpr):
    """Flat offset in the (m, k_meta) metadata tensor where logical element (r, c) is stored.

    CUTLASS interleaves rows inside 32-row (int32 metadata: 16-row) groups, swaps the off-diagonal of every
    2x2 block, then stores column pairs column-major (ColumnMajorInterleaved<2>).
    """
    if META_INT32:
        dr = r // 16 * 16 + (r % 8) * 2 + (r % 16) // 8
    else:
        dr = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
    swap = tl.where((dr % 2 == 0) & (c % 2 == 1), 1, 0) - tl.where((dr % 2 == 1) & (c % 2 == 0), 1, 0)
    dr += swap
    dc = c - swap
    return (dc // 2) * m * 2 + dr * 2 + dc % 2


@triton.jit
def group_code(m0, m1, m3):
    """Nonzero flags (0/1 ints) of elements 0, 1, 3 of a group -> its 4-bit code idx0 | idx1 << 2.

    torch's Espresso-minimised encoding: groups with fewer than two nonzeros get exactly torch's padding
    columns (all-zero -> 2, 3). An fp32 pair (p, q) is coded as the halves (p, p, q, q).
    """
    e0 = m0 & m1
    e1 = (m0 ^ 1) & m1
    e2 = (m0 ^ 1) & (m1 ^ 1)
    idx0 = e1 | (e2 << 1)
    idx1 = (e0 | e2 | m3) | ((e1 | (m1 ^ 1)) << 1)
    return idx0 | (idx1 << 2)


@triton.jit
def report_first_bad(first_bad_ptr, bad, rows, groups, groups_per_row, n_groups):
    """atomic_min the flat index (row * groups_per_row + group) of the tile's first bad group, if any.

    One atomic per tile, and only on the cold path: valid inputs never touch the buffer.
    """
    flat = rows[:, None] * groups_per_row + groups[None, :]
    tile_bad = tl.min(tl.where(bad, flat, n_groups))
    tl.atomic_min(first_bad_ptr, tile_bad, mask=tile_bad < n_groups)
