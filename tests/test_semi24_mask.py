"""semi24_mask: the documented keep and tie rules on hand-written inputs, exact invariants on random ones."""

from __future__ import annotations

import itertools

import pytest
import torch

import sparsekern


def test_keeps_two_largest_magnitudes():
    w = torch.tensor([0.1, -3.0, 2.0, 0.5, 7.0, 0.0, 0.0, -7.5])
    assert sparsekern.semi24_mask(w).tolist() == [False, True, True, False, True, False, False, True]


@pytest.mark.parametrize(
    "group, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], [True, True, False, False]),  # ties: lower index
        ([0.0, 0.0, 0.0, 0.0], [True, True, False, False]),
        ([2.0, -2.0, 3.0, 2.0], [True, False, True, False]),
        ([0.0, -0.0, 5.0, 0.0], [True, False, True, False]),
    ],
)
def test_tie_rule(group, expected):
    assert sparsekern.semi24_mask(torch.tensor(group)).tolist() == expected


def test_int8_minimum_is_largest():
    w = torch.tensor([[-128, 127, 1, -1]], dtype=torch.int8)
    assert sparsekern.semi24_mask(w).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8])
@pytest.mark.parametrize("shape", [(8,), (3, 12), (2, 5, 36)])
def test_exactly_two_of_four_and_largest(dtype, shape):
    w = (torch.randn(shape, dtype=torch.float64) * 50).to(dtype)
    mask = sparsekern.semi24_mask(w)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    groups = mask.reshape(-1, 4)
    assert torch.equal(groups.sum(-1), torch.full((groups.shape[0],), 2))
    magnitude = w.double().abs().reshape(-1, 4)
    kept_min = torch.where(groups, magnitude, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, magnitude).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def _best_transposable_sum(tile: torch.Tensor) -> float:
    """Brute force over all 2^16 masks: the largest kept sum with exactly 2 per row and column."""
    best = -1.0
    for bits in itertools.product((0, 1), repeat=16):
        mask = torch.tensor(bits, dtype=torch.float64).view(4, 4)
        if torch.equal(mask.sum(0), torch.full((4,), 2.0)) and torch.equal(mask.sum(1), torch.full((4,), 2.0)):
            best = max(best, float((mask * tile).sum()))
    return best


def test_transposable_is_optimal_on_random_tiles():
    w = torch.randn(4, 8, dtype=torch.float64)
    mask = sparsekern.semi24_mask(w, transposable=True)
    for j in range(2):
        tile, tile_mask = w[:, 4 * j : 4 * j + 4].abs(), mask[:, 4 * j : 4 * j + 4]
        assert float((tile * tile_mask).sum()) == pytest.approx(_best_transposable_sum(tile), rel=0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
def test_transposable_rows_and_columns_are_two_of_four(dtype):
    w = (torch.randn(36, 20, dtype=torch.float64) * 50).to(dtype)
    mask = sparsekern.semi24_mask(w, transposable=True)
    tiles = mask.view(9, 4, 5, 4).transpose(1, 2)
    assert torch.equal(tiles.sum(-1), torch.full((9, 5, 4), 2))
    assert torch.equal(tiles.sum(-2), torch.full((9, 5, 4), 2))
    # and it never keeps less than torch's greedy 4x4 tile pruning
    from torch.sparse._semi_structured_conversions import _sparse_semi_structured_tile

    magnitude = w.double().abs()
    greedy = _sparse_semi_structured_tile(magnitude.clone()) != 0
    assert float((magnitude * mask).sum()) >= float((magnitude * greedy).sum()) - 1e-9


def test_transposable_tie_rule_prefers_lower_positions():
    mask = sparsekern.semi24_mask(torch.ones(4, 4), transposable=True)
    assert mask.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2


@pytest.mark.parametrize(
    "w, kwargs, error, match",
    [
        ("x", {}, TypeError, r"semi24_mask: w must be a torch.Tensor, got str"),
        (torch.zeros(4, dtype=torch.int32), {}, TypeError, r"w must have dtype .*got int32"),
        (torch.zeros(()), {}, ValueError, r"at least 1 dimension"),
        (torch.zeros(3, 6), {}, ValueError, r"last dimension of w must be a multiple of 4, got shape \(3, 6\)"),
        (torch.tensor([1.0, float("nan"), 0.0, 0.0]), {}, ValueError, r"w contains NaN"),
        (torch.zeros(6, 8), {"transposable": True}, ValueError, r"both dimensions multiples of 4, got shape \(6, 8\)"),
        (torch.zeros(2, 4, 4), {"transposable": True}, ValueError, r"needs a 2-D w"),
    ],
    ids=["str", "int32", "scalar", "cols", "nan", "transposable-rows", "transposable-3d"],
)
def test_bad_input(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsekern.semi24_mask(w, **kwargs)
