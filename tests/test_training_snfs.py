"""SNFS / sparse momentum (Dettmers & Zettlemoyer 2019) and redistribution= on RigL and SET: each stage against a
plain re-statement of the reference code's rule (sparse_learning's Masking), the budget arithmetic with its dense
cap, the prune-rate schedule by formula, both layouts alike, exact resume, two DDP ranks, failures and bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, rank_results
from test_training_atomic import Injected, inject, snapshot, without_ids
from test_training_imp import same
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern
from sparsekern import _csr
from sparsekern.nn import SparseLinear
from sparsekern.nn.sparse_linear import TopologyUpdate
from sparsekern.training import SET, SNFS, RigL, Static, drop_grow, sparsify
from sparsekern.training.drop_grow import redistribute

LAYOUTS = ("sparse", "masked")
STEPS, DELTA_T = 12, 3  # updates at steps 3, 6 and 9 (SNFS updates until total_steps)


def build(layout: str, *, dtype=torch.float64, seed: int = 0, sparsity: float = 0.7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype)
    sparsify(model, sparsity, distribution="uniform", layout=layout, generator=torch.Generator().manual_seed(seed))
    return model


def batch(step: int, micro: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(9, 12, generator=gen).to(dtype)
    return x, (x[:, :5] * 2).tanh()


def train_step(model, sparsifier, optimizer, step: int, micro_batches: int = 1):
    for micro in range(micro_batches):
        x, y = batch(step, micro, next(model.parameters()).dtype)
        nn.functional.mse_loss(model(x), y).backward()
    moved = sparsifier.step()
    optimizer.zero_grad()
    return moved


def dense_weight(layer) -> torch.Tensor:
    w = torch.zeros(layer.numel, dtype=layer.param.dtype)
    w[layer.active()] = layer.active_values().detach()
    return w.reshape(layer.shape)


def prune_rate(step: int, initial: float = 0.5, total: int = STEPS) -> float:
    """The reference code's CosineDecay: CosineAnnealingLR from ``initial`` to eta_min=0.005 over the run."""
    return 0.005 + (initial - 0.005) / 2 * (1 + math.cos(math.pi * step / total))


# -- plain re-statements of sparse_learning's rules -----------------------------------------------------------------
def smallest_first(values: torch.Tensor, candidates: list[int], n: int) -> list[int]:
    """The n candidates with the smallest values, ties to the lower flat index."""
    return sorted(candidates, key=lambda i: (float(values[i]), i))[:n]


def reference_update(before: dict, p: float, statistic: dict | None = None, drop_rule=None) -> dict:
    """{layer: new bool mask} for one update: SNFS's statistic, near-dense prune rate, ⌈p·nnz⌉ magnitude drop,
    redistributed budget (:func:`redistribute`, tested on its own below), momentum grow among the positions not
    kept. ``before``: {layer: (dense weight, mask, dense momentum)}."""
    names = list(before)
    if statistic is None:
        statistic = {n: before[n][2][before[n][1]].double().abs().mean().item() for n in names}
    total = math.fsum(statistic.values())
    n_drop, n_grow, kept = {}, {}, {}
    for name in names:
        weight, mask, _ = before[name]
        nnz, numel = int(mask.sum()), mask.numel()
        if drop_rule is None:
            rate, sparsity = p, (numel - nnz) / numel
            if sparsity < 0.2 and total > 0 and statistic[name] / total > 1 / len(names):
                rate = min(sparsity, p)
            n_drop[name] = math.ceil(rate * nnz)
        else:
            n_drop[name] = drop_rule(nnz)
        active = mask.reshape(-1).nonzero().reshape(-1).tolist()
        dropped = set(smallest_first(weight.reshape(-1).abs(), active, n_drop[name]))
        kept[name] = [i for i in active if i not in dropped]
    capacity = [before[n][1].numel() - int(before[n][1].sum()) + n_drop[n] for n in names]
    if total > 0:
        counts = redistribute(sum(n_drop.values()), [statistic[n] for n in names], capacity)
        n_grow = dict(zip(names, counts, strict=True))
    else:
        n_grow = n_drop
    out = {}
    for name in names:
        _, mask, momentum = before[name]
        free = sorted(set(range(mask.numel())) - set(kept[name]))
        grown = smallest_first(-momentum.reshape(-1).abs(), free, n_grow[name])
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[kept[name] + grown] = True
        out[name] = new.reshape(mask.shape)
    return out


