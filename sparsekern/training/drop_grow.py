"""The drop-and-grow step of RigL and SET on one sparse layer (DESIGN §1.2, §4).

Drop the n smallest |w| among the active connections; grow n positions among those not kept by the drop
(largest |dL/dW| for RigL, uniformly at random for SET). A connection both dropped and grown stays and keeps
its value; newly grown connections start at 0 with zero optimizer state. The number of nonzeros is unchanged.

Two kinds of layer are handled alike:
- :class:`~sparsekern.nn.SparseLinear` (the sparse layout): |w| is read from its nnz values; the grow scores come from
  the layer's inputs x and output gradients g through :func:`sparsekern.outer_topk`, so the dense n_out × n_in
  gradient is never formed; micro-batches of one step are concatenated along the batch, which makes the scores
  exactly their sum.
- a module whose dense ``weight`` is masked by a bool ``weight_mask`` buffer (``sparsify(layout="masked")``):
  the grow scores are |weight.grad|, the dense gradient autograd computes anyway (accumulated over micro-batches
  and, under DDP, already all-reduced).

Selection rules, identical for both: ties in |w| drop the lower flat index (row * n_in + col) first; ties in
the grow score grow the lower flat index first.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._csr import CSRIndex, random_positions, sorted_contains
from .._distributed import all_gather_batch
from .._validate import all_finite
from ..nn.sparse_linear import SparseLinear, TopologyUpdate
from ..ops.outer_topk import check_precision as check_outer_topk_precision
from ..ops.outer_topk import outer_topk
from ..reference import outer_topk_scores_reference
from ._optim_state import check_state, stage_state, swap_state
from .structure import Structure
from .structure_fan_in import round_half_up

GROW_MODES = ("gradient", "random")


def is_masked(module: nn.Module) -> bool:
    """True for a module whose dense ``weight`` is masked by a bool ``weight_mask`` buffer of the same shape."""
    mask = getattr(module, "weight_mask", None)
    weight = getattr(module, "weight", None)
    return (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.bool
        and isinstance(weight, nn.Parameter)
        and mask.shape == weight.shape
    )


def check_precision(fn: str, precision) -> str:
    return check_outer_topk_precision(fn, precision, " (outer_topk's grow scores)")


@dataclass(frozen=True)
class DropGrowPlan:
    """One layer's update, computed before anything changes (all flat indices int64, ascending)."""

    dropped: torch.Tensor  # active connections removed by the drop
    grown: torch.Tensor  # positions added by the grow (may include dropped ones, which then stay)
    active: torch.Tensor  # the connections after the update
    update: TopologyUpdate  # old slot -> new slot (in the ascending order of the active connections)
    structure: Structure | None = None  # a structured layer's structure after the update (ablation changes its k)
    ablated: int | None = None  # rows a FanIn(ablation=) update left empty

    @property
    def n(self) -> int:
        return self.dropped.numel()


