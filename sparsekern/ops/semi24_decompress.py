"""``sparsekern::semi24_decompress``: CUTLASS (packed, meta) -> the dense matrix, the exact inverse of compress."""

from __future__ import annotations

import functools

import torch

from .. import _semi24
from .._validate import check_same_device, check_tensor
from ..reference import semi24_decompress_reference
from . import _backend


@torch.library.register_fake("sparsekern::semi24_decompress")
def _fake(packed, meta):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2)


@functools.cache
def _triton_op():
    from ..kernels.semi24_decompress import _semi24_decompress_fwd

    @torch.library.triton_op("sparsekern::semi24_decompress_triton", mutates_args=())
    def semi24_decompress_triton(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        dense, first_bad = _semi24_decompress_fwd(packed, meta)
        if first_bad >= 0:
            shape = (packed.shape[0], packed.shape[1] * 2)
            raise ValueError(_semi24.invalid_meta_message("semi24_decompress", shape, packed.dtype, first_bad))
        return dense

    # The body runs kernels and reads their error flag, so fake tensors take the shape function instead.
    semi24_decompress_triton.register_fake(_fake)
    return semi24_decompress_triton


def semi24_decompress(packed: torch.Tensor, meta: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rebuild the dense (m, 2 * packed.shape[1]) matrix from :func:`semi24_compress`'s (packed, meta).

    Bit-exact: ``semi24_decompress(*semi24_compress(w))`` equals ``w`` bit for bit, except that a -0.0 in a
    dropped position comes back as +0.0. (torch's own ``to_dense`` of fp32 1:2 tensors loses the low 16 bits
    of some values in torch 2.14; this function does not.)

    Args:
        packed: (m, k/2) contiguous float16, bfloat16, int8 or float32 values.
        meta: the matching contiguous metadata: int16 (m, k/16) for fp16/bf16, int32 (m, k/32) for int8,
            int16 (m, k/8) for fp32.
        backend: as for :func:`semi24_compress`.

    Raises:
        TypeError / ValueError: wrong types, shapes, devices, or metadata holding a code that no compression
            produces (the message names the group).
        BackendUnavailableError: the requested backend cannot run here.

    Example::

        >>> w = torch.tensor([[1.0, 0, 0, 2.0] * 16] * 32, dtype=torch.float16)
        >>> torch.equal(sparsekern.semi24_decompress(*sparsekern.semi24_compress(w)), w)
        True
    """
    fn = "semi24_decompress"
    check_tensor(fn, "packed", packed, dtypes=_semi24.DTYPES, ndim=2, contiguous=True)
    fmt = _semi24.FORMATS[packed.dtype]
    check_tensor(fn, "meta", meta, dtypes=(fmt.meta_dtype,), ndim=2, contiguous=True)
    check_same_device(fn, packed=packed, meta=meta)
    m, k = packed.shape[0], packed.shape[1] * 2
    error = _semi24.shape_error(fn, "the dense matrix of packed", (m, k), packed.dtype)
    if error:
        raise ValueError(error)
    if tuple(meta.shape) != (m, k // fmt.elems_per_meta):
        raise ValueError(
            f"{fn}: meta must have shape {(m, k // fmt.elems_per_meta)} for packed of shape {tuple(packed.shape)}, "
            f"got {tuple(meta.shape)}"
        )
    chosen = _backend.resolve(fn, packed.device, backend)
    if chosen == "reference":
        return semi24_decompress_reference(packed, meta)
    if chosen == "triton":
        return _triton_op()(packed, meta)
    return torch.ops.sparsekern.semi24_decompress(packed, meta)
