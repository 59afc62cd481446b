"""pytest-benchmark: sparse_linear forward and forward+backward at 90% sparsity against dense F.linear; on a constant
fan-in weight the ELL kernels against the CSR kernels and dense, and online inference (B 1-16) against dense.

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


# Constant fan-in (every row keeps the same count of nonzeros): the ELL kernels against the CSR kernels on the same
# weight and against dense (issue 15: >= 1.3x CSR), and online inference (B 1, 4, 16; forward) against dense.
ONLINE_BATCHES = (1, 16) if QUICK else (1, 4, 16)


@functools.cache
def ell_backend() -> tuple[str, str]:
    """("cpu", why) when the C++ ELL kernels run sparse_linear forward and backward here, else ("reference", why)."""
    p = linear.Problem((16, 24), 4, 0.5, "cpu", fan_in=True)
    try:
        fn, _ = linear.build_sparsekern(p, p.x, p.values, p.grad, "fwdbwd", "cpu", "sparse", "ell")
        fn()
    except Exception as exc:  # noqa: BLE001 -- falling back is the point
        return "reference", f"cpu ELL kernels unavailable ({harness.failure(exc, 200)[8:]})"
    return "cpu", "cpu kernels"


@functools.cache
def fan_in_problem(batch: int) -> linear.Problem:
    return linear.Problem(SHAPE, batch, SPARSITY, "cpu", fan_in=True)


def _check(p: linear.Problem, mode: str, out, extract, benchmark) -> None:
    ref = p.reference(mode)
    errors = linear.max_errors(extract(out), ref)
    dense_fn, dense_extract = linear.build_dense(p, p.x, p.index.to_dense(p.values), p.grad, mode)
    dense_errors = linear.max_errors(dense_extract(dense_fn()), ref)
    benchmark.extra_info["max_abs_error"] = errors
    assert linear.within_dense(errors, dense_errors, ref, torch.float32), (errors, dense_errors)


def _build(p: linear.Problem, impl: str, mode: str, benchmark):
    if impl == "dense":
        benchmark.extra_info["backend"] = "torch F.linear"
        return linear.build_dense(p, p.x, p.index.to_dense(p.values), p.grad, mode)
    backend, why = ell_backend() if impl == "ell" else sparsekern_backend()
    benchmark.extra_info.update(backend=backend, backend_reason=why, kernels=impl)
    return linear.build_sparsekern(p, p.x, p.values, p.grad, mode, backend, "sparse", impl)


@pytest.mark.parametrize("mode", linear.MODES)
@pytest.mark.parametrize("impl", ["ell", "csr", "dense"])
def test_sparse_linear_fan_in(benchmark, impl, mode):
    p = fan_in_problem(BATCH)
    benchmark.group = f"sparse_linear fan-in {mode} {GROUP}"
    fn, extract = _build(p, impl, mode, benchmark)
    out = benchmark(fn)  # its last call's output: a training step's values change after every call
    _check(p, mode, out, extract, benchmark)


@pytest.mark.parametrize("batch", ONLINE_BATCHES)
@pytest.mark.parametrize("impl", ["ell", "dense"])
def test_sparse_linear_online(benchmark, impl, batch):
    p = fan_in_problem(batch)
    benchmark.group = f"sparse_linear online fwd {linear.label(SHAPE)} B={batch} {SPARSITY:.0%} fp32 fan-in"
    fn, extract = _build(p, impl, "fwd", benchmark)
    _check(p, "fwd", benchmark(fn), extract, benchmark)
