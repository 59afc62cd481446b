"""The ELL (constant fan-in) kernels on a GPU: the CUDA C++ ops (csrc/cuda/ell_*.cu, torch.ops.sparsekern.ell_*
on CUDA tensors) and the compiled Triton launchers (sparsekern/kernels/ell_*.py), each against the float64 dense
reference built here, on shapes that reach every schedule (the CUDA kernels switch at B = 16, 32, 64; the Triton
tiles change with B and k). Part of ``scripts/gpu-check.sh`` (the whole suite runs there, GPU tests first); skipped
without a GPU, except the registration check, which needs only a CUDA build of the extension.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_GPU, assert_within_torch_error

from sparsekern import _extension

WITH_CUDA = _extension.available() and _extension.with_cuda()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OPS = ("ell_spmm", "ell_spmm_t", "ell_sddmm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BATCHES = [1, 5, 16, 17, 33, 65, 300]  # every CUDA schedule (B <= 4, <= 16, <= 32, <= 64, > 64)
# (n_out, n_in, k): k not a multiple of 8 or 32, k = 1, n_out = 1, k = n_in, a wide layer with unused inputs
LAYERS = [(300, 257, 37), (129, 64, 1), (1, 70, 70), (65, 1000, 8), (17, 40, 40)]
LAYER_IDS = [f"{o}x{i}-k{k}" for o, i, k in LAYERS]

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]
cuda_backend = pytest.param(
    "cuda", marks=[pytest.mark.skipif(not WITH_CUDA, reason="sparsekern._C was built without its CUDA sources")]
)
triton_backend = pytest.param(
    "triton",
    marks=[pytest.mark.triton, pytest.mark.skipif(INTERPRET, reason="compiled Triton: TRITON_INTERPRET must be unset")],
)
BACKENDS = [cuda_backend, triton_backend]


def random_ell(n_out, n_in, k, dtype, device="cuda"):
    cols = torch.rand(n_out, n_in).argsort(1)[:, :k].sort(1).values.to(torch.int32)
    values = torch.randn(n_out, k, dtype=torch.float64).to(dtype)
    w64 = torch.zeros(n_out, n_in, dtype=torch.float64).scatter_(1, cols.long(), values.double())
    return cols.to(device), values.to(device), w64.to(device)


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64, device="cuda").to(dtype)


def run(backend, op, *args):
    if backend == "cuda":
        return getattr(torch.ops.sparsekern, op)(*args)
    from sparsekern.kernels import ell_sddmm, ell_spmm, ell_spmm_t

    launcher = {
        "ell_spmm": ell_spmm._ell_spmm_fwd,
        "ell_spmm_t": ell_spmm_t._ell_spmm_t_fwd,
        "ell_sddmm": ell_sddmm._ell_sddmm_fwd,
    }[op]
    return launcher(*args)


@pytest.mark.skipif(not WITH_CUDA, reason="sparsekern._C was built without its CUDA sources")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered(op):
    """A CUDA build registers a CUDA kernel for every ELL op (no GPU needed to check)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CUDA")


def check_all_ops(backend, batch, layer, dtype):
    n_out, n_in, k = layer
    cols, values, w64 = random_ell(n_out, n_in, k, dtype)
    w = w64.to(dtype)
    x, g = randn(batch, n_in, dtype=dtype), randn(batch, n_out, dtype=dtype)
    y = run(backend, "ell_spmm", x, cols, values)
    assert y.device.type == "cuda" and y.dtype == dtype and y.is_contiguous()
    assert_within_torch_error(y, x.double() @ w64.T, F.linear(x, w))
    dx = run(backend, "ell_spmm_t", g, cols, values, n_in)
    assert dx.dtype == dtype and dx.is_contiguous()
    assert_within_torch_error(dx, g.double() @ w64, g @ w)
    dv = run(backend, "ell_sddmm", g, x, cols)
    assert dv.dtype == dtype and dv.shape == (n_out, k) and dv.is_contiguous()
    idx = cols.long()
    assert_within_torch_error(dv, (g.double().T @ x.double()).gather(1, idx), (g.T @ x).gather(1, idx))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not WITH_CUDA, reason="needs a CUDA GPU and a CUDA build of sparsekern._C")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layer", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_cuda_ops_match_reference(batch, layer, dtype):
    check_all_ops("cuda", batch, layer, dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not HAS_GPU or INTERPRET, reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 16, 300], ids=lambda b: f"B{b}")
def test_triton_matches_reference_at_gpu_sizes(batch, dtype):
    """Compiled Triton on a layer larger than the interpreter tests reach (tests/test_ell_triton.py also runs on
    the GPU); a few batch sizes only, as every tile shape is one more compilation."""
    check_all_ops("triton", batch, LAYERS[0], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [3, 300], ids=lambda b: f"B{b}")
