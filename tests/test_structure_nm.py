"""The N:M structure (structure="2:4", "2:4T"): its selections against plain-Python references bit for bit on fresh
random inputs with ties, exact invariants through chains of updates, violation messages and error paths."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from sparsekern.training.structure import parse_structure
from sparsekern.training.structure_nm import NM

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _scores(shape, dtype=torch.float32, ties: bool = False, generator=None) -> torch.Tensor:
    """Fresh random nonnegative scores; with ties, few distinct values (exact in every dtype, exact float64 sums)."""
    if ties:
        return (torch.randint(0, 4, shape, generator=generator).double() / 4).to(dtype)
    return torch.rand(shape, generator=generator).to(dtype)


# -- plain-Python references --------------------------------------------------------------------------------------
def _ref_initial(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    s = scores.double().abs().tolist()
    out = torch.zeros(scores.shape, dtype=torch.bool)
    for r, row in enumerate(s):
        for g in range(0, len(row), m):
            best = sorted(range(g, g + m), key=lambda c: (-row[c], c))[:n]
            for c in best:
                out[r, c] = True
    return out


def _ref_drop(mask: torch.Tensor, keys: torch.Tensor, fraction: float) -> torch.Tensor:
    k = keys.double().abs().tolist()
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for r, row in enumerate(mask.tolist()):
        active = [c for c, on in enumerate(row) if on]
        for c in sorted(active, key=lambda c: (k[r][c], c))[: math.floor(fraction * len(active) + 0.5)]:
            out[r, c] = True
    return out


def _ref_grow(kept: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    s = scores.double().abs().tolist()
    out = torch.zeros(kept.shape, dtype=torch.bool)
    for r, row in enumerate(kept.tolist()):
        for g in range(0, len(row), m):
            free = [c for c in range(g, g + m) if not row[c]]
            for c in sorted(free, key=lambda c: (-s[r][c], c))[: n - sum(row[g : g + m])]:
                out[r, c] = True
    return out


@functools.cache
def _ref_patterns(n: int, m: int) -> list[tuple[int, ...]]:
    """Brute force: every m x m 0/1 matrix (row-major tuple) with n per row and column, lower positions first."""
    found = []
    for bits in itertools.product((0, 1), repeat=m * m):
        rows = [bits[i * m : i * m + m] for i in range(m)]
        if all(sum(row) == n for row in rows) and all(sum(col) == n for col in zip(*rows, strict=True)):
            found.append(bits)
    return sorted(found, reverse=True)


def _ref_tiles(kept: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per tile, the first pattern (in the tie order) containing ``kept`` with the largest sum of scores over its new
    entries; returns the new entries. With kept all False this is the initial transposable mask."""
    s = scores.double().abs().tolist()
    k = kept.tolist()
    out = torch.zeros(kept.shape, dtype=torch.bool)
    for tr in range(0, kept.shape[0], m):
        for tc in range(0, kept.shape[1], m):
            cells = [(tr + i, tc + j) for i in range(m) for j in range(m)]
            best, best_gain = None, None
            for p in _ref_patterns(n, m):
                if any(k[r][c] and not on for (r, c), on in zip(cells, p, strict=True)):
                    continue
                gain = 0.0
                for (r, c), on in zip(cells, p, strict=True):
                    if on and not k[r][c]:
                        gain += s[r][c]
                if best_gain is None or gain > best_gain:
                    best, best_gain = p, gain
            for (r, c), on in zip(cells, best, strict=True):
                if on and not k[r][c]:
                    out[r, c] = True
    return out


# -- construction ------------------------------------------------------------------------------------------------
def test_parse_and_names():
    nm, nmt = parse_structure("sparsify", "2:4"), parse_structure("RigL", "2:4", transposable=True)
    assert nm == NM(2, 4) and nmt == NM(2, 4, transposable=True) and nm != nmt
    assert (nm.name, nmt.name, nm.row_block, nmt.row_block) == ("2:4", "2:4T", 1, 4)
    assert parse_structure("sparsify", "1:8").name == "1:8" and hash(nm) == hash(NM(2, 4))
    assert NM(2, 4).count((6, 12), 0) == 36 and NM(1, 4).count((3, 8), 10**6) == 6


