"""csr_dense_scatter_ / csr_dense_gather: a CSR weight's values into and out of a dense matrix, bit for bit, by the
C++ kernel and the torch path; the dense path of SparseLinear through them; every error path; opcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import bits, isa_params

import sparsekern
from sparsekern._csr import csr_from_mask
from sparsekern.ops.csr_dense import csr_dense_gather, csr_dense_scatter_
from sparsekern.reference import csr_dense_gather_reference, csr_dense_scatter_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
needs_ext = pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")


def special_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Fresh random values with -0.0, NaN and inf among them, whose bits must survive every copy."""
    v = torch.randn(n, dtype=torch.float64) * 100
    pick = torch.rand(n)
    v[pick < 0.05] = float("nan")
    v[(pick >= 0.05) & (pick < 0.1)] = -0.0
    v[(pick >= 0.1) & (pick < 0.12)] = float("-inf")
    return v.to(dtype)


def random_case(n_rows: int, n_cols: int, density: float, dtype: torch.dtype):
    mask = torch.rand(n_rows, n_cols) < density
    if n_rows > 2:
        mask[1] = False  # an empty row
        mask[2] = True  # a full row
    row_ptr, col_idx = csr_from_mask(mask)
    return mask, row_ptr, col_idx, special_values(col_idx.numel(), dtype)


SHAPES = [(1, 1), (7, 13), (33, 65), (64, 300), (5, 1), (1, 257), (3, 1001)]


@needs_ext
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_kernel_equals_reference_bit_for_bit(cpu_isa, dtype, shape, density):
    mask, row_ptr, col_idx, values = random_case(*shape, density, dtype)
    before = special_values(mask.numel(), dtype).view(shape)
    ours, ref = before.clone(), before.clone()
    torch.ops.sparsekern.csr_dense_scatter_(ours, values, row_ptr, col_idx)
    csr_dense_scatter_reference(ref, values, row_ptr, col_idx)
    assert torch.equal(bits(ours), bits(ref))
    assert torch.equal(bits(ours[mask]), bits(values))  # CSR order is row-major, as boolean indexing
    assert torch.equal(bits(ours[~mask]), bits(before[~mask]))  # the rest untouched
    gathered = torch.ops.sparsekern.csr_dense_gather(before, row_ptr, col_idx)
    assert gathered.dtype == dtype
    assert torch.equal(bits(gathered), bits(before[mask]))
    assert torch.equal(bits(gathered), bits(csr_dense_gather_reference(before, row_ptr, col_idx)))


@needs_ext
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_large_parallel_case_bit_for_bit(cpu_isa, dtype):
    """Enough nonzeros for several threads' tasks, with uneven rows."""
    mask, row_ptr, col_idx, values = random_case(1031, 517, 0.4, dtype)
    mask[:100] = torch.rand(100, 517) < 0.95
    mask[-1] = True  # the last row full: a 2-byte gather must not read past the matrix
    row_ptr, col_idx = csr_from_mask(mask)
    values = special_values(col_idx.numel(), dtype)
    dense = torch.zeros(mask.shape, dtype=dtype)
    torch.ops.sparsekern.csr_dense_scatter_(dense, values, row_ptr, col_idx)
    assert torch.equal(bits(dense[mask]), bits(values))
    assert not bits(dense[~mask]).any()
    assert torch.equal(bits(torch.ops.sparsekern.csr_dense_gather(dense, row_ptr, col_idx)), bits(values))


@pytest.mark.parametrize(
    "kernel",
    [pytest.param(isa, marks=needs_ext, id=f"cpp-{isa}") for isa in sparsekern._extension.available_isas()]
    + [pytest.param(None, id="torch")],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_shadow_rewrites_exactly_the_changed_rows(kernel, dtype):
    """With a shadow the result is a full scatter of the new values and the shadow becomes them; the kernel skips
    the rows whose values are bit-identical (a changed sign of zero or NaN payload counts as a change)."""
    mask, row_ptr, col_idx, old = random_case(40, 37, 0.5, dtype)
    scatter = csr_dense_scatter_reference
    if kernel is not None:
        isa, op = kernel, torch.ops.sparsekern.csr_dense_scatter_

        def scatter(*args):
            with sparsekern._extension.use_cpu_isa(isa):
                op(*args)

    dense = torch.zeros(40, 37, dtype=dtype)
    scatter(dense, old, row_ptr, col_idx)
    shadow = old.clone()
    new = old.clone()
    rows = torch.repeat_interleave(torch.arange(40), row_ptr.diff())
    changed = torch.zeros(40, dtype=torch.bool)
    changed[[3, 17, 39]] = True
    for r in changed.nonzero().flatten().tolist():
        new[rows == r] = special_values(int((rows == r).sum()), dtype)
    first_of_5 = int(row_ptr[5])
    new[first_of_5] = -0.0 if bits(old[first_of_5 : first_of_5 + 1]).item() == 0 else 0.0  # only the sign of zero
    changed[5] = True
    unchanged_row = int((~changed & (row_ptr.diff() > 0)).nonzero()[0])
    col = int(col_idx[row_ptr[unchanged_row]])
    dense[unchanged_row, col] = 7.0  # breaks the invariant on purpose: the kernel must leave this row alone
    scatter(dense, new, row_ptr, col_idx, shadow)
    assert torch.equal(bits(shadow), bits(new))
    expected = torch.zeros(40, 37, dtype=dtype)
    csr_dense_scatter_reference(expected, new, row_ptr, col_idx)
    expected[unchanged_row, col] = 7.0 if kernel is not None else expected[unchanged_row, col]
    assert torch.equal(bits(dense), bits(expected))


@needs_ext
def test_empty_dense_and_no_nonzeros():
    row_ptr, col_idx = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)
    dense = torch.empty(0, 5)
    torch.ops.sparsekern.csr_dense_scatter_(dense, torch.empty(0), row_ptr, col_idx)
    assert torch.ops.sparsekern.csr_dense_gather(dense, row_ptr, col_idx).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dispatching_functions_round_trip(dtype):
    """The functions SparseLinear calls (C++ kernel when built, torch otherwise) round-trip exactly."""
    mask, row_ptr, col_idx, values = random_case(19, 23, 0.5, dtype)
    dense = torch.zeros(19, 23, dtype=dtype)
    csr_dense_scatter_(dense, values, row_ptr, col_idx)
    assert torch.equal(bits(dense[mask]), bits(values))
    assert torch.equal(bits(csr_dense_gather(dense, row_ptr, col_idx)), bits(values))


