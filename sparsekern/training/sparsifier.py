"""Sparsifiers: Static, SNIP, SET and RigL, with one API (torch.ao.pruning's shape: build, then step)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import weakref

import torch
from torch import nn

from .._distributed import verify_masks_across_ranks
from ._optim_state import check_optimizer, check_state, snapshot_step
from .drop_grow import CompressedLayer, DropGrowPlan, MaskedLayer, as_layer, check_precision, redistribute
from .flops import FlopsReport, flops_report
from .schedule import UpdateSchedule
from .sparsify import SparsityReport, _last_not_ablated, _unwrap, sparse_layers, sparsity_report
from .structure import parse_structure

MAX_STEPS = 2**53  # optimizer steps a state may count: exact in float64, far past any run


def _step_count(fn: str, steps) -> int:
    """``steps`` as an int in [0, MAX_STEPS]: ints and integer-likes (numpy or 0-d integer tensors), not bools,
    strings or floats."""
    try:
        value = None if isinstance(steps, bool) else operator.index(steps)
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_STEPS:
        raise ValueError(f"{fn}: steps must be an int in [0, 2**53], got {steps!r}")
    return value


def check_generator_state(fn: str, saved, generator: torch.Generator) -> None:
    """Raise ValueError unless ``saved`` could be ``generator``'s state (a tensor of its state's dtype and shape)."""
    current = generator.get_state()
    if not (isinstance(saved, torch.Tensor) and saved.dtype == current.dtype and saved.shape == current.shape):
        raise ValueError(f"{fn}: the generator state must be a {current.dtype} tensor of shape {tuple(current.shape)}")


class Sparsifier:
    """Fixed masks: the base of every sparsifier and, as ``Static``, the one for static sparse training.

    Build it on a sparsified model (:func:`sparsify`) and its optimizer, then call ``step()`` in place of
    ``optimizer.step()``, once per optimizer step (after all micro-batches' backward passes). On masked layers
    ``step()`` zeros the gradient off the mask before the optimizer step and re-applies the mask after it; on
    SparseLinear layers only the nonzeros exist, so the optimizer step is all there is.

    Args:
        model: the sparsified model (a DDP wrapper is looked through; its process group is used for RigL/SET).
        optimizer: the optimizer over the model's parameters, created after :func:`sparsify`.
        group: a ``torch.distributed`` process group for data-parallel training (default: the DDP wrapper's).
        structure, transposable: the mask structure to keep (Static, SNIP, SET, RigL): None (default: whatever
            each layer keeps from ``sparsify(structure=)``, unstructured otherwise), "fan_in", "N:M" (``transposable``
            for N:M tiles) or a :class:`~sparsekern.training.structure.Structure` such as ``FanIn(ablation=0.3)``.
            A layer sparsified with another structure raises; an unstructured layer's mask must already have it
            (checked, the layer named) and then keeps it; an ablation setting given here replaces the layers' own
            (never on the model's last layer). SET and RigL then drop and grow per row (or group) so the
            structure holds after every update; ``redistribution=`` is refused. Part of ``state_dict()``.

    Raises:
        ValueError: the model has no sparse layer, or the optimizer does not hold the sparse parameters; a
            structure the masks do not have; structured layers under a sparsifier that does not keep them (GMP,
            SNFS, IMP, STE, ...).
        TypeError: an optimizer whose state cannot follow mask updates (L-BFGS, SparseAdam, Adafactor, or any
            state tensor not shaped like its parameter).

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.Static(model, optimizer)
        >>> batches = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(3)]
        >>> for x, y in batches:
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     moved = sparsifier.step()              # instead of optimizer.step(); True if the masks moved
        ...     optimizer.zero_grad()
    """

    # config entries that states saved before they existed lack, with the behaviour those states had
    _saved_before: dict = {}

    keep_optimizer_step = False  # RigL/SET: also step the optimizer on update steps
    # what a training step costs in FLOPs (flops.RULES: "sparse", "rigl", "dense_gradient", "schedule"); every
    # sparsifier class declares its own, so a new one cannot inherit a wrong count
    flops_rule: str | None = None

    # whether this sparsifier keeps a layer's structure (sparsify(structure=)); the others refuse structured layers
    keeps_structure = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, group=None, structure=None,
                 transposable: bool = False):  # fmt: skip
        fn = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
        if group is None and isinstance(model, nn.parallel.DistributedDataParallel):
            group = model.process_group
        self.model = _unwrap(model)
        modules = sparse_layers(self.model)
        if not modules:
            raise ValueError(f"{fn}: the model has no sparse layer; call sparsekern.sparsify(model, ...) first")
        self.layers = {name: as_layer(m) for name, m in modules.items()}
        check_optimizer(fn, optimizer, [layer.param for layer in self.layers.values()])
        bind = self._bind_structure(fn, parse_structure(fn, structure, transposable))
        for name, bound in bind.items():  # every check passed: now the layers remember it
            self.layers[name].structure = bound
        self.optimizer = optimizer
        self.group = group
        self.steps = 0  # optimizer steps taken (calls of step())
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._capturing = False
        self._hooks = []

    def _bind_structure(self, fn: str, structure) -> dict:
        """{layer name: the structure it is to keep} for ``structure=``: a layer sparsified with the same structure
        keeps its own (an ablation setting given here replaces its own); an unstructured one must already have it
        (its mask is checked) and then keeps it; dense layers stay as they are. Raises before anything changes."""
        bind = {}
        for name, layer in self.layers.items():
            own = layer.structure
            if structure is None:
                if own is not None and not self.keeps_structure:
                    raise ValueError(
                        f"{fn}: layer {name!r} keeps the structure {own.name!r} (sparsify(structure=)), which "
                        f"{fn} does not keep; use Static, SNIP, SET or RigL, or sparsify without structure="
                    )
                continue
            if not self.keeps_structure:
                raise ValueError(f"{fn}: structure= is supported by Static, SNIP, SET and RigL, not {fn}")
            if own is not None:
                if own.name != structure.name:
                    raise ValueError(
                        f"{fn}: layer {name!r} was sparsified with structure {own.name!r}, not {structure.name!r}"
                    )
                if getattr(structure, "ablation", None) != getattr(own, "ablation", None):
                    bind[name] = type(own)(own.k, ablation=structure.ablation, budget=own.budget)
                else:
                    bind[name] = own
                continue
            count = layer.count()
            if count == layer.numel:
                continue  # dense: left dense and unstructured
            rows = layer.rows
            structure.check_shape(fn, name, rows)
            bound = structure.bind(rows, count) if hasattr(structure, "bind") and count % rows[0] == 0 else structure
            fault = bound.violation(layer.mask().reshape(rows), count)
            if fault is not None:
                raise ValueError(
                    f"{fn}: the mask of layer {name!r} does not have the structure {structure.name!r}: {fault}"
                )
            bind[name] = bound
        return _last_not_ablated(bind) if structure is not None else bind

    def structures(self) -> dict:
        """{weight name: the :class:`~sparsekern.training.structure.Structure` it keeps, or None}."""
        return {name: layer.structure for name, layer in self.layers.items()}

    # -- the schedule (subclasses that move connections override these) ------------------------------------
    def is_update_step(self, step: int) -> bool:
        """True when optimizer step ``step`` (1-based) changes the masks."""
        return False

    def _plan(self, step: int) -> dict[str, DropGrowPlan]:
        return {}

    # -- training -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One optimizer step with the masks kept, or (on an update step) the mask update; True if the masks
        changed. If the update raises, the model, masks, optimizer state and step count are as they were."""
        t = self.steps + 1
        updated = self.is_update_step(t)
        if updated:
            plans = self._plan(t)
            verify_masks_across_ranks(
                f"{type(self).__name__}.step", self.group, {n: p.active for n, p in plans.items()}
            )
            # All or nothing: stage every layer (where memory can run out), then swap them all in. The optimizer
            # step changes tensors in place, so with it a copy of what it touches is kept until the swap.
            restore = snapshot_step(self.optimizer) if self.keep_optimizer_step else None
            try:
                if self.keep_optimizer_step:
                    self._optimizer_step()
                swaps = [self.layers[name].stage(plan, self.optimizer) for name, plan in plans.items()]
            except BaseException:
                if restore is not None:
                    restore()
                raise
            del restore
            for swap in swaps:
                swap()
        else:
            self._optimizer_step()
        self.steps = t
        self._records.clear()
        self._capturing = self.is_update_step(t + 1)
        return updated

    def _optimizer_step(self) -> None:
        masked = [layer for layer in self.layers.values() if isinstance(layer, MaskedLayer)]
        for layer in masked:
            layer.mask_gradient()
        self.optimizer.step()
        for layer in masked:
            layer.apply_mask()

    # -- inspection and checkpoints --------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """{weight name ("fc1.weight"): bool mask of the weight's shape}, whatever the layout."""
        return {name: layer.mask() for name, layer in self.layers.items()}

    def report(self) -> SparsityReport:
        return sparsity_report(self.model)

    def flops_report(self, example_input=None) -> FlopsReport:
        """Inference and training FLOPs of the model as fractions of dense, under this sparsifier's ``flops_rule``
        (:func:`sparsekern.flops_report`; ``example_input`` gives the positions of conv layers and sequences)."""
        return flops_report(self.model, self, example_input=example_input)

    def _config(self) -> dict:
        return {}

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Step count, configuration, masks (flat indices) and RNG state: with the model's and optimizer's
        state_dicts, enough to resume and reproduce the run that did not stop."""
        state = {
            "kind": type(self).__name__,
            "steps": self.steps,
            "config": self._config(),
            "active": {name: layer.active().cpu() for name, layer in self.layers.items()},
            **self._extra_state(),
        }
        if any(layer.structure is not None for layer in self.layers.values()):
            state["structures"] = {name: _structure_state(layer.structure) for name, layer in self.layers.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. Load the model's state_dict (which holds the topology) first. Everything
        is checked before anything changes: on an error the sparsifier is as it was.

        Raises:
            ValueError: a state of another sparsifier kind or configuration, a missing entry, a step count that
                is not an int in [0, 2**53], or masks that differ from the model's (load the model's state_dict
                first).
        """
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict) or state.get("kind") != type(self).__name__:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{fn}: expected the state of a {type(self).__name__}, got {got!r}")
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"{fn}: the state lacks {missing}")
        saved = {**self._saved_before, **state["config"]} if isinstance(state["config"], dict) else state["config"]
        if saved != self._config():
            raise ValueError(f"{fn}: configuration {saved} differs from this sparsifier's {self._config()}")
        if not isinstance(state["active"], dict) or set(state["active"]) != set(self.layers):
            got = sorted(state["active"]) if isinstance(state["active"], dict) else type(state["active"]).__name__
            raise ValueError(f"{fn}: state has layers {got}, the model has {sorted(self.layers)}")
        for name, layer in self.layers.items():
            active = state["active"][name]
            if not (isinstance(active, torch.Tensor) and torch.equal(active.to(layer.active().device), layer.active())):
                raise ValueError(
                    f"{fn}: the mask of {name!r} differs from the model's; load the model's state_dict first"
                )
        steps = _step_count(fn, state["steps"])
        self._check_extra_state(fn, state)
        structures = self._saved_structures(fn, state)
        # everything is checked: now change the sparsifier
        for name, structure in structures.items():
            self.layers[name].structure = structure
        self._load_extra_state(state)
        self.steps = steps
        self._records.clear()
        self._capturing = self.is_update_step(self.steps + 1)

    def _check_extra_state(self, fn: str, state: dict) -> None:
        pass

    def _saved_structures(self, fn: str, state: dict) -> dict:
        """{layer name: structure to install} from a state's "structures" (ablation's current k), checked against
        the layers' masks."""
        saved = state.get("structures")
        current = {name: layer.structure for name, layer in self.layers.items()}
        if saved is None:
            if any(s is not None for s in current.values()):
                raise ValueError(f"{fn}: the state was saved without structures; this sparsifier's layers keep some")
            return {}
        if not isinstance(saved, dict) or set(saved) != set(self.layers):
            raise ValueError(f"{fn}: the state's structures must name the layers {sorted(self.layers)}")
        out = {}
        for name, layer in self.layers.items():
            entry, own = saved[name], current[name]
            if (entry is None) != (own is None) or (own is not None and (
                not isinstance(entry, dict) or entry.get("name") != own.name
            )):  # fmt: skip
                got = entry.get("name") if isinstance(entry, dict) else entry
                raise ValueError(
                    f"{fn}: layer {name!r} keeps structure {None if own is None else own.name!r}, the state has {got!r}"
                )
            if own is None:
                continue
            structure = _structure_from_state(own, entry)
            fault = structure.violation(layer.mask().reshape(layer.rows), layer.count())
            if fault is not None:
                raise ValueError(f"{fn}: the mask of {name!r} does not have the saved structure {structure!r}: {fault}")
            out[name] = structure
        return out

    def remove(self) -> None:
        """Detach the hooks this sparsifier installed (the masks stay)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _structure_state(structure) -> dict | None:
    if structure is None:
        return None
    config = getattr(structure, "config", None)
    return dict(config()) if callable(config) else {"name": structure.name}


def _structure_from_state(own, entry: dict):
    """The layer's structure as saved (FanIn: its k and budget, which ablation changes); others are their own."""
    from_config = getattr(type(own), "from_config", None)
    if callable(from_config):
        try:
            return from_config(entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"load_state_dict: a bad saved structure {entry!r}: {exc}") from None
    return own


