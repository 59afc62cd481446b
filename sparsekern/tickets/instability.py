"""Instability analysis (Frankle et al. 2020): train copies of one network from a rewind point with different
SGD noise and measure the error barrier between the results."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .interpolate import InterpolationCurve, _first_mismatch, interpolate


@dataclass(frozen=True)
class InstabilityResult:
    """The curve between every pair of copies trained from one rewind point (``curves[(seed_i, seed_j)]``)."""

    seeds: tuple[int, ...]
    curves: dict[tuple[int, int], InterpolationCurve]

    @property
    def barrier(self) -> float:
        """Mean over the pairs of the linear-reference error barrier."""
        return sum(c.barrier for c in self.curves.values()) / len(self.curves)

    @property
    def barrier_max(self) -> float:
        """Mean over the pairs of the max-reference error barrier (Frankle et al.'s definition)."""
        return sum(c.barrier_max for c in self.curves.values()) / len(self.curves)

    def to_dict(self) -> dict:
        return {
            "seeds": list(self.seeds),
            "barrier": self.barrier,
            "barrier_max": self.barrier_max,
            "pairs": [{"seeds": list(pair), **curve.to_dict()} for pair, curve in self.curves.items()],
        }


def instability(
    model: nn.Module,
    train_fn: Callable[[nn.Module, int], nn.Module | None],
    *,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    seeds: Sequence[int] = (0, 1),
    **interpolate_kwargs,
) -> InstabilityResult:
    """Is the network stable to SGD noise from ``rewind_state`` on (Frankle et al. 2020, "Linear Mode
    Connectivity and the Lottery Ticket Hypothesis")?

    For each seed: a copy of ``model`` (its architecture and masks) is loaded with ``rewind_state`` (default: the
    model's current state, w_k) and trained by ``train_fn(copy, seed)``, which trains in place (it may also
    return the trained module) and must draw its data order from ``seed``. Around each call the global torch RNG
    is seeded with ``seed`` and restored afterwards, so dropout and initialisation inside ``train_fn`` are
    reproducible and the caller's RNG is untouched. Then :func:`interpolate` runs between every pair of trained
    copies with ``interpolate_kwargs`` (``data=`` or ``evaluate=``, ``betas=``, ``bn_data=``, ...).

    ``model`` and ``rewind_state`` are not changed. Returns an :class:`InstabilityResult` (``.barrier``,
    ``.barrier_max``: the means over pairs; ``.curves``; ``.to_dict()``). A sweep over rewind points k is a loop
    over ``rewind_state``.

    Raises ``ValueError`` for fewer than two seeds or repeated seeds, a ``rewind_state`` that does not fit
    ``model``, or bad interpolation arguments; ``TypeError`` when ``train_fn`` is not callable or returns
    something other than a module or None."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"instability: model must be an nn.Module, got {type(model).__name__}")
    if not callable(train_fn):
        raise TypeError(f"instability: train_fn must be callable, got {type(train_fn).__name__}")
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"instability: seeds must be at least two different ints, got {seeds}")
    if rewind_state is not None:
        mismatch = _first_mismatch(model, rewind_state)
        if mismatch:
            raise ValueError(f"instability: rewind_state does not fit the model: {mismatch}")
    start = copy.deepcopy(model)
    if rewind_state is not None:
        start.load_state_dict(rewind_state)
    # fork only the CUDA devices the model lives on: forking all of them would initialise CUDA
    devices = sorted({p.device.index or 0 for p in start.parameters() if p.device.type == "cuda"})
    trained = {}
    for seed in seeds:
        network = copy.deepcopy(start)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            result = train_fn(network, seed)
        if result is not None and not isinstance(result, nn.Module):
            raise TypeError(f"instability: train_fn must return a module or None, got {type(result).__name__}")
        trained[seed] = network if result is None else result
    curves = {
        (s, t): interpolate(trained[s], trained[t], model=start, **interpolate_kwargs)
        for s, t in itertools.combinations(seeds, 2)
    }
    return InstabilityResult(seeds, curves)
