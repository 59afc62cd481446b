import copy
import json
import sys

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseLinear
from sparsekern.tickets import LevelConnectivity, error_barrier, interpolate, level_connectivity
from sparsekern.training.sparsify import make_masked


def _scalar(w):
    layer = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(w)
    return layer


def _bump(model):
    """loss w, error w·(3 − w): concave in w, so a line between levels can rise above its chord."""
    w = float(model.weight)
    return w, w * (3.0 - w)


def test_hand_computed_path_and_barriers():
    result = level_connectivity([_scalar(0.0), _scalar(2.0), _scalar(1.0)], evaluate=_bump, betas=3)
    path = result.path
    assert path.betas == (0.0, 0.5, 1.0, 1.5, 2.0)  # level + β, level 1 once
    assert path.losses == (0.0, 1.0, 2.0, 1.5, 1.0)
    assert path.errors == (0.0, 2.0, 2.0, 2.25, 2.0)
    # pair (0, 1): w 0, 1, 2 -> 0, 2, 2 over the chord 0, 1, 2; pair (1, 2): w 2, 1.5, 1 -> 2, 2.25, 2;
    # pair (0, 2): w 0, 0.5, 1 -> 0, 1.25, 2 over the chord 0, 1, 2.
    assert result.barriers() == [[0.0, 1.0, 0.25], [1.0, 0.0, 0.25], [0.25, 0.25, 0.0]]
    assert result.barriers(reference="max") == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.25], [0.0, 0.25, 0.0]]


