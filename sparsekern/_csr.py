"""CSR indices: the one home of their validation, builders and arithmetic, shared by every op, the reference
and SparseLinear.

A CSR index of an (n_rows, n_cols) matrix is ``row_ptr`` int64 (n_rows + 1) and ``col_idx`` int32 (nnz): row r
holds the nonzeros ``row_ptr[r] .. row_ptr[r + 1] - 1``. It is *valid* when row_ptr is nondecreasing from 0 to nnz
and every row's columns are strictly ascending (sorted, no repeats) in [0, n_cols). Every index the public API
accepts is checked by :func:`check_csr` once (O(nnz)); a :class:`CSRIndex` remembers that it was checked (see
:func:`check_index`) until one of its tensors changes. The C++ kernels scan the index again (cheaply), so an index
edited behind these checks' back raises there instead of reading or writing out of bounds.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from ._validate import check_same_device, check_tensor

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def csr_rows(row_ptr: torch.Tensor, nnz: int | None = None) -> torch.Tensor:
    """The row of every nonzero of a CSR matrix, as int64 (nnz). Given ``nnz``, without a device sync."""
    counts = row_ptr[1:] - row_ptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts, output_size=nnz)


def csr_flat(row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """row * n_cols + col of every nonzero of a CSR matrix, int64 (nnz), without a device sync."""
    return csr_rows(row_ptr, col_idx.numel()) * n_cols + col_idx.long()


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """t viewed as integers of its element size: copies through it are bit-exact, and torch's scatter_ is 4x
    slower on bf16/fp16 than on int16."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def check_csr(fn: str, row_ptr, col_idx, n_rows: int, n_cols: int, *, name: str = "", any_int: bool = False) -> None:
    """Raise unless (row_ptr, col_idx) is a valid CSR index of an (n_rows, n_cols) matrix (see the module
    docstring): row_ptr int64 (n_rows + 1) and col_idx int32 (nnz), contiguous, on one device. O(n_rows + nnz).

    name: what the index is called in messages ("exclude" gives "exclude's row_ptr ..."); any_int: accept int32
    or int64 for both (a torch sparse CSR tensor's indices), checked before any narrowing conversion.
    """
    what = f"{name}'s " if name else ""
    rp_name, ci_name = f"{what}row_ptr", f"{what}col_idx"
    ints = (torch.int32, torch.int64)
    check_tensor(fn, rp_name, row_ptr, dtypes=ints if any_int else (torch.int64,), ndim=1, contiguous=True)
    check_tensor(fn, ci_name, col_idx, dtypes=ints if any_int else (torch.int32,), ndim=1, contiguous=True)
    check_same_device(fn, **{rp_name: row_ptr, ci_name: col_idx})
    if row_ptr.numel() != n_rows + 1:
        raise ValueError(f"{fn}: {rp_name} must have {n_rows + 1} entries (rows + 1), got {row_ptr.numel()}")
    nnz = col_idx.numel()
    first, last = row_ptr[0::n_rows].tolist() if n_rows else (int(row_ptr[0]),) * 2  # one sync for both ends
    if first != 0 or last != nnz:
        raise ValueError(f"{fn}: {rp_name} must run from 0 to nnz={nnz}, got {first}..{last}")
    if n_rows:
        down = row_ptr[1:] < row_ptr[:-1]
        if bool(down.any()):
            r = int(down.nonzero()[0])
            raise ValueError(
                f"{fn}: {rp_name} must be nondecreasing, got row_ptr[{r + 1}]={int(row_ptr[r + 1])} < "
                f"row_ptr[{r}]={int(row_ptr[r])}"
            )
    if nnz == 0:
        return
    lowest, highest = _min_max(col_idx)
    if lowest < 0 or highest >= n_cols:
        raise ValueError(f"{fn}: {ci_name} must lie in [0, {n_cols}), got values in [{lowest}, {highest}]")
    # Strictly ascending within each row: every step up, except where a new row starts (it may start anywhere).
    ordered = col_idx[1:] > col_idx[:-1]
    starts = row_ptr[1:-1]
    ordered[starts[(starts > 0) & (starts < nnz)] - 1] = True
    if not bool(ordered.all()):
        j = int((~ordered).nonzero()[0]) + 1  # the first nonzero that does not step up from the one before
        r = int(torch.searchsorted(row_ptr, j, right=True)) - 1
        raise ValueError(
            f"{fn}: {ci_name} must be ascending and unique within each row, got column {int(col_idx[j])} after "
            f"{int(col_idx[j - 1])} in row {r}"
        )


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one sync for both
    return lo, hi


