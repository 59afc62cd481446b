"""The one path by which a SparseLinear's topology changes (``TopologyUpdate.merge`` + ``_apply_topology``): it
gives exactly what ``update_topology`` gave before it became a wrapper around it (replayed against that code,
written out here), what RigL's plan commits equals ``update_topology`` on the plan's drop and grow (values,
gradient, index and optimizer state, bit for bit), the plain-CSR exclusion, and RigL's ``precision`` option."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsekern import outer_topk
from sparsekern._csr import CSRIndex, csr_from_flat, merge_sorted
from sparsekern.nn import SparseLinear, TopologyUpdate
from sparsekern.training import SET, RigL, drop_and_grow, sparsify
from sparsekern.training import drop_grow as drop_grow_module
from sparsekern.training._optim_state import carry_state


def previous_update_topology(old_flat, drop, grow):
    """update_topology's arithmetic before the setter: (new flat, old_to_new, grown slots) by a concatenation,
    a sort and binary searches."""
    drop, grow = drop.sort().values, grow.sort().values
    keep = ~torch.isin(old_flat, drop) | torch.isin(old_flat, grow)
    added = grow[~torch.isin(grow, old_flat)]
    new_flat = torch.cat([old_flat[keep], added]).sort().values
    old_to_new = torch.full_like(old_flat, -1)
    old_to_new[keep] = torch.searchsorted(new_flat, old_flat[keep])
    return new_flat, old_to_new, torch.searchsorted(new_flat, added)


def random_drop_grow(layer: SparseLinear, n_drop: int, n_regrow: int, n_new: int, gen: torch.Generator):
    flat = layer.flat_indices()
    drop = flat[torch.randperm(flat.numel(), generator=gen)[:n_drop]]
    free = torch.ones(layer.out_features * layer.in_features, dtype=torch.bool)
    free[flat] = False
    free = free.nonzero().flatten()
    grow = torch.cat([drop[:n_regrow], free[torch.randperm(free.numel(), generator=gen)[:n_new]]])
    return drop[torch.randperm(drop.numel(), generator=gen)], grow[torch.randperm(grow.numel(), generator=gen)]


def trained_layer(n_in: int, n_out: int, sparsity: float, seed: int):
    """A SparseLinear with a gradient and Adam state (so every per-nonzero tensor has to follow)."""
    torch.manual_seed(seed)
    layer = SparseLinear(n_in, n_out, sparsity=sparsity)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(2):
        layer(torch.randn(5, n_in)).square().sum().backward()
        opt.step()
    return layer, opt


def clone_with_optimizer(layer, opt):
    other = copy.deepcopy(layer)
    other.values.grad = layer.values.grad.clone()
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    other_opt.load_state_dict(opt.state_dict())
    return other, other_opt


def assert_same_layer(a: SparseLinear, b: SparseLinear, opt_a, opt_b) -> None:
    for name in ("row_ptr", "col_idx", "csc_ptr", "csc_row", "csc_perm"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.values, b.values) and torch.equal(a.values.grad, b.values.grad)
    assert torch.equal(a.bias, b.bias)
    state_a, state_b = opt_a.state[a.values], opt_b.state[b.values]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_merge_sorted_places_both_inputs():
    gen = torch.Generator().manual_seed(0)
    union = torch.randperm(1000, generator=gen)[:300].sort().values
    pick = torch.rand(300, generator=gen) < 0.3
    a, b = union[~pick], union[pick]
    merged, at_a, at_b = merge_sorted(a, b)
    assert torch.equal(merged, union)
    assert torch.equal(merged[at_a], a) and torch.equal(merged[at_b], b)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(merge_sorted(a, empty)[0], a) and torch.equal(merge_sorted(empty, b)[0], b)


@pytest.mark.parametrize("shape", [(13, 7), (64, 33)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n_drop, n_regrow, n_new", [(6, 0, 6), (6, 3, 3), (6, 6, 0), (0, 0, 0), (5, 2, 7)])
def test_update_topology_replays_the_previous_arithmetic(shape, n_drop, n_regrow, n_new):
    n_in, n_out = shape
    layer, _ = trained_layer(n_in, n_out, 0.6, seed=n_drop + n_new)
    old_flat, old_values, old_grad = layer.flat_indices(), layer.values.detach().clone(), layer.values.grad.clone()
    drop, grow = random_drop_grow(layer, n_drop, n_regrow, n_new, torch.Generator().manual_seed(n_regrow))
    new_flat, old_to_new, grown = previous_update_topology(old_flat, drop, grow)
    update = layer.update_topology(drop=drop, grow=grow.to(torch.int32))
    assert torch.equal(update.old_to_new, old_to_new) and torch.equal(update.grown, grown)
    assert update.nnz == layer.nnz == new_flat.numel()
    assert torch.equal(layer.flat_indices(), new_flat)
    expected = CSRIndex.from_csr(*csr_from_flat(new_flat, n_out, n_in), n_in)
    for name in ("row_ptr", "col_idx", "csc_ptr", "csc_row", "csc_perm"):
        assert torch.equal(getattr(layer, name), getattr(expected, name)), name
    kept = old_to_new >= 0
    for new, old in ((layer.values.detach(), old_values), (layer.values.grad, old_grad)):
        assert torch.equal(new[old_to_new[kept]], old[kept]) and not bool(new[grown].any())


def test_setter_equals_update_topology_with_optimizer_state():
    layer, opt = trained_layer(19, 11, 0.7, seed=3)
    other, other_opt = clone_with_optimizer(layer, opt)
    drop, grow = random_drop_grow(layer, 12, 4, 8, torch.Generator().manual_seed(1))
    update = layer.update_topology(drop=drop, grow=grow)
    carry_state(opt, layer.values, update.apply)

    old_flat = other.flat_indices()
    keep = ~torch.isin(old_flat, drop) | torch.isin(old_flat, grow)
    new_flat, direct = TopologyUpdate.merge(old_flat, keep, grow[~torch.isin(grow, old_flat)].sort().values)
    values = other.values
    other._apply_topology(new_flat, direct)
    carry_state(other_opt, other.values, direct.apply)
    assert other.values is values  # optimizers keep tracking the same Parameter
    assert torch.equal(direct.old_to_new, update.old_to_new) and torch.equal(direct.grown, update.grown)
    assert_same_layer(layer, other, opt, other_opt)


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_drop_and_grow_commit_equals_update_topology(grow):
    """What RigL/SET commit through the setter is what update_topology does with the plan's drop and grow."""
    layer, opt = trained_layer(9, 7, 4 / 9, seed=5)  # 35 of 63 positions: the random grow regrows some drops
    other, other_opt = clone_with_optimizer(layer, opt)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(6, 9, generator=gen), torch.randn(6, 7, generator=gen)
    kwargs = dict(x=x, g=g) if grow == "gradient" else dict(generator=gen)
    plan = drop_and_grow(layer, 20, grow=grow, optimizer=opt, **kwargs)
    if grow == "random":
        assert bool(torch.isin(plan.grown, plan.dropped).any())  # the regrown case is exercised
    update = other.update_topology(drop=plan.dropped, grow=plan.grown)
    carry_state(other_opt, other.values, update.apply)
    assert torch.equal(plan.update.old_to_new, update.old_to_new) and torch.equal(plan.update.grown, update.grown)
    assert torch.equal(plan.active, other.flat_indices())
    assert_same_layer(layer, other, opt, other_opt)


