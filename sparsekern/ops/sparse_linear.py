"""``sparsekern::sparse_linear``: y = x @ W.T + bias for a sparse W, with autograd (dX via the transposed index,
dW only at the nonzeros) and a per-call choice between the sparse kernels and a dense-masked GEMM."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _extension
from .._csr import VALUE_DTYPES, CSRIndex, check_index
from .._validate import check_same_device, check_tensor
from . import sddmm as _sddmm
from . import spmm as _spmm
from ._backend import BackendUnavailableError, resolve_tensor, warn_once
from .csr_dense import csr_dense_gather, csr_dense_scatter_
from .ell_sddmm import run as _ell_sddmm  # by run(): the package exports functions of the modules' names
from .ell_spmm import run as _ell_spmm
from .ell_spmm_t import run as _ell_spmm_t

PATHS = ("auto", "sparse", "dense")
KERNELS = ("auto", "csr", "ell")


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


# ---------------------------------------------------------------------------------------------------------
# Constant fan-in (ELL): a CSR index whose rows all hold k nonzeros IS the ELL layout (col_idx.view(n_out, k),
# values.view(n_out, k)), so the sparse path can run the ELL kernels on the same storage. Which rows are equal is
# read off row_ptr once per index (O(n_out)) and remembered until row_ptr changes (its version counter).

_ell_widths: dict[int, tuple] = {}


def _row_counts(index: CSRIndex) -> torch.Tensor:
    return index.row_ptr[1:] - index.row_ptr[:-1]


def ell_width(index: CSRIndex) -> int | None:
    """k when every row of ``index`` holds exactly k nonzeros (the ELL layout), else None. O(n_out) on the first
    call for an index, then O(1) until its row_ptr is modified or replaced."""
    row_ptr = index.row_ptr
    key = id(row_ptr)
    version = -1 if row_ptr.is_inference() else row_ptr._version
    entry = _ell_widths.get(key)
    if entry is not None and entry[0]() is row_ptr and entry[1] == version and entry[2] == index.n_out:
        return entry[3]
    if index.n_out == 0:
        width = None
    else:
        counts = _row_counts(index)
        lo, hi = torch.stack(torch.aminmax(counts)).tolist()  # one sync for both
        width = int(lo) if lo == hi else None

    def forget(ref, key=key):
        current = _ell_widths.get(key)
        if current is not None and current[0] is ref:
            _ell_widths.pop(key, None)

    _ell_widths[key] = (weakref.ref(row_ptr, forget), version, index.n_out, width)
    return width


def first_unequal_row(index: CSRIndex) -> tuple[int, int, int]:
    """(row, its count, row 0's count) for the first row whose nonzero count differs from row 0's."""
    counts = _row_counts(index)
    r = int((counts != counts[0]).nonzero()[0])
    return r, int(counts[r]), int(counts[0])


def choose_kernels(kernels: str, index: CSRIndex, fan_in: int | None = None, fn: str = "sparse_linear") -> int | None:
    """The ELL width the sparse path runs with (None: the CSR kernels). ``kernels``: "auto" (ELL when every row
    holds the same count of nonzeros, at least one), "csr" or "ell" (ValueError naming the first unequal row when
    the rows differ). ``fan_in``: the width the caller knows (SparseLinear keeps it per topology): under
    torch.compile it is trusted, since a traced call cannot read row_ptr; eagerly the index itself decides."""
    if kernels not in KERNELS:
        raise ValueError(f"{fn}: kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "csr":
        return None
    if torch.compiler.is_compiling():
        width = fan_in
        if width is not None and width * index.n_out != index.nnz:
            raise ValueError(f"{fn}: fan_in={width} does not fit {index.nnz} nonzeros in {index.n_out} rows")
    else:
        width = ell_width(index)
    if kernels == "ell":
        if width is None:
            if index.n_out == 0:
                raise ValueError(f"{fn}: kernels='ell' needs a weight with at least one row")
            if torch.compiler.is_compiling():
                raise ValueError(
                    f"{fn}: kernels='ell' under torch.compile needs fan_in= (the count of nonzeros in every row); "
                    "SparseLinear passes its own"
                )
            row, count, first = first_unequal_row(index)
            raise ValueError(
                f"{fn}: kernels='ell' needs the same number of nonzeros in every row, but row {row} holds {count} "
                f"where row 0 holds {first} (use kernels='auto' or 'csr' for such a weight)"
            )
        return width
    return width if width else None  # auto: a weight without nonzeros keeps the CSR kernels


_ELL_OPS = ("ell_spmm", "ell_spmm_t", "ell_sddmm")

# Batch sizes at which kernels="auto" keeps the CSR kernels on a constant fan-in weight, by backend (lo, hi). Empty:
# ELL is measured at least as fast everywhere. (The first CPU ELL forward's gather path for batches of 2-8 rows was
# 1.1-3.7x slower than CSR and had {"cpu": (2, 8)} here; its scalar small-batch path beats CSR at every batch:
# 768->3072 at 90%, one thread, Zen 4, CSR time / ELL time at B=1, 2, 4, 8, 9, 16: AVX-512 0.9-2.7x, AVX2 1.4-2.3x.)
ELL_CSR_BATCHES: dict[str, tuple[int, int]] = {}


def auto_takes_ell(backend: str, batch: int) -> bool:
    """Whether kernels="auto" runs the ELL kernels (rather than CSR) on a constant fan-in weight for this backend
    and batch size (see ``ELL_CSR_BATCHES``)."""
    lo, hi = ELL_CSR_BATCHES.get(backend, (1, 0))
    return not lo <= batch <= hi


# Batch size from which the ELL path's backward takes dX through the CSC (spmm with the transposed index, the CSR
# path's dX) instead of ell_spmm_t, by (backend, CPU instruction set) (absent: always ell_spmm_t). ell_spmm_t is a
# scatter: a read-modify-write of an L2-resident accumulator tile per nonzero, twice the L2 traffic of the CSC's
# gather, so it wins only while the CSC's fixed per-call cost (values permuted into CSC order) dominates. Measured on
# Zen 4, one pinned thread, CPU time per call, 7 interleaved rounds, median CSR-time / ELL-time (above 1:
# ell_spmm_t faster), the CSC timing including the permutation:
#   B:                           256    512    1024   2048   4096
#   AVX-512 1024x1024 at 90%:    1.09   0.93   0.86   0.81-1.31 (noisy)
#   AVX-512 768->3072 at 90%:    1.19   1.03   0.95   0.90
#   AVX-512 768->3072 at 98%:    1.10   0.97   0.92   0.87
#   AVX2    1024x1024 at 90%:    1.12   0.97   0.91   1.02   1.07
#   AVX2    768->3072 at 90%:    1.31   1.15   1.07   1.03   1.01
#   AVX2    768->3072 at 98%:    1.37   1.25   1.19   1.19   1.20
# So AVX-512 from 512 rows; AVX2 never (its CSC spmm is the slower one there); the portable path is not measured.
# Under torch.compile the instruction set is not read (a C++ call): the traced backward keeps ell_spmm_t.
ELL_DX_CSC_BATCH: dict[tuple[str, str], int] = {("cpu", "avx512"): 512}


def ell_dx_takes_csc(backend: str, batch: int) -> bool:
    """Whether the ELL path's backward computes dX through the CSC for this backend (on the CPU: the instruction
    set the kernels run now) and batch size (see ``ELL_DX_CSC_BATCH``)."""
    if not ELL_DX_CSC_BATCH or torch.compiler.is_compiling():
        return False
    isa = _extension.cpu_isa() if backend == "cpu" else ""
    threshold = ELL_DX_CSC_BATCH.get((backend, isa))
    return threshold is not None and batch >= threshold


_ell_kernels: dict[str, bool] = {}  # by dispatch key: does the loaded extension have the ELL kernels?


def _has_ell_kernels(key: str) -> bool:
    has = _ell_kernels.get(key)
    if has is None:  # 3 dispatcher look-ups, once: they would cost ~1 us a call of a small layer
        has = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", key) for op in _ELL_OPS)
        _ell_kernels[key] = has
    return has


def ell_backend(fn: str, x: torch.Tensor, chosen: str, backend: str, kernels: str) -> str | None:
    """The backend that runs the ELL kernels for a call that resolved to ``chosen`` (asked for ``backend``), or None
    for the CSR kernels: an extension built before the ELL kernels has no C++/CUDA kernel for them, so "auto"
    keeps the CSR kernels (a fast path) and "ell" runs the reference (``backend="auto"``, with a warning) or raises
    (an explicit backend)."""
    if chosen in ("reference", "triton") or torch.compiler.is_compiling():
        return chosen
    key = "CPU" if x.device.type == "cpu" else "CUDA"
    if _has_ell_kernels(key):
        return chosen
    why = f"sparsekern._C has no {key} kernels for the ELL ops (built before them; rebuild it)"
    if kernels == "auto":
        warn_once(f"sparsekern.{fn}: constant fan-in weights run the CSR kernels ({why})")
        return None
    if backend != "auto":
        raise BackendUnavailableError(f"{fn}: kernels='ell' with backend={backend!r} is not available: {why}")
    warn_once(f"sparsekern.{fn}: kernels='ell' runs the plain-PyTorch reference ({why})")
    return "reference"


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

    The writes go through ``.data``, which does not bump the version counter that autograd checks; the values
    themselves are saved for the backward, so an in-place change of them between a forward and its backward
    is still reported by autograd.

    The backward's full (n_out, n_in) weight gradient, of which only the nonzeros are kept, goes to a second
    buffer kept here too (2 x n_out x n_in elements in all, as nn.Linear's weight and its gradient): a fresh one
    per backward costs the page faults of a new allocation, 18 ms of a 195 ms step at 4096x4096 fp32 on this VM.

    Threads: one call at a time holds the workspace (a non-blocking lock, :meth:`acquire`): an inference call
    for its forward, a training call from its forward to the end of its backward (or until its graph is freed,
    if no backward comes). A call that finds it held uses a weight (and gradient buffer) of its own, so calls
    from many threads, or a layer called twice before one backward, are correct and only pay the allocation.
    Pickling or deep-copying a workspace gives an empty one: the buffers are a cache, rebuilt on the next call.

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
        self._lock = threading.Lock()

    def __reduce__(self):  # a cache: copies and pickles start empty (and a lock cannot be pickled)
        return (type(self), ())

    def acquire(self) -> _Lease | None:
        """The workspace for one call, or None if another call holds it (then use a weight of your own)."""
        return _Lease(self) if self._lock.acquire(blocking=False) else None

    def weight(self, index: CSRIndex, values: torch.Tensor, training: bool = False) -> torch.Tensor:
        """The dense weight holding ``values`` (the caller holds the workspace). ``training``: an optimizer step
        will change every value before the next call, so keeping the shadow up to date would be wasted (the next
        inference call rebuilds it)."""
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


class _Lease:
    """One call's hold on a :class:`DenseWorkspace`; released once, by :meth:`release` or when it is freed (a
    training forward whose graph is dropped without a backward)."""

    def __init__(self, workspace: DenseWorkspace) -> None:
        self.workspace = workspace

    def release(self) -> None:
        workspace, self.workspace = self.workspace, None
        if workspace is not None:
            workspace._lock.release()

    __del__ = release


def _transposed(index: CSRIndex) -> CSRIndex:
    """The index of W.T, whose values in CSR order are ``values[index.csc_perm]``."""
    inverse = torch.empty_like(index.csc_perm)
    inverse[index.csc_perm] = torch.arange(index.nnz, device=inverse.device)
    return CSRIndex(index.csc_ptr, index.csc_row, index.row_ptr, index.col_idx, inverse, index.n_in, index.n_out)


class _Sddmm(torch.autograd.Function):
    """dvalues[j] = sum_b g[b, row_j] * x[b, col_j] with autograd, for a double backward through sparse_linear:
    its gradients are sparse_linear calls again (so any order of derivative works)."""

    @staticmethod
    def forward(ctx, g, x, index, backend):
        ctx.save_for_backward(g, x)
        ctx.index, ctx.backend = index, backend
        return _sddmm.run(backend, g.contiguous(), x.contiguous(), index.row_ptr, index.col_idx)

    @staticmethod
    def backward(ctx, u):
        g, x = ctx.saved_tensors
        index, backend = ctx.index, ctx.backend
        grad_g = grad_x = None
        if ctx.needs_input_grad[0]:  # d/dg[b, i] = sum over row i of u_j x[b, col_j]: x @ W_u.T
            grad_g = sparse_linear(x, u, index, backend=backend, path="sparse")
        if ctx.needs_input_grad[1]:  # d/dx[b, c] = sum over column c of u_j g[b, row_j]: g @ W_u
            grad_x = sparse_linear(g, u[index.csc_perm], _transposed(index), backend=backend, path="sparse")
        return grad_g, grad_x, None, None


def _differentiable_backward(grad, x, values, index: CSRIndex, backend: str, path: str, needs: tuple[bool, bool]):
    """(dx, dvalues) built from differentiable ops, for a backward with create_graph=True (a double backward
    follows). Slower than the kernels' backward (a transposed index per call), so only taken then."""
    grad_x = grad_values = None
    if needs[0]:
        grad_x = sparse_linear(grad, values[index.csc_perm], _transposed(index), backend=backend, path=path)
    if needs[1]:
        grad_values = _Sddmm.apply(grad, x, index, backend)
    return grad_x, grad_values


