"""Layer-wise densities against the formulas, sparsify() layouts and report, SNIP, IMP, bad configurations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear
from sparsekern.training import IMP, SNIP, layer_nnz, snip_scores, sparsify, sparsity_report
from sparsekern.training.drop_grow import as_layer
from sparsekern.training.sparsify import sparse_layers


def erk_formula(shapes, sparsity, kind):
    """ERK/ER by the definition: density_l = ε·raw_l, ε solving Σ density_l·n_l = (1 - s)·Σ n_l, with every layer
    whose density would pass 1 made dense and ε solved again (brute force over the dense set)."""
    numel = [math.prod(s) for s in shapes]
    raw = [sum(s[:2]) / math.prod(s[:2]) if kind == "er" else sum(s) / math.prod(s) for s in shapes]
    total = (1 - sparsity) * sum(numel)
    dense: set[int] = set()
    while True:
        eps = (total - sum(numel[i] for i in dense)) / sum(
            raw[i] * numel[i] for i in range(len(shapes)) if i not in dense
        )
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))], round(total)
        dense |= {i for i in over if raw[i] == max(raw[j] for j in over)}


SHAPES = {
    "mlp": [(256, 64), (256, 256), (10, 256)],
    "convnet": [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 1024)],
    "capacity": [(4, 4), (1000, 1000), (3, 2000)],
}


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.99])
@pytest.mark.parametrize("kind", ["erk", "er"])
@pytest.mark.parametrize("net", list(SHAPES))
def test_er_erk_counts_match_formula(net, kind, sparsity):
    shapes = SHAPES[net]
    counts = layer_nnz(shapes, sparsity, kind)
    densities, total = erk_formula(shapes, sparsity, kind)
    assert sum(counts) == total  # exact overall count
    for count, density, shape in zip(counts, densities, shapes, strict=True):
        numel = math.prod(shape)
        assert 0 <= count <= numel
        assert abs(count - density * numel) < 1 + 1e-9  # largest-remainder rounding moves at most one


def test_capacity_loop_makes_small_layers_dense():
    counts = layer_nnz(SHAPES["capacity"], 0.9, "erk")
    assert counts[0] == 16  # 4x4 would exceed density 1
    assert sum(counts) == round(0.1 * (16 + 10**6 + 6000))


def test_er_and_erk_differ_on_conv_only():
    conv = [(16, 3, 3, 3), (32, 16, 3, 3)]
    assert layer_nnz(conv, 0.9, "er") != layer_nnz(conv, 0.9, "erk")
    assert layer_nnz(SHAPES["mlp"], 0.9, "er") == layer_nnz(SHAPES["mlp"], 0.9, "erk")


def test_uniform_counts_and_dense_first():
    shapes = SHAPES["convnet"]
    assert layer_nnz(shapes, 0.9, "uniform") == [round(0.1 * math.prod(s)) for s in shapes]
    counts = layer_nnz(shapes, 0.9, "uniform", dense=[True, False, False, False])
    assert counts[0] == math.prod(shapes[0]) and counts[1:] == [round(0.1 * math.prod(s)) for s in shapes[1:]]
    for distribution in ("er", "erk"):  # the dense layer is out of the budget (rigl's custom_sparsity_map)
        counts = layer_nnz(shapes, 0.9, distribution, dense=[True, False, False, False])
        assert counts == [math.prod(shapes[0]), *layer_nnz(shapes[1:], 0.9, distribution)]
        assert sum(counts[1:]) == round(0.1 * sum(math.prod(s) for s in shapes[1:]))
    assert layer_nnz(shapes, 0.9, "erk", dense=[True] * 4) == [math.prod(s) for s in shapes]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("layout", ["masked", "sparse"])
def test_dense_first_is_exclude_of_the_first_layer(distribution, layout):
    """google-research/rigl's first layer dense: it is out of the budget, so the other layers get exactly the counts
    of sparsify(exclude=that layer) and together have the target sparsity."""

    def model():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 40), nn.Linear(40, 7))

    first = sparsify(model(), 0.9, distribution=distribution, dense_first=True, layout=layout)
    excluded = sparsify(model(), 0.9, distribution=distribution, exclude="0", layout=layout)
    assert first.layers[0].name == "0.weight" and first.layers[0].nnz == first.layers[0].numel
    assert [(r.name, r.nnz) for r in first.layers[1:]] == [(r.name, r.nnz) for r in excluded.layers]
    assert sum(r.nnz for r in excluded.layers) == round(0.1 * sum(r.numel for r in excluded.layers))


def test_layer_nnz_errors():
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.0"):
        layer_nnz([(4, 4)], 1.0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        layer_nnz([(4, 4)], 0.5, "gaussian")
    with pytest.raises(ValueError, match="shapes must be a non-empty list"):
        layer_nnz([(4,)], 0.5)
    with pytest.raises(ValueError, match=r"dense must have one entry per shape \(1\), got 2"):
        layer_nnz([(4, 4)], 0.5, dense=[True, False])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_sparsify_layouts_and_report(layout):
    net = Net()
    x = torch.randn(2, 3, 6, 6)
    report = sparsify(net, 0.8, layout=layout, generator=torch.Generator().manual_seed(0))
    assert [r.name for r in report.layers] == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert report.nnz == sum(layer_nnz([(8, 3, 3, 3), (32, 128), (10, 32)], 0.8, "erk"))
    assert report.sparsity == pytest.approx(0.8, abs=1e-3)
    assert isinstance(net.conv, nn.Conv2d) and net.conv.weight_mask.dtype == torch.bool  # conv: always masked
    assert isinstance(net.fc1, SparseLinear) == (layout == "sparse")
    assert not isinstance(net.norm, SparseLinear) and not hasattr(net.norm, "weight_mask")
    assert not hasattr(net.emb, "weight_mask")
    assert int((net.conv.weight != 0).sum()) <= report.layers[0].nnz
    assert net(x).shape == (2, 10)
    assert str(report).splitlines()[0].split() == ["weight", "kind", "shape", "nnz", "sparsity", "measured", "layout"]
    assert [(s.name, s.reason) for s in report.skipped] == [("emb.weight", "embedding: never sparsified")]
    assert report.to_dict()["overall"]["nnz"] == report.nnz
    assert sparsity_report(net).to_dict() == report.to_dict()


def test_sparsify_keeps_function_at_the_mask():
    """compressed and masked layouts from the same mask compute the same function."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    b = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    b.load_state_dict(a.state_dict())
    sparsify(a, 0.7, layout="sparse", generator=torch.Generator().manual_seed(1), rescale=True)
    sparsify(b, 0.7, layout="masked", generator=torch.Generator().manual_seed(1), rescale=True)
    x = torch.randn(4, 20)
    torch.testing.assert_close(a(x), b(x))
    nnz = int(b[0].weight_mask.sum())
    kept = b[0].weight[b[0].weight_mask]
    assert kept.abs().max() <= math.sqrt(600 / nnz) / math.sqrt(20) + 1e-6  # rescaled init bound