def test_tile_pattern_count():
    assert len(_ref_patterns(2, 4)) == 90 and len(_ref_patterns(1, 3)) == 6


@pytest.mark.parametrize(
    "structure, transposable, match",
    [
        ("2:4:8", False, "structure must be None, 'fan_in' or 'N:M'"),
        ("a:4", False, "structure must be None"),
        ("-1:4", False, "structure must be None"),
        ("2:", False, "structure must be None"),
        ("0:4", False, r"0 < N < M .*'0:4'"),
        ("4:4", False, r"0 < N < M .*'4:4'"),
        ("5:4", False, r"0 < N < M .*'5:4'"),
        ("2:0", False, r"0 < N < M"),
        ("4:8", True, r"transposable=True supports M <= 5 .*'4:8'"),
        ("fan_in", True, "transposable=True applies to N:M"),
        (None, True, "transposable=True needs an N:M structure"),
    ],
)
def test_bad_structure_strings(structure, transposable, match):
    with pytest.raises(ValueError, match=match):
        parse_structure("sparsify", structure, transposable=transposable)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="integers N and M, got n=2.0"):
        NM(2.0, 4)
    with pytest.raises(ValueError, match="integers N and M, got m=True"):
        NM(1, True)
    with pytest.raises(TypeError, match="transposable must be a bool, got 1"):
        NM(2, 4, transposable=1)


def test_check_shape_names_the_layer():
    NM(2, 4).check_shape("sparsify", "fc1", (6, 12))
    NM(2, 4, transposable=True).check_shape("sparsify", "fc1", (8, 12))
    with pytest.raises(ValueError, match=r"sparsify: fc1 has 10 inputs .* not a multiple of m=4"):
        NM(2, 4).check_shape("sparsify", "fc1", (8, 10))
    with pytest.raises(ValueError, match=r"RigL: layers.3 has 6 outputs .* both dims multiples of 4"):
        NM(2, 4, transposable=True).check_shape("RigL", "layers.3", (6, 12))
    with pytest.raises(ValueError, match=r"RigL: head has 7 inputs"):
        NM(2, 4, transposable=True).check_shape("RigL", "head", (8, 7))


# -- selections against the references ---------------------------------------------------------------------------
GROUPS = [(2, 4), (1, 2), (1, 4), (3, 8), (2, 3), (5, 20)]  # 5:20 takes group_topk_mask's sorting branch


@pytest.mark.parametrize("n, m", GROUPS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_initial_matches_reference(n, m, dtype, ties):
    nm = NM(n, m)
    for rows in (1, 7):
        scores = _scores((rows, 5 * m), dtype, ties)
        mask = nm.initial(scores, nm.count(tuple(scores.shape), 0))
        assert mask.dtype == torch.bool and torch.equal(mask, _ref_initial(scores, n, m))
        assert nm.violation(mask, nm.count(tuple(scores.shape), 0)) is None


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (1, 2), (1, 3), (2, 3)], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_transposable_initial_matches_brute_force(n, m, ties):
    nm = NM(n, m, transposable=True)
    scores = _scores((3 * m, 5 * m), torch.float32, ties)
    mask = nm.initial(scores, nm.count(tuple(scores.shape), 0))
    assert torch.equal(mask, _ref_tiles(torch.zeros_like(mask), scores, n, m))
    assert nm.violation(mask) is None and NM(n, m).violation(mask.T.contiguous()) is None  # W.T is N:M too