def spy_plans(monkeypatch, sparsifier, scores_of) -> list[dict]:
    """Record {layer: (dense weight, mask, scores)} each time the sparsifier plans an update."""
    seen = []
    original = sparsifier._plan

    def spy(step):
        seen.append(
            {n: (dense_weight(layer), layer.mask(), scores_of(n).clone()) for n, layer in sparsifier.layers.items()}
        )
        return original(step)

    monkeypatch.setattr(sparsifier, "_plan", spy)
    return seen


def run_snfs(monkeypatch, layout: str, **kwargs):
    model = build(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snfs = SNFS(model, opt, total_steps=STEPS, delta_t=DELTA_T, **kwargs)
    seen = spy_plans(monkeypatch, snfs, lambda n: snfs._next[n])
    masks, grads_seen = [], []
    for step in range(1, STEPS + 1):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        if layout == "masked":  # the dense gradient before step() masks it
            grads_seen.append({n: layer.param.grad.clone() for n, layer in snfs.layers.items()})
        moved = snfs.step()
        opt.zero_grad()
        masks.append((step, moved, snfs.masks(), {n: dense_weight(layer) for n, layer in snfs.layers.items()}))
    return model, snfs, seen, masks, grads_seen


@pytest.mark.parametrize("layout", LAYOUTS)
def test_snfs_each_stage_follows_the_reference_rule(monkeypatch, layout):
    model, snfs, seen, history, _ = run_snfs(monkeypatch, layout)
    updates = [step for step, moved, *_ in history if moved]
    assert updates == [3, 6, 9] and len(seen) == 3 and len(snfs.density_history) == 3
    total_nnz = sum(int(m.sum()) for m in history[0][2].values())
    counts_moved = False
    for k, step in enumerate(updates):
        before = seen[k]
        expected = reference_update(before, prune_rate(step))
        got, weight_after = history[step - 1][2], history[step - 1][3]
        for name in expected:
            assert torch.equal(got[name], expected[name]), (step, name)
            # new connections start at 0; kept ones (a dropped one grown again too) keep their value
            was, new = before[name][1], got[name]
            assert not weight_after[name][new & ~was].any()
            assert torch.equal(weight_after[name][new & was], before[name][0][new & was])
        assert sum(int(m.sum()) for m in got.values()) == total_nnz  # the total never changes
        densities = {n: int(m.sum()) / m.numel() for n, m in got.items()}
        assert snfs.density_history[k] == densities
        counts_moved |= any(int(got[n].sum()) != int(before[n][1].sum()) for n in got)
    assert counts_moved  # the redistribution did move connections between layers


def test_snfs_on_a_masked_convolution_follows_the_reference_rule(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double()
    sparsify(model, 0.6, distribution="uniform", layout="masked", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    snfs = SNFS(model, opt, total_steps=STEPS, delta_t=DELTA_T, prune_rate=0.4)
    seen = spy_plans(monkeypatch, snfs, lambda n: snfs._next[n])
    gen = torch.Generator().manual_seed(3)
    for _ in range(DELTA_T):
        x = torch.randn(5, 2, 6, 6, generator=gen, dtype=torch.float64)
        nn.functional.mse_loss(model(x), x[:, 0, :3, 0]).backward()
        moved = snfs.step()
        opt.zero_grad()
    assert moved and snfs.masks()["0.weight"].shape == (6, 2, 3, 3)
    expected = reference_update(seen[0], prune_rate(DELTA_T, 0.4))
    assert all(torch.equal(snfs.masks()[n], expected[n]) for n in expected)


def test_snfs_momentum_is_the_dense_gradient_average_and_layouts_agree(monkeypatch):
    _, masked, _, masked_history, grads = run_snfs(monkeypatch, "masked")
    reference = {n: torch.zeros(layer.shape, dtype=torch.float64) for n, layer in masked.layers.items()}
    for step_grads in grads:
        reference = {n: 0.9 * reference[n] + step_grads[n] for n in reference}
    for name, m in masked.dense_momentum.items():
        torch.testing.assert_close(m, reference[name], rtol=1e-13, atol=0)
    # SparseLinear forms the same dense gradient from its recorded inputs and output gradients: same masks
    _, sparse, _, sparse_history, _ = run_snfs(monkeypatch, "sparse")
    for (_, _, a, _), (_, _, b, _) in zip(masked_history, sparse_history, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for name, m in sparse.dense_momentum.items():
        torch.testing.assert_close(m, masked.dense_momentum[name], rtol=1e-9, atol=1e-12)
    assert sparse.density_history == masked.density_history


def test_snfs_gradient_accumulation_and_bfloat16_momentum_dtype():
    # two micro-batches per step on a SparseLinear: the recorded batches concatenate, as one big batch would
    model = build("sparse", dtype=torch.float32)
    snfs = SNFS(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=STEPS, delta_t=DELTA_T)
    for m in range(2):
        x, y = batch(1, m, torch.float32)
        nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    snfs.step()
    assert all(m.dtype == torch.float32 for m in snfs.dense_momentum.values())
    x = torch.cat([batch(1, m, torch.float64)[0] for m in range(2)])
    model = build("masked")
    y = torch.cat([batch(1, m, torch.float64)[1] for m in range(2)])
    nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    for name, m in snfs.dense_momentum.items():
        dense = dict(model.named_parameters())[name].grad.float()
        torch.testing.assert_close(m, dense, rtol=1e-5, atol=1e-5)
    half = build("masked", dtype=torch.bfloat16)
    snfs = SNFS(half, torch.optim.SGD(half.parameters(), lr=0.1), total_steps=4)
    assert all(m.dtype == torch.float32 for m in snfs.dense_momentum.values())


@pytest.mark.skipif(
    not sparsekern._extension.available(), reason=f"extension: {sparsekern._extension.unavailable_reason}"
)
def test_compiled_snfs_records_every_step_and_updates_as_eager():
    """The backward hook's dense gradient reaches SNFS through the same opaque op in a compiled model (the nonzero
    counts change, so the graph may recompile: no claim about that), and the masks follow the eager run's."""
    import torch._dynamo

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build("sparse", dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        snfs = SNFS(model, opt, total_steps=STEPS, delta_t=DELTA_T)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for step in range(1, 2 * DELTA_T + 1):
            x, y = batch(step, dtype=torch.float32)
            nn.functional.mse_loss(run(x), y).backward()
            snfs.step()
            opt.zero_grad()
        runs.append((snfs.masks(), snfs.dense_momentum, snfs.density_history))
    torch._dynamo.reset()
    assert all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    for name, m in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], m, rtol=1e-5, atol=1e-6)
    assert runs[0][2] == runs[1][2] and len(runs[0][2]) == 2


def test_snfs_prune_rate_schedule_by_formula():
    model = build("masked")
    snfs = SNFS(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=1000, delta_t=100, prune_rate=0.4)
    # the reference code's CosineDecay is CosineAnnealingLR(eta_min=0.005) stepped once per optimizer step
    param = nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=0.4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, 1000, eta_min=0.005)
    for step in range(1, 1001):
        sgd.step()
        cosine.step()
        assert snfs.prune_rate(step) == pytest.approx(prune_rate(step, 0.4, 1000), abs=1e-15)
        assert snfs.prune_rate(step) == pytest.approx(sgd.param_groups[0]["lr"], abs=1e-12)
    assert [s for s in range(1, 1001) if snfs.is_update_step(s)] == list(range(100, 1000, 100))


def test_snfs_near_dense_layer_prunes_at_most_its_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5))
    scores = {"0.weight": torch.rand(20, 12), "2.weight": torch.rand(5, 20) + 1.0}
    scores["2.weight"].view(-1)[:10] = -1.0  # 90 of the 100 weights of layer 2 are kept
    sparsify(model, 0.5, distribution="global", scores=scores)  # 170 of 340: 80 in layer 0, 90 in layer 2
    snfs = SNFS(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100, delta_t=10)
    assert [layer.count() for layer in snfs.layers.values()] == [80, 90]
    p = snfs.prune_rate(10)
    # layer 2 (sparsity 0.1 < 0.2) above its equal share: min(0.1, p); below it: p, as every other layer
    assert snfs._drop_counts(10, {"0.weight": 1.0, "2.weight": 3.0}) == {
        "0.weight": math.ceil(p * 80),
        "2.weight": math.ceil(0.1 * 90),
    }
    assert snfs._drop_counts(10, {"0.weight": 3.0, "2.weight": 1.0}) == {
        "0.weight": math.ceil(p * 80),
        "2.weight": math.ceil(p * 90),
    }


