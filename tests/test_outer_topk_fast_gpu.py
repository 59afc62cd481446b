"""outer_topk's fast GPU kernels: Triton ``tl.dot`` (under the interpreter here, on tensor cores on a GPU) and the
CUDA WMMA kernel (GPU only). Their scores are not the exact in-order sum, so they are checked against float64 with
the rounding bound sparsekern/kernels/outer_topk.py documents; the selection on top of them is checked exactly
(the result is the exact top-k of the scores the kernel computes, lower flat index first among equal scores),
and so is determinism. The exact kernels stay bit-identical to the reference."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HAS_GPU, backend_params, device_for, requires_gpu, run_python

import sparsekern
from sparsekern.ops.outer_topk import exclusion_csr
from sparsekern.reference import outer_topk_reference

FAST_KERNELS = backend_params("triton", "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (B, n_out, n_in): odd sizes, partial tiles and a partial last batch chunk; the interpreter gets the small ones.
SHAPES = {"triton": [(19, 37, 70), (1, 7, 13), (40, 66, 17)], "cuda": [(19, 37, 70), (67, 200, 301), (300, 97, 130)]}


def _shapes(backend):
    return SHAPES["triton"] if backend == "triton" and not HAS_GPU else SHAPES["cuda"]


def _fast(backend, x, g, k, row_ptr, col_idx):
    """The fast kernel of ``backend`` itself (the Triton launcher's ``fast=``, the CUDA op's ``fast``)."""
    if backend == "triton":
        from sparsekern.kernels.outer_topk import _outer_topk_fwd

        return _outer_topk_fwd(x, g, k, row_ptr, col_idx, fast=True)
    return torch.ops.sparsekern.outer_topk(x, g, k, row_ptr, col_idx, True)


def _inputs(batch, n_out, n_in, dtype, device):
    x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype).to(device)
    g = torch.randn(batch, n_out, dtype=torch.float64).to(dtype).to(device)
    return x, g


def _bound(x, g):
    """(n_out * n_in,) float64: the documented bound on |fast score - |S||, S the float64 score of x and g as
    given (after their rounding to dtype): (e_in + (B + 1) * 2**-22) * sum_b |g[b, o] * x[b, i]|, with
    e_in = 2**-9 + 2**-19 for float32 (TF32 inputs), 0 for bf16 / fp16 (exact products)."""
    e_in = 2.0**-9 + 2.0**-19 if x.dtype == torch.float32 else 0.0
    magnitude = g.cpu().double().abs().T @ x.cpu().double().abs()
    return ((e_in + (x.shape[0] + 1) * 2.0**-22) * magnitude).reshape(-1)


def _check_fast_result(x, g, k, exclude, index, score):
    """Every property of a fast result that float64 can decide."""
    n_out, n_in = g.shape[1], x.shape[1]
    index, score = index.cpu(), score.cpu()
    assert index.dtype == torch.int64 and score.dtype == torch.float32 and index.shape == score.shape == (k,)
    assert len(set(index.tolist())) == k, "indices repeat"
    assert bool(((index >= 0) & (index < n_out * n_in)).all())
    excluded = exclude.cpu().reshape(-1)
    assert not bool(excluded[index].any()), "an excluded position was returned"
    if k == 0:
        return
    exact = (g.cpu().double().T @ x.cpu().double()).abs().reshape(-1)  # float64 scores
    bound = _bound(x, g)
    # the scores are within the bound of float64 at every returned position
    err = (score.double() - exact[index]).abs()
    assert bool((err <= bound[index]).all()), f"score error {float((err - bound[index]).max()):.3g} past the bound"
    # sorted by score descending, equal scores by ascending index
    assert bool((score[1:] <= score[:-1]).all())
    same = score[1:] == score[:-1]
    assert bool((index[1:][same] > index[:-1][same]).all()), "equal scores not in ascending index order"
    # against the float64 order: the k-th largest float64 candidate T has k candidates at or above it, whose fast
    # scores are all >= T - max bound; so every returned float64 score is >= T - its bound - max bound, and every
    # candidate left out is at most the smallest returned score plus its own bound
    candidates = ~excluded
    kth = exact[candidates].sort(descending=True).values[k - 1]
    worst = bound[candidates].max()
    assert bool((exact[index] >= kth - bound[index] - worst).all()), "a returned score is too small"
    left_out = candidates.clone()
    left_out[index] = False
    assert bool((exact[left_out] <= score.double().min() + bound[left_out]).all()), "a larger score was left out"


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9])
def test_fast_within_bound_of_float64(backend, dtype, density):
    device = device_for(backend)
    for batch, n_out, n_in in _shapes(backend):
        x, g = _inputs(batch, n_out, n_in, dtype, device)
        exclude = torch.rand(n_out, n_in, device=device) < density
        row_ptr, col_idx = exclusion_csr("t", exclude, n_out, n_in, x.device)
        candidates = n_out * n_in - col_idx.numel()
        for k in sorted({min(1, candidates), candidates // 7, candidates}):
            index, score = _fast(backend, x, g, k, row_ptr, col_idx)
            _check_fast_result(x, g, k, exclude, index, score)


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["randn", "steps"])
def test_fast_is_the_exact_top_k_of_its_scores(backend, dtype, kind):
    """With k = every candidate the kernel returns all its scores in order; every smaller k must return exactly a
    prefix of that order, score bits included: the selection (histograms, ties cut by rows, compaction) is exact
    on the fast scores. 'steps': inputs on a grid of 2**-2 and 2**-4, so scores are multiples of 2**-6 and
    many distinct positions tie."""
    device = device_for(backend)
    batch, n_out, n_in = _shapes(backend)[0]
    x, g = _inputs(batch, n_out, n_in, dtype, device)
    if kind == "steps":
        x = (x * 4).round() / 4  # exact in every dtype and in TF32
        g = (g * 4).round() / 16
    exclude = torch.rand(n_out, n_in, device=device) < 0.3
    row_ptr, col_idx = exclusion_csr("t", exclude, n_out, n_in, x.device)
    candidates = n_out * n_in - col_idx.numel()
    full_index, full_score = _fast(backend, x, g, candidates, row_ptr, col_idx)
    _check_fast_result(x, g, candidates, exclude, full_index, full_score)
    if kind == "steps":
        assert int((full_score[1:] == full_score[:-1]).sum()) > candidates // 4, "the test needs many ties"
    for k in (1, 5, candidates // 3, candidates - 1):
        index, score = _fast(backend, x, g, k, row_ptr, col_idx)
        assert torch.equal(index, full_index[:k])
        assert torch.equal(score.view(torch.int32), full_score[:k].view(torch.int32))


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fast_equals_exact_when_the_arithmetic_is_exact(backend, dtype):
    """Inputs in {-1, 0, 1}: every product and partial sum is a small integer, exact in TF32, bf16, fp16 and
    float32 alike, so the fast kernel must return the reference's result bit for bit (ties, zeros and all)."""
    device = device_for(backend)
    for batch, n_out, n_in in _shapes(backend):
        x = torch.randint(-1, 2, (batch, n_in)).to(dtype).to(device)
        g = torch.randint(-1, 2, (batch, n_out)).to(dtype).to(device)
        exclude = torch.rand(n_out, n_in, device=device) < 0.3
        row_ptr, col_idx = exclusion_csr("t", exclude, n_out, n_in, x.device)
        k = (n_out * n_in - col_idx.numel()) // 2
        expected = outer_topk_reference(x.cpu(), g.cpu(), k, row_ptr.cpu(), col_idx.cpu())
        index, score = _fast(backend, x, g, k, row_ptr, col_idx)
        assert torch.equal(index.cpu(), expected[0])
        assert torch.equal(score.cpu().view(torch.int32), expected[1].view(torch.int32))


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fast_is_deterministic(backend, dtype):
    device = device_for(backend)
    batch, n_out, n_in = _shapes(backend)[-1]
    x, g = _inputs(batch, n_out, n_in, dtype, device)
    exclude = torch.rand(n_out, n_in, device=device) < 0.5
    row_ptr, col_idx = exclusion_csr("t", exclude, n_out, n_in, x.device)
    k = (n_out * n_in - col_idx.numel()) // 5
    first = _fast(backend, x, g, k, row_ptr, col_idx)
    second = _fast(backend, x, g, k, row_ptr, col_idx)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1].view(torch.int32), second[1].view(torch.int32))


