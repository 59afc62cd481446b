"""RigL and SET updates against a plain-PyTorch reference (dense gradient, straightforward selection), on both
layouts, with gradient accumulation; optimizer state; failed updates; bad configurations.

The tiny models hold dyadic values (small integers / 4, 8) and the data small integers, so every gradient and
score is exact whatever the summation order: the sparse kernels, outer_topk and the dense reference must agree
bit for bit, ties included (many |w| and score ties are built in).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear
from sparsekern.training import SET, RigL, Static, UpdateSchedule, drop_and_grow, sparsify
from sparsekern.training.drop_grow import grow_random

SIZES = (9, 12, 7, 5)


def tiny_model(seed: int, sizes=SIZES, dtype=torch.float64) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randint(-4, 5, (b, a), generator=gen) / 4)
            lin.bias.copy_(torch.randint(-2, 3, (b,), generator=gen) / 4)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batch(step: int, seed: int, n: int = 12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    x = torch.randint(-3, 4, (n, SIZES[0]), generator=gen).to(dtype)
    c = torch.randint(-2, 3, (n, SIZES[-1]), generator=gen).to(dtype)
    return x, c


def dense_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(dense weight, mask, bias) of every layer, whatever the layout."""
    out = []
    for m in model:
        if isinstance(m, SparseLinear):
            out.append((m.dense_weight().detach().clone(), m.mask.clone(), m.bias.detach().clone()))
        elif isinstance(m, nn.Linear):
            out.append((m.weight.detach().clone(), m.weight_mask.clone(), m.bias.detach().clone()))
    return out


def reference_grads(state, micro_batches) -> list[torch.Tensor]:
    """dL/dW of the dense masked network with plain autograd, summed over the micro-batches."""
    weights = [w.clone().requires_grad_(True) for w, _, _ in state]
    for x, c in micro_batches:
        h = x
        for i, (w, (_, _, b)) in enumerate(zip(weights, state, strict=True)):
            h = nn.functional.linear(h, w, b)
            if i < len(weights) - 1:
                h = torch.relu(h)
        (h * c).sum().backward()
    return [w.grad for w in weights]


def replay_random_grow(kept: set[int], numel: int, n: int, gen: torch.Generator) -> list[int]:
    """grow_random's documented rule, written out naively."""
    candidates = numel - len(kept)
    taken, seen, left = [], set(kept), n
    while left:
        m = math.ceil(1.25 * left * numel / candidates) + 16
        for d in torch.randint(numel, (m,), generator=gen).tolist():
            if left and d not in seen:
                taken.append(d)
                seen.add(d)
                left -= 1
    return taken


def reference_update(weight, mask, grad, n, grow, gen):
    """Straightforward RigL/SET: returns (new dense weight, new mask)."""
    numel = weight.numel()
    w, m, g = weight.flatten().tolist(), mask.flatten().tolist(), grad.flatten().abs().tolist()
    active = [i for i in range(numel) if m[i]]
    order = sorted(active, key=lambda i: (abs(w[i]), i))
    kept = set(order[n:])
    if grow == "gradient":
        grown = sorted((i for i in range(numel) if i not in kept), key=lambda i: (-g[i], i))[:n]
    else:
        grown = replay_random_grow(kept, numel, n, gen)
    new_mask = torch.zeros(numel, dtype=torch.bool)
    new_mask[sorted(kept | set(grown))] = True
    new_w = torch.where(new_mask & mask.flatten(), weight.flatten(), torch.zeros((), dtype=weight.dtype))
    return new_w.view_as(weight), new_mask.view_as(mask)


def expected_n(step: int, t_end: int, n_active: int, alpha: float = 0.3) -> int:
    return math.floor(alpha / 2 * (1 + math.cos(math.pi * step / t_end)) * n_active)