def check_flat(fn: str, flat, numel: int, *, name: str = "flat") -> None:
    """Raise unless ``flat`` is an int64 1-D tensor of positions in [0, numel), strictly ascending. O(len)."""
    check_tensor(fn, name, flat, dtypes=(torch.int64,), ndim=1)
    if flat.numel() == 0:
        return
    lowest, highest = _min_max(flat)
    if lowest < 0 or highest >= numel:
        raise ValueError(f"{fn}: {name} must lie in [0, {numel}), got values in [{lowest}, {highest}]")
    if not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError(f"{fn}: {name} must be strictly ascending (sorted, without repeats)")


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
    rows = csr_rows(row_ptr)
    # stable: rows stay ascending within a column; int32 keys sort about twice as fast as int64 ones
    perm = torch.sort(col_idx, stable=True).indices
    counts = torch.bincount(col_idx, minlength=n_cols)
    ptr = torch.zeros(n_cols + 1, dtype=torch.int64, device=row_ptr.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr, rows.index_select(0, perm).to(torch.int32), perm


class CSRIndex(NamedTuple):
    """The index of a sparse (n_out, n_in) weight: CSR for the forward and the values' gradient, CSC (with a
    permutation into the CSR value slots) for dX. Rebuilt only when the topology changes, in O(nnz).

    Build one with :meth:`from_mask`, :meth:`from_csr` or :meth:`from_flat`: they validate their input (or build
    it valid) and record that the index was checked, so :func:`sparsekern.ops.sparse_linear` and
    :func:`sparsekern.outer_topk` take it without scanning it again. An index assembled field by field, or whose
    tensors were modified in place since, is validated in O(nnz) (and its CSC compared with the CSR's transpose)
    on its next use.

    Example::

        >>> index = sparsekern.CSRIndex.from_csr(torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1], dtype=torch.int32), 3)
        >>> index.nnz, index.to_dense(torch.tensor([1.0, 2.0, 3.0])).tolist()
        (3, [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    """

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
        """The index of the True entries of a bool (n_out, n_in) mask."""
        check_tensor("CSRIndex.from_mask", "mask", mask, dtypes=(torch.bool,), ndim=2)
        row_ptr, col_idx = csr_from_mask(mask)
        return cls._build(row_ptr, col_idx, mask.shape[1])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_out: int, n_in: int) -> CSRIndex:
        """The index of the positions ``flat`` (row * n_in + col, int64, strictly ascending, in range; checked)."""
        check_flat("CSRIndex.from_flat", flat, n_out * n_in)
        return cls._build(*csr_from_flat(flat, n_out, n_in), n_in)

    @classmethod
    def pattern(cls, flat: torch.Tensor, n_out: int, n_in: int) -> CSRIndex:
        """The CSR of the positions ``flat`` (as for :meth:`from_flat`; checked) without the transposed index (its
        fields are empty): a pattern to read, such as outer_topk's ``exclude``, not an index to multiply with."""
        check_flat("CSRIndex.pattern", flat, n_out * n_in)
        row_ptr, col_idx = csr_from_flat(flat, n_out, n_in)
        none = torch.zeros(0, dtype=torch.int64, device=flat.device)
        index = cls(row_ptr, col_idx, none, none.to(torch.int32), none, n_out, n_in)
        _mark_checked(index, full=False)
        return index

    @classmethod
    def from_csr(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_in: int) -> CSRIndex:
        """The index of the CSR (row_ptr int64 (n_out + 1), col_idx int32 (nnz)) of an (n_out, n_in) matrix.

        Raises:
            TypeError, ValueError: not a valid CSR index (row_ptr not nondecreasing from 0 to nnz, a column
                outside [0, n_in), columns not ascending and unique within a row; see :func:`check_csr`).
        """
        fn = "CSRIndex.from_csr"
        check_tensor(fn, "row_ptr", row_ptr, dtypes=(torch.int64,), ndim=1)
        if isinstance(n_in, bool) or not isinstance(n_in, int) or n_in < 0:
            raise ValueError(f"{fn}: n_in must be a non-negative int, got {n_in!r}")
        if row_ptr.numel() == 0:
            raise ValueError(f"{fn}: row_ptr must have n_out + 1 >= 1 entries, got 0")
        check_csr(fn, row_ptr, col_idx, row_ptr.numel() - 1, n_in)
        return cls._build(row_ptr, col_idx, n_in)

    @classmethod
    def _build(cls, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_in: int) -> CSRIndex:
        """The index of a CSR already known valid (checked, or built valid), recorded as checked."""
        index = cls(row_ptr, col_idx, *transpose_index(row_ptr, col_idx, n_in), row_ptr.numel() - 1, n_in)
        _mark_checked(index, full=True)
        return index

    def rows(self) -> torch.Tensor:
        return csr_rows(self.row_ptr)

    def flat(self) -> torch.Tensor:
        """row * n_in + col of every nonzero, int64 (nnz), ascending (CSR order)."""
        return csr_flat(self.row_ptr, self.col_idx, self.n_in)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.n_out, self.n_in, dtype=values.dtype, device=values.device)
        dense.view(-1).scatter_(0, self.flat(), values)
        return dense