# -- the budget arithmetic ---------------------------------------------------------------------------------------
def reference_residual_loop(budget: int, weights: list[float], capacity: list[int], rounds: int = 1000) -> list:
    """sparse_learning's calc_growth_redistribution (real-valued), with the cap at dense rather than 0.99 of it:
    shares of the budget, a capped layer's overflow spread over all layers (the capped ones give theirs back)."""
    share = [w / sum(weights) for w in weights]
    regrowth, mean_residual = [None] * len(weights), 0.0
    for _ in range(rounds):
        residual = 0.0
        for i in range(len(weights)):
            value = (share[i] * budget if regrowth[i] is None else regrowth[i]) + mean_residual
            if value > capacity[i]:
                regrowth[i] = float(capacity[i])
                residual += value - capacity[i]
            else:
                regrowth[i] = value
        mean_residual = residual / len(weights)
        if residual <= 1e-12:
            break
    return regrowth


def test_redistribute_hand_counts():
    assert redistribute(10, [1.0, 3.0], [100, 100]) == [3, 7]  # 2.5 / 7.5: the tie to the lower layer
    assert redistribute(10, [1.0, 3.0], [100, 4]) == [6, 4]  # capped at dense, the overflow to the other
    # 2 / 2 / 16: layer 2 caps at 3 (13 over: 8.5 each), then layer 1 at 5 (3.5 more to layer 0)
    assert redistribute(20, [1.0, 1.0, 8.0], [100, 5, 3]) == [12, 5, 3]
    assert redistribute(7, [0.0, 1.0], [10, 10]) == [0, 7]
    assert redistribute(6, [1.0, 1.0, 1.0], [2, 2, 2]) == [2, 2, 2]  # everything dense
    assert redistribute(0, [1.0, 2.0], [0, 0]) == [0, 0]


