"""to_semi_structured: real SparseSemiStructuredTensorCUTLASS objects built from semi24_compress."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_DTYPES, assert_bits_equal, assert_within_torch_error, random_semi24, requires_gpu
from torch.sparse import SparseSemiStructuredTensorCUTLASS
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass as torch_compress

import sparsekern

SHAPE = {torch.float16: (64, 128), torch.bfloat16: (32, 64), torch.int8: (32, 256), torch.float32: (64, 96)}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_cutlass_tensor_on_cpu(dtype):
    w = (
        torch.nan_to_num(random_semi24(*SHAPE[dtype], dtype))
        if dtype.is_floating_point
        else random_semi24(*SHAPE[dtype], dtype)
    )
    t = sparsekern.to_semi_structured(w)
    assert isinstance(t, SparseSemiStructuredTensorCUTLASS)
    assert t.shape == w.shape and t.dtype == w.dtype and t.packed_t is None
    packed, meta = torch_compress(w)
    assert_bits_equal(t.packed, packed)
    assert_bits_equal(t.meta, meta)
    if dtype != torch.float32:  # torch's fp32 to_dense is lossy; semi24_decompress is checked instead
        assert torch.equal(t.to_dense(), w)
    assert torch.equal(sparsekern.semi24_decompress(t.packed, t.meta), w)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_prune(dtype):
    w = (torch.randn(*SHAPE[dtype], dtype=torch.float64) * 50).to(dtype)
    t = sparsekern.to_semi_structured(w, prune=True)
    dense = sparsekern.semi24_decompress(t.packed, t.meta)
    group, kept = (2, 1) if dtype == torch.float32 else (4, 2)
    assert bool(((dense != 0).reshape(-1, group).sum(-1) <= kept).all())
    if dtype != torch.float32:
        assert torch.equal(dense, w * sparsekern.semi24_mask(w))
    else:  # 1:2: the larger magnitude of every pair
        pairs, kept_pairs = w.reshape(-1, 2), dense.reshape(-1, 2)
        assert torch.equal(kept_pairs.abs().amax(-1), pairs.abs().amax(-1))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_with_transpose(dtype):
    m, k = SHAPE[dtype]
    w = (torch.randn(k, k if dtype != torch.int8 else 128, dtype=torch.float64) * 50).to(dtype)  # square-ish: both ways
    w = w[: max(m, 128), :] if dtype == torch.int8 else w
    t = sparsekern.to_semi_structured(w.contiguous(), prune=True, with_transpose=True)
    dense = sparsekern.semi24_decompress(t.packed, t.meta)
    dense_t = sparsekern.semi24_decompress(t.packed_t, t.meta_t)
    assert torch.equal(dense_t, dense.t())


def test_with_transpose_rejects_weight_whose_transpose_is_not_sparse():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 64, dtype=torch.float16).repeat(1, 16)  # rows 2:4, columns full
    with pytest.raises(ValueError, match=r"dense is not 2:4 sparse: row 0, columns 0..3"):
        sparsekern.to_semi_structured(w, with_transpose=True)


def test_requires_grad_is_kept():
    w = random_semi24(32, 64, torch.float16).nan_to_num().requires_grad_()
    assert sparsekern.to_semi_structured(w).requires_grad


@pytest.mark.parametrize(
    "w, kwargs, error, match",
    [
        (torch.randn(32, 64).half(), {}, ValueError, r"dense is not 2:4 sparse: row 0"),
        (torch.zeros(32, 64).half(), {"format": "cusparse"}, ValueError, r"format must be one of"),
        (torch.zeros(32, 64).half(), {"format": "cusparselt"}, ValueError, r"format='cusparselt' needs a CUDA tensor"),
        (torch.zeros(32, 48).half(), {}, ValueError, r"w has 48 columns"),
        (torch.zeros(32, 128).half(), {"with_transpose": True}, ValueError, r"w.t\(\) has 32 columns"),
        (torch.zeros(32, 64, dtype=torch.float64), {}, TypeError, r"w must have dtype"),
    ],
    ids=["not-sparse", "format", "cusparselt-cpu", "shape", "transpose-shape", "dtype"],
)
def test_bad_input(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsekern.to_semi_structured(w, **kwargs)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["cutlass", "cusparselt"])
def test_linear_on_gpu_matches_dense(fmt):
    w = torch.randn(128, 256, dtype=torch.float16, device="cuda")
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    t = sparsekern.to_semi_structured(w, prune=True, format=fmt)
    pruned = w * sparsekern.semi24_mask(w)
    assert_within_torch_error(F.linear(x, t), F.linear(x.double(), pruned.double()), F.linear(x, pruned))
