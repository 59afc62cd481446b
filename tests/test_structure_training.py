"""Structured sparse training, for every Structure: sparsify(structure=) and RigL / SET / Static keep the structure
exactly after every update (SparseLinear, masked Linear and masked Conv2d as (out, in * kh * kw)); the selections
against plain-PyTorch references; grown weights start at 0 with zero optimizer state; resume is bit-exact; DDP
(two gloo processes) gives the masks one process gets on the whole batch; every error path changes nothing.

CASES lists the structures (id, structure=, sparsify kwargs); N:M cases are added by tests/test_structure_nm.py's
author next to "fan_in"."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, rank_results
from torch import nn

from sparsekern.reference import outer_topk_scores_reference
from sparsekern.training import GMP, SET, RigL, Static, drop_and_grow, sparsify
from sparsekern.training import drop_grow as drop_grow_module
from sparsekern.training.drop_grow import as_layer
from sparsekern.training.structure_fan_in import FanIn, row_largest

# (id, structure, sparsify kwargs): the sparsity and distribution each structure accepts
CASES = [
    ("fan_in", "fan_in", dict(sparsity=0.8)),
    ("fan_in_erk_dense_first", "fan_in", dict(sparsity=0.9, dense_first=True)),
    ("fan_in_ablation", FanIn(ablation=0.6), dict(sparsity=0.8, distribution="uniform")),
]
IDS = [case[0] for case in CASES]
LAYOUTS = ("sparse", "masked")


def ablates(structure) -> bool:
    return getattr(structure, "ablation", None) is not None


def make_model(seed: int = 0) -> nn.Module:
    """A masked Conv2d ((8, 4 * 3 * 3) view), then two Linears; input (B, 4, 6, 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8))


def batch(gen: torch.Generator, size: int = 8):
    x = torch.randn(size, 4, 6, 6, generator=gen)
    return x, (x[:, 0, 0, :3] > 0).long().sum(1)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def build(case, layout: str, method: str = "rigl", seed: int = 0, **kwargs):
    _, structure, sparsify_kwargs = case
    model = make_model(seed)
    report = sparsify(model, layout=layout, structure=copy.deepcopy(structure),
                      generator=torch.Generator().manual_seed(seed), **sparsify_kwargs)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = dict(total_steps=kwargs.pop("total_steps", 12), delta_t=kwargs.pop("delta_t", 2), t_end=0.9)
    if method == "rigl":
        sparsifier = RigL(model, opt, **schedule, **kwargs)
    elif method == "set":
        sparsifier = SET(model, opt, **schedule, seed=7, **kwargs)
    else:
        sparsifier = Static(model, opt, **kwargs)
    return model, opt, sparsifier, report


def check_structure(sparsifier, counts=None) -> None:
    """Every structured layer's mask has its structure; without ablation its count is as it started."""
    for name, layer in sparsifier.layers.items():
        structure = layer.structure
        if structure is None:
            assert layer.count() == layer.numel, name  # only a dense layer is left unstructured
            continue
        fault = structure.violation(layer.mask().reshape(layer.rows))
        assert fault is None, (name, fault)
        if counts is not None and not ablates(structure):
            assert layer.count() == counts[name], name


def methods_for(case):
    return ["rigl"] if ablates(case[1]) else ["rigl", "set"]


