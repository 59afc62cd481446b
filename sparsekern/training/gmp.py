"""Gradual magnitude pruning (Zhu & Gupta 2018): dense to sparse on a cubic schedule, the RigL paper's pruning
baseline (google-research/rigl's "prune" mode: tfmot's PolynomialDecay with exponent 3)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.sparse_linear import TopologyUpdate
from ._optim_state import check_state
from .distribution import DISTRIBUTIONS, layer_nnz
from .drop_grow import CompressedLayer, DropGrowPlan, select_drop
from .sparsifier import MAX_STEPS, Sparsifier

SCOPES = ("layer", "global")


def _step_arg(fn: str, name: str, value, total_steps: int, *, low: int) -> int:
    """A step given as an int in [low, total_steps] or as a float fraction of ``total_steps`` in [0, 1]."""
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        step = int(value * total_steps)
    elif isinstance(value, int) and not isinstance(value, bool) and low <= value <= total_steps:
        step = value
    else:
        raise ValueError(
            f"{fn}: {name} must be an int step in [{low}, total_steps={total_steps}] or a float fraction in [0, 1], "
            f"got {value!r}"
        )
    return step


@dataclass(frozen=True)
class GMPSchedule:
    """Zhu & Gupta's pruning steps and cubic sparsity: prune at t ∈ {t_0, t_0 + Δt, ..., t_0 + nΔt} to
    ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³``.

    Steps are optimizer steps counted from 1 (the t-th call of ``step()``); t_0 = 0 is before the first step, so
    the first prune is then at Δt. ``t_end`` bounds the last prune: n = ⌊(t_end − t_0)/Δt⌋, so the final sparsity
    is reached exactly at t_0 + nΔt ≤ t_end (tfmot's PolynomialDecay, which google-research/rigl uses, stops short
    of it when end − begin is not a multiple of the frequency; here the last prune always reaches it).

    Args:
        total_steps: optimizer steps in the run.
        t_start, t_end: t_0 and the bound of the last prune, as int steps or float fractions of ``total_steps``
            (defaults 0 and 0.75: the last quarter trains at the final sparsity, as RigL's T_end).
        delta_t: steps between prunes (default 100).

    Example::

        >>> s = GMPSchedule(total_steps=1000, t_start=100, t_end=0.75, delta_t=100)
        >>> s.prune_steps(), s.fraction(250), round(s.sparsity(400, 0.0, 0.9), 4)
        ([100, 200, 300, 400, 500, 600, 700], 0.25, 0.7875)
    """

    total_steps: int
    t_start: int | float = 0
    t_end: int | float = 0.75
    delta_t: int = 100

    def __post_init__(self):
        fn = "GMPSchedule"
        for name in ("total_steps", "delta_t"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_STEPS:
                raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
        begin = _step_arg(fn, "t_start", self.t_start, self.total_steps, low=0)
        end = _step_arg(fn, "t_end", self.t_end, self.total_steps, low=1)
        if end - begin < self.delta_t:
            raise ValueError(
                f"{fn}: t_end (step {end}) must lie at least delta_t={self.delta_t} steps after t_start "
                f"(step {begin}), so that there is at least one pruning step after t_0"
            )

    @property
    def begin_step(self) -> int:
        """t_0."""
        return _step_arg("GMPSchedule", "t_start", self.t_start, self.total_steps, low=0)

    @property
    def n(self) -> int:
        """The number of prunes after t_0."""
        end = _step_arg("GMPSchedule", "t_end", self.t_end, self.total_steps, low=1)
        return (end - self.begin_step) // self.delta_t

    @property
    def end_step(self) -> int:
        """t_0 + nΔt: the step at which the final sparsity is reached."""
        return self.begin_step + self.n * self.delta_t

    def is_prune(self, step: int) -> bool:
        """True when optimizer step ``step`` (1-based) is one of t_0, t_0 + Δt, ..., t_0 + nΔt."""
        t0 = self.begin_step
        return step >= 1 and t0 <= step <= self.end_step and (step - t0) % self.delta_t == 0

    def prune_steps(self) -> list[int]:
        return [t for t in range(self.begin_step, self.end_step + 1, self.delta_t) if t >= 1]

    def fraction(self, step: int) -> float:
        """(t − t_0)/(nΔt), clamped to [0, 1]: 0 up to t_0, 1 from t_0 + nΔt on."""
        return min(1.0, max(0.0, (step - self.begin_step) / (self.n * self.delta_t)))

    def sparsity(self, step: int, initial: float, final: float) -> float:
        """s_t = s_f + (s_i − s_f)(1 − p)³ with p = :meth:`fraction` (so s_i before t_0, s_f after the end)."""
        return final + (initial - final) * (1.0 - self.fraction(step)) ** 3

    def count(self, step: int, initial: int, final: int) -> int:
        """The nonzeros at ``step`` of a layer (or all layers) going from ``initial`` to ``final``: the cubic
        applied to the counts, ``round(c_f + (c_i − c_f)(1 − p)³)``, which is s_t's formula with s_i and s_f the
        sparsities of the two counts, exact at both ends."""
        return int(round(final + (initial - final) * (1.0 - self.fraction(step)) ** 3))


class GMP(Sparsifier):
    """Gradual magnitude pruning (Zhu & Gupta 2018): dense to sparse, pruning the smallest-magnitude active
    weights at t_0, t_0 + Δt, ..., t_0 + nΔt to the cubic schedule ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(nΔt))³``
    (:class:`GMPSchedule`). The pruning baseline of the RigL paper (google-research/rigl's "prune" mode).

    Start: call ``sparsify(model, 0.0, layout=...)`` first (a dense start: every mask all ones, Linear layers as
    SparseLinear with every weight for ``layout="sparse"``), then create the optimizer, then the GMP; or build it
    on a model that is sparse already, which then starts from its current masks. GMP only removes connections.

    Each prune step t runs in ``step()``: the survivors are chosen from the weights the step's forward used (the
    smallest |w| go; ties: the lower flat index goes first, as RigL's drop), the optimizer step is taken, then the
    pruned weights leave: on masked layers their values, gradients and optimizer state are zeroed; on SparseLinear
    layers ``values`` (the same Parameter), its gradient and every parameter-shaped optimizer state tensor shrink to
    the survivors (nnz-sized state, so training gets cheaper as it gets sparser). All or nothing: every layer is
    staged before any changes, and a copy of what the optimizer step touches is held on prune steps so a failure
    can be undone. Under DDP the new masks' checksums are compared across ranks first.

    Args:
        model, optimizer, group: as :class:`Static` (``sparsify`` first, the optimizer after it).
        sparsity: the final sparsity s_f in (0, 1), over the sparse layers.
        total_steps: optimizer steps in the run.
        t_start, t_end, delta_t: the :class:`GMPSchedule` (defaults 0, 0.75, 100).
        initial_sparsity: s_i, pruned to at t_0 (when t_0 ≥ 1); default None: the current masks (a dense start:
            s_i = 0, as Zhu & Gupta).
        scope: "layer" (each layer on its own cubic from its start count to its final count) or "global" (the
            total count follows the cubic and one magnitude ranking over all layers decides where).
        distribution: the final per-layer counts for ``scope="layer"`` (:func:`layer_nnz`): "uniform" (default:
            every layer at s_f, as Zhu & Gupta and tfmot's per-layer schedule), "er" or "erk"; also the start
            counts when ``initial_sparsity`` is given. Not for ``scope="global"``.

    Raises:
        ValueError: values out of range, a layer already sparser than its final count (or than the
            ``initial_sparsity`` count), unknown scope or distribution; a data-parallel GMP (``group`` or a DDP
            wrapper) on SparseLinear layers: a prune shrinks their ``values``, which a DDP wrapper's buckets
            cannot follow; use ``sparsify(model, 0.0, layout="masked")`` under DDP.
        TypeError: as :class:`Static`.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.0)                 # dense, as SparseLinear layers
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> gmp = sparsekern.GMP(model, optimizer, sparsity=0.9, total_steps=40, delta_t=5)
        >>> for step in range(40):
        ...     x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     pruned = gmp.step()                                  # instead of optimizer.step()
        ...     optimizer.zero_grad()
        >>> gmp.schedule.prune_steps(), round(sparsekern.sparsity_report(model).sparsity, 4)
        ([5, 10, 15, 20, 25, 30], 0.9)
        >>> gmp.counts_at(12)                                        # nonzeros during optimizer step 12
        {'0.weight': 6007, '2.weight': 939}
    """

    flops_rule = "schedule"
    keep_optimizer_step = True  # GMP never skips a step: the prune comes on top of it

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        sparsity: float,
        total_steps: int,
        t_start: int | float = 0,
        t_end: int | float = 0.75,
        delta_t: int = 100,
        initial_sparsity: float | None = None,
        scope: str = "layer",
        distribution: str | None = None,
        group=None,
    ):
        fn = "GMP"
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ValueError(f"{fn}: sparsity must be a number in (0, 1), got {sparsity!r}")
        if initial_sparsity is not None:
            number = not isinstance(initial_sparsity, bool) and isinstance(initial_sparsity, (int, float))
            if not (number and 0 <= initial_sparsity < 1):
                raise ValueError(f"{fn}: initial_sparsity must be None or a number in [0, 1), got {initial_sparsity!r}")
            initial_sparsity = float(initial_sparsity)
            if initial_sparsity > sparsity:
                raise ValueError(f"{fn}: initial_sparsity {initial_sparsity} exceeds the final sparsity {sparsity}")
        if scope not in SCOPES:
            raise ValueError(f"{fn}: scope must be one of {SCOPES}, got {scope!r}")
        if scope == "global" and distribution is not None:
            raise ValueError(
                f"{fn}: distribution applies to scope='layer'; scope='global' ranks all layers together, got "
                f"distribution={distribution!r}"
            )
        if scope == "layer" and distribution is None:
            distribution = "uniform"
        if distribution is not None and distribution not in DISTRIBUTIONS:
            raise ValueError(f"{fn}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.schedule = GMPSchedule(total_steps, t_start, t_end, delta_t)
        super().__init__(model, optimizer, group=group)
        if self.group is not None and any(isinstance(layer, CompressedLayer) for layer in self.layers.values()):
            raise ValueError(
                f"{fn}: data-parallel GMP needs masked layers: a prune shrinks each SparseLinear's values, which a "
                "DistributedDataParallel wrapper's gradient buckets cannot follow; use sparsify(model, 0.0, "
                "layout='masked')"
            )
        self.sparsity, self.initial_sparsity = float(sparsity), initial_sparsity
        self.scope, self.distribution = scope, distribution
        names = list(self.layers)
        current = [self.layers[name].count() for name in names]
        shapes = [self.layers[name].shape for name in names]
        if scope == "layer":
            final = layer_nnz(shapes, self.sparsity, distribution)
            start = current if initial_sparsity is None else layer_nnz(shapes, initial_sparsity, distribution)
        else:
            total = sum(math.prod(s) for s in shapes)
            final = [int(round((1.0 - self.sparsity) * total))]
            start = [sum(current)] if initial_sparsity is None else [int(round((1.0 - initial_sparsity) * total))]
        scoped = names if scope == "layer" else ["all layers"]
        have = current if scope == "layer" else [sum(current)]
        for name, h, c_i, c_f in zip(scoped, have, start, final, strict=True):
            if not h >= c_i >= c_f:
                raise ValueError(
                    f"{fn}: {name} has {h} nonzeros and its schedule goes from {c_i} to {c_f}; GMP only prunes (start "
                    "from sparsify(model, 0.0), or lower initial_sparsity)"
                )
        self._start, self._final = start, final
        self._history: dict[int, list[int]] = {0: current}  # prune step -> the layers' counts after it (0: start)

    # -- the schedule ----------------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        # with initial_sparsity=None, t_0's target is the current masks: nothing to prune there
        return self.schedule.is_prune(step) and not (self.initial_sparsity is None and step == self.schedule.begin_step)

    def scheduled_counts(self, step: int) -> list[int]:
        """The per-layer count (scope "layer") or the total count (scope "global") that a prune at ``step`` reaches."""
        return [self.schedule.count(step, c_i, c_f) for c_i, c_f in zip(self._start, self._final, strict=True)]

    def counts_at(self, step: int) -> dict[str, int]:
        """{weight name: nonzeros} during optimizer step ``step`` (1-based; its forward and backward): the counts
        after the last prune before it. For the FLOPs accounting ("schedule" rule). With ``scope="global"`` the
        split between layers is known only for steps up to the next prune (it depends on the weights then).

        Raises:
            ValueError: ``step`` not an int in [1, total_steps]; a global-scope step past the next prune.
        """
        fn = "GMP.counts_at"
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= self.schedule.total_steps:
            raise ValueError(f"{fn}: step must be an int in [1, {self.schedule.total_steps}], got {step!r}")
        names = list(self.layers)
        last = max((t for t in self.schedule.prune_steps() if t < step and self.is_update_step(t)), default=None)
        if last is None or last <= self.steps:
            counts = self._history[last or 0]
        elif self.scope == "layer":
            counts = self.scheduled_counts(last)
        else:
            raise ValueError(
                f"{fn}: with scope='global' the layers' counts after the prune at step {last} depend on the weights "
                f"then; known up to step {self.steps + 1}"
            )
        return dict(zip(names, counts, strict=True))

    def _plan(self, step: int) -> dict[str, DropGrowPlan]:
        names = list(self.layers)
        layers = [self.layers[name] for name in names]
        check_state("GMP.step", self.optimizer, [layer.param for layer in layers])
        if self.scope == "layer":
            targets = self.scheduled_counts(step)
            drops = [
                select_drop(layer.active_values(), max(0, layer.count() - target))
                for layer, target in zip(layers, targets, strict=True)
            ]
        else:
            # one ranking over all layers, in float64 (exact for every dtype); ties: the earlier layer, lower index
            device = layers[0].param.device
            magnitudes = [layer.active_values().detach().to(device, torch.float64) for layer in layers]
            (target,) = self.scheduled_counts(step)
            chosen = select_drop(torch.cat(magnitudes), max(0, sum(m.numel() for m in magnitudes) - target))
            bounds = [0, *itertools.accumulate(m.numel() for m in magnitudes)]
            drops = [
                chosen[a:b].to(layer.param.device) for layer, a, b in zip(layers, bounds[:-1], bounds[1:], strict=True)
            ]
        return {name: prune_plan(layer, drop) for name, layer, drop in zip(names, layers, drops, strict=True)}

    def step(self) -> bool:
        t = self.steps + 1
        updated = super().step()
        if updated:
            self._history[t] = [layer.count() for layer in self.layers.values()]
        return updated

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "total_steps": self.schedule.total_steps,
            "t_start": self.schedule.t_start,
            "t_end": self.schedule.t_end,
            "delta_t": self.schedule.delta_t,
            "initial_sparsity": self.initial_sparsity,
            "scope": self.scope,
            "distribution": self.distribution,
        }

    def _extra_state(self) -> dict:
        return {"start": list(self._start), "history": {t: list(c) for t, c in self._history.items()}}

    def _check_extra_state(self, fn: str, state: dict) -> None:
        start, history = state["start"], state["history"]
        n = len(self.layers)
        ok_start = isinstance(start, list) and len(start) == len(self._start)
        ok_start = ok_start and all(type(c) is int and c >= f for c, f in zip(start, self._final, strict=True))
        if not ok_start:
            raise ValueError(
                f"{fn}: start must be {len(self._start)} int counts at or above the final ones {self._final}, "
                f"got {start!r}"
            )
        ok = isinstance(history, dict) and all(
            type(t) is int
            and (t == 0 or self.is_update_step(t))
            and t <= state["steps"]
            and isinstance(c, list)
            and len(c) == n
            and all(type(v) is int for v in c)
            for t, c in history.items()
        )
        done = [t for t in self.schedule.prune_steps() if self.is_update_step(t) and t <= state["steps"]]
        if not ok or (state["steps"] > 0 and sorted(history) != [0, *done]):
            raise ValueError(
                f"{fn}: history must map step 0 and every prune step up to step {state['steps']} ({done}) to "
                f"{n} int counts, got {history!r}"
            )

    def _load_extra_state(self, state: dict) -> None:
        self._start = list(state["start"])
        self._history = {t: list(c) for t, c in state["history"].items()}


def prune_plan(layer, drop: torch.Tensor) -> DropGrowPlan:
    """The update that removes the active connections where ``drop`` (bool, aligned with ``layer.active()``) is
    True and adds none: what :meth:`_Layer.stage` installs (the layer and its optimizer state shrink)."""
    active = layer.active()
    keep = ~drop
    new_active = active[keep]  # still ascending: no merge (and no sort) as a grow would need
    old_to_new = torch.full_like(active, -1).masked_scatter_(
        keep, torch.arange(new_active.numel(), device=active.device)
    )
    none = active.new_empty(0)
    return DropGrowPlan(active[drop], none, new_active, TopologyUpdate(old_to_new, none, new_active.numel()))
