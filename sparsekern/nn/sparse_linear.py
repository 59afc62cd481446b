"""SparseLinear: a drop-in ``nn.Linear`` that stores and trains only its nonzero weights."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .._csr import (
    CSRIndex,
    _mark_checked,
    check_csr,
    csr_from_flat,
    is_checked,
    merge_sorted,
    random_flat,
    sorted_contains,
)
from .._validate import check_tensor
from ..ops.semi24_mask import check_finite_weight
from ..ops.sparse_linear import KERNELS, DenseWorkspace, choose_kernels, ell_width, sparse_linear

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_sparsity(fn: str, sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{fn}: sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _check_mask(fn: str, mask, shape: tuple[int, int]) -> torch.Tensor:
    check_tensor(fn, "mask", mask, dtypes=(torch.bool,), ndim=2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{fn}: mask must have shape {shape} (out_features, in_features), got {tuple(mask.shape)}")
    return mask


def _nnz(sparsity: float, numel: int) -> int:
    return int(round((1.0 - sparsity) * numel))


@dataclass(frozen=True)
class TopologyUpdate:
    """What :meth:`SparseLinear.update_topology` did, so per-nonzero state (optimizer moments) can follow.

    old_to_new: int64 (old nnz): the new slot of every old value slot, -1 where the connection was dropped.
    grown: int64: the new slots of the connections that were added (their values start at 0).
    nnz: the number of nonzeros after the update.
    """

    old_to_new: torch.Tensor
    grown: torch.Tensor
    nnz: int

    @classmethod
    def merge(
        cls, old_flat: torch.Tensor, keep: torch.Tensor, added: torch.Tensor
    ) -> tuple[torch.Tensor, TopologyUpdate]:
        """(new flat indices, update) for keeping the old connections ``old_flat[keep]`` and adding ``added``.

        old_flat: int64 ascending (the current connections); keep: bool aligned with it; added: int64 ascending,
        none of them kept. Unchecked; one radix sort of the new connections' flat indices."""
        new_flat, at_kept, at_added = merge_sorted(old_flat[keep], added)
        old_to_new = torch.full_like(old_flat, -1).masked_scatter_(keep, at_kept)
        return new_flat, cls(old_to_new, at_added, new_flat.numel())

    @functools.cached_property
    def _moves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(old slots, new slots) of the kept connections, computed once for every tensor :meth:`apply` carries."""
        old = (self.old_to_new >= 0).nonzero().reshape(-1)
        return old, self.old_to_new.index_select(0, old)

    def apply(self, old: torch.Tensor) -> torch.Tensor:
        """Carry a per-nonzero tensor (old nnz, ...) over to the new topology: kept slots move, new slots are 0."""
        if old.shape[:1] != self.old_to_new.shape:
            raise ValueError(
                f"TopologyUpdate.apply: expected a tensor of {self.old_to_new.numel()} rows, got {tuple(old.shape)}"
            )
        src, dst = self._moves
        return old.new_zeros((self.nnz, *old.shape[1:])).index_copy_(0, dst, old.index_select(0, src))


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with a sparse ``W``: only the nonzeros are parameters (``values``, in CSR order).

    A drop-in for ``nn.Linear`` whose optimizer state is nnz-sized. The forward runs the sparse kernels
    (``sparsekern.ops.spmm``) where they beat a dense GEMM at this density, and otherwise scatters ``W``
    and runs a dense GEMM; the backward computes dX through a transposed index and the weight gradient only
    at the nonzeros. The index is rebuilt only when :meth:`update_topology` changes the connections.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        sparsity: fraction of zero weights; the nonzeros are placed uniformly at random (exact count
            ``round((1 - sparsity) * out * in)``).
        mask: a bool (out_features, in_features) mask instead of ``sparsity``.
        device, dtype: as ``nn.Linear`` (float32, bfloat16, float16; float64 runs the reference kernels).
        kernels: the sparse path's kernels: "auto" (default: the constant fan-in (ELL) kernels whenever every row
            holds the same number of nonzeros, see :attr:`fan_in`, else the CSR kernels; a topology update that
            makes the rows unequal moves the layer to CSR, and one that evens them out moves it back), "csr"
            (always CSR, for comparison and debugging) or "ell" (ValueError naming the first unequal row, here and
            in any forward after an update that made the rows unequal). A plain attribute: it may be changed
            between calls.

    Inputs of any leading shape ``(..., in_features)``. Values are initialised like ``nn.Linear``'s weight
    (uniform in ±1/sqrt(in_features)). Like :func:`sparsekern.ops.sparse_linear.sparse_linear`: differentiable
    to any order, follows ``torch.autocast``, skips structural zeros for inf/NaN inputs on both paths, and may be
    called from many threads at once. ``weight`` is a dense copy for code that reads it (see there); copies and
    pickles carry the parameters and the index, not the dense path's cached weight.

    Example::

        >>> layer = sparsekern.nn.SparseLinear(768, 3072, sparsity=0.9)
        >>> y = layer(torch.randn(32, 768))
        >>> layer.values.shape, layer.sparsity
        (torch.Size([235930]), 0.8999998304578993)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float | None = None,
        mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
        kernels: str = "auto",
    ):
        super().__init__()
        fn = "SparseLinear"
        if kernels not in KERNELS:
            raise ValueError(f"{fn}: kernels must be one of {KERNELS}, got {kernels!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        if dtype not in _DTYPES:
            raise TypeError(f"{fn}: dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        if (sparsity is None) == (mask is None):
            raise ValueError(f"{fn}: give exactly one of sparsity= or mask=")
        self.in_features, self.out_features = in_features, out_features
        if mask is None:  # uniform random positions, without anything of n_out * n_in entries
            numel = in_features * out_features
            flat = random_flat(numel, _nnz(_check_sparsity(fn, sparsity), numel), device=device)
            row_ptr, col_idx = csr_from_flat(flat, out_features, in_features)
            del flat  # 8 bytes per nonzero, not needed by the transposed index built next
            index = CSRIndex.from_csr(row_ptr, col_idx, in_features)
        else:
            index = CSRIndex.from_mask(_check_mask(fn, mask, (out_features, in_features)).to(device))
        self._set_index(index)
        self.kernels = kernels
        if kernels == "ell":
            choose_kernels(kernels, index, fn=fn)  # raises naming the first unequal row
        bound = 1.0 / math.sqrt(in_features)
        self.values = nn.Parameter(torch.empty(self.index.nnz, device=device, dtype=dtype).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
            if bias
            else None
        )

    # -- index -------------------------------------------------------------------------------------------
    def _set_index(self, index: CSRIndex) -> None:
        # CSR is the topology (saved in the state_dict); the CSC is derived and rebuilt on load.
        self.register_buffer("row_ptr", index.row_ptr)
        self.register_buffer("col_idx", index.col_idx)
        self.register_buffer("csc_ptr", index.csc_ptr, persistent=False)
        self.register_buffer("csc_row", index.csc_row, persistent=False)
        self.register_buffer("csc_perm", index.csc_perm, persistent=False)
        self._workspace = DenseWorkspace()  # the dense path's weight, valid for this topology only
        # the count of nonzeros in every row when they are equal (the ELL kernels' width), else None; a Python int,
        # so torch.compile specialises on it (a traced forward cannot read row_ptr)
        self._fan_in = ell_width(index)

    def _checked_index(self) -> CSRIndex:
        """The index for a forward. The index buffers are public tensors: when one of them was modified in place or
        replaced since it was last checked (version counters, compared in O(1)), the CSR is validated in O(nnz)
        (ValueError naming the fault) and the CSC and the dense workspace are rebuilt from it, so an edited
        topology is followed or refused, never read out of bounds. Writes that bypass the version counter
        (``.data``) are not seen here; the C++ kernels' own scan still refuses an invalid index."""
        index = self.index
        if torch.compiler.is_compiling() or is_checked(index):
            return index
        check_csr("SparseLinear", self.row_ptr, self.col_idx, self.out_features, self.in_features)
        self._set_index(CSRIndex._build(self.row_ptr, self.col_idx, self.in_features))
        return self.index

    @property
    def index(self) -> CSRIndex:
        return CSRIndex(
            self.row_ptr, self.col_idx, self.csc_ptr, self.csc_row, self.csc_perm, self.out_features, self.in_features
        )

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def fan_in(self) -> int | None:
        """The number of nonzeros in every row when all rows hold the same number (constant fan-in: the sparse
        path can run the ELL kernels), else None."""
        return self._fan_in

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    @property
    def mask(self) -> torch.Tensor:
        """bool (out_features, in_features): True at the nonzeros."""
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.col_idx.device)
        mask[self.index.rows(), self.col_idx.long()] = True
        return mask

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) int64 tensors aligned with ``values``."""
        return self.index.rows(), self.col_idx.long()

    def flat_indices(self) -> torch.Tensor:
        """row * in_features + col for every nonzero, int64, ascending (CSR order)."""
        return self.index.flat()

    # -- conversions ---------------------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        mask: torch.Tensor | None = None,
        sparsity: float | None = None,
        kernels: str = "auto",
    ):
        """A SparseLinear holding ``linear``'s weights at ``mask`` (or, with ``sparsity``, at its largest |w|;
        ties: lower flat index). ``kernels``: as for the constructor.

        Raises:
            ValueError: with ``sparsity``, a weight is inf or NaN (no magnitude order; ``semi24_mask`` has the
                same rule). With ``mask`` the weights are copied as they are."""
        fn = "SparseLinear.from_dense"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{fn}: linear must be an nn.Linear, got {type(linear).__name__}")
        if (sparsity is None) == (mask is None):
            raise ValueError(f"{fn}: give exactly one of sparsity= or mask=")
        weight = linear.weight.detach()
        if mask is None:
            check_finite_weight(fn, "linear.weight", weight)
            keep = _nnz(_check_sparsity(fn, sparsity), weight.numel())
            order = weight.double().abs().flatten().argsort(descending=True, stable=True)[:keep]
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[order] = True
            mask = mask.view_as(weight)
        else:
            mask = _check_mask(fn, mask, tuple(weight.shape)).to(weight.device)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            mask=mask,
            device=weight.device,
            dtype=weight.dtype,
            kernels=kernels,
        )
        with torch.no_grad():
            layer.values.copy_(weight[mask])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight with zeros off the mask (differentiable in ``values``)."""
        return self.index.to_dense(self.values)

    @property
    def weight(self) -> torch.Tensor:
        """A dense (out_features, in_features) copy of the weight, zeros off the mask, built on every access.

        For code that reads ``.weight`` of a linear layer (shape, dtype, or the numbers: torch's
        TransformerEncoderLayer fast path, Hugging Face helpers). It is a plain tensor without grad and shares
        no memory with the layer: writing into it changes nothing, and assigning ``layer.weight`` raises. Train
        and edit ``values`` instead; :meth:`dense_weight` is the differentiable version.

        torch's ``nn.TransformerEncoderLayer`` reads ``linear1.weight`` and ``linear2.weight`` on every call in
        eval mode (a copy each time) to decide on its fused fast path. With grad enabled it then runs this
        layer's own forward; under ``torch.no_grad()`` it takes the fast path, which multiplies by these copies
        with dense kernels: correct, but not sparse. ``torch.backends.mha.set_fastpath_enabled(False)`` skips
        both the fast path and the copies.
        """
        return self.index.to_dense(self.values.detach())

    def __setattr__(self, name, value):
        if name == "weight":  # nn.Module would register a Parameter nobody reads, or report a missing setter
            raise AttributeError(
                "SparseLinear.weight is a read-only dense copy of the weight; set SparseLinear.values (the "
                "nonzeros, in CSR order), or build a new layer with SparseLinear.from_dense"
            )
        super().__setattr__(name, value)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.index.to_dense(self.values.detach()))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._checked_index()  # first: it may renew the workspace
        return sparse_linear(
            x, self.values, index, self.bias, workspace=self._workspace, kernels=self.kernels, fan_in=self._fan_in
        )

    def __setstate__(self, state):  # a layer pickled before ``kernels`` existed runs as "auto"
        super().__setstate__(state)
        if "kernels" not in self.__dict__:
            self.kernels = "auto"
        if "_fan_in" not in self.__dict__:
            self._fan_in = ell_width(self.index)

    def extra_repr(self) -> str:
        fan_in = "" if self._fan_in is None else f", fan_in={self._fan_in}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.sparsity:.4f}, nnz={self.nnz}, kernels={self.kernels!r}{fan_in}"
        )

    # -- topology ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_topology(self, *, drop: torch.Tensor, grow: torch.Tensor) -> TopologyUpdate:
        """Remove the connections ``drop`` and add ``grow`` (flat indices row * in_features + col).

        Kept connections keep their values; added ones start at 0; a connection both dropped and grown
        stays and keeps its value (RigL's rule). ``values`` stays the same Parameter object (its data is
        replaced), so optimizers keep tracking it; use the returned :class:`TopologyUpdate` to carry
        per-nonzero optimizer state over (``update.apply(state)``). Atomic: on bad arguments a ValueError is
        raised and nothing changes.

        Raises:
            ValueError: indices out of range or repeated, ``drop`` naming an inactive connection, or ``grow``
                naming an active connection that is not also dropped.
        """
        fn = "SparseLinear.update_topology"
        numel = self.out_features * self.in_features
        old_flat = self.flat_indices()
        device = old_flat.device
        # Sorted flat indices and binary searches throughout: O(nnz log nnz) time and memory, never a tensor of
        # n_out * n_in entries (16384^2 would need GiBs), so a RigL step stays as lean as the fused grow.
        sets = {}
        for name, idx in (("drop", drop), ("grow", grow)):
            check_tensor(fn, name, idx, dtypes=(torch.int64, torch.int32), ndim=1)
            idx = idx.to(device=device, dtype=torch.int64).sort().values
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
                raise ValueError(f"{fn}: {name} indices must lie in [0, {numel}), got [{int(idx[0])}, {int(idx[-1])}]")
            if bool((idx[1:] == idx[:-1]).any()):
                raise ValueError(f"{fn}: {name} has repeated indices")
            sets[name] = idx
        drop_sorted, grow_sorted = sets["drop"], sets["grow"]
        drop_active = sorted_contains(old_flat, drop_sorted)
        if not bool(drop_active.all()):
            bad = int(drop_sorted[~drop_active][0])
            raise ValueError(f"{fn}: drop names inactive connection {bad} (row {bad // self.in_features})")
        grow_active = sorted_contains(old_flat, grow_sorted)
        clash = grow_active & ~sorted_contains(drop_sorted, grow_sorted)
        if bool(clash.any()):
            bad = int(grow_sorted[clash][0])
            raise ValueError(f"{fn}: grow names connection {bad}, which is active and not dropped")

        keep = ~sorted_contains(drop_sorted, old_flat) | sorted_contains(grow_sorted, old_flat)  # a regrown one stays
        new_flat, update = TopologyUpdate.merge(old_flat, keep, grow_sorted[~grow_active])
        self._apply_topology(new_flat, update)
        return update

    @torch.no_grad()
    def _apply_topology(self, flat: torch.Tensor, update: TopologyUpdate) -> None:
        """Make ``flat`` (int64 row * in_features + col, ascending, unique, in range) the connections and carry
        ``values`` and its gradient over by ``update`` (from the current connections to ``flat``).

        Unchecked: the one path by which the topology changes, for :meth:`update_topology` (after its checks)
        and for the training methods, whose plans are right by construction. Everything is built before the
        layer changes, so an error (out of memory) leaves it as it was."""
        self._swap_topology(self._stage_topology(flat, update))

    @torch.no_grad()
    def _stage_topology(self, flat: torch.Tensor, update: TopologyUpdate) -> tuple:
        """Build what :meth:`_apply_topology` installs (index, carried values and gradient) without changing the
        layer: a training method stages every layer before it swaps any in, so a failure changes nothing."""
        index = CSRIndex.from_flat(flat, self.out_features, self.in_features)
        new_values = update.apply(self.values.data)
        new_grad = update.apply(self.values.grad) if self.values.grad is not None else None
        return index, new_values, new_grad, self._resizer(new_values.shape)

    def _swap_topology(self, staged: tuple) -> None:
        """Install a :meth:`_stage_topology` result: assignments only, nothing that can fail."""
        index, new_values, new_grad, resizer = staged
        self._set_index(index)
        self._resize_values(new_values, resizer)
        self.values.grad = new_grad

    def _resizer(self, shape: torch.Size) -> torch.Tensor | None:
        """What :meth:`_resize_values` needs to give ``values`` another nonzero count (None: the count is the same)."""
        if shape == self.values.shape:
            return None
        other = torch.float32 if self.values.dtype == torch.float64 else torch.float64
        return torch.empty(0, dtype=other, device=self.values.device)

    def _resize_values(self, new_values: torch.Tensor, resizer: torch.Tensor | None) -> None:
        """``values.data = new_values`` (the same Parameter, so optimizers keep it). When the count changes, first a
        tensor of another dtype: autograd caches the parameter's gradient accumulator with its shape for as long as
        a graph holds it (a user's ``loss`` kept across ``step()``), and a shape change alone does not reset that
        cache (``.data`` assignment resets it on a dtype change only), so the next backward would fail its shape
        check (got the new count, expected the old)."""
        if resizer is not None:
            self.values.data = resizer
        self.values.data = new_values

    # -- state_dict: the topology may differ from this layer's current one ----------------------------------
    def _index_to_load(self, state_dict, prefix) -> CSRIndex | None:
        """Checks everything this layer loads from ``state_dict`` before any of it is installed, so a failed load
        leaves the layer as it was: the CSR (valid for this layer's shape: no repeated or unsorted columns in a
        row), values (one per nonzero) and bias (out_features). Returns the new index on this layer's device (from
        copies of the loaded tensors), None when ``state_dict`` holds no topology."""
        fn = "SparseLinear.load_state_dict"
        name = prefix.rstrip(".")
        what = f"{name}'s " if name else ""
        row_ptr, col_idx = state_dict.get(prefix + "row_ptr"), state_dict.get(prefix + "col_idx")
        if (row_ptr is None) != (col_idx is None):
            absent = "col_idx" if col_idx is None else "row_ptr"
            raise ValueError(f"{fn}: {what}row_ptr and col_idx must be loaded together, got no {absent}")
        index, nnz = None, self.nnz
        if row_ptr is not None:
            check_csr(fn, row_ptr, col_idx, self.out_features, self.in_features, name=name)
            device = self.row_ptr.device
            index = CSRIndex._build(row_ptr.to(device, copy=True), col_idx.to(device, copy=True), self.in_features)
            nnz = index.nnz
        values = state_dict.get(prefix + "values")
        if values is not None:
            check_tensor(fn, f"{what}values", values, ndim=1)
            if values.numel() != nnz:
                raise ValueError(f"{fn}: {what}values must have one entry per nonzero ({nnz}), got {values.numel()}")
        elif nnz != self.nnz:
            raise ValueError(
                f"{fn}: {what}values is missing, but the loaded topology has {nnz} nonzeros where the layer has "
                f"{self.nnz}"
            )
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is not None:
            check_tensor(fn, f"{what}bias", bias, ndim=1)
            if bias.numel() != self.out_features:
                raise ValueError(f"{fn}: {what}bias must have {self.out_features} entries, got {bias.numel()}")
        return index

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        index = self._index_to_load(state_dict, prefix)
        if index is not None:
            self._set_index(index)
            values = state_dict.get(prefix + "values")
            if values is not None and values.shape != self.values.shape:
                self._resize_values(self.values.data.new_empty(values.shape), self._resizer(values.shape))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if index is not None:  # the buffers now hold the checked index (copy_ bumped their versions)
            _mark_checked(self.index, full=True)
