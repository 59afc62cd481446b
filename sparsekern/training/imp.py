"""Iterative magnitude pruning with rewinding (lottery tickets; Frankle & Carbin 2019, Frankle et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.sparse_linear import SparseLinear
from .drop_grow import CompressedLayer, as_layer
from .sparsifier import Sparsifier
from .sparsify import LAYOUTS, SparsityReport, _unwrap, sparse_layers, sparsify, sparsity_report

SCOPES = ("global", "layer")
CONTROLS = (None, "reinit", "random_mask")


@dataclass(frozen=True)
class IMPRound:
    """One round of :class:`IMP`: the sparsity it trained at and the metrics the caller reported."""

    round: int
    report: SparsityReport
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"round": self.round, "sparsity": self.report.sparsity, **self.report.to_dict(), "metrics": self.metrics}


class _RoundSparsifier(Sparsifier):
    """Static masks; in round 0 it also saves the rewind point after ``rewind_step`` optimizer steps."""

    def __init__(self, imp: IMP, model, optimizer):
        super().__init__(model, optimizer)
        self._imp = imp

    def step(self) -> bool:
        updated = super().step()
        if self._imp.round == 0 and self.steps == self._imp.rewind_step:
            self._imp._save_rewind_point()
        return updated


class IMP:
    """Iterative magnitude pruning with rewinding: train → prune a fraction of the remaining weights by |w| →
    rewind the survivors to their values at step k of the first round → train again, until the target sparsity.

    Round 0 trains the dense model (masks all ones); each later round starts from the weights of the rewind point
    (step ``rewind_step`` of round 0: 0 is the original lottery-ticket rewind to initialisation, k > 0 late
    rewinding) with the new masks. The optimizer and any learning-rate schedule are reset by creating them anew
    each round; all other parameters and buffers are rewound too. The last round prunes to exactly the target
    count. Controls: ``control="reinit"`` re-initialises the survivors randomly instead of rewinding;
    ``control="random_mask"`` keeps each layer's count but places the connections at random.

    Args:
        model: a dense model (changed in place; its Linear/Conv1d/Conv2d weights are made sparse, density 1).
        sparsity: the final sparsity in (0, 1).
        prune_fraction: fraction of the remaining weights pruned per round (default 0.2).
        scope: "global" (one magnitude ranking over all layers) or "layer" (each layer pruned by the fraction,
            down to its own ``round((1 - sparsity) * numel)``).
        rewind_step: optimizer steps of round 0 after which the rewind point is saved (0: initialisation).
        control: None, "reinit" or "random_mask".
        layout, include, exclude: as :func:`sparsify` (masked by default: early rounds are nearly dense).
        seed: seeds the controls' random draws.

    Raises:
        ValueError: values out of range or unknown names; ``start_round``/``end_round`` out of order.

    Example::

        >>> imp = sparsekern.IMP(model, 0.9, rewind_step=0)
        >>> for r in range(imp.rounds):
        ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)   # reset every round
        ...     sparsifier = imp.start_round(optimizer)
        ...     train(model, sparsifier)                                  # calls sparsifier.step() per step
        ...     imp.end_round(accuracy=evaluate(model))                   # prune and rewind
        >>> for row in imp.history: print(row.round, row.report.sparsity, row.metrics)
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        prune_fraction: float = 0.2,
        scope: str = "global",
        rewind_step: int = 0,
        control: str | None = None,
        layout: str = "masked",
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        seed: int = 0,
    ):
        fn = "IMP"
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise ValueError(f"{fn}: sparsity must be a number in (0, 1), got {sparsity!r}")
        if (
            isinstance(prune_fraction, bool)
            or not isinstance(prune_fraction, (int, float))
            or not 0 < prune_fraction < 1
        ):
            raise ValueError(f"{fn}: prune_fraction must be a number in (0, 1), got {prune_fraction!r}")
        if scope not in SCOPES:
            raise ValueError(f"{fn}: scope must be one of {SCOPES}, got {scope!r}")
        if control not in CONTROLS:
            raise ValueError(f"{fn}: control must be one of {CONTROLS}, got {control!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ValueError(f"{fn}: rewind_step must be an int >= 0, got {rewind_step!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
        self.model = _unwrap(model)
        self.sparsity, self.prune_fraction, self.scope = float(sparsity), float(prune_fraction), scope
        self.rewind_step, self.control = rewind_step, control
        self.generator = torch.Generator().manual_seed(seed)
        sparsify(self.model, 0.0, distribution="uniform", layout=layout, include=include, exclude=exclude)
        self._names = list(sparse_layers(self.model))
        numel = [math.prod(as_layer(m).shape) for m in sparse_layers(self.model).values()]
        self._targets = [int(round((1 - self.sparsity) * n)) for n in numel]
        total, target = sum(numel), sum(self._targets)
        # rounds: one dense, then one per prune until the total reaches the target
        self.rounds, count = 1, total
        while count > target:
            count = max(target, int(round((1 - self.prune_fraction) * count)))
            self.rounds += 1
        self.round = 0
        self.history: list[IMPRound] = []
        self._in_round = False
        self._rewind = None
        if rewind_step == 0:
            self._save_rewind_point()

    # -- the rounds -------------------------------------------------------------------------------------------
    def start_round(self, optimizer: torch.optim.Optimizer) -> Sparsifier:
        """Begin the current round with a fresh ``optimizer``; returns the sparsifier to step during it."""
        if self._in_round:
            raise ValueError("IMP.start_round: round already started; call end_round() first")
        if self.round >= self.rounds:
            raise ValueError(f"IMP.start_round: all {self.rounds} rounds are done")
        sparsifier = _RoundSparsifier(self, self.model, optimizer)
        self._in_round = True
        return sparsifier

    def end_round(self, **metrics) -> IMPRound:
        """Record the round (with the caller's ``metrics``), then, unless it was the last, prune and rewind."""
        if not self._in_round:
            raise ValueError("IMP.end_round: no round started; call start_round(optimizer) first")
        if self._rewind is None:
            raise ValueError(
                f"IMP.end_round: round 0 ended before step rewind_step={self.rewind_step}, so there is no rewind "
                "point; train longer or lower rewind_step"
            )
        row = IMPRound(self.round, sparsity_report(self.model), dict(metrics))
        self.history.append(row)
        self._in_round = False
        self.round += 1
        if self.round < self.rounds:
            self._prune_and_rewind()
        return row

    def report(self) -> list[dict]:
        return [row.to_dict() for row in self.history]

    # -- internals --------------------------------------------------------------------------------------------
    def _layers(self):
        modules = sparse_layers(self.model)
        return [as_layer(modules[name]) for name in self._names]

    def _save_rewind_point(self) -> None:
        sparse = {id(layer.param) for layer in self._layers()}
        self._rewind = {
            "params": {n: p.detach().clone() for n, p in self.model.named_parameters() if id(p) not in sparse},
            "buffers": {n: b.detach().clone() for n, b in self.model.named_buffers()},
            "dense": [_dense_weight(layer).clone() for layer in self._layers()],
        }

    def _prune_and_rewind(self) -> None:
        layers = self._layers()
        actives = [layer.active() for layer in layers]
        magnitudes = [layer.active_values().detach().abs().double() for layer in layers]
        if self.scope == "layer":
            keep_counts = [
                max(t, int(round((1 - self.prune_fraction) * a.numel())))
                for t, a in zip(self._targets, actives, strict=True)
            ]
            keeps = [
                a[torch.sort(m, descending=True, stable=True).indices[:k]].sort().values
                for a, m, k in zip(actives, magnitudes, keep_counts, strict=True)
            ]
        else:
            total = sum(a.numel() for a in actives)
            count = max(sum(self._targets), int(round((1 - self.prune_fraction) * total)))
            # one ranking over all layers; ties keep the earlier layer and lower flat index
            order = torch.sort(torch.cat(magnitudes), descending=True, stable=True).indices[:count]
            owner = torch.cat([torch.full((a.numel(),), i) for i, a in enumerate(actives)])
            offset = torch.cumsum(torch.tensor([0] + [a.numel() for a in actives[:-1]]), 0)
            keeps = []
            for i, a in enumerate(actives):
                mine = order[owner[order] == i] - offset[i]
                keeps.append(a[mine].sort().values)
        if self.control == "random_mask":
            keeps = [
                torch.randperm(layer.numel, generator=self.generator)[: k.numel()].sort().values.to(k.device)
                for layer, k in zip(layers, keeps, strict=True)
            ]
        rewind = self._rewind
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in rewind["params"]:
                    p.copy_(rewind["params"][name])
            sparse_buffers = {"weight_mask", "row_ptr", "col_idx", "csc_ptr", "csc_row", "csc_perm"}
            for name, b in self.model.named_buffers():
                if name in rewind["buffers"] and name.rpartition(".")[2] not in sparse_buffers:
                    b.copy_(rewind["buffers"][name])
        for layer, keep, dense in zip(layers, keeps, rewind["dense"], strict=True):
            if self.control == "reinit":
                dense = _fresh_init(layer, self.generator)
            _set_topology(layer, keep, dense)


def _dense_weight(layer) -> torch.Tensor:
    if isinstance(layer, CompressedLayer):
        return layer.module.dense_weight().detach()
    return layer.module.weight.detach()


def _fresh_init(layer, generator: torch.Generator) -> torch.Tensor:
    """A new draw of nn.Linear / nn.ConvNd's default init: U(±1/sqrt(fan_in))."""
    shape = layer.shape
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    weight = torch.empty(shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return weight.to(dtype=layer.param.dtype, device=layer.param.device)


def _set_topology(layer, keep: torch.Tensor, dense: torch.Tensor) -> None:
    """Make ``keep`` (ascending flat indices) the layer's connections, with values from ``dense``."""
    flat = dense.reshape(-1)
    if isinstance(layer, CompressedLayer):
        module: SparseLinear = layer.module
        old = layer.active()
        drop = old[~torch.isin(old, keep)]
        grow = keep[~torch.isin(keep, old)]
        module.update_topology(drop=drop, grow=grow)
        with torch.no_grad():
            module.values.copy_(flat[keep])
            module.values.grad = None
    else:
        mask = torch.zeros(layer.numel, dtype=torch.bool, device=keep.device)
        mask[keep] = True
        mask = mask.view(layer.shape)
        with torch.no_grad():
            layer.module.weight_mask.copy_(mask)
            layer.module.weight.copy_(dense * mask)
            layer.module.weight.grad = None