@pytest.mark.parametrize("n, m", GROUPS, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.75, 1.0])
def test_drop_matches_reference(n, m, dtype, fraction):
    nm = NM(n, m)
    mask = nm.initial(_scores((6, 4 * m)), nm.count((6, 4 * m), 0))
    keys = torch.randn(6, 4 * m).to(dtype)
    keys[:, 1::2] = -keys[:, ::2]  # ties in |key| (the sign must not matter)
    keys[~mask & (torch.rand(6, 4 * m) < 0.5)] = torch.nan  # read only at the mask
    dropped = nm.drop(mask, keys, fraction)
    assert torch.equal(dropped, _ref_drop(mask, keys.masked_fill(~mask, 0), fraction))
    assert not bool((dropped & ~mask).any())


def test_drop_rounds_half_up_per_row():
    nm = NM(2, 4)
    mask = torch.tensor([[True, True, False, False] * 2, [True, True, False, False] * 2])  # 4 active per row
    keys = torch.arange(16.0).view(2, 8)
    assert nm.drop(mask, keys, 0.625).sum(1).tolist() == [3, 3]  # 2.5 rounds to 3 (as FanIn's drop)
    assert nm.drop(mask, keys, 0.875).sum(1).tolist() == [4, 4]  # 3.5 rounds to 4
    # a partly dropped row count is per row: an uneven mask (not N:M) drops round(fraction * its own count)
    mask[1] = False
    mask[1, :2] = True
    assert nm.drop(mask, keys, 0.5).sum(1).tolist() == [2, 1]


def test_drop_takes_the_row_order_not_the_group_order():
    nm = NM(2, 4)
    mask = torch.tensor([[True, True, False, False, True, True, False, False]])
    keys = torch.tensor([[0.1, 0.2, 9.0, 9.0, 5.0, 6.0, 9.0, 9.0]])
    assert nm.drop(mask, keys, 0.5).tolist() == [[True, True, False, False, False, False, False, False]]
    keys = torch.tensor([[-0.3, 0.3, 9.0, 9.0, 0.3, 6.0, 9.0, 9.0]])  # |key| ties: lower column first
    assert nm.drop(mask, keys, 0.5).tolist() == [[True, True, False, False, False, False, False, False]]


@pytest.mark.parametrize("n, m", GROUPS, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_grow_matches_reference(n, m, dtype, ties):
    nm = NM(n, m)
    shape = (7, 5 * m)
    mask = nm.initial(_scores(shape), nm.count(shape, 0))
    kept = mask & ~nm.drop(mask, torch.rand(shape), 0.6)
    scores = _scores(shape, dtype, ties)
    grown = nm.grow(kept, scores)
    assert torch.equal(grown, _ref_grow(kept, scores, n, m))
    assert not bool((grown & kept).any()) and nm.violation(kept | grown, nm.count(shape, 0)) is None


def test_grow_regrows_a_dropped_connection_and_ignores_sign():
    nm = NM(2, 4)
    kept = torch.tensor([[True, False, False, False]])
    assert nm.grow(kept, torch.tensor([[0.0, 1.0, -3.0, 2.0]])).tolist() == [[False, False, True, False]]
    assert nm.grow(kept, torch.tensor([[5.0, 1.0, 1.0, 1.0]])).tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (1, 2), (1, 3), (2, 3)], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_transposable_grow_matches_brute_force(n, m, ties, fraction):
    nm = NM(n, m, transposable=True)
    shape = (2 * m, 8 * m)
    mask = nm.initial(_scores(shape), nm.count(shape, 0))
    kept = mask & ~nm.drop(mask, torch.rand(shape), fraction)
    scores = _scores(shape, torch.float32, ties)
    grown = nm.grow(kept, scores)
    assert torch.equal(grown, _ref_tiles(kept, scores, n, m))
    assert not bool((grown & kept).any()) and nm.violation(kept | grown, nm.count(shape, 0)) is None


