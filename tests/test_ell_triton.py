"""Triton ELL (constant fan-in) launchers (sparsekern/kernels/ell_spmm.py, ell_spmm_t.py, ell_sddmm.py) against
float64 dense references built here (W = zeros(n_out, n_in).scatter_(1, cols, values)).

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set before Triton kernels are defined) or on
a GPU. Tolerance: helpers.assert_within_torch_error (the kernel's error against the float64 reference is at most
twice the error torch itself makes in the same dtype, plus a rounding slack of the result's scale). All three
kernels are deterministic (ell_spmm_t gathers through a transposed index: no atomics), so repeated calls are
compared bit for bit.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_GPU, assert_within_torch_error, run_python

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not HAS_GPU and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (B, n_out, n_in, k): k = 1, n_out = 1, B = 1, k = n_in (dense rows), nothing a multiple of a block size, several
# row blocks with a partial last one, input columns that no row uses (n_in >> n_out * k).
SHAPES = [
    (1, 13, 37, 5),
    (7, 70, 13, 1),
    (33, 37, 70, 9),
    (5, 1, 17, 17),
    (70, 5, 40, 40),
    (3, 3, 50, 2),
]
SHAPE_IDS = [f"B{b}-{o}x{i}-k{k}" for b, o, i, k in SHAPES]


def _kernels():
    # Imported in the tests, after the skip marks: Triton kernels are defined at import.
    from sparsekern.kernels import ell_sddmm, ell_spmm, ell_spmm_t

    return ell_spmm, ell_spmm_t, ell_sddmm


def random_ell(n_out: int, n_in: int, k: int, dtype: torch.dtype):
    """A fresh random constant fan-in matrix: (cols int32 (n_out, k) ascending per row, values (n_out, k) in dtype,
    the float64 dense matrix, the same matrix dense in dtype)."""
    cols = torch.rand(n_out, n_in).argsort(1)[:, :k].sort(1).values.to(torch.int32)
    values = torch.randn(n_out, k, dtype=torch.float64).to(dtype)
    w64 = torch.zeros(n_out, n_in, dtype=torch.float64).scatter_(1, cols.long(), values.double())
    return cols, values, w64, w64.to(dtype)


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ell_spmm_matches_reference(shape, dtype):
    ell_spmm, _, _ = _kernels()
    batch, n_out, n_in, k = shape
    cols, values, w64, w = random_ell(n_out, n_in, k, dtype)
    x = randn(batch, n_in, dtype=dtype)
    y = ell_spmm._ell_spmm_fwd(*to_device(x, cols, values))
    assert y.device.type == DEVICE and y.dtype == dtype and y.is_contiguous()
    assert_within_torch_error(y, x.double() @ w64.T, F.linear(x, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ell_spmm_t_matches_reference(shape, dtype):
    _, ell_spmm_t, _ = _kernels()
    batch, n_out, n_in, k = shape
    cols, values, w64, w = random_ell(n_out, n_in, k, dtype)
    g = randn(batch, n_out, dtype=dtype)
    dx = ell_spmm_t._ell_spmm_t_fwd(*to_device(g, cols, values), n_in)
    assert dx.device.type == DEVICE and dx.dtype == dtype and dx.is_contiguous()
    assert_within_torch_error(dx, g.double() @ w64, g @ w)
    if n_in > n_out * k:  # some input columns receive nothing: exactly zero
        unused = w64.eq(0).all(0)
        assert bool((dx.cpu()[:, unused] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ell_sddmm_matches_reference(shape, dtype):
    _, _, ell_sddmm = _kernels()
    batch, n_out, n_in, k = shape
    cols, _, _, _ = random_ell(n_out, n_in, k, dtype)
    g, x = randn(batch, n_out, dtype=dtype), randn(batch, n_in, dtype=dtype)
    out = ell_sddmm._ell_sddmm_fwd(*to_device(g, x, cols))
    assert out.device.type == DEVICE and out.dtype == dtype and out.shape == (n_out, k) and out.is_contiguous()
    expected = (g.double().T @ x.double()).gather(1, cols.long())
    assert_within_torch_error(out, expected, (g.T @ x).gather(1, cols.long()))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ell_batch_tiles(dtype):
    """A batch of 130 spans several batch tiles of every kernel, the last partial."""
    ell_spmm, ell_spmm_t, ell_sddmm = _kernels()
    batch, n_out, n_in, k = 130, 21, 45, 6
    cols, values, w64, w = random_ell(n_out, n_in, k, dtype)
    x, g = randn(batch, n_in, dtype=dtype), randn(batch, n_out, dtype=dtype)
    dev = to_device(x, g, cols, values)
    assert_within_torch_error(ell_spmm._ell_spmm_fwd(dev[0], dev[2], dev[3]), x.double() @ w64.T, F.linear(x, w))
    assert_within_torch_error(ell_spmm_t._ell_spmm_t_fwd(dev[1], dev[2], dev[3], n_in), g.double() @ w64, g @ w)
    expected = (g.double().T @ x.double()).gather(1, cols.long())
    assert_within_torch_error(
        ell_sddmm._ell_sddmm_fwd(dev[1], dev[0], dev[2]), expected, (g.T @ x).gather(1, cols.long())
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ell_long_sums(dtype):
    """Rows of 600 nonzeros (ell_spmm), input columns of 300 (ell_spmm_t), a batch of 1500 (ell_sddmm): rounding
    partial sums to a 16-bit dtype would show here, not on short sums."""
    ell_spmm, ell_spmm_t, ell_sddmm = _kernels()
    cols, values, w64, w = random_ell(7, 650, 600, dtype)
    x = randn(3, 650, dtype=dtype)
    assert_within_torch_error(ell_spmm._ell_spmm_fwd(*to_device(x, cols, values)), x.double() @ w64.T, F.linear(x, w))
    cols, values, w64, w = random_ell(300, 5, 5, dtype)  # every input column holds all 300 rows
    g = randn(3, 300, dtype=dtype)
    assert_within_torch_error(ell_spmm_t._ell_spmm_t_fwd(*to_device(g, cols, values), 5), g.double() @ w64, g @ w)
    cols, _, _, _ = random_ell(5, 9, 3, dtype)
    g, x = randn(1500, 5, dtype=dtype), randn(1500, 9, dtype=dtype)
    out = ell_sddmm._ell_sddmm_fwd(*to_device(g, x, cols))
    expected = (g.double().T @ x.double()).gather(1, cols.long())
    assert_within_torch_error(out, expected, (g.T @ x).gather(1, cols.long()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_single_products_round_to_nearest_even(dtype):
    """One term per output: the fp32 product of two 16-bit values is exact, so the output must be torch's
    round-to-nearest-even of it, bit for bit (the Triton interpreter alone would truncate bf16)."""
    ell_spmm, ell_spmm_t, ell_sddmm = _kernels()
    n = 37
    cols = torch.randperm(n).to(torch.int32)[:, None]  # k = 1 and every input column used once
    values = randn(n, 1, dtype=dtype)
    x, g = randn(4, n, dtype=dtype), randn(4, n, dtype=dtype)
    y = ell_spmm._ell_spmm_fwd(*to_device(x, cols, values))
    assert torch.equal(y.cpu(), values[:, 0] * x[:, cols[:, 0].long()])
    dx = ell_spmm_t._ell_spmm_t_fwd(*to_device(g, cols, values), n)
    expected = torch.empty_like(dx.cpu())
    expected[:, cols[:, 0].long()] = g * values[:, 0]
    assert torch.equal(dx.cpu(), expected)
    out = ell_sddmm._ell_sddmm_fwd(*to_device(g[:1], x[:1], cols))
    assert torch.equal(out.cpu(), (g[0] * x[0, cols[:, 0].long()])[:, None])


def test_ell_spmm_t_is_deterministic_and_takes_a_prebuilt_index():
    """Two calls give the same bits; a transposed index built once gives the same bits again."""
    _, ell_spmm_t, _ = _kernels()
    cols, values, _, _ = random_ell(40, 11, 7, torch.float32)  # ~25 nonzeros per input column: real sums
    g = randn(19, 40, dtype=torch.float32)
    g, cols, values = to_device(g, cols, values)
    first = ell_spmm_t._ell_spmm_t_fwd(g, cols, values, 11)
    assert torch.equal(first, ell_spmm_t._ell_spmm_t_fwd(g, cols, values, 11))
    index = ell_spmm_t._ell_transpose_index(cols, 11)
    assert torch.equal(first, ell_spmm_t._ell_spmm_t_fwd(g, cols, values, 11, index=index))


def test_ell_transpose_index():
    """col_ptr and perm list every input column's nonzeros, as flat positions o * k + t in ascending o."""
    _, ell_spmm_t, _ = _kernels()
    n_out, n_in, k = 9, 14, 4
    cols, _, _, _ = random_ell(n_out, n_in, k, torch.float32)
    col_ptr, perm = ell_spmm_t._ell_transpose_index(cols.to(DEVICE), n_in)
    col_ptr, perm = col_ptr.cpu(), perm.cpu().long()
    assert col_ptr.dtype == torch.int64 and col_ptr.shape == (n_in + 1,) and perm.shape == (n_out * k,)
    for i in range(n_in):
        expected = [o * k + t for o in range(n_out) for t in range(k) if int(cols[o, t]) == i]
        assert perm[col_ptr[i] : col_ptr[i + 1]].tolist() == expected