@pytest.mark.parametrize("backend", FAST_KERNELS)
def test_fast_nan_score_raises(backend):
    """A NaN score raises, as on the exact path. Finite inputs whose products overflow give inf - inf = NaN on
    tensor cores, but inf under the interpreter (numpy's matmul fuses multiply and add), so the kernel is handed
    an infinite x (which the public function refuses) to make NaN certain: inf * 1 + inf * -1."""
    device = device_for(backend)
    x = torch.tensor([[float("inf"), 1.0, 2.0], [float("inf"), 1.0, 2.0]], device=device)
    g = torch.tensor([[1.0], [-1.0]], device=device)
    row_ptr, col_idx = exclusion_csr("t", None, 1, 3, x.device)
    with pytest.raises(ValueError, match="overflowed float32 to NaN"):
        _fast(backend, x, g, 1, row_ptr, col_idx)


@pytest.mark.parametrize("backend", FAST_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exact_kernels_unchanged(backend, dtype):
    """The exact path (the launcher's / op's default, and precision="exact") stays bit-identical to the
    reference."""
    device = device_for(backend)
    batch, n_out, n_in = _shapes(backend)[0]
    x, g = _inputs(batch, n_out, n_in, dtype, device)
    exclude = torch.rand(n_out, n_in, device=device) < 0.3
    row_ptr, col_idx = exclusion_csr("t", exclude, n_out, n_in, x.device)
    k = (n_out * n_in - col_idx.numel()) // 3
    expected = outer_topk_reference(x.cpu(), g.cpu(), k, row_ptr.cpu(), col_idx.cpu())
    if backend == "triton":
        from sparsekern.kernels.outer_topk import _outer_topk_fwd

        direct = _outer_topk_fwd(x, g, k, row_ptr, col_idx)
    else:
        direct = torch.ops.sparsekern.outer_topk(x, g, k, row_ptr, col_idx)
    public = sparsekern.outer_topk(x, g, k, exclude=exclude, precision="exact", backend=backend)
    for index, score in (direct, public):
        assert torch.equal(index.cpu(), expected[0])
        assert torch.equal(score.cpu().view(torch.int32), expected[1].view(torch.int32))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", FAST_KERNELS)
def test_fast_uses_tf32_on_a_gpu(backend):
    """On a GPU, float32 fast scores come from TF32 tensor cores: they differ from the exact scores (by about
    2**-11 relative), while staying within the bound. (Under the interpreter tl.dot is a float32 matmul.)"""
    x, g = _inputs(256, 128, 192, torch.float32, "cuda")
    row_ptr, col_idx = exclusion_csr("t", None, 128, 192, x.device)
    k = 128 * 192
    index, score = _fast(backend, x, g, k, row_ptr, col_idx)
    _check_fast_result(x, g, k, torch.zeros(128, 192, dtype=torch.bool), index, score)
    exact = (g.double().T @ x.double()).abs().reshape(-1)[index]
    rel = ((score.double() - exact).abs() / exact.clamp_min(1e-30)).median()
    assert float(rel) > 2.0**-16, "float32 fast scores look like full float32: not TF32"


_PTX_PROBE = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from sparsekern.kernels import outer_topk as kernels
MMA = r"\\bw?g?mma(?:\\.mma_async)?\\.sync\\.aligned\\.[\\w.]+"  # mma.sync... (sm_80), wgmma.mma_async... (sm_90)
found = {}
for arch in (80, 90):
    for dtype in ("fp32", "bf16", "fp16"):
        ints = ("B", "n_out", "n_in", "search_steps", "hi", "threshold", "last_tie_row", "capacity")
        signature = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "row_ptr_ptr": "*i64", "col_idx_ptr": "*i32"}
        signature |= {"hist_ptr": "*i64", "out_idx_ptr": "*i64", "out_key_ptr": "*i32", "counter_ptr": "*i64"}
        signature |= dict.fromkeys(ints, "i32")
        constexprs = {"MODE": kernels._COMPACT, **kernels._FAST_BLOCKS, "DOT_F32": False}
        signature |= dict.fromkeys(constexprs, "constexpr")
        kernel = kernels._outer_topk_fast_fwd_kernel
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        found[f"sm{arch}-{dtype}"] = sorted(set(re.findall(MMA, ptx)))
print(json.dumps(found))
"""


@pytest.mark.triton
def test_triton_fast_kernel_compiles_to_tensor_cores():
    """Compiles the fast Triton kernel for sm_80 and sm_90 (Triton's own ptxas, no GPU; a fresh process outside
    the interpreter) and checks its PTX multiplies on tensor cores: mma.sync on sm_80, wgmma on sm_90, with TF32
    operands for float32 and bf16 / fp16 as they are."""
    done = run_python(_PTX_PROBE, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    operand = {"fp32": "tf32", "bf16": "bf16", "fp16": "f16"}
    for dtype, kind in operand.items():
        sm80, sm90 = found[f"sm80-{dtype}"], found[f"sm90-{dtype}"]
        assert any(op.startswith("mma.sync.aligned.") and f".f32.{kind}.{kind}.f32" in op for op in sm80), sm80
        assert any(op.startswith("wgmma.mma_async.sync.aligned.") and f".f32.{kind}.{kind}" in op for op in sm90), sm90
