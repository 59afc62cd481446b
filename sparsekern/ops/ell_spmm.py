"""``sparsekern::ell_spmm``: y = x @ W.T for a constant fan-in (ELL) weight W: every row holds k nonzeros.

The ELL layout of W (n_out, n_in): ``cols`` int32 (n_out, k), each row's columns ascending and unique, and
``values`` (n_out, k). A CSR index whose rows all hold k entries is this layout viewed as a matrix
(``col_idx.view(n_out, k)``, ``values.view(n_out, k)``), so no row pointer is stored or read.
"""

from __future__ import annotations

import functools

import torch

from .._csr import VALUE_DTYPES
from .._validate import check_same_device, check_tensor
from ..reference import ell_spmm_reference
from . import _backend


def check_ell(fn: str, cols, n_out: int | None, n_in: int, *, name: str = "cols") -> None:
    """Raise unless ``cols`` is a valid ELL index of an (n_out, n_in) matrix: an int32 contiguous (n_out, k) tensor
    (n_out None: any number of rows) whose rows are strictly ascending (sorted, no repeats) in [0, n_in).
    O(n_out * k), one device sync when the index is not empty."""
    check_tensor(fn, name, cols, dtypes=(torch.int32,), ndim=2, contiguous=True)
    if n_out is not None and cols.shape[0] != n_out:
        raise ValueError(f"{fn}: {name} must have {n_out} rows (one per output), got shape {tuple(cols.shape)}")
    k = cols.shape[1]
    if k > n_in:
        raise ValueError(f"{fn}: {name} holds {k} columns per row, more than n_in={n_in} (columns are unique)")
    if cols.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(cols)).tolist()  # one sync for both
    if lo < 0 or hi >= n_in:
        bad = ((cols < 0) | (cols >= n_in)).nonzero()[0].tolist()
        raise ValueError(
            f"{fn}: {name} must lie in [0, {n_in}), got {int(cols[bad[0], bad[1]])} at row {bad[0]}, position {bad[1]}"
        )
    if k > 1:
        steps = cols[:, 1:] > cols[:, :-1]
        if not bool(steps.all()):
            r, t = (~steps).nonzero()[0].tolist()
            raise ValueError(
                f"{fn}: {name} must be ascending and unique within each row, got column {int(cols[r, t + 1])} "
                f"after {int(cols[r, t])} in row {r}"
            )


def check_ell_values(fn: str, values, cols, dtype: torch.dtype, *, name: str = "values") -> None:
    """Raise unless ``values`` is a contiguous tensor of ``cols``' shape in ``dtype``."""
    check_tensor(fn, name, values, dtypes=(dtype,), ndim=2, contiguous=True)
    if values.shape != cols.shape:
        raise ValueError(
            f"{fn}: {name} must have cols' shape {tuple(cols.shape)} (one value per nonzero), got {tuple(values.shape)}"
        )


def resolve(fn: str, t: torch.Tensor, backend: str) -> str:
    """The backend that runs the ELL op ``fn`` on ``t`` (:func:`_backend.resolve_tensor`), where a compiled
    extension built before the ELL kernels (no C++/CUDA kernel registered for ``sparsekern::<fn>`` on ``t``'s
    device) counts as unavailable: "auto" falls back to the reference with a warning, an explicit backend raises."""
    resolved = _backend.resolve_tensor(fn, t, backend)
    if resolved in ("cpu", "cuda"):
        key = "CPU" if t.device.type == "cpu" else "CUDA"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{fn}", key):
            why = f"sparsekern._C has no {key} kernel for {fn} (built before the ELL kernels; rebuild it)"
            if backend != "auto":
                raise _backend.BackendUnavailableError(f"{fn}: backend={backend!r} is not available: {why}")
            _backend.warn_once(f"sparsekern.{fn}: using the plain-PyTorch reference ({why})")
            return "reference"
    return resolved