def _all_finite(t: torch.Tensor) -> bool:
    # Traced code cannot branch on data: torch.compile keeps the dense product (documented in sparse_linear).
    return torch.compiler.is_compiling() or bool(torch.isfinite(t).all())


class _DenseMaskedLinear(torch.autograd.Function):
    """y = x @ W.T + bias on a scattered dense W; dvalues = (G^T X) at the nonzeros. Dense GEMMs throughout."""

    @staticmethod
    def forward(ctx, x, values, bias, weight, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, backend, lease):
        # values too: autograd then reports an in-place change of them before this backward, as for nn.Linear
        ctx.save_for_backward(x, values)
        ctx.index = CSRIndex(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, weight.shape[0], weight.shape[1])
        ctx.weight, ctx.lease, ctx.backend, ctx.has_bias = weight, lease, backend, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        index, lease = ctx.index, ctx.lease
        needs = ctx.needs_input_grad
        try:
            if torch.is_grad_enabled():  # create_graph=True
                grad_x, grad_values = _differentiable_backward(grad, x, values, index, ctx.backend, "dense", needs[:2])
            else:
                # a second backward (retain_graph) after the lease went back: the workspace may hold other values
                weight = ctx.weight if ctx.weight is not None else index.to_dense(values)
                grad_x = grad_values = None
                if needs[0] and _all_finite(grad):
                    grad_x = grad @ weight
                elif needs[0]:  # the product over the nonzeros only: 0 * inf at a structural zero is no product
                    g = grad.contiguous()
                    grad_x = _spmm.run(ctx.backend, g, index.csc_ptr, index.csc_row, values[index.csc_perm], index.n_in)
                if needs[1]:
                    if lease is None:
                        grad_w = (grad.T @ x).contiguous()
                    else:
                        grad_w = torch.mm(grad.T, x, out=lease.workspace.grad_buffer(weight))
                    grad_values = csr_dense_gather(grad_w, index.row_ptr, index.col_idx)
        finally:
            if lease is not None:
                lease.release()
                ctx.lease = ctx.weight = None
        grad_bias = grad.sum(0) if ctx.has_bias and needs[2] else None
        return grad_x, grad_values, grad_bias, *([None] * 8)


