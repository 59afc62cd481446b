"""Layer-wise density: uniform, Erdős–Rényi (ER) and Erdős–Rényi-kernel (ERK), with exact integer counts.

Follows google-research/rigl (``sparse_utils.get_sparsities``): ER/ERK give layer l a density proportional to
``Σ dims / Π dims`` (ER: only the output and input channels of a conv kernel), scaled by one ε so the total
number of nonzeros matches the target; a layer whose density would exceed 1 is made dense and ε is solved again
without it (the capacity loop). Layers kept dense by choice (``dense=``, as rigl's ``custom_sparsity_map`` with
sparsity 0, e.g. its first-layer-dense option) are left out of the budget: the other layers alone meet the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTRIBUTIONS = ("uniform", "er", "erk")


def _check_sparsity(fn: str, sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{fn}: sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _raw_weight(shape: Sequence[int], distribution: str) -> float:
    """Σ dims / Π dims (ERK), or for ER (n_out + n_in) / (n_out * n_in) of the first two dims (torch order)."""
    if distribution == "er":
        shape = shape[:2]
    return sum(shape) / math.prod(shape)


def layer_nnz(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    dense: Sequence[bool] | None = None,
) -> list[int]:
    """Exact nonzero counts per layer for a target overall ``sparsity``.

    Args:
        shapes: the weight shapes in torch order ((out, in) for Linear, (out, in, *kernel) for conv).
        sparsity: target fraction of zeros in [0, 1).
        distribution: "uniform" (every layer ``round((1 - sparsity) * numel)``), "er" or "erk" (the total is
            ``round((1 - sparsity) * Σ numel)`` exactly; shares from the formula, rounded by largest remainder).
        dense: per layer, True to keep it dense and out of the budget: the other layers get the counts they
            would get without it, so their total sparsity is the target (google-research/rigl's
            ``custom_sparsity_map``, which ``get_sparsities_erdos_renyi`` leaves out of its ε equation).

    Returns:
        one int per layer, each in [0, numel].

    Raises:
        ValueError: unknown distribution, sparsity outside [0, 1), empty or non-positive shapes, or ``dense``
            of another length.

    Example::

        >>> layer_nnz([(256, 64), (256, 256), (10, 256)], 0.9, "erk")
        [2462, 3939, 2047]
    """
    fn = "layer_nnz"
    sparsity = _check_sparsity(fn, sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"{fn}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    shapes = [tuple(s) for s in shapes]
    if not shapes or any(len(s) < 2 or any(not isinstance(d, int) or d <= 0 for d in s) for s in shapes):
        raise ValueError(f"{fn}: shapes must be a non-empty list of shapes of >= 2 positive ints, got {shapes}")
    dense = [False] * len(shapes) if dense is None else [bool(d) for d in dense]
    if len(dense) != len(shapes):
        raise ValueError(f"{fn}: dense must have one entry per shape ({len(shapes)}), got {len(dense)}")
    numel = [math.prod(s) for s in shapes]
    if any(dense):
        # chosen dense layers are out of the budget: the others are counted as if the dense ones were not there
        counts = list(numel)
        free = [i for i, d in enumerate(dense) if not d]
        if free:
            for i, count in zip(free, layer_nnz([shapes[i] for i in free], sparsity, distribution), strict=True):
                counts[i] = count
        return counts
    if distribution == "uniform":
        return [int(round((1.0 - sparsity) * n)) for n in numel]

    total = int(round((1.0 - sparsity) * sum(numel)))
    raw = [_raw_weight(s, distribution) for s in shapes]
    while True:
        # a layer made dense by the capacity loop stays in the budget (its nonzeros come out of the others')
        budget = total - sum(n for n, d in zip(numel, dense, strict=True) if d)
        divisor = sum(r * n for r, n, d in zip(raw, numel, dense, strict=True) if not d)
        if divisor == 0:  # every layer went dense: only at sparsity 0, by float rounding of ε
            break
        eps = budget / divisor
        # the capacity loop: every layer at the largest density goes dense, then ε is solved again
        top = max(r for r, d in zip(raw, dense, strict=True) if not d)
        if eps * top <= 1.0:
            break
        dense = [d or r == top for r, d in zip(raw, dense, strict=True)]

    counts = [n if d else 0 for n, d in zip(numel, dense, strict=True)]
    free = [i for i, d in enumerate(dense) if not d]
    if free:
        share = {i: eps * raw[i] * numel[i] for i in free}
        for i in free:
            counts[i] = min(numel[i], math.floor(share[i]))
        # largest remainder (ties: earlier layer), never past a layer's size, so the total is exact
        left = total - sum(counts)
        order = sorted(free, key=lambda i: (-(share[i] - math.floor(share[i])), i))
        while left > 0:
            progressed = False
            for i in order:
                if left and counts[i] < numel[i]:
                    counts[i] += 1
                    left -= 1
                    progressed = True
            if not progressed:
                break
    return counts