TRAIN_PARAMS = [
    pytest.param(case, method, layout, id=f"{case[0]}-{method}-{layout}")
    for case in CASES
    for method in methods_for(case)
    for layout in LAYOUTS
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sparsify_gives_the_structure(case, layout):
    model, _, sparsifier, report = build(case, layout, "static")
    check_structure(sparsifier)
    kinds = {layer.name: layer.layout for layer in report.layers}
    assert kinds["0.weight"] == "masked" and kinds["3.weight"] == layout
    for layer in report.layers:
        assert layer.structure == (None if layer.nnz == layer.numel else sparsifier.layers[layer.name].structure.name)
    if case[2].get("dense_first"):
        assert sparsifier.layers["0.weight"].structure is None and report.layers[0].nnz == report.layers[0].numel


def test_sparsify_fan_in_counts_and_scores():
    model = make_model()
    scores = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
              for i, (name, p) in enumerate(model.named_parameters()) if p.dim() > 1}  # fmt: skip
    report = sparsify(model, 0.8, distribution="uniform", layout="masked", structure="fan_in", scores=scores)
    # uniform: round(0.2 * numel) per layer, then round(/ n_out) per row
    assert [layer.nnz for layer in report.layers] == [8 * 7, 32 * 26, 8 * 6]
    for (name, score), module in zip(scores.items(), (model[0], model[3], model[5]), strict=True):
        rows = score.reshape(score.shape[0], -1)
        k = int(module.weight_mask.reshape(rows.shape).sum(1)[0])
        want = row_largest(rows, torch.ones_like(rows, dtype=torch.bool), torch.full((rows.shape[0],), k))
        assert torch.equal(module.weight_mask.reshape(rows.shape), want), name


@pytest.mark.parametrize(("case", "method", "layout"), TRAIN_PARAMS)
def test_training_keeps_the_structure_after_every_update(case, method, layout):
    model, opt, sparsifier, _ = build(case, layout, method)
    counts = {name: layer.count() for name, layer in sparsifier.layers.items()}
    initial, moved = sparsifier.masks(), 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        for _ in range(2):  # micro-batches
            loss_of(model, *batch(gen)).backward()
        before = sparsifier.masks()
        if sparsifier.step():
            after = sparsifier.masks()
            moved += sum(int((before[k] != after[k]).sum()) for k in before)
        opt.zero_grad()
        check_structure(sparsifier, counts)
    assert moved > 0
    assert any(not torch.equal(initial[k], sparsifier.masks()[k]) for k in initial)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grown_start_at_zero_with_zero_state_and_kept_keep_theirs(layout):
    model, opt, rigl, _ = build(CASES[0], layout, "rigl", delta_t=3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        loss_of(model, *batch(gen)).backward()
        rigl.step()
        opt.zero_grad()
    loss_of(model, *batch(gen)).backward()

    def dense(layer):
        return (
            layer.mask().clone(),
            dense_of(layer, layer.param),
            dense_of(layer, opt.state[layer.param]["momentum_buffer"]),
        )

    before = {name: dense(layer) for name, layer in rigl.layers.items()}
    assert rigl.step()
    for name, layer in rigl.layers.items():
        (old_mask, old_w, old_m), (new_mask, new_w, new_m) = before[name], dense(layer)
        grown, kept = new_mask & ~old_mask, new_mask & old_mask
        assert grown.any(), name
        assert (new_w[grown] == 0).all() and (new_m[grown] == 0).all(), name
        assert torch.equal(new_w[kept], old_w[kept]) and torch.equal(new_m[kept], old_m[kept]), name
        assert (new_w[~new_mask] == 0).all(), name


def dense_of(layer, tensor):
    """A parameter-shaped tensor (dense weight, or SparseLinear's nnz-sized values) in the dense weight's shape."""
    if tensor.shape == layer.shape:
        return tensor.detach().clone()
    out = torch.zeros(layer.numel, dtype=tensor.dtype)
    out[layer.active()] = tensor.detach()
    return out.view(layer.shape)


def reference_fan_in_update(mask, weight, scores, n):
    """Per row by Python loops: drop the round(n / count * k) smallest |w| among active (ties lower column), grow as
    many of the largest scores among the positions not kept (ties lower column)."""
    count = int(mask.sum())
    new = mask.clone()
    for r in range(mask.shape[0]):
        active = mask[r].nonzero().view(-1).tolist()
        d = int(n / count * len(active) + 0.5)
        drop = sorted(active, key=lambda c: (float(weight[r, c].abs()), c))[:d]
        kept = set(active) - set(drop)
        outside = [c for c in range(mask.shape[1]) if c not in kept]
        grow = sorted(outside, key=lambda c: (-float(scores[r, c]), c))[:d]
        new[r] = False
        new[r, sorted(kept | set(grow))] = True
    return new


@pytest.mark.parametrize("n", [0, 7, 40, 120])
def test_sparse_linear_exact_grow_matches_reference(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20))
    sparsify(model, 0.8, structure="fan_in", generator=torch.Generator().manual_seed(0))
    layer = model[0]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # ties in |w|: a few levels
        layer.values.copy_(torch.randint(-3, 4, layer.values.shape, generator=gen).float())
    x = torch.randint(-2, 3, (9, 30), generator=gen).float()  # ties in the scores too
    g = torch.randint(-2, 3, (9, 20), generator=gen).float()
    mask, weight = layer.mask.clone(), layer.dense_weight().detach().clone()
    want = reference_fan_in_update(mask, weight, outer_topk_scores_reference(x, g), n)
    drop_and_grow(layer, n, x=x, g=g, precision="exact")
    assert torch.equal(layer.mask, want)
    assert FanIn(6).violation(layer.mask) is None


