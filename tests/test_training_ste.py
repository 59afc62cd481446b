"""STE (learned scores) and SR-STE (N:M): masks and gradients against plain-PyTorch re-statements of the papers' rules
(edge-popup's GetSubnet, NM-sparsity's Sparse / Sparse_NHWC functions), resume, DDP, failure injection, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import gloo_rank, rank_results
from test_training_imp import same
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern
from sparsekern.training import SRSTE, STE, layer_nnz, nm_mask, sparsify, to_sparse_linear
from sparsekern.training.ste import _top_abs

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# -- plain-PyTorch re-statements -----------------------------------------------------------------------------------
def nm_reference(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Each group of m along dim keeps its n largest |w|, ties to the lower index (a Python sort per group)."""
    moved = w.detach().double().movedim(dim, -1)
    flat = moved.reshape(-1, m).tolist()
    mask = [[False] * m for _ in flat]
    for row, group in zip(mask, flat, strict=True):
        for i in sorted(range(m), key=lambda i: (-abs(group[i]), i))[:n]:
            row[i] = True
    return torch.tensor(mask).view(moved.shape).movedim(-1, dim)


def top_reference(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The count largest |scores|, ties to the lower flat index."""
    flat = scores.detach().abs().reshape(-1).tolist()
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:count]] = True
    return mask.view(scores.shape)


class GetSubnet(torch.autograd.Function):
    """edge-popup's: the top-k mask of |scores| forward, the identity backward."""

    @staticmethod
    def forward(ctx, scores_abs, count):
        return top_reference(scores_abs, count).to(scores_abs.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class SparseNM(torch.autograd.Function):
    """NM-sparsity's Sparse: w ⊙ mask forward; backward g + decay (1 − mask) ⊙ w."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, g):
        weight, mask = ctx.saved_tensors
        return g + ctx.decay * (1 - mask.to(weight.dtype)) * weight, None, None


# -- models ------------------------------------------------------------------------------------------------------
def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


class Conv1D(nn.Module):
    """transformers' Conv1D (y = x @ W + b, W of shape (n_in, n_out)), as sparsify recognises it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class ConvNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = Conv1D(12, 8)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        return self.head(F.relu(self.proj(h)))


def batch(step: int, seed: int = 0, conv: bool = False):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    x = torch.randn(5, 4, 5, 5, generator=gen) if conv else torch.randn(7, 12, generator=gen)
    return x, torch.randint(0, 3, (x.shape[0],), generator=gen)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def weights_of(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith(("_mask", "_scores"))}


# -- nm_mask -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "shape, n, m, dim",
    [((5, 12), 2, 4, 1), ((3, 16), 1, 4, -1), ((6, 8, 3, 3), 2, 4, 1), ((8, 5), 2, 8, 0), ((3, 64), 5, 32, 1)],
)
def test_nm_mask_matches_reference(shape, n, m, dim, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + n)).to(dtype)
    w.view(-1)[::5] = w.view(-1)[1::5][: w.view(-1)[::5].numel()]  # equal magnitudes inside some groups: ties
    mask = nm_mask(w, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, nm_reference(w, n, m, dim))
    assert torch.equal(mask.movedim(dim, -1).reshape(-1, m).sum(-1), torch.full((w.numel() // m,), n))


def test_nm_mask_ties_and_conv_grouping():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 1.0, 2.0]])
    expected = [[True, True, False, False, True, True, False, False, True, True, False, False]]
    assert nm_mask(w, 2, 4, dim=1).tolist() == expected
    assert torch.equal(sparsekern.semi24_mask(w), nm_mask(w, 2, 4, dim=1))  # the same rule as semi24_mask
    # a conv weight groups input channels at each kernel position: NM-sparsity's Sparse_NHWC (permute, groups of M)
    w = torch.randn(6, 8, 3, 3, generator=torch.Generator().manual_seed(3))
    nhwc = w.permute(0, 2, 3, 1).reshape(-1, 4).abs()
    kept = nhwc.argsort(dim=1, descending=True, stable=True)[:, :2]
    official = torch.zeros_like(nhwc, dtype=torch.bool).scatter_(1, kept, True)
    assert torch.equal(nm_mask(w, 2, 4, dim=1), official.view(6, 3, 3, 8).permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=2, m=2), ValueError, r"nm_mask: need 0 < n < m, got n=2, m=2"),
        (dict(n=0, m=4), ValueError, r"need 0 < n < m, got n=0, m=4"),
        (dict(n=2.0, m=4), ValueError, r"nm_mask: n must be an int, got 2.0"),
        (dict(n=1, m=3), ValueError, r"dim 1 of the weight \(shape \(4, 8\)\) has 8 entries, not a multiple of m=3"),
    ],
)
def test_nm_mask_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nm_mask(torch.randn(4, 8), dim=1, **kwargs)


