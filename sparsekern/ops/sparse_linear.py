"""``sparsekern::sparse_linear``: y = x @ W.T + bias for a sparse W, with autograd (dX via the transposed index,
dW only at the nonzeros) and a per-call choice between the sparse kernels and a dense-masked GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._csr import VALUE_DTYPES, CSRIndex
from .._validate import check_same_device, check_tensor
from . import sddmm as _sddmm
from . import spmm as _spmm

PATHS = ("auto", "sparse", "dense")

# Largest density (nnz / (n_out * n_in)) at which the sparse kernels beat the dense-masked path, by device type
# and dtype. CPU: measured with `sparsekern bench linear` on the 2-core AVX-512 machine (see README). CUDA: not
# measured on a GPU yet; DESIGN's estimate that tensor-core GEMMs win below ~95% sparsity.
DENSITY_CROSSOVER: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float32): 0.35,
    ("cpu", torch.bfloat16): 0.25,
    ("cpu", torch.float16): 0.25,
    ("cuda", torch.float32): 0.05,
    ("cuda", torch.bfloat16): 0.05,
    ("cuda", torch.float16): 0.05,
}


def choose_path(path: str, index: CSRIndex, x: torch.Tensor, backend: str) -> str:
    if path not in PATHS:
        raise ValueError(f"sparse_linear: path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    if backend == "reference":
        return "sparse"
    crossover = DENSITY_CROSSOVER.get((x.device.type, x.dtype), 0.0)
    return "sparse" if index.density <= crossover else "dense"


@torch.library.register_fake("sparsekern::sparse_linear")
def _fake(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend, path):
    return x.new_empty(x.shape[0], n_out)


@torch.library.impl("sparsekern::sparse_linear", "CompositeExplicitAutograd")
def _impl(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend, path):
    if path == "dense":
        index = CSRIndex(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, n_out, x.shape[1])
        return F.linear(x, index.to_dense(values), bias)
    y = _spmm.run(backend, x, row_ptr, col_idx, values, n_out)
    return y if bias is None else y.add_(bias)


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend, path = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm)
    ctx.n_out, ctx.backend, ctx.path, ctx.has_bias = n_out, backend, path, bias is not None


def _backward(ctx, grad):
    x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm = ctx.saved_tensors
    grad = grad.contiguous()
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x = grad_values = grad_bias = None
    if ctx.path == "dense":
        index = CSRIndex(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, ctx.n_out, x.shape[1])
        if need_x:
            grad_x = grad @ index.to_dense(values)
        if need_values:
            grad_values = (grad.T @ x)[index.rows(), col_idx.long()]
    else:
        if need_x:
            grad_x = _spmm.run(ctx.backend, grad, csc_ptr, csc_row, values[csc_perm], x.shape[1])
        if need_values:
            grad_values = _sddmm.run(ctx.backend, grad, x, row_ptr, col_idx)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.sum(0)
    return grad_x, grad_values, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("sparsekern::sparse_linear", _backward, setup_context=_setup_context)


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    index: CSRIndex,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    path: str = "auto",
) -> torch.Tensor:
    """``x @ W.T + bias`` for a sparse ``W`` given by its nonzero ``values`` and a :class:`CSRIndex`.

    Differentiable in x, values and bias; dX runs through the transposed index and dvalues only at the
    nonzeros (never the dense weight gradient) on the sparse path.

    Args:
        x: (..., n_in) float32, bfloat16 or float16 (float64 runs the reference); any leading shape.
        values: (nnz) in x's dtype, in CSR order.
        index: the weight's index (``CSRIndex.from_mask(mask)``).
        bias: optional (n_out) in x's dtype.
        backend: kernel family, "auto", "cpu", "triton", "cuda" or "reference".
        path: "auto" (by density: the sparse kernels where they beat a dense GEMM on this device, see
            ``DENSITY_CROSSOVER`` and ``sparsekern info``), "sparse" or "dense" (scatter W, dense GEMM).

    Returns:
        (..., n_out) in x's dtype.
    """
    fn = "sparse_linear"
    check_tensor(fn, "x", x, dtypes=VALUE_DTYPES)
    if x.dim() < 1 or x.shape[-1] != index.n_in:
        raise ValueError(f"{fn}: x must have shape (..., {index.n_in}), got {tuple(x.shape)}")
    check_tensor(fn, "values", values, dtypes=(x.dtype,), ndim=1)
    if values.numel() != index.nnz:
        raise ValueError(f"{fn}: values must have one entry per nonzero ({index.nnz}), got {values.numel()}")
    if bias is not None:
        check_tensor(fn, "bias", bias, dtypes=(x.dtype,), ndim=1)
        if bias.numel() != index.n_out:
            raise ValueError(f"{fn}: bias must have {index.n_out} entries, got {bias.numel()}")
        check_same_device(fn, x=x, values=values, bias=bias, index=index.row_ptr)
    else:
        check_same_device(fn, x=x, values=values, index=index.row_ptr)
    chosen = _spmm.resolve(fn, x, backend)
    chosen_path = choose_path(path, index, x, chosen)
    lead = x.shape[:-1]
    y = torch.ops.sparsekern.sparse_linear(
        x.reshape(-1, index.n_in).contiguous(),
        values.contiguous(),
        index.row_ptr,
        index.col_idx,
        index.csc_ptr,
        index.csc_row,
        index.csc_perm,
        bias,
        index.n_out,
        chosen,
        chosen_path,
    )
    return y.reshape(*lead, index.n_out)
