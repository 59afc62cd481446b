"""The N:M structure (structure="2:4", "2:4T"): its selections against plain-Python references bit for bit on fresh
random inputs with ties, exact invariants through chains of updates, violation messages and error paths."""

from __future__ import annotations

import copy
import functools
import io
import itertools
import math

import pytest
import torch
from helpers import gloo_rank, rank_results
from torch import nn

from sparsekern.training import SET, RigL, drop_and_grow, sparsify
from sparsekern.training.drop_grow import set_structure
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


@pytest.mark.parametrize("n, m", GROUPS, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_drop_compact_is_drop_on_packed_rows(n, m, dtype, fraction):
    nm = NM(n, m)
    mask = nm.initial(_scores((6, 4 * m)), nm.count((6, 4 * m), 0))
    keys = _scores((6, 4 * m), dtype, ties=True)
    packed = keys[mask].view(6, -1)
    compact = nm.drop_compact(packed, fraction)
    dense = torch.zeros_like(mask)
    dense[mask] = compact.reshape(-1)
    assert compact.shape == packed.shape and torch.equal(dense, nm.drop(mask, keys, fraction))
    with pytest.raises(ValueError, match="keys hold NaN at active connections"):
        nm.drop_compact(packed.double().fill_(torch.nan), fraction)


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
    with pytest.raises(ValueError, match="scores hold inf or NaN"):
        nm.initial(torch.tensor([[0.0, torch.nan, 1.0, 2.0]]), 2)
    with pytest.raises(ValueError, match="scores hold inf or NaN"):
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
    with pytest.raises(ValueError, match="scores hold inf or NaN"):
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


# -- end to end: sparsify(structure="N:M"), RigL and SET on SparseLinear and masked layers ----------------------------
# The model and the training loop of tests/test_structure_training.py: a masked Conv2d ((8, 36) view), Linear(128, 32)
# and Linear(32, 8); every one of them suits 2:4, 1:4 and the 4 x 4 tiles of 2:4T.
NM_CASES = [
    ("2:4", "2:4", dict(sparsity=0.5, distribution="uniform")),
    ("2:4T", "2:4", dict(sparsity=0.5, distribution="uniform", transposable=True)),
    ("1:4", "1:4", dict(sparsity=0.75, distribution="uniform")),
    ("2:4_dense_first", "2:4", dict(sparsity=0.5, distribution="uniform", dense_first=True)),
]
NM_IDS = [case[0] for case in NM_CASES]
LAYOUTS = ("sparse", "masked")
TRAIN = [
    pytest.param(case, method, layout, id=f"{case[0]}-{method}-{layout}")
    for case in NM_CASES[:3]
    for method in ("rigl", "set")
    for layout in LAYOUTS
]


def check_nm(sparsifier, counts=None) -> None:
    """Every structured layer is N:M (transposable: every tile row and column, so W.T is N:M) with its count."""
    from test_structure_training import check_structure

    check_structure(sparsifier, counts)
    for name, layer in sparsifier.layers.items():
        structure = layer.structure
        if structure is None:
            continue
        rows = layer.mask().reshape(layer.rows)
        assert layer.count() == structure.count(layer.rows, 0), name
        if structure.transposable:
            assert NM(structure.n, structure.m).violation(rows.T.contiguous()) is None, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", NM_CASES, ids=NM_IDS)
def test_sparsify_gives_nm(case, layout):
    from test_structure_training import build

    model, _, sparsifier, report = build(case, layout, "static")
    check_nm(sparsifier)
    want = case[1] + ("T" if case[2].get("transposable") else "")
    names = [layer.structure for layer in report.layers]
    assert names == ([None, want, want] if case[2].get("dense_first") else [want] * 3)
    assert {s.name for s in sparsifier.structures().values() if s is not None} == {want}
    assert report.layers[-1].nnz == 8 * 32 * (1 if case[1] == "1:4" else 2) // 4
    assert report.layers[1].layout == layout


@pytest.mark.parametrize("transposable", [False, True])
def test_sparsify_keeps_the_best_scores_the_structure_allows(transposable):
    from test_structure_training import make_model

    model = make_model()
    scores = {n: _scores(p.shape, ties=True) for n, p in model.named_parameters() if p.dim() > 1}
    sparsify(model, 0.5, distribution="uniform", layout="masked", structure="2:4", transposable=transposable,
             scores=scores)  # fmt: skip
    for (name, score), module in zip(scores.items(), (model[0], model[3], model[5]), strict=True):
        rows = score.reshape(score.shape[0], -1)
        want = _ref_tiles(torch.zeros_like(rows, dtype=torch.bool), rows, 2, 4) if transposable else (
            _ref_initial(rows, 2, 4))  # fmt: skip
        assert torch.equal(module.weight_mask.reshape(rows.shape), want), name


@pytest.mark.parametrize(("case", "method", "layout"), TRAIN)
def test_training_keeps_nm_after_every_update(case, method, layout):
    from test_structure_training import batch, build, loss_of

    model, opt, sparsifier, _ = build(case, layout, method)
    counts = {name: layer.count() for name, layer in sparsifier.layers.items()}
    initial, moved, updates = sparsifier.masks(), 0, 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        for _ in range(2):  # micro-batches
            loss_of(model, *batch(gen)).backward()
        before = sparsifier.masks()
        if sparsifier.step():
            updates += 1
            after = sparsifier.masks()
            moved += sum(int((before[k] != after[k]).sum()) for k in before)
        opt.zero_grad()
        check_nm(sparsifier, counts)
        for name, layer in sparsifier.layers.items():  # nothing trains off the mask
            weight = layer.module.weight if layout == "masked" or name == "0.weight" else None
            if weight is not None:
                assert not bool((weight.detach().reshape(layer.rows) * ~layer.mask().reshape(layer.rows)).any())
    assert updates >= 4 and moved > 0
    assert all(not torch.equal(initial[k], sparsifier.masks()[k]) for k in initial)


def reference_nm_update(mask, weight, scores, n, structure):
    """One drop-and-grow by the plain-Python references: fraction = n / count, per row the round-half-up(fraction *
    row count) smallest |w| (ties: lower column), then per group (or per tile, brute force) the best scores."""
    dropped = _ref_drop(mask, weight, n / int(mask.sum()))
    kept = mask & ~dropped
    if structure.transposable:
        return kept | _ref_tiles(kept, scores, structure.n, structure.m)
    return kept | _ref_grow(kept, scores, structure.n, structure.m)


@pytest.mark.parametrize("transposable", [False, True], ids=["2:4", "2:4T"])
@pytest.mark.parametrize("n", [0, 13, 60, 160])
def test_sparse_linear_exact_update_matches_reference(transposable, n):
    from sparsekern.reference import outer_topk_scores_reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 20))
    sparsify(model, 0.5, distribution="uniform", structure="2:4", transposable=transposable,
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    layer = model[0]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ties in |w|: a few levels
        layer.values.copy_(torch.randint(-3, 4, layer.values.shape, generator=gen).float())
    x = torch.randint(-2, 3, (9, 32), generator=gen).float()  # ties in the scores too
    g = torch.randint(-2, 3, (9, 20), generator=gen).float()
    mask, weight = layer.mask.clone(), layer.dense_weight().detach().clone()
    want = reference_nm_update(mask, weight, outer_topk_scores_reference(x, g), n, NM(2, 4, transposable))
    drop_and_grow(layer, n, x=x, g=g, precision="exact")
    assert torch.equal(layer.mask, want)
    assert NM(2, 4, transposable).violation(layer.mask, 320) is None


@pytest.mark.parametrize("transposable", [False, True], ids=["2:4", "2:4T"])
def test_masked_conv_update_matches_reference_and_blocks_do_not_matter(monkeypatch, transposable):
    from sparsekern.training import drop_grow as drop_grow_module

    results = []
    for block_elements in (1 << 20, 36, 4 * 36):  # one block; one row_block at a time; 4 or 8 rows
        monkeypatch.setattr(drop_grow_module, "ROW_BLOCK_ELEMENTS", block_elements)
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 8, 3)
        sparsify(nn.Sequential(conv), 0.5, distribution="uniform", structure="2:4", transposable=transposable,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=gen).float() * conv.weight_mask)
        conv.weight.grad = torch.randint(-2, 3, conv.weight.shape, generator=gen).float()
        mask, weight = conv.weight_mask.reshape(8, 36).clone(), conv.weight.detach().reshape(8, 36).clone()
        want = reference_nm_update(mask, weight, conv.weight.grad.reshape(8, 36), 50, NM(2, 4, transposable))
        drop_and_grow(conv, 50)
        assert torch.equal(conv.weight_mask.reshape(8, 36), want)
        results.append(conv.weight_mask.clone())
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize(("case", "method", "layout"), TRAIN)
def test_resume_is_bit_exact(case, method, layout):
    from test_structure_training import STEPS, STOP, build, train

    model, opt, sparsifier, _ = build(case, layout, method)
    train(model, opt, sparsifier, torch.Generator().manual_seed(9), STEPS)
    expected = {k: v.clone() for k, v in model.state_dict().items()}, sparsifier.masks(), sparsifier.structures()

    model, opt, sparsifier, _ = build(case, layout, method)
    gen = torch.Generator().manual_seed(9)
    train(model, opt, sparsifier, gen, STOP)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict(),
                "data": gen.get_state()}, buffer)  # fmt: skip
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model, opt, sparsifier, _ = build(case, layout, method, seed=1)  # other weights and masks, all overwritten
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    gen = torch.Generator()
    gen.set_state(checkpoint["data"])
    train(model, opt, sparsifier, gen, STEPS - STOP)
    state, masks, structures = expected
    assert sparsifier.structures() == structures
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in sparsifier.masks().items():
        assert torch.equal(value, masks[key]), key