def test_ell_empty_shapes():
    """B = 0, k = 0 and n_out = 0 give zeros of the right shape without a launch."""
    ell_spmm, ell_spmm_t, ell_sddmm = _kernels()
    cols, values, _, _ = random_ell(6, 10, 3, torch.float32)
    empty_cols, empty_values = torch.zeros(6, 0, dtype=torch.int32), torch.zeros(6, 0)
    no_rows, no_values = torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, 3)
    x0, g0 = torch.randn(0, 10), torch.randn(0, 6)
    assert ell_spmm._ell_spmm_fwd(*to_device(x0, cols, values)).shape == (0, 6)
    y = ell_spmm._ell_spmm_fwd(*to_device(torch.randn(4, 10), empty_cols, empty_values))
    assert y.shape == (4, 6) and bool((y == 0).all())
    assert ell_spmm._ell_spmm_fwd(*to_device(torch.randn(4, 10), no_rows, no_values)).shape == (4, 0)
    dx = ell_spmm_t._ell_spmm_t_fwd(*to_device(torch.randn(4, 6), empty_cols, empty_values), 10)
    assert dx.shape == (4, 10) and bool((dx == 0).all())
    assert ell_spmm_t._ell_spmm_t_fwd(*to_device(g0, cols, values), 10).shape == (0, 10)
    dx = ell_spmm_t._ell_spmm_t_fwd(*to_device(torch.randn(4, 0), no_rows, no_values), 10)
    assert dx.shape == (4, 10) and bool((dx == 0).all())
    out = ell_sddmm._ell_sddmm_fwd(*to_device(g0, x0, cols))
    assert out.shape == (6, 3) and bool((out == 0).all())
    assert ell_sddmm._ell_sddmm_fwd(*to_device(torch.randn(4, 6), torch.randn(4, 10), empty_cols)).shape == (6, 0)


