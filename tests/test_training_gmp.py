"""GMP (gradual magnitude pruning): the cubic schedule by formula, every prune against a plain-PyTorch re-statement of
Zhu & Gupta's rule (mask equality), exact counts per layer and overall, pruned weights out of the optimizer state,
bit-identical resume, all-or-nothing prune steps, DDP on two ranks, bad arguments."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import gloo_rank, rank_results
from test_training_atomic import COMMIT_POINTS, Injected, inject, snapshot, without_ids
from test_training_imp import same
from torch import nn

from sparsekern.training import GMP, GMPSchedule, sparsify
from sparsekern.training.drop_grow import CompressedLayer
from sparsekern.training.gmp import SCOPES

LAYOUTS = ("sparse", "masked")


def cubic(t, s_i, s_f, t0, n, dt):
    """Zhu & Gupta's s_t, written out: s_i until t_0, s_f from t_0 + nΔt on."""
    if t <= t0:
        return s_i
    if t >= t0 + n * dt:
        return s_f
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize(
    "total, t_start, t_end, dt, t0, n",
    [
        (1000, 0, 0.75, 100, 0, 7),  # the defaults: t_0 before the first step, 750 = 7.5 Δt: the last prune at 700
        (1000, 100, 700, 100, 100, 6),
        (1000, 0.25, 0.75, 50, 250, 10),
        (97, 3, 97, 7, 3, 13),  # odd sizes: 3 + 13 * 7 = 94
        (10, 1, 10, 9, 1, 1),  # a single prune after t_0
    ],
)
def test_schedule_cubic_by_formula(total, t_start, t_end, dt, t0, n):
    s = GMPSchedule(total, t_start, t_end, dt)
    assert (s.begin_step, s.n, s.end_step) == (t0, n, t0 + n * dt)
    expected_steps = [t0 + k * dt for k in range(n + 1) if t0 + k * dt >= 1]
    assert s.prune_steps() == expected_steps
    assert [t for t in range(0, total + 2) if s.is_prune(t)] == expected_steps
    for s_i, s_f in [(0.0, 0.9), (0.5, 0.95), (0.3, 0.3)]:
        for t in range(0, total + 5):
            assert s.sparsity(t, s_i, s_f) == pytest.approx(cubic(t, s_i, s_f, t0, n, dt), abs=1e-15), t
        assert s.sparsity(t0, s_i, s_f) == s_i and s.sparsity(t0 + n * dt, s_i, s_f) == s_f  # both ends exactly
        assert s.sparsity(max(t0 - 1, 0), s_i, s_f) == s_i and s.sparsity(total + 3, s_i, s_f) == s_f
    # counts: the cubic on the counts, rounded once; exact ends, never rising
    counts = [s.count(t, 1000, 37) for t in range(total + 1)]
    assert counts[t0] == 1000 and counts[t0 + n * dt] == 37 and counts[-1] == 37
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[t0 + dt] == round(37 + 963 * (1 - 1 / n) ** 3)


