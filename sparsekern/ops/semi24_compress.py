"""``sparsekern::semi24_compress``: a dense 2:4 (fp32: 1:2) matrix -> CUTLASS (packed, meta)."""

from __future__ import annotations

import functools

import torch

from .. import _semi24
from .._validate import check_tensor
from ..reference import semi24_compress_reference
from . import _backend


@torch.library.register_fake("sparsekern::semi24_compress")
def _fake(dense):
    fmt = _semi24.FORMATS[dense.dtype]
    m, k = dense.shape
    return dense.new_empty(m, k // 2), dense.new_empty(m, k // fmt.elems_per_meta, dtype=fmt.meta_dtype)


@functools.cache
def _triton_op():
    # Defined on first use, so TRITON_INTERPRET (read when Triton kernels are defined) can be set late.
    from ..kernels.semi24_compress import _semi24_compress_fwd

    @torch.library.triton_op("sparsekern::semi24_compress_triton", mutates_args=())
    def semi24_compress_triton(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed, meta, first_bad = _semi24_compress_fwd(dense)
        if first_bad >= 0:
            raise ValueError(_semi24.not_sparse_message("semi24_compress", dense.shape, dense.dtype, first_bad))
        return packed, meta

    # The body runs kernels and reads their error flag, so fake tensors take the shape function instead.
    semi24_compress_triton.register_fake(_fake)
    return semi24_compress_triton


def semi24_compress(dense: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 sparse matrix into the layout of ``torch.sparse.SparseSemiStructuredTensorCUTLASS``.

    The result is bit-identical to torch's own conversion
    (``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``).

    Args:
        dense: (m, k) contiguous float16, bfloat16 or int8 tensor with at most 2 nonzeros in every group of
            4 consecutive columns, or float32 with at most 1 nonzero in every pair (torch's 1:2 format).
            Shapes follow torch's CUTLASS constraints: fp16/bf16 m % 32 == 0 and k % 64 == 0, int8 16 / 128,
            fp32 32 / 32. Groups with fewer nonzeros are padded with zero positions exactly as torch does.
        backend: "auto" (C++ on CPU tensors, Triton on CUDA tensors), "cpu", "triton", "cuda" or "reference".

    Returns:
        packed: (m, k/2) tensor of ``dense.dtype``: the kept values of each group in ascending column order.
        meta: (m, k/16) int16 (fp16/bf16), (m, k/32) int32 (int8) or (m, k/8) int16 (fp32): the reordered
        4-bit group codes.

    Raises:
        TypeError: ``dense`` is not a tensor of a supported dtype.
        ValueError: ``dense`` is not 2-D, not contiguous, breaks the shape constraints, or a group holds too
            many nonzeros (the message names its row and columns; prune first with ``semi24_mask``).
        BackendUnavailableError: the requested backend cannot run here (the message says why).

    Example::

        >>> w = torch.randn(64, 128, dtype=torch.float16)
        >>> w = w * sparsekern.semi24_mask(w)
        >>> packed, meta = sparsekern.semi24_compress(w)
        >>> torch.equal(sparsekern.semi24_decompress(packed, meta), w)
        True
    """
    fn = "semi24_compress"
    check_tensor(fn, "dense", dense, dtypes=_semi24.DTYPES, ndim=2, contiguous=True)
    error = _semi24.shape_error(fn, "dense", tuple(dense.shape), dense.dtype)
    if error:
        raise ValueError(error)
    chosen = _backend.resolve(fn, dense.device, backend)
    if chosen == "reference":
        return semi24_compress_reference(dense)
    if chosen == "triton":
        return _triton_op()(dense)
    return torch.ops.sparsekern.semi24_compress(dense)
