"""IMP's adaptive pruning ratio (Paul et al. 2023, section 2.2): epsilon from the last dense epoch's batch losses,
the sweep of ratios along the path from each level's solution to its pruned version, the largest ratio that stays
at or below the dense loss + epsilon with prune_fraction as the floor, the last prune stopping exactly at the
target, rounds that shrink as it goes, seeded subsamples, exact resume, and clear errors."""

from __future__ import annotations

import copy
import io
import math
import statistics

import pytest
import torch
from torch import nn

import sparsekern.training.imp as imp_module
from sparsekern.training import IMP

TOTAL, TARGET = 7 * 13 + 13 * 3, 9 + 4  # the model's weights; 10% of each layer, rounded


def build(layout="masked", seed=0, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(96, 7, generator=gen)
    y = (x[:, 0] > 0).long()  # the task train_round trains
    options = {"adaptive_data": (x, y), "adaptive_subsample": 64, "adaptive_betas": 3, **kwargs}
    return model, IMP(model, 0.9, layout=layout, seed=seed, adaptive=True, **options)


def train_round(model, imp, data, steps=30, losses=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = imp.start_round(optimizer)
    for _ in range(steps - sparsifier.steps):
        x = torch.randn(16, 7, generator=data)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        sparsifier.step()
        optimizer.zero_grad()
    return imp.end_round(train_losses=[0.5, 0.6, 0.55] if losses is None else losses)


def nnz(state) -> int:
    return sum(int(t.sum()) for k, t in state.items() if k.endswith("weight_mask"))


def mock_paths(monkeypatch, accept):
    """Replace the path evaluation: the loss is 1 at the level solution and 1 + (pruned fraction) at the far end
    when ``accept(fraction)`` holds, else 10; records each call's (level nnz, pruned nnz, seed)."""
    calls = []

    def fake(model, pruned, config, seed):
        level = nnz(model.state_dict())
        fraction = 1 - nnz(pruned) / level
        calls.append((level, nnz(pruned), seed))
        return (1.0, 1.0 + fraction if accept(fraction) else 10.0, 1.0), 7

    monkeypatch.setattr(imp_module, "_path_losses", fake)
    return calls


def run(model, imp, losses):
    data, counts = torch.Generator().manual_seed(3), [nnz(model.state_dict())]
    while imp.round < imp.rounds:
        rounds = imp.rounds
        train_round(model, imp, data, losses=losses)
        assert imp.rounds <= rounds  # an upper bound that only shrinks
        if not imp.done:
            counts.append(nnz(model.state_dict()))
    return counts


def sweep_ratios(row):
    return [s["ratio"] for s in row.adaptive["sweep"]]


def test_largest_ratio_below_threshold_and_last_prune_hits_target(monkeypatch):
    # epsilon 0.45 (two losses 0.45*sqrt(2) apart): a path stays below 1 + 0.45 iff it prunes at most 45%
    calls = mock_paths(monkeypatch, lambda f: True)
    model, imp = build()
    counts = run(model, imp, [1.0, 1.0 + 0.45 * math.sqrt(2)])
    assert counts == [130, 78, 47, 28, 17, 13]  # 40% each time (50% is above); 17 -> 13 stops at the target
    assert imp.round == imp.rounds == 6 and imp.done and len(imp.history) == 6
    first, last = imp.history[0].adaptive, imp.history[4].adaptive
    assert first["epsilon"] == pytest.approx(0.45, abs=1e-12) and first["threshold"] == pytest.approx(1.45)
    assert first["ratio"] == first["pruned"] == 0.4
    assert [s["nnz"] for s in first["sweep"]] == [117, 104, 91, 78, 65, 52, 39, 26, 13]
    assert [s["max_loss"] <= 1.45 for s in first["sweep"]] == [True] * 4 + [False] * 5
    assert first["forward_passes"] == 7 * 9
    # 17 weights: ratio 0.2 reaches the target (13.6 is within the tolerance), so the sweep stops there
    assert sweep_ratios(imp.history[4]) == [0.1, 0.2] and last["ratio"] == 0.2
    assert imp.history[5].adaptive is None  # the last round prunes nothing
    assert calls[0][:2] == (130, 117)
    assert imp.report()[0]["adaptive"]["ratio"] == 0.4


def test_floor_of_prune_fraction(monkeypatch):
    mock_paths(monkeypatch, lambda f: False)  # every path leaves the sublevel set: p = 0, the floor prunes
    model, imp = build(prune_fraction=0.25)
    counts = run(model, imp, [0.5, 0.6])
    expected = [TOTAL]
    while expected[-1] > TARGET:  # 25% of the remaining each round, rounded; the target when within 1 of it
        exact = expected[-1] * 0.75
        expected.append(TARGET if exact <= TARGET + 1 else round(exact))
    assert counts == expected and imp.rounds == len(expected)
    assert all(row.adaptive["ratio"] == 0.0 and row.adaptive["pruned"] == 0.25 for row in imp.history[:-1])
    assert imp.history[0].adaptive["epsilon"] == pytest.approx(statistics.stdev([0.5, 0.6]), rel=1e-12)


def test_largest_ratio_even_past_a_failing_one(monkeypatch):
    # 30% fails, 40% and 50% pass, 60% fails: the largest passing one is taken
    mock_paths(monkeypatch, lambda f: f <= 0.55 and not 0.25 < f < 0.35)
    model, imp = build()
    data = torch.Generator().manual_seed(3)
    row = train_round(model, imp, data, losses=[1.0, 2.0])
    assert row.adaptive["ratio"] == 0.5 and nnz(model.state_dict()) == 65
    assert [s["max_loss"] > 5 for s in row.adaptive["sweep"]] == [False, False, True, False, False] + [True] * 4


def test_epsilon_from_given_losses(monkeypatch):
    mock_paths(monkeypatch, lambda f: True)
    losses = torch.tensor([0.9, 0.7, 0.8, 0.75, 0.71], dtype=torch.float64)
    model, imp = build()
    row = train_round(model, imp, torch.Generator().manual_seed(3), losses=losses)
    assert row.adaptive["epsilon"] == pytest.approx(statistics.stdev(losses.tolist()), rel=1e-12)
    assert row.adaptive["threshold"] == pytest.approx(1.0 + row.adaptive["epsilon"], rel=1e-12)
    # later rounds keep round 0's epsilon and threshold; their losses are ignored
    row = train_round(model, imp, torch.Generator().manual_seed(4), losses=[5.0, 50.0])
    assert row.adaptive["epsilon"] == pytest.approx(statistics.stdev(losses.tolist()), rel=1e-12)


@pytest.mark.parametrize("layout", ["masked", "sparse"])
def test_real_paths_are_seeded_and_reproducible(layout):
    def history(seed):
        model, imp = build(layout, seed=seed)
        data = torch.Generator().manual_seed(3)
        for _ in range(3):
            train_round(model, imp, data)
        return [row.adaptive for row in imp.history], imp.masks()

    (first, masks), (again, masks_again) = history(0), history(0)
    assert first == again and all(torch.equal(masks[k], masks_again[k]) for k in masks)
    assert all(row["ratio"] in (0.0, *imp_module.ADAPTIVE_RATIOS) for row in first)
    assert all(len(row["sweep"]) >= 1 and row["forward_passes"] == 3 * len(row["sweep"]) for row in first)
    other, _ = history(1)  # another seed draws other subsamples: other losses on the path
    assert [s["max_loss"] for s in other[0]["sweep"]] != [s["max_loss"] for s in first[0]["sweep"]]


def test_subsample_seeds(monkeypatch):
    calls = mock_paths(monkeypatch, lambda f: True)
    for seed in (0, 0, 1):
        model, imp = build(seed=seed)
        data = torch.Generator().manual_seed(3)
        train_round(model, imp, data)
        train_round(model, imp, data)
    seeds = [c[2] for c in calls]
    per_run = len(seeds) // 3
    a, b, c = seeds[:per_run], seeds[per_run : 2 * per_run], seeds[2 * per_run :]
    assert a == b and a != c
    assert len(set(a)) == 2  # one subsample per round, the same for every ratio of the round


@pytest.mark.parametrize("layout", ["masked", "sparse"])
@pytest.mark.parametrize("stop", ["between", "in_round"])
def test_resume_is_exact(layout, stop):
    def finish(model, imp, data):
        while not imp.done:
            train_round(model, imp, data)

    model, imp = build(layout)
    data = torch.Generator().manual_seed(3)
    finish(model, imp, data)
    expected = (imp.report(), imp.masks(), copy.deepcopy(model.state_dict()))

    model, imp = build(layout)
    data = torch.Generator().manual_seed(3)
    train_round(model, imp, data)
    train_round(model, imp, data)
    if stop == "in_round":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = imp.start_round(optimizer)
        for _ in range(2):  # plain SGD: no optimizer state to carry
            x = torch.randn(16, 7, generator=data)
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
            sparsifier.step()
            optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "imp": imp.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model, imp = build(layout)
    model.load_state_dict(state["model"])
    imp.load_state_dict(state["imp"])
    assert imp.rounds >= imp.round + 1 and imp.history[1].adaptive == state["imp"]["history"][1]["adaptive"]
    finish(model, imp, data)
    report, masks, weights = expected
    assert imp.report() == report and all(torch.equal(masks[k], imp.masks()[k]) for k in masks)
    assert all(torch.equal(weights[k], model.state_dict()[k]) for k in weights)


def test_errors():
    x, y = torch.randn(8, 7), torch.zeros(8, dtype=torch.long)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3))
    with pytest.raises(ValueError, match="adaptive=True needs adaptive_data"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True)
    with pytest.raises(ValueError, match="prunes globally with control=None"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), scope="layer")
    with pytest.raises(ValueError, match="prunes globally with control=None"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), control="reinit_pipeline")
    with pytest.raises(TypeError, match="adaptive_data must be an"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=iter([(x, y)]))
    with pytest.raises(ValueError, match="adaptive_subsample must be None or an int in"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), adaptive_subsample=9)
    with pytest.raises(ValueError, match="adaptive_subsample must be None or an int in"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=[(x, y)], adaptive_subsample=4)
    with pytest.raises(ValueError, match="adaptive_ratios must be increasing numbers in"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), adaptive_ratios=(0.3, 0.2))
    with pytest.raises(ValueError, match="adaptive_batch_size must be an int >= 1"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), adaptive_batch_size=0)
    with pytest.raises(ValueError, match="IMP: adaptive_betas must be strictly increasing"):
        IMP(copy.deepcopy(model), 0.9, adaptive=True, adaptive_data=(x, y), adaptive_betas=[0.5, 0.2])
    with pytest.raises(TypeError, match="adaptive must be a bool"):
        IMP(copy.deepcopy(model), 0.9, adaptive=1)


