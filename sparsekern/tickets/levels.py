"""Linear mode connectivity between the successive solutions of iterative magnitude pruning (Paul et al. 2023,
"Unmasking the Lottery Ticket Hypothesis", Fig. 2): the piecewise-linear path w(0) -> w(1) -> ... through the
levels and the error barrier between every pair of levels."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .interpolate import REFERENCES, InterpolationCurve, _betas, _first_mismatch, error_barrier, interpolate

PROGRESS_PAIRS = 10  # from this many pairs on (5 levels) a progress bar is shown by default


@dataclass(frozen=True)
class LevelConnectivity:
    """The :func:`interpolate` curve between every pair of levels i < j (``curves[(i, j)]``), ``num_levels``
    levels in all."""

    num_levels: int
    curves: dict[tuple[int, int], InterpolationCurve]

    @property
    def path(self) -> InterpolationCurve:
        """The piecewise-linear path through the levels as one curve: ``betas`` holds the position
        x = level + β (0 to num_levels − 1), followed by the losses and errors. It is the consecutive pairs'
        curves concatenated; where two segments meet (level k is β=1 of segment k−1 and β=0 of segment k) the
        point is kept once, from segment k−1."""
        xs, losses, errors = [], [], []
        for level in range(self.num_levels - 1):
            curve = self.curves[(level, level + 1)]
            start = 0 if level == 0 else 1  # β=0 of this segment is the previous segment's β=1
            xs += [level + beta for beta in curve.betas[start:]]
            losses += curve.losses[start:]
            errors += curve.errors[start:]
        return InterpolationCurve(tuple(xs), tuple(losses), tuple(errors))

    def barriers(self, *, reference: str = "linear", metric: str = "error") -> list[list[float]]:
        """The symmetric num_levels × num_levels matrix of :func:`error_barrier` (``reference``, ``metric``) of
        each pair's curve, 0 on the diagonal. Both references are unchanged by running the line backwards
        (β -> 1 − β), so entry (j, i) is entry (i, j)."""
        matrix = [[0.0] * self.num_levels for _ in range(self.num_levels)]
        for (i, j), curve in self.curves.items():
            matrix[i][j] = matrix[j][i] = error_barrier(curve, reference=reference, metric=metric)
        return matrix

    def to_dict(self) -> dict:
        path = self.path
        return {
            "num_levels": self.num_levels,
            "path": {"x": list(path.betas), "losses": list(path.losses), "errors": list(path.errors)},
            "barrier": self.barriers(reference="linear"),
            "barrier_max": self.barriers(reference="max"),
            "loss_barrier": self.barriers(reference="linear", metric="loss"),
            "pairs": [{"levels": [i, j], **curve.to_dict()} for (i, j), curve in self.curves.items()],
        }

    def plot(self, path_png: str, heatmap_png: str) -> None:
        """Write two PNGs: the test error along the path against the level position (``path_png``), and the
        heatmaps of the pairwise error barriers, against the linear reference and against the worse endpoint,
        with each value written in its cell (``heatmap_png``). Needs matplotlib (``pip install
        'sparsekern[plot]'``); raises ``ImportError`` saying so when it is missing."""
        try:
            import matplotlib
        except ImportError as err:
            raise ImportError(
                "LevelConnectivity.plot needs matplotlib: pip install matplotlib (or 'sparsekern[plot]')"
            ) from err
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt

        levels = range(self.num_levels)
        path = self.path
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * self.num_levels), 3.2))
        ax.plot(path.betas, [100.0 * e for e in path.errors], marker=".")
        ax.set_xticks(list(levels))
        ax.set_xlabel("IMP level (level + β along the path)")
        ax.set_ylabel("test error (%)")
        ax.set_title("error along the path through the levels")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path_png, dpi=120)
        plt.close(fig)

        size = max(4.5, 0.6 * self.num_levels + 2.0)
        fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
        for ax, reference in zip(axes, REFERENCES, strict=True):
            matrix = [[100.0 * v for v in row] for row in self.barriers(reference=reference)]
            top = max(max(row) for row in matrix)
            image = ax.imshow(matrix, cmap="viridis", vmin=0.0)
            for i, j in itertools.product(levels, levels):
                color = "k" if matrix[i][j] > top / 2 else "w"  # readable on viridis' bright and dark ends
                ax.text(j, i, f"{matrix[i][j]:.1f}", ha="center", va="center", color=color, fontsize=8)
            ax.set_xticks(list(levels))
            ax.set_yticks(list(levels))
            ax.set_xlabel("level")
            ax.set_ylabel("level")
            against = "the chord (Paul et al.)" if reference == "linear" else "the worse end (Frankle et al.)"
            ax.set_title(f"error barrier (%) over {against}", fontsize=10)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(heatmap_png, dpi=120)
        plt.close(fig)


def level_connectivity(
    solutions: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    *,
    model: nn.Module | None = None,
    betas: int | Sequence[float] = 11,
    progress: bool | None = None,
    **interpolate_kwargs,
) -> LevelConnectivity:
    """Linear mode connectivity of the IMP solutions w(0) -> w(1) -> ... (Paul et al. 2023, Fig. 2).

    ``solutions``: the level solutions in order, models or state_dicts of one architecture (e.g. the state a
    user saves at the end of each IMP round; levels with different masks interpolate on the union of supports,
    as :func:`interpolate` does). ``model`` gives the architecture when the first solution is a state_dict.
    :func:`interpolate` runs between every pair of levels i < j with ``betas`` (which must contain 0 and 1,
    the endpoints a barrier needs) and ``interpolate_kwargs`` (``data=`` or ``evaluate=``, ``bn_data=``,
    ``loss_fn=``, ``subsample=``, ...): n levels cost n·(n−1)/2 curves. ``progress``: a tqdm bar over the
    pairs; by default shown from 10 pairs on.

    Returns a :class:`LevelConnectivity`: ``.path`` (the consecutive curves as one piecewise-linear curve,
    x = level + β), ``.barriers(reference=, metric=)`` (the pairwise matrix), ``.curves``, ``.to_dict()``
    and ``.plot(path_png, heatmap_png)``. Nothing passed in is changed.

    Raises ``ValueError`` for fewer than two solutions, a solution that does not fit the architecture (naming
    its level), betas without 0 or 1, or bad interpolation arguments; ``TypeError`` for a solution that is
    neither a module nor a state_dict, or a first solution that is a state_dict without ``model``."""
    fn = "level_connectivity"
    solutions = list(solutions)
    if len(solutions) < 2:
        raise ValueError(f"{fn}: needs at least two level solutions, got {len(solutions)}")
    for level, solution in enumerate(solutions):
        if not isinstance(solution, (nn.Module, Mapping)):
            raise TypeError(
                f"{fn}: solution {level} must be an nn.Module or a state_dict, got {type(solution).__name__}"
            )
    template = model if model is not None else solutions[0]
    if not isinstance(template, nn.Module):
        raise TypeError(f"{fn}: the first solution is a state_dict: pass model= (the architecture to load it in)")
    for level, solution in enumerate(solutions):
        state = solution.state_dict() if isinstance(solution, nn.Module) else solution
        mismatch = _first_mismatch(template, state)
        if mismatch:
            raise ValueError(f"{fn}: solution {level} does not fit the architecture: {mismatch}")
    points = _betas(betas)
    if points[0] != 0.0 or points[-1] != 1.0:
        raise ValueError(f"{fn}: betas must include 0 and 1 (the endpoints a barrier needs), got {points}")

    pairs = list(itertools.combinations(range(len(solutions)), 2))
    show = len(pairs) >= PROGRESS_PAIRS if progress is None else bool(progress)
    curves = {}
    for i, j in _progress(pairs, show):
        curves[(i, j)] = interpolate(solutions[i], solutions[j], model=template, betas=points, **interpolate_kwargs)
    return LevelConnectivity(len(solutions), curves)


def _progress(pairs: list, enabled: bool) -> Iterable:
    if not enabled:
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="level pairs", unit="pair", leave=False)