class Static(Sparsifier):
    __doc__ = Sparsifier.__doc__
    flops_rule = "sparse"
    keeps_structure = True


class SNIP(Sparsifier):
    """SNIP (Lee et al. 2019): masks chosen once from the saliency |g ⊙ w| on a batch at initialisation, then fixed.

    The masks are chosen by :func:`snip_scores` and ``sparsify(..., distribution="global", scores=...)`` on the
    dense model (SNIP needs the dense initial weights); this sparsifier then trains with those masks fixed,
    exactly like :class:`Static`.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> x0, y0 = torch.randn(128, 64), torch.randint(0, 10, (128,))
        >>> scores = sparsekern.snip_scores(model, lambda m: nn.functional.cross_entropy(m(x0), y0))
        >>> report = sparsekern.sparsify(model, 0.9, distribution="global", scores=scores)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.SNIP(model, optimizer)         # then step() as with Static
    """

    flops_rule = "sparse"
    keeps_structure = True


REDISTRIBUTIONS = (None, "momentum", "magnitude")


class _DropGrow(Sparsifier):
    grow = "gradient"
    precision = "fast"  # outer_topk's, for a gradient grow on SparseLinear layers
    flops_rule = "rigl"
    # a state saved before redistribution= existed kept every layer's count
    _saved_before = {"redistribution": None}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        delta_t: int = 100,
        alpha: float = 0.3,
        t_end: float | int = 0.75,
        keep_optimizer_step: bool = False,
        redistribution: str | None = None,
        group=None,
        structure=None,
        transposable: bool = False,
    ):
        fn = type(self).__name__
        if redistribution not in REDISTRIBUTIONS:
            raise ValueError(f"{fn}: redistribution must be one of {REDISTRIBUTIONS}, got {redistribution!r}")
        self.schedule = UpdateSchedule(total_steps, delta_t, alpha, t_end)
        super().__init__(model, optimizer, group=group, structure=structure, transposable=transposable)
        structured = {name: layer.structure for name, layer in self.layers.items() if layer.structure is not None}
        if structured and redistribution is not None:
            raise ValueError(
                f"{fn}: redistribution={redistribution!r} moves nonzeros between layers, which a structured layer "
                f"({', '.join(sorted(structured))}: {next(iter(structured.values())).name!r}) cannot follow; use "
                "redistribution=None"
            )
        ablating = [name for name, s in structured.items() if getattr(s, "ablation", None) is not None]
        if ablating and self.grow != "gradient":
            raise ValueError(f"{fn}: FanIn(ablation=) (layers {ablating}) ranks rows by their gradient: use RigL")
        if (
            ablating
            and isinstance(model, nn.parallel.DistributedDataParallel)
            and any(isinstance(self.layers[name], CompressedLayer) for name in ablating)
        ):
            raise ValueError(
                f"{fn}: FanIn(ablation=) changes the size of SparseLinear.values, which a DistributedDataParallel "
                "wrapper cannot follow; under DDP use sparsify(layout='masked'), or pass the model itself with group="
            )
        if not isinstance(keep_optimizer_step, bool):
            raise TypeError(f"{fn}: keep_optimizer_step must be a bool, got {keep_optimizer_step!r}")
        self.keep_optimizer_step = keep_optimizer_step
        self.redistribution = redistribution
        wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        if redistribution is not None and wrapped and any(isinstance(x, CompressedLayer) for x in self.layers.values()):
            # DDP keeps each parameter's gradient accumulator, with its size, from when it was built
            raise ValueError(
                f"{fn}: moving nonzeros between layers changes the size of SparseLinear.values, which a "
                "DistributedDataParallel wrapper cannot follow (it fixes every parameter's size when it is built); "
                "under DDP use sparsify(layout='masked'), or pass the model itself with group= and average the "
                "gradients across ranks yourself before step()"
            )
        # {layer name: density} after each update that may move counts between layers (redistribution on)
        self.density_history: list[dict[str, float]] = []
        self._capturing = self.is_update_step(1)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update(step)

    def _config(self) -> dict:
        return {
            **dataclasses.asdict(self.schedule),
            "keep_optimizer_step": self.keep_optimizer_step,
            "redistribution": self.redistribution,
        }

    def step(self) -> bool:
        updated = super().step()
        if updated and self.redistribution is not None:
            self.density_history.append(self._densities())
        return updated

    def _densities(self) -> dict[str, float]:
        return {name: layer.count() / layer.numel for name, layer in self.layers.items()}

    def _plan(self, step: int) -> dict[str, DropGrowPlan]:
        check_state(f"{type(self).__name__}.step", self.optimizer, [layer.param for layer in self.layers.values()])
        statistics = self._statistics() if self.redistribution is not None else None
        n_drop = self._drop_counts(step, statistics)
        n_grow = self._grow_counts(n_drop, statistics)
        return {
            name: self.layers[name].plan(
                n,
                self.grow,
                n_grow=n_grow[name],
                batches=self._batches(name),
                generator=self._generator(),
                group=self.group,
                precision=self.precision,
                scores=self._scores(name),
            )
            for name, n in n_drop.items()
        }

    def _drop_counts(self, step: int, statistics: dict[str, float] | None) -> dict[str, int]:
        counts = {}
        for name, layer in self.layers.items():
            if self.redistribution is None and layer.count() == layer.numel:
                continue  # a dense layer: the grow could only give back what the drop took
            counts[name] = self.schedule.n_drop(step, layer.count())
        return counts

    def _grow_counts(self, n_drop: dict[str, int], statistics: dict[str, float] | None) -> dict[str, int]:
        """Without redistribution every layer grows what it dropped; with it, the dropped total is split across the
        layers in proportion to their statistic, each capped at dense (sparse momentum's redistribution)."""
        if statistics is None or not math.fsum(statistics[name] for name in n_drop) > 0:
            return n_drop  # no statistic to go by (all zero): every layer regrows what it dropped
        names = list(n_drop)
        capacity = [self.layers[name].numel - self.layers[name].count() + n_drop[name] for name in names]
        counts = redistribute(sum(n_drop.values()), [statistics[name] for name in names], capacity)
        return dict(zip(names, counts, strict=True))

    def _statistics(self) -> dict[str, float]:
        """{layer: mean |momentum| (or |w|) over its active weights}, sparse_learning's redistribution statistic."""
        fn = f"{type(self).__name__}.step"
        out = {}
        for name, layer in self.layers.items():
            values = layer.active_values() if self.redistribution == "magnitude" else self._active_momentum(name)
            value = float(values.detach().double().abs().mean()) if values.numel() else 0.0
            if not math.isfinite(value):
                raise ValueError(
                    f"{fn}: the {self.redistribution} of {name!r} holds inf or NaN; no connection was changed"
                )
            out[name] = value
        return out

    def _active_momentum(self, name: str) -> torch.Tensor:
        """The optimizer's momentum at the active weights (nnz-sized reads): SGD's momentum_buffer, or Adam's
        exp_avg / (sqrt(exp_avg_sq) + 1e-8), as sparse_learning reads it."""
        layer = self.layers[name]
        state = self.optimizer.state.get(layer.param) or {}
        if isinstance(state.get("exp_avg"), torch.Tensor) and isinstance(state.get("exp_avg_sq"), torch.Tensor):
            return layer.active_of(state["exp_avg"]) / (layer.active_of(state["exp_avg_sq"]).sqrt() + 1e-8)
        if isinstance(state.get("momentum_buffer"), torch.Tensor):
            return layer.active_of(state["momentum_buffer"])
        raise ValueError(
            f"{type(self).__name__}.step: redistribution='momentum' reads the optimizer's momentum (SGD's "
            f"momentum_buffer or Adam's exp_avg and exp_avg_sq), which {type(self.optimizer).__name__} does not hold "
            f"for {name!r}; use SGD with momentum > 0 or Adam/AdamW and take an optimizer step before the first "
            "update, or redistribution='magnitude'; no connection was changed"
        )

    def _batches(self, name: str):
        # One (x, g) per backward pass: a forward without a backward adds nothing to the gradient or the scores.
        return self._records.get(name, [])

    def _generator(self):
        return None

    def _scores(self, name: str):
        return None

    def _extra_state(self) -> dict:
        if self.redistribution is None:
            return {}
        return {"density_history": [dict(entry) for entry in self.density_history]}

    def _check_extra_state(self, fn: str, state: dict) -> None:
        if self.redistribution is None:
            return
        history = state["density_history"]
        if not (
            isinstance(history, list)
            and all(
                isinstance(entry, dict)
                and set(entry) == set(self.layers)
                and all(isinstance(v, float) and 0 <= v <= 1 for v in entry.values())
                for entry in history
            )
        ):
            raise ValueError(f"{fn}: density_history must be a list of {{layer name: density in [0, 1]}}")

    def _load_extra_state(self, state: dict) -> None:
        if self.redistribution is not None:
            self.density_history = [dict(entry) for entry in state["density_history"]]

    def _record_inputs(self) -> None:
        """Hooks that record every SparseLinear's inputs and output gradients while ``_capturing`` (RigL: on update
        steps, for outer_topk; SNFS: every step, for its dense momentum)."""
        for name, layer in self.layers.items():
            if isinstance(layer, CompressedLayer):
                self._hooks.append(layer.module.register_forward_hook(self._recorder(name)))

    def _record(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Keep one backward pass's (x, g) of a SparseLinear (copies: the batch may be reused in place)."""
        self._records.setdefault(name, []).append((x.clone(), g.clone()))

    def _recorder(self, name: str):
        slot = next(_SLOTS)
        _RECORDERS[slot] = (weakref.ref(self), name)
        weakref.finalize(self, _RECORDERS.pop, slot, None)
        target = self.layers[name].module

        # Compiled: records on every training forward (the opaque op reads _capturing when the backward runs), so
        # torch.compile traces one graph with no guard on the schedule and no Python side effect in it. Eager: only
        # on capture steps (nothing is traced, so the check costs nothing and other steps get no extra node).
        def record(module, args, output):
            # copy.deepcopy(model) copies this hook: it records only on the module it was put on
            if module is not target or not torch.is_grad_enabled() or not output.requires_grad:
                return None
            # Not a tensor hook: one on an output then changed in place (ReLU(inplace=True)) never fires.
            if torch.compiler.is_compiling():
                return _RecordGrad.apply(output, args[0], slot)
            if _capturer(slot) is not None:
                # a 2-D SparseLinear output is a same-shape view; marking a view dirty would cost a copy
                return _RecordGrad.apply(output._base if _same_view(output) else output, args[0], slot)
            return None

        return record


class SET(_DropGrow):
    """SET (Mocanu et al. 2018) with RigL's schedule: every ``delta_t`` optimizer steps until ``t_end``, drop the
    ⌊α_t · n_active⌋ smallest |w| of each layer and grow as many positions uniformly at random among those not kept
    (a seeded generator, identical on every rank). Dense layers are left as they are, as with :class:`RigL`.

    Args:
        model, optimizer, group: as :class:`Static`.
        total_steps: optimizer steps in the run (sets ``t_end``).
        delta_t, alpha, t_end: the :class:`UpdateSchedule` (defaults 100, 0.3, 0.75).
        keep_optimizer_step: also take the optimizer step on update steps (default: skip it, as RigL does; with
            it, update steps hold a copy of the optimizer's parameters and state, to undo a failed update).
        seed: the generator's seed (its state is part of ``state_dict()``).
        redistribution: as :class:`RigL` (default None: every layer keeps its count).

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> loader, epochs = [(torch.randn(32, 64), torch.randint(0, 10, (32,)))] * 4, 5
        >>> sparsifier = sparsekern.SET(model, optimizer, total_steps=len(loader) * epochs, seed=0)
        >>> # train as with Static: backward, sparsifier.step(), optimizer.zero_grad()
    """

    grow = "random"
    flops_rule = "sparse"  # the random grow needs no gradient: SET costs what static training costs

    keeps_structure = True

    def __init__(self, model, optimizer, *, total_steps, delta_t=100, alpha=0.3, t_end=0.75,
                 keep_optimizer_step=False, seed: int = 0, redistribution=None, group=None, structure=None,
                 transposable: bool = False):  # fmt: skip
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"SET: seed must be an int, got {seed!r}")
        super().__init__(model, optimizer, total_steps=total_steps, delta_t=delta_t, alpha=alpha, t_end=t_end,
                         keep_optimizer_step=keep_optimizer_step, redistribution=redistribution,
                         group=group, structure=structure, transposable=transposable)  # fmt: skip
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def _config(self) -> dict:
        return {**super()._config(), "seed": self.seed}

    def _generator(self):
        return self.generator

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "generator": self.generator.get_state()}

    def _check_extra_state(self, fn: str, state: dict) -> None:
        super()._check_extra_state(fn, state)
        check_generator_state(fn, state["generator"], self.generator)

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self.generator.set_state(state["generator"])

    def step(self) -> bool:
        # The generator is consumed by planning; restore it if the update fails so a retry draws the same.
        saved = self.generator.get_state()
        try:
            return super().step()
        except BaseException:
            self.generator.set_state(saved)
            raise


