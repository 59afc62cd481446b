"""The C++ CPU spmm and sddmm kernels on every instruction set this machine has (avx512, avx2, baseline), every
dtype and odd shapes, against float64 references (helpers.assert_within_torch_error: at most twice torch's own
error in the same dtype, plus a rounding slack of the result's scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_torch_error, isa_params
from test_sparse_linear import _mask

from sparsekern._csr import CSRIndex
from sparsekern.ops.sparse_linear import sparse_linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, n_in, n_out, density). Batches: 1, under and past every tile width (16, 32, 64 lanes; 8-row blocks),
# several tiles with a ragged last one. n_in and n_out odd, or 1 (a single row / column). 1100 inputs at full
# density: rows longer than one block of 16 chunks of 32 nonzeros (the kernels' three summation levels).
SHAPES = [
    (1, 13, 7, 0.5),
    (9, 1, 5, 1.0),
    (23, 37, 1, 0.6),
    (33, 70, 29, 0.3),
    (67, 19, 70, 0.5),
    (131, 1100, 21, 0.9),
    (200, 45, 17, 0.05),
    (70, 33, 48, 0.4),  # outputs a multiple of 16: whole staged blocks, streamed write-back where the ISA has it
]
ISAS = isa_params()


def _index(n_out, n_in, density):
    mask = _mask(n_out, n_in, density)
    if n_out > 2:
        mask[n_out // 2] = False  # an empty row inside the matrix too, not only the first
    return CSRIndex.from_mask(mask), mask


def _ids(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_spmm_matches_float64(cpu_isa, dtype, shape):
    batch, n_in, n_out, density = shape
    index, _ = _index(n_out, n_in, density)
    x = torch.randn(batch, n_in).to(dtype)
    values = torch.randn(index.nnz).to(dtype)
    y = torch.ops.sparsekern.spmm(x, index.row_ptr, index.col_idx, values, n_out)
    w = index.to_dense(values)
    assert y.dtype == dtype
    assert_within_torch_error(y, x.double() @ w.double().T, F.linear(x, w))
    # dX = G @ W through the transposed index: the same kernel with W's columns as rows
    g = torch.randn(batch, n_out).to(dtype)
    gx = torch.ops.sparsekern.spmm(g, index.csc_ptr, index.csc_row, values[index.csc_perm], n_in)
    assert_within_torch_error(gx, g.double() @ w.double(), g @ w)


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_sddmm_matches_float64(cpu_isa, dtype, shape):
    batch, n_in, n_out, density = shape
    index, mask = _index(n_out, n_in, density)
    x = torch.randn(batch, n_in).to(dtype)
    g = torch.randn(batch, n_out).to(dtype)
    out = torch.ops.sparsekern.sddmm(g, x, index.row_ptr, index.col_idx)
    assert out.dtype == dtype and out.shape == (index.nnz,)
    assert_within_torch_error(out, (g.double().T @ x.double())[mask], (g.T @ x)[mask])


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("threads", [1, 3])
def test_work_split_over_threads(cpu_isa, threads):
    """Tiles that do not divide among the threads are cut into row ranges: every (tile, range) item is computed
    once, with the same result as one thread's (the split never changes a row's summation order)."""
    index, mask = _index(80, 300, 0.2)  # 80 rows: split into ranges of whole 16-row blocks
    x, g = torch.randn(150, 300), torch.randn(150, 80)
    values = torch.randn(index.nnz)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.sparsekern.spmm(x, index.row_ptr, index.col_idx, values, 80)
        d1 = torch.ops.sparsekern.sddmm(g, x, index.row_ptr, index.col_idx)
        torch.set_num_threads(threads)
        y = torch.ops.sparsekern.spmm(x, index.row_ptr, index.col_idx, values, 80)
        d = torch.ops.sparsekern.sddmm(g, x, index.row_ptr, index.col_idx)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, y1)
    w = index.to_dense(values)
    assert_within_torch_error(y, x.double() @ w.double().T, F.linear(x, w))
    assert_within_torch_error(d, (g.double().T @ x.double())[mask], (g.T @ x)[mask])
    assert_within_torch_error(d1, (g.double().T @ x.double())[mask], (g.T @ x)[mask])


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_large_output(cpu_isa, dtype):
    """An output of 8 MiB and more is advised onto huge pages before it is written; results are unchanged."""
    index, _ = _index(1024, 40, 0.05)
    x = torch.randn(2048 + 5, 40).to(dtype)
    values = torch.randn(index.nnz).to(dtype)
    y = torch.ops.sparsekern.spmm(x, index.row_ptr, index.col_idx, values, 1024)
    w = index.to_dense(values)
    assert_within_torch_error(y, x.double() @ w.double().T, F.linear(x, w))


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
def test_special_values_propagate(cpu_isa):
    """inf and NaN in x reach exactly the outputs that read them; bf16 and fp16 results round NaN to NaN."""
    index, mask = _index(9, 20, 0.5)
    values = torch.ones(index.nnz)
    for dtype in DTYPES:
        x = torch.randn(40, 20).to(dtype)
        x[3, 5] = float("nan")
        x[7, 6] = float("inf")
        y = torch.ops.sparsekern.spmm(x, index.row_ptr, index.col_idx, values.to(dtype), 9)
        nan, inf = torch.zeros(40, 9, dtype=torch.bool), torch.zeros(40, 9, dtype=torch.bool)
        nan[3], inf[7] = mask[:, 5], mask[:, 6]  # (a dense product would spread them through W's zeros)
        assert torch.equal(y.isnan(), nan), dtype
        assert torch.equal(y.isinf(), inf), dtype


@pytest.mark.parametrize("cpu_isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_sparse_linear_forward_and_backward(cpu_isa, dtype):
    """The layer's whole sparse path (forward, dX, dW at the nonzeros) on each instruction set."""
    batch, n_in, n_out = 75, 53, 46
    index, mask = _index(n_out, n_in, 0.2)
    x = torch.randn(batch, n_in).to(dtype).requires_grad_()
    values = torch.randn(index.nnz).to(dtype).requires_grad_()
    g = torch.randn(batch, n_out).to(dtype)
    y = sparse_linear(x, values, index, backend="cpu", path="sparse")
    gx, gv = torch.autograd.grad(y, (x, values), g)
    w = index.to_dense(values.detach())
    x64, w64, g64 = x.detach().double(), w.double(), g.double()
    assert_within_torch_error(y, x64 @ w64.T, F.linear(x.detach(), w))
    assert_within_torch_error(gx, g64 @ w64, g @ w)
    assert_within_torch_error(gv, (g64.T @ x64)[mask], (g.T @ x.detach())[mask])
