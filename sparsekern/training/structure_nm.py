"""N:M masks that sparse training keeps exactly: every group of m consecutive weights along the input dim holds n.

The weight is seen as (n_out, n_in) (a conv weight flattened to (out_channels, in_channels * kernel)); the groups
are columns [g*m, (g+1)*m) of each row. With ``transposable=True`` every m x m tile (rows and columns both aligned to
m) holds exactly n per row and n per column, so the transpose is N:M too (2:4 along the output dim: what the
backward dX = G W needs on sparse tensor cores).

The selections (ties always to the lower index, or for tiles to the first pattern in the order
:func:`sparsekern.semi24_mask` uses) are those of :func:`sparsekern.ops.semi24_mask.group_topk_mask` and
:func:`~sparsekern.ops.semi24_mask.transposable_mask`, the same code that :func:`sparsekern.semi24_mask`,
:func:`sparsekern.training.nm_mask` and SR-STE run: there is one implementation of each selection in the package.
Scores and keys are magnitudes: the selections compare ``|scores|`` (what RigL, SET and the initial masks pass are
nonnegative already).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .._validate import all_finite
from ..ops.semi24_mask import _tile_patterns, group_topk_mask, transposable_mask
from .structure import Structure
from .structure_fan_in import round_half_up, row_largest

_MAX_TRANSPOSABLE_M = 5  # the m x m tile patterns are enumerated (m = 5: 2040 patterns for n = 2); m = 6 is too many
_MAX_TABLE_M = 4  # kept sets of an m x m tile looked up in a (2^(m*m), patterns) table up to 4 x 4 (5.9 MB)
_TILE_CHUNK = 1 << 15  # tiles scored against every pattern at once (a (chunk, patterns) float64 block)
_FEW = 16  # a kept set that at most this many patterns contain is scored on its candidate list alone


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """The m x m tile patterns with n per row and column, in the tie order, and for m <= 4 lookup tables indexed by
    a kept set's bits (bit i: row-major tile position i is kept)."""

    patterns: torch.Tensor  # (P, m*m) float64 0/1
    masks: torch.Tensor  # the same as bool
    positions: torch.Tensor  # (P, n*m) int64: each pattern's positions, ascending
    infeasible: torch.Tensor | None  # (2^(m*m), P) bool: pattern p lacks an entry of the kept set
    counts: torch.Tensor | None  # (2^(m*m),) int64: the patterns that contain the kept set
    candidates: torch.Tensor | None  # (2^(m*m), _FEW) int64: the first _FEW of them, ascending (pattern order)

    def to(self, device: torch.device) -> _Tiles:
        return _Tiles(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))


@functools.cache
def _tiles(m: int, n: int, device: torch.device) -> _Tiles:
    if device.type != "cpu":
        return _tiles(m, n, torch.device("cpu")).to(device)
    patterns = _tile_patterns(m, n)
    positions = patterns.bool().nonzero()[:, 1].view(len(patterns), n * m)
    if m > _MAX_TABLE_M:
        return _Tiles(patterns, patterns.bool(), positions, None, None, None)
    codes = (patterns.to(torch.int64) << torch.arange(m * m)).sum(1)  # (P,)
    infeasible = (torch.arange(1 << (m * m)).unsqueeze(1) & ~codes) != 0
    counts = (~infeasible).sum(1)
    candidates = infeasible.to(torch.uint8).argsort(dim=1, stable=True)[:, :_FEW]  # feasible first, in order
    return _Tiles(patterns, patterns.bool(), positions, infeasible, counts, candidates)