def make(layout, seed=0, dtype=torch.float32):
    """Conv2d + two Linear layers, dense: SparseLinear + a masked conv ("sparse"), or all masked."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 7), nn.ReLU(), nn.Linear(7, 3)
    ).to(dtype)  # fmt: skip
    sparsify(model, 0.0, layout=layout)
    return model


def batch(gen, dtype=torch.float32):
    x = torch.randn(6, 2, 5, 5, generator=gen, dtype=dtype)
    return x, (x[:, 0, 2, 2] > 0).long() + (x[:, 1, 1, 1] > 0).long()


def dense_weights(gmp) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in gmp.layers.items():
        w = layer.module.dense_weight() if isinstance(layer, CompressedLayer) else layer.module.weight
        out[name] = w.detach().clone()
    return out


def reference_masks(weights, masks, scope, targets) -> dict[str, torch.Tensor]:
    """Zhu & Gupta's prune, re-stated: drop the smallest |w| among the active weights down to the target counts
    (per layer, or one ranking over all layers in order), ties to the lower flat index (and earlier layer) first."""
    names = list(weights)
    active = {k: masks[k].reshape(-1).nonzero().reshape(-1) for k in names}
    mags = {k: weights[k].reshape(-1)[active[k]].abs().double() for k in names}
    out = {k: masks[k].clone() for k in names}
    if scope == "layer":
        for k, target in zip(names, targets, strict=True):
            drop = torch.argsort(mags[k], stable=True)[: active[k].numel() - target]
            out[k].view(-1)[active[k][drop]] = False
        return out
    flat = torch.cat([mags[k] for k in names])
    drop = torch.argsort(flat, stable=True)[: flat.numel() - targets[0]]
    owner = torch.cat([torch.full((active[k].numel(),), i) for i, k in enumerate(names)])
    offsets = [0, *torch.tensor([active[k].numel() for k in names]).cumsum(0).tolist()]
    for i, k in enumerate(names):
        mine = drop[owner[drop] == i] - offsets[i]
        out[k].view(-1)[active[k][mine]] = False
    return out


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_prune_matches_the_reference_and_the_cubic_counts(layout, scope):
    model = make(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GMP(model, opt, sparsity=0.8, total_steps=30, t_start=2, t_end=0.8, delta_t=4, scope=scope)
    assert gmp.schedule.prune_steps() == [2, 6, 10, 14, 18, 22] and not gmp.is_update_step(2)  # t_0: s_i = now
    numel = {name: math.prod(layer.shape) for name, layer in gmp.layers.items()}
    final = [round(0.2 * n) for n in numel.values()]
    if scope == "global":
        final = [round(0.2 * sum(numel.values()))]
    start = list(numel.values()) if scope == "layer" else [sum(numel.values())]
    gen = torch.Generator().manual_seed(3)
    pruned = 0
    for t in range(1, 31):
        nn.functional.cross_entropy(model(batch(gen)[0]), batch(gen)[1]).backward()
        before = (dense_weights(gmp), gmp.masks())
        counts_before = [layer.count() for layer in gmp.layers.values()]
        moved = gmp.step()
        opt.zero_grad()
        assert moved == (t in (6, 10, 14, 18, 22))
        counts = [layer.count() for layer in gmp.layers.values()]
        if not moved:
            assert counts == counts_before
            continue
        pruned += 1
        p = (t - 2) / 20
        targets = [round(f + (s - f) * (1 - p) ** 3) for s, f in zip(start, final, strict=True)]
        assert (counts if scope == "layer" else [sum(counts)]) == targets, t
        expected = reference_masks(*before, scope, targets)
        got = gmp.masks()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (t, name)
        # the pruned weights are gone: zero weight, gradient and momentum (masked), or out of the nnz-sized state
        for layer in gmp.layers.values():
            state = opt.state[layer.param]["momentum_buffer"]
            if isinstance(layer, CompressedLayer):
                assert layer.param.shape == state.shape == (layer.count(),)
            else:
                off = ~layer.mask()
                assert not layer.param[off].any() and not state[off].any()
    assert pruned == 5
    report = gmp.report()
    assert report.nnz == (sum(final) if scope == "layer" else final[0])
    if scope == "layer":
        assert [r.nnz for r in report.layers] == final
    # counts_at: the counts during each step, from the prunes before it
    history = gmp.state_dict()["history"]
    for t in range(1, 31):
        last = max((u for u in history if u < t), default=0)
        assert list(gmp.counts_at(t).values()) == history[last], t


def test_sparse_and_masked_layouts_prune_alike_and_carry_the_optimizer_state():
    """float64: the same training on SparseLinear and on masked Linear layers keeps the same weights, so the same
    prunes; the SparseLinear's nnz-sized Adam moments equal the masked layer's dense ones at the mask."""
    runs = {}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(9, 13), nn.ReLU(), nn.Linear(13, 4)).double()
        sparsify(model, 0.0, layout=layout)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        gmp = GMP(model, opt, sparsity=0.85, total_steps=24, delta_t=3, t_end=20)
        gen = torch.Generator().manual_seed(1)
        for _ in range(24):
            x = torch.randn(5, 9, generator=gen, dtype=torch.float64)
            nn.functional.mse_loss(model(x), x[:, :4]).backward()
            gmp.step()
            opt.zero_grad()
        runs[layout] = (gmp, opt)
    (sparse, sparse_opt), (masked, masked_opt) = runs["sparse"], runs["masked"]
    for name, layer in sparse.layers.items():
        mask = layer.mask()
        other = masked.layers[name]
        assert torch.equal(mask, other.mask()), name
        assert layer.count() == round(0.15 * mask.numel())
        flat = mask.reshape(-1)
        torch.testing.assert_close(layer.param.detach(), other.param.detach().reshape(-1)[flat], rtol=1e-9, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            dense = masked_opt.state[other.param][key]
            torch.testing.assert_close(sparse_opt.state[layer.param][key], dense.reshape(-1)[flat], rtol=1e-9, atol=0)
            assert not dense.reshape(-1)[~flat].any()


def test_starts_from_the_current_masks_or_prunes_to_initial_sparsity_at_t0():
    model = nn.Sequential(nn.Linear(20, 10))
    sparsify(model, 0.5, layout="masked", distribution="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(model, opt, sparsity=0.9, total_steps=10, t_start=2, t_end=6, delta_t=2)
    assert gmp.scheduled_counts(2) == [100] and gmp.scheduled_counts(6) == [20]
    assert gmp.scheduled_counts(4) == [round(20 + 80 * 0.5**3)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10))
    sparsify(model, 0.0, layout="sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GMP(model, opt, sparsity=0.9, total_steps=10, t_start=2, t_end=6, delta_t=2, initial_sparsity=0.4)
    assert gmp.is_update_step(2) and gmp.counts_at(2) == {"0.weight": 200}
    for t in range(1, 7):
        model(torch.randn(3, 20)).sum().backward()
        gmp.step()
        opt.zero_grad()
        assert (
            model[0].nnz == {1: 200, 2: 120, 3: 120, 4: round(20 + 100 * 0.5**3), 5: round(20 + 100 * 0.5**3), 6: 20}[t]
        ), t
    assert gmp.counts_at(3) == {"0.weight": 120} and gmp.counts_at(10) == {"0.weight": 20}


def test_counts_at_future_steps():
    model = make("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layer = GMP(model, opt, sparsity=0.8, total_steps=30, delta_t=4, t_end=20)
    assert layer.counts_at(30) == {"0.weight": round(0.2 * 72), "3.weight": round(0.2 * 252), "5.weight": 4}
    assert layer.counts_at(9)["3.weight"] == round(50 + 202 * (1 - 8 / 20) ** 3)
    model = make("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    glob = GMP(model, opt, sparsity=0.8, total_steps=30, delta_t=4, t_end=20, scope="global")
    assert glob.counts_at(4) == {"0.weight": 72, "3.weight": 252, "5.weight": 21}
    with pytest.raises(ValueError, match=r"with scope='global' the layers' counts after the prune at step 4 depend"):
        glob.counts_at(5)
    with pytest.raises(ValueError, match=r"step must be an int in \[1, 30\], got 31"):
        glob.counts_at(31)


STEPS = 26


def build(layout, scope, seed):
    model = make(layout, seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gmp = GMP(model, opt, sparsity=0.75, total_steps=STEPS, t_start=1, t_end=0.8, delta_t=5, scope=scope)
    return model, opt, gmp


def train(model, opt, gmp, gen, steps):
    for _ in range(steps):
        for _ in range(2):  # two micro-batches
            x, y = batch(gen)
            nn.functional.cross_entropy(model(x), y).backward()
        gmp.step()
        opt.zero_grad()


# stops at 5 (the eve of the prune at 6) and 13 (between prunes), each layout and scope once
@pytest.mark.parametrize(
    "layout, scope, stop", [("sparse", "layer", 5), ("sparse", "global", 13), ("masked", "layer", 13),
                            ("masked", "global", 5)]
)  # fmt: skip
def test_resume_reproduces_the_uninterrupted_run(layout, scope, stop):
    model, opt, gmp = build(layout, scope, 0)
    train(model, opt, gmp, torch.Generator().manual_seed(5), STEPS)
    expected = {k: v.clone() for k, v in model.state_dict().items()}, gmp.masks(), gmp.state_dict()

    model, opt, gmp = build(layout, scope, 0)
    gen = torch.Generator().manual_seed(5)
    train(model, opt, gmp, gen, stop)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gmp": gmp.state_dict(),
                "data": gen.get_state()}, buffer)  # fmt: skip
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only: plain data

    model, opt, gmp = build(layout, scope, 1)  # another init, all overwritten
    model.load_state_dict(state["model"])  # first: the masks (and SparseLinear's sizes)
    opt.load_state_dict(state["opt"])
    gmp.load_state_dict(state["gmp"])
    gen = torch.Generator()
    gen.set_state(state["data"])
    assert gmp.steps == stop
    train(model, opt, gmp, gen, STEPS - stop)
    got = model.state_dict()
    assert got.keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(got[key], value), key
    assert same(gmp.masks(), expected[1]) and same(gmp.state_dict(), expected[2])


def test_load_state_dict_checks_before_changing_anything():
    model, opt, gmp = build("masked", "layer", 0)
    train(model, opt, gmp, torch.Generator().manual_seed(5), 8)
    state = gmp.state_dict()
    fresh_model, _, fresh = build("masked", "layer", 0)
    with pytest.raises(ValueError, match="the mask of '0.weight' differs from the model's; load the model's"):
        fresh.load_state_dict(state)
    fresh_model.load_state_dict(model.state_dict())
    bad = [
        ({**state, "config": {**state["config"], "scope": "global"}}, "configuration .* differs"),
        ({**state, "start": [1, 2]}, "start must be 3 int counts at or above the final ones"),
        ({**state, "history": {0: state["history"][0]}}, r"history must map step 0 and every prune step up to step 8"),
        ({**state, "history": {**state["history"], 7: [1, 1, 1]}}, "history must map"),
        ({k: v for k, v in state.items() if k != "history"}, r"the state lacks \['history'\]"),
    ]
    before = fresh.state_dict()
    for broken, message in bad:
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(broken)
        assert same(fresh.state_dict(), before), message
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), state)


@pytest.mark.parametrize("layout, scope", [("sparse", "layer"), ("masked", "global")])
def test_failed_prune_changes_nothing(layout, scope, monkeypatch):
    def eve():  # one backward before the prune at step 6
        model, opt, gmp = build(layout, scope, 0)
        gen = torch.Generator().manual_seed(5)
        train(model, opt, gmp, gen, 5)
        x, y = batch(gen)
        nn.functional.cross_entropy(model(x), y).backward()
        return model, opt, gmp

    model, opt, gmp = eve()
    assert gmp.step()
    expected = snapshot(model, opt, gmp)
    points = {**COMMIT_POINTS, "optimizer_step": ("optimizer", "step")}
    tried = 0
    for point, (owner, attr) in points.items():
        with monkeypatch.context() as m:
            model, opt, gmp = eve()
            calls = inject(m, opt if owner == "optimizer" else owner, attr, None)
            gmp.step()
        for k in range(1, calls[0] + 1):
            model, opt, gmp = eve()
            before = snapshot(model, opt, gmp)
            with monkeypatch.context() as m:
                inject(m, opt if owner == "optimizer" else owner, attr, k, after=owner == "optimizer")
                with pytest.raises(Injected):
                    gmp.step()
            assert same(snapshot(model, opt, gmp), before), (point, k)
            assert gmp.step()  # the retry is the prune that never failed
            assert same(without_ids(snapshot(model, opt, gmp)), without_ids(expected)), (point, k)
            tried += 1
    # sparse: two SparseLinear layers' index, values, gradient, two Adam moments; the conv's mask; the step
    assert tried >= (2 * 5 + 1 if layout == "sparse" else 3) + 1


def test_bad_arguments():
    model = make("masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ok = dict(sparsity=0.9, total_steps=100, delta_t=10)
    cases = [
        (dict(sparsity=1.0), r"sparsity must be a number in \(0, 1\), got 1.0"),
        (dict(sparsity=True), r"sparsity must be a number in \(0, 1\), got True"),
        (dict(total_steps=0), "total_steps must be a positive int, got 0"),
        (dict(delta_t=2.5), "delta_t must be a positive int, got 2.5"),
        (dict(t_start=1.5), r"t_start must be an int step in \[0, total_steps=100\] or a float fraction"),
        (dict(t_end=0), r"t_end must be an int step in \[1, total_steps=100\]"),
        (dict(t_end=101), r"t_end must be an int step in \[1, total_steps=100\]"),
        (dict(t_start=50, t_end=60, delta_t=20), r"t_end \(step 60\) must lie at least delta_t=20 steps after"),
        (dict(initial_sparsity=0.95), "initial_sparsity 0.95 exceeds the final sparsity 0.9"),
        (dict(initial_sparsity=-0.1), r"initial_sparsity must be None or a number in \[0, 1\), got -0.1"),
        (dict(scope="row"), r"scope must be one of \('layer', 'global'\), got 'row'"),
        (dict(distribution="erk", scope="global"), "distribution applies to scope='layer'"),
        (dict(distribution="normal"), r"distribution must be one of \('uniform', 'er', 'erk'\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            GMP(model, opt, **{**ok, **kwargs})
    sparse = nn.Sequential(nn.Linear(10, 10))
    sparsify(sparse, 0.95, layout="masked", distribution="uniform")
    with pytest.raises(ValueError, match="0.weight has 5 nonzeros and its schedule goes from 5 to 10; GMP only"):
        GMP(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), **ok)
    with pytest.raises(ValueError, match="all layers has 5 nonzeros and its schedule goes from 50 to 10"):
        GMP(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), **ok, scope="global", initial_sparsity=0.5)
    with pytest.raises(ValueError, match="the model has no sparse layer; call sparsekern.sparsify"):
        GMP(nn.Linear(3, 3), opt, **ok)


# -- data parallel: two CPU processes (gloo) ------------------------------------------------------------------
WORLD, DDP_STEPS = 2, 12


def rank_batch(step, rank):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return batch(gen)


def ddp_gmp(model, group, scope):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    return opt, GMP(model, opt, sparsity=0.8, total_steps=DDP_STEPS, delta_t=3, t_end=10, scope=scope, group=group)


def _worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, _worker_results)


def _worker_results(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for scope in SCOPES:
        model = make("masked")
        ddp = DDP(model)
        opt, gmp = ddp_gmp(ddp, None, scope)
        masks = []
        for step in range(1, DDP_STEPS + 1):
            nn.functional.cross_entropy(ddp(rank_batch(step, rank)[0]), rank_batch(step, rank)[1]).backward()
            gmp.step()
            opt.zero_grad()
            masks.append(gmp.masks())
        results[scope] = {"masks": masks, "state": copy.deepcopy(model.state_dict())}
    # diverged weights: every rank raises before the prune, nothing changes
    model = make("masked")
    ddp = DDP(model)
    opt, gmp = ddp_gmp(ddp, None, "layer")
    for step in range(1, 3):
        nn.functional.cross_entropy(ddp(rank_batch(step, rank)[0]), rank_batch(step, rank)[1]).backward()
        gmp.step()
        opt.zero_grad()
    nn.functional.cross_entropy(ddp(rank_batch(3, rank)[0]), rank_batch(3, rank)[1]).backward()
    if rank == 1:
        with torch.no_grad():
            model[3].weight.mul_(2 * torch.rand(model[3].weight.shape, generator=torch.Generator().manual_seed(1)))
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), gmp.state_dict()))
    try:
        gmp.step()
        results["diverged"] = None
    except RuntimeError as exc:
        results["diverged"] = str(exc)
    results["unchanged"] = same(before, (model.state_dict(), opt.state_dict(), gmp.state_dict()))
    try:
        sparse = make("sparse")
        GMP(DDP(sparse), torch.optim.SGD(sparse.parameters(), lr=0.1), sparsity=0.5, total_steps=10, delta_t=2)
        results["refused"] = "no error"
    except ValueError as exc:
        results["refused"] = str(exc)
    return results


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp_gmp")
    return rank_results(_worker, path, WORLD, 180)


@pytest.mark.parametrize("scope", SCOPES)
def test_ddp_masks_identical_and_equal_to_one_process(scope, ddp_runs):
    ranks = [run[scope] for run in ddp_runs]
    assert same(ranks[0], ranks[1])
    # one process, both ranks' batches as micro-batches, each loss halved as DDP averages: the same run (on one
    # thread as the ranks, since the conv's weight gradient sums in an order that depends on the thread count)
    model = make("masked")
    opt, gmp = ddp_gmp(model, None, scope)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(1, DDP_STEPS + 1):
            for rank in range(WORLD):
                x, y = rank_batch(step, rank)
                (nn.functional.cross_entropy(model(x), y) / WORLD).backward()
            gmp.step()
            opt.zero_grad()
            assert same(gmp.masks(), ranks[0]["masks"][step - 1]), step
    finally:
        torch.set_num_threads(threads)
    assert gmp.report().nnz == ({"layer": 14 + 50 + 4, "global": 69}[scope])
    for key, value in model.state_dict().items():
        assert torch.equal(value, ranks[0]["state"][key]), key


def test_ddp_diverged_weights_raise_everywhere_and_sparse_layers_are_refused(ddp_runs):
    for run in ddp_runs:
        assert run["diverged"].startswith("GMP.step: the new masks of rank 1 differ from rank 0's")
        assert run["unchanged"]
        assert run["refused"].startswith("GMP: data-parallel GMP needs masked layers: a prune shrinks each Sparse")