class RigL(_DropGrow):
    """RigL (Evci et al. 2020, google-research/rigl): every ``delta_t`` optimizer steps until ``t_end``, each layer
    drops its ⌊α_t · n_active⌋ smallest |w| (α_t = α/2 · (1 + cos(π t / t_end))) and grows as many positions with
    the largest |dL/dW| among those not kept by the drop.

    Grown weights start at 0 with zero optimizer state; a dropped connection that is grown again keeps its value
    (so a dense layer, as ERK's capacity loop can make one, is left as it is);
    the optimizer step of an update step is skipped (``keep_optimizer_step=True`` takes it). On SparseLinear
    layers the scores come from :func:`sparsekern.outer_topk` over the layer inputs and output gradients of every
    micro-batch of the update step (recorded by hooks, kept only on update steps), so the dense gradient is never
    formed and gradient accumulation is exact; masked layers use their dense gradient. Under DDP the grow uses
    every rank's batch and the new masks' checksums are compared across ranks before anything changes.

    Args:
        model, optimizer, group: as :class:`Static`.
        total_steps: optimizer steps in the run (sets ``t_end``).
        delta_t, alpha, t_end: the :class:`UpdateSchedule` (defaults 100, 0.3, 0.75 as in the paper).
        keep_optimizer_step: also take the optimizer step on update steps (the new masks are chosen from the
            weights and gradients before that step and applied after it). So that a failed update can be undone,
            update steps then hold a copy of every parameter, gradient and optimizer state the optimizer holds.
        precision: the arithmetic of the grow scores on SparseLinear layers (:func:`sparsekern.outer_topk`):
            "fast" (default: the fastest of the device, the same bits run to run and on every rank, within a
            stated rounding bound of float64) or "exact" (one rounding order, bit-identical on every backend and
            device). Part of ``state_dict()``'s configuration; masked layers use their dense gradient either way.
        redistribution: None (default: every layer grows what it dropped, so its density and the FLOPs stay
            constant), "momentum" or "magnitude": the connections all layers dropped are grown again across the
            layers in proportion to each layer's mean |momentum| (the optimizer's: SGD's momentum_buffer or Adam's
            exp_avg / (sqrt(exp_avg_sq) + 1e-8), read at the active weights only) or mean |w| over its active
            weights, each layer capped at dense (sparse momentum's rule, :class:`SNFS`). Layer densities then drift,
            and so do the training and inference FLOPs: RigL's constant cost no longer holds (the point the RigL
            reproducibility report makes). The densities after each update are kept in ``density_history`` (a list
            of {layer name: density}, part of ``state_dict()``). Dense layers then take part in updates. Under DDP
            it needs masked layers: a DDP wrapper cannot follow SparseLinear's changing nonzero counts (pass the
            model itself with ``group=`` and average the gradients yourself there).

    Raises:
        as :class:`Static`, and ValueError for bad schedule values, precision or redistribution; ``step()`` raises
        ValueError when an update step has no recorded gradient (no backward), non-finite scores or statistics, or
        (redistribution="momentum") an optimizer without momentum state, leaving everything unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> rigl = sparsekern.RigL(model, optimizer, total_steps=40, delta_t=10)
        >>> def micro_batches():                              # two of 16 per optimizer step
        ...     return [(torch.randn(16, 64), torch.randint(0, 10, (16,))) for _ in range(2)]
        >>> for step in range(40):
        ...     for x, y in micro_batches():                  # gradient accumulation is fine
        ...         nn.functional.cross_entropy(model(x), y).backward()
        ...     moved = rigl.step()                           # instead of optimizer.step()
        ...     optimizer.zero_grad()
        >>> round(sparsekern.sparsity_report(model).sparsity, 4)  # the masks moved, the sparsity did not
        0.9
    """

    # a state saved before RigL took `precision` grew by exact scores: it resumes on RigL(precision="exact")
    _saved_before = {**_DropGrow._saved_before, "precision": "exact"}
    flops_rule = "rigl"

    keeps_structure = True

    def __init__(self, model, optimizer, *, total_steps, delta_t=100, alpha=0.3, t_end=0.75,
                 keep_optimizer_step=False, precision: str = "fast", redistribution=None, group=None,
                 structure=None, transposable: bool = False):  # fmt: skip
        self.precision = check_precision("RigL", precision)
        super().__init__(model, optimizer, total_steps=total_steps, delta_t=delta_t, alpha=alpha, t_end=t_end,
                         keep_optimizer_step=keep_optimizer_step, redistribution=redistribution,
                         group=group, structure=structure, transposable=transposable)  # fmt: skip
        self._record_inputs()

    def _config(self) -> dict:
        return {**super()._config(), "precision": self.precision}


