"""outer_topk: precision="exact" equal (indices, order and score bits) to the brute-force reference on every
backend and CPU ISA; precision="fast" the exact top-k of its own scores (an FMA chain on AVX2 / AVX-512, checked
against an exact emulation of it), within the documented bound of float64, and deterministic across calls, thread
counts, ISAs and processes; the exclusion forms, ties, edge cases, every error path, opcheck, torch.compile, and
peak memory at 16384²."""

from __future__ import annotations

import functools
import importlib
import json

import numpy as np
import pytest
import torch
from helpers import backend_params, device_for, isa_params, run_python

import sparsekern
from sparsekern._csr import CSRIndex
from sparsekern.ops import BackendUnavailableError
from sparsekern.ops.outer_topk import exclusion_csr
from sparsekern.reference import outer_topk_fast_scores_reference, outer_topk_reference, outer_topk_scores_reference

KERNELS = backend_params("cpu", "triton", "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (B, n_out, n_in): odd sizes, partial tiles everywhere; the Triton interpreter gets the small ones.
SHAPES = {"small": [(1, 7, 13), (19, 37, 70), (0, 5, 9)], "large": [(67, 200, 301), (300, 97, 130)]}


def _inputs(batch, n_out, n_in, dtype, kind, device="cpu"):
    """x, g: 'randn' (distinct scores), or 'ties' (integers in [-1, 1]: exact products and sums, many equal
    scores, zeros included)."""
    if kind == "ties":
        x = torch.randint(-1, 2, (batch, n_in)).to(dtype)
        g = torch.randint(-1, 2, (batch, n_out)).to(dtype)
    else:
        x = torch.randn(batch, n_in, dtype=torch.float64).to(dtype)
        g = torch.randn(batch, n_out, dtype=torch.float64).to(dtype)
    return x.to(device), g.to(device)


def _expected(x, g, k, exclude):
    """The exact top-k (precision="exact") by the reference."""
    row_ptr, col_idx = exclusion_csr("test", exclude, g.shape[1], x.shape[1], x.device)
    return outer_topk_reference(x.cpu(), g.cpu(), k, row_ptr.cpu(), col_idx.cpu())


def _fma_scores(x, g) -> torch.Tensor:
    """The fast CPU scores on AVX2 / AVX-512, emulated exactly: s = fma(g[b], x[b], s) for b in order from +0, one
    rounding per step. The product is exact in float64; the sum is rounded to odd in float64 (TwoSum gives the
    error; an inexact sum with an even last bit moves one ulp toward it), which then rounds to float32 exactly as
    one rounding of the exact sum would (53 >= 24 + 2 bits)."""
    xs, gs = x.float().double(), g.float().double()
    s = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64)
    for b in range(x.shape[0]):
        p = torch.outer(gs[b], xs[b])  # exact
        c = s
        t = p + c
        bb = t - p
        err = (p - (t - bb)) + (c - bb)
        odd = (t.view(torch.int64) & 1) == 1
        toward = torch.where(err > 0, torch.full_like(t, float("inf")), torch.full_like(t, -float("inf")))
        t = torch.where((err != 0) & ~odd, torch.nextafter(t, toward), t)
        s = t.float().double()
    return s.abs().float()