@pytest.fixture
def without_table(monkeypatch):
    """Run the transposable grow on its general path (the pattern matmul that m = 5 takes) for every m."""
    import sparsekern.training.structure_nm as structure_nm

    monkeypatch.setattr(structure_nm, "_MAX_TABLE_M", 0)
    structure_nm._tiles.cache_clear()
    yield
    structure_nm._tiles.cache_clear()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 3)], ids=str)
def test_transposable_grow_general_path_matches_brute_force(without_table, n, m):
    test_transposable_grow_matches_brute_force(n, m, True, 0.5)
    _infeasible_grow()


@pytest.mark.parametrize("chunk", [1, 5])
def test_transposable_grow_chunks_agree(monkeypatch, chunk):
    import sparsekern.training.structure_nm as structure_nm

    nm = NM(2, 4, transposable=True)
    shape = (16, 64)
    mask = nm.initial(_scores(shape), nm.count(shape, 0))
    kept, scores = mask & ~nm.drop(mask, torch.rand(shape), 0.5), _scores(shape, ties=True)
    whole = nm.grow(kept, scores)
    monkeypatch.setattr(structure_nm, "_TILE_CHUNK", chunk)
    assert torch.equal(nm.grow(kept, scores), whole)


def test_transposable_five_by_five_tiles():
    nm = NM(2, 5, transposable=True)
    shape = (10, 15)
    mask = nm.initial(_scores(shape), nm.count(shape, 0))
    for fraction in (0.5, 1.0, 0.2):
        kept = mask & ~nm.drop(mask, torch.rand(shape), fraction)
        mask = kept | nm.grow(kept, _scores(shape, ties=True))
        assert nm.violation(mask, 60) is None and NM(2, 5).violation(mask.T.contiguous()) is None


@pytest.mark.parametrize("structure", [NM(2, 4), NM(1, 4), NM(2, 4, transposable=True), NM(1, 2, transposable=True)],
                         ids=repr)  # fmt: skip
def test_invariants_through_a_chain_of_updates(structure):
    shape = (4 * structure.m, 6 * structure.m)
    count = structure.count(shape, 0)
    mask = structure.initial(_scores(shape), count)
    for step in range(20):
        fraction = [0.0, 0.05, 0.3, 0.5, 1.0][step % 5]
        dropped = structure.drop(mask, torch.randn(shape), fraction)
        kept = mask & ~dropped
        mask = kept | structure.grow(kept, _scores(shape, ties=step % 2 == 1))
        assert structure.violation(mask, count) is None
        if structure.transposable:
            assert NM(structure.n, structure.m).violation(mask.T.contiguous()) is None
        # row-local: a block of row_block rows updates exactly as the whole does
        r = structure.row_block
        rows_dropped = structure.drop(mask[r : 2 * r], torch.ones(r, shape[1]), 0.5)
        assert torch.equal(rows_dropped, structure.drop(mask, torch.ones(shape), 0.5)[r : 2 * r])


def test_selections_run_on_the_scores_device_and_accept_any_float_layout():
    nm = NM(2, 4, transposable=True)
    scores = _scores((16, 8)).T  # a non-contiguous view
    mask = nm.initial(scores, nm.count((8, 16), 0))
    assert torch.equal(mask, nm.initial(scores.contiguous(), nm.count((8, 16), 0)))
    assert nm.violation(mask) is None


# -- violation -------------------------------------------------------------------------------------------------------
def test_violation_names_row_and_group():
    nm = NM(2, 4)
    mask = nm.initial(_scores((3, 12)), 18)
    assert nm.violation(mask) is None and nm.violation(mask, 18) is None
    assert nm.violation(mask, 17) == "the mask holds 18 nonzeros, expected 17"
    bad = mask.clone()
    bad[1, 4:8] = torch.tensor([True, True, True, False])
    assert nm.violation(bad) == "row 1, columns 4..7 hold 3 nonzeros, structure '2:4' needs 2"
    assert "does not suit '2:4': n_in must be multiples of 4" in nm.violation(torch.zeros(3, 10, dtype=torch.bool))
    assert "must be 2-D" in nm.violation(torch.zeros(12, dtype=torch.bool))