def test_redistribute_matches_the_reference_loop_and_sums_exactly():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        layers = int(torch.randint(1, 6, (), generator=gen))
        capacity = torch.randint(0, 40, (layers,), generator=gen).tolist()
        budget = int(torch.randint(0, sum(capacity) + 1, (), generator=gen))
        weights = (torch.rand(layers, generator=gen) ** 3).tolist()
        counts = redistribute(budget, weights, capacity)
        assert sum(counts) == budget and all(0 <= c <= cap for c, cap in zip(counts, capacity, strict=True))
        targets = reference_residual_loop(budget, weights, capacity)
        assert all(abs(c - t) < 1 + 1e-9 for c, t in zip(counts, targets, strict=True)), (counts, targets)


def test_redistribute_bad_input():
    with pytest.raises(ValueError, match="a budget of 11 exceeds the total capacity 10"):
        redistribute(11, [1.0, 1.0], [5, 5])
    with pytest.raises(ValueError, match="the weights must have a positive finite sum"):
        redistribute(1, [0.0, 0.0], [5, 5])
    with pytest.raises(ValueError, match="positive finite sum"):
        redistribute(1, [math.inf, 1.0], [5, 5])


# -- redistribution= on RigL and SET -------------------------------------------------------------------------------
def optimizer_momentum(opt, layer) -> torch.Tensor:
    state = opt.state[layer.param]
    if "exp_avg" in state:
        return layer.active_of(state["exp_avg"]) / (layer.active_of(state["exp_avg_sq"]).sqrt() + 1e-8)
    return layer.active_of(state["momentum_buffer"])