def test_masked_conv_grow_matches_reference_and_blocks_do_not_matter(monkeypatch):
    results = []
    for block_elements in (1 << 20, 36, 72 * 3):  # one block; one row at a time; 6 rows
        monkeypatch.setattr(drop_grow_module, "ROW_BLOCK_ELEMENTS", block_elements)
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 8, 3)
        model = nn.Sequential(conv)
        sparsify(model, 0.7, structure="fan_in", generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=gen).float() * conv.weight_mask)
        conv.weight.grad = torch.randint(-2, 3, conv.weight.shape, generator=gen).float()
        mask, weight = conv.weight_mask.reshape(8, 36).clone(), conv.weight.detach().reshape(8, 36).clone()
        want = reference_fan_in_update(mask, weight, conv.weight.grad.reshape(8, 36).abs(), 30)
        drop_and_grow(conv, 30)
        assert torch.equal(conv.weight_mask.reshape(8, 36), want)
        results.append(conv.weight_mask.clone())
    assert all(torch.equal(r, results[0]) for r in results)


STEPS, STOP = 12, 5  # delta_t 2: the step after the stop (6) is an update step


def train(model, opt, sparsifier, gen, steps):
    for _ in range(steps):
        for _ in range(2):
            loss_of(model, *batch(gen)).backward()
        sparsifier.step()
        opt.zero_grad()


@pytest.mark.parametrize(("case", "method", "layout"), TRAIN_PARAMS)
def test_resume_is_bit_exact(case, method, layout):
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


def test_load_state_dict_checks_structures():
    case = CASES[0]
    model, opt, rigl, _ = build(case, "masked")
    state = rigl.state_dict()
    assert state["structures"]["3.weight"]["name"] == "fan_in"
    plain = make_model()
    sparsify(plain, 0.8, layout="masked")
    other = RigL(plain, torch.optim.SGD(plain.parameters(), lr=0.1), total_steps=12, delta_t=2, t_end=0.9)
    with pytest.raises(ValueError, match="the state lacks \\['structures'\\]"):
        rigl.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="keeps structure None, the state has 'fan_in'"):
        other.load_state_dict({**other.state_dict(), "structures": state["structures"]})
    bad = copy.deepcopy(state)
    bad["structures"]["3.weight"]["k"] += 1
    before = rigl.structures()
    with pytest.raises(ValueError, match="does not have the saved structure"):
        rigl.load_state_dict(bad)
    assert rigl.structures() == before