def test_nm_mask_refuses_non_finite():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="nm_mask: weight contains NaN"):
        nm_mask(w, 2, 4, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ste_selection_with_a_threshold_hint_is_exact(dtype):
    """STE narrows each step's selection with last step's threshold; whatever the hint, the result is the rule's."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, generator=gen).to(dtype)
    scores.view(-1)[::7] = 0.25  # ties at many positions, some at the threshold
    for count in (1, 37, 300, 301, 1199, 1200):
        expected = top_reference(scores, count)
        exact, threshold = _top_abs(scores, count)
        assert torch.equal(exact, expected)
        for hint in (None, threshold, threshold * 1.001, threshold * 0.9, -0.25, 0.0, -1e6, 1e6, threshold + 1e-12):
            mask, _ = _top_abs(scores, count, hint)
            assert torch.equal(mask, expected), (count, hint)
    moved = scores + 0.01 * torch.randn(scores.shape, generator=gen).to(dtype)  # the next step's scores
    assert torch.equal(_top_abs(moved, 300, threshold)[0], top_reference(moved, 300))


# -- SR-STE ------------------------------------------------------------------------------------------------------
def srste_reference_grads(model_ref, x, y, decay, micro=1):
    """Gradients of the reference formulation: every layer's weight through SparseNM with the mask of |w|."""
    masks = {}

    def forward(module, w, dim):
        mask = nm_reference(w, 2, 4, dim)
        masks[id(module)] = mask
        return SparseNM.apply(w, mask, decay)

    h = x
    for layer in model_ref:
        h = F.linear(h, forward(layer, layer.weight, 1), layer.bias) if isinstance(layer, nn.Linear) else layer(h)
    loss = F.cross_entropy(h, y) / micro
    loss.backward()
    return masks


def test_srste_gradient_with_decay_matches_official_formula():
    decay = 0.05  # large, so the term is far above rounding
    model = mlp(dtype=torch.float64)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients step() hands the optimizer stay readable
    srste = SRSTE(model, opt, decay=decay)
    x, y = batch(1)
    x = x.double()
    loss_of(model, x, y).backward()
    srste.step()
    srste_reference_grads(reference, x, y, decay)
    for layer, ref in zip(model, reference, strict=True):
        if isinstance(layer, nn.Linear):
            assert torch.equal(layer.weight.grad, ref.weight.grad)
            assert torch.equal(layer.weight_mask, nm_reference(layer.weight, 2, 4, 1))
            assert bool((layer.weight[~layer.weight_mask] != 0).all())  # the latent weights off the mask stay
            assert torch.equal(layer.bias.grad, ref.bias.grad)


def test_srste_decay_added_once_per_step_with_micro_batches():
    decay = 0.05
    model = mlp(dtype=torch.float64)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    srste = SRSTE(model, opt, decay=decay)
    plain_srste = SRSTE(plain, torch.optim.SGD(plain.parameters(), lr=0.0), decay=0.0)
    for step in (1, 2):  # two micro-batches
        x, y = batch(step)
        loss_of(model, x.double(), y).backward()
        loss_of(plain, x.double(), y).backward()
    srste.step()
    plain_srste.step()
    for layer, ref in zip(model, plain, strict=True):
        if isinstance(layer, nn.Linear):
            expected = ref.weight.grad + decay * (1 - layer.weight_mask.double()) * layer.weight.detach()
            assert torch.equal(layer.weight.grad, expected)


def test_srste_conv_and_conv1d_group_along_the_input_dim():
    model = ConvNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    srste = SRSTE(model, opt)
    assert srste.flops_rule == "dense_gradient"
    moved = False
    for step in range(1, 6):
        before = srste.masks()
        x, y = batch(step, conv=True)
        x = x.double()
        # the forward is the layers' own with w ⊙ mask
        conv, proj, head = model.conv, model.proj, model.head
        h = F.relu(F.conv2d(x, conv.weight * conv.weight_mask, conv.bias, padding=1)).mean((2, 3))
        expected = F.linear(F.relu(h @ (proj.weight * proj.weight_mask) + proj.bias), head.weight * head.weight_mask)
        out = model(x)
        assert torch.equal(out, expected + head.bias)
        F.cross_entropy(out, y).backward()
        srste.step()
        opt.zero_grad()
        got = srste.masks()
        for name, mask in got.items():  # the masks follow |w| after every step
            module = model.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(mask, nm_reference(module.weight, 2, 4, 0 if module is proj else 1)), name
        moved |= any(not torch.equal(before[k], got[k]) for k in got)
    assert moved


def test_srste_on_a_masked_model_and_finalize_to_semi24():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).half()
    sparsify(model, 0.25, layout="masked", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    srste = SRSTE(model, opt)
    assert all(
        torch.equal(m, nm_mask(model[i].weight, 2, 4, dim=1))
        for i, m in zip((0, 2), srste.masks().values(), strict=True)
    )
    x = torch.randn(4, 64).half()
    model(x).float().square().mean().backward()
    srste.step()
    report = srste.finalize()
    assert report.sparsity == 0.5 and all(r.off_mask == 0 for r in report.layers)
    for layer in (model[0], model[2]):
        assert torch.equal(layer.weight != 0, layer.weight_mask & (layer.weight != 0))
        assert bool((layer.weight.view(-1, 4) != 0).sum(-1).le(2).all())
    assert model[0]._forward_pre_hooks == {} and model[0]._forward_hooks == {}
    out = sparsekern.nn.sparsify_semi24(model, on_cpu="dense")
    assert [r.layout for r in out.layers] == ["dense", "dense"]
    with pytest.raises(ValueError, match=r"SRSTE.step: finalize\(\) was called; keep training the masked model"):
        srste.step()


# -- STE ---------------------------------------------------------------------------------------------------------
def test_ste_masks_and_gradients_match_edge_popup():
    model = mlp(dtype=torch.float64)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ste = STE(model, opt, sparsity=0.7, distribution="erk", seed=4)
    counts = layer_nnz([(16, 12), (8, 16), (3, 8)], 0.7, "erk")
    linears = [0, 2, 4]
    scores = [model[i].weight_scores.clone() for i in linears]
    # the scores: kaiming-uniform from a seeded generator, in the optimizer as their own group
    expected_scores = torch.empty(16, 12)
    nn.init.kaiming_uniform_(expected_scores, a=5**0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(scores[0], expected_scores.double())
    assert opt.param_groups[-1]["params"] == [model[i].weight_scores for i in linears]
    for i, s, count in zip(linears, scores, counts, strict=True):
        assert torch.equal(model[i].weight_mask, top_reference(s, count))

    x, y = batch(1)
    x = x.double()
    loss_of(model, x, y).backward()
    ste.step()
    # edge-popup's forward with trainable weights and scores, in float64
    ref_scores = [s.clone().requires_grad_() for s in scores]
    h = x
    for layer, i in zip(reference, range(5), strict=True):
        if isinstance(layer, nn.Linear):
            s = ref_scores[linears.index(i)]
            h = F.linear(h, layer.weight * GetSubnet.apply(s.abs(), counts[linears.index(i)]), layer.bias)
        else:
            h = layer(h)
    F.cross_entropy(h, y).backward()
    for i, s in zip(linears, ref_scores, strict=True):
        assert torch.equal(model[i].weight.grad, reference[i].weight.grad)
        assert torch.equal(model[i].weight_scores.grad, s.grad)
        assert s.grad.count_nonzero() > reference[i].weight.grad.count_nonzero()  # scores learn off the mask too


def test_ste_on_conv_layers_gradients_by_formula():
    """Conv, Conv1D and Linear weights: weight grad G ⊙ m and score grad G ⊙ w ⊙ sign(s), with G = ∂L/∂(w ⊙ m)
    taken by autograd on the effective weights as leaves (float64)."""
    model = ConvNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ste = STE(model, opt, sparsity=0.6, distribution="uniform")
    x, y = batch(1, conv=True)
    x = x.double()
    conv, proj, head = model.conv, model.proj, model.head
    effective = [(m.weight * m.weight_mask).detach().requires_grad_() for m in (conv, proj, head)]
    h = F.relu(F.conv2d(x, effective[0], conv.bias, padding=1)).mean((2, 3))
    F.cross_entropy(F.linear(F.relu(h @ effective[1] + proj.bias), effective[2], head.bias), y).backward()
    F.cross_entropy(model(x), y).backward()
    ste.step()
    for module, eff in zip((conv, proj, head), effective, strict=True):
        g, w, s = eff.grad, module.weight.detach(), module.weight_scores
        assert torch.equal(module.weight.grad, g * module.weight_mask)
        assert torch.equal(s.grad, g * w * s.sgn())
        assert int(module.weight_mask.sum()) == round(0.4 * w.numel())


def test_ste_rescale_scales_each_layer_by_its_density():
    model = mlp()
    before = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    ste = STE(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.7, rescale=True, score_init="magnitude")
    counts = layer_nnz([(16, 12), (8, 16), (3, 8)], 0.7, "erk")
    for i, w, count in zip((0, 2, 4), before, counts, strict=True):
        assert torch.equal(model[i].weight, w * (w.numel() / count) ** 0.5)
        assert torch.equal(model[i].weight_mask, top_reference(w, count))  # magnitude scores: rescaling keeps order
    assert ste.report().nnz == sum(counts)


def test_ste_masks_follow_the_scores_and_keep_counts():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ste = STE(model, opt, sparsity=0.8, score_options={"lr": 5.0})
    first = ste.masks()
    counts = {k: int(v.sum()) for k, v in first.items()}
    for step in range(1, 6):
        loss_of(model, *batch(step)).backward()
        ste.step()
        opt.zero_grad()
        for name, mask in ste.masks().items():
            module = model.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(mask, top_reference(module.weight_scores, counts[name]))
    assert any(not torch.equal(first[k], ste.masks()[k]) for k in first)
    report = ste.report()  # the effective weights: nothing off the mask, though the latent weights are dense
    assert report.sparsity == pytest.approx(0.8, abs=1e-3) and all(r.off_mask == 0 for r in report.layers)
    x = batch(9)[0]
    copied = copy.deepcopy(model)  # a copy keeps applying its masks
    with torch.no_grad():
        assert torch.equal(copied(x), model(x))
        masked = mlp()
        masked.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("_mask", "_scores"))})
        for i in (0, 2, 4):
            masked[i].weight.mul_(model[i].weight_mask)
        assert torch.equal(masked(x), model(x))