def smallest(keys: torch.Tensor, n: int, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """bool aligned with the 1-D ``keys``: True at the n smallest, ties to the lower index. O(numel), no sort:
    everything below the n-th smallest key, then the lowest-index ties at it. ``threshold``: that n-th smallest
    key, when the caller has it already (STE finds it faster from the previous step's)."""
    if n == 0:
        return torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    if threshold is None:
        threshold = torch.kthvalue(keys, n).values
    chosen = keys < threshold
    ties = (keys == threshold).nonzero().reshape(-1)[: n - int(torch.count_nonzero(chosen))]
    chosen[ties] = True
    return chosen


def select_drop(values: torch.Tensor, n: int) -> torch.Tensor:
    """bool aligned with ``values`` (the active connections in ascending flat order): True at the n smallest
    |values|, ties to the lower index."""
    return smallest(magnitude_keys(values), n)


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """|values| as a new tensor :func:`smallest` can rank: half precision widened to float32 (exact, and kthvalue
    covers it everywhere)."""
    magnitude = values.detach().abs()
    return magnitude.float() if magnitude.element_size() < 4 else magnitude


def grow_from_scores(scores: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest of a dense score tensor outside ``kept`` (ties: lower flat index), ascending."""
    flat = scores.detach().reshape(-1).abs()  # a new tensor; scores stay untouched
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("drop_and_grow: the gradient holds inf or NaN; no connection was changed")
    flat[kept] = -1.0  # below every |score|
    # the n smallest of -|score| (ties to the lower index) without sorting all n_out * n_in scores
    return smallest(flat.neg_(), n).nonzero().reshape(-1)


def grow_random(kept: torch.Tensor, numel: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct positions drawn uniformly from [0, numel) minus ``kept`` (ascending), in O(n) memory, by the
    exact rule of :func:`sparsekern._csr.random_positions` (so a reference can replay it)."""
    candidates = numel - kept.numel()
    if n > candidates:
        raise ValueError(f"drop_and_grow: cannot grow {n} connections among {candidates} free positions")
    return random_positions(numel, n, generator, kept)


class _Layer(abc.ABC):
    """A sparse layer as the training methods see it: its mask, its trained parameter, plan and commit."""

    shape: tuple[int, ...]

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> tuple[int, int]:
        """The (n_out, n_in) view a structure constrains (a conv weight as (out, in * kernel))."""
        return self.shape[0], self.numel // self.shape[0]

    @property
    def structure(self) -> Structure | None:
        """The structure the layer keeps (set by ``sparsify(structure=)`` or a sparsifier's ``structure=``)."""
        return get_structure(self.module)

    @structure.setter
    def structure(self, value: Structure | None) -> None:
        set_structure(self.module, value)

    def grow_scores(self, grow: str, batches, generator, group, precision):
        """A function (r0, r1) -> the float grow scores (r1 - r0, n_in) of rows r0..r1 of the structured view:
        |dL/dW| (gradient) or uniform random draws from ``generator`` (random); never the whole layer at once."""
        if grow == "random":
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"drop_and_grow: grow='random' needs generator=torch.Generator(), got {generator!r}")
            return _RandomScores(self.rows[1], generator, self.param.device)
        if grow != "gradient":
            raise ValueError(f"drop_and_grow: grow must be one of {GROW_MODES}, got {grow!r}")
        return self.gradient_rows(batches, group, precision)

    @abc.abstractmethod
    def gradient_rows(self, batches, group, precision):
        """As :meth:`grow_scores` for |dL/dW|."""

    @property
    @abc.abstractmethod
    def param(self) -> nn.Parameter:
        """The trained parameter (SparseLinear.values or the dense weight)."""

    @abc.abstractmethod
    def active(self) -> torch.Tensor:
        """Ascending flat indices of the active connections."""

    @abc.abstractmethod
    def count(self) -> int:
        """The number of active connections."""

    @abc.abstractmethod
    def active_values(self) -> torch.Tensor:
        """The weights at ``active()``, aligned."""

    @abc.abstractmethod
    def mask(self) -> torch.Tensor:
        """bool mask of the weight's shape."""

    @abc.abstractmethod
    def grow_by_gradient(self, kept: torch.Tensor, n: int, batches, group, precision: str) -> torch.Tensor:
        """The n positions outside ``kept`` with the largest |dL/dW| (ascending)."""

    @abc.abstractmethod
    def stage(self, plan: DropGrowPlan, optimizer) -> Callable[[], None]:
        """Build everything a plan installs in the layer and, if given, the optimizer state, changing nothing (this
        is where memory runs out); returns the swap that installs it (assignments and allocation-free in-place
        writes, nothing that can fail). Sparsifiers stage every layer before swapping any: all or nothing."""

    def commit(self, plan: DropGrowPlan, optimizer) -> None:
        """Apply a plan to the layer and, if given, the optimizer state."""
        self.stage(plan, optimizer)()

    @abc.abstractmethod
    def active_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The entries of a parameter-shaped tensor (the parameter's gradient or optimizer state) at ``active()``."""

    def plan(
        self,
        n: int,
        grow: str,
        *,
        batches=None,
        generator=None,
        group=None,
        precision: str = "fast",
        n_grow: int | None = None,
        scores: torch.Tensor | None = None,
    ) -> DropGrowPlan:
        """The update, the new topology included, computed once and without changing anything. ``n_grow`` (default
        ``n``) grows another number than the drop removes (a redistributed budget); ``grow="scores"`` grows the
        largest |scores| (a dense tensor of the weight's shape) among the positions not kept. A layer with a
        :attr:`structure` is planned by :meth:`plan_structured`."""
        if self.structure is not None:
            if (n_grow is not None and n_grow != n) or grow not in GROW_MODES:
                raise ValueError(
                    f"drop_and_grow: a layer with structure {self.structure.name!r} grows back what each row (or "
                    "group) dropped: no redistributed count (n_grow) and no grow by external scores"
                )
            return self.plan_structured(n, grow, batches=batches, generator=generator, group=group, precision=precision)
        active = self.active()
        if not 0 <= n <= active.numel():
            raise ValueError(f"drop_and_grow: n must lie in [0, active connections={active.numel()}], got {n}")
        n_grow = n if n_grow is None else n_grow
        free = self.numel - active.numel() + n
        if not 0 <= n_grow <= free:
            raise ValueError(f"drop_and_grow: cannot grow {n_grow} connections among {free} free positions")
        drop = select_drop(self.active_values(), n)
        dropped, kept = active[drop], active[~drop]  # boolean selection keeps the ascending order
        if grow == "gradient":
            grown = self.grow_by_gradient(kept, n_grow, batches, group, precision)
        elif grow == "scores":
            grown = grow_from_scores(scores, kept, n_grow)
        else:
            grown = grow_random(kept, self.numel, n_grow, generator)
        # A dropped connection grown again keeps its slot (and value); the others are added.
        regrown = sorted_contains(dropped, grown)
        keep = ~drop
        keep[torch.searchsorted(active, grown[regrown])] = True
        new_active, update = TopologyUpdate.merge(active, keep, grown[~regrown])
        return DropGrowPlan(dropped, grown, new_active, update)

    def plan_structured(
        self, n: int, grow: str, *, batches=None, generator=None, group=None, precision: str = "fast"
    ) -> DropGrowPlan:
        """:meth:`plan` for a layer that keeps its :attr:`structure`: the drop removes ``fraction = n / count`` of
        every row (or group) by :meth:`Structure.drop` and the grow restores the structure by
        :meth:`Structure.grow`, a block of rows at a time (a multiple of ``structure.row_block``, at most
        ``ROW_BLOCK_ELEMENTS`` scores): the grow scores of a block are its rows of |dL/dW| (a masked layer's
        ``weight.grad``; a SparseLinear's ``g[:, rows].T @ x`` from the recorded batches, all ranks' under
        ``group``) or uniform random draws (SET), never the whole dense gradient. With ``FanIn(ablation=)``, rows
        are ablated first (see :mod:`.structure_fan_in`)."""
        structure = self.structure
        active = self.active()
        count = active.numel()
        if not 0 <= n <= count:
            raise ValueError(f"drop_and_grow: n must lie in [0, active connections={count}], got {n}")
        fraction = n / count if count else 0.0
        n_out, n_in = self.rows
        keys_all = magnitude_keys(self.active_values())
        source = self.grow_scores(grow, batches, generator, group, precision)
        targets, new_structure, ablated = None, structure, None
        if getattr(structure, "ablation", None) is not None:
            if grow != "gradient":
                raise ValueError(
                    "drop_and_grow: FanIn(ablation=) ranks rows by their gradient saliency (SRigL): it needs "
                    f"grow='gradient' (RigL), got grow={grow!r}"
                )
            targets, new_structure, ablated = _ablation_targets(self, structure, active, keys_all, n, source)
        block = _block_rows(structure.row_block, n_out, n_in)
        starts = [*range(0, n_out, block), n_out]
        bounds = torch.searchsorted(active, torch.tensor(starts, dtype=torch.int64, device=active.device) * n_in)
        bounds = bounds.tolist()
        dropped_parts, grown_parts = [], []
        compact = getattr(structure, "drop_compact", None) if targets is None else None
        for i in range(len(starts) - 1):
            r0, r1, lo, hi = starts[i], starts[i + 1], bounds[i], bounds[i + 1]
            rows, local = r1 - r0, active[lo:hi] - r0 * n_in
            per_row = (hi - lo) // rows
            if compact is not None and per_row * rows == hi - lo and _equal_rows(local, n_in, rows, per_row):
                # every row holds per_row connections: drop on the (rows, per_row) keys alone, ascending columns
                drop_c = compact(keys_all[lo:hi].to(active.device).view(rows, per_row), fraction).reshape(-1)
                kept = torch.zeros(rows * n_in, dtype=torch.bool, device=active.device)
                kept[local[~drop_c]] = True
                kept = kept.view(rows, n_in)
                dropped_parts.append(active[lo:hi][drop_c])
            else:
                mask = torch.zeros(rows * n_in, dtype=torch.bool, device=active.device)
                mask[local] = True
                mask = mask.view(rows, n_in)
                keys = torch.zeros(rows * n_in, dtype=keys_all.dtype, device=active.device)
                keys[local] = keys_all[lo:hi].to(active.device)
                keys = keys.view(rows, n_in)
                if targets is None:
                    drop = structure.drop(mask, keys, fraction)
                else:
                    have, want = mask.sum(1), targets[r0:r1]
                    counts = torch.minimum(have, torch.maximum(round_half_up(have.double() * fraction), have - want))
                    drop = structure.drop(mask, keys, fraction, counts=counts)
                kept = mask & ~drop
                dropped_parts.append(drop.reshape(-1).nonzero().reshape(-1) + r0 * n_in)
            scores = source.rows(r0, r1).to(active.device)  # Structure.grow refuses inf and NaN (before any change)
            if targets is None:
                grown = structure.grow(kept, scores)
            else:
                grown = structure.grow(kept, scores, counts=targets[r0:r1] - kept.sum(1))
            grown_parts.append(grown.reshape(-1).nonzero().reshape(-1) + r0 * n_in)
        empty = torch.zeros(0, dtype=torch.int64, device=active.device)
        dropped = torch.cat(dropped_parts) if dropped_parts else empty
        grown = torch.cat(grown_parts) if grown_parts else empty
        drop = sorted_contains(dropped, active)
        regrown = sorted_contains(dropped, grown)
        keep = ~drop
        keep[torch.searchsorted(active, grown[regrown])] = True
        new_active, update = TopologyUpdate.merge(active, keep, grown[~regrown])
        return DropGrowPlan(dropped, grown, new_active, update, new_structure, ablated)


class CompressedLayer(_Layer):
    def __init__(self, module: SparseLinear):
        super().__init__(module)
        self.shape = (module.out_features, module.in_features)

    @property
    def param(self) -> nn.Parameter:
        return self.module.values

    def active(self) -> torch.Tensor:
        return self.module.flat_indices()

    def count(self) -> int:
        return self.module.nnz

    def active_values(self) -> torch.Tensor:
        return self.module.values

    def active_of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # nnz-sized, in CSR order: ascending flat index, as active()

    def mask(self) -> torch.Tensor:
        return self.module.mask

    def recorded_batch(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded update-step batches as one (x, g), g in x's dtype; ValueError when none were recorded or
        the shapes do not fit the layer."""
        if not batches:
            raise ValueError(
                "drop_and_grow: no inputs and output gradients were recorded for this SparseLinear; run forward "
                "and backward (in training mode, with autograd on) before the update step"
            )
        x = torch.cat([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
        g = torch.cat([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
        n_out, n_in = self.shape
        if x.shape[1:] != (n_in,) or g.shape[1:] != (n_out,) or x.shape[0] != g.shape[0]:
            raise ValueError(
                f"drop_and_grow: x must be (B, {n_in}) and g (B, {n_out}), got {tuple(x.shape)} and {tuple(g.shape)}"
            )
        return x, g.to(x.dtype)

    def grow_by_gradient(self, kept, n, batches, group, precision) -> torch.Tensor:
        x, g = self.recorded_batch(batches)
        # The kept connections as a plain CSR: outer_topk reads it as it is (ascending rows and columns).
        exclude = CSRIndex.pattern(kept, *self.shape)
        index, _ = outer_topk(x, g, n, exclude=exclude, group=group, precision=precision)
        return index.sort().values

    def gradient_rows(self, batches, group, precision) -> _ScoreSource:
        fn = "drop_and_grow"
        try:
            x, g = self.recorded_batch(batches)
        except Exception as exc:
            if group is None:
                raise
            # the failure's message goes out on the recorded batches' device (the layer's), or the default one
            all_gather_batch(fn, group, self.param if batches else None, None, 0, failure=exc)
            raise
        if group is not None:
            x, g = all_gather_batch(fn, group, x, g, 0)  # every rank: the concatenated batch, in rank order
        for t in (x, g):
            if not all_finite(t):
                raise ValueError(f"{fn}: the layer's inputs or output gradients hold inf or NaN; nothing changed")
        return _OuterScores(x, g, precision)

    def stage(self, plan: DropGrowPlan, optimizer) -> Callable[[], None]:
        module, values = self.module, self.module.values
        topology = module._stage_topology(plan.active, plan.update)
        state = stage_state(optimizer, values, plan.update.apply) if optimizer is not None else {}

        def swap() -> None:
            module._swap_topology(topology)
            if optimizer is not None:
                swap_state(optimizer, values, state)
            if plan.structure is not None:
                set_structure(module, plan.structure)

        return swap


class MaskedLayer(_Layer):
    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.shape = tuple(module.weight.shape)

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    def active(self) -> torch.Tensor:
        return self.module.weight_mask.reshape(-1).nonzero().reshape(-1)

    def count(self) -> int:
        return int(self.module.weight_mask.sum())

    def active_values(self) -> torch.Tensor:
        return self.active_of(self.module.weight.detach())

    def mask(self) -> torch.Tensor:
        return self.module.weight_mask.clone()

    def active_of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1)[self.module.weight_mask.reshape(-1)]

    def grow_by_gradient(self, kept, n, batches, group, precision) -> torch.Tensor:
        grad = self.module.weight.grad
        if grad is None:
            raise ValueError("drop_and_grow: the masked weight has no gradient; run backward before the update step")
        return grow_from_scores(grad, kept, n)

    def gradient_rows(self, batches, group, precision) -> _ScoreSource:
        grad = self.module.weight.grad
        if grad is None:
            raise ValueError("drop_and_grow: the masked weight has no gradient; run backward before the update step")
        return _DenseGradScores(grad.detach().reshape(self.rows))

    def stage(self, plan: DropGrowPlan, optimizer) -> Callable[[], None]:
        module = self.module
        new = flat_mask(plan.active, self.shape, module.weight_mask.device)
        # Connections not both before and after lose value, gradient and state. Zeroed in place by masked_fill_
        # in the swap: it allocates nothing, so it cannot fail once staged.
        cleared = ~(module.weight_mask & new)
        weight = module.weight
        states = [] if optimizer is None else [
            value for value in (optimizer.state.get(weight) or {}).values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]  # fmt: skip

        @torch.no_grad()
        def swap() -> None:
            for t in (weight, weight.grad, *states):
                if t is not None:
                    t.masked_fill_(cleared, 0)
            module.weight_mask.copy_(new)
            if plan.structure is not None:
                set_structure(module, plan.structure)

        return swap

    def mask_gradient(self) -> None:
        if self.module.weight.grad is not None:
            self.module.weight.grad.mul_(self.module.weight_mask)

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.module.weight.mul_(self.module.weight_mask)


def _equal_rows(local: torch.Tensor, n_in: int, rows: int, per_row: int) -> bool:
    """The block's active positions (ascending, block-local flat) hold exactly ``per_row`` in each of its rows."""
    return bool((local.view(rows, per_row) // n_in == torch.arange(rows, device=local.device).view(-1, 1)).all())


ROW_BLOCK_ELEMENTS = 1 << 20  # grow scores a structured update holds at once (4 MiB of float32)


def _block_rows(row_block: int, n_out: int, n_in: int) -> int:
    """Rows per block of a structured update: a multiple of ``row_block`` whose scores fit ROW_BLOCK_ELEMENTS."""
    return min(n_out, max(1, ROW_BLOCK_ELEMENTS // (row_block * n_in)) * row_block)


def _structure_home(module) -> tuple[nn.Module, str]:
    if isinstance(module, nn.Module):
        return module, "weight_structure"
    return module.module, f"{module.name}_structure"  # a MaskedParameter (MultiheadAttention's projections)


def get_structure(module) -> Structure | None:
    """The :class:`Structure` a sparse layer keeps (a plain attribute ``weight_structure``, or
    ``<name>_structure`` for a masked MultiheadAttention projection), or None."""
    home, attr = _structure_home(module)
    return home.__dict__.get(attr)


def set_structure(module, structure: Structure | None) -> None:
    home, attr = _structure_home(module)
    if structure is None:
        home.__dict__.pop(attr, None)
    else:
        home.__dict__[attr] = structure


class _ScoreSource:
    """The grow scores of a structured update, a block of rows at a time."""

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError

    def top(self, n: int) -> torch.Tensor:
        """Ascending flat indices of the layer's n largest scores over all positions (ablation's saliency)."""
        raise NotImplementedError


class _RandomScores(_ScoreSource):
    def __init__(self, n_in: int, generator: torch.Generator, device):
        self.n_in, self.generator, self.device = n_in, generator, device

    def rows(self, r0, r1):
        return torch.rand(r1 - r0, self.n_in, generator=self.generator, device=self.generator.device).to(self.device)


class _DenseGradScores(_ScoreSource):
    """|weight.grad| of a masked layer (the (n_out, n_in) view), read a block of rows at a time."""

    def __init__(self, grad: torch.Tensor):
        self.grad = grad

    def rows(self, r0, r1):
        block = self.grad[r0:r1].abs()
        return block.float() if block.element_size() < 4 else block

    def top(self, n):
        empty = torch.zeros(0, dtype=torch.int64, device=self.grad.device)
        return grow_from_scores(self.grad, empty, n)


class _OuterScores(_ScoreSource):
    """|g[:, r0:r1].T @ x| of a SparseLinear, a block at a time. precision "exact": outer_topk's exact scores (float32
    sum in batch order, products rounded, no FMA: bit-identical to outer_topk(precision="exact")); "fast": one BLAS
    matmul in float32 (float64 for float64 inputs), within outer_topk's stated fast bound of float64 but not its
    bits (its C++ kernel sums by FMA in batch order); the same bits on every rank of one machine type."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, precision: str):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.x, self.g, self.precision = x, g, precision
        self.xs, self.gt = x.to(acc), g.to(acc).t().contiguous()

    def rows(self, r0, r1):
        if self.precision == "exact":
            return outer_topk_scores_reference(self.xs, self.gt[r0:r1].t())
        return (self.gt[r0:r1] @ self.xs).abs().to(torch.float32)

    def top(self, n):
        index, _ = outer_topk(self.x, self.g, n, precision=self.precision)
        return index.sort().values


def _ablation_targets(layer: _Layer, structure, active, keys_all, n: int, source: _ScoreSource):
    """SRigL's neuron ablation (see :mod:`.structure_fan_in`): per-row target counts (k' for live rows, 0 for
    ablated ones), the FanIn with the new k', and the number of ablated rows."""
    from .structure_fan_in import FanIn

    n_out, n_in = layer.rows
    count = active.numel()
    budget = structure.budget if structure.budget is not None else count
    rows_of = active // n_in
    live_now = torch.bincount(rows_of, minlength=n_out) > 0
    k = structure.k if structure.k is not None else count // max(1, int(live_now.sum()))
    # salient: kept by a layer-wide magnitude drop of n, or among the layer's n largest |dL/dW| (all positions)
    kept = ~smallest(keys_all, n) if n else torch.ones(count, dtype=torch.bool, device=active.device)
    salient = torch.bincount(rows_of[kept], minlength=n_out)
    if n:
        top = source.top(n).to(active.device)
        fresh = ~sorted_contains(active[kept], top)
        salient = salient + torch.bincount(top[fresh] // n_in, minlength=n_out)
    live = salient.double() >= structure.ablation * k
    least = max(1, -(-budget // n_in))  # rows that can hold the budget
    if int(live.sum()) < least:
        order = torch.sort(salient, descending=True, stable=True).indices[:least]
        live = torch.zeros(n_out, dtype=torch.bool, device=active.device)
        live[order] = True
    n_live = int(live.sum())
    k_new = min(n_in, budget // n_live)
    targets = torch.where(live, k_new, 0).to(torch.int64)
    return targets, FanIn(k_new, ablation=structure.ablation, budget=budget), n_out - n_live


def redistribute(budget: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Split ``budget`` connections across layers in proportion to ``weights`` (sparse momentum's redistribution,
    Dettmers & Zettlemoyer 2019), no layer above its ``capacity`` (the positions it can grow into: dense).

    A layer whose share reaches its capacity is capped there and the overflow is spread evenly over the layers
    not capped, until none overflows (sparse_learning's residual loop, capped at dense rather than at 0.99 of it).
    The real-valued shares are then rounded down and the connections left over go one each to the layers with the
    largest fractional parts (ties: the lower layer index), so the counts sum to ``budget`` exactly.

    Raises:
        ValueError: a budget above the total capacity, or weights that do not have a positive finite sum.

    Example::

        >>> redistribute(10, [1.0, 3.0], [100, 100]), redistribute(10, [1.0, 3.0], [100, 4])
        ([3, 7], [6, 4])
    """
    if budget > sum(capacity):
        raise ValueError(f"redistribute: a budget of {budget} exceeds the total capacity {sum(capacity)}")
    total = math.fsum(weights)
    if not 0 < total < math.inf:
        raise ValueError(f"redistribute: the weights must have a positive finite sum, got {weights}")
    target = [budget * w / total for w in weights]
    capped = [False] * len(target)
    while True:
        over = [i for i, t in enumerate(target) if not capped[i] and t >= capacity[i]]
        if not over:
            break
        overflow = math.fsum(target[i] - capacity[i] for i in over)
        for i in over:
            target[i], capped[i] = float(capacity[i]), True
        free = [i for i in range(len(target)) if not capped[i]]
        if not free:
            break  # everything is dense: the budget was the total capacity
        for i in free:
            target[i] += overflow / len(free)
    counts = [min(math.floor(t), c) for t, c in zip(target, capacity, strict=True)]
    order = sorted(range(len(target)), key=lambda i: (-(target[i] - math.floor(target[i])), i))
    left = budget - sum(counts)
    for i in itertools.cycle(order):
        if left <= 0:
            break
        if counts[i] < capacity[i]:
            counts[i] += 1
            left -= 1
    return counts


def flat_mask(active: torch.Tensor, shape: tuple[int, ...], device) -> torch.Tensor:
    """A bool mask of ``shape``, True at the flat indices ``active``."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
    mask[active] = True
    return mask.view(shape)


def as_layer(module: nn.Module) -> _Layer:
    """The training view of a SparseLinear or of a module masked by ``sparsify(layout="masked")``."""
    if isinstance(module, SparseLinear):
        return CompressedLayer(module)
    if is_masked(module):
        return MaskedLayer(module)
    raise TypeError(
        "drop_and_grow: layer must be a sparsekern.nn.SparseLinear or a module with a dense weight and a bool "
        f"weight_mask buffer (sparsify(layout='masked')), got {type(module).__name__}"
    )


def drop_and_grow(
    layer: nn.Module,
    n: int,
    *,
    grow: str = "gradient",
    x: torch.Tensor | list[torch.Tensor] | None = None,
    g: torch.Tensor | list[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    group=None,
    precision: str = "fast",
) -> DropGrowPlan:
    """Drop the ``n`` smallest-magnitude connections of one sparse layer and grow ``n`` new ones (RigL / SET).

    Kept connections keep their values, gradients and optimizer state; grown ones start at 0 with zero gradient
    and zero optimizer state; a connection both dropped and grown stays as it was. The nonzero count is
    unchanged. All selections are made before anything changes, so on any error nothing changes.

    A layer that keeps a structure (``sparsify(structure=)``: constant fan-in, N:M) keeps it: each row (or group)
    drops ``n / count`` of its connections and grows back what it lost (:meth:`_Layer.plan_structured`, a block of
    rows at a time; ``FanIn(ablation=)`` may empty rows and move their budget, so the count can then change).

    Args:
        layer: a :class:`~sparsekern.nn.SparseLinear`, or a Linear/Conv module masked by
            ``sparsify(layout="masked")`` (a dense ``weight`` and a bool ``weight_mask`` buffer).
        n: connections to move, in [0, active connections].
        grow: "gradient" (RigL: the largest |dL/dW| among positions not kept) or "random" (SET; needs
            ``generator``).
        x, g: for ``grow="gradient"`` on a SparseLinear: its inputs (B, in_features) and output gradients
            (B, out_features), or lists of them, one per micro-batch of the step (concatenated along the batch,
            so the score is exactly the accumulated gradient). A masked layer uses its ``weight.grad`` instead.
        generator: a ``torch.Generator`` for ``grow="random"``.
        optimizer: if given, its per-parameter state follows the update (see :mod:`._optim_state`).
        group: a ``torch.distributed`` process group: the grow scores of a SparseLinear use every rank's batch
            (``outer_topk(group=...)``); a masked layer's gradient is assumed all-reduced already (DDP).
        precision: the arithmetic of a SparseLinear's grow scores, passed to :func:`sparsekern.outer_topk`:
            "fast" (default: the fastest of the device, deterministic on one backend, within a stated rounding
            bound of float64) or "exact" (one rounding order, bit-identical on every backend). A masked layer
            reads its dense gradient, whatever this says.

    Returns:
        the :class:`DropGrowPlan` that was applied (dropped, grown and resulting active flat indices).

    Raises:
        TypeError: a layer of another kind, or an optimizer whose state cannot follow.
        ValueError: n out of range, missing x/g or gradient, non-finite scores, bad ``grow`` or ``precision``.

    Example::

        >>> layer = sparsekern.nn.SparseLinear(64, 32, sparsity=0.9)
        >>> x = torch.randn(16, 64)
        >>> y = layer(x)
        >>> y.retain_grad(); y.square().sum().backward()
        >>> plan = drop_and_grow(layer, 20, x=x, g=y.grad)
        >>> layer.nnz, plan.n
        (205, 20)
    """
    fn = "drop_and_grow"
    if grow not in GROW_MODES:
        raise ValueError(f"{fn}: grow must be one of {GROW_MODES}, got {grow!r}")
    check_precision(fn, precision)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{fn}: n must be an int, got {type(n).__name__}")
    target = as_layer(layer)
    if grow == "random" and not isinstance(generator, torch.Generator):
        raise ValueError(f"{fn}: grow='random' needs generator=torch.Generator(), got {generator!r}")
    batches = None
    if isinstance(target, CompressedLayer) and grow == "gradient":
        if x is None or g is None:
            raise ValueError(f"{fn}: grow='gradient' on a SparseLinear needs its inputs x and output gradients g")
        xs, gs = (list(x), list(g)) if isinstance(x, (list, tuple)) else ([x], [g])
        if len(xs) != len(gs):
            raise ValueError(f"{fn}: x and g must list the same number of micro-batches, got {len(xs)} and {len(gs)}")
        batches = [
            (a.detach().reshape(-1, a.shape[-1]), b.detach().reshape(-1, b.shape[-1]))
            for a, b in zip(xs, gs, strict=True)
        ]
    if optimizer is not None:
        check_state(fn, optimizer, [target.param])
    plan = target.plan(n, grow, batches=batches, generator=generator, group=group, precision=precision)
    target.commit(plan, optimizer)
    return plan