def test_nan_gradient_changes_nothing():
    for layout in LAYOUTS:
        model, opt, rigl, _ = build(CASES[0], layout, delta_t=1)
        gen = torch.Generator().manual_seed(0)
        loss_of(model, *batch(gen)).backward()
        for p in model.parameters():
            if p.grad is not None and p.dim() > 1:
                p.grad[0].fill_(float("nan")) if p.grad.dim() > 1 else None
        if layout == "sparse":  # poison a recorded output gradient as well
            rigl._records["3.weight"][0][1][0, 0] = float("inf")
        snapshot = copy.deepcopy((model.state_dict(), opt.state_dict(), rigl.state_dict()))
        with pytest.raises(ValueError, match="inf or NaN"):
            rigl.step()
        after = (model.state_dict(), opt.state_dict(), rigl.state_dict())
        assert _same(snapshot, after)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match="structure must be None, 'fan_in' or 'N:M'"):
        sparsify(model, 0.8, structure="rows")
    with pytest.raises(ValueError, match="transposable=True needs an N:M structure"):
        sparsify(model, 0.8, transposable=True)
    with pytest.raises(ValueError, match="transposable=True applies to N:M"):
        sparsify(model, 0.8, structure="fan_in", transposable=True)

    class Conv1D(nn.Module):  # transformers' transposed linear, recognised by name and shape
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 6, nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ self.weight

    with pytest.raises(ValueError, match="layer '0.weight' is a transformers Conv1D"):
        sparsify(nn.Sequential(Conv1D()), 0.5, structure="fan_in")

    # sparsifiers
    model, opt, _, _ = build(CASES[0], "masked", "static")
    kwargs = dict(total_steps=10, delta_t=2)
    with pytest.raises(ValueError, match="redistribution='momentum' moves nonzeros between layers"):
        RigL(model, opt, redistribution="momentum", **kwargs)
    with pytest.raises(ValueError, match="ranks rows by their gradient: use RigL"):
        SET(model, opt, structure=FanIn(ablation=0.5), **kwargs)
    with pytest.raises(ValueError, match="keeps the structure 'fan_in'.*which GMP does not keep"):
        GMP(model, opt, sparsity=0.95, total_steps=10, delta_t=2)
    with pytest.raises(ValueError, match="n_grow"):
        as_layer(model[3]).plan(3, "gradient", n_grow=4)
    # structure= on unstructured masks: checked, named
    plain = make_model()
    sparsify(plain, 0.8, layout="masked", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the mask of layer '0.weight' does not have the structure 'fan_in': row"):
        Static(plain, opt, structure="fan_in")
    assert all(as_layer(m).structure is None for m in (plain[0], plain[3], plain[5]))  # nothing changed


def test_structure_argument_adopts_matching_unstructured_masks():
    plain = make_model()
    scores = {n: torch.rand(p.shape) for n, p in plain.named_parameters() if p.dim() > 1}
    sparsify(plain, 0.8, layout="masked", structure="fan_in", scores=scores)
    for m in (plain[0], plain[3], plain[5]):
        drop_grow_module.set_structure(m, None)  # as if saved and loaded without the structure
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(plain, opt, total_steps=10, delta_t=1, structure="fan_in")
    assert {s.name for s in rigl.structures().values()} == {"fan_in"}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss_of(plain, *batch(gen)).backward()
        rigl.step()
        opt.zero_grad()
        check_structure(rigl)
    # an ablation setting given to the sparsifier replaces the layers' own (never on the output layer)
    rigl = RigL(plain, opt, total_steps=10, delta_t=1, structure=FanIn(ablation=0.5))
    assert [getattr(s, "ablation", None) for s in rigl.structures().values()] == [0.5, 0.5, None]


# -- data parallel ----------------------------------------------------------------------------------------------
WORLD, DDP_STEPS = 2, 4
DDP_CASES = [("fan_in", "sparse"), ("fan_in", "masked"), ("fan_in_ablation", "masked")]


def rank_batch(step: int, rank: int):
    return batch(torch.Generator().manual_seed(100 * step + rank), size=5 + rank)  # batch sizes differ


def ddp_rank_masks(model: nn.Module, rank: int) -> list:
    """RigL (ΔT = 1) on ``model`` wrapped in DDP, on this rank's batches: the masks after each update."""
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(ddp, opt, total_steps=DDP_STEPS, delta_t=1, t_end=DDP_STEPS)
    history = []
    for step in range(1, DDP_STEPS):
        loss_of(ddp, *rank_batch(step, rank)).backward()
        rigl.step()
        opt.zero_grad()
        history.append(rigl.masks())
    del ddp
    return history


def assert_ddp_equals_one_process(ranks: list, model: nn.Module, check) -> None:
    """``ranks``: each rank's :func:`ddp_rank_masks`. They agree, and equal the masks of RigL in one process on
    ``model`` (built as the ranks' were) over every rank's batches, the invariants (``check(rigl)``) holding."""
    for a, b in zip(*ranks, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=DDP_STEPS, delta_t=1, t_end=DDP_STEPS)
    initial = rigl.masks()
    for step in range(1, DDP_STEPS):
        for rank in range(WORLD):  # each loss halved as DDP averages: the same gradient (halving is exact)
            (loss_of(model, *rank_batch(step, rank)) / WORLD).backward()
        assert rigl.step()
        opt.zero_grad()
        got = rigl.masks()
        check(rigl)
        assert all(torch.equal(got[k], ranks[0][step - 1][k]) for k in got), step
    assert any(not torch.equal(initial[k], got[k]) for k in got)


def _ddp_run(rank: int, case_id: str, layout: str) -> list:
    case = next(c for c in CASES if c[0] == case_id)
    return ddp_rank_masks(build(case, layout, "static")[0], rank)


def _worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, lambda r: {key: _ddp_run(r, *key) for key in DDP_CASES})


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return rank_results(_worker, tmp_path_factory.mktemp("ddp_structure"), WORLD, 240)


