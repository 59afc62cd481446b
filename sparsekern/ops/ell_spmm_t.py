"""``sparsekern::ell_spmm_t``: dX = G @ W for a constant fan-in (ELL) weight W, straight from W's ELL index.

A scatter along each row of W: no transposed index is built or stored (see :mod:`sparsekern.ops.ell_spmm`).
"""

from __future__ import annotations

import functools

import torch

from .._csr import VALUE_DTYPES
from .._validate import check_same_device, check_tensor
from ..reference import ell_spmm_t_reference
from .ell_spmm import check_ell, check_ell_values, resolve


@torch.library.register_fake("sparsekern::ell_spmm_t")
def _fake(g, cols, values, n_in):
    return g.new_empty(g.shape[0], n_in)


def _autograd(family: str):
    """(backward, setup_context) of ell_spmm_t whose backward runs the other ELL ops on ``family``."""

    def backward(ctx, grad):
        # dx = g @ W: dg = grad @ W.T (ell_spmm), dvalues[o, t] = sum_b g[b, o] * grad[b, cols[o, t]] (ell_sddmm).
        from .ell_sddmm import run as sddmm_run
        from .ell_spmm import run as spmm_run

        g, cols, values = ctx.saved_tensors
        grad = grad.contiguous()
        grad_g = spmm_run(family, grad, cols, values) if ctx.needs_input_grad[0] else None
        grad_values = sddmm_run(family, g, grad, cols) if ctx.needs_input_grad[2] else None
        return grad_g, None, grad_values, None

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])

    return backward, setup_context


_bw, _ctx = _autograd("cpu")
torch.library.register_autograd("sparsekern::ell_spmm_t", _bw, setup_context=_ctx)


@functools.cache
def _triton_op():
    from ..kernels.ell_spmm_t import _ell_spmm_t_fwd

    @torch.library.triton_op("sparsekern::ell_spmm_t_triton", mutates_args=())
    def ell_spmm_t_triton(g: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_in: int) -> torch.Tensor:
        return _ell_spmm_t_fwd(g, cols, values, n_in)

    ell_spmm_t_triton.register_fake(_fake)
    backward, setup_context = _autograd("triton")
    ell_spmm_t_triton.register_autograd(backward, setup_context=setup_context)
    return ell_spmm_t_triton


def run(backend: str, g, cols, values, n_in: int) -> torch.Tensor:
    """ell_spmm_t on a resolved backend, without argument checks (see :func:`sparsekern.ops.ell_spmm.run`)."""
    if backend == "reference":
        return ell_spmm_t_reference(g, cols, values, n_in)
    if backend == "triton":
        return _triton_op()(g, cols, values, n_in)
    return torch.ops.sparsekern.ell_spmm_t(g, cols, values, n_in)


def ell_spmm_t(
    g: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_in: int, *, backend: str = "auto"
) -> torch.Tensor:
    """``dx = g @ W`` for a constant fan-in ``W`` (n_out, n_in) in ELL layout: the input gradient of
    :func:`~sparsekern.ops.ell_spmm.ell_spmm`.

    ``dx[b, i] = sum over (o, t) with cols[o, t] == i of g[b, o] * values[o, t]``, accumulated in float32
    (deterministic: no atomics).

    Args:
        g: (B, n_out) contiguous float32, bfloat16 or float16 (float64 runs the reference).
        cols: int32 (n_out, k), as for :func:`~sparsekern.ops.ell_spmm.ell_spmm` (validated on every call).
        values: (n_out, k) in g's dtype, contiguous.
        n_in: columns of W (the width of dx).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        (B, n_in) in g's dtype. Differentiable in g and values.

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape or n_in, mixed devices, or an invalid index.

    Example::

        >>> from sparsekern.ops.ell_spmm_t import ell_spmm_t
        >>> cols = torch.rand(8, 16).argsort(1)[:, :3].sort(1).values.int()  # 3 nonzeros per row
        >>> values = torch.randn(8, 3)
        >>> g = torch.randn(4, 8)
        >>> dx = ell_spmm_t(g, cols, values, 16)
        >>> w = torch.zeros(8, 16).scatter_(1, cols.long(), values)
        >>> torch.allclose(dx, g @ w, atol=1e-6)
        True
    """
    fn = "ell_spmm_t"
    check_tensor(fn, "g", g, dtypes=VALUE_DTYPES, ndim=2, contiguous=True)
    if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in < 0:
        raise ValueError(f"{fn}: n_in must be a non-negative int, got {n_in!r}")
    check_ell(fn, cols, g.shape[1], n_in)
    check_ell_values(fn, values, cols, g.dtype)
    check_same_device(fn, g=g, cols=cols, values=values)
    return run(resolve(fn, g, backend), g, cols, values, n_in)