def test_exclusion_pattern_is_a_plain_csr():
    gen = torch.Generator().manual_seed(4)
    n_out, n_in = 23, 17
    flat = torch.randperm(n_out * n_in, generator=gen)[:150].sort().values
    pattern = CSRIndex.pattern(flat, n_out, n_in)
    row_ptr, col_idx = csr_from_flat(flat, n_out, n_in)
    assert torch.equal(pattern.row_ptr, row_ptr) and torch.equal(pattern.col_idx, col_idx)
    assert pattern.nnz == 150 and pattern.csc_ptr.numel() == 0
    mask = torch.zeros(n_out * n_in, dtype=torch.bool)
    mask[flat] = True
    x, g = torch.randn(8, n_in, generator=gen), torch.randn(8, n_out, generator=gen)
    index, score = outer_topk(x, g, 60, exclude=pattern)
    ref_index, ref_score = outer_topk(x, g, 60, exclude=mask.view(n_out, n_in))
    assert torch.equal(index, ref_index) and torch.equal(score, ref_score)
    assert not bool(mask[index].any())


def small_model(seed: int) -> nn.Sequential:
    """float32 with small-integer weights and data: every score is exact in any summation order."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(9, 12), nn.ReLU(), nn.Linear(12, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=gen) / 4)
    sparsify(model, 0.6, generator=torch.Generator().manual_seed(seed))
    return model


def train_rigl(precision: str | None, steps: int = 6):
    model = small_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5)
    kwargs = {} if precision is None else {"precision": precision}
    rigl = RigL(model, opt, total_steps=steps, delta_t=2, t_end=steps, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(-3, 4, (8, 9), generator=gen).float()
        (model(x) * torch.randint(-2, 3, (8, 5), generator=gen).float()).sum().backward()
        rigl.step()
        opt.zero_grad()
    return model, rigl


def test_rigl_precision_reaches_outer_topk_and_is_saved(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["precision"])
        return outer_topk(*args, **kwargs)

    monkeypatch.setattr(drop_grow_module, "outer_topk", recording)
    runs = {}
    for precision in (None, "fast", "exact"):
        seen.clear()
        model, rigl = train_rigl(precision)
        assert seen == [precision or "fast"] * 4  # two updates, two SparseLinear layers each
        assert rigl.state_dict()["config"]["precision"] == (precision or "fast")
        runs[precision] = model.state_dict()
    # small integers: "fast" and "exact" scores are the same numbers, so the runs are identical
    assert all(torch.equal(runs["fast"][k], runs["exact"][k]) for k in runs["fast"])
    assert all(torch.equal(runs[None][k], runs["fast"][k]) for k in runs["fast"])

    model, rigl = train_rigl("exact")
    other = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=6, delta_t=2, t_end=6)
    with pytest.raises(ValueError, match=r"configuration .*'precision': 'exact'.* differs"):
        other.load_state_dict(rigl.state_dict())


def test_drop_and_grow_precision_reaches_outer_topk(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["precision"])
        return outer_topk(*args, **kwargs)

    monkeypatch.setattr(drop_grow_module, "outer_topk", recording)
    layer, _ = trained_layer(9, 7, 0.5, seed=0)
    x, g = torch.randn(4, 9), torch.randn(4, 7)
    drop_and_grow(layer, 3, x=x, g=g)
    drop_and_grow(layer, 3, x=x, g=g, precision="exact")
    assert seen == ["fast", "exact"]


@pytest.mark.parametrize("precision", ["tf32", None, 1])
def test_bad_precision_is_refused_before_anything_changes(precision):
    model = small_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=rf"RigL: precision must be one of 'fast', 'exact' .*got {precision!r}"):
        RigL(model, opt, total_steps=10, precision=precision)
    layer = model[0]
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=rf"drop_and_grow: precision must be one of 'fast', 'exact' .*{precision!r}"):
        drop_and_grow(layer, 2, x=torch.ones(3, 9), g=torch.ones(3, 12), precision=precision)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with pytest.raises(TypeError, match="unexpected keyword argument 'precision'"):
        SET(model, opt, total_steps=10, precision="exact")  # a random grow has no scores


def test_rigl_state_saved_before_precision_resumes_as_exact():
    """A RigL state saved before ``precision`` existed (no such config key) grew by exact scores: it loads into
    RigL(precision="exact") and is refused, naming the configuration, by the default "fast"."""
    model, rigl = train_rigl("exact")
    state = rigl.state_dict()
    del state["config"]["precision"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exact = RigL(model, optimizer, total_steps=6, delta_t=2, t_end=6, precision="exact")  # as train_rigl's
    exact.load_state_dict(state)
    assert exact.state_dict()["config"]["precision"] == "exact"
    fast = RigL(model, optimizer, total_steps=6, delta_t=2, t_end=6)
    with pytest.raises(ValueError, match="configuration .*'precision': 'exact'.* differs"):
        fast.load_state_dict(state)


@pytest.mark.parametrize("density", [0.3, 0.95])  # the sparse kernels and the dense path
@pytest.mark.parametrize("change", ["drop", "grow", "load"])
def test_a_graph_held_across_a_count_change_does_not_break_the_next_backward(density, change):
    """`loss = f(x); loss.backward(); step()` keeps last step's graph (and autograd's gradient accumulator of
    `values`, with its shape) alive into the next forward: after GMP/SNFS/IMP change the nonzero count, the next
    backward must still check against the new count and give the gradient at the new nonzeros."""
    gen = torch.Generator().manual_seed(7)
    layer = SparseLinear(24, 16, mask=torch.rand(16, 24, generator=gen) < density, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64, generator=gen)
    held = layer(x).square().sum()
    held.backward()
    active = layer.flat_indices()
    if change == "drop":
        layer.update_topology(drop=active[::3], grow=torch.empty(0, dtype=torch.int64))
    elif change == "grow":
        free = torch.ones(24 * 16, dtype=torch.bool)
        free[active] = False
        layer.update_topology(drop=torch.empty(0, dtype=torch.int64), grow=free.nonzero().reshape(-1)[:7])
    else:
        other = SparseLinear(24, 16, mask=torch.rand(16, 24, generator=gen) < 0.5, dtype=torch.float64)
        layer.load_state_dict(other.state_dict())
    assert layer.values.numel() != active.numel()
    layer.values.grad = None
    layer(x).square().sum().backward()
    dense = layer.mask.to(torch.float64) * layer.weight.detach()
    dense.requires_grad_()
    (x @ dense.T + layer.bias.detach()).square().sum().backward()
    assert torch.allclose(layer.values.grad, dense.grad[layer.mask], rtol=1e-12, atol=1e-12)
    assert held.requires_grad  # the old graph was alive throughout