def _top(scores: torch.Tensor, k: int, exclude) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of a dense (n_out, n_in) score matrix outside exclude, ties by the lower index."""
    flat = scores.reshape(-1)
    candidate = torch.ones_like(flat, dtype=torch.bool) if exclude is None else ~exclude.cpu().reshape(-1)
    idx = candidate.nonzero().squeeze(1)
    order = torch.sort(flat[idx], descending=True, stable=True).indices[:k]
    return idx[order], flat[idx][order]


def _fast_scores_cpu(x, g) -> torch.Tensor:
    """What precision="fast" computes on the C++ backend under the ISA in force: the FMA chain on AVX2 and AVX-512,
    the exact scores on the portable path (it has no FMA)."""
    if sparsekern._extension.cpu_isa() == "baseline":
        return outer_topk_scores_reference(x, g)
    return _fma_scores(x, g)


# Unit roundoff of float32: every float32 sum of B products (any order, fused or not) is within
# gamma_B * sum_b |g[b, o] x[b, i]| of the exact sum, gamma_B = B u / (1 - B u) (Higham, Accuracy and Stability,
# 3.1); the float64 reference adds its own, far smaller, error, covered by doubling u.
_U = 2.0**-24


def _check_fast_bound(x, g, k, exclude, index, score):
    """precision="fast" as documented in ops/outer_topk.py: k distinct candidates, sorted by score (ties by lower
    index), and each one's float64 score at least the float64 k-th largest candidate score minus its own bound and
    the largest bound among the candidates."""
    n_out, n_in = g.shape[1], x.shape[1]
    index, score = index.cpu(), score.cpu()
    assert index.numel() == k == score.numel() and index.unique().numel() == k
    if exclude is not None:
        assert not bool(exclude.cpu().reshape(-1)[index].any()), "an excluded position was returned"
    assert bool(((score[1:] < score[:-1]) | ((score[1:] == score[:-1]) & (index[1:] > index[:-1]))).all())
    if k == 0:
        return
    xd, gd = x.cpu().double(), g.cpu().double()
    exact = (gd.T @ xd).abs().reshape(-1)
    batch = x.shape[0]
    gamma = 2 * batch * _U / (1 - 2 * batch * _U)
    bound = (gamma * (gd.abs().T @ xd.abs())).reshape(-1)
    candidate = torch.ones(n_out * n_in, dtype=torch.bool) if exclude is None else ~exclude.cpu().reshape(-1)
    kth = exact[candidate].sort(descending=True).values[k - 1]
    slack = bound[index] + bound[candidate].max()
    assert bool((exact[index] >= kth - slack).all()), "a returned score is below the float64 k-th largest - bound"
    # the bound is not vacuous: it is far below the spread of the scores
    assert float(slack.max()) < 1e-3 * float(exact[candidate].max()) or float(exact[candidate].max()) == 0


def _assert_exact(actual, expected):
    index, score = actual
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    assert torch.equal(index.cpu(), expected[0]), "indices (or their order) differ"
    assert torch.equal(score.cpu().view(torch.int32), expected[1].view(torch.int32)), "score bits differ"


def _shapes(backend):
    return SHAPES["small"] if backend == "triton" else SHAPES["small"] + SHAPES["large"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9])
def test_matches_reference_exactly(backend, dtype, kind, density):
    device = device_for(backend)
    for batch, n_out, n_in in _shapes(backend):
        x, g = _inputs(batch, n_out, n_in, dtype, kind, device)
        exclude = torch.rand(n_out, n_in, device=device) < density
        candidates = n_out * n_in - int(exclude.sum())
        index, score = _expected(x, g, candidates, exclude)  # every top-k is a prefix of the full order
        for k in sorted({0, min(1, candidates), candidates // 7, candidates}):  # a small mask may exclude all
            actual = sparsekern.outer_topk(x, g, k, exclude=exclude, precision="exact", backend=backend)
            _assert_exact(actual, (index[:k], score[:k]))
            fast = sparsekern.outer_topk(x, g, k, exclude=exclude, precision="fast", backend=backend)
            _check_fast_bound(x, g, k, exclude, *fast)


@pytest.mark.parametrize("backend", KERNELS)
def test_scores_are_the_documented_sum(backend):
    """The scores are |s| summed over b in order, product and sum each rounded in float32: the reference's
    definition, which differs from a fused multiply-add or a float64 sum in the last bits."""
    device = device_for(backend)
    x, g = _inputs(40, 30, 50, torch.float32, "randn", device)
    k = 30 * 50
    index, score = sparsekern.outer_topk(x, g, k, precision="exact", backend=backend)
    dense = outer_topk_scores_reference(x.cpu(), g.cpu()).reshape(-1)
    assert torch.equal(score.cpu(), dense[index.cpu()])
    by_float64 = (g.cpu().double().T @ x.cpu().double()).abs().float().reshape(-1)
    assert not torch.equal(dense, by_float64)  # the test can tell the definitions apart


@pytest.mark.parametrize("backend", KERNELS)
def test_exclusion_forms_agree(backend):
    """A bool mask, a sparse CSR tensor and a CSRIndex exclude the same positions; a CSR pattern with unsorted
    columns is refused (it is not a valid CSR: torch's own invariants say so too)."""
    device = device_for(backend)
    x, g = _inputs(9, 23, 41, torch.float32, "ties", device)
    mask = torch.rand(23, 41, device=device) < 0.4
    expected = _expected(x, g, 200, mask)
    index = CSRIndex.from_mask(mask)
    row_ptr = index.row_ptr
    shuffled = index.col_idx.clone()
    for r in range(23):  # reverse the columns of every row
        shuffled[row_ptr[r] : row_ptr[r + 1]] = shuffled[row_ptr[r] : row_ptr[r + 1]].flip(0)
    for form in [mask, mask.to_sparse_csr(), index]:
        _assert_exact(sparsekern.outer_topk(x, g, 200, exclude=form, backend=backend), expected)
    unsorted = [
        CSRIndex(row_ptr, shuffled, *index[2:]),
        torch.sparse_csr_tensor(
            row_ptr, shuffled.long(), torch.ones(shuffled.numel(), device=device), (23, 41), check_invariants=False
        ),
    ]
    for form in unsorted:
        with pytest.raises(ValueError, match="exclude's col_idx must be ascending and unique within each row"):
            sparsekern.outer_topk(x, g, 200, exclude=form, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_near_full_exclusion_and_all_ties(backend):
    """Every position but 5 excluded; and an empty batch, where every score is 0 and the tie rule alone orders."""
    device = device_for(backend)
    x, g = _inputs(6, 17, 29, torch.float32, "randn", device)
    exclude = torch.ones(17, 29, dtype=torch.bool, device=device)
    free = torch.tensor([3, 100, 101, 250, 17 * 29 - 1])
    exclude.view(-1)[free] = False
    index, score = sparsekern.outer_topk(x, g, 5, exclude=exclude, precision="exact", backend=backend)
    assert sorted(index.tolist()) == free.tolist()
    _assert_exact((index, score), _expected(x, g, 5, exclude))
    index, _ = sparsekern.outer_topk(x, g, 5, exclude=exclude, precision="fast", backend=backend)
    assert sorted(index.tolist()) == free.tolist()
    x0, g0 = x[:0], g[:0]
    for precision in ("exact", "fast"):
        index, score = sparsekern.outer_topk(
            x0, g0, 40, exclude=torch.zeros_like(exclude), precision=precision, backend=backend
        )
        assert index.tolist() == list(range(40)) and bool((score == 0).all())


@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_every_isa(cpu_isa, precision, dtype):
    """Every ISA's tile kernels (their own register blocks: odd shapes leave partial micro tiles in both
    directions, batches longer than one batch block): "exact" equals the reference bit for bit; "fast" is the exact
    top-k of the FMA chain (emulated exactly; the portable path computes the exact scores) and within the bound."""
    for batch, n_out, n_in in [(1, 7, 13), (67, 200, 301), (300, 97, 130), (5, 193, 260)]:
        x, g = _inputs(batch, n_out, n_in, dtype, "randn")
        exclude = torch.rand(n_out, n_in) < 0.3
        candidates = n_out * n_in - int(exclude.sum())
        scores = outer_topk_scores_reference(x, g) if precision == "exact" else _fast_scores_cpu(x, g)
        index, score = _top(scores, candidates, exclude)
        for k in sorted({1, candidates // 9, candidates}):
            actual = sparsekern.outer_topk(x, g, k, exclude=exclude, precision=precision, backend="cpu")
            _assert_exact(actual, (index[:k], score[:k]))
            if precision == "fast":
                _check_fast_bound(x, g, k, exclude, *actual)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
def test_cpu_fast_differs_from_exact_and_agrees_across_isas_and_threads():
    """The FMA chain is a different arithmetic from the exact one (the test can tell them apart), the same bits on
    AVX2 and AVX-512 and for every thread count (each score is one chain in batch order, whatever the tiling)."""
    x, g = _inputs(300, 150, 170, torch.float32, "randn")
    k = 150 * 170
    isas = [isa for isa in sparsekern._extension.available_isas() if isa != "baseline"]
    if not isas:
        pytest.skip("no FMA ISA on this CPU: fast computes the exact scores (checked by test_cpu_every_isa)")
    results = []
    threads = torch.get_num_threads()
    try:
        for isa in isas:
            for n in (1, 3):
                torch.set_num_threads(n)
                with sparsekern._extension.use_cpu_isa(isa):
                    results.append(sparsekern.outer_topk(x, g, k, precision="fast", backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for index, score in results[1:]:
        _assert_exact((index, score), results[0])
    exact = outer_topk_scores_reference(x, g).reshape(-1)
    assert not torch.equal(results[0][1], exact[results[0][0]])


_DETERMINISM_PROBE = """
import hashlib, torch, sparsekern
gen = torch.Generator().manual_seed(5)
x, g = torch.randn(129, 250, generator=gen), torch.randn(129, 333, generator=gen)
exclude = torch.rand(333, 250, generator=gen) < 0.5
index, score = sparsekern.outer_topk(x, g, 4000, exclude=exclude, precision="fast", backend="cpu")
print(hashlib.sha256(index.numpy().tobytes() + score.numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
def test_cpu_fast_same_bits_in_two_processes():
    """DDP relies on it: every rank computes the same mask from the same gathered inputs. Two fresh processes
    (different thread counts, so also different tile schedules and allocations) give the same bits."""
    one = run_python(_DETERMINISM_PROBE, OMP_NUM_THREADS="1")
    two = run_python(_DETERMINISM_PROBE, OMP_NUM_THREADS="2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert one.stdout.split()[-1] == two.stdout.split()[-1]


def test_reference_fast_is_the_float64_top_k():
    x, g = _inputs(40, 30, 50, torch.float32, "randn")
    exclude = torch.rand(30, 50) < 0.3
    index, score = sparsekern.outer_topk(x, g, 300, exclude=exclude, backend="reference")  # fast by default
    _assert_exact((index, score), _top(outer_topk_fast_scores_reference(x, g), 300, exclude))
    _check_fast_bound(x, g, 300, exclude, index, score)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_threshold_paths(dtype):
    """The C++ kernel's three selection regimes, all exact: a threshold estimated from sampled rows (n_out >= 128,
    k small against the candidates); the exact rerun when the sample misjudges (the sampled rows scaled up 1000x,
    so its estimate lets too few through); and no sample (n_out < 128), where the collectors fill up and keep
    only their k largest, again and again."""
    batch, n_out, n_in = 24, 256, 700
    x, g = _inputs(batch, n_out, n_in, dtype, "randn")
    exclude = torch.rand(n_out, n_in) < 0.2
    index, score = _expected(x, g, 3000, exclude)
    f = functools.partial(sparsekern.outer_topk, precision="exact", backend="cpu")
    for k in (1, 3000):
        _assert_exact(f(x, g, k, exclude=exclude), (index[:k], score[:k]))
    sampled = [(2 * j + 1) * n_out // 16 for j in range(8)]  # the rows the kernel samples at this shape
    g = g.clone()
    g[:, sampled] *= 1000
    _assert_exact(f(x, g, 3000, exclude=exclude), _expected(x, g, 3000, exclude))
    fast = sparsekern.outer_topk(x, g, 3000, exclude=exclude, backend="cpu")
    _assert_exact(fast, _top(_fast_scores_cpu(x, g), 3000, exclude))
    x, g = _inputs(batch, 100, 2000, dtype, "randn")  # about 160000 candidates; capacity 2 k + 4096 = 14096
    exclude = torch.rand(100, 2000) < 0.2
    _assert_exact(f(x, g, 5000, exclude=exclude), _expected(x, g, 5000, exclude))


@pytest.mark.parametrize("backend", KERNELS)
def test_overflow_to_nan_raises(backend):
    device = device_for(backend)
    x = torch.full((2, 3), 1e30, device=device)
    g = torch.tensor([[1e30], [-1e30]], device=device)  # inf + (-inf)
    with pytest.raises(ValueError, match="overflowed float32 to NaN"):
        sparsekern.outer_topk(x, g, 1, precision="exact", backend=backend)
    with pytest.raises(ValueError, match="overflowed float32 to NaN"):
        sparsekern.outer_topk(x.cpu(), g.cpu(), 1, precision="exact", backend="reference")


@pytest.mark.parametrize("backend", KERNELS)
def test_integer_like_k(backend):
    """k may be any integer (operator.index): numpy's, a 0-d integer tensor; the result is the one of an int."""
    device = device_for(backend)
    x, g = _inputs(5, 6, 7, torch.float32, "randn", device)
    expected = sparsekern.outer_topk(x, g, 3, backend=backend)
    for k in (np.int64(3), np.int32(3), torch.tensor(3)):
        index, score = sparsekern.outer_topk(x, g, k, backend=backend)
        assert index.shape == (3,)
        assert torch.equal(index, expected[0]) and torch.equal(score, expected[1])


def test_auto_float64_and_reference():
    x, g = _inputs(5, 6, 7, torch.float64, "randn")
    index, score = sparsekern.outer_topk(x, g, 10)  # float64: the reference, summed in float64
    expected = (g.T @ x).abs().float().reshape(-1)
    assert torch.equal(score, expected[index]) and torch.equal(score, expected.sort(descending=True).values[:10])
    # without the extension the unavailable backend is reported first (CI runs the suite that way too)
    why = "float64" if sparsekern._extension.available() else "is not available"
    with pytest.raises(BackendUnavailableError, match=why):
        sparsekern.outer_topk(x, g, 10, backend="cpu")


def test_errors():
    x, g = torch.randn(4, 6), torch.randn(4, 5)
    f = sparsekern.outer_topk
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f([[1.0]], g, 1)
    with pytest.raises(TypeError, match="g must have dtype"):
        f(x, g.int(), 1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        f(x[0], g, 1)
    with pytest.raises(ValueError, match="g must have x's dtype"):
        f(x, g.half(), 1)
    with pytest.raises(ValueError, match="same batch size B, got 4 and 3"):
        f(x, g[:3], 1)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        f(x, g, 1.0)
    with pytest.raises(TypeError, match="k must be an int, got float64"):
        f(x, g, np.float64(1.0))
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        f(x, g, True)
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        f(x, g, -1)
    with pytest.raises(ValueError, match=r"k must be at most the number of candidates .* = 30, got 31"):
        f(x, g, 31)
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0] = True
    with pytest.raises(ValueError, match=r"5 \* 6 - 6 = 24, got 25"):
        f(x, g, 25, exclude=mask)
    with pytest.raises(ValueError, match=r"exclude must have shape \(n_out, n_in\) = \(5, 6\).*got \(6, 5\)"):
        f(x, g, 1, exclude=mask.T)
    with pytest.raises(TypeError, match="exclude must be a bool mask"):
        f(x, g, 1, exclude=mask.float())
    with pytest.raises(TypeError, match="exclude must be None, a bool tensor"):
        f(x, g, 1, exclude=[[True]])
    with pytest.raises(ValueError, match=r"got a CSRIndex of \(6, 5\)"):
        f(x, g, 1, exclude=CSRIndex.from_mask(mask.T))
    with pytest.raises(ValueError, match="x must be finite"):
        f(x.clone().fill_(float("nan")), g, 1)
    with pytest.raises(ValueError, match="g must be finite"):
        f(x, g.clone().fill_(float("inf")), 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, g, 1, backend="gpu")
    with pytest.raises(ValueError, match="precision must be one of 'fast', 'exact', got 'tf32'"):
        f(x, g, 1, precision="tf32")
    with pytest.raises(ValueError, match=r"n_out \* n_in must be at most 2\*\*33"):
        f(torch.randn(1, 2**17), torch.randn(1, 2**17), 1)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
def test_cpu_kernel_checks_its_arguments():
    """The C++ op checks what the dispatcher hands it (other callers skip the Python checks)."""
    x, g = torch.randn(4, 6), torch.randn(4, 5)
    row_ptr, col_idx = exclusion_csr("t", None, 5, 6, x.device)
    op = torch.ops.sparsekern.outer_topk
    with pytest.raises(ValueError, match="k must be in \\[0, candidates = 30\\], got 31"):
        op(x, g, 31, row_ptr, col_idx)
    with pytest.raises(ValueError, match="same batch size"):
        op(x, g[:2], 1, row_ptr, col_idx)
    with pytest.raises(ValueError, match="row_ptr must have 6 entries"):
        op(x, g, 1, row_ptr[:-1], col_idx)
    with pytest.raises(ValueError, match="g must have x's dtype"):
        op(x, g.half(), 1, row_ptr, col_idx)
    for dtype in DTYPES:  # each dtype's exponent bits
        for bad in (float("inf"), -float("inf"), float("nan")):
            x_bad, g_bad = x.to(dtype).clone(), g.to(dtype).clone()
            x_bad[3, 5] = bad
            with pytest.raises(ValueError, match="x must be finite, got inf or NaN"):
                op(x_bad, g.to(dtype), 1, row_ptr, col_idx, True)
            g_bad[2, 4] = bad
            with pytest.raises(ValueError, match="g must be finite, got inf or NaN"):
                op(x.to(dtype), g_bad, 1, row_ptr, col_idx)
    assert op(x.half(), (g * 1e4).half(), 1, row_ptr, col_idx)[0].numel() == 1  # large but finite passes


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
def test_opcheck_and_compile():
    x, g = _inputs(9, 11, 13, torch.float32, "randn")
    row_ptr, col_idx = exclusion_csr("t", torch.rand(11, 13) < 0.3, 11, 13, x.device)
    for fast in (False, True):
        torch.library.opcheck(torch.ops.sparsekern.outer_topk.default, (x, g, 20, row_ptr, col_idx, fast))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def grow(x, g, fast: bool):
        return torch.ops.sparsekern.outer_topk(x, g, 20, row_ptr, col_idx, fast)

    _assert_exact(grow(x, g, False), outer_topk_reference(x, g, 20, row_ptr, col_idx))
    _assert_exact(grow(x, g, True), torch.ops.sparsekern.outer_topk(x, g, 20, row_ptr, col_idx, True))


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_opcheck_triton_op(backend):
    """Schema, autograd registration and fake tensors; the full opcheck of a triton_op needs a GPU (DESIGN §3)."""
    module = importlib.import_module("sparsekern.ops.outer_topk")  # sparsekern.ops.outer_topk is the function
    x, g = _inputs(3, 5, 7, torch.float32, "randn", device_for(backend))
    row_ptr, col_idx = exclusion_csr("t", None, 5, 7, x.device)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for fast in (False, True):
        torch.library.opcheck(module._triton_op(), (x, g, 4, row_ptr, col_idx, fast), test_utils=checks)


_MEMORY_PROBE = """
import json, torch, sparsekern
from sparsekern.bench.harness import _PeakMemory
n, batch, k = 16384, 16, 200_000
torch.manual_seed(0)
x, g = torch.randn(batch, n), torch.randn(batch, n)
index, score = sparsekern.outer_topk(x, g, 10, backend="cpu")  # warm up: threads, allocator
with _PeakMemory(torch.device("cpu")) as peak:
    index, score = sparsekern.outer_topk(x, g, k, backend="cpu")
print(json.dumps({"peak": peak.bytes, "k": int(index.numel()), "sorted": bool((score[1:] <= score[:-1]).all())}))
"""


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the C++ extension")
def test_memory_16384_squared_never_dense():
    """16384 x 16384 scores would take 1 GiB in float32. The C++ kernel's peak RSS rise (measured in a fresh
    process, high-water mark reset before the call) stays a small fraction of that: O(k + tiles)."""
    done = run_python(_MEMORY_PROBE)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["k"] == 200_000 and result["sorted"]
    assert result["peak"] is not None, "peak RSS is not measurable here"
    assert result["peak"] < 64 * 2**20, f"peak RSS rose by {result['peak'] / 2**20:.1f} MiB"


_COMPILE_PROBE = """
import json, triton
from triton.backends.compiler import GPUTarget
from sparsekern.kernels import outer_topk as kernels
found = {}
for dtype in ("fp32", "bf16"):
    ints = ("B", "n_out", "n_in", "search_steps", "hi", "threshold", "last_tie_row", "capacity")
    signature = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "row_ptr_ptr": "*i64", "col_idx_ptr": "*i32"}
    signature |= {"hist_ptr": "*i64", "out_idx_ptr": "*i64", "out_key_ptr": "*i32", "counter_ptr": "*i64"}
    signature |= dict.fromkeys(ints, "i32") | dict.fromkeys(("MODE", "BLOCK_O", "BLOCK_I", "BLOCK_N"), "constexpr")
    constexprs = {"MODE": kernels._COMPACT, "BLOCK_O": 32, "BLOCK_I": 64, "BLOCK_N": 2048}
    source = triton.compiler.ASTSource(fn=kernels._outer_topk_fwd_kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    found[dtype] = [op in ptx for op in ("mul.rn.f32", "add.rn.f32", "fma.rn.f32")]
print(json.dumps(found))
"""


@pytest.mark.triton
def test_triton_kernel_compiles_without_fused_multiply_add():
    """Compiles the Triton kernel for sm_90 (no GPU needed: Triton's own ptxas; in a fresh process, outside the
    interpreter) and checks the PTX multiplies and adds separately: a fused multiply-add would change the score
    bits, and so the result, on the GPU."""
    pytest.importorskip("triton")
    done = run_python(_COMPILE_PROBE, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"fp32": [True, True, False], "bf16": [True, True, False]}
