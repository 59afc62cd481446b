"""Triton spmm / sddmm launchers (sparsekern/kernels/spmm.py, sddmm.py) against float64 references.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set before Triton kernels are defined)
or on a GPU. Tolerance: helpers.assert_within_torch_error (the kernel's error against the float64 reference is at
most twice the error torch itself makes in the same dtype, plus a rounding slack of the result's scale).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_GPU, assert_within_torch_error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_GPU and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (B, n_out, n_in): odd sizes, several row blocks with a partial last one, rows longer than one nonzero step.
SHAPES = [(1, 13, 37), (7, 70, 13), (33, 37, 70)]
SHAPE_IDS = [f"B{b}-{o}x{i}" for b, o, i in SHAPES]
DENSITIES = [0.0, 0.1, 0.5, 1.0]


def _kernels():
    # Imported in the tests, after the skip marks: Triton kernels are defined at import.
    from sparsekern.kernels import sddmm, spmm

    return spmm, sddmm


def random_csr(n_out: int, n_in: int, density: float, dtype: torch.dtype, *, empty_rows: bool = False):
    """A fresh random CSR matrix: (row_ptr int64, col_idx int32, values, the same matrix dense, its mask)."""
    mask = torch.rand(n_out, n_in) < density
    if empty_rows:
        mask[::3] = False
        mask[-1] = False
    row_ptr = torch.zeros(n_out + 1, dtype=torch.int64)
    row_ptr[1:] = mask.sum(1).cumsum(0)
    col_idx = mask.nonzero()[:, 1].to(torch.int32)  # row-major order: ascending columns within each row
    values = torch.randn(int(mask.sum()), dtype=torch.float64).to(dtype)
    dense = torch.zeros(n_out, n_in, dtype=dtype)
    dense[mask] = values
    return row_ptr, col_idx, values, dense, mask


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_spmm_matches_reference(shape, density, dtype):
    spmm, _ = _kernels()
    batch, n_out, n_in = shape
    row_ptr, col_idx, values, dense, _ = random_csr(n_out, n_in, density, dtype)
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
    y = spmm._spmm_fwd(*to_device(x, row_ptr, col_idx, values), n_out)
    assert y.device.type == DEVICE and y.is_contiguous()
    assert_within_torch_error(y, x.double() @ dense.double().T, F.linear(x, dense))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_empty_rows_and_batch_tiles(dtype):
    """Every third row and the last row empty; a batch of 130 spans two batch tiles (the last partial)."""
    spmm, _ = _kernels()
    batch, n_out, n_in = 130, 37, 70
    row_ptr, col_idx, values, dense, _ = random_csr(n_out, n_in, 0.5, dtype, empty_rows=True)
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
    y = spmm._spmm_fwd(*to_device(x, row_ptr, col_idx, values), n_out)
    assert bool((y[:, ::3] == 0).all()) and bool((y[:, -1] == 0).all())
    assert_within_torch_error(y, x.double() @ dense.double().T, F.linear(x, dense))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_long_rows(dtype):
    """Rows of 1500 nonzeros: rounding partial sums to a 16-bit dtype would show here, not on short rows."""
    spmm, _ = _kernels()
    batch, n_out, n_in = 7, 13, 1500
    row_ptr, col_idx, values, dense, _ = random_csr(n_out, n_in, 1.0, dtype)
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
    y = spmm._spmm_fwd(*to_device(x, row_ptr, col_idx, values), n_out)
    assert_within_torch_error(y, x.double() @ dense.double().T, F.linear(x, dense))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_spmm_transposed_index_gives_dx(dtype):
    """dX = G @ W through the CSC index of W (the CSR index of W.T and the values permuted to match)."""
    spmm, _ = _kernels()
    batch, n_out, n_in = 33, 37, 70
    _, _, _, dense, mask = random_csr(n_out, n_in, 0.3, dtype, empty_rows=True)
    col_ptr = torch.zeros(n_in + 1, dtype=torch.int64)
    col_ptr[1:] = mask.sum(0).cumsum(0)
    row_idx = mask.T.nonzero()[:, 1].to(torch.int32)
    values_t = dense.T[mask.T]
    g = torch.randn(batch, n_out, dtype=torch.float64).to(dtype)
    dx = spmm._spmm_fwd(*to_device(g, col_ptr, row_idx, values_t), n_in)
    assert_within_torch_error(dx, g.double() @ dense.double(), g @ dense)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES + [(130, 37, 70)], ids=SHAPE_IDS + ["B130-37x70"])
def test_sddmm_matches_reference(shape, density, dtype):
    """B = 130 takes three batch steps; 37 x 70 at density >= 0.5 spans several nonzero blocks."""
    _, sddmm = _kernels()
    batch, n_out, n_in = shape
    row_ptr, col_idx, _, _, mask = random_csr(n_out, n_in, density, dtype, empty_rows=density == 0.5)
    g = torch.randn(batch, n_out, dtype=torch.float64).to(dtype)
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
    out = sddmm._sddmm_fwd(*to_device(g, x, row_ptr, col_idx))
    assert out.device.type == DEVICE and out.shape == (col_idx.numel(),)
    # mask[...] lists the nonzeros row-major, the CSR order
    assert_within_torch_error(out, (g.double().T @ x.double())[mask], (g.T @ x)[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sddmm_long_batch(dtype):
    """A batch of 1500: rounding partial sums to a 16-bit dtype would show here, not on short sums."""
    _, sddmm = _kernels()
    batch, n_out, n_in = 1500, 13, 37
    row_ptr, col_idx, _, _, mask = random_csr(n_out, n_in, 0.5, dtype)
    g = torch.randn(batch, n_out, dtype=torch.float64).to(dtype)
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
    out = sddmm._sddmm_fwd(*to_device(g, x, row_ptr, col_idx))
    assert_within_torch_error(out, (g.double().T @ x.double())[mask], (g.T @ x)[mask])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_single_products_round_to_nearest_even(dtype):
    """One term per output: the fp32 product of two 16-bit values is exact, so the output must be torch's
    round-to-nearest-even of it, bit for bit (the Triton interpreter alone would truncate bf16)."""
    spmm, sddmm = _kernels()
    n_out, n_in = 37, 70
    row_ptr, col_idx, values, _, mask = random_csr(n_out, n_in, 1.0, dtype)
    g = torch.randn(1, n_out, dtype=torch.float64).to(dtype)
    x = torch.randn(1, n_in, dtype=torch.float64).to(dtype)
    out = sddmm._sddmm_fwd(*to_device(g, x, row_ptr, col_idx))
    assert torch.equal(out.cpu(), (g.T * x)[mask])
    # spmm with one nonzero per row: row o uses column n_in - 1 - o
    one_per_row = torch.arange(n_out + 1, dtype=torch.int64), n_in - 1 - torch.arange(n_out, dtype=torch.int32)
    y = spmm._spmm_fwd(*to_device(x, *one_per_row, values[:n_out]), n_out)
    assert torch.equal(y.cpu(), values[:n_out] * x.flip(1)[:, :n_out])


def test_sddmm_empty_batch_gives_zeros():
    _, sddmm = _kernels()
    row_ptr, col_idx, _, _, _ = random_csr(13, 37, 0.5, torch.float32)
    g, x = torch.randn(0, 13), torch.randn(0, 37)
    out = sddmm._sddmm_fwd(*to_device(g, x, row_ptr, col_idx))
    assert out.shape == (col_idx.numel(),) and bool((out == 0).all())


def test_spmm_empty_batch_and_no_rows():
    spmm, _ = _kernels()
    row_ptr, col_idx, values, _, _ = random_csr(13, 37, 0.5, torch.float32)
    assert spmm._spmm_fwd(*to_device(torch.randn(0, 37), row_ptr, col_idx, values), 13).shape == (0, 13)
    empty = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    assert spmm._spmm_fwd(*to_device(torch.randn(5, 37), *empty), 0).shape == (5, 0)