# RigL's recording hooks by slot: (weak reference to the RigL, layer name); a slot outlives neither.
_RECORDERS: dict[int, tuple[weakref.ref, str]] = {}
_SLOTS = itertools.count()


def _capturer(slot: int) -> tuple[_DropGrow, str] | None:
    """(sparsifier, layer name) of ``slot`` while that sparsifier captures (RigL: an update step), else None."""
    owner = _RECORDERS.get(slot)
    sparsifier = owner[0]() if owner is not None else None
    if sparsifier is None or not sparsifier._capturing:
        return None
    return sparsifier, owner[1]


@torch.library.custom_op("sparsekern::rigl_record", mutates_args=())
def rigl_record(x: torch.Tensor, g: torch.Tensor, slot: int) -> None:
    """Hand one backward pass's layer input ``x`` and output gradient ``g`` to the RigL of ``slot``, kept (copied, as
    (B, in_features) and (B, out_features)) only while it captures an update step. Opaque to torch.compile and
    declared side-effectful below, so compiled graphs keep it and never depend on the capture state."""
    capturer = _capturer(slot)
    if capturer is not None:
        sparsifier, name = capturer
        sparsifier._record(name, x.detach().reshape(-1, x.shape[-1]), g.detach().reshape(-1, g.shape[-1]))


@rigl_record.register_fake
def _(x, g, slot):
    return None


def _same_view(y: torch.Tensor) -> bool:
    """y is a view of exactly its base's elements, in the same layout."""
    base = y._base
    return (
        base is not None
        and base.shape == y.shape
        and base.stride() == y.stride()
        and base.storage_offset() == y.storage_offset()
    )


class _RecordGrad(torch.autograd.Function):
    """An in-place identity on a layer output whose backward gives (x, dL/dy) to :func:`rigl_record`, also when the
    output is then changed in place; ``mark_dirty`` (rather than returning a view) keeps such in-place ops legal."""

    @staticmethod
    def forward(ctx, y, x, slot):
        ctx.mark_dirty(y)
        ctx.save_for_backward(x)
        ctx.slot = slot
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        rigl_record(x, g, ctx.slot)
        return g, None, None


torch.fx.node.has_side_effect(torch.ops.sparsekern.rigl_record.default)  # no output: keep it out of dead-code removal