def _dense_path(x, values, index: CSRIndex, bias, workspace, backend: str, training: bool) -> torch.Tensor:
    tensors = (index.row_ptr, index.col_idx, index.csc_ptr, index.csc_row, index.csc_perm)
    if torch.compiler.is_compiling():  # traced: a fresh weight, no writes behind autograd's back
        weight = index.to_dense(values.detach())
        return _DenseMaskedLinear.apply(x, values, bias, weight, *tensors, backend, None)
    lease = workspace.acquire() if workspace is not None else None
    try:
        if lease is None:  # a one-off call, or the workspace is busy: a weight (and gradient buffer) of its own
            if workspace is not None:
                warn_once(
                    "sparsekern.sparse_linear: the layer's dense workspace is busy (another thread, or an earlier "
                    "call whose backward has not run yet); such calls build a dense weight of their own (slower)"
                )
            weight = DenseWorkspace().weight(index, values, training=True)
        else:
            weight = lease.workspace.weight(index, values, training)
        y = _DenseMaskedLinear.apply(x, values, bias, weight, *tensors, backend, lease if training else None)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    if lease is not None and not training:  # a training call's backward gives it back
        lease.release()
    return y


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
    if torch.is_grad_enabled():  # create_graph=True
        index = CSRIndex(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, ctx.n_out, x.shape[1])
        grad_x, grad_values = _differentiable_backward(
            grad, x, values, index, ctx.backend, "sparse", ctx.needs_input_grad[:2]
        )
    if ctx.needs_input_grad[0] and grad_x is None:
        grad_x = _spmm.run(ctx.backend, grad, csc_ptr, csc_row, values[csc_perm], x.shape[1])
    if ctx.needs_input_grad[1] and grad_values is None:
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