def _mlp_levels(n, seed, masked=False):
    """n solutions of one small MLP; with ``masked`` each level prunes a random further part of layer 0."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    mask = torch.ones(7, 5, dtype=torch.bool)
    levels = []
    for _ in range(n):
        level = copy.deepcopy(base)
        with torch.no_grad():
            for p in level.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        if masked:
            mask = mask & (torch.rand(7, 5, generator=gen) < 0.7)
            make_masked(level[0], mask.clone())
        levels.append(level)
    return levels


def _data(seed, n=37):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("masked", [False, True])
def test_path_is_the_consecutive_curves_concatenated(masked):
    levels = _mlp_levels(4, seed=1, masked=masked)
    data = _data(2)
    result = level_connectivity(levels, data=data, betas=5)
    segments = [interpolate(levels[k], levels[k + 1], data=data, betas=5) for k in range(3)]
    path = result.path
    xs, losses, errors = [], [], []
    for k, curve in enumerate(segments):
        start = 0 if k == 0 else 1
        xs += [k + b for b in curve.betas[start:]]
        losses += curve.losses[start:]
        errors += curve.errors[start:]
    assert path.betas == tuple(xs) and len(xs) == 13
    assert path.losses == tuple(losses)
    assert path.errors == tuple(errors)
    for k, curve in enumerate(segments):  # the junctions: the next segment starts where the last one ended
        assert result.curves[(k, k + 1)] == curve
        if k:
            assert curve.losses[0] == segments[k - 1].losses[-1]


@pytest.mark.parametrize("masked", [False, True])
def test_barrier_matrix_is_each_pairs_barrier(masked):
    levels = _mlp_levels(4, seed=3, masked=masked)
    data = _data(4, n=61)
    states = [level.state_dict() for level in levels]
    result = level_connectivity(states, model=levels[0], data=data, betas=(0.0, 0.2, 0.5, 0.9, 1.0))
    assert sorted(result.curves) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    curves = {
        (i, j): interpolate(levels[i], levels[j], data=data, betas=(0.0, 0.2, 0.5, 0.9, 1.0)) for i, j in result.curves
    }
    assert result.curves == curves
    for reference in ("linear", "max"):
        for metric in ("error", "loss"):
            matrix = result.barriers(reference=reference, metric=metric)
            assert [matrix[i][i] for i in range(4)] == [0.0] * 4
            assert matrix == [list(row) for row in zip(*matrix, strict=True)]  # symmetric
            for (i, j), curve in curves.items():
                assert matrix[i][j] == error_barrier(curve, reference=reference, metric=metric)
    assert any(v > 0 for row in result.barriers() for v in row)  # the comparison is not vacuous


def test_evaluate_calls_and_inputs_unchanged():
    levels = _mlp_levels(3, seed=5, masked=True)
    before = [copy.deepcopy(level.state_dict()) for level in levels]
    calls = []
    result = level_connectivity(levels, evaluate=lambda m: (calls.append(1), (0.5, 0.25))[1], betas=4)
    assert len(calls) == 3 * 4  # three pairs, four betas each
    assert result.barriers() == [[0.0] * 3] * 3
    for state, level in zip(before, levels, strict=True):
        assert all(torch.equal(state[k], v) for k, v in level.state_dict().items())


def test_to_dict_is_json_ready():
    result = level_connectivity([_scalar(0.0), _scalar(2.0), _scalar(1.0)], evaluate=_bump, betas=3)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["num_levels"] == 3
    assert out["path"] == {"x": [0.0, 0.5, 1.0, 1.5, 2.0], "losses": [0.0, 1.0, 2.0, 1.5, 1.0],
                           "errors": [0.0, 2.0, 2.0, 2.25, 2.0]}  # fmt: skip
    assert out["barrier"] == result.barriers()
    assert out["barrier_max"] == result.barriers(reference="max")
    assert out["loss_barrier"] == result.barriers(metric="loss")
    assert [p["levels"] for p in out["pairs"]] == [[0, 1], [0, 2], [1, 2]]
    assert out["pairs"][1] == {"levels": [0, 2], **result.curves[(0, 2)].to_dict()}


def test_progress_bar(capsys):
    levels = [_scalar(float(w)) for w in range(5)]  # 10 pairs: shown by default
    shown = level_connectivity(levels, evaluate=_bump, betas=3)
    assert "level pairs" in capsys.readouterr().err
    hidden = level_connectivity(levels, evaluate=_bump, betas=3, progress=False)
    assert capsys.readouterr().err == ""
    assert shown == hidden


def test_plot_writes_two_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    result = level_connectivity(_mlp_levels(3, seed=6), data=_data(7), betas=4)
    path_png, heatmap_png = tmp_path / "path.png", tmp_path / "barriers.png"
    result.plot(str(path_png), str(heatmap_png))
    for png in (path_png, heatmap_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    result = LevelConnectivity(2, {(0, 1): interpolate(_scalar(0.0), _scalar(1.0), evaluate=_bump, betas=2)})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="plot needs matplotlib"):
        result.plot(str(tmp_path / "a.png"), str(tmp_path / "b.png"))


def test_errors():
    ok = [_scalar(0.0), _scalar(1.0)]
    with pytest.raises(ValueError, match="at least two level solutions, got 1"):
        level_connectivity(ok[:1], evaluate=_bump)
    with pytest.raises(ValueError, match="at least two level solutions, got 0"):
        level_connectivity([], evaluate=_bump)
    other = nn.Linear(2, 1, bias=False, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"solution 2 does not fit the architecture: 'weight' has shape \(1, 2\)"):
        level_connectivity([*ok, other], evaluate=_bump)
    with pytest.raises(ValueError, match="solution 1 does not fit the architecture: 'bias' is not in the model"):
        level_connectivity([ok[0], nn.Linear(1, 1)], evaluate=_bump)
    with pytest.raises(TypeError, match="solution 1 must be an nn.Module or a state_dict, got int"):
        level_connectivity([ok[0], 3], evaluate=_bump)
    with pytest.raises(TypeError, match="first solution is a state_dict: pass model="):
        level_connectivity([m.state_dict() for m in ok], evaluate=_bump)
    with pytest.raises(ValueError, match="betas must include 0 and 1"):
        level_connectivity(ok, evaluate=_bump, betas=(0.0, 0.5))
    with pytest.raises(ValueError, match="betas must be at least 2 points"):
        level_connectivity(ok, evaluate=_bump, betas=1)
    with pytest.raises(ValueError, match="give exactly one of data="):
        level_connectivity(ok)


def test_sparse_linear_levels_with_shrinking_supports():
    # IMP levels saved as state_dicts of SparseLinear models: each level has fewer nonzeros than the last
    gen = torch.Generator().manual_seed(8)
    dense = nn.Linear(6, 3).double()
    mask = torch.ones(3, 6, dtype=torch.bool)
    states = []
    for _ in range(3):
        with torch.no_grad():
            dense.weight.copy_(torch.randn(3, 6, generator=gen, dtype=torch.float64))
        states.append(nn.Sequential(SparseLinear.from_dense(dense, mask=mask.clone())).state_dict())
        mask = mask & (torch.rand(3, 6, generator=gen) < 0.6)
    template = nn.Sequential(SparseLinear.from_dense(dense, mask=mask))
    data = (torch.randn(37, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (37,), generator=gen))
    result = level_connectivity(states, model=template, data=data, betas=3)
    for (i, j), curve in result.curves.items():
        assert curve == interpolate(states[i], states[j], model=template, data=data, betas=3)