CASES = [
    ("rigl", "momentum", "sgd", "sparse"),
    ("rigl", "magnitude", "adam", "masked"),
    ("rigl", "momentum", "adam", "masked"),
    ("set", "momentum", "sgd", "masked"),
    ("set", "magnitude", "sgd", "sparse"),
]


@pytest.mark.parametrize("method, redistribution, optimizer, layout", CASES)
def test_redistribution_on_rigl_and_set(monkeypatch, method, redistribution, optimizer, layout):
    model = build(layout)
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.01)
    kwargs = dict(total_steps=STEPS, delta_t=DELTA_T, t_end=STEPS, redistribution=redistribution)
    sparsifier = RigL(model, opt, **kwargs, precision="exact") if method == "rigl" else SET(model, opt, **kwargs)
    statistics = []
    original = sparsifier._plan

    def spy(step):  # the statistic the reference code reads: mean |optimizer momentum| or |w| over active weights
        values = {
            n: layer.active_values() if redistribution == "magnitude" else optimizer_momentum(opt, layer)
            for n, layer in sparsifier.layers.items()
        }
        statistics.append({n: v.detach().double().abs().mean().item() for n, v in values.items()})
        counts = {n: layer.count() for n, layer in sparsifier.layers.items()}
        statistics[-1] = (step, statistics[-1], counts)
        return original(step)

    monkeypatch.setattr(sparsifier, "_plan", spy)
    total = sum(layer.count() for layer in sparsifier.layers.values())
    for step in range(1, STEPS + 1):
        train_step(model, sparsifier, opt, step)
        if sparsifier.is_update_step(step):
            t, stat, counts = statistics[-1]
            n_drop = {n: sparsifier.schedule.n_drop(t, c) for n, c in counts.items()}
            layers = sparsifier.layers
            capacity = [layers[n].numel - counts[n] + n_drop[n] for n in counts]
            grown = redistribute(sum(n_drop.values()), list(stat.values()), capacity)
            expected = [counts[n] - n_drop[n] + g for n, g in zip(counts, grown, strict=True)]
            assert [layer.count() for layer in layers.values()] == expected, step
            assert sparsifier.density_history[-1] == {n: layers[n].count() / layers[n].numel for n in layers}
    assert sum(layer.count() for layer in sparsifier.layers.values()) == total
    assert len(sparsifier.density_history) == 3
    assert sparsifier.state_dict()["config"]["redistribution"] == redistribution


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rigl_redistribution_selection_restated(layout):
    # RigL with redistribution: each layer's ⌊α_t·nnz⌋ magnitude drop, then its redistributed share grown at the
    # largest |dL/dW| among the positions not kept
    model = build(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=STEPS, delta_t=DELTA_T, redistribution="magnitude", precision="exact")
    for step in range(1, DELTA_T):
        train_step(model, rigl, opt, step)
    x, y = batch(DELTA_T)
    nn.functional.mse_loss(model(x), y).backward()
    grads = dense_gradients(rigl, x, y)
    before = {n: (dense_weight(layer), layer.mask(), grads[n]) for n, layer in rigl.layers.items()}
    statistic = {n: layer.active_values().detach().double().abs().mean().item() for n, layer in rigl.layers.items()}
    assert rigl.step()
    expected = reference_update(before, 0.0, statistic, drop_rule=lambda nnz: rigl.schedule.n_drop(DELTA_T, nnz))
    assert all(torch.equal(rigl.masks()[n], expected[n]) for n in expected)
    assert any(int(expected[n].sum()) != int(before[n][1].sum()) for n in expected)  # counts moved


def dense_gradients(sparsifier, x, y) -> dict:
    """dL/dW of every sparse layer, dense, from a plain dense copy of the model (float64)."""
    layers = list(sparsifier.layers.values())
    plain = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    targets = [plain[0], plain[2], plain[4]]
    with torch.no_grad():
        for layer, target in zip(layers, targets, strict=True):
            target.weight.copy_(dense_weight(layer))
            target.bias.copy_(layer.module.bias)
    nn.functional.mse_loss(plain(x), y).backward()
    return {name: target.weight.grad for name, target in zip(sparsifier.layers, targets, strict=True)}