class NM(Structure):
    """Keep exactly ``n`` of every ``m`` consecutive weights along the input dim (``structure="2:4"``), and with
    ``transposable=True`` (``"2:4T"``) exactly ``n`` per row and per column of every m x m tile.

    The density is fixed at n / m: :meth:`count` ignores the distribution's budget.

    Update rule (RigL, SET):

    - :meth:`drop`: in each row, the ``round(fraction * a)`` active connections with the smallest keys, where ``a``
      is the row's active count (``n_in * n / m`` for a valid mask) and ``round`` rounds half up (as
      :class:`~sparsekern.training.structure_fan_in.FanIn`, whose per-row selection it runs); ties drop the lower
      column first. The drop is per row, not per group: a group may lose any number of its n,
      and the magnitude order of the whole row decides, as unstructured RigL's does over the whole layer.
    - :meth:`grow`: every group that lost j connections grows its j largest scores among its positions not kept
      (a just-dropped one may come back); ties to the lower column. Transposable: in every m x m tile, among the
      patterns with n per row and column that contain all the tile's kept connections (one exists: kept is part
      of the valid pattern before the drop), the one whose new positions have the largest sum of scores (summed
      in float64; ties: the first pattern in :func:`sparsekern.semi24_mask`'s order, which prefers lower
      row-major positions).

    Args:
        n, m: keep n of every m, 0 < n < m.
        transposable: keep the m x m tiles N:M along both dims (needs m <= 5: the tile patterns are enumerated).

    Raises:
        ValueError: n, m not ints with 0 < n < m; transposable with m > 5.
        TypeError: transposable not a bool.

    Example::

        >>> nm = NM(2, 4)
        >>> mask = nm.initial(torch.rand(8, 16), nm.count((8, 16), 0))
        >>> nm.violation(mask) is None
        True
    """

    def __init__(self, n: int, m: int, transposable: bool = False):
        for what, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"structure: N:M needs integers N and M, got {what}={value!r}")
        if not 0 < n < m:
            raise ValueError(f"structure: N:M needs 0 < N < M (keep N of every M), got '{n}:{m}'")
        if not isinstance(transposable, bool):
            raise TypeError(f"structure: transposable must be a bool, got {transposable!r}")
        if transposable and m > _MAX_TRANSPOSABLE_M:
            raise ValueError(
                f"structure: transposable=True supports M <= {_MAX_TRANSPOSABLE_M} (its m x m tile patterns are "
                f"enumerated), got '{n}:{m}'"
            )
        self.n, self.m, self.transposable = n, m, transposable
        self.name = f"{n}:{m}T" if transposable else f"{n}:{m}"
        self.row_block = m if transposable else 1

    def __eq__(self, other) -> bool:
        return isinstance(other, NM) and (self.n, self.m, self.transposable) == (other.n, other.m, other.transposable)

    def __hash__(self) -> int:
        return hash((NM, self.n, self.m, self.transposable))

    def __repr__(self) -> str:
        return f"NM({self.n}, {self.m}, transposable={self.transposable})"

    @property
    def density(self) -> float:
        return self.n / self.m

    # -- shape and count ----------------------------------------------------------------------------------------
    def check_shape(self, fn: str, layer: str, shape: tuple[int, int]) -> None:
        n_out, n_in = shape
        if n_in % self.m:
            raise ValueError(
                f"{fn}: {layer} has {n_in} inputs (weight viewed as {n_out} x {n_in}), not a multiple of m={self.m}; "
                f"structure {self.name!r} groups {self.m} consecutive inputs (leave the layer dense with exclude=)"
            )
        if self.transposable and n_out % self.m:
            raise ValueError(
                f"{fn}: {layer} has {n_out} outputs (weight viewed as {n_out} x {n_in}), not a multiple of "
                f"m={self.m}; structure {self.name!r} needs both dims multiples of {self.m} (leave the layer dense "
                "with exclude=)"
            )

    def count(self, shape: tuple[int, int], nnz: int) -> int:
        n_out, n_in = shape
        return n_out * (n_in // self.m) * self.n

    # -- selections ---------------------------------------------------------------------------------------------
    def initial(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        fn = f"{self.name} initial mask"
        self._check_matrix(fn, "scores", scores)
        _check_finite(fn, "scores", scores)
        expected = self.count(tuple(scores.shape), count)
        if count != expected:
            raise ValueError(
                f"{fn}: structure {self.name!r} gives a {tuple(scores.shape)} weight exactly {expected} nonzeros "
                f"(density {self.n}/{self.m}), asked for {count}"
            )
        if self.transposable:
            return transposable_mask(scores, keep=self.n, tile=self.m)
        return group_topk_mask(scores, keep=self.n, group=self.m)

    def drop(self, mask: torch.Tensor, keys: torch.Tensor, fraction: float) -> torch.Tensor:
        fn = f"{self.name} drop"
        self._check_matrix(fn, "mask", mask, need_bool=True)
        if keys.shape != mask.shape:
            raise ValueError(f"{fn}: keys must have the mask's shape {tuple(mask.shape)}, got {tuple(keys.shape)}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{fn}: fraction must be a number in [0, 1], got {fraction!r}")
        magnitude = keys.detach().abs()
        if bool(torch.isnan(magnitude).logical_and_(mask).any()):
            raise ValueError(f"{fn}: keys hold NaN at active connections (no magnitude order)")
        counts = round_half_up(mask.sum(1, dtype=torch.int64).double() * float(fraction))
        # the per-row selection FanIn's drop runs: the counts smallest |key| among the active, ties to the lower column
        return row_largest(magnitude, mask, counts, smallest=True)

    def drop_compact(self, keys: torch.Tensor, fraction: float) -> torch.Tensor:
        """:meth:`drop` on rows that hold equally many connections (every valid N:M mask), given compactly:
        ``keys`` (R, c) are each row's active keys in ascending column order; returns bool (R, c). The same
        selection as :meth:`drop` on the dense rows, at c / n_in of its cost (the structured plan calls it)."""
        fn = f"{self.name} drop"
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2:
            raise ValueError(f"{fn}: compact keys must be a 2-D tensor (rows, active per row), got {keys!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{fn}: fraction must be a number in [0, 1], got {fraction!r}")
        magnitude = keys.detach().abs()
        if bool(torch.isnan(magnitude).any()):
            raise ValueError(f"{fn}: keys hold NaN at active connections (no magnitude order)")
        rows, c = keys.shape
        counts = round_half_up(torch.full((rows,), c, dtype=torch.float64, device=keys.device) * float(fraction))
        return row_largest(magnitude, torch.ones_like(magnitude, dtype=torch.bool), counts, smallest=True)

    def grow(self, kept: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        fn = f"{self.name} grow"
        self._check_matrix(fn, "kept", kept, need_bool=True)
        if scores.shape != kept.shape:
            raise ValueError(f"{fn}: scores must have kept's shape {tuple(kept.shape)}, got {tuple(scores.shape)}")
        _check_finite(fn, "scores", scores)
        groups = kept.reshape(kept.shape[0], -1, self.m).sum(-1, dtype=torch.int64)
        if bool((groups > self.n).any()):
            row, group = (groups > self.n).nonzero()[0].tolist()
            raise ValueError(
                f"{fn}: kept row {row}, columns {group * self.m}..{group * self.m + self.m - 1} holds "
                f"{int(groups[row, group])}, more than n={self.n}"
            )
        if self.transposable:
            return self._grow_tiles(fn, kept, scores)
        # kept positions rank above every score (they stay); the group's remaining n - kept slots go to its largest
        # |scores| among the rest, ties to the lower column: the same group top-n selection as the initial mask
        magnitude = scores.detach().abs()
        if not magnitude.dtype.is_floating_point:
            magnitude = magnitude.double()
        ranked = magnitude.masked_fill(kept, torch.inf)
        return group_topk_mask(ranked, keep=self.n, group=self.m) & ~kept

    def _grow_tiles(self, fn: str, kept: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        m, per_tile, device = self.m, self.n * self.m, kept.device
        rows, cols = kept.shape

        def tiles(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows // m, m, cols // m, m).transpose(1, 2).reshape(-1, m * m)

        def fault(tile: int) -> ValueError:
            r, c = (m * i for i in divmod(tile, cols // m))
            return ValueError(
                f"{fn}: the kept entries of tile rows {r}..{r + m - 1}, columns {c}..{c + m - 1} fit no pattern with "
                f"{self.n} per row and column"
            )

        kept_tiles = tiles(kept)
        gains = tiles(scores.detach().abs().masked_fill(kept, 0))  # kept entries gain nothing
        table = _tiles(m, self.n, device)
        if table.counts is None:
            choice = torch.empty(len(kept_tiles), dtype=torch.int64, device=device)
            self._best_patterns(table, gains, kept_tiles, None, choice, fault)
        else:
            codes = (kept_tiles.to(torch.int64) << torch.arange(m * m, device=device)).sum(1)
            counts = table.counts[codes]
            if not bool(counts.all()):
                raise fault(int((counts == 0).nonzero()[0]))
            # most kept sets after a drop fit one pattern (a full tile: itself) or a few: score the candidates alone
            choice = table.candidates[:, 0][codes]
            for lo, hi in ((2, 4), (5, _FEW)):
                for part in ((counts >= lo) & (counts <= hi)).nonzero().reshape(-1).split(_TILE_CHUNK):
                    if not len(part):
                        continue
                    candidates = table.candidates[:, :hi][codes[part]]
                    # the sum of the scores over each candidate's new entries, in float64
                    k = candidates.shape[1]  # hi, or fewer when there are fewer patterns
                    picked = table.positions[candidates].view(len(part), -1)
                    gain = gains[part].double().gather(1, picked).view(len(part), k, per_tile).sum(-1)
                    gain.masked_fill_(torch.arange(k, device=device) >= counts[part].unsqueeze(1), -torch.inf)
                    choice[part] = candidates.gather(1, gain.argmax(dim=1, keepdim=True)).squeeze(1)
            many = (counts > _FEW).nonzero().reshape(-1)
            self._best_patterns(table, gains[many], None, codes[many], choice, fault, many)
        grown_tiles = table.masks[choice] & ~kept_tiles
        return grown_tiles.view(rows // m, cols // m, m, m).transpose(1, 2).reshape(rows, cols)

    @staticmethod
    def _best_patterns(table, gains, kept, codes, choice, fault, where=None) -> None:
        """choice[where] = the best pattern for each tile, scored against all P patterns: the infeasible ones from
        the table by ``codes``, or (no table) from ``kept`` by a matmul."""
        for i in range(0, len(gains), _TILE_CHUNK):
            part = slice(i, i + _TILE_CHUNK)
            if codes is not None:
                infeasible = table.infeasible[codes[part]]
            else:
                infeasible = (kept[part].double() @ (1.0 - table.patterns).T) != 0  # a kept entry outside it
                none = infeasible.all(1)
                if bool(none.any()):
                    raise fault(i + int(none.nonzero()[0]))
            # the sum of the scores over each pattern's new entries (float64); the first maximum: the tie rule
            gain = (gains[part].double() @ table.patterns.T).masked_fill_(infeasible, -torch.inf)
            best = gain.argmax(dim=1)
            if where is None:
                choice[part] = best
            else:
                choice[where[part]] = best

    # -- checks -------------------------------------------------------------------------------------------------
    def violation(self, mask: torch.Tensor, count: int | None = None) -> str | None:
        if mask.dim() != 2:
            return f"the mask must be 2-D (n_out, n_in), got shape {tuple(mask.shape)}"
        n_out, n_in = mask.shape
        m = self.m
        if n_in % m or (self.transposable and n_out % m):
            dims = "both dims" if self.transposable else "n_in"
            return f"the mask's shape {tuple(mask.shape)} does not suit {self.name!r}: {dims} must be multiples of {m}"
        groups = mask.reshape(n_out, n_in // m, m).sum(-1, dtype=torch.int64)
        bad = (groups != self.n).nonzero()
        if bad.numel():
            row, group = bad[0].tolist()
            return (
                f"row {row}, columns {group * m}..{group * m + m - 1} hold {int(groups[row, group])} nonzeros, "
                f"structure {self.name!r} needs {self.n}"
            )
        if self.transposable:
            columns = mask.reshape(n_out // m, m, n_in).sum(1, dtype=torch.int64)  # (tile rows, n_in)
            bad = (columns != self.n).nonzero()
            if bad.numel():
                tile_row, col = bad[0].tolist()
                start = col - col % m
                return (
                    f"tile rows {tile_row * m}..{tile_row * m + m - 1}, columns {start}..{start + m - 1}: column {col} "
                    f"holds {int(columns[tile_row, col])} nonzeros, structure {self.name!r} needs {self.n} per tile "
                    "column"
                )
        if count is not None and int(mask.sum()) != count:
            return f"the mask holds {int(mask.sum())} nonzeros, expected {count}"
        return None

    def _check_matrix(self, fn: str, name: str, t, *, need_bool: bool = False) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if need_bool and t.dtype != torch.bool:
            raise TypeError(f"{fn}: {name} must be a bool tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D (rows, n_in), got shape {tuple(t.shape)}")
        rows, cols = t.shape
        if cols % self.m or (self.transposable and rows % self.m):
            dims = "rows and n_in" if self.transposable else "n_in"
            raise ValueError(
                f"{fn}: {name} of shape {tuple(t.shape)} does not suit {self.name!r}: {dims} must be multiples of "
                f"{self.m}"
            )


def _check_finite(fn: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point and not all_finite(t):
        raise ValueError(f"{fn}: {name} hold inf or NaN; a selection by magnitude needs finite scores")
