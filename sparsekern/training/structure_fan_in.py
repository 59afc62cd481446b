"""Constant fan-in: every output row of a layer keeps exactly k nonzeros (SRigL, Lasby et al., ICLR 2024).

Equal rows are the ELL layout (``cols (n_out, k)``), which the ``ell_*`` kernels run with perfect load balance. All
selections are per row, exact and sort-free (a k-th value per row, then the lowest-index ties at it), over blocks of
rows as the training code hands them in.

Neuron ablation (``FanIn(ablation=gamma)``), SRigL's rule as this package applies it at every drop-and-grow update:
a row's *salient* weights are those kept by a layer-wide magnitude drop of the same size (the ``count - n`` largest
|w| of the layer) together with the layer's ``n`` largest |dL/dW| over all its positions (``n`` the connections the
update drops); a row with fewer than ``gamma * k`` salient weights (k the current fan-in) is ablated (its mask row
emptied) and the layer's budget (its count when it was sparsified) goes to the live rows: k' = min(n_in, budget //
live rows), so every live row holds k' and the total stays <= the budget. At least max(1, ceil(budget / n_in)) rows
stay live (the most salient ones, ties to the lower row). Ablation is decided anew at every update: an ablated row
whose gradient makes it salient again comes back with k' connections grown by its gradient. This is SRigL's
``min_salient_weights_per_neuron`` with the layer-wide saliency sets of its reference code (calgaryml/condensed-
sparsity) and the threshold taken against the sparse fan-in k; row-local saliency sets could never ablate a row
(they keep at least (1 - fraction) * k weights per row), which is why the sets are layer-wide.
"""

from __future__ import annotations

import math

import torch

from .._validate import all_finite
from .structure import Structure


def _widen(values: torch.Tensor) -> torch.Tensor:
    """float32 for half precision (exact; kthvalue covers it everywhere), float64 stays."""
    values = values.detach()
    if not values.is_floating_point() or values.element_size() < 4:
        return values.float()
    return values


def row_largest(
    values: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor, *, smallest: bool = False
) -> torch.Tensor:
    """bool (R, n): per row r, the ``counts[r]`` largest ``values`` (``smallest``: the smallest) among the
    ``eligible`` positions, ties to the lower column. Sort-free: an unsorted partial top-k per row, exact except for
    which ties at the counts[r]-th value it keeps; rows where that matters (ties cross the boundary) are redone as
    everything beyond that value plus its lowest-index ties. ``counts[r]`` must not exceed the row's eligible
    positions; values finite or +-inf (never NaN)."""
    rows_n, n = values.shape
    out = torch.zeros(rows_n, n, dtype=torch.bool, device=values.device)
    if rows_n == 0 or n == 0:
        return out
    values = _widen(values)
    counts = counts.to(device=values.device, dtype=torch.int64)
    for c in counts.unique().tolist():
        if c == 0:
            continue
        every = c == int(counts[0]) and bool((counts == c).all())
        rows = None if every else (counts == c).nonzero().reshape(-1)
        v = values if every else values[rows]
        e = eligible if every else eligible[rows]
        # ineligible positions sort last: -inf for the largest, +inf for the smallest
        w = torch.where(e, v, math.inf if smallest else -math.inf)
        # a partial top-c (unsorted, O(n) per row): exact but for which of the ties at the c-th value it keeps
        picked, index = torch.topk(w, c, dim=1, largest=not smallest, sorted=False)
        threshold = picked.amax(1, keepdim=True) if smallest else picked.amin(1, keepdim=True)
        chosen = torch.zeros_like(e).scatter_(1, index, True)
        # rows whose ties at the threshold were all picked are exact; the others take the lowest-index ties
        unsure = ((w == threshold).sum(1) != (picked == threshold).sum(1)).nonzero().reshape(-1)
        if unsure.numel():
            wu, eu, tu = w[unsure], e[unsure], threshold[unsure]
            beyond = ((wu < tu) if smallest else (wu > tu)) & eu
            need = c - beyond.sum(1, keepdim=True)
            ties = eu & (wu == tu)
            chosen[unsure] = beyond | (ties & (ties.cumsum(1) <= need))
        if every:
            return chosen
        out[rows] = chosen
    return out


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).to(torch.int64)


