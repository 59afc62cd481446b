"""``sparsekern::ell_sddmm``: the gradient of a constant fan-in (ELL) weight's values, only at its nonzeros."""

from __future__ import annotations

import functools

import torch

from .._csr import VALUE_DTYPES
from .._validate import check_same_device, check_tensor
from ..reference import ell_sddmm_reference
from .ell_spmm import check_ell, resolve


@torch.library.register_fake("sparsekern::ell_sddmm")
def _fake(g, x, cols):
    return x.new_empty(cols.shape)


def _autograd(family: str):
    """(backward, setup_context) of ell_sddmm whose backward runs the other ELL ops on ``family``."""

    def backward(ctx, grad):
        # out[o, t] = sum_b g[b, o] * x[b, cols[o, t]] is bilinear: dg = x @ V.T and dx = g @ V for the ELL matrix
        # V with values grad (ell_spmm and ell_spmm_t).
        from .ell_spmm import run as spmm_run
        from .ell_spmm_t import run as spmm_t_run

        g, x, cols = ctx.saved_tensors
        grad = grad.contiguous()
        grad_g = spmm_run(family, x, cols, grad) if ctx.needs_input_grad[0] else None
        grad_x = spmm_t_run(family, g, cols, grad, x.shape[1]) if ctx.needs_input_grad[1] else None
        return grad_g, grad_x, None

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    return backward, setup_context


_bw, _ctx = _autograd("cpu")
torch.library.register_autograd("sparsekern::ell_sddmm", _bw, setup_context=_ctx)


@functools.cache
def _triton_op():
    from ..kernels.ell_sddmm import _ell_sddmm_fwd

    @torch.library.triton_op("sparsekern::ell_sddmm_triton", mutates_args=())
    def ell_sddmm_triton(g: torch.Tensor, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return _ell_sddmm_fwd(g, x, cols)

    ell_sddmm_triton.register_fake(_fake)
    backward, setup_context = _autograd("triton")
    ell_sddmm_triton.register_autograd(backward, setup_context=setup_context)
    return ell_sddmm_triton


def run(backend: str, g, x, cols) -> torch.Tensor:
    """ell_sddmm on a resolved backend, without argument checks (see :func:`sparsekern.ops.ell_spmm.run`)."""
    if backend == "reference":
        return ell_sddmm_reference(g, x, cols)
    if backend == "triton":
        return _triton_op()(g, x, cols)
    return torch.ops.sparsekern.ell_sddmm(g, x, cols)


def ell_sddmm(g: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sampled dense-dense matmul at a constant fan-in (ELL) pattern: ``out[o, t] = sum_b g[b, o] * x[b, cols[o, t]]``.

    This is dL/dvalues of ``y = ell_spmm(x, cols, values)`` with ``g = dL/dy``, computed without forming the dense
    (n_out, n_in) gradient; accumulated in float32.

    Args:
        g: (B, n_out) contiguous float32, bfloat16 or float16 (float64 runs the reference).
        x: (B, n_in), g's dtype, contiguous.
        cols: int32 (n_out, k), as for :func:`~sparsekern.ops.ell_spmm.ell_spmm` (validated on every call).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        (n_out, k) in the inputs' dtype (the layout of ``values``). Differentiable in g and x.

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape, mixed devices, or an invalid index.

    Example::

        >>> from sparsekern.ops.ell_sddmm import ell_sddmm
        >>> cols = torch.rand(8, 16).argsort(1)[:, :3].sort(1).values.int()  # 3 nonzeros per row
        >>> g, x = torch.randn(4, 8), torch.randn(4, 16)
        >>> dv = ell_sddmm(g, x, cols)
        >>> torch.allclose(dv, (g.t() @ x).gather(1, cols.long()), atol=1e-6)
        True
    """
    fn = "ell_sddmm"
    check_tensor(fn, "g", g, dtypes=VALUE_DTYPES, ndim=2, contiguous=True)
    check_tensor(fn, "x", x, dtypes=(g.dtype,), ndim=2, contiguous=True)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: g and x must have the same batch size, got {g.shape[0]} and {x.shape[0]}")
    check_ell(fn, cols, g.shape[1], x.shape[1])
    check_same_device(fn, g=g, x=x, cols=cols)
    return run(resolve(fn, x, backend), g, x, cols)
