"""pytest-benchmark: outer_topk (RigL grow), precision "fast" and "exact", against the GEMM g.T @ x alone (the
floor) and the dense path (g.T @ x, mask, torch.topk), fp32.

    pytest benchmarks/bench_outer_topk.py --benchmark-enable     # 4096x4096, B=2048, 90% sparse, α=0.3
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks                   # CI smoke: 384x256, B=33, each body run once

The sparsekern rows run the C++ kernel (backend "cpu") when the extension is built, else the plain-PyTorch
reference; ``benchmark.extra_info`` records the backend and the CPU ISA. In quick mode "exact" is compared exactly
with the reference and "fast" with the float64-scored reference (at least 99% of the positions: it rounds
differently at the cut-off); in full mode both must agree with the dense path on at least 99.9% of the positions.
Interleaved ratios against the GEMM, other batch sizes, a forced ISA and peak memory: ``sparsekern bench grow``.
"""

from __future__ import annotations

import os

import pytest
import torch

import sparsekern
from sparsekern.bench import grow
from sparsekern.ops.outer_topk import exclusion_csr
from sparsekern.reference import outer_topk_reference

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
CASE = grow.Case(384, 256, 33, 0.9, 0.3) if QUICK else grow.GOAL_CASES[-1]
BACKEND = "cpu" if sparsekern._extension.available() else "reference"
GROUP = f"outer_topk {CASE.label} B={CASE.batch} {CASE.sparsity:.0%} α={CASE.alpha} fp32"


@pytest.fixture(scope="module")
def inputs():
    return grow.make_inputs(CASE, torch.float32, "cpu")


@pytest.mark.parametrize("impl", ["fast", "exact", "gemm", "dense"])
def test_grow(benchmark, inputs, impl):
    x, g, mask, active = inputs
    benchmark.group = GROUP
    if impl == "gemm":
        benchmark.extra_info["backend"] = "torch mm"
        benchmark(torch.mm, g.T, x)
        return
    if impl == "dense":
        benchmark.extra_info["backend"] = "torch mm + topk"
        index, _ = benchmark(grow.dense_grow, x, g, mask, CASE.k)
    else:
        benchmark.extra_info["backend"] = BACKEND
        benchmark.extra_info["isa"] = sparsekern._extension.cpu_isa()
        index, _ = benchmark(sparsekern.outer_topk, x, g, CASE.k, exclude=active, precision=impl, backend=BACKEND)
    assert index.numel() == CASE.k and not bool(mask.view(-1)[index].any())
    if QUICK:
        row_ptr, col_idx = exclusion_csr("bench", mask, CASE.n_out, CASE.n_in, mask.device)
        expected, _ = outer_topk_reference(x, g, CASE.k, row_ptr, col_idx, fast=impl != "exact")
        if impl == "exact":
            assert torch.equal(index, expected)
        else:
            assert grow._agreement(index, expected) >= 0.99
    elif impl != "dense":
        assert grow._agreement(index, grow.dense_grow(x, g, mask, CASE.k)[0]) >= 0.999
