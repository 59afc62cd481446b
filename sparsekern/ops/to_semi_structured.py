"""Wrap a weight into a real ``torch.sparse.SparseSemiStructuredTensor`` (CUTLASS or cuSPARSELt)."""

from __future__ import annotations

import warnings

import torch

from .. import _semi24
from .._validate import check_tensor
from .semi24_compress import semi24_compress
from .semi24_mask import group_topk_mask, semi24_mask, transposable_mask

_FORMATS = ("cutlass", "cusparselt")


def prune_semi24(w: torch.Tensor, with_transpose: bool) -> torch.Tensor:
    """``w`` with all but the largest magnitudes of every group zeroed, as ``to_semi_structured(prune=True)`` does."""
    fmt = _semi24.FORMATS[w.dtype]
    if fmt.group == 4:
        mask = semi24_mask(w, transposable=with_transpose)
    elif with_transpose:  # fp32 1:2: one per row and column of every 2x2 tile
        mask = transposable_mask(w, keep=1, tile=2)
    else:
        mask = group_topk_mask(w, keep=1, group=2)
    return w * mask


def to_semi_structured(
    w: torch.Tensor,
    *,
    prune: bool = False,
    with_transpose: bool = False,
    format: str = "cutlass",
    backend: str = "auto",
) -> torch.sparse.SparseSemiStructuredTensor:
    """Turn a 2-D weight into a ``torch.sparse.SparseSemiStructuredTensor`` usable by ``F.linear`` on CUDA.

    With ``format="cutlass"`` (the default) the result is a real ``SparseSemiStructuredTensorCUTLASS`` built
    from :func:`semi24_compress`, on the CPU as on CUDA (torch's own ``to_sparse_semi_structured`` refuses
    CPU tensors; on the CPU the result supports ``to_dense()`` and serialisation, not matmul). With
    ``format="cusparselt"`` (CUDA only) the opaque cuSPARSELt layout comes from ``torch._cslt_compress``.

    Args:
        w: (m, k) float16, bfloat16, int8 or float32 weight (fp32 is stored 1:2), shaped as
            :func:`semi24_compress` requires.
        prune: first zero all but the largest magnitudes of every group (:func:`semi24_mask`); without it a
            weight that is not already 2:4 raises ``ValueError``.
        with_transpose: also store the compressed transpose (``packed_t``/``meta_t``), which 2:4 training
            needs for the backward pass. ``w.t()`` must be 2:4 too; with ``prune=True`` the mask is made
            transposable (every 4x4 tile 2:4 along rows and columns).
        format: "cutlass" or "cusparselt".
        backend: the compression backend, as for :func:`semi24_compress`.

    Example::

        >>> w = torch.randn(64, 128, dtype=torch.float16)
        >>> t = sparsekern.to_semi_structured(w, prune=True)
        >>> torch.equal(t.to_dense(), w * sparsekern.semi24_mask(w))
        True
    """
    fn = "to_semi_structured"
    check_tensor(fn, "w", w, dtypes=_semi24.DTYPES, ndim=2)
    if format not in _FORMATS:
        raise ValueError(f"{fn}: format must be one of {_FORMATS}, got {format!r}")
    if format == "cusparselt" and w.device.type != "cuda":
        raise ValueError(f"{fn}: format='cusparselt' needs a CUDA tensor (torch._cslt_compress), got one on {w.device}")
    error = _semi24.shape_error(fn, "w", tuple(w.shape), w.dtype)
    if error:
        raise ValueError(error)
    dense = w.detach()
    if prune:
        dense = prune_semi24(dense, with_transpose)
    dense = dense.contiguous()
    dense_t = dense.t().contiguous() if with_transpose else None
    if with_transpose:
        error = _semi24.shape_error(fn, "w.t()", tuple(dense_t.shape), w.dtype)
        if error:
            raise ValueError(error)
    # Compress (which validates) before building anything, so a bad weight leaves nothing half-made.
    packed, meta = semi24_compress(dense, backend=backend)
    packed_t, meta_t = semi24_compress(dense_t, backend=backend) if with_transpose else (None, None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")
        if format == "cusparselt":
            return torch.sparse.SparseSemiStructuredTensorCUSPARSELT(
                w.shape,
                packed=torch._cslt_compress(dense),
                meta=None,
                packed_t=torch._cslt_compress(dense_t) if with_transpose else None,
                meta_t=None,
                compressed_swizzled_bitmask=None,
                requires_grad=w.requires_grad,
            )
        return torch.sparse.SparseSemiStructuredTensorCUTLASS(
            w.shape,
            packed=packed,
            meta=meta,
            packed_t=packed_t,
            meta_t=meta_t,
            compressed_swizzled_bitmask=None,
            requires_grad=w.requires_grad,
        )
