"""``sparsekern::outer_topk``: the k largest |g.T @ x| outside an excluded pattern, never forming g.T @ x."""

from __future__ import annotations

import functools
import operator

import torch

from .._csr import VALUE_DTYPES, CSRIndex, check_csr, check_index, csr_from_mask
from .._distributed import all_gather_batch
from .._validate import all_finite, check_tensor
from ..reference import outer_topk_reference
from ._backend import resolve_tensor

# Flat indices are packed next to the 31-bit score key in one 64-bit sort key by every kernel (outer_topk.h).
MAX_POSITIONS = 1 << 33
PRECISIONS = ("fast", "exact")


def check_precision(fn: str, precision, role: str = "") -> str:
    """``precision`` if it is one of PRECISIONS, else ValueError naming ``fn`` (and ``role``, what it sets)."""
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be one of {', '.join(map(repr, PRECISIONS))}{role}, got {precision!r}")
    return precision


@torch.library.register_fake("sparsekern::outer_topk")
def _fake(x, g, k, row_ptr, col_idx, fast=False):
    return x.new_empty(k, dtype=torch.int64), x.new_empty(k, dtype=torch.float32)


@functools.cache
def _triton_op():
    # Defined on first use, so TRITON_INTERPRET (read when Triton kernels are defined) can be set late.
    from ..kernels.outer_topk import _outer_topk_fwd

    @torch.library.triton_op("sparsekern::outer_topk_triton", mutates_args=())
    def outer_topk_triton(
        x: torch.Tensor, g: torch.Tensor, k: int, row_ptr: torch.Tensor, col_idx: torch.Tensor, fast: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _outer_topk_fwd(x, g, k, row_ptr, col_idx, fast=fast)

    # The body reads histograms back to pick thresholds, so fake tensors take the shape function instead.
    outer_topk_triton.register_fake(_fake)
    return outer_topk_triton


def run(backend: str, x, g, k: int, row_ptr, col_idx, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """outer_topk on a resolved backend, without argument checks (the exclusion is valid: see
    :func:`exclusion_csr`; the Triton and CUDA kernels trust it, the C++ one scans it again). ``fast``:
    precision="fast" (False: "exact")."""
    if backend == "reference":
        return outer_topk_reference(x, g, k, row_ptr, col_idx, fast=fast)
    if backend == "triton":
        return _triton_op()(x, g, k, row_ptr, col_idx, fast)
    return torch.ops.sparsekern.outer_topk(x, g, k, row_ptr, col_idx, fast)


def exclusion_csr(fn: str, exclude, n_out: int, n_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The excluded pattern as a valid CSR (row_ptr int64 (n_out + 1), col_idx int32, columns ascending and unique
    within each row), from None, a bool (n_out, n_in) mask, a sparse CSR tensor or a
    :class:`sparsekern.CSRIndex`. A sparse CSR tensor is validated in O(nnz) (torch does not check its invariants
    by default), a CSRIndex unless it was checked before and is unchanged. Never builds anything (n_out, n_in)-sized.
    """
    shape = (n_out, n_in)
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        return torch.zeros(n_out + 1, dtype=torch.int64, device=device), empty
    if isinstance(exclude, CSRIndex):
        if (exclude.n_out, exclude.n_in) != shape:
            raise ValueError(
                f"{fn}: exclude must be (n_out, n_in) = {shape} (g's columns, x's columns), "
                f"got a CSRIndex of {(exclude.n_out, exclude.n_in)}"
            )
        check_index(fn, exclude, name="exclude", full=False)
        if exclude.row_ptr.device != device:
            raise ValueError(f"{fn}: exclude must be on x's device {device}, got {exclude.row_ptr.device}")
        return exclude.row_ptr, exclude.col_idx
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(
            f"{fn}: exclude must be None, a bool tensor, a sparse CSR tensor or a sparsekern CSRIndex, "
            f"got {type(exclude).__name__}"
        )
    if exclude.device != device:
        raise ValueError(f"{fn}: exclude must be on x's device {device}, got {exclude.device}")
    if tuple(exclude.shape) != shape:
        raise ValueError(
            f"{fn}: exclude must have shape (n_out, n_in) = {shape} (g's columns, x's columns), "
            f"got {tuple(exclude.shape)}"
        )
    if exclude.layout == torch.sparse_csr:
        row_ptr, col_idx = exclude.crow_indices().contiguous(), exclude.col_indices().contiguous()
        check_csr(fn, row_ptr, col_idx, n_out, n_in, name="exclude", any_int=True)  # before narrowing to int32
        return row_ptr.to(torch.int64), col_idx.to(torch.int32)
    if exclude.layout != torch.strided:
        raise TypeError(f"{fn}: exclude must be a dense bool mask or a sparse CSR tensor, got layout {exclude.layout}")
    if exclude.dtype != torch.bool:
        raise TypeError(f"{fn}: exclude must be a bool mask (True: excluded), got dtype {exclude.dtype}")
    return csr_from_mask(exclude)  # row-major order: valid


def outer_topk(
    x: torch.Tensor,
    g: torch.Tensor,
    k: int,
    *,
    exclude=None,
    precision: str = "fast",
    backend: str = "auto",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of |g.T @ x| outside ``exclude``, without ever forming g.T @ x (RigL's grow).

    For a linear layer with inputs x and output gradients g, ``|g.T @ x|`` is |dL/dW|; RigL grows the inactive
    connections where it is largest. This computes it tile by tile, keeps only candidates above a threshold and
    finishes with an exact top-k: nothing of size n_out * n_in is allocated (the caller's own bool ``exclude``
    mask aside), and peak extra memory is O(k + tiles in flight) besides the O(nnz) exclusion index (on the CPU
    at 16384 x 16384, B = 256, k = 8M: about 170 MiB, where the dense scores alone take 1 GiB).

    The score of (o, i) is ``|s|`` with ``s = sum_b g[b, o] * x[b, i]``, x and g converted to float32 first;
    the result is the exact top-k of the scores the chosen ``precision`` computes, ties by the lower index:

    * ``"exact"``: s summed in float32 in a fixed order, b = 0, 1, ..., B - 1 from +0, each product rounded to
      float32 and then added (never a fused multiply-add). Every backend (C++, Triton, CUDA, reference) computes
      exactly these bits, so results are identical across backends, not merely close.
    * ``"fast"`` (default): each device's fastest arithmetic. C++ on AVX2 and AVX-512: s = fma(g[b, o], x[b, i],
      s) for b in order from +0, one rounding per step (the same bits on both ISAs and for every thread count);
      the portable C++ path (no FMA) computes the exact scores; Triton and CUDA: tensor cores (``tl.dot`` / WMMA
      with float32 accumulation; float32 inputs as TF32, bf16 and fp16 as they are; CUDA below sm_80 computes the
      exact scores, warned once). The same inputs give the same bits run to run and on every rank of one backend.
      The reference computes s in float64 and rounds |s| once.
      Bound (C++): every float32 sum of B products in any order, fused or not, is within
      ``gamma_B * sum_b |g[b, o] * x[b, i]|`` of s (``gamma_B = B u / (1 - B u)``, ``u = 2**-24``), so each returned
      position's float64 score is at least the float64 k-th largest candidate score minus its own bound and the
      largest bound among the candidates (tests/test_outer_topk.py checks exactly this). Tensor cores add the TF32
      rounding of float32 inputs: ``(2**-9 + 2**-19 + (B + 1) 2**-22) * sum_b |g[b, o] x[b, i]|`` (see
      sparsekern/kernels/outer_topk.py; tests/test_outer_topk_fast_gpu.py checks it).

    float64 inputs run the reference: "exact" sums in float64 in batch order, "fast" by a float64 matmul; |s| is
    rounded to float32 once.

    Args:
        x: (B, n_in) float32, bfloat16, float16 (or float64): the layer's inputs.
        g: (B, n_out), same dtype: the gradients of the layer's outputs.
        k: how many positions to return, 0 <= k <= n_out * n_in - (excluded positions); any integer
            (``operator.index``: a numpy integer, a 0-d integer tensor).
        exclude: positions that may not be returned (RigL: the active connections): None, a bool
            (n_out, n_in) mask (True = excluded), a sparse CSR tensor (its pattern is excluded, whatever its
            values) or a :class:`sparsekern.CSRIndex` (a ``SparseLinear``'s index). A CSR pattern must be
            valid: crow_indices / row_ptr nondecreasing from 0 to nnz, columns in [0, n_in), ascending and unique
            within each row (torch's own CSR invariants; checked in O(nnz), a ValueError names the fault).
        precision: "fast" (default) or "exact", as described above.
        backend: "auto" (C++ on CPU tensors, Triton on CUDA tensors), "cpu", "triton", "cuda" or "reference".
        group: a ``torch.distributed`` process group: x and g of every rank are all-gathered (batch sizes may
            differ) and every rank returns the result for the concatenated batch (in rank order), identical on
            all ranks. n_in, n_out, dtype and k must agree across ranks. When any rank's arguments fail their
            checks, every rank raises (that rank its own error, the others one naming it) and none is left waiting
            in a collective.

    Returns:
        index: int64 (k): flat positions o * n_in + i, sorted by score descending, equal scores by ascending
        index (so results are deterministic).
        score: float32 (k): their scores.

    Raises:
        TypeError: x, g or exclude is of an unsupported type or dtype; k is not an integer.
        ValueError: shapes, batch sizes, devices or dtypes disagree; k is not in [0, candidates]; exclude is
            not a valid CSR pattern;
            precision is not "fast" or "exact";
            x or g holds inf or NaN; the score of a position not excluded overflows to NaN (inf - inf);
            n_out * n_in exceeds 2**33 (kernels pack the flat index into 33 bits).

    Example::

        >>> x, g = torch.randn(64, 300), torch.randn(64, 200)     # a 300 -> 200 layer, batch 64
        >>> active = torch.rand(200, 300) < 0.1                   # its current connections
        >>> index, score = sparsekern.outer_topk(x, g, 1000, exclude=active)
        >>> rows, cols = index // 300, index % 300                # the 1000 connections to grow
    """
    fn = "outer_topk"
    try:
        backend, k, row_ptr, col_idx = _checked(fn, x, g, k, exclude, backend)
        check_precision(fn, precision)
    except Exception as exc:
        if group is None:
            raise
        all_gather_batch(fn, group, x, g, k, failure=exc)  # raises on every rank, this one its own error
        raise
    if group is not None:
        x, g = all_gather_batch(fn, group, x, g, k)
    # The C++ kernel checks it itself, in one sequential pass (a small-batch grow costs little more than that).
    for name, t in (("x", x), ("g", g)) if backend != "cpu" or group is not None else ():
        if not all_finite(t):
            raise ValueError(f"{fn}: {name} must be finite, got inf or NaN" + (" (on some rank)" if group else ""))
    return run(backend, x.contiguous(), g.contiguous(), k, row_ptr, col_idx, fast=precision == "fast")


def _checked(fn: str, x, g, k, exclude, backend) -> tuple[str, int, torch.Tensor, torch.Tensor]:
    """outer_topk's checks of this rank's arguments; returns the backend, k as an int and the exclusion's CSR."""
    check_tensor(fn, "x", x, dtypes=VALUE_DTYPES, ndim=2)
    check_tensor(fn, "g", g, dtypes=VALUE_DTYPES, ndim=2)
    if g.dtype != x.dtype:
        raise ValueError(f"{fn}: g must have x's dtype {x.dtype}, got {g.dtype}")
    if g.device != x.device:
        raise ValueError(f"{fn}: x and g must be on one device, got x on {x.device}, g on {g.device}")
    if g.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: x (B, n_in) and g (B, n_out) must have the same batch size B, got {x.shape[0]} and {g.shape[0]}"
        )
    if isinstance(k, bool):
        raise TypeError(f"{fn}: k must be an int, got bool")
    try:
        k = operator.index(k)  # any integer: numpy's, a 0-d integer tensor
    except TypeError:
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}") from None
    if k < 0:
        raise ValueError(f"{fn}: k must be >= 0, got {k}")
    n_out, n_in = g.shape[1], x.shape[1]
    if n_out * n_in > MAX_POSITIONS:
        raise ValueError(f"{fn}: n_out * n_in must be at most 2**33, got {n_out} * {n_in} = {n_out * n_in}")
    backend = resolve_tensor(fn, x, backend)
    row_ptr, col_idx = exclusion_csr(fn, exclude, n_out, n_in, x.device)
    candidates = n_out * n_in - col_idx.numel()
    if k > candidates:
        raise ValueError(
            f"{fn}: k must be at most the number of candidates n_out * n_in - excluded = {n_out} * {n_in} - "
            f"{col_idx.numel()} = {candidates}, got {k}"
        )
    return backend, k, row_ptr, col_idx