@torch.library.register_fake("sparsekern::ell_spmm")
def _fake(x, cols, values):
    return x.new_empty(x.shape[0], cols.shape[0])


def _autograd(family: str):
    """(backward, setup_context) of ell_spmm whose backward runs the other ELL ops on ``family`` ("cpu": the
    dispatcher's C++/CUDA kernels, "triton")."""

    def backward(ctx, grad):
        # y = x @ W.T: dx = grad @ W (ell_spmm_t), dvalues = grad.T @ x at W's nonzeros (ell_sddmm).
        from .ell_sddmm import run as sddmm_run
        from .ell_spmm_t import run as spmm_t_run

        x, cols, values = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = spmm_t_run(family, grad, cols, values, x.shape[1]) if ctx.needs_input_grad[0] else None
        grad_values = sddmm_run(family, grad, x, cols) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_values

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    return backward, setup_context


_bw, _ctx = _autograd("cpu")
torch.library.register_autograd("sparsekern::ell_spmm", _bw, setup_context=_ctx)


@functools.cache
def _triton_op():
    from ..kernels.ell_spmm import _ell_spmm_fwd

    @torch.library.triton_op("sparsekern::ell_spmm_triton", mutates_args=())
    def ell_spmm_triton(x: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return _ell_spmm_fwd(x, cols, values)

    ell_spmm_triton.register_fake(_fake)
    backward, setup_context = _autograd("triton")
    ell_spmm_triton.register_autograd(backward, setup_context=setup_context)
    return ell_spmm_triton


def run(backend: str, x, cols, values) -> torch.Tensor:
    """ell_spmm on a resolved backend, without argument checks (callers have checked the index once: the Triton
    and CUDA kernels trust it; the C++ kernel scans it again, cheaply, so an index edited behind the checks' back
    raises instead of reading out of bounds)."""
    if backend == "reference":
        return ell_spmm_reference(x, cols, values)
    if backend == "triton":
        return _triton_op()(x, cols, values)
    return torch.ops.sparsekern.ell_spmm(x, cols, values)


def ell_spmm(x: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Sparse-dense matmul ``y = x @ W.T`` for a constant fan-in ``W`` (n_out, n_in) in ELL layout.

    ``y[b, o] = sum_t values[o, t] * x[b, cols[o, t]]``, accumulated in float32.

    Args:
        x: (B, n_in) contiguous float32, bfloat16 or float16 (float64 runs the reference).
        cols: int32 (n_out, k), contiguous: the columns of each row's k nonzeros, in [0, n_in), strictly
            ascending within a row (validated in O(n_out * k) on every call; ValueError names the fault).
        values: (n_out, k) in x's dtype, contiguous.
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        (B, n_out) in x's dtype. Differentiable in x and values (backward by :func:`ell_spmm_t` and
        :func:`ell_sddmm`).

    Raises:
        TypeError: a wrong dtype (cols not int32, values not x's dtype).
        ValueError: a wrong shape, tensors on different devices, or an invalid index.

    Example::

        >>> from sparsekern.ops.ell_spmm import ell_spmm
        >>> cols = torch.rand(8, 16).argsort(1)[:, :3].sort(1).values.int()  # 3 nonzeros per row
        >>> values = torch.randn(8, 3)
        >>> x = torch.randn(4, 16)
        >>> y = ell_spmm(x, cols, values)
        >>> w = torch.zeros(8, 16).scatter_(1, cols.long(), values)  # the dense weight
        >>> torch.allclose(y, x @ w.t(), atol=1e-6)
        True
    """
    fn = "ell_spmm"
    check_tensor(fn, "x", x, dtypes=VALUE_DTYPES, ndim=2, contiguous=True)
    check_ell(fn, cols, None, x.shape[1])
    check_ell_values(fn, values, cols, x.dtype)
    check_same_device(fn, x=x, cols=cols, values=values)
    return run(resolve(fn, x, backend), x, cols, values)