def test_ste_on_a_masked_model_keeps_its_counts_and_finalizes_to_sparse_linear():
    model = mlp()
    sparsify(model, 0.75, distribution="uniform", layout="masked", generator=torch.Generator().manual_seed(0))
    before = {i: model[i].weight_mask.clone() for i in (0, 2, 4)}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ste = STE(model, opt, score_init="magnitude")  # scores |w|: the first masks are sparsify's (its zeros are lowest)
    assert all(torch.equal(model[i].weight_mask, before[i]) for i in before)
    for step in range(1, 4):
        loss_of(model, *batch(step)).backward()
        ste.step()
        opt.zero_grad()
    groups = len(opt.param_groups)
    report = ste.finalize()
    assert len(opt.param_groups) == groups - 1 and not any(k.endswith("_scores") for k in model.state_dict())
    assert [r.nnz for r in report.layers] == [int(m.sum()) for m in before.values()]
    assert all(r.off_mask == 0 for r in report.layers)
    x = batch(7)[0]
    with torch.no_grad():
        expected = model(x)
        to_sparse_linear(model)
        assert torch.allclose(model(x), expected, atol=1e-6)


# -- resume, failure, DDP ------------------------------------------------------------------------------------------
def build(method: str, seed: int, masked: bool = False):
    model = mlp(seed)
    if masked:
        sparsify(model, 0.5, layout="masked", generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    if method == "srste":
        return model, opt, SRSTE(model, opt, decay=0.01)
    return model, opt, STE(model, opt, sparsity=None if masked else 0.6, seed=2, score_options={"lr": 0.5})


def train(model, opt, sparsifier, steps, start=0):
    for step in range(start + 1, start + steps + 1):
        for micro in range(2):
            loss_of(model, *batch(step, seed=micro)).backward()
        sparsifier.step()
        opt.zero_grad()


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("method", ["srste", "ste"])
def test_resume_is_bit_identical(method, masked):
    model, opt, sparsifier = build(method, 0, masked)
    train(model, opt, sparsifier, 8)
    expected, expected_masks = copy.deepcopy(model.state_dict()), sparsifier.masks()

    model, opt, sparsifier = build(method, 0, masked)
    train(model, opt, sparsifier, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model, opt, sparsifier = build(method, 1, masked)  # another init (and masks): all overwritten
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    assert sparsifier.steps == 3
    train(model, opt, sparsifier, 5, start=3)
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(torch.equal(sparsifier.masks()[k], expected_masks[k]) for k in expected_masks)


def snapshot(model, opt, sparsifier):
    grads = [p.grad.clone() if p.grad is not None else None for g in opt.param_groups for p in g["params"]]
    return copy.deepcopy((model.state_dict(), opt.state_dict(), sparsifier.state_dict(), grads))


@pytest.mark.parametrize("method", ["srste", "ste"])
def test_failed_step_changes_nothing(method, monkeypatch):
    model, opt, sparsifier = build(method, 0)
    train(model, opt, sparsifier, 2)
    loss_of(model, *batch(3)).backward()
    before = snapshot(model, opt, sparsifier)
    stage = type(sparsifier)._stage
    calls = []

    def failing(self, name, *args):
        calls.append(name)
        if len(calls) == 3:  # the last layer: the first two are staged already
            raise MemoryError("injected")
        return stage(self, name, *args)

    monkeypatch.setattr(type(sparsifier), "_stage", failing)
    with pytest.raises(MemoryError, match="injected"):
        sparsifier.step()
    assert same(snapshot(model, opt, sparsifier), before)
    monkeypatch.setattr(type(sparsifier), "_stage", stage)
    sparsifier.step()  # the same step now goes through
    assert sparsifier.steps == 3 and not same(snapshot(model, opt, sparsifier)[0], before[0])


WORLD, STEPS = 2, 3


def _ddp_run(rank: int, method: str) -> dict:
    model = DDP(mlp(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    if method == "srste":
        sparsifier = SRSTE(model, opt, decay=0.01)
    else:
        sparsifier = STE(model, opt, sparsity=0.6, score_options={"lr": 2.0})
    history = []
    for step in range(1, STEPS + 1):
        loss_of(model, *batch(step, seed=rank)).backward()
        sparsifier.step()
        opt.zero_grad()
        history.append(sparsifier.masks())
    result = {"history": history, "state": copy.deepcopy(model.module.state_dict())}
    if method == "srste":  # rank 1's weights drift: every rank refuses the next step and nothing changes
        loss_of(model, *batch(9, seed=rank)).backward()
        if rank == 1:
            with torch.no_grad():
                model.module[0].weight.mul_(torch.rand(16, 12, generator=torch.Generator().manual_seed(1)))
        before = snapshot(model.module, opt, sparsifier)
        try:
            sparsifier.step()
            result["error"] = None
        except RuntimeError as exc:
            result["error"] = str(exc)
        result["unchanged"] = same(snapshot(model.module, opt, sparsifier), before)
    return result


def _worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, _worker_results)


def _worker_results(rank: int) -> dict:
    return {m: _ddp_run(rank, m) for m in ("srste", "ste")}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp_ste")
    return rank_results(_worker, path, WORLD, 180)


@pytest.mark.parametrize("method", ["srste", "ste"])
def test_ddp_identical_masks_equal_to_one_process(method, ddp_runs):
    ranks = [run[method] for run in ddp_runs]
    assert same(ranks[0]["history"], ranks[1]["history"]) and same(ranks[0]["state"], ranks[1]["state"])
    # one process with both ranks' batches as micro-batches, each loss halved as DDP averages: the same run
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    if method == "srste":
        sparsifier = SRSTE(model, opt, decay=0.01)
    else:
        sparsifier = STE(model, opt, sparsity=0.6, score_options={"lr": 2.0})
    for step in range(1, STEPS + 1):
        for rank in range(WORLD):
            (loss_of(model, *batch(step, seed=rank)) / WORLD).backward()
        sparsifier.step()
        opt.zero_grad()
        assert same(sparsifier.masks(), ranks[0]["history"][step - 1])
    assert same(model.state_dict(), ranks[0]["state"])
    assert not same(ranks[0]["history"][0], ranks[0]["history"][-1])  # the masks moved


def test_ddp_diverged_weights_raise_on_every_rank_and_change_nothing(ddp_runs):
    for run in ddp_runs:
        error = run["srste"]["error"]
        assert error is not None and error.startswith("SRSTE.step: the new masks of rank 1 differ from rank 0's")
        assert run["srste"]["unchanged"]


# -- bad input ---------------------------------------------------------------------------------------------------
def test_refuses_sparse_linear_layers():
    for cls, kwargs, export in ((SRSTE, {}, "sparsify_semi24"), (STE, {}, "to_sparse_linear")):
        model = mlp()
        sparsify(model, 0.5, layout="sparse")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=rf"{cls.__name__}: 0.weight is a SparseLinear \(layout='sparse'\).*"
                           rf"dense latent weight.*finalize\(\).*{export}"):  # fmt: skip
            cls(model, opt, **kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m, o: SRSTE(m, o, n=4, m=4), ValueError, r"SRSTE: need 0 < n < m \(keep n of every m\), got n=4"),
        (lambda m, o: SRSTE(m, o, n=0), ValueError, r"SRSTE: need 0 < n < m"),
        (lambda m, o: SRSTE(m, o, m=4.0), TypeError, r"SRSTE: m must be an int, got 4.0"),
        (lambda m, o: SRSTE(m, o, decay=-1.0), ValueError, r"SRSTE: decay must be a finite number >= 0, got -1.0"),
        (
            lambda m, o: SRSTE(m, o, m=8),
            ValueError,
            r"SRSTE: 0.weight has 12 inputs \(dim 1 of shape \(16, 12\)\), "
            r"not a multiple of m=8; leave it dense",
        ),  # fmt: skip
        (lambda m, o: SRSTE(m, o, n=1, m=16, exclude="0"), ValueError, r"SRSTE: 4.weight has 8 inputs.*m=16"),
        (lambda m, o: STE(m, o), ValueError, r"STE: a dense model needs sparsity="),
        (lambda m, o: STE(m, o, sparsity=1.0), ValueError, r"STE: sparsity must be a number in \[0, 1\), got 1.0"),
        (lambda m, o: STE(m, o, sparsity=0.5, distribution="global"), ValueError, r"STE: distribution must be one"),
        (lambda m, o: STE(m, o, sparsity=0.5, score_init="zeros"), ValueError, r"STE: score_init must be one of"),
        (lambda m, o: STE(m, o, sparsity=0.5, seed=1.5), TypeError, r"STE: seed must be an int"),
        (lambda m, o: STE(m, o, sparsity=0.5, rescale=1), TypeError, r"STE: rescale must be a bool, got 1"),
        (lambda m, o: STE(m, o, sparsity=0.5, score_options={"params": []}), TypeError, r"STE: score_options must"),
        (
            lambda m, o: STE(m, torch.optim.SGD(m[0].parameters(), lr=0.1), sparsity=0.5),
            ValueError,
            r"STE: the optimizer does not hold a sparse parameter",
        ),  # fmt: skip
        (lambda m, o: STE(m, o, sparsity=0.5, include="nothing*"), ValueError, r"STE: include pattern 'nothing\*'"),
    ],
)
def test_bad_arguments(make, error, match):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        make(model, opt)
    assert same(model.state_dict(), state) and len(opt.param_groups) == 1  # refused before anything changed