# ----------------------------------------------------------------------------------------------------------
# Which indices were checked. Keyed by the identity of row_ptr; an entry holds weak references to the index's five
# tensors (so it keeps nothing alive, and a reused id never matches a new tensor) and their version counters, which
# every in-place write through autograd-visible tensors bumps (``t[0] = 5``, ``copy_``, ``load_state_dict``).
# Writes that bypass the counter (``.data``, numpy or DLPack views) are not seen: the C++ kernels' own scan then
# still refuses an invalid index, but the Triton and CUDA launchers trust this record. Inference tensors have no
# version counter: they are recorded by identity alone (in-place edits under torch.inference_mode are not seen here
# either), rather than validated, and their CSC rebuilt, on every call.

_checked: dict[int, tuple] = {}


def _versions(index: CSRIndex) -> tuple[int, ...] | None:
    tensors = index[:5]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


def _mark_checked(index: CSRIndex, *, full: bool) -> None:
    """Record ``index`` as valid as it is now; ``full``: its CSC was built from (or compared with) its CSR."""
    versions = _versions(index)
    if versions is None:
        return
    key = id(index.row_ptr)

    def forget(ref, key=key):  # row_ptr died: drop its entry unless a newer tensor took the id meanwhile
        entry = _checked.get(key)
        if entry is not None and entry[0][0] is ref:
            _checked.pop(key, None)

    refs = (weakref.ref(index.row_ptr, forget), *(weakref.ref(t) for t in index[1:5]))
    _checked[key] = (refs, versions, index.n_out, index.n_in, full)


def is_checked(index: CSRIndex, *, full: bool = True) -> bool:
    """Whether ``index`` was checked (``full``: with its CSC) and none of its tensors changed or was replaced since.
    O(1): no tensor is read."""
    entry = _checked.get(id(index.row_ptr))
    if entry is None:
        return False
    refs, versions, n_out, n_in, was_full = entry
    if (full and not was_full) or n_out != index.n_out or n_in != index.n_in:
        return False
    if any(ref() is not t for ref, t in zip(refs, index[:5], strict=True)):
        return False
    return _versions(index) == versions


def check_index(fn: str, index, *, name: str = "index", full: bool = True) -> CSRIndex:
    """``index`` if it is a valid :class:`CSRIndex`, else TypeError/ValueError naming ``name``. O(1) when it was
    checked before and has not changed since (:func:`is_checked`); otherwise its CSR is validated (O(nnz)) and,
    with ``full``, its CSC compared with the CSR's transpose (one sort), and the result recorded."""
    if not isinstance(index, CSRIndex):
        raise TypeError(f"{fn}: {name} must be a sparsekern.CSRIndex, got {type(index).__name__}")
    if is_checked(index, full=full):
        return index
    for field in ("n_out", "n_in"):
        value = getattr(index, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{fn}: {name}.{field} must be a non-negative int, got {value!r}")
    check_csr(fn, index.row_ptr, index.col_idx, index.n_out, index.n_in, name=name)
    if full:
        expected = transpose_index(index.row_ptr, index.col_idx, index.n_in)
        for field, want in zip(("csc_ptr", "csc_row", "csc_perm"), expected, strict=True):
            got = getattr(index, field)
            if not (
                isinstance(got, torch.Tensor)
                and got.dtype == want.dtype
                and got.device == want.device
                and got.is_contiguous()
                and torch.equal(got, want)
            ):
                raise ValueError(
                    f"{fn}: {name}.{field} must be part of the transpose of {name}'s CSR (row_ptr, col_idx); build "
                    "the index with CSRIndex.from_csr or from_mask"
                )
    _mark_checked(index, full=full)
    return index