def test_redistribution_none_is_todays_behaviour():
    runs = []
    for redistribution in (None, "default"):
        model = build("sparse", dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kwargs = {} if redistribution == "default" else {"redistribution": None}
        rigl = RigL(model, opt, total_steps=STEPS, delta_t=DELTA_T, **kwargs)
        for step in range(1, STEPS + 1):
            train_step(model, rigl, opt, step)
        assert rigl.density_history == [] and "density_history" not in rigl.state_dict()
        runs.append((model.state_dict(), rigl.masks()))
    assert same(runs[0], runs[1])
    assert (RigL.flops_rule, SET.flops_rule, SNFS.flops_rule) == ("rigl", "sparse", "dense_gradient")


def test_a_state_saved_before_redistribution_existed_loads():
    model = build("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=STEPS, delta_t=DELTA_T)
    state = rigl.state_dict()
    del state["config"]["redistribution"]
    rigl.load_state_dict(state)
    with pytest.raises(ValueError, match=r"the state lacks \['density_history'\]"):
        RigL(model, opt, total_steps=STEPS, delta_t=DELTA_T, redistribution="momentum").load_state_dict(state)


# -- resume, failures, bad input -------------------------------------------------------------------------------------
RESUMED = {
    "snfs-sparse": ("snfs", "sparse"),
    "snfs-masked": ("snfs", "masked"),
    "rigl-momentum-sparse": ("rigl", "sparse"),
    "set-magnitude-masked": ("set", "masked"),
}


def make_run(method: str, layout: str, seed: int = 0):
    model = build(layout, dtype=torch.float32, seed=seed)
    opt = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if method == "snfs"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    kwargs = dict(total_steps=STEPS, delta_t=DELTA_T)
    if method == "snfs":
        return model, opt, SNFS(model, opt, **kwargs, momentum=0.8)
    if method == "rigl":
        return model, opt, RigL(model, opt, **kwargs, redistribution="momentum")
    return model, opt, SET(model, opt, **kwargs, redistribution="magnitude", seed=4)


@pytest.mark.parametrize("method, layout", RESUMED.values(), ids=RESUMED.keys())
def test_resume_is_bit_identical(method, layout):
    model, opt, sparsifier = make_run(method, layout)
    for step in range(1, STEPS + 1):
        train_step(model, sparsifier, opt, step, micro_batches=2)
    expected = model.state_dict(), sparsifier.state_dict(), opt.state_dict()

    model, opt, sparsifier = make_run(method, layout)
    for step in range(1, 6):  # stop after step 5: step 6 is an update
        train_step(model, sparsifier, opt, step, micro_batches=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model, opt, sparsifier = make_run(method, layout, seed=1)  # other weights and masks, all overwritten
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    for step in range(6, STEPS + 1):
        train_step(model, sparsifier, opt, step, micro_batches=2)
    assert same((model.state_dict(), sparsifier.state_dict(), opt.state_dict()), expected)
    assert len(sparsifier.density_history) == (3 if method == "snfs" else 2)  # RigL/SET: t_end 0.75, steps 3 and 6


FAILURES = {
    "index": (_csr.CSRIndex, "from_flat"),
    "carry": (TopologyUpdate, "apply"),
    "stage_layer": (SparseLinear, "_stage_topology"),
    "mask": (drop_grow, "flat_mask"),
    "grow": (drop_grow, "grow_from_scores"),
    "redistribute": (sparsekern.training.sparsifier, "redistribute"),
}


FAILURE_CASES = [
    *[("sparse", point) for point in ("index", "carry", "stage_layer", "grow", "redistribute")],
    *[("masked", point) for point in ("mask", "grow", "redistribute")],
]


@pytest.mark.parametrize("layout, point", FAILURE_CASES)
def test_snfs_failed_update_changes_nothing_and_a_retry_gives_the_run_that_never_failed(monkeypatch, layout, point):
    model, opt, snfs = make_run("snfs", layout)
    for step in range(1, DELTA_T):
        train_step(model, snfs, opt, step)
    x, y = batch(DELTA_T, dtype=torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    owner, attr = FAILURES[point]
    calls = inject(monkeypatch, owner, attr, 1 if point == "redistribute" else 2)  # the second layer's call fails
    before = snapshot(model, opt, snfs)
    with pytest.raises(Injected):
        snfs.step()
    assert calls[0] >= 1
    assert same(without_ids(snapshot(model, opt, snfs)), without_ids(before))
    monkeypatch.undo()
    assert snfs.step()
    model2, opt2, snfs2 = make_run("snfs", layout)  # the run that never failed
    for step in range(1, DELTA_T + 1):
        train_step(model2, snfs2, opt2, step)
    assert same(model.state_dict(), model2.state_dict()) and same(snfs.state_dict(), snfs2.state_dict())
    assert same(opt.state_dict(), opt2.state_dict())


def test_rigl_redistribution_failed_update_changes_nothing(monkeypatch):
    model, opt, rigl = make_run("rigl", "sparse")
    for step in range(1, DELTA_T):
        train_step(model, rigl, opt, step)
    x, y = batch(DELTA_T, dtype=torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    inject(monkeypatch, SparseLinear, "_stage_topology", 3)
    before = snapshot(model, opt, rigl)
    with pytest.raises(Injected):
        rigl.step()
    assert same(without_ids(snapshot(model, opt, rigl)), without_ids(before))


def test_snfs_non_finite_momentum_raises_and_changes_nothing():
    model, opt, snfs = make_run("snfs", "masked")
    for step in range(1, DELTA_T):
        train_step(model, snfs, opt, step)
    x, y = batch(DELTA_T, dtype=torch.float32)
    nn.functional.mse_loss(model(x), y).backward()
    model[2].weight.grad[0, 0] = math.inf  # (inf, not NaN: the snapshots compare equal to themselves)
    before = snapshot(model, opt, snfs)
    with pytest.raises(ValueError, match="SNFS.step: the momentum of '2.weight' holds inf or NaN"):
        snfs.step()
    assert same(without_ids(snapshot(model, opt, snfs)), without_ids(before))


def test_redistribution_momentum_needs_optimizer_momentum():
    model = build("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum buffer
    rigl = RigL(model, opt, total_steps=STEPS, delta_t=DELTA_T, redistribution="momentum")
    for step in range(1, DELTA_T):
        train_step(model, rigl, opt, step)
    nn.functional.mse_loss(model(batch(DELTA_T)[0]), batch(DELTA_T)[1]).backward()
    before = snapshot(model, opt, rigl)
    with pytest.raises(ValueError, match=r"redistribution='momentum' reads the optimizer's momentum .* SGD does not"):
        rigl.step()
    assert same(without_ids(snapshot(model, opt, rigl)), without_ids(before))


def test_bad_arguments():
    model = build("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match=r"SNFS: momentum must be a number in \[0, 1\)"):
            SNFS(model, opt, total_steps=10, momentum=bad)
    for bad in (0.0, 1.5, False, None):
        with pytest.raises(ValueError, match=r"SNFS: prune_rate must be a number in \(0, 1\]"):
            SNFS(model, opt, total_steps=10, prune_rate=bad)
    with pytest.raises(ValueError, match="delta_t must be a positive int"):
        SNFS(model, opt, total_steps=10, delta_t=0)
    for cls in (RigL, SET):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: redistribution must be one of \(None, 'momentum'"):
            cls(model, opt, total_steps=10, redistribution="nonzeros")
    with pytest.raises(ValueError, match="the model has no sparse layer"):
        SNFS(nn.Linear(3, 3), opt, total_steps=10)
    layer = drop_grow.as_layer(model[0])
    free = layer.numel - layer.count() + 1
    with pytest.raises(ValueError, match=f"cannot grow {free + 1} connections among {free} free positions"):
        layer.plan(1, "scores", n_grow=free + 1, scores=torch.ones(layer.shape))


def test_bad_states_are_refused_and_change_nothing():
    model, opt, snfs = make_run("snfs", "masked")
    for step in range(1, DELTA_T + 1):
        train_step(model, snfs, opt, step)
    good = snfs.state_dict()
    bad_momentum = copy.deepcopy(good)
    bad_momentum["dense_momentum"]["0.weight"] = torch.zeros(3)
    bad_history = copy.deepcopy(good)
    bad_history["density_history"] = [{"0.weight": 0.5}]
    before = copy.deepcopy(good)
    with pytest.raises(ValueError, match=r"dense_momentum\['0.weight'\] must be a torch.float32 tensor of shape"):
        snfs.load_state_dict(bad_momentum)
    with pytest.raises(ValueError, match="density_history must be a list of"):
        snfs.load_state_dict(bad_history)
    with pytest.raises(ValueError, match="expected the state of a SNFS, got 'RigL'"):
        snfs.load_state_dict({**good, "kind": "RigL"})
    assert same(snfs.state_dict(), before)
    with pytest.raises(ValueError, match="expected the state of a Static, got 'SNFS'"):
        Static(model, opt).load_state_dict(good)


# -- DDP ---------------------------------------------------------------------------------------------------------
WORLD = 2


def make_ddp(method: str, layout: str, group):
    """SNFS, or RigL with redistribution: under DDP on masked layers; on SparseLinear layers (whose nnz changes, which
    a DDP wrapper cannot follow) on the model itself with group= and the gradients averaged by hand."""
    model = build(layout)
    ddp = DDP(model) if group is not None and layout == "masked" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    extra = {"group": group} if group is not None and layout == "sparse" else {}
    kwargs = dict(total_steps=STEPS, delta_t=DELTA_T, **extra)
    if method == "snfs":
        return model, ddp, opt, SNFS(ddp, opt, **kwargs)
    return model, ddp, opt, RigL(ddp, opt, **kwargs, redistribution="momentum")


def _ddp_run(rank: int, method: str, layout: str) -> dict:
    model, ddp, opt, sparsifier = make_ddp(method, layout, dist.group.WORLD)
    history = []
    for step in range(1, 7):
        x, y = batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        if ddp is model:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(WORLD)
        sparsifier.step()
        opt.zero_grad()
        history.append(sparsifier.masks())
    return {"history": history, "state": sparsifier.state_dict(), "model": model.state_dict()}


DDP_CASES = [("snfs", "sparse"), ("snfs", "masked"), ("rigl", "masked"), ("rigl", "sparse")]


def _ddp_worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, _ddp_worker_results)


def _ddp_worker_results(rank: int) -> dict:
    results = {case: _ddp_run(rank, *case) for case in DDP_CASES}
    try:
        model = DDP(build("sparse"))
        SNFS(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=STEPS)
        results["refused"] = "no error"
    except ValueError as exc:
        results["refused"] = str(exc)
    return results


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("snfs_ddp")
    return rank_results(_ddp_worker, path, WORLD, 180)


@pytest.mark.parametrize("method, layout", DDP_CASES)
def test_ddp_identical_masks_equal_to_one_process(ddp_runs, method, layout):
    ranks = [run[method, layout] for run in ddp_runs]
    assert same(ranks[0], ranks[1])  # masks after every step, momentum, history, weights: bit for bit
    history = ranks[0]["state"]["density_history"]
    assert len(history) == 2 and history[0] != history[1]
    # one process with both ranks' batches as micro-batches of each step (each loss halved, as DDP averages)
    model, _, opt, sparsifier = make_ddp(method, layout, None)
    for step in range(1, 7):
        for rank in range(WORLD):
            x, y = batch(step, rank)
            (nn.functional.mse_loss(model(x), y) / WORLD).backward()
        sparsifier.step()
        opt.zero_grad()
        got = sparsifier.masks()
        assert all(torch.equal(got[n], ranks[0]["history"][step - 1][n]) for n in got), step
    assert sparsifier.state_dict()["density_history"] == history


def test_ddp_wrapper_around_sparse_layers_is_refused_when_counts_move(ddp_runs):
    for run in ddp_runs:
        assert run["refused"].startswith("SNFS: moving nonzeros between layers changes the size of SparseLinear")