@pytest.mark.parametrize(("case_id", "layout"), DDP_CASES)
def test_ddp_masks_equal_one_process_on_the_whole_batch(case_id, layout, ddp_runs):
    case = next(c for c in CASES if c[0] == case_id)
    ranks = [run[case_id, layout] for run in ddp_runs]
    assert_ddp_equals_one_process(ranks, build(case, layout, "static")[0], check_structure)


def test_ddp_refuses_ablation_on_sparse_linear_wrapped(monkeypatch):
    # the check runs before any collective: a fake DDP instance is enough
    model, opt, _, _ = build(CASES[2], "sparse", "static")

    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module, self.process_group = module, None

    with pytest.raises(ValueError, match="FanIn\\(ablation=\\) changes the size of SparseLinear.values"):
        RigL(FakeDDP(model), opt, total_steps=4, delta_t=1)


assert dist is not None  # imported for the workers' collectives


def test_multihead_attention_projections_keep_fan_in():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Block()
    sparsify(model, 0.75, structure="fan_in", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, total_steps=6, delta_t=1, t_end=6)
    assert rigl.structures()["attn.in_proj_weight"].name == "fan_in"
    initial = rigl.masks()
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(4, 5, 16, generator=gen)
        nn.functional.cross_entropy(model(x), torch.arange(4) % 3).backward()
        rigl.step()
        opt.zero_grad()
        check_structure(rigl)
    assert not torch.equal(initial["attn.in_proj_weight"], rigl.masks()["attn.in_proj_weight"])


def test_to_sparse_linear_keeps_the_structure():
    from sparsekern.training import to_sparse_linear

    model = make_model()
    sparsify(model, 0.8, layout="masked", structure="fan_in", generator=torch.Generator().manual_seed(0))
    before = {name: as_layer(m).structure for name, m in (("3", model[3]), ("5", model[5]))}
    to_sparse_linear(model)
    assert type(model[3]).__name__ == "SparseLinear"
    assert as_layer(model[3]).structure == before["3"] and as_layer(model[5]).structure == before["5"]