def test_sparsify_include_exclude_and_scores():
    net = Net()
    report = sparsify(net, 0.5, include="fc*", exclude=["fc2"], layout="masked")
    assert [r.name for r in report.layers] == ["fc1.weight"]
    net = Net()
    scores = {n: torch.arange(m.weight.numel(), dtype=torch.float64).view_as(m.weight)
              for n, m in (("conv.weight", net.conv), ("fc1.weight", net.fc1), ("fc2.weight", net.fc2))}  # fmt: skip
    report = sparsify(net, 0.9, distribution="uniform", scores=scores, layout="masked")
    for r, m in zip(report.layers, (net.conv, net.fc1, net.fc2), strict=True):
        flat = m.weight_mask.flatten()
        assert bool(flat[-r.nnz :].all()) and not bool(flat[: -r.nnz].any())  # the largest scores are kept


def test_sparsify_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        sparsify(Net(), 0.5, layout="dense")
    with pytest.raises(ValueError, match="distribution='global' needs scores="):
        sparsify(Net(), 0.5, distribution="global")
    with pytest.raises(ValueError, match="include pattern 'decoder' matches no"):
        sparsify(Net(), 0.5, include="decoder")
    with pytest.raises(ValueError, match=r"no layer to sparsify \(Linear, Conv1d.*left dense: nothing"):
        sparsify(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        sparsify(Net(), -0.1)
    with pytest.raises(ValueError, match=r"scores has no entry for 'conv.weight'"):
        sparsify(Net(), 0.5, scores={})
    with pytest.raises(ValueError, match=r"scores\['conv.weight'\] must have the weight's shape"):
        net = Net()
        sparsify(net, 0.5, include="conv", scores={"conv.weight": torch.ones(3)})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsify("model", 0.5)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        sparsify(Net(), 0.5, rescale="yes")


def test_snip_global_top_saliency():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    grads = torch.autograd.grad(loss(model), [model[0].weight, model[2].weight])
    saliency = torch.cat([(g * v).abs().flatten() for g, v in zip(grads, w, strict=True)])
    keep = round(0.2 * saliency.numel())
    expected = torch.zeros_like(saliency, dtype=torch.bool)
    expected[torch.sort(saliency.double(), descending=True, stable=True).indices[:keep]] = True

    scores = snip_scores(model, loss)
    assert model[0].weight.grad is None  # gradients untouched
    report = sparsify(model, 0.8, distribution="global", scores=scores)
    got = torch.cat([model[0].mask.flatten(), model[2].mask.flatten()])
    assert torch.equal(got, expected) and report.nnz == keep
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snip = SNIP(model, opt)
    before = snip.masks()
    for _ in range(3):
        loss(model).backward()
        assert not snip.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in snip.masks().items())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        snip_scores(nn.Linear(2, 2), 3)


