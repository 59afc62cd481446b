"""FanIn (constant fan-in): its per-row selections against plain-Python references, bit for bit (inputs with many
ties), its counts, checks and violation messages, and SRigL's neuron ablation against a reference of the rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsekern.training import RigL, drop_and_grow, sparsify
from sparsekern.training.drop_grow import as_layer
from sparsekern.training.structure import parse_structure
from sparsekern.training.structure_fan_in import FanIn, row_largest


def ref_row_largest(values, eligible, counts):
    """Per row: sort the eligible columns by (-value, column) and take the first counts[r]: a Python loop."""
    out = torch.zeros(values.shape, dtype=torch.bool)
    for r in range(values.shape[0]):
        cols = [c for c in range(values.shape[1]) if eligible[r, c]]
        cols.sort(key=lambda c: (-float(values[r, c]), c))
        for c in cols[: int(counts[r])]:
            out[r, c] = True
    return out


def tied(shape, gen, levels=4, dtype=torch.float32):
    """Random values from a few levels, so most rows hold ties."""
    return torch.randint(0, levels, shape, generator=gen).to(dtype) / levels


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 33), (8, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_row_largest_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    for trial in range(4):
        values = tied(shape, gen, levels=2 + trial, dtype=dtype)
        eligible = torch.rand(shape, generator=gen) < 0.7
        counts = torch.tensor([int(torch.randint(0, int(e.sum()) + 1, (1,), generator=gen)) for e in eligible])
        got = row_largest(values, eligible, counts)
        assert torch.equal(got, ref_row_largest(values.double(), eligible, counts))
        continuous = torch.rand(shape, generator=gen).to(dtype)  # few or no ties: the partial top-k alone
        assert torch.equal(
            row_largest(continuous, eligible, counts), ref_row_largest(continuous.double(), eligible, counts)
        )
        assert torch.equal(
            row_largest(continuous, eligible, counts, smallest=True),
            ref_row_largest(-continuous.double(), eligible, counts),
        )
        same = torch.full((shape[0],), int(eligible.sum(1).min()))  # one count for every row: the fast path
        assert torch.equal(row_largest(values, eligible, same), ref_row_largest(values.double(), eligible, same))


@pytest.mark.parametrize("shape", [(5, 9), (16, 64), (3, 1)])
def test_initial_is_k_largest_per_row(shape):
    gen = torch.Generator().manual_seed(1)
    structure = FanIn()
    for k in {1, max(1, shape[1] // 3), shape[1]}:
        scores = tied(shape, gen)
        got = structure.initial(scores, shape[0] * k)
        want = ref_row_largest(scores, torch.ones(shape, dtype=torch.bool), torch.full((shape[0],), k))
        assert torch.equal(got, want)
        assert (got.sum(1) == k).all()
        assert FanIn(k).violation(got) is None and structure.violation(got, shape[0] * k) is None


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.3333, 1.0])
def test_drop_is_smallest_keys_per_row(fraction):
    gen = torch.Generator().manual_seed(2)
    n_out, n_in, k = 12, 40, 9
    mask = FanIn().initial(torch.rand(n_out, n_in, generator=gen), n_out * k)
    keys = tied((n_out, n_in), gen, levels=3) * mask  # |w|: read only at the mask
    got = FanIn(k).drop(mask, keys, fraction)
    d = math.floor(fraction * k + 0.5)
    want = ref_row_largest(-keys.double(), mask, torch.full((n_out,), d))
    assert torch.equal(got, want)
    assert not (got & ~mask).any() and (got.sum(1) == d).all()


def test_drop_counts_follow_each_rows_count():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :5], mask[1, :2] = True, True  # row 2 empty (ablated)
    keys = torch.arange(30.0).view(3, 10).flip(1)
    got = FanIn(ablation=0.5).drop(mask, keys, 0.5)
    assert got.sum(1).tolist() == [3, 1, 0]  # round half up: 2.5 -> 3, 1 -> 1
    assert got[0].nonzero().view(-1).tolist() == [2, 3, 4]  # the smallest keys of row 0


def test_grow_restores_k_by_largest_scores_outside_kept():
    gen = torch.Generator().manual_seed(3)
    n_out, n_in, k = 10, 30, 7
    for _ in range(5):
        mask = FanIn().initial(torch.rand(n_out, n_in, generator=gen), n_out * k)
        drop = FanIn(k).drop(mask, torch.rand(n_out, n_in, generator=gen), 0.4)
        kept = mask & ~drop
        scores = tied((n_out, n_in), gen, levels=3)
        got = FanIn(k).grow(kept, scores)
        want = ref_row_largest(scores.double(), ~kept, k - kept.sum(1))
        assert torch.equal(got, want)
        assert not (got & kept).any() and ((got | kept).sum(1) == k).all()
        # a dropped connection may be grown again (it is among the positions not kept)
        explicit = FanIn().grow(kept, scores, counts=k - kept.sum(1))
        assert torch.equal(explicit, got)


def test_count_rounds_and_clamps():
    structure = FanIn()
    assert structure.count((10, 100), 254) == 250  # 25.4 -> 25 per row
    assert structure.count((10, 100), 255) == 260  # 25.5 -> 26 (half up)
    assert structure.count((10, 100), 0) == 10  # at least one per row
    assert structure.count((10, 100), 1000) == 1000
    assert structure.count((4, 3), 12) == 12


def test_violation_names_the_row():
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True
    assert FanIn(2).violation(mask) is None
    assert FanIn().violation(mask, 8) is None
    mask[2, 5] = True
    assert FanIn(2).violation(mask) == "row 2 has 3 nonzeros, not the fan-in k=2"
    assert "row 2 has 3" in FanIn().violation(mask)
    assert FanIn().violation(mask[:, :5], 9) == "the mask has 8 nonzeros, not 9"
    mask[2, 5] = False
    mask[1] = False
    assert "row 1 has 0 nonzeros" in FanIn(2).violation(mask)
    assert FanIn(2, ablation=0.5).violation(mask) is None  # an ablated row
    assert FanIn(2, ablation=0.5).violation(mask, 8) == "the mask has 6 nonzeros, not 8"
    assert FanIn(2).violation(torch.zeros(3, 3, dtype=torch.bool)) == "every row is empty"


def test_errors():
    with pytest.raises(ValueError, match="ablation"):
        FanIn(ablation=0.0)
    with pytest.raises(ValueError, match="ablation"):
        FanIn(ablation=1.5)
    with pytest.raises(ValueError, match="k must be"):
        FanIn(0)
    with pytest.raises(ValueError, match="budget"):
        FanIn(2, budget=0)
    with pytest.raises(ValueError, match="unbound"):
        FanIn().grow(torch.zeros(2, 3, dtype=torch.bool), torch.rand(2, 3))
    with pytest.raises(ValueError, match="row 1 keeps 3 > k=2"):
        FanIn(2).grow(torch.tensor([[True, False, False], [True, True, True]]), torch.rand(2, 3))
    with pytest.raises(ValueError, match="inf or NaN"):
        FanIn(1).grow(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([[0.0, math.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"count must be n_out \* k"):
        FanIn().initial(torch.rand(3, 4), 7)
    with pytest.raises(ValueError, match="fraction"):
        FanIn(1).drop(torch.ones(1, 2, dtype=torch.bool), torch.rand(1, 2), 1.5)
    with pytest.raises(ValueError, match="layer 'fc'"):
        FanIn().check_shape("sparsify", "fc", (0, 4))
    with pytest.raises(ValueError, match="transposable"):
        parse_structure("sparsify", "fan_in", transposable=True)
    assert parse_structure("f", "fan_in") == FanIn()
    assert FanIn().bind((4, 10), 12) == FanIn(3, budget=12)
    assert FanIn.from_config(FanIn(3, ablation=0.25, budget=40).config()) == FanIn(3, ablation=0.25, budget=40)


def reference_ablation(mask, weight, grad, n, gamma, k, budget, n_in):
    """SRigL's rule as documented in structure_fan_in.py, by brute force over the dense tensors: salient = the layer's
    count - n largest |w| among active (ties lower flat index) or its n largest |grad| over all positions (ties lower
    flat index); rows with fewer than gamma * k salient are ablated, at least ceil(budget / n_in) rows stay."""
    flat_mask, w, gr = mask.reshape(-1), weight.reshape(-1).abs().double(), grad.reshape(-1).abs().double()
    active = flat_mask.nonzero().view(-1).tolist()
    by_w = sorted(active, key=lambda i: (w[i], i))  # ascending |w|, lower index first
    salient = set(by_w[n:])
    by_g = sorted(range(flat_mask.numel()), key=lambda i: (-gr[i], i))
    salient |= set(by_g[:n])
    rows = [0] * mask.shape[0]
    for i in salient:
        rows[i // n_in] += 1
    live = [r for r in range(mask.shape[0]) if rows[r] >= gamma * k]
    least = max(1, -(-budget // n_in))
    if len(live) < least:
        live = sorted(range(mask.shape[0]), key=lambda r: (-rows[r], r))[:least]
    return sorted(live), min(n_in, budget // len(live))


@pytest.mark.parametrize("gamma", [0.3, 0.8, 1.0])
def test_ablation_matches_the_rule_and_keeps_the_budget(gamma):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    sparsify(model, 0.8, distribution="uniform", layout="masked", structure=FanIn(ablation=gamma),
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    layer = as_layer(model[0])
    assert layer.structure == FanIn(5, ablation=gamma, budget=80)  # round(0.2 * 384 / 16) = 5 per row
    assert as_layer(model[2]).structure.ablation is None  # the output layer is never ablated
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randn(32, 24, generator=gen)
        model(x).square().mean().backward()
        structure, mask = layer.structure, model[0].weight_mask.clone()
        weight, grad = model[0].weight.detach().clone(), model[0].weight.grad.clone()
        n = int(0.3 * layer.count())
        live, k_new = reference_ablation(mask, weight, grad, n, gamma, structure.k, 80, 24)
        plan = drop_and_grow(model[0], n)
        rows = model[0].weight_mask.sum(1)
        assert rows.nonzero().view(-1).tolist() == live
        assert set(rows.tolist()) <= {0, k_new} and int(rows.sum()) <= 80
        assert plan.ablated == 16 - len(live) and layer.structure == FanIn(k_new, ablation=gamma, budget=80)
        assert layer.structure.violation(model[0].weight_mask) is None
        # the live rows were grown back to k' by their largest |grad| outside the kept connections
        dropped = torch.zeros(16 * 24, dtype=torch.bool)
        dropped[plan.dropped] = True
        grown = torch.zeros(16 * 24, dtype=torch.bool)
        grown[plan.grown] = True
        kept, grown = mask & ~dropped.view(16, 24), grown.view(16, 24)
        for r in range(16):
            if r not in live:
                assert not grown[r].any() and not model[0].weight_mask[r].any()
                continue
            outside = (~kept[r]).nonzero().view(-1).tolist()
            order = sorted(outside, key=lambda c: (-float(grad[r, c].abs()), c))
            assert grown[r].nonzero().view(-1).tolist() == sorted(order[: k_new - int(kept[r].sum())])
        model.zero_grad()
    if gamma == 1.0:
        assert layer.structure.k > 5  # rows were ablated and their budget moved to the live ones


def test_ablation_sparse_linear_scores_come_from_outer_topk():
    """On a SparseLinear the gradient saliency is outer_topk's top-n of |g.T x| and the grow its per-row rows: the
    same rows stay live as on the masked twin whose dense gradient is g.T x (exact scores, integer inputs: every
    sum is exact, so both layouts see the same numbers)."""
    torch.manual_seed(0)
    dense = nn.Linear(20, 12)
    with torch.no_grad():
        dense.weight.copy_(torch.randint(-8, 9, (12, 20)).float())
    twins = [nn.Sequential(nn.Linear(20, 12)) for _ in range(2)]
    for twin, layout in zip(twins, ("sparse", "masked"), strict=True):
        twin[0].load_state_dict(dense.state_dict())
        sparsify(twin, 0.75, distribution="uniform", layout=layout, structure=FanIn(ablation=0.9),
                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    # (the only layer is the last one: bind ablation explicitly)
    for twin in twins:
        as_layer(twin[0]).structure = FanIn(5, ablation=0.9, budget=60)
    x = torch.randint(-3, 4, (6, 20)).float()
    g = torch.randint(-3, 4, (6, 12)).float()
    twins[1][0].weight.grad = g.T @ x
    plans = [
        drop_and_grow(twins[0][0], 18, x=x, g=g, precision="exact"),
        drop_and_grow(twins[1][0], 18),
    ]
    assert torch.equal(plans[0].active, plans[1].active)
    assert plans[0].ablated == plans[1].ablated


def test_rigl_reports_ablated_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsify(model, 0.9, structure=FanIn(ablation=1.0), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, total_steps=4, delta_t=1, t_end=4)
    model(torch.randn(8, 16)).square().mean().backward()
    rigl.step()
    report = rigl.report()
    first = report.layers[0]
    assert first.structure == "fan_in" and first.ablated is not None and first.ablated > 0
    assert report.layers[1].ablated is None
    assert f"({first.ablated}/32 rows ablated)" in str(report)
    assert report.to_dict()["layers"][0]["ablated"] == first.ablated


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.99, 1.0])
def test_drop_compact_equals_drop(fraction):
    gen = torch.Generator().manual_seed(6)
    n_out, n_in, k = 9, 25, 6
    mask = FanIn().initial(torch.rand(n_out, n_in, generator=gen), n_out * k)
    keys = tied((n_out, n_in), gen, levels=3) * mask
    compact = FanIn(k).drop_compact(keys[mask].view(n_out, k), fraction)
    dense = torch.zeros(n_out, n_in, dtype=torch.bool)
    dense[mask] = compact.reshape(-1)
    assert torch.equal(dense, FanIn(k).drop(mask, keys, fraction))
