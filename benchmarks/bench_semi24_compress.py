"""pytest-benchmark: 2:4 compress / decompress of a 4096x4096 fp16 weight, per backend and torch's reference.

    pytest benchmarks --benchmark-enable                       # the timings (pyproject's addopts disables them)
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks                 # CI smoke: a 256x512 weight, each body run once

Every benchmark also checks its result bit for bit, so the smoke run is a correctness check too.
For tables with median and IQR over many shapes and dtypes use ``sparsekern bench semi24`` or ``sweep.py``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import sparsekern
from sparsekern import _extension
from sparsekern.bench.semi24 import bits_equal, pruned_weight

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
SHAPE = (256, 512) if QUICK else (4096, 4096)
GROUP = f"{SHAPE[0]}x{SHAPE[1]} fp16"

needs_extension = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")
# The C++ backend once per instruction set this CPU runs ("cpu:avx2", ...), so every path is timed and checked.
IMPLS = [
    pytest.param("torch-reference-conversion", id="torch"),
    *(pytest.param(f"cpu:{isa}", id=f"cpu-{isa}") for isa in _extension.available_isas()),
    pytest.param("cpu", id="cpu", marks=needs_extension),
    pytest.param("reference", id="reference"),
]


def _ours(op, impl: str):
    """sparsekern's op for ``impl`` ("cpu:<isa>" forces that ISA around each call)."""
    backend, _, isa = impl.partition(":")
    if not isa:
        return functools.partial(op, backend=backend)

    def call(*args):
        with _extension.use_cpu_isa(isa):
            return op(*args, backend=backend)

    return call


@pytest.fixture(scope="module")
def dense() -> torch.Tensor:
    return pruned_weight(SHAPE, torch.float16)


@pytest.fixture(scope="module")
def compressed(dense) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_semi_structured_from_dense_cutlass(dense)


@pytest.mark.parametrize("impl", IMPLS)
def test_semi24_compress(benchmark, impl, dense, compressed):
    benchmark.group = f"semi24_compress {GROUP}"
    if impl == "torch-reference-conversion":
        fn = sparse_semi_structured_from_dense_cutlass
    else:
        fn = _ours(sparsekern.semi24_compress, impl)
    packed, meta = benchmark(fn, dense)
    assert bits_equal(packed, compressed[0]) and bits_equal(meta, compressed[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_semi24_decompress(benchmark, impl, dense, compressed):
    benchmark.group = f"semi24_decompress {GROUP}"
    if impl == "torch-reference-conversion":
        fn = sparse_semi_structured_to_dense_cutlass
    else:
        fn = _ours(sparsekern.semi24_decompress, impl)
    restored = benchmark(fn, *compressed)
    assert bits_equal(restored, dense)