def test_without_extension_uses_torch_and_warns_once(monkeypatch):
    monkeypatch.setattr(sparsekern._extension, "_C", None)
    monkeypatch.setattr(sparsekern._extension, "unavailable_reason", "switched off for this test")
    mask, row_ptr, col_idx, values = random_case(9, 11, 0.5, torch.float32)
    dense = torch.zeros(9, 11)
    with pytest.warns(RuntimeWarning, match=r"csr_dense_scatter_: using torch's scatter/gather .*switched off"):
        csr_dense_scatter_(dense, values, row_ptr, col_idx)
    assert torch.equal(bits(dense[mask]), bits(values))
    with pytest.warns(RuntimeWarning, match=r"csr_dense_gather: using torch's scatter/gather"):
        assert torch.equal(bits(csr_dense_gather(dense, row_ptr, col_idx)), bits(values))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_opcheck(dtype):
    mask, row_ptr, col_idx, values = random_case(12, 10, 0.4, dtype)
    values = torch.nan_to_num(values, posinf=1.0, neginf=-1.0)
    dense = torch.randn(12, 10).to(dtype)
    scatter = torch.ops.sparsekern.csr_dense_scatter_.default
    torch.library.opcheck(scatter, (dense, values, row_ptr, col_idx))
    torch.library.opcheck(scatter, (dense, values, row_ptr, col_idx, values.clone()))
    torch.library.opcheck(torch.ops.sparsekern.csr_dense_gather.default, (dense, row_ptr, col_idx))


@needs_ext
def test_errors():
    mask, row_ptr, col_idx, values = random_case(6, 8, 0.5, torch.float32)
    dense = torch.zeros(6, 8)
    scatter, gather = torch.ops.sparsekern.csr_dense_scatter_, torch.ops.sparsekern.csr_dense_gather
    with pytest.raises(ValueError, match=r"csr_dense_scatter_: dense must be 2-D"):
        scatter(dense.view(-1), values, row_ptr, col_idx)
    with pytest.raises(ValueError, match=r"csr_dense_gather: dense must be contiguous"):
        gather(torch.zeros(8, 6).T, row_ptr, col_idx)
    with pytest.raises(TypeError, match=r"csr_dense_scatter_: values \(BFloat16\) and dense \(Float\) must have"):
        scatter(dense, values.bfloat16(), row_ptr, col_idx)
    with pytest.raises(ValueError, match=r"csr_dense_scatter_: values must have one entry per nonzero"):
        scatter(dense, values[:-1], row_ptr, col_idx)
    with pytest.raises(ValueError, match=r"csr_dense_scatter_: values must be a contiguous 1-D CPU tensor"):
        scatter(dense, values.view(1, -1), row_ptr, col_idx)
    with pytest.raises(ValueError, match=r"csr_dense_scatter_: shadow must have one entry per nonzero"):
        scatter(dense, values, row_ptr, col_idx, values[1:].clone())
    with pytest.raises(TypeError, match=r"csr_dense_scatter_: shadow \(Half\) and dense \(Float\) must have"):
        scatter(dense, values, row_ptr, col_idx, values.half())
    with pytest.raises(ValueError, match=r"csr_dense_gather: row_ptr must have 7 entries"):
        gather(dense, row_ptr[:-1], col_idx)
    with pytest.raises(TypeError, match=r"csr_dense_gather: col_idx must be int32"):
        gather(dense, row_ptr, col_idx.long())
    with pytest.raises(ValueError, match=r"csr_dense_gather: row_ptr must run from 0 to nnz"):
        gather(dense, row_ptr, col_idx[:-1])