class _SparseLinearEll(torch.autograd.Function):
    """The sparse path on a constant fan-in (ELL) weight: forward by ell_spmm, dX by ell_spmm_t (straight from the
    row-major columns: no transposed index) or, from ``ELL_DX_CSC_BATCH`` rows up, by spmm through the CSC (faster
    there), dvalues by ell_sddmm. The CSR index rides along only for a backward
    with create_graph=True, which builds its gradients from differentiable sparse_linear calls."""

    @staticmethod
    def forward(ctx, x, values, bias, row_ptr, col_idx, csc_ptr, csc_row, csc_perm, n_in, width, backend):
        n_out = row_ptr.shape[0] - 1
        cols = col_idx.view(n_out, width)
        y = _ell_spmm(backend, x, cols, values.view(n_out, width))
        if bias is not None:
            y = y.add_(bias)
        ctx.save_for_backward(x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm)
        ctx.n_in, ctx.width, ctx.backend, ctx.has_bias = n_in, width, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, values, row_ptr, col_idx, csc_ptr, csc_row, csc_perm = ctx.saved_tensors
        n_out, needs = row_ptr.shape[0] - 1, ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = grad_values = grad_bias = None
        if torch.is_grad_enabled():  # create_graph=True
            index = CSRIndex(row_ptr, col_idx, csc_ptr, csc_row, csc_perm, n_out, ctx.n_in)
            grad_x, grad_values = _differentiable_backward(grad, x, values, index, ctx.backend, "sparse", needs[:2])
        else:
            cols = col_idx.view(n_out, ctx.width)
            if needs[0] and ell_dx_takes_csc(ctx.backend, grad.shape[0]):
                grad_x = _spmm.run(ctx.backend, grad, csc_ptr, csc_row, values[csc_perm], ctx.n_in)
            elif needs[0]:
                grad_x = _ell_spmm_t(ctx.backend, grad, cols, values.view(n_out, ctx.width), ctx.n_in)
            if needs[1]:
                grad_values = _ell_sddmm(ctx.backend, grad, x, cols).view(-1)
        if ctx.has_bias and needs[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_values, grad_bias, *([None] * 8)


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    index: CSRIndex,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    path: str = "auto",
    workspace: DenseWorkspace | None = None,
    kernels: str = "auto",
    fan_in: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a sparse ``W`` given by its nonzero ``values`` and a :class:`CSRIndex`.

    Differentiable in x, values and bias, to any order (a backward with ``create_graph=True`` builds its
    gradients from differentiable sparse ops); dX runs through the transposed index and dvalues only at the
    nonzeros (never the dense weight gradient) on the sparse path.

    Non-finite numbers: the product runs over the stored positions only, as ``torch.sparse`` does. A stored
    value is a real product even when it is zero (0 * inf = NaN there); an unstored position contributes
    nothing, whatever x holds. Both paths follow this rule: the dense path checks x (and, in the backward, the
    output gradient) for inf/NaN with one ``isfinite().all()`` (a device sync on a GPU) and takes the sparse
    kernels for a call that has any. Under ``torch.compile`` that check is not traced: the dense path there
    gives the dense product's NaN (0 * inf) at structural zeros.

    Autocast: under ``torch.autocast`` on x's device, x, values and bias are cast to the autocast dtype as
    ``F.linear`` casts them (float64 is left alone), and gradients flow back to the original (fp32) values.

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
            Safe to share between threads (a busy workspace is not waited for: the call uses its own weight).
        kernels: the sparse path's kernel family. "auto": when every row of the index holds the same number k >= 1
            of nonzeros (constant fan-in), the ELL kernels (``ell_spmm`` forward, ``ell_spmm_t`` for dX without the
            transposed index up to ``ELL_DX_CSC_BATCH`` rows, spmm through the CSC from there, ``ell_sddmm`` for
            dvalues) on ``col_idx.view(n_out, k)``; otherwise the CSR kernels.
            "csr": always the CSR kernels (for comparison and debugging). "ell": the ELL kernels, and ValueError
            naming the first row whose count differs when the rows are unequal. Which rows are equal is read off
            ``row_ptr`` once per index (O(n_out)) and remembered until it changes.
        fan_in: the count of nonzeros in every row, where the caller knows the rows are equal (SparseLinear passes
            it). Only read under ``torch.compile``, which cannot read ``row_ptr`` while tracing: there "auto" takes
            the ELL kernels only when it is given, and "ell" without it raises. Eager calls read the index.

    Returns:
        (..., n_out) in x's dtype.

    Raises:
        ValueError: ``kernels="ell"`` on an index whose rows hold different numbers of nonzeros (names the first
            such row); a bad ``kernels``, ``path`` or ``backend``; shapes that do not fit the index.
        TypeError: a dtype other than float32, bfloat16, float16 or float64, or a ``values``/``bias`` dtype
            other than x's.
    """
    fn = "sparse_linear"
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, values, bias = (_autocast(t, dtype) for t in (x, values, bias))
        with torch.autocast(device_type, enabled=False):
            return sparse_linear(
                x, values, index, bias, backend=backend, path=path, workspace=workspace, kernels=kernels, fan_in=fan_in
            )
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
    width = choose_kernels(kernels, index, fan_in, fn)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, index.n_in).contiguous()
    training = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)
    chosen_path = choose_path(path, index, x2, chosen, training)
    if chosen_path == "dense" and not _all_finite(x2):  # the dense GEMM would add 0 * inf at structural zeros
        warn_once(f"sparsekern.{fn}: x holds inf or NaN, so such calls take the sparse kernels, not the dense path")
        chosen_path = "sparse"
    if chosen_path == "dense":
        return _dense_path(x2, values, index, bias, workspace, chosen, training).reshape(*lead, index.n_out)
    if width is not None and kernels == "auto" and not auto_takes_ell(chosen, x2.shape[0]):
        width = None
    ell = ell_backend(fn, x2, chosen, backend, kernels) if width is not None else None
    if ell is not None and not (training or (bias is not None and bias.requires_grad and torch.is_grad_enabled())):
        # inference: the kernel alone (an autograd.Function costs ~5 us a call, felt at online batch sizes)
        y = _ell_spmm(ell, x2, index.col_idx.view(index.n_out, width), values.contiguous().view(index.n_out, width))
        return (y if bias is None else y.add_(bias)).reshape(*lead, index.n_out)
    if ell is not None:
        tensors = (index.row_ptr, index.col_idx, index.csc_ptr, index.csc_row, index.csc_perm)
        y = _SparseLinearEll.apply(x2, values.contiguous(), bias, *tensors, index.n_in, width, ell)
        return y.reshape(*lead, index.n_out)
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


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in the autocast dtype, as autocast casts an op's inputs: floating tensors other than float64."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t