def test_load_state_dict_tells_2_4_from_2_4t():
    from test_structure_training import build

    for mine, theirs, match in ((0, 1, "keeps structure '2:4', the state has '2:4T'"),
                                (1, 0, "keeps structure '2:4T', the state has '2:4'")):  # fmt: skip
        model, _, sparsifier, _ = build(NM_CASES[mine], "masked", "rigl")
        other_model, _, other, _ = build(NM_CASES[theirs], "masked", "rigl")
        assert other.state_dict()["structures"]["3.weight"] == {"name": NM_IDS[theirs]}
        model.load_state_dict(other_model.state_dict())
        with pytest.raises(ValueError, match=match):
            sparsifier.load_state_dict(other.state_dict())


def test_sparsify_errors_name_the_layer():
    from test_structure_training import make_model

    with pytest.raises(ValueError, match=r"structure '2:4' keeps a density of 0.5 in every layer, but layer '0.weight' "
                       r"was given sparsity 0.79.* pass sparsity=1 - N/M \(0.5\)"):  # fmt: skip
        sparsify(make_model(), 0.8, distribution="uniform", structure="2:4")
    with pytest.raises(ValueError, match=r"structure '2:4' keeps a density .* distribution='erk'"):
        sparsify(make_model(), 0.5, structure="2:4")  # ERK gives the layers other densities
    with pytest.raises(ValueError, match=r"sparsify: 0.weight has 30 inputs .* not a multiple of m=4"):
        sparsify(nn.Sequential(nn.Linear(30, 8)), 0.5, distribution="uniform", structure="2:4")
    with pytest.raises(ValueError, match=r"sparsify: 0.weight has 10 outputs .* both dims multiples of 4"):
        sparsify(nn.Sequential(nn.Linear(32, 10)), 0.5, distribution="uniform", structure="2:4", transposable=True)
    for bad, match in (("2:4:8", "structure must be None"), ("4:4", "0 < N < M"), ("0:2", "0 < N < M")):
        with pytest.raises(ValueError, match=match):
            sparsify(make_model(), 0.5, distribution="uniform", structure=bad)
    model = make_model()
    sparsify(model, 0.5, distribution="uniform", layout="masked", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the mask of layer '0.weight' does not have the structure '2:4': row 0"):
        RigL(model, opt, total_steps=10, delta_t=2, structure="2:4")
    with pytest.raises(ValueError, match="structure must be None"):
        SET(model, opt, total_steps=10, delta_t=2, structure="2-4")
    # a 2:4 layer refused by a sparsifier of another structure
    from test_structure_training import build

    model, opt, _, _ = build(NM_CASES[0], "masked", "static")
    with pytest.raises(ValueError, match=r"layer '0.weight' was sparsified with structure '2:4', not '2:4T'"):
        RigL(model, opt, total_steps=10, delta_t=2, structure="2:4", transposable=True)


def test_rigl_adopts_matching_unstructured_masks():
    """structure="2:4" on masks that happen to be 2:4 (SR-STE's, semi24_mask's) binds them."""
    from test_structure_training import batch, loss_of, make_model

    model = make_model()
    sparsify(model, 0.5, distribution="uniform", layout="masked", structure="2:4")
    for module in (model[0], model[3], model[5]):
        set_structure(module, None)  # as after SR-STE's finalize() and Static
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(model, opt, total_steps=10, delta_t=1, structure="2:4")
    assert {s.name for s in rigl.structures().values()} == {"2:4"}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss_of(model, *batch(gen)).backward()
        assert rigl.step()
        opt.zero_grad()
        check_nm(rigl)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_gradient_changes_nothing(layout):
    from test_structure_training import _same, batch, build, loss_of

    model, opt, rigl, _ = build(NM_CASES[1], layout, delta_t=1)
    gen = torch.Generator().manual_seed(0)
    loss_of(model, *batch(gen)).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")  # the masked conv
    if layout == "sparse":  # poison a recorded output gradient of a SparseLinear as well
        rigl._records["3.weight"][0][1][0, 0] = float("inf")
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict(), rigl.state_dict()))
    with pytest.raises(ValueError, match="inf or NaN"):
        rigl.step()
    assert _same(snapshot, (model.state_dict(), opt.state_dict(), rigl.state_dict()))


# -- data parallel ----------------------------------------------------------------------------------------------------
DDP_CASES = [("2:4", "sparse"), ("2:4T", "masked"), ("2:4T", "sparse")]


def _ddp_run(rank: int, case_id: str, layout: str) -> list:
    from test_structure_training import build, ddp_rank_masks

    case = next(c for c in NM_CASES if c[0] == case_id)
    return ddp_rank_masks(build(case, layout, "static")[0], rank)


def _worker(rank: int, path: str):
    from test_structure_training import WORLD

    gloo_rank(rank, path, WORLD, lambda r: {key: _ddp_run(r, *key) for key in DDP_CASES})


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    from test_structure_training import WORLD

    return rank_results(_worker, tmp_path_factory.mktemp("ddp_nm"), WORLD, 240)


@pytest.mark.parametrize(("case_id", "layout"), DDP_CASES)
def test_ddp_masks_equal_one_process_on_the_whole_batch(case_id, layout, ddp_runs):
    from test_structure_training import assert_ddp_equals_one_process, build

    case = next(c for c in NM_CASES if c[0] == case_id)
    ranks = [run[case_id, layout] for run in ddp_runs]
    assert_ddp_equals_one_process(ranks, build(case, layout, "static")[0], check_nm)
