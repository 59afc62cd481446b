"""pytest-benchmark: sparse_linear forward and forward+backward at 90% sparsity against dense F.linear.

    pytest benchmarks --benchmark-enable                       # 768->3072, B=2048, fp32 (pyproject disables timing)
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks                 # CI smoke: 64->96, B=70, each body run once

The sparsekern rows run the C++ kernels (backend "cpu") when a call to them works here, else the plain-PyTorch
reference; ``benchmark.extra_info["backend"]`` records which. Every benchmark also checks its result against a
float64 computation (at most twice dense F.linear's error), so the smoke run is a correctness check too.
For tables over sparsity, batch, shape and dtype, with torch CSR and SparseProp, use ``sparsekern bench linear``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from sparsekern.bench import harness, linear

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
SHAPE, BATCH = ((64, 96), 70) if QUICK else ((768, 3072), 2048)
SPARSITY = 0.9
GROUP = f"{linear.label(SHAPE)} B={BATCH} {SPARSITY:.0%} fp32"


@functools.cache
def sparsekern_backend() -> tuple[str, str]:
    """("cpu", why) when the C++ kernels run sparse_linear forward and backward here, else ("reference", why)."""
    p = linear.Problem((16, 24), 4, 0.5, "cpu")
    try:
        fn, _ = linear.build_sparsekern(p, p.x, p.values, p.grad, "fwdbwd", "cpu", "sparse")
        fn()
    except Exception as exc:  # noqa: BLE001 -- falling back is the point
        return "reference", f"cpu kernels unavailable ({harness.failure(exc, 200)[8:]})"
    return "cpu", "cpu kernels"


@pytest.fixture(scope="module")
def problem() -> linear.Problem:
    return linear.Problem(SHAPE, BATCH, SPARSITY, "cpu")


@pytest.mark.parametrize("mode", linear.MODES)
@pytest.mark.parametrize("impl", ["sparse", "auto", "dense"])
def test_sparse_linear(benchmark, problem, impl, mode):
    p = problem
    benchmark.group = f"sparse_linear {mode} {GROUP}"
    dense_fn, dense_extract = linear.build_dense(p, p.x, p.index.to_dense(p.values), p.grad, mode)
    if impl == "dense":
        fn, extract = dense_fn, dense_extract
        benchmark.extra_info["backend"] = "torch F.linear"
    else:
        backend, why = sparsekern_backend()
        benchmark.extra_info.update(backend=backend, backend_reason=why, path=impl)
        fn, extract = linear.build_sparsekern(p, p.x, p.values, p.grad, mode, backend, impl)
    out = benchmark(fn)

    ref = p.reference(mode)
    errors = linear.max_errors(extract(out), ref)
    dense_errors = linear.max_errors(dense_extract(dense_fn()), ref)
    benchmark.extra_info["max_abs_error"] = errors
    assert linear.within_dense(errors, dense_errors, ref, torch.float32), (errors, dense_errors)