def _op_modules():
    import importlib

    # sparsekern.ops.ell_spmm is the function; the module holds the triton_op
    return [importlib.import_module(f"sparsekern.ops.{name}") for name in ("ell_spmm", "ell_spmm_t", "ell_sddmm")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_public_ops_with_triton_backend(dtype):
    """sparsekern.ops.ell_* with backend="triton" run these launchers (through their triton_ops)."""
    from sparsekern.ops import ell_sddmm, ell_spmm, ell_spmm_t

    batch, n_out, n_in, k = 9, 21, 30, 4
    cols, values, w64, w = random_ell(n_out, n_in, k, dtype)
    x, g = randn(batch, n_in, dtype=dtype), randn(batch, n_out, dtype=dtype)
    x, g, cols, values = to_device(x, g, cols, values)
    y = ell_spmm(x, cols, values, backend="triton")
    assert_within_torch_error(y, x.double() @ w64.T.to(DEVICE), F.linear(x, w.to(DEVICE)))
    dx = ell_spmm_t(g, cols, values, n_in, backend="triton")
    assert_within_torch_error(dx, g.double() @ w64.to(DEVICE), g @ w.to(DEVICE))
    dv = ell_sddmm(g, x, cols, backend="triton")
    idx = cols.long()
    assert_within_torch_error(dv, (g.double().T @ x.double()).gather(1, idx), (g.T @ x).gather(1, idx))


def test_triton_autograd_through_public_op():
    """The backward of ell_spmm on the Triton backend (ell_spmm_t for dx, ell_sddmm for dvalues) against float64
    autograd of the dense product."""
    from sparsekern.ops import ell_spmm

    batch, n_out, n_in, k = 6, 13, 20, 5
    cols, values, _, _ = random_ell(n_out, n_in, k, torch.float32)
    x, gy = randn(batch, n_in, dtype=torch.float32), randn(batch, n_out, dtype=torch.float32)
    x64, v64 = x.double().requires_grad_(), values.double().requires_grad_()
    w64 = torch.zeros(n_out, n_in, dtype=torch.float64).scatter(1, cols.long(), v64)
    (x64 @ w64.T).backward(gy.double())
    x, gy, cols, values = to_device(x, gy, cols, values)
    x.requires_grad_()
    values.requires_grad_()
    ell_spmm(x, cols, values, backend="triton").backward(gy)
    w = torch.zeros(n_out, n_in).scatter(1, cols.cpu().long(), values.detach().cpu())
    assert_within_torch_error(x.grad, x64.grad, gy.cpu() @ w)
    assert_within_torch_error(values.grad, v64.grad, (gy.cpu().T @ x.detach().cpu()).gather(1, cols.cpu().long()))


def test_opcheck_triton_ops():
    """Schema, autograd registration and fake tensors; the full opcheck of a triton_op needs a GPU (DESIGN §3)."""
    spmm_mod, spmm_t_mod, sddmm_mod = _op_modules()
    cols, values, _, _ = random_ell(7, 12, 3, torch.float32)
    x, g = randn(5, 12, dtype=torch.float32), randn(5, 7, dtype=torch.float32)
    x, g, cols, values = to_device(x, g, cols, values)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(spmm_mod._triton_op(), (x, cols, values), test_utils=checks)
    torch.library.opcheck(spmm_t_mod._triton_op(), (g, cols, values, 12), test_utils=checks)
    torch.library.opcheck(sddmm_mod._triton_op(), (g, x, cols), test_utils=checks)


_PTX_PROBE = """
import json, triton
from triton.backends.compiler import GPUTarget
from sparsekern.kernels import ell_sddmm, ell_spmm, ell_spmm_t
D = "DTYPE"
sizes = {}
for batch, k in ((1, 1), (300, 77)):  # size-1 blocks (B = 1, k = 1) and the large-batch tiles
    bo, bt, bb = ell_spmm._ell_blocks(batch, k)
    spmm = ({"xt_ptr": D, "cols_ptr": "*i32", "values_ptr": D, "y_ptr": D, "n_out": "i32", "B": "i32", "K": "i32"},
            {"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_B": bb})
    bo, bt, bb = ell_sddmm._ell_sddmm_blocks(batch, k)
    sddmm = ({"gt_ptr": D, "xt_ptr": D, "cols_ptr": "*i32", "out_ptr": D, "n_out": "i32", "B": "i32", "K": "i32"},
             {"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_B": bb})
    bb = min(ell_spmm_t._MAX_BLOCK_B, triton.next_power_of_2(batch))
    bj = min(ell_spmm_t._MAX_BLOCK_J, max(ell_spmm_t._MIN_BLOCK_J, ell_spmm_t._TILE // bb))
    spmm_t = ({"gt_ptr": D, "col_ptr_ptr": "*i64", "perm_ptr": "*i32", "values_ptr": D, "dxt_ptr": D, "n_in": "i32",
               "B": "i32", "K": "i32"}, {"BLOCK_I": ell_spmm_t._BLOCK_I, "BLOCK_J": bj, "BLOCK_B": bb})
    kernels = {"spmm": (ell_spmm._ell_spmm_fwd_kernel, spmm), "sddmm": (ell_sddmm._ell_sddmm_fwd_kernel, sddmm),
               "spmm_t": (ell_spmm_t._ell_spmm_t_fwd_kernel, spmm_t)}
    for name, (kernel, (sig, constexprs)) in kernels.items():
        for dtype, arch in (("fp32", 90), ("bf16", 80), ("fp16", 90)):
            signature = {a: t.replace(D, "*" + dtype) for a, t in sig.items()} | dict.fromkeys(constexprs, "constexpr")
            source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
            sizes[f"{name}-B{batch}-k{k}-{dtype}-sm{arch}"] = ptx.count("ld.global")
print(json.dumps(sizes))
"""


def test_ell_kernels_compile_for_gpus():
    """Compiles every ELL kernel for sm_80 / sm_90 (Triton's own ptxas, no GPU; a fresh process outside the
    interpreter), in every dtype, with size-1 blocks (B = 1, k = 1) and the large-batch tiles: the interpreter does
    not check what only the GPU compiler rejects."""
    done = run_python(_PTX_PROBE, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-3000:]
    loads = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(loads) == 2 * 3 * 3 and all(count > 0 for count in loads.values()), loads
