"""Facts of the CUTLASS 2:4 format shared by the ops, the references and the Triton launchers.

The C++/CUDA side keeps the same facts in ``csrc/include/sparsekern/semi24_dispatch.h``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Semi24Format:
    group: int  # elements per group: 4 (2:4), or 2 for fp32 (1:2)
    kept: int  # elements kept per group
    codes_per_meta: int  # 4-bit codes per metadata element
    meta_dtype: torch.dtype
    min_rows: int  # torch's CUTLASS shape constraints: minimum and multiple
    min_cols: int
    bits: torch.dtype  # integer dtype the elements are moved as (raw bits: -0.0 and NaN survive exactly)
    magnitude: int  # bits that make an element nonzero (in `bits`): floats ignore the sign, -0.0 is zero; -1: all

    @property
    def elems_per_meta(self) -> int:
        return self.codes_per_meta * self.group

    @property
    def meta_rows(self) -> int:
        """Rows of one metadata reorder group: 32 for int16 metadata, 16 for int32."""
        return 32 if self.meta_dtype == torch.int16 else 16

    @property
    def name(self) -> str:
        return f"{self.kept}:{self.group}"


# Shape constraints are those of torch.sparse.SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS.
FORMATS: dict[torch.dtype, Semi24Format] = {
    torch.float16: Semi24Format(4, 2, 4, torch.int16, 32, 64, torch.int16, 0x7FFF),
    torch.bfloat16: Semi24Format(4, 2, 4, torch.int16, 32, 64, torch.int16, 0x7FFF),
    torch.int8: Semi24Format(4, 2, 8, torch.int32, 16, 128, torch.int8, -1),
    torch.float32: Semi24Format(2, 1, 4, torch.int16, 32, 32, torch.int32, 0x7FFFFFFF),
}
DTYPES = tuple(FORMATS)


def shape_error(fn: str, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """Why a dense (rows, cols) matrix of ``dtype`` breaks torch's shape constraints, or None."""
    fmt = FORMATS[dtype]
    for dim, size, need in (("rows", shape[0], fmt.min_rows), ("columns", shape[1], fmt.min_cols)):
        if size < need or size % need:
            return (
                f"{fn}: {name} has {size} {dim}, but {str(dtype).replace('torch.', '')} 2:4 tensors need a "
                f"positive multiple of {need} {dim} (shape {tuple(shape)})"
            )
    return None


def not_sparse_message(fn: str, shape: tuple[int, int], dtype: torch.dtype, first_bad: int) -> str:
    """The error for a dense input whose group ``first_bad`` (row-major flat index) keeps too many nonzeros."""
    fmt = FORMATS[dtype]
    groups_per_row = shape[1] // fmt.group
    row, col = divmod(first_bad, groups_per_row)
    col *= fmt.group
    plural = "s" if fmt.kept > 1 else ""
    return (
        f"{fn}: dense is not {fmt.name} sparse: row {row}, columns {col}..{col + fmt.group - 1} hold more than "
        f"{fmt.kept} nonzero{plural} (prune first: sparsekern.semi24_mask or to_semi_structured(prune=True))"
    )


def invalid_meta_message(fn: str, shape: tuple[int, int], dtype: torch.dtype, first_bad: int) -> str:
    fmt = FORMATS[dtype]
    groups_per_row = shape[1] // fmt.group
    row, col = divmod(first_bad, groups_per_row)
    col *= fmt.group
    return (
        f"{fn}: meta holds an invalid code for row {row}, columns {col}..{col + fmt.group - 1} "
        "(not produced by semi24_compress?)"
    )


def first_bad_group(dense: torch.Tensor) -> int:
    """Row-major index of the first group with more nonzeros than the format keeps, or -1 (plain PyTorch)."""
    fmt = FORMATS[dense.dtype]
    counts = (dense != 0).reshape(dense.shape[0], -1, fmt.group).sum(-1)
    bad = (counts > fmt.kept).flatten().nonzero()
    return int(bad[0]) if bad.numel() else -1
