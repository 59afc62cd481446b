"""small_dense: weight counts against the sparse model's nonzeros (by hand and by brute force over the factor),
forward shapes, what follows the widths, and the models it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsekern.training import small_dense, sparsify


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))


def _widths(model: nn.Module) -> list[int]:
    return [m.out_features if isinstance(m, nn.Linear) else m.out_channels
            for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]  # fmt: skip


def test_demo_mlp_by_hand():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    before = [p.clone() for p in model.parameters()]
    small = small_dense(model, 0.9)
    # 10% of 64·256 + 256·256 + 256·10 = 84480 is 8448 (sparsify's total, any distribution but uniform's rounding);
    # width 62: 64·62 + 62·62 + 62·10 = 8432, width 63: 8631
    assert _widths(small) == [62, 62, 10] and _weights(small) == 8432
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # model unchanged
    assert small(torch.randn(5, 64)).shape == (5, 10)
    assert all(m.bias is not None for m in small if isinstance(m, nn.Linear))
    assert sum(layer.nnz for layer in sparsify(model, 0.9).layers) == 8448


def _closest_by_brute_force(widths, target, weights_of):
    """The smallest |count - target| over a fine grid of factors (the rounding: half up, at least 1)."""
    best = math.inf
    for f in np.linspace(1e-4, 1.0, 20001):
        new = [max(1, math.floor(f * w + 0.5)) for w in widths[:-1]] + [widths[-1]]
        best = min(best, abs(weights_of(new) - target))
    return best


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95, 0.99])
def test_mlp_is_closest_one_factor_reaches(sparsity):
    # unequal hidden widths: one factor scales all three
    model = nn.Sequential(nn.Linear(13, 40), nn.Tanh(), nn.Linear(40, 24), nn.Dropout(0.1), nn.ReLU(),
                          nn.Linear(24, 57), nn.ReLU(), nn.Linear(57, 3))  # fmt: skip
    total = _weights(model)
    target = round((1 - sparsity) * total)
    small = small_dense(model, sparsity)

    def weights_of(w):
        return 13 * w[0] + w[0] * w[1] + w[1] * w[2] + w[2] * 3

    assert abs(_weights(small) - target) == _closest_by_brute_force([40, 24, 57, 3], target, weights_of)
    widths = _widths(small)
    assert widths[-1] == 3 and small[0].in_features == 13 and weights_of(widths) == _weights(small)
    if sparsity == 0.0:
        assert widths == [40, 24, 57, 3]
    assert small(torch.randn(2, 13)).shape == (2, 3)


def test_cnn_follows_channels_through_norms_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)),  # 8x8 -> 4x4
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32, affine=False),
        nn.ReLU(),
        nn.Flatten(),  # 32 channels x 16 positions
        nn.Linear(32 * 16, 64),
        nn.LayerNorm(64),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    ).double()
    small = small_dense(model, 0.8)
    c1, c2, h = small[0][0].out_channels, small[1].out_channels, small[5].out_features
    assert small[0][1].num_features == c1 and small[2].num_features == c2 and small[6].normalized_shape == (h,)
    assert small[1].in_channels == c1 and small[5].in_features == c2 * 16 and small[8].in_features == h
    assert small[1].bias is None and small[2].weight is None and small[5].weight.dtype == torch.float64
    assert small[0][0].in_channels == 3 and small[8].out_features == 10
    target = round(0.2 * _weights(model))

    def weights_of(w):
        return 27 * w[0] + 9 * w[0] * w[1] + 16 * w[1] * w[2] + w[2] * 10

    assert weights_of([c1, c2, h, 10]) == _weights(small)
    assert abs(_weights(small) - target) == _closest_by_brute_force([16, 32, 64, 10], target, weights_of)
    assert small(torch.randn(4, 3, 8, 8, dtype=torch.float64)).shape == (4, 10)
    assert type(small[0]) is nn.Sequential  # the nesting and names stay


def test_input_side_modules_stay():
    # images flattened into the first Linear; a BatchNorm on the inputs keeps the input width
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    small = small_dense(model, 0.75)
    assert small[1].num_features == 64 and small[2].in_features == 64
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_refuses_what_it_cannot_narrow():
    linear = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        small_dense([1], 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        small_dense(linear, 1.0)
    with pytest.raises(ValueError, match="model must be an nn.Sequential, got Linear"):
        small_dense(nn.Linear(4, 4), 0.5)
    conv = nn.Conv2d(3, 4, 3)
    cases = [
        (nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8)), r"cannot narrow 1 \(LSTM\); small_dense handles nn.Sequential"),
        (nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2)), r"cannot narrow 1 \(MultiheadAttention\)"),
        (nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2)), "has groups=2; only groups=1"),
        (nn.Sequential(nn.Linear(4, 8), nn.Linear(7, 2)), r"1 \(Linear\) takes 7 inputs, but the layer before gives 8"),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(9), nn.Linear(8, 2)), "has 9 features, but the layer before"),
        (nn.Sequential(nn.Linear(4, 8), nn.LayerNorm((2, 8))), r"normalises over \(2, 8\); only a LayerNorm"),
        (nn.Sequential(conv, nn.Flatten(), nn.Linear(10, 2)), "takes 10 features, not a multiple of the 4"),
        (nn.Sequential(conv, nn.Flatten(), nn.Conv1d(4, 2, 1)), "follows a Flatten; cannot follow"),
        (nn.Sequential(conv, nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 2)), "put it after the next"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), r"has 1 weight layer\(s\), so no hidden width"),
    ]  # fmt: skip
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            small_dense(model, 0.5)
    shared = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="uses a module at two places"):
        small_dense(nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared, nn.Linear(8, 2)), 0.5)
    sparse = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsify(sparse, 0.5)
    with pytest.raises(ValueError, match=r"0 \(SparseLinear\) is sparse; call small_dense on the dense model"):
        small_dense(sparse, 0.5)
    masked = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsify(masked, 0.5, layout="masked")
    with pytest.raises(ValueError, match=r"0 \(Linear\) is sparse"):
        small_dense(masked, 0.5)