@pytest.mark.parametrize("losses", [None, [0.5], [0.5, float("nan")], "low"])
def test_missing_dense_losses_change_nothing(losses):
    model, imp = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    imp.start_round(optimizer)
    before = (imp.state_dict()["generator"], imp.masks(), imp.rounds)
    kwargs = {} if losses is None else {"train_losses": losses}
    with pytest.raises(ValueError, match=r"end_round\(train_losses=\[...\]\) with at least 2 finite numbers"):
        imp.end_round(**kwargs)
    assert imp.round == 0 and not imp.history and imp.rounds == before[2]
    assert torch.equal(imp.state_dict()["generator"], before[0])
    assert all(torch.equal(before[1][k], imp.masks()[k]) for k in before[1])
    assert imp.end_round(train_losses=[0.5, 0.6]).adaptive is not None  # the round can still end


def test_states_do_not_mix():
    model, imp = build()
    train_round(model, imp, torch.Generator().manual_seed(3))
    state = imp.state_dict()
    plain = IMP(nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3)), 0.9)
    with pytest.raises(ValueError, match="configuration"):
        plain.load_state_dict(state)
    model2, imp2 = build()
    model2.load_state_dict(model.state_dict())
    bad = {**state, "adaptive": {**state["adaptive"], "counts": [TOTAL, 50]}}
    rounds = imp2.rounds
    with pytest.raises(ValueError, match="adaptive must be"):
        imp2.load_state_dict(bad)
    assert imp2.round == 0 and imp2.rounds == rounds


def test_cost_counts_forward_passes_with_a_loader():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3))
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 50, 20)]  # 3 batches
    imp = IMP(model, 0.9, adaptive=True, adaptive_data=loader, adaptive_betas=4, adaptive_ratios=(0.2, 0.5))
    row = train_round(model, imp, torch.Generator().manual_seed(3))
    assert [s["ratio"] for s in row.adaptive["sweep"]] == [0.2, 0.5]
    assert row.adaptive["forward_passes"] == 2 * 4 * 3  # ratios x points x batches
    imp.start_round(torch.optim.SGD(model.parameters(), lr=0.1))  # and the loader is read again next round
    assert imp.end_round().adaptive["forward_passes"] == 2 * 4 * 3
