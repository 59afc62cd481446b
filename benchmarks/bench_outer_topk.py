"""pytest-benchmark: outer_topk (RigL grow) against dense g.T @ x, mask and torch.topk, fp32.

    pytest benchmarks/bench_outer_topk.py --benchmark-enable     # 4096x4096, B=2048, 90% sparse, α=0.3
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks                   # CI smoke: 384x256, B=33, each body run once

The sparsekern row runs the C++ kernel (backend "cpu") when the extension is built, else the plain-PyTorch
reference; ``benchmark.extra_info["backend"]`` records which. In quick mode the result is also compared exactly
with the reference; in full mode it must agree with the dense path on at least 99.9% of the positions (the dense
GEMM sums in another order, so cut-off ties may differ). Tables with peak memory: ``sparsekern bench grow``.
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
CASE = grow.Case(384, 256, 33, 0.9, 0.3) if QUICK else grow.GOAL_CASE
BACKEND = "cpu" if sparsekern._extension.available() else "reference"
GROUP = f"outer_topk {CASE.label} B={CASE.batch} {CASE.sparsity:.0%} α={CASE.alpha} fp32"


@pytest.fixture(scope="module")
def inputs():
    return grow.make_inputs(CASE, torch.float32, "cpu")


@pytest.mark.parametrize("impl", ["sparsekern", "dense"])
def test_grow(benchmark, inputs, impl):
    x, g, mask, active = inputs
    benchmark.group = GROUP
    if impl == "dense":
        benchmark.extra_info["backend"] = "torch mm + topk"
        index, _ = benchmark(grow.dense_grow, x, g, mask, CASE.k)
    else:
        benchmark.extra_info["backend"] = BACKEND
        index, _ = benchmark(sparsekern.outer_topk, x, g, CASE.k, exclude=active, backend=BACKEND)
    assert index.numel() == CASE.k and not bool(mask.view(-1)[index].any())
    if QUICK:
        row_ptr, col_idx = exclusion_csr("bench", mask, CASE.n_out, CASE.n_in, mask.device)
        expected, _ = outer_topk_reference(x, g, CASE.k, row_ptr, col_idx)
        if impl == "sparsekern":
            assert torch.equal(index, expected)
        else:
            assert grow._agreement(index, expected) >= 0.99
    else:
        other = grow.dense_grow(x, g, mask, CASE.k)[0] if impl == "sparsekern" else None
        if other is not None:
            assert grow._agreement(index, other) >= 0.999
