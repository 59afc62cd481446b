"""CSR index checks and builders shared by spmm, sddmm, sparse_linear and SparseLinear."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validate import check_tensor

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_csr(fn: str, row_ptr, col_idx, n_rows: int, n_cols: int, *, check_indices: bool = True) -> None:
    """row_ptr int64 (n_rows + 1) from 0 to nnz, nondecreasing; col_idx int32 (nnz) in [0, n_cols)."""
    check_tensor(fn, "row_ptr", row_ptr, dtypes=(torch.int64,), ndim=1, contiguous=True)
    check_tensor(fn, "col_idx", col_idx, dtypes=(torch.int32,), ndim=1, contiguous=True)
    if row_ptr.numel() != n_rows + 1:
        raise ValueError(f"{fn}: row_ptr must have {n_rows + 1} entries (rows + 1), got {row_ptr.numel()}")
    if not check_indices:
        return
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != col_idx.numel():
        raise ValueError(
            f"{fn}: row_ptr must run from 0 to nnz={col_idx.numel()}, got {int(row_ptr[0])}..{int(row_ptr[-1])}"
        )
    if n_rows and bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise ValueError(f"{fn}: row_ptr must be nondecreasing")
    if col_idx.numel() and (int(col_idx.min()) < 0 or int(col_idx.max()) >= n_cols):
        raise ValueError(
            f"{fn}: col_idx must lie in [0, {n_cols}), got values in [{int(col_idx.min())}, {int(col_idx.max())}]"
        )


def csr_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr int64, col_idx int32) of a bool (rows, cols) mask; nonzeros in row-major order.

    A block of rows at a time: nonzero() of the whole mask would hold 16 bytes per nonzero at once (a RigL
    exclusion mask at 90% sparsity: 40% of the dense scores' size)."""
    n_rows, n_cols = mask.shape
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask.sum(1), 0, out=row_ptr[1:])
    col_idx = torch.empty(int(row_ptr[-1]), dtype=torch.int32, device=mask.device)
    step = max(1, (1 << 20) // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        col_idx[row_ptr[r0] : row_ptr[r1]] = mask[r0:r1].nonzero()[:, 1].to(torch.int32)
    return row_ptr, col_idx


def sorted_contains(sorted_set: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """bool per entry of values: is it in sorted_set (ascending, unique)? Binary searches, O(len(values) log)."""
    if sorted_set.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    pos = torch.searchsorted(sorted_set, values).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[pos] == values


def random_positions(numel: int, n: int, generator: torch.Generator, exclude: torch.Tensor) -> torch.Tensor:
    """n distinct positions drawn uniformly from [0, numel) minus ``exclude`` (int64, ascending, unique), returned
    ascending on ``exclude``'s device, in O(n + len(exclude)) memory: never a tensor of numel entries.

    Draws rounds of ``torch.randint(numel, (m,), generator=generator)`` with
    ``m = ceil(1.25 * left * numel / candidates) + 16`` (``left``: positions still to find) and accepts, in draw
    order, each position that is a candidate and not yet taken, until n are taken. (This is the exact rule, so
    a reference can replay it; SET's random grow is specified by it.)
    """
    candidates = numel - exclude.numel()
    if n > candidates:
        raise ValueError(f"random_positions: cannot draw {n} distinct positions among {candidates}")
    taken: list[torch.Tensor] = []
    seen = exclude
    left = n
    while left > 0:
        m = math.ceil(1.25 * left * numel / candidates) + 16
        draw = torch.randint(numel, (m,), generator=generator, device=generator.device).to(exclude.device)
        # first occurrence of each drawn position, in draw order
        uniq, inverse = torch.unique(draw, return_inverse=True)
        first = torch.full((uniq.numel(),), m, dtype=torch.int64, device=exclude.device)
        first.scatter_reduce_(0, inverse, torch.arange(m, device=exclude.device), reduce="amin")
        free = ~sorted_contains(seen, uniq)
        order = first[free].argsort()
        accepted = uniq[free][order][:left]
        taken.append(accepted)
        seen = torch.cat([seen, accepted]).sort().values
        left -= accepted.numel()
    return torch.cat(taken).sort().values if taken else exclude.new_zeros(0)


def random_flat(
    numel: int, count: int, *, generator: torch.Generator | None = None, device=None, block: int = 1 << 20
) -> torch.Tensor:
    """``count`` distinct positions of ``range(numel)``, uniformly at random, ascending (int64), in O(count) memory.

    Below numel / 8 positions: :func:`random_positions` (rejection, which then accepts at least 7 draws in 8).
    From there, in blocks of ``block`` positions: how many positions each block gets is drawn as if every
    position were kept with probability count / numel (a binomial per block), then the surplus is taken from
    (or the shortfall added to) uniformly chosen kept (or not kept) positions, and each block draws its share by
    ``randperm(block)``. Every step treats all positions alike, so every subset of ``count`` positions is equally
    likely (as with one ``randperm(numel)``), with O(block) scratch beside the result."""
    generator = generator if generator is not None else torch.default_generator
    if count * 8 < numel:
        return random_positions(numel, count, generator, torch.zeros(0, dtype=torch.int64)).to(device)
    sizes = torch.full((-(-numel // block),), block, dtype=torch.int64)
    sizes[-1] = numel - block * (sizes.numel() - 1)
    kept = torch.binomial(sizes.double(), torch.full(sizes.shape, count / numel, dtype=torch.float64), generator)
    kept = kept.long()
    surplus = int(kept.sum()) - count
    if surplus:  # |surplus| is about sqrt(numel): which kept (or free) positions go (or come) in, by block
        pool = kept if surplus > 0 else sizes - kept
        chosen = random_positions(int(pool.sum()), abs(surplus), generator, torch.zeros(0, dtype=torch.int64))
        moved = torch.bincount(torch.searchsorted(pool.cumsum(0), chosen, right=True), minlength=sizes.numel())
        kept -= moved if surplus > 0 else -moved
    out = torch.empty(count, dtype=torch.int64)
    done = 0
    for i, (size, k) in enumerate(zip(sizes.tolist(), kept.tolist(), strict=True)):
        part = out[done : done + k]
        torch.sort(torch.randperm(size, generator=generator)[:k], out=(part, torch.empty_like(part)))
        part += i * block
        done += k
    return out.to(device)


def csr_from_flat(flat: torch.Tensor, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr int64, col_idx int32) of the positions ``flat`` (row * n_cols + col, ascending, unique).

    Row starts by binary search and columns in chunks: no int64 temporary of nnz entries beside ``flat``."""
    bounds = torch.arange(n_rows + 1, dtype=torch.int64, device=flat.device) * n_cols
    row_ptr = torch.searchsorted(flat, bounds)
    col_idx = torch.empty(flat.numel(), dtype=torch.int32, device=flat.device)
    for src, dst in zip(flat.split(1 << 20), col_idx.split(1 << 20), strict=True):
        dst.copy_(src % n_cols)
    return row_ptr, col_idx


def merge_sorted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(merged, at_a, at_b): the union of two disjoint ascending int64 tensors, ascending, and where each entry
    of ``a`` and of ``b`` lands in it. One sort of the concatenation (torch's radix sort of int64 beats the two
    binary searches a merge would take by 2-3x on the CPU) and its inverse permutation."""
    merged, order = torch.cat([a, b]).sort()
    slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return merged, slot[: a.numel()], slot[a.numel() :]


def transpose_index(
    row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSC of a CSR matrix, as (ptr int64 (n_cols + 1), row int32 (nnz), perm int64 (nnz)) where perm maps
    CSC order to CSR value slots: values_t = values[perm]. O(nnz) apart from one stable sort."""
    from .reference import csr_rows

    rows = csr_rows(row_ptr)
    # stable: rows stay ascending within a column; int32 keys sort about twice as fast as int64 ones
    perm = torch.sort(col_idx, stable=True).indices
    counts = torch.bincount(col_idx, minlength=n_cols)
    ptr = torch.zeros(n_cols + 1, dtype=torch.int64, device=row_ptr.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr, rows.index_select(0, perm).to(torch.int32), perm


class CSRIndex(NamedTuple):
    """The index of a sparse (n_out, n_in) weight: CSR for the forward and the values' gradient, CSC (with a
    permutation into the CSR value slots) for dX. Rebuilt only when the topology changes, in O(nnz)."""

    row_ptr: torch.Tensor  # int64 (n_out + 1)
    col_idx: torch.Tensor  # int32 (nnz)
    csc_ptr: torch.Tensor  # int64 (n_in + 1)
    csc_row: torch.Tensor  # int32 (nnz)
    csc_perm: torch.Tensor  # int64 (nnz): CSC position -> CSR value slot
    n_out: int
    n_in: int

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.n_out * self.n_in)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> CSRIndex:
        row_ptr, col_idx = csr_from_mask(mask)
        return cls.from_csr(row_ptr, col_idx, mask.shape[1])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_out: int, n_in: int) -> CSRIndex:
        """The index of the positions ``flat`` (row * n_in + col, int64, ascending, unique; not checked)."""
        return cls.from_csr(*csr_from_flat(flat, n_out, n_in), n_in)

    @classmethod
    def pattern(cls, flat: torch.Tensor, n_out: int, n_in: int) -> CSRIndex:
        """The CSR of the positions ``flat`` (ascending, unique; not checked) without the transposed index (its
        fields are empty): a pattern to read, such as outer_topk's ``exclude``, not an index to multiply with."""
        row_ptr, col_idx = csr_from_flat(flat, n_out, n_in)
        none = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return cls(row_ptr, col_idx, none, none.to(torch.int32), none, n_out, n_in)

    @classmethod
    def from_csr(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_in: int) -> CSRIndex:
        csc_ptr, csc_row, csc_perm = transpose_index(row_ptr, col_idx, n_in)
        return cls(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, row_ptr.numel() - 1, n_in)

    def rows(self) -> torch.Tensor:
        from .reference import csr_rows

        return csr_rows(self.row_ptr)

    def flat(self) -> torch.Tensor:
        """row * n_in + col of every nonzero, int64 (nnz), ascending (CSR order)."""
        from .reference import csr_flat

        return csr_flat(self.row_ptr, self.col_idx, self.n_in)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.n_out, self.n_in, dtype=values.dtype, device=values.device)
        dense.view(-1).scatter_(0, self.flat(), values)
        return dense