class FanIn(Structure):
    """Constant fan-in: every row of the (n_out, n_in) weight view keeps exactly ``k`` nonzeros.

    ``structure="fan_in"`` (sparsify, RigL, SET, Static, SNIP) gives ``FanIn()``; pass ``FanIn(ablation=0.3)`` for
    SRigL's neuron ablation (see the module docstring). The layer's k is ``count(shape, nnz)`` / n_out:
    round(nnz / n_out) clamped to [1, n_in]. :meth:`bind` gives the per-layer copy (k and the layer's budget) that
    ``sparsify`` stores on each layer and that :meth:`grow` and :meth:`violation` read.

    Args:
        k: the fan-in of a bound layer (None: unbound).
        ablation: SRigL's gamma_sal in (0, 1], or None (default: no ablation).
        budget: the layer's nonzero budget (its count when sparsified; ablation moves it between rows). Default
            n_out * k.
    """

    name = "fan_in"
    row_block = 1

    def __init__(self, k: int | None = None, *, ablation: float | None = None, budget: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"FanIn: k must be an int >= 1 or None, got {k!r}")
        if ablation is not None and (
            isinstance(ablation, bool) or not isinstance(ablation, (int, float)) or not 0.0 < float(ablation) <= 1.0
        ):
            raise ValueError(
                f"FanIn: ablation (SRigL's gamma_sal) must be a number in (0, 1] or None, got {ablation!r}"
            )
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"FanIn: budget must be an int >= 1 or None, got {budget!r}")
        self.k = k
        self.ablation = None if ablation is None else float(ablation)
        self.budget = budget

    # -- identity -------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """What a checkpoint stores of it (:meth:`from_config` rebuilds it)."""
        return {"name": self.name, "k": self.k, "ablation": self.ablation, "budget": self.budget}

    @classmethod
    def from_config(cls, config: dict) -> FanIn:
        return cls(config["k"], ablation=config["ablation"], budget=config["budget"])

    def __eq__(self, other) -> bool:
        return isinstance(other, FanIn) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(self.config().items()))

    def __repr__(self) -> str:
        parts = [f"{key}={value!r}" for key, value in self.config().items() if key != "name" and value is not None]
        return f"FanIn({', '.join(parts)})"

    def bind(self, shape: tuple[int, int], count: int, budget: int | None = None) -> FanIn:
        """The copy for one layer of ``shape`` holding ``count`` nonzeros (k = count / n_out; live rows only when
        rows are ablated, so k = count / live rows is passed as ``count`` = live * k by the caller)."""
        n_out = shape[0]
        if count % n_out:
            raise ValueError(f"FanIn.bind: a count of {count} is not a multiple of n_out={n_out}")
        return FanIn(count // n_out, ablation=self.ablation, budget=budget if budget is not None else count)

    # -- the contract ---------------------------------------------------------------------------------------
    def check_shape(self, fn: str, layer: str, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(
                f"{fn}: layer {layer!r}: constant fan-in needs a (n_out, n_in) weight view with n_out, n_in >= 1, "
                f"got {tuple(shape)}"
            )

    def count(self, shape: tuple[int, int], nnz: int) -> int:
        n_out, n_in = shape
        k = min(max(int(math.floor(nnz / n_out + 0.5)), 1), n_in)
        return n_out * k

    def initial(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        n_out, n_in = scores.shape
        if count % n_out or not 0 < count // n_out <= n_in:
            raise ValueError(
                f"FanIn.initial: count must be n_out * k with 1 <= k <= n_in ({n_out} * [1, {n_in}]), got {count}"
            )
        if not all_finite(scores):
            raise ValueError("FanIn.initial: scores hold inf or NaN")
        everywhere = torch.ones(n_out, n_in, dtype=torch.bool, device=scores.device)
        counts = torch.full((n_out,), count // n_out, dtype=torch.int64, device=scores.device)
        return row_largest(scores, everywhere, counts)

    def drop_counts(self, mask: torch.Tensor, fraction: float) -> torch.Tensor:
        """Per row: round(fraction * active count), half up."""
        active = mask.sum(1)
        return torch.minimum(round_half_up(active.double() * float(fraction)), active)

    def drop(self, mask: torch.Tensor, keys: torch.Tensor, fraction: float, counts: torch.Tensor | None = None):
        """Per row the round(fraction * row's count) (half up) smallest ``keys`` among the row's active positions,
        ties to the lower column. ``counts``: per-row numbers to drop instead (ablation)."""
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"FanIn.drop: fraction must lie in [0, 1], got {fraction!r}")
        counts = self.drop_counts(mask, fraction) if counts is None else counts
        return row_largest(keys, mask, counts, smallest=True)

    def drop_compact(self, keys: torch.Tensor, fraction: float) -> torch.Tensor:
        """:meth:`drop` on equal rows given compactly: ``keys`` (R, c) are each row's active keys in ascending column
        order; returns bool (R, c), the round(fraction * c) smallest per row, ties to the lower column (the same
        selection as :meth:`drop` on the dense block, at c / n_in of its cost)."""
        rows, c = keys.shape
        d = min(c, int(math.floor(c * float(fraction) + 0.5)))
        if d == 0 or rows == 0:
            return torch.zeros(rows, c, dtype=torch.bool, device=keys.device)
        everywhere = torch.ones(rows, c, dtype=torch.bool, device=keys.device)
        return row_largest(keys, everywhere, torch.full((rows,), d, device=keys.device), smallest=True)

    def grow(self, kept: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Per row as many positions as bring it back to k (the bound fan-in; ``counts``: per-row numbers to grow
        instead), the largest ``scores`` among the positions not kept, ties to the lower column."""
        if counts is None:
            if self.k is None:
                raise ValueError("FanIn.grow: an unbound FanIn does not know k; use FanIn(k) or FanIn().bind(...)")
            counts = self.k - kept.sum(1)
            if bool((counts < 0).any()):
                row = int((counts < 0).nonzero()[0])
                raise ValueError(f"FanIn.grow: row {row} keeps {int(kept[row].sum())} > k={self.k} connections")
        if not all_finite(scores):
            raise ValueError("FanIn.grow: the grow scores hold inf or NaN")
        return row_largest(scores, ~kept, counts)

    def violation(self, mask: torch.Tensor, count: int | None = None) -> str | None:
        if mask.dim() != 2:
            return f"the mask must be 2-D (n_out, n_in), got shape {tuple(mask.shape)}"
        rows = mask.sum(1)
        live = rows != 0
        if not bool(live.any()):
            return "every row is empty"
        if self.k is not None:
            k = self.k
        elif count is not None and self.ablation is None and count % mask.shape[0] == 0:
            k = count // mask.shape[0]
        else:
            k = int(rows[live][0])
        for r in (rows != k).nonzero().reshape(-1).tolist():
            if self.ablation is not None and int(rows[r]) == 0:
                continue  # an ablated row
            return f"row {r} has {int(rows[r])} nonzeros, not the fan-in k={k}" + (
                " (or 0: ablated)" if self.ablation is not None else ""
            )
        total = int(rows.sum())
        if count is not None and total != count:
            return f"the mask has {total} nonzeros, not {count}"
        return None
