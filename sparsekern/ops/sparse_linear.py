"""``sparsekern::sparse_linear``: y = x @ W.T + bias for a sparse W, with autograd (dX via the transposed index,
dW only at the nonzeros) and a per-call choice between the sparse kernels and a dense-masked GEMM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._csr import VALUE_DTYPES, CSRIndex, check_index
from .._validate import check_same_device, check_tensor
from . import sddmm as _sddmm
from . import spmm as _spmm
from ._backend import resolve_tensor
from .csr_dense import csr_dense_gather, csr_dense_scatter_

PATHS = ("auto", "sparse", "dense")


@dataclass(frozen=True)
class Crossover:
    """Largest density (nnz / (n_out * n_in)) at which the sparse kernels beat the dense-masked path."""

    inference: float  # forward only, batches of more than SMALL_BATCH rows
    small_batch: float  # forward only, at most SMALL_BATCH rows: the dense GEMM is bound by reading all of W
    training: float  # forward and backward (dX, and dW at the nonzeros)


SMALL_BATCH = 64

# By device type and dtype. CPU: from `sparsekern bench linear` runs on the 2-core AVX-512 machine (see README).
# fp32: forward at B >= 256 crosses near density 0.35, at B=16 sparse still wins 2x at 0.5; forward+backward
# too crosses between 0.4 (sparse 0.77-1.21x of dense) and 0.3 (1.07-1.59x). bf16: oneDNN's bf16 GEMM is twice
# as fast as fp32's, so sparse wins later. fp16: torch has no fast fp16 GEMM on the CPU, so the sparse kernels
# (fp32 accumulation) win at every density measured (0.5 and up). CUDA: not measured on a GPU yet; DESIGN's
# estimate that tensor-core GEMMs win below ~95% sparsity.
DENSITY_CROSSOVER: dict[tuple[str, torch.dtype], Crossover] = {
    ("cpu", torch.float32): Crossover(inference=0.35, small_batch=0.5, training=0.35),
    ("cpu", torch.bfloat16): Crossover(inference=0.25, small_batch=0.5, training=0.2),
    ("cpu", torch.float16): Crossover(inference=1.0, small_batch=1.0, training=1.0),
    ("cuda", torch.float32): Crossover(0.05, 0.05, 0.05),
    ("cuda", torch.bfloat16): Crossover(0.05, 0.05, 0.05),
    ("cuda", torch.float16): Crossover(0.05, 0.05, 0.05),
}


def density_crossover(device_type: str, dtype: torch.dtype, batch: int, training: bool) -> float:
    """The density up to which ``path="auto"`` takes the sparse kernels (0.0: never)."""
    table = DENSITY_CROSSOVER.get((device_type, dtype))
    if table is None:
        return 0.0
    if training:
        return table.training
    return table.small_batch if batch <= SMALL_BATCH else table.inference


def choose_path(path: str, index: CSRIndex, x: torch.Tensor, backend: str, training: bool = False) -> str:
    """The path of one call: "sparse" or "dense". ``training``: a backward will follow; x is (B, n_in)."""
    if path not in PATHS:
        raise ValueError(f"sparse_linear: path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    if backend == "reference":
        return "sparse"
    crossover = density_crossover(x.device.type, x.dtype, x.shape[0], training)
    return "sparse" if index.density <= crossover else "dense"


class DenseWorkspace:
    """A dense (n_out, n_in) weight kept by a layer for the dense path, so a call writes only nonzeros.

    A fresh dense weight costs a zero fill of n_out * n_in elements (and, for large weights, the page faults of
    a new allocation) on every call: at 50% density and B=256 that was most of the time of the dense path. The
    workspace is zero off the mask for good (it is only ever written at the nonzeros of one topology; a new
    topology needs a new workspace). Between inference calls it also keeps a copy of the values it holds (the
    shadow), and such a call rewrites only the rows whose values changed bit-wise (``csr_dense_scatter_``): none
    in an inference loop, which then costs one comparison of nnz values instead of a write of every line of the
    weight. Values are compared on every call, never trusted to be unchanged: fused optimizers update parameters
    without bumping their version counter. A training call (a backward follows) rewrites every row and drops
    the shadow: the optimizer step will change every value anyway.

    The writes go through ``.data``, which does not bump the version counter that autograd checks: a layer
    called twice before its backward writes the same values twice (values only change in an optimizer step,
    after the backward).

    The backward's full (n_out, n_in) weight gradient, of which only the nonzeros are kept, goes to a second
    buffer kept here too (2 x n_out x n_in elements in all, as nn.Linear's weight and its gradient): a fresh one
    per backward costs the page faults of a new allocation, 18 ms of a 195 ms step at 4096x4096 fp32 on this VM.

    What the dense path costs beyond its GEMMs (forward+backward, 4096x4096 at density 0.5, B=256, fp32, Zen 4,
    torch.profiler on one thread): the GEMMs 93.4%, the gather of dW 3.2%, the scatter 2.3%. Both copies are bound
    by memory traffic (the dense matrix and the int32 columns; vector gathers were 2x slower than scalar loads),
    so at small batches the path stays ~5% behind F.linear; a per-topology bitmap of the mask in place of the
    columns (a compress/expand per row) is the next step.
    """

    def __init__(self) -> None:
        self._weight: torch.Tensor | None = None
        self._shadow: torch.Tensor | None = None  # the values the weight holds at the nonzeros
        self._grad: torch.Tensor | None = None  # scratch for the backward's dense weight gradient

    def weight(self, index: CSRIndex, values: torch.Tensor, training: bool = False) -> torch.Tensor:
        """The dense weight holding ``values``. ``training``: an optimizer step will change every value before
        the next call, so keeping the shadow up to date would be wasted (the next inference call rebuilds it)."""
        w, values = self._weight, values.detach()
        if w is None or w.dtype != values.dtype or w.device != values.device:
            w = self._weight = values.new_zeros(index.n_out, index.n_in)
            self._shadow = None
        w = w.data
        if training:
            csr_dense_scatter_(w, values, index.row_ptr, index.col_idx)
            self._shadow = None
        elif self._shadow is None:
            csr_dense_scatter_(w, values, index.row_ptr, index.col_idx)
            self._shadow = values.clone()
        else:  # rewrites only the rows whose values changed since the last call (none in an inference loop)
            csr_dense_scatter_(w, values, index.row_ptr, index.col_idx, self._shadow)
        return w

    def grad_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """The (n_out, n_in) scratch for a weight gradient, in ``like``'s (the weight's) dtype and device."""
        g = self._grad
        if g is None or g.dtype != like.dtype or g.device != like.device or g.shape != like.shape:
            g = self._grad = torch.empty_like(like, memory_format=torch.contiguous_format)
        return g


class _DenseMaskedLinear(torch.autograd.Function):
    """y = x @ W.T + bias on a scattered dense W; dvalues = (G^T X) at the nonzeros. Dense GEMMs throughout."""

    @staticmethod
    def forward(ctx, x, values, bias, weight, row_ptr, col_idx, workspace):
        ctx.save_for_backward(x)
        ctx.weight, ctx.has_bias = weight, bias is not None
        ctx.index, ctx.workspace = (row_ptr, col_idx), workspace
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = grad @ ctx.weight if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[1]:
            if ctx.workspace is None:
                grad_w = (grad.T @ x).contiguous()
            else:
                grad_w = torch.mm(grad.T, x, out=ctx.workspace.grad_buffer(ctx.weight))
            grad_values = csr_dense_gather(grad_w, *ctx.index)
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_values, grad_bias, None, None, None, None


def _dense_path(x, values, index: CSRIndex, bias, workspace: DenseWorkspace | None, training: bool) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: a fresh weight, no writes behind autograd's back
        weight = index.to_dense(values.detach())
        return _DenseMaskedLinear.apply(x, values, bias, weight, index.row_ptr, index.col_idx, None)
    if workspace is None:  # a one-off call: a fresh weight, and a fresh gradient in the backward
        weight = DenseWorkspace().weight(index, values, training=True)
    else:
        weight = workspace.weight(index, values, training)
    return _DenseMaskedLinear.apply(x, values, bias, weight, index.row_ptr, index.col_idx, workspace)


@torch.library.register_fake("sparsekern::sparse_linear")
def _fake(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend):
    return x.new_empty(x.shape[0], n_out)


def _forward(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend):
    y = _spmm.run(backend, x, row_ptr, col_idx, values, n_out)
    return y if bias is None else y.add_(bias)


torch.library.impl("sparsekern::sparse_linear", "CompositeExplicitAutograd")(_forward)


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, bias, n_out, backend = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm)
    ctx.n_out, ctx.backend, ctx.has_bias = n_out, backend, bias is not None


def _backward(ctx, grad):
    x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _spmm.run(ctx.backend, grad, csc_ptr, csc_row, values[csc_perm], x.shape[1])
    if ctx.needs_input_grad[1]:
        grad_values = _sddmm.run(ctx.backend, grad, x, row_ptr, col_idx)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad.sum(0)
    return grad_x, grad_values, None, None, None, None, None, grad_bias, None, None


torch.library.register_autograd("sparsekern::sparse_linear", _backward, setup_context=_setup_context)


class _SparseLinearEager(torch.autograd.Function):
    """The op's forward, context and backward, as called outside torch.compile: torch.library's autograd wrapper
    costs about 60 us a call (forward+backward of a 256x256 layer at B=32: 211 us through the op, 151 us here),
    which is most of the cost of a small layer. torch.compile traces the op itself."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    index: CSRIndex,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    path: str = "auto",
    workspace: DenseWorkspace | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a sparse ``W`` given by its nonzero ``values`` and a :class:`CSRIndex`.

    Differentiable in x, values and bias; dX runs through the transposed index and dvalues only at the
    nonzeros (never the dense weight gradient) on the sparse path.

    Args:
        x: (..., n_in) float32, bfloat16 or float16 (float64 runs the reference); any leading shape.
        values: (nnz) in x's dtype, in CSR order.
        index: the weight's index (``CSRIndex.from_mask(mask)``), a :class:`sparsekern.CSRIndex`. Validated in
            O(nnz) on first use and again only after one of its tensors changed (version counters).
        bias: optional (n_out) in x's dtype.
        backend: kernel family, "auto", "cpu", "triton", "cuda" or "reference".
        path: "auto" (the sparse kernels up to the density where they stop beating a dense GEMM on this device,
            for this batch size and for training or inference: see ``DENSITY_CROSSOVER`` and
            ``sparsekern info``), "sparse" or "dense" (scatter W, dense GEMM).
        workspace: a :class:`DenseWorkspace` the caller keeps for this index (``SparseLinear`` does), so the
            dense path rewrites only the nonzeros of one dense weight instead of building a new one per call.

    Returns:
        (..., n_out) in x's dtype.
    """
    fn = "sparse_linear"
    if not torch.compiler.is_compiling():  # traced calls: the C++ kernels still scan the index at run time
        check_index(fn, index)  # O(1) for an index built by CSRIndex and unchanged since; else O(nnz), recorded
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
    chosen = resolve_tensor(fn, x, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, index.n_in).contiguous()
    training = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)
    chosen_path = choose_path(path, index, x2, chosen, training)
    if chosen_path == "dense":
        return _dense_path(x2, values, index, bias, workspace, training).reshape(*lead, index.n_out)
    op = torch.ops.sparsekern.sparse_linear if torch.compiler.is_compiling() else _SparseLinearEager.apply
    y = op(
        x2,
        values.contiguous(),
        index.row_ptr,
        index.col_idx,
        index.csc_ptr,
        index.csc_row,
        index.csc_perm,
        bias,
        index.n_out,
        chosen,
    )
    return y.reshape(*lead, index.n_out)