def test_violation_names_the_tile_column():
    nm = NM(2, 4, transposable=True)
    mask = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool).repeat(2, 2)  # rows 2:4, columns 4:4 and 0:4
    assert nm.violation(mask) == (
        "tile rows 0..3, columns 0..3: column 0 holds 4 nonzeros, structure '2:4T' needs 2 per tile column"
    )
    assert NM(2, 4).violation(mask) is None
    mask = nm.initial(_scores((8, 8)), 32)
    mask[4:8, 4:8] = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert nm.violation(mask) == (
        "tile rows 4..7, columns 4..7: column 4 holds 3 nonzeros, structure '2:4T' needs 2 per tile column"
    )
    assert "n_in" not in nm.violation(torch.zeros(6, 8, dtype=torch.bool))


# -- error paths -----------------------------------------------------------------------------------------------------
def test_initial_errors():
    nm = NM(2, 4)
    with pytest.raises(ValueError, match=r"exactly 12 nonzeros \(density 2/4\), asked for 11"):
        nm.initial(_scores((3, 8)), 11)
    with pytest.raises(ValueError, match=r"scores of shape \(3, 6\) does not suit '2:4'"):
        nm.initial(_scores((3, 6)), 9)
    with pytest.raises(ValueError, match=r"rows and n_in must be multiples of 4"):
        NM(2, 4, transposable=True).initial(_scores((6, 8)), 12)
    with pytest.raises(ValueError, match="scores hold NaN"):
        nm.initial(torch.tensor([[0.0, torch.nan, 1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="scores hold inf"):
        nm.initial(torch.tensor([[0.0, torch.inf, 1.0, 2.0]]), 2)
    with pytest.raises(TypeError, match="scores must be a tensor"):
        nm.initial([[0.0, 1.0, 1.0, 2.0]], 2)


def test_drop_errors():
    nm = NM(2, 4)
    mask = nm.initial(_scores((2, 8)), 8)
    for fraction in (-0.1, 1.5, True, "0.3", float("nan")):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            nm.drop(mask, torch.rand(2, 8), fraction)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        nm.drop(mask.float(), torch.rand(2, 8), 0.3)
    with pytest.raises(ValueError, match="keys must have the mask's shape"):
        nm.drop(mask, torch.rand(2, 4), 0.3)
    keys = torch.rand(2, 8).masked_fill(mask, torch.nan)
    with pytest.raises(ValueError, match="keys hold NaN at active connections"):
        nm.drop(mask, keys, 0.3)


def test_grow_errors():
    nm, nmt = NM(2, 4), NM(2, 4, transposable=True)
    kept = torch.tensor([[True, True, True, False, False, False, False, False]])
    with pytest.raises(ValueError, match=r"kept row 0, columns 0..3 holds 3, more than n=2"):
        nm.grow(kept, torch.rand(1, 8))
    with pytest.raises(ValueError, match="scores hold inf"):
        nm.grow(kept[:, 4:], torch.tensor([[1.0, 2.0, -torch.inf, 0.0]]))
    with pytest.raises(ValueError, match="scores must have kept's shape"):
        nm.grow(kept, torch.rand(8))
    # every row and column at most 2, and a pattern contains it
    kept = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert nmt.grow(kept, torch.rand(4, 4)).sum() == 3
    _infeasible_grow()


def _infeasible_grow():
    """A kept set with at most 2 per row and column that no 2-per-row-and-column pattern contains (row 3 could only
    use column 3), in the tile at rows 4..7, columns 8..11."""
    nmt = NM(2, 4, transposable=True)
    kept = torch.zeros(8, 12, dtype=torch.bool)
    kept[4:8, 8:12] = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"tile rows 4..7, columns 8..11 fit no pattern with 2 per row and column"):
        nmt.grow(kept, torch.rand(8, 12))