def state_by_flat(model, opt) -> list[dict[str, dict[int, float]]]:
    """Optimizer state of every sparse layer as {key: {flat index: value}} over its active connections."""
    out = []
    for m in model:
        if isinstance(m, SparseLinear):
            flats, param = m.flat_indices().tolist(), m.values
            values = {k: v.tolist() for k, v in opt.state[param].items() if v.dim() > 0}
        elif isinstance(m, nn.Linear):
            flats = m.weight_mask.flatten().nonzero().flatten().tolist()
            values = {k: v.flatten()[flats].tolist() for k, v in opt.state[m.weight].items() if v.dim() > 0}
        else:
            continue
        out.append({k: dict(zip(flats, v, strict=True)) for k, v in values.items()})
    return out


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.125, momentum=0.5),
    "adam": lambda p: torch.optim.Adam(p, lr=0.125),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.125, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.125, momentum=0.5),  # any parameter-shaped state
}


@pytest.mark.parametrize("seed", range(len(OPTIMIZERS)))  # seed i trains with the i-th optimizer
@pytest.mark.parametrize("micro", [1, 3], ids=["one_batch", "accum3"])
@pytest.mark.parametrize("layout", ["sparse", "masked"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_update_matches_reference(method, layout, micro, seed):
    optimizer_name = list(OPTIMIZERS)[seed]
    model = tiny_model(seed)
    sparsify(model, 0.6, layout=layout, generator=torch.Generator().manual_seed(seed))
    opt = OPTIMIZERS[optimizer_name](model.parameters())
    total, t_end = 12, 12
    if method == "rigl":
        sparsifier = RigL(model, opt, total_steps=total, delta_t=2, t_end=t_end)
    else:
        sparsifier = SET(model, opt, total_steps=total, delta_t=2, t_end=t_end, seed=seed + 7)
    ref_gen = torch.Generator().manual_seed(seed + 7)
    nnz0 = [mask.sum().item() for _, mask, _ in dense_state(model)]
    updates = 0
    for step in range(1, 9):
        x, c = batch(step, seed)
        chunks = list(zip(x.chunk(micro), c.chunk(micro), strict=True))
        for xm, cm in chunks:
            (model(xm) * cm).sum().backward()
        before = dense_state(model)
        state_before = state_by_flat(model, opt)
        updated = sparsifier.step()
        assert updated == (step % 2 == 0)
        after = dense_state(model)
        assert [mask.sum().item() for _, mask, _ in after] == nnz0  # density exactly preserved
        if updated:
            updates += 1
            grads = reference_grads(before, chunks)
            for (w, mask, b), (w2, mask2, b2), g in zip(before, after, grads, strict=True):
                if bool(mask.all()):  # a dense layer is left alone (its drop and grow would cancel)
                    assert torch.equal(mask2, mask) and torch.equal(w2, w)
                    continue
                n = expected_n(step, t_end, int(mask.sum()))
                assert n > 0
                ref_w, ref_mask = reference_update(w, mask, g, n, "gradient" if method == "rigl" else "random", ref_gen)
                assert torch.equal(mask2, ref_mask)
                assert torch.equal(w2, ref_w)
                assert torch.equal(b2, b)  # the optimizer step is skipped on update steps
            # optimizer state: kept connections keep theirs, grown ones start at zero
            for layer_before, layer_after, (_, mask, _) in zip(state_before, state_by_flat(model, opt), before,
                                                                strict=True):  # fmt: skip
                old_active = set(mask.flatten().nonzero().flatten().tolist())
                for key, values in layer_after.items():
                    for flat, value in values.items():
                        assert value == (layer_before[key][flat] if flat in old_active else 0.0), (key, flat)
        opt.zero_grad()
    assert updates == 4
    assert {name: m.shape for name, m in sparsifier.masks().items()} == {
        f"{i}.weight": (b, a) for i, (a, b) in zip((0, 2, 4), zip(SIZES[:-1], SIZES[1:], strict=True), strict=True)
    }


def test_layouts_agree_over_training():
    """The same RigL run on SparseLinear layers and on masked dense weights gives identical masks, and weights
    equal up to float64 summation order (the sparse kernels and the dense GEMM add in different orders)."""
    runs = {}
    for layout in ("sparse", "masked"):
        model = tiny_model(5)
        sparsify(model, 0.7, layout=layout, generator=torch.Generator().manual_seed(5))
        opt = torch.optim.SGD(model.parameters(), lr=2**-8, momentum=0.5)
        rigl = RigL(model, opt, total_steps=10, delta_t=3)
        for step in range(1, 11):
            x, c = batch(step, 5)
            (model(x) * c).sum().backward()
            rigl.step()
            opt.zero_grad()
        runs[layout] = dense_state(model)
    for (w1, m1, b1), (w2, m2, b2) in zip(runs["sparse"], runs["masked"], strict=True):
        assert torch.equal(m1, m2)
        torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b1, b2, rtol=1e-12, atol=1e-12)


def test_keep_optimizer_step():
    model = tiny_model(3)
    sparsify(model, 0.5, layout="sparse", generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.125)
    rigl = RigL(model, opt, total_steps=4, delta_t=1, t_end=4, keep_optimizer_step=True)
    x, c = batch(1, 3)
    (model(x) * c).sum().backward()
    bias_before = model[0].bias.detach().clone()
    assert rigl.step()
    assert not torch.equal(model[0].bias, bias_before)  # the optimizer stepped on the update step


def test_schedule_counts_optimizer_steps_under_accumulation():
    """Updates happen at optimizer steps delta_t, 2 delta_t, ... < t_end, however many micro-batches each has."""
    model = tiny_model(4)
    sparsify(model, 0.5, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(model.parameters(), lr=2**-10)
    rigl = RigL(model, opt, total_steps=40, delta_t=5, t_end=0.75)
    updated = []
    for step in range(1, 41):
        x, c = batch(step, 4)
        for xm, cm in zip(x.chunk(4), c.chunk(4), strict=True):
            (model(xm) * cm).sum().backward()
        if rigl.step():
            updated.append(step)
        opt.zero_grad()
    assert updated == [5, 10, 15, 20, 25]
    assert rigl.steps == 40


def test_schedule_formula():
    s = UpdateSchedule(total_steps=1000)
    assert s.t_end_step == 750
    assert [t for t in range(1, 1001) if s.is_update(t)] == list(range(100, 750, 100))
    for t in (100, 300, 700, 750, 900):
        expected = 0.3 / 2 * (1 + math.cos(math.pi * min(t, 750) / 750))
        assert s.drop_fraction(t) == pytest.approx(expected, abs=0)
        assert s.n_drop(t, 12345) == math.floor(expected * 12345)
    assert UpdateSchedule(total_steps=50, t_end=20).t_end_step == 20


def test_drop_and_grow_direct_compressed_and_masked():
    """The fused step on its own: a SparseLinear with micro-batch lists, and a masked Conv2d (dense gradient)."""
    gen = torch.Generator().manual_seed(0)
    layer = SparseLinear.from_dense(nn.Linear(10, 8, dtype=torch.float64), sparsity=0.5)
    with torch.no_grad():
        layer.values.copy_(torch.randint(-4, 5, layer.values.shape, generator=gen) / 4)
    xs = [torch.randint(-3, 4, (5, 10), generator=gen).double() for _ in range(2)]
    gs = [torch.randint(-2, 3, (5, 8), generator=gen).double() for _ in range(2)]
    weight, mask = layer.dense_weight().detach(), layer.mask
    grad = sum(g.T @ x for x, g in zip(xs, gs, strict=True))
    plan = drop_and_grow(layer, 7, x=xs, g=gs)
    ref_w, ref_mask = reference_update(weight, mask, grad, 7, "gradient", None)
    assert plan.n == 7 and torch.equal(layer.mask, ref_mask) and torch.equal(layer.dense_weight(), ref_w)

    conv = nn.Conv2d(3, 4, 3)
    sparsify(nn.Sequential(conv), 0.7, layout="masked", generator=gen)
    conv(torch.randn(2, 3, 6, 6)).square().sum().backward()
    weight, mask, grad = conv.weight.detach().clone(), conv.weight_mask.clone(), conv.weight.grad.clone()
    drop_and_grow(conv, 9)
    ref_w, ref_mask = reference_update(weight, mask, grad, 9, "gradient", None)
    assert torch.equal(conv.weight_mask, ref_mask) and torch.equal(conv.weight.detach(), ref_w)


def test_grow_random_is_uniform_and_avoids_kept():
    kept = torch.arange(0, 100, 2)
    counts = torch.zeros(100)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        grown = grow_random(kept, 100, 10, gen)
        assert grown.unique().numel() == 10 and not bool(torch.isin(grown, kept).any())
        counts[grown] += 1
    odd = counts[1::2]
    assert counts[0::2].sum() == 0
    # 4000 draws over 50 positions: 80 expected each; a 5-sigma band
    assert float(odd.min()) > 80 - 5 * math.sqrt(80) and float(odd.max()) < 80 + 5 * math.sqrt(80)


def snapshot(model, opt):
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def assert_same_snapshot(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for key, value in oa["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][k][key]))


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_failed_update_changes_nothing(layout):
    model = tiny_model(6)
    sparsify(model, 0.5, layout=layout, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(model.parameters(), lr=0.125)
    rigl = RigL(model, opt, total_steps=10, delta_t=2)
    for step in (1, 2):
        x, c = batch(step, 6)
        (model(x) * c).sum().backward()
        if step == 2:
            # the last layer's gradient turns non-finite: its plan fails after the first layers' plans succeeded
            if layout == "masked":
                model[4].weight.grad[0, 0] = float("nan")
            else:
                rigl._records["4.weight"][0][1][0, 0] = float("nan")
            before = snapshot(model, opt)
            masks = rigl.masks()
            with pytest.raises(ValueError, match="inf or NaN|finite"):
                rigl.step()
            assert_same_snapshot(before, snapshot(model, opt))
            assert all(torch.equal(masks[k], v) for k, v in rigl.masks().items())
            assert rigl.steps == 1
        else:
            rigl.step()
        opt.zero_grad()


class _FactoredState(torch.optim.Optimizer):
    """An optimizer whose state is not shaped like its parameter (a row-sum), which cannot follow updates."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["row"] = p.grad.reshape(-1)[:1].clone().repeat(2)
                p.add_(p.grad, alpha=-group["lr"])


def test_optimizer_errors():
    model = tiny_model(0)
    sparsify(model, 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="LBFGS keeps state that is not element-wise"):
        RigL(model, torch.optim.LBFGS(model.parameters()), total_steps=10)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RigL(model, "sgd", total_steps=10)
    with pytest.raises(ValueError, match="does not hold a sparse parameter"):
        RigL(model, torch.optim.SGD([model[0].bias], lr=0.1), total_steps=10)
    opt = _FactoredState(model.parameters())
    rigl = RigL(model, opt, total_steps=10, delta_t=2)
    x, c = batch(1, 0)
    (model(x) * c).sum().backward()
    rigl.step()
    opt.zero_grad()
    (model(x) * c).sum().backward()
    masks = rigl.masks()
    with pytest.raises(TypeError, match=r"state 'row' has shape \(2,\), expected the parameter's shape"):
        rigl.step()
    assert all(torch.equal(masks[k], v) for k, v in rigl.masks().items())


def test_bad_configurations():
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no sparse layer; call sparsekern.sparsify"):
        RigL(model, opt, total_steps=10)
    sparsify(model, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        RigL(model, opt, total_steps=0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\], got 1.5"):
        RigL(model, opt, total_steps=10, alpha=1.5)
    with pytest.raises(ValueError, match=r"t_end as a fraction must lie in \(0, 1\], got 1.5"):
        RigL(model, opt, total_steps=10, t_end=1.5)
    with pytest.raises(ValueError, match=r"t_end as a step must lie in \[1, total_steps=10\], got 20"):
        RigL(model, opt, total_steps=10, t_end=20)
    with pytest.raises(ValueError, match="delta_t must be a positive int"):
        SET(model, opt, total_steps=10, delta_t=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        SET(model, opt, total_steps=10, seed="0")
    with pytest.raises(TypeError, match="keep_optimizer_step must be a bool"):
        RigL(model, opt, total_steps=10, keep_optimizer_step=1)
    rigl = RigL(model, opt, total_steps=10, delta_t=1)
    with pytest.raises(ValueError, match="no inputs and output gradients were recorded"):
        rigl.step()  # an update step without any backward
    with pytest.raises(TypeError, match="layer must be a sparsekern.nn.SparseLinear"):
        drop_and_grow(nn.Linear(3, 3), 1)
    with pytest.raises(ValueError, match="grow must be one of"):
        drop_and_grow(model[0], 1, grow="magnitude")
    with pytest.raises(ValueError, match=r"n must lie in \[0, active connections="):
        drop_and_grow(
            model[0], 10_000, x=torch.ones(2, 9, dtype=torch.float64), g=torch.ones(2, 12, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="grow='random' needs generator"):
        drop_and_grow(model[0], 1, grow="random")


def test_static_keeps_masked_zeros_and_exports():
    assert sparsekern.RigL is RigL and sparsekern.Static is Static
    model = tiny_model(1, dtype=torch.float32)
    sparsify(model, 0.8, layout="masked")
    masks = {k: v.clone() for k, v in Static(model, torch.optim.SGD(model.parameters(), lr=0.1)).masks().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    static = Static(model, opt)
    for step in range(5):
        x, c = batch(step, 1, dtype=torch.float32)
        (model(x) * c).sum().backward()
        assert not static.step()
        opt.zero_grad()
    for name, mask in static.masks().items():
        assert torch.equal(mask, masks[name])
        weight = model.get_submodule(name.rpartition(".")[0]).weight
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).any())


def test_rank_mismatch_raises_before_any_change(monkeypatch):
    """If the ranks' new masks differ (weights out of sync), every rank raises and nothing changes."""
    import torch.distributed as dist

    model = tiny_model(2)
    sparsify(model, 0.5, layout="masked", generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5)
    rigl = RigL(model, opt, total_steps=4, delta_t=1, t_end=4, group="a process group")

    def all_gather(out, tensor, group=None):
        assert group == "a process group"
        out[0].copy_(tensor)
        out[1].copy_(tensor + 1)  # rank 1 reached other masks

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    x, c = batch(1, 2)
    (model(x) * c).sum().backward()
    before, masks = snapshot(model, opt), rigl.masks()
    with pytest.raises(RuntimeError, match="the new masks of rank 1 differ from rank 0's"):
        rigl.step()
    assert_same_snapshot(before, snapshot(model, opt))
    assert all(torch.equal(masks[k], v) for k, v in rigl.masks().items()) and rigl.steps == 0


@pytest.mark.parametrize("numel,n", [(1, 0), (1, 1), (97, 13), (4096, 1000), (5000, 4900)])
def test_grow_from_scores_is_the_stable_sort_rule(numel, n):
    """The masked layers' grow (a kthvalue selection, no sort of every score) returns what a stable descending
    sort returns: the n largest |score| outside ``kept``, ties to the lower flat index, with many ties."""
    from sparsekern.training.drop_grow import grow_from_scores

    scores = torch.randint(-4, 5, (numel,)).float()  # few distinct values: ties everywhere, -0.0 and 0.0 too
    scores[torch.rand(numel) < 0.1] = -0.0
    kept = torch.randperm(numel)[: (numel - n) // 2].sort().values
    flat = scores.abs()
    flat[kept] = -1.0
    expected = torch.sort(flat, descending=True, stable=True).indices[:n].sort().values
    got = grow_from_scores(scores.clone(), kept, n)
    assert torch.equal(got, expected)


def train_rigl_steps(model, rigl, opt, steps: range, seed: int, run=None) -> None:
    for step in steps:
        for micro in range(2):
            x, c = batch(10 * step + micro, seed, dtype=torch.float32)
            ((run or model)(x) * c).sum().backward()
        rigl.step()
        opt.zero_grad()


def test_deepcopy_of_the_model_records_nothing_into_the_original():
    """copy.deepcopy(model) copies the recording hooks: running the copy must not feed the original RigL."""

    def build():
        model = tiny_model(4, dtype=torch.float32)
        sparsify(model, 0.6, generator=torch.Generator().manual_seed(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.125)
        return model, opt, RigL(model, opt, total_steps=12, delta_t=2)

    model, opt, rigl = build()
    untouched_model, untouched_opt, untouched = build()  # the same run without a copy
    for steps in (range(0, 1), range(1, 2), range(2, 4)):
        copied = copy.deepcopy(model)
        for step in range(2):  # the copy trains on other data, during the original's capture steps too
            x, c = batch(step, 9, dtype=torch.float32)
            (copied(x) * c).sum().backward()
        assert rigl._records == {} or all(len(v) == 0 for v in rigl._records.values())
        train_rigl_steps(model, rigl, opt, steps, seed=4)
        train_rigl_steps(untouched_model, untouched, untouched_opt, steps, seed=4)
        for name, mask in untouched.masks().items():
            assert torch.equal(rigl.masks()[name], mask), name
    assert rigl.steps == 4 and not torch.equal(rigl.masks()["0.weight"], build()[2].masks()["0.weight"])

    # a RigL of its own on the copy records its copy only
    copied = copy.deepcopy(model)
    copied_opt = torch.optim.SGD(copied.parameters(), lr=0.125)
    copied_rigl = RigL(copied, copied_opt, total_steps=12, delta_t=2)
    copied_rigl.steps = rigl.steps = 5  # the next step (6) is an update step: both capture
    copied_rigl._capturing = rigl._capturing = True
    x, c = batch(0, 9, dtype=torch.float32)
    (copied(x) * c).sum().backward()
    assert rigl._records == {} and sorted(copied_rigl._records) == ["0.weight", "2.weight", "4.weight"]
    assert all(len(v) == 1 for v in copied_rigl._records.values())


# The claim is about the compiled kernels' path: with the extension switched off, sparse_linear's plain-PyTorch
# fallback graph-breaks at a data-dependent repeat_interleave (and the view it then returns cannot take ReLU_).
@pytest.mark.skipif(
    not sparsekern._extension.available(), reason=f"extension: {sparsekern._extension.unavailable_reason}"
)
def test_compiled_rigl_neither_recompiles_nor_breaks_the_graph():
    """Recording runs on every training step through an opaque op (capture is read when it runs), so a compiled
    model keeps one graph through capture and update steps, and updates exactly as the eager model does."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def build(inplace=True):
        model = tiny_model(5, dtype=torch.float32)
        model[1].inplace = inplace  # an in-place op on a recorded output (a tensor hook there never fired)
        sparsify(model, 0.6, generator=torch.Generator().manual_seed(5))
        opt = torch.optim.SGD(model.parameters(), lr=0.125, momentum=0.5)
        return model, opt, RigL(model, opt, total_steps=20, delta_t=2)

    eager_model, eager_opt, eager = build()
    train_rigl_steps(eager_model, eager, eager_opt, range(9), seed=5)
    plain_model, plain_opt, plain = build(inplace=False)
    train_rigl_steps(plain_model, plain, plain_opt, range(9), seed=5)
    assert all(torch.equal(plain.masks()[name], mask) for name, mask in eager.masks().items())

    torch._dynamo.reset()
    counters.clear()
    model, opt, rigl = build()
    compiled = torch.compile(model, backend="aot_eager")  # AOTAutograd: where an output-less op could be removed
    train_rigl_steps(model, rigl, opt, range(1), seed=5, run=compiled)  # warm-up: forward and backward compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_rigl_steps(model, rigl, opt, range(1, 9), seed=5, run=compiled)  # four updates, capture on and off
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert rigl.steps == 9
    for name, mask in eager.masks().items():
        assert torch.equal(rigl.masks()[name], mask), name
        assert not torch.equal(mask, build()[2].masks()[name]), name  # the updates moved connections
    torch._dynamo.reset()


def test_recorded_gradient_of_a_3d_input_is_the_output_gradient():
    layer = SparseLinear(6, 5, sparsity=0.5, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    rigl = RigL(layer, opt, total_steps=10, delta_t=1, t_end=10)
    assert rigl._capturing  # step 1 updates
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = layer(x)
    y.retain_grad()
    (y.square() * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    ((xr, g),) = rigl._records["weight"]
    assert torch.equal(xr, x.reshape(6, 6)) and torch.equal(g, y.grad.reshape(6, 5))