def _train(model, sparsifier, opt, steps, gen):
    for _ in range(steps):
        x = torch.randn(16, 12, generator=gen)
        nn.functional.mse_loss(model(x), x[:, :4]).backward()
        sparsifier.step()
        opt.zero_grad()


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("layout", ["masked", "sparse"])
def test_imp_rounds_prune_and_rewind(scope, layout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    imp = IMP(model, 0.8, prune_fraction=0.5, scope=scope, rewind_step=2, layout=layout)
    assert imp.rounds == 4  # 256 -> 128 -> 64 -> 51 (the target)
    gen = torch.Generator().manual_seed(0)
    rewind_point = None
    for r in range(imp.rounds):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sparsifier = imp.start_round(opt)
        _train(model, sparsifier, opt, 2, gen)
        if r == 0:
            rewind_point = [m.dense_weight().detach().clone() if layout == "sparse" else m.weight.detach().clone()
                            for m in (model[0], model[2])]  # fmt: skip
            bias_point = model[0].bias.detach().clone()
        _train(model, sparsifier, opt, 3, gen)
        trained = [as_dense(m).abs() for m in (model[0], model[2])]
        previous = [mask_of(m).clone() for m in (model[0], model[2])]
        row = imp.end_round(loss=float(r))
        assert row.metrics == {"loss": float(r)}
        if r + 1 < imp.rounds:
            masks = [mask_of(m) for m in (model[0], model[2])]
            # survivors are the largest trained |w| (within each layer, or over all layers) ...
            groups = list(zip(trained, previous, masks, strict=True))
            if scope == "global":
                groups = [tuple(torch.cat([g[i].flatten() for g in groups]) for i in range(3))]
            for t, before, after in groups:
                assert bool((before | ~after).all())  # pruning only removes
                assert float(t[after].min()) >= float(t[before & ~after].max())
            # ... rewound to their values at step 2 of round 0, with everything else rewound too
            for point, m, layer in zip(rewind_point, masks, (model[0], model[2]), strict=True):
                assert torch.equal(as_dense(layer), point * m)
            assert torch.equal(model[0].bias.detach(), bias_point)
    sparsities = [row.report.sparsity for row in imp.history]
    assert sparsities[0] == 0 and sparsities == sorted(sparsities)
    assert imp.history[-1].report.nnz == round(0.2 * 256)
    # each prune keeps round(0.5 * count), down to the layers' round(0.2 * numel): 38 + 13
    assert [row.report.nnz for row in imp.history] == [256, 128, 64, 51]
    if scope == "layer":
        assert [[r.nnz for r in row.report.layers] for row in imp.history] == [[192, 64], [96, 32], [48, 16], [38, 13]]
    assert [row["round"] for row in imp.report()] == [0, 1, 2, 3]
    last = imp.report()[3]
    assert last["sparsity"] == 1 - 51 / 256 and last["metrics"] == {"loss": 3.0}
    overall = {"nnz": 51, "numel": 256, "sparsity": 1 - 51 / 256, "zeros": 205, "measured_sparsity": 205 / 256}
    assert last["overall"] == overall  # the zeros measured in the weights are the mask's
    assert [(r["name"], r["layout"]) for r in last["layers"]] == [("0.weight", layout), ("2.weight", layout)]
    assert sum(r["nnz"] for r in last["layers"]) == 51
    assert not torch.equal(model[0].bias.detach(), init["0.bias"])  # rewind point is step 2, not init
    with pytest.raises(ValueError, match="all 4 rounds are done"):
        imp.start_round(torch.optim.SGD(model.parameters(), lr=0.1))


def as_dense(m):
    return m.dense_weight().detach() if isinstance(m, SparseLinear) else m.weight.detach()


def mask_of(m):
    return m.mask if isinstance(m, SparseLinear) else m.weight_mask


@pytest.mark.parametrize("control", ["reinit_pipeline", "random_pipeline"])
def test_imp_controls(control):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    init = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    imp = IMP(model, 0.5, prune_fraction=0.5, control=control, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = imp.start_round(opt)
    gen = torch.Generator().manual_seed(0)
    _train(model, sparsifier, opt, 3, gen)
    trained = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    imp.end_round()
    flat = torch.cat([w.abs().flatten() for w in trained])
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[torch.sort(flat.double(), descending=True, stable=True).indices[:128]] = True
    magnitude = [top[: trained[0].numel()].view_as(trained[0]), top[trained[0].numel() :].view_as(trained[1])]
    masks = [model[0].weight_mask, model[2].weight_mask]
    assert [int(m.sum()) for m in masks] == [int(m.sum()) for m in magnitude]  # each layer's count is kept
    same = all(torch.equal(a, b) for a, b in zip(masks, magnitude, strict=True))
    assert same == (control == "reinit_pipeline")  # reinit keeps the magnitude mask, random_mask places it at random
    for layer, w0 in zip((model[0], model[2]), init, strict=True):
        mask = layer.weight_mask
        if control == "reinit_pipeline":
            assert not torch.equal(layer.weight.detach(), w0 * mask)
            bound = 1 / math.sqrt(layer.weight.shape[1])
            assert float(layer.weight.detach().abs().max()) <= bound
        else:
            assert torch.equal(layer.weight.detach(), w0 * mask)
    counts = [int(model[0].weight_mask.sum()), int(model[2].weight_mask.sum())]
    assert sum(counts) == 128


def test_imp_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"sparsity must be a number in \(0, 1\), got 1"):
        IMP(model, 1)
    with pytest.raises(ValueError, match=r"prune_fraction must be a number in \(0, 1\)"):
        IMP(model, 0.5, prune_fraction=0)
    with pytest.raises(ValueError, match="scope must be one of"):
        IMP(model, 0.5, scope="row")
    with pytest.raises(ValueError, match="control must be one of"):
        IMP(model, 0.5, control="shuffle")
    with pytest.raises(ValueError, match="rewind_step must be an int >= 0"):
        IMP(model, 0.5, rewind_step=-1)
    imp = IMP(nn.Sequential(nn.Linear(4, 4)), 0.5, rewind_step=100)
    with pytest.raises(ValueError, match="no round started"):
        imp.end_round()
    imp.start_round(torch.optim.SGD(imp.model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="round already started"):
        imp.start_round(torch.optim.SGD(imp.model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="round 0 ended before step rewind_step=100"):
        imp.end_round()


def test_exports():
    for name in ("sparsify", "sparsity_report", "snip_scores", "RigL", "SET", "SNIP", "Static", "IMP", "drop_and_grow"):
        assert getattr(sparsekern, name) is getattr(sparsekern.training, name)


def test_compress_masked_linear_layers():
    torch.manual_seed(0)
    net = Net()
    sparsify(net, 0.7, layout="masked")
    x = torch.randn(2, 3, 6, 6)
    net.eval()
    expected = net(x)
    masks = {"fc1.weight": net.fc1.weight_mask.clone(), "fc2.weight": net.fc2.weight_mask.clone()}
    report = sparsekern.training.to_sparse_linear(net)
    assert isinstance(net.fc1, SparseLinear) and isinstance(net.fc2, SparseLinear)
    assert isinstance(net.conv, nn.Conv2d) and [r.layout for r in report.layers] == [
        "masked",
        "sparse",
        "sparse",
    ]
    assert torch.equal(net.fc1.mask, masks["fc1.weight"]) and torch.equal(net.fc2.mask, masks["fc2.weight"])
    torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="no masked nn.Linear"):
        sparsekern.training.to_sparse_linear(nn.Sequential(nn.Linear(2, 2)))


# -- shared modules, tied weights, what is left dense -------------------------------------------------------------


class Twice(nn.Module):
    """One nn.Linear used at two positions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        shared = nn.Linear(8, 8)
        self.a, self.b = shared, shared
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(self.inp(x))))))


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_module_used_twice_is_converted_once_and_installed_everywhere(layout):
    torch.manual_seed(0)
    net = Twice()
    old = net.a
    x = torch.randn(5, 6)
    report = sparsify(net, 0.5, layout=layout, rescale=True, generator=torch.Generator().manual_seed(0))
    assert [r.name for r in report.layers] == ["inp.weight", "a.weight", "out.weight"]
    assert net.a is net.b  # the same (new) module at both positions, one mask
    assert isinstance(net.a, SparseLinear) == (layout == "sparse")
    masked = nn.Linear(8, 8)  # the function: the old weights, rescaled once, at the one mask
    mask = net.a.mask if layout == "sparse" else net.a.weight_mask
    with torch.no_grad():
        masked.weight.copy_(old.weight * mask if layout == "masked" else net.a.dense_weight())
        masked.bias.copy_(old.bias)
    nnz = int(mask.sum())
    kept = masked.weight.detach()[mask]
    assert float(kept.abs().max()) <= math.sqrt(64 / nnz) / math.sqrt(8) + 1e-6  # rescaled once, not twice
    assert float(kept.abs().max()) > 1 / math.sqrt(8)  # ... but rescaled
    h = net.inp(x)
    torch.testing.assert_close(net(x), net.out(torch.relu(masked(torch.relu(masked(h))))))
    if layout == "masked":
        sparsekern.training.to_sparse_linear(net)
        assert isinstance(net.a, SparseLinear) and net.a is net.b


def test_rigl_grows_a_module_used_twice_from_both_uses():
    """The compressed layer records x and g at both positions; their concatenation scores the summed gradient,
    which is what the masked layer's dense gradient holds: both layouts move the same connections."""
    masks = []
    for layout in ("sparse", "masked"):
        torch.manual_seed(0)
        net = Twice()
        sparsify(net, 0.5, layout=layout, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        rigl = sparsekern.RigL(net, opt, total_steps=10, delta_t=2)
        before = rigl.masks()
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            net(torch.randn(4, 6, generator=gen)).square().mean().backward()
            rigl.step()
            opt.zero_grad()
        masks.append(rigl.masks())
        assert not torch.equal(masks[-1]["a.weight"], before["a.weight"]) and net.a is net.b
    assert all(torch.equal(masks[0][name], masks[1][name]) for name in masks[0])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_tied_weights_stay_dense_and_tied(layout):
    net = Tied()
    before = net.a.weight.detach().clone()
    report = sparsify(net, 0.5, layout=layout, rescale=True)
    assert [r.name for r in report.layers] == ["c.weight"]
    assert net.a.weight is net.b.weight and type(net.a) is nn.Linear and type(net.b) is nn.Linear
    assert torch.equal(net.a.weight.detach(), before)  # untouched: not masked, not rescaled
    assert not hasattr(net.a, "weight_mask") and not hasattr(net.b, "weight_mask")
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("a.weight", "tied: the same Parameter as b.weight; left dense and tied")
    ]
    assert "a.weight  Linear  8x8    tied: the same Parameter as b.weight" in str(report)
    assert report.coverage == 32 / (32 + 64)
    assert sparsity_report(net).skipped == report.skipped
    with pytest.raises(ValueError, match=r"no layer to sparsify .*left dense: a.weight: tied: the same Parameter"):
        sparsify(Tied(), 0.5, include=["a", "b"])


class Zoo(nn.Module):
    """A weight matrix of every kind sparsify leaves dense, beside one it sparsifies."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.bag = nn.EmbeddingBag(10, 6)
        self.lstm = nn.LSTM(6, 4)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.pos = nn.Parameter(torch.zeros(1, 5, 6))
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)


def test_every_dense_weight_matrix_is_reported_with_its_reason():
    net = Zoo()
    report = sparsify(net, 0.5, exclude="head", layout="masked")
    assert [r.name for r in report.layers] == ["fc.weight"]
    assert {s.name: s.reason for s in report.skipped} == {
        "pos": "Zoo.pos is not the weight of a supported layer (Linear, Conv1d, Conv2d, transformers' Conv1D, "
        "MultiheadAttention's projections)",
        "emb.weight": "embedding: never sparsified",
        "bag.weight": "embedding: never sparsified",
        "lstm.weight_ih_l0": "LSTM weights: recurrent layers are not supported",
        "lstm.weight_hh_l0": "LSTM weights: recurrent layers are not supported",
        "conv3.weight": "Conv3d.weight is not the weight of a supported layer (Linear, Conv1d, Conv2d, transformers' "
        "Conv1D, MultiheadAttention's projections)",
        "head.weight": "not selected by include/exclude",
    }
    assert {s.name: s.kind for s in report.skipped}["lstm.weight_ih_l0"] == "LSTM"
    assert sparsity_report(net).to_dict()["skipped"][-1] == {
        "name": "head.weight",
        "kind": "Linear",
        "shape": [6, 6],
        "numel": 36,
        "reason": "supported, not sparsified",
    }
    dense = 5 * 6 + 10 * 6 + 10 * 6 + 16 * 6 + 16 * 4 + 2 * 8 + 6 * 6  # pos, emb, bag, lstm ih/hh, conv3, head
    assert sum(s.numel for s in report.skipped) == dense
    assert report.coverage == 36 / (36 + dense)
    assert f"left dense: 7 weight matrices, {dense} elements ({1 - report.coverage:.1%}" in str(report)


@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention_projections_are_masked(kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
    names = ["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    dense = {n: getattr(mha, n).detach().clone() for n in names}
    report = sparsify(mha, 0.5, distribution="uniform", generator=torch.Generator().manual_seed(1))
    assert [(r.name, r.kind, r.layout) for r in report.layers] == [
        *((n, "MultiheadAttention", "masked") for n in names),
        ("out_proj.weight", "NonDynamicallyQuantizableLinear", "masked"),  # torch reads out_proj.weight directly
    ]
    for n in names:
        mask = getattr(mha, f"{n}_mask")
        assert mask.dtype == torch.bool and int(mask.sum()) == mask.numel() // 2
        assert torch.equal(getattr(mha, n).detach(), dense[n] * mask)
    assert f"{names[0]}_mask" in mha.state_dict()
    assert report.skipped == ()
    q, k = torch.randn(2, 3, 8), torch.randn(2, 4, kdim or 8)
    out, _ = mha(q, k, k)
    # the masked projection against the plain functional attention with the masked weights
    assert out.shape == (2, 3, 8)
    assert list(sparse_layers(mha)) == [*names, "out_proj.weight"]


def test_static_and_rigl_keep_and_move_the_in_proj_mask():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    sparsify(model, 0.7, layout="masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = sparsekern.RigL(model, opt, total_steps=10, delta_t=2)
    assert "self_attn.in_proj_weight" in rigl.masks()
    before = model.self_attn.in_proj_weight_mask.clone()
    for _ in range(2):
        model(torch.randn(4, 5, 8)).square().mean().backward()
        rigl.step()
        opt.zero_grad()
    after = model.self_attn.in_proj_weight_mask
    assert int(after.sum()) == int(before.sum()) and not torch.equal(after, before)  # moved, count kept
    w = model.self_attn.in_proj_weight.detach()
    assert not bool(w[~after].any())  # zero off the new mask
    report = sparsity_report(model)
    assert all(r.zeros == r.numel - r.nnz + int((as_dense_of(model, r.name)[mask_by_name(model, r.name)] == 0).sum())
               for r in report.layers)  # fmt: skip
    assert all(r.off_mask == 0 for r in report.layers)


def as_dense_of(model, name):
    module_name, _, param = name.rpartition(".")
    return getattr(model.get_submodule(module_name), param).detach()


def mask_by_name(model, name):
    module_name, _, param = name.rpartition(".")
    return getattr(model.get_submodule(module_name), f"{param}_mask")


# -- measured zeros and keep_masks under a plain optimizer loop ---------------------------------------------------


def _plain_steps(model, opt, steps=3):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), torch.optim.AdamW])
def test_report_measures_zeros_and_keep_masks_keeps_them(make_opt):
    torch.manual_seed(0)
    net = Net()
    report = sparsify(net, 0.8, layout="masked")
    assert [r.zeros for r in report.layers] == [r.numel - r.nnz for r in report.layers]
    assert [r.off_mask for r in report.layers] == [0, 0, 0]
    assert report.measured_sparsity == report.sparsity and "warning" not in str(report)
    opt = make_opt(net.parameters())
    _plain_steps(net, opt)  # a plain loop (what HF Trainer runs): the masked weights fill in
    drifted = sparsity_report(net)
    assert drifted.sparsity == report.sparsity  # the masks did not change ...
    assert drifted.measured_sparsity < 0.1  # ... but the weights are nearly dense again
    assert all(r.off_mask > (r.numel - r.nnz) // 2 for r in drifted.layers)
    assert all(r.zeros == r.numel - r.nnz - r.off_mask for r in drifted.layers)  # no kept weight is 0
    assert "warning: " in str(drifted) and "keep_masks(model, optimizer)" in str(drifted)
    assert drifted.to_dict()["layers"][1]["off_mask"] == drifted.layers[1].off_mask

    torch.manual_seed(0)
    net = Net()
    sparsify(net, 0.8, layout="masked")
    masks = {n: m.clone() for n, m in sparse_layers(net).items() for m in [m.weight_mask]}
    opt = make_opt(net.parameters())
    handle = sparsekern.training.keep_masks(net, opt)
    _plain_steps(net, opt)
    kept = sparsity_report(net)
    assert all(r.off_mask == 0 for r in kept.layers)
    assert kept.measured_sparsity == pytest.approx(kept.sparsity, abs=1e-12)
    layers = sparse_layers(net)
    assert all(torch.equal(layers[n].weight_mask, m) for n, m in masks.items())
    for state in opt.state.values():  # optimizer state off the mask stays 0: gradients were masked before the step
        for key in ("momentum_buffer", "exp_avg"):
            if key in state and state[key].shape == net.fc1.weight.shape:
                assert not bool(state[key][~net.fc1.weight_mask].any())
    handle.remove()
    _plain_steps(net, opt, 1)
    assert all(r.off_mask > 0 for r in sparsity_report(net).layers)


def test_keep_masks_follows_mask_updates_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify(model, 0.7, layout="masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsekern.training.keep_masks(model, opt)
    layer = as_layer(model[0])
    gen = torch.Generator().manual_seed(0)
    sparsekern.drop_and_grow(model[0], 20, grow="random", generator=gen, optimizer=opt)
    new = model[0].weight_mask.clone()
    nn.functional.mse_loss(model(torch.randn(4, 12)), torch.randn(4, 4)).backward()
    opt.step()
    assert torch.equal(layer.mask(), new) and not bool(model[0].weight.detach()[~new].any())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got str"):
        sparsekern.training.keep_masks(model, "sgd")
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        sparsekern.training.keep_masks(3, opt)
    with pytest.raises(ValueError, match="no masked layer of the model is trained by this optimizer"):
        sparsekern.training.keep_masks(model, torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))
    compressed = nn.Sequential(nn.Linear(4, 4))
    sparsify(compressed, 0.5)
    with pytest.raises(ValueError, match="SparseLinear layers need no hook"):
        sparsekern.training.keep_masks(compressed, torch.optim.SGD(compressed.parameters(), lr=0.1))


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_generator_decides_the_masks_and_leaves_the_global_rng_alone(layout):
    def masks(global_seed, seed):
        torch.manual_seed(global_seed)
        model = Net()
        state = torch.get_rng_state()
        sparsify(model, 0.8, layout=layout, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global generator
        return [m.mask if isinstance(m, SparseLinear) else m.weight_mask
                for m in sparse_layers(model).values()]  # fmt: skip

    first, again, other = masks(0, 5), masks(1, 5), masks(0, 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same generator seed, same masks
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_imp_state_keeps_the_dense_weights_of_its_reports(tmp_path):
    """A resumed IMP reports what the run that did not stop reports, the weights left dense included."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
        return model, IMP(model, 0.5, prune_fraction=0.5)

    model, imp = build()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = imp.start_round(opt)
    for _ in range(2):
        model(torch.randint(0, 10, (4, 5), generator=gen)).square().mean().backward()
        sparsifier.step()
        opt.zero_grad()
    imp.end_round()
    assert [s.name for s in imp.history[0].report.skipped] == ["0.weight"]
    assert imp.history[0].report.layers[0].name == "1.self_attn.in_proj_weight"
    torch.save({"model": model.state_dict(), "imp": imp.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt")  # weights_only: plain data
    again, resumed = build()
    again.load_state_dict(state["model"])
    resumed.load_state_dict(state["imp"])
    assert resumed.report() == imp.report() and resumed.history == imp.history
    old = {
        **state["imp"],
        "history": [{k: v for k, v in row.items() if k != "skipped"} for row in state["imp"]["history"]],
    }
    resumed.load_state_dict(old)  # a state saved before reports listed dense weights still loads
    assert resumed.history[0].report.skipped == () and resumed.history[0].report.layers == imp.history[0].report.layers


def test_old_names_of_the_sparse_layout_still_work_with_a_warning():
    net = nn.Sequential(nn.Linear(6, 5))
    with pytest.warns(FutureWarning, match="layout='compressed' is now called 'sparse'"):
        report = sparsify(net, 0.5, layout="compressed")
    assert isinstance(net[0], sparsekern.nn.SparseLinear) and report.layers[0].layout == "sparse"
    masked = nn.Sequential(nn.Linear(6, 5))
    sparsify(masked, 0.5, layout="masked")
    with pytest.warns(FutureWarning, match="now called to_sparse_linear"):
        sparsekern.training.compress(masked)
    assert isinstance(masked[0], sparsekern.nn.SparseLinear)
    with pytest.raises(ValueError, match="layout must be one of"):
        sparsify(nn.Sequential(nn.Linear(6, 5)), 0.5, layout="packed")