def test_ell_kernels_are_deterministic(batch, backend):
    """No atomics anywhere (dX gathers through a transposed index): repeated calls give the same bits."""
    cols, values, _ = random_ell(512, 300, 64, torch.float32)  # ~109 nonzeros per input column
    x, g = randn(batch, 300, dtype=torch.float32), randn(batch, 512, dtype=torch.float32)
    for op, args in (
        ("ell_spmm", (x, cols, values)),
        ("ell_spmm_t", (g, cols, values, 300)),
        ("ell_sddmm", (g, x, cols)),
    ):
        first = run(backend, op, *args)
        for _ in range(3):
            assert torch.equal(first, run(backend, op, *args)), op


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not WITH_CUDA, reason="needs a CUDA GPU and a CUDA build of sparsekern._C")
def test_cuda_argument_errors():
    cols, values, _ = random_ell(6, 10, 3, torch.float32)
    x, g = randn(4, 10, dtype=torch.float32), randn(4, 6, dtype=torch.float32)
    ops = torch.ops.sparsekern
    with pytest.raises(TypeError, match="ell_spmm: cols must be int32"):
        ops.ell_spmm(x, cols.long(), values)
    with pytest.raises(TypeError, match="ell_spmm: values must have x's dtype"):
        ops.ell_spmm(x, cols, values.half())
    with pytest.raises(ValueError, match="ell_spmm: values must have cols' shape"):
        ops.ell_spmm(x, cols, values[:, :2].contiguous())
    with pytest.raises(ValueError, match="ell_spmm: values must be a CUDA tensor"):
        ops.ell_spmm(x, cols, values.cpu())
    with pytest.raises(ValueError, match="ell_spmm_t: g must have one column per row of cols"):
        ops.ell_spmm_t(x, cols, values, 10)
    with pytest.raises(ValueError, match="ell_spmm_t: n_in must be >= 0"):
        ops.ell_spmm_t(g, cols, values, -1)
    with pytest.raises(ValueError, match="ell_sddmm: g and x must have the same batch size"):
        ops.ell_sddmm(g, x[:3], cols)
    with pytest.raises(TypeError, match="ell_sddmm: g must be float32, bfloat16 or float16"):
        ops.ell_sddmm(g.double(), x.double(), cols)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or not WITH_CUDA, reason="needs a CUDA GPU and a CUDA build of sparsekern._C")
def test_opcheck_cuda_ops():
    cols, values, _ = random_ell(30, 12, 5, torch.float32)
    x, g = randn(17, 12, dtype=torch.float32), randn(17, 30, dtype=torch.float32)
    x.requires_grad_(), g.requires_grad_(), values.requires_grad_()
    torch.library.opcheck(torch.ops.sparsekern.ell_spmm.default, (x, cols, values))
    torch.library.opcheck(torch.ops.sparsekern.ell_spmm_t.default, (g, cols, values, 12))
    torch.library.opcheck(torch.ops.sparsekern.ell_sddmm.default, (g, x, cols))


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not HAS_GPU or INTERPRET, reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset)")
def test_opcheck_triton_ops_on_gpu():
    """The full opcheck of the triton_ops (on the CPU only their schema, autograd and fake checks run)."""
    import importlib

    modules = [importlib.import_module(f"sparsekern.ops.{name}") for name in OPS]
    cols, values, _ = random_ell(30, 12, 5, torch.float32)
    x, g = randn(17, 12, dtype=torch.float32), randn(17, 30, dtype=torch.float32)
    x.requires_grad_(), g.requires_grad_(), values.requires_grad_()
    torch.library.opcheck(modules[0]._triton_op(), (x, cols, values))
    torch.library.opcheck(modules[1]._triton_op(), (g, cols, values, 12))
    torch.library.opcheck(modules[2]._triton_op(), (g, x, cols))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_on_gpu(backend):
    """The three ops under torch.compile(fullgraph=True) (inductor; the Triton ops through wrap_triton) give the
    eager results bit for bit."""
    import importlib

    if backend == "cuda":
        ops = (torch.ops.sparsekern.ell_spmm, torch.ops.sparsekern.ell_spmm_t, torch.ops.sparsekern.ell_sddmm)
    else:
        ops = tuple(importlib.import_module(f"sparsekern.ops.{name}")._triton_op() for name in OPS)
    cols, values, _ = random_ell(30, 12, 5, torch.float32)
    x, g = randn(17, 12, dtype=torch.float32), randn(17, 30, dtype=torch.float32)

    def f(x, g, cols, values):
        return ops[0](x, cols, values), ops[1](g, cols, values, 12), ops[2](g, x, cols)

    compiled = torch.compile(f, fullgraph=True)
    for a, b in zip(compiled(x, g, cols, values), f(x, g, cols, values), strict=True):
        assert torch.equal(a, b)