def test_bad_arguments_on_masked_models():
    model = mlp()
    sparsify(model, 0.5, layout="masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"STE: the model is sparsified already.*pass sparsity only with a dense"):
        STE(model, opt, sparsity=0.5)
    with pytest.raises(ValueError, match=r"SRSTE: include/exclude choose the layers of a dense model"):
        SRSTE(model, opt, exclude="0")
    STE(model, opt)
    with pytest.raises(ValueError, match=r"SRSTE: 0.weight already has a learned mask \(finalize\(\) the other"):
        SRSTE(model, opt)
    other = mlp()
    ste = STE(other, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5)
    with pytest.raises(ValueError, match=r"STE.load_state_dict: expected the state of a STE, got 'SRSTE'"):
        ste.load_state_dict({"kind": "SRSTE"})


def test_non_finite_scores_are_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ste = STE(model, opt, sparsity=0.5)
    with torch.no_grad():
        model[2].weight_scores[0, 0] = float("inf")
    with pytest.raises(ValueError, match="STE: the scores of weight contains inf"):
        model(batch(1)[0])
    assert model[2].weight.__class__ is nn.Parameter  # the forward put the Parameters back
    assert ste.steps == 0


class Encoder(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.layer(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("method", ["srste", "ste"])
def test_weights_read_by_attention_and_fused_encoder_are_masked(method):
    """out_proj's weight is read by MultiheadAttention's forward, linear1/linear2's by the encoder's fused eval path:
    they are masked too (hooks on those readers), in training and in the no-grad eval fast path."""
    model = Encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = SRSTE(model, opt) if method == "srste" else STE(model, opt, sparsity=0.5)
    names = set(sparsifier.masks())
    assert {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "layer.linear1.weight",
            "attn.out_proj.weight", "head.weight"} <= names  # fmt: skip
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    sparsifier.step()
    masks = sparsifier.masks()
    reference = Encoder(seed=1)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("_mask", "_scores"))})
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
        assert all(type(model.get_parameter(name)) is nn.Parameter for name in masks)  # all put back
