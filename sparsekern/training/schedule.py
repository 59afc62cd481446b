"""When RigL/SET update the masks, and how many connections they move (DESIGN §4, google-research/rigl)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every ``delta_t`` optimizer steps while the step is before ``t_end``, with a cosine-decayed
    drop fraction ``α_t = α/2 · (1 + cos(π t / t_end))``.

    Steps are optimizer steps counted from 1 (the t-th call of ``Sparsifier.step()``), never micro-batches.

    Args:
        total_steps: optimizer steps in the whole run.
        delta_t: steps between updates (RigL: 100).
        alpha: initial drop fraction α in (0, 1] (RigL: 0.3).
        t_end: last step that may update, as a step count (int) or a fraction of ``total_steps`` (float in
            (0, 1]; RigL: 0.75).

    Example::

        >>> s = UpdateSchedule(total_steps=1000)
        >>> s.t_end_step, s.is_update(100), s.is_update(101), round(s.drop_fraction(100), 4)
        (750, True, False, 0.287)
        >>> s.n_drop(100, 10_000)
        2870
    """

    total_steps: int
    delta_t: int = 100
    alpha: float = 0.3
    t_end: float | int = 0.75

    def __post_init__(self):
        fn = "UpdateSchedule"
        _positive_int(fn, "total_steps", self.total_steps)
        _positive_int(fn, "delta_t", self.delta_t)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"{fn}: alpha must be a number in (0, 1], got {self.alpha!r}")
        if isinstance(self.t_end, bool) or not isinstance(self.t_end, (int, float)):
            raise ValueError(f"{fn}: t_end must be an int step or a float fraction of total_steps, got {self.t_end!r}")
        if isinstance(self.t_end, float) and not 0 < self.t_end <= 1:
            raise ValueError(f"{fn}: t_end as a fraction must lie in (0, 1], got {self.t_end!r}")
        if isinstance(self.t_end, int) and not 0 < self.t_end <= self.total_steps:
            raise ValueError(f"{fn}: t_end as a step must lie in [1, total_steps={self.total_steps}], got {self.t_end}")

    @property
    def t_end_step(self) -> int:
        return self.t_end if isinstance(self.t_end, int) else int(self.t_end * self.total_steps)

    def is_update(self, step: int) -> bool:
        """True when optimizer step ``step`` (1-based) updates the masks."""
        return step % self.delta_t == 0 and step < self.t_end_step

    def drop_fraction(self, step: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * min(step, self.t_end_step) / self.t_end_step))

    def n_drop(self, step: int, n_active: int) -> int:
        """⌊α_t · n_active⌋ connections to drop (and grow) in a layer with ``n_active`` nonzeros."""
        return math.floor(self.drop_fraction(step) * n_active)


MAX_PRUNE_ROUNDS = 1000


def prune_counts(total: int, target: int, fraction: float, tolerance: float = 0.5) -> list[int] | None:
    """The weights left after each prune of iterative pruning, ``[total, ..., target]``, or None past
    :data:`MAX_PRUNE_ROUNDS` prunes.

    Prune r keeps ``round(total · (1 − fraction)^r)``: the geometric count rounded once, not rounded again every
    round, so per-layer and global rounding cannot drift apart. The first prune whose geometric count comes within
    ``tolerance`` of ``target`` prunes to it (a target summed from per-layer rounded counts lies within half a weight
    per layer of the geometric one; no extra round for such a difference). Every prune removes at least one weight,
    so the schedule ends even when ``fraction · count`` rounds to zero.

    Example::

        >>> prune_counts(100, 1, 0.2)[-4:], len(prune_counts(100, 1, 0.2))
        ([4, 3, 2, 1], 18)
    """
    counts = [total]
    while counts[-1] > target:
        if len(counts) > MAX_PRUNE_ROUNDS:
            return None
        exact = total * (1.0 - fraction) ** len(counts)
        count = target if exact <= target + tolerance else min(counts[-1] - 1, round(exact))
        counts.append(max(target, count))
    return counts
