"""GraSP and SynFlow: the Hessian-gradient product against torch.autograd.functional.hvp, the selections against
plain-PyTorch re-statements of the official code (exact masks), SynFlow's round schedule, the model left as it was,
the fixed-mask sparsifiers' resume, two ranks under gloo, bad arguments."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from helpers import assert_bits_equal, gloo_rank, rank_results
from torch import nn

import sparsekern
from sparsekern.training import GraSP, SynFlow, grasp_scores, sparsify, synflow_scores
from sparsekern.training.drop_grow import as_layer
from sparsekern.training.prune_init import _round_counts
from sparsekern.training.sparsify import sparse_layers


def mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 11), nn.ReLU(), nn.Linear(11, 5)).to(dtype)


def cnn(dtype=torch.float32):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    ).to(dtype)
    with torch.no_grad():  # BatchNorm with statistics and an affine part that are not the defaults
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    return model


MODELS = {"mlp": (mlp, (7,)), "cnn": (cnn, (2, 7, 7))}


def batches(shape, n_batches, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6 + i, *shape, generator=gen, dtype=dtype), torch.randint(0, 5, (6 + i,), generator=gen))
        for i in range(n_batches)
    ]


def targets(model):
    """{sparsify's weight name: Parameter} of the layers GraSP and SynFlow score (Linear and Conv2d here)."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
    )


def assert_same_model(before, after):
    assert before[0].keys() == after[0].keys()
    for key in before[0]:
        assert_bits_equal(after[0][key], before[0][key])
    assert before[1] == after[1]
    for (req_a, grad_a), (req_b, grad_b) in zip(before[2], after[2], strict=True):
        assert req_a == req_b and (grad_a is None) == (grad_b is None)
        if grad_a is not None:
            assert_bits_equal(grad_b, grad_a)


def kept_masks(model):
    return {name: as_layer(m).mask().clone() for name, m in sparse_layers(model).items()}


def top_masks(scores: dict, count: int) -> dict:
    """The project's global selection re-stated: the ``count`` highest scores, ties to the lower flat index."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    out, start = {}, 0
    for key, s in scores.items():
        out[key] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


class Pair(nn.Module):
    """A model whose output is not a tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 5)

    def forward(self, x):
        return self.fc(x), x


# -- GraSP ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [200.0, 1.0])
@pytest.mark.parametrize("arch", MODELS)
def test_grasp_hessian_gradient_is_hvp(arch, temperature):
    make, shape = MODELS[arch]
    torch.manual_seed(0)
    model = make(torch.float64)
    data = batches(shape, 2, torch.float64)
    before = snapshot(model)
    scores = grasp_scores(model, data, temperature=temperature)
    assert_same_model(before, snapshot(model))  # BatchNorm's statistics put back, gradients untouched

    # H g of the total loss, g its gradient: what the paper defines (the sums over batches distribute).
    reference = copy.deepcopy(model)
    weights = targets(reference)

    def loss(*ws):
        params = dict(zip(weights, ws, strict=True))
        return sum(
            nn.functional.cross_entropy(torch.func.functional_call(reference, params, (x,)) / temperature, y)
            for x, y in data
        )

    ws = tuple(w.detach() for w in weights.values())
    g = torch.autograd.grad(loss(*(w.requires_grad_() for w in ws)), ws)
    _, hg = torch.autograd.functional.hvp(loss, tuple(w.detach() for w in ws), g)
    assert scores.keys() == weights.keys()
    for (key, w), h in zip(weights.items(), hg, strict=True):
        expected = w.detach() * h
        scale = float(expected.abs().max())
        assert scale > 0
        torch.testing.assert_close(scores[key], expected, rtol=1e-9, atol=1e-12 * scale)


def official_grasp(model, data, temperature):
    """The paper's S = -θ ⊙ Hg as alecwangcq/GraSP computes it: g summed over the batches (.data: a constant), then
    z = Σ_layers (g ⊙ ∇L_b).sum() backpropagated per batch into the weights' .grad, on a copy of the model."""
    net = copy.deepcopy(model)
    weights = targets(net)
    g = None
    for x, y in data:
        grads = torch.autograd.grad(nn.functional.cross_entropy(net(x) / temperature, y), list(weights.values()))
        g = list(grads) if g is None else [a + b for a, b in zip(g, grads, strict=True)]
    for x, y in data:
        grad_f = torch.autograd.grad(
            nn.functional.cross_entropy(net(x) / temperature, y), list(weights.values()), create_graph=True
        )
        z = 0
        for gi, fi in zip(g, grad_f, strict=True):
            z += (gi.data * fi).sum()
        z.backward()
    return {key: -w.data * w.grad for key, w in weights.items()}


@pytest.mark.parametrize("layout", ["sparse", "masked"])
@pytest.mark.parametrize("arch", MODELS)
def test_grasp_selection_is_the_papers_rule(arch, layout):
    make, shape = MODELS[arch]
    torch.manual_seed(2)
    model = make()
    data = batches(shape, 2)
    S = official_grasp(model, data, 200.0)
    scores = grasp_scores(model, data)
    for key in S:
        assert_bits_equal(scores[key], -S[key])  # the kept set is the top of -S, i.e. GraSP prunes the top of S
    # Keep the N - n_prune lowest S (ties: lower flat index)
    n = sum(s.numel() for s in S.values())
    keep = round(0.3 * n)
    expected = top_masks({k: -s for k, s in S.items()}, keep)
    report = sparsify(model, 0.7, distribution="global", scores=scores, layout=layout)
    assert report.nnz == keep
    got = kept_masks(model)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_grasp_callable_and_temperature_hook():
    torch.manual_seed(3)
    model = mlp()
    (x, y), (x2, y2) = batches((7,), 2)
    one = grasp_scores(model, lambda m: nn.functional.cross_entropy(m(x), y), temperature=3.0)
    both = grasp_scores(model, [(x, y)], temperature=3.0)
    for key in one:
        assert_bits_equal(one[key], both[key])
    mixed = grasp_scores(model, [lambda m: nn.functional.cross_entropy(m(x), y), (x2, y2)], temperature=3.0)
    pairs = grasp_scores(model, [(x, y), (x2, y2)], temperature=3.0)
    for key in one:
        assert_bits_equal(mixed[key], pairs[key])
    assert len(model._forward_hooks) == 0  # the temperature hook is removed

    with pytest.raises(TypeError, match=r"temperature=200 divides the model's output, which must then be a tensor"):
        grasp_scores(Pair(), lambda m: m(x)[0].sum())
    pair = Pair()
    scores = grasp_scores(pair, lambda m: nn.functional.cross_entropy(m(x)[0], y), temperature=1)
    assert scores["fc.weight"].shape == (5, 7) and len(pair._forward_hooks) == 0


def test_grasp_include_exclude_and_unused_weights():
    torch.manual_seed(4)
    model = cnn()
    data = batches((2, 7, 7), 1)
    scores = grasp_scores(model, data, exclude="5")
    assert sorted(scores) == ["0.weight", "3.weight"]
    # a weight the loss does not reach scores 0
    scores = grasp_scores(model, lambda m: m[0](data[0][0]).square().mean())
    assert torch.equal(scores["5.weight"], torch.zeros(5, 48))


def test_grasp_errors():
    model = mlp()
    (x, y) = batches((7,), 1)[0]
    with pytest.raises(TypeError, match="loss_fn must be callable as loss_fn"):
        grasp_scores(model, 3)
    with pytest.raises(TypeError, match="loss_fn must be callable as loss_fn"):
        grasp_scores(model, "batches")
    with pytest.raises(ValueError, match="loss_fn is an empty list of batches"):
        grasp_scores(model, [])
    with pytest.raises(TypeError, match=r"loss_fn\[1\] must be a callable loss_fn\(model\) or an \(inputs, targets\)"):
        grasp_scores(model, [(x, y), (x,)])
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        grasp_scores(model, lambda m: m(x))
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        grasp_scores(model, [(x, y)], temperature=0)
    with pytest.raises(TypeError, match="temperature must be a positive number, got 'hot'"):
        grasp_scores(model, [(x, y)], temperature="hot")
    with pytest.raises(ValueError, match="grasp_scores: no weight to score"):
        grasp_scores(nn.Sequential(nn.ReLU()), lambda m: torch.zeros(()))
    with pytest.raises(TypeError, match="grasp_scores: model must be an nn.Module"):
        grasp_scores("model", [(x, y)])
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['2.weight'\] do not require grad; GraSP differentiates the loss twice"):
        grasp_scores(model, [(x, y)])
    assert sorted(grasp_scores(model, [(x, y)], exclude="2")) == ["0.weight", "4.weight"]
    model[2].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="Hessian-gradient product of '0.weight' holds inf or NaN"):
        grasp_scores(model, lambda m: m(x).sum() * float("nan"), temperature=1)


# -- SynFlow --------------------------------------------------------------------------------------------------------


def official_synflow(model, shape, sparsity, rounds):
    """ganguli-lab/Synaptic-Flow re-stated: a float64 copy in eval mode with |·| of every parameter and buffer;
    each round R = sum(model(ones)), score |θ ⊙ ∂R/∂θ| of the masked weights, keep the round((1-s)^(k/rounds) N)
    highest among the kept (ties: lower flat index)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    weights = targets(net)
    absolute = {k: w.detach().clone() for k, w in weights.items()}
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    n = sum(w.numel() for w in weights.values())
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for key, w in weights.items():
                w.copy_(absolute[key] * masks[key])
        grads = torch.autograd.grad(net(torch.ones(1, *shape, dtype=torch.float64)).sum(), list(weights.values()))
        scores = {key: torch.where(masks[key], (w * g).abs(), -torch.inf)
                  for (key, w), g in zip(weights.items(), grads, strict=True)}  # fmt: skip
        masks = top_masks(scores, round((1 - sparsity) ** (k / rounds) * n))
    return masks


@pytest.mark.parametrize("arch, rounds", [("mlp", 1), ("mlp", 100), ("cnn", 1), ("cnn", 7), ("cnn", 30)])
def test_synflow_selection_is_the_papers_rule(arch, rounds):
    make, shape = MODELS[arch]
    torch.manual_seed(5)
    model = make()
    expected = official_synflow(model, shape, 0.9, rounds)
    before = snapshot(model)
    scores = synflow_scores(model, torch.randn(3, *shape), sparsity=0.9, rounds=rounds)
    assert_same_model(before, snapshot(model))
    report = sparsify(model, 0.9, distribution="global", scores=scores, layout="masked")
    got = kept_masks(model)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
        assert bool((scores[key][~got[key]] == -1).all()) and bool((scores[key][got[key]] >= 0).all())
    assert report.nnz == round(0.1 * sum(s.numel() for s in scores.values()))


def test_synflow_iterative_differs_from_one_shot_and_one_round_is_one_shot():
    torch.manual_seed(6)
    model = mlp()
    one_shot = official_synflow(model, (7,), 0.95, 1)
    one = synflow_scores(model, torch.randn(1, 7), sparsity=0.95, rounds=1)
    many = synflow_scores(model, torch.randn(1, 7), sparsity=0.95)
    assert all(torch.equal(one[k] >= 0, one_shot[k]) for k in one)
    assert any(not torch.equal(one[k] >= 0, many[k] >= 0) for k in one)


@pytest.mark.parametrize("sparsity, rounds", [(0.9, 100), (0.5, 3), (0.0, 4), (0.99, 1), (0.8, 1000)])
def test_synflow_round_counts(sparsity, rounds):
    n = 12345
    counts = _round_counts(n, sparsity, rounds)
    assert counts == [int(round((1 - sparsity) ** (k / rounds) * n)) for k in range(1, rounds + 1)]
    assert counts[-1] == int(round((1 - sparsity) * n))  # sparsify's global count
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_synflow_restores_the_model_and_float64_avoids_overflow():
    torch.manual_seed(7)
    model = cnn()
    model[0].weight.requires_grad_(False)
    model[5].weight.grad = torch.randn(5, 48)
    model.train()
    model[1].eval()
    before = snapshot(model)
    synflow_scores(model, torch.randn(2, 2, 7, 7), sparsity=0.5, rounds=3)
    assert_same_model(before, snapshot(model))

    deep = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    with torch.no_grad():
        for p in deep.parameters():
            p.mul_(1e4)
    with pytest.raises(ValueError, match="hold inf or NaN; use dtype=torch.float64"):
        synflow_scores(deep, torch.randn(1, 64), sparsity=0.5, rounds=2, dtype=torch.float32)
    scores = synflow_scores(deep, torch.randn(1, 64), sparsity=0.5, rounds=2)
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    assert scores["0.weight"].dtype == torch.float64
    assert synflow_scores(mlp(), torch.randn(1, 7), sparsity=0.5, dtype=None)["0.weight"].dtype == torch.float32


def test_synflow_errors():
    model = mlp()
    with pytest.raises(TypeError, match="synflow_scores: model must be an nn.Module"):
        synflow_scores("model", torch.randn(1, 7), sparsity=0.5)
    with pytest.raises(TypeError, match="example_input must be a floating tensor of the model's input shape, got list"):
        synflow_scores(model, [1.0] * 7, sparsity=0.5)
    with pytest.raises(TypeError, match="example_input must be a floating tensor .*, got torch.int64"):
        synflow_scores(model, torch.ones(1, 7, dtype=torch.int64), sparsity=0.5)
    with pytest.raises(ValueError, match="example_input must have a batch dimension first"):
        synflow_scores(model, torch.tensor(1.0), sparsity=0.5)
    with pytest.raises(ValueError, match=r"the model fails on an all-ones input of shape \(1, 6\)"):
        synflow_scores(model, torch.randn(4, 6), sparsity=0.5)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"synflow_scores: sparsity must be a number in \[0, 1\)"):
            synflow_scores(model, torch.randn(1, 7), sparsity=bad)
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        synflow_scores(model, torch.randn(1, 7), sparsity=0.5, rounds=0)
    with pytest.raises(TypeError, match="rounds must be an int, got 2.5"):
        synflow_scores(model, torch.randn(1, 7), sparsity=0.5, rounds=2.5)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype or None"):
        synflow_scores(model, torch.randn(1, 7), sparsity=0.5, dtype=torch.int32)
    with pytest.raises(ValueError, match="synflow_scores: no weight to score"):
        synflow_scores(nn.Sequential(nn.ReLU()), torch.randn(1, 7), sparsity=0.5)
    with pytest.raises(TypeError, match="synflow_scores: the model must return a tensor, got tuple"):
        synflow_scores(Pair(), torch.randn(1, 7), sparsity=0.5)
    with pytest.raises(ValueError, match="include pattern 'nothing' matches no layer"):
        synflow_scores(model, torch.randn(1, 7), sparsity=0.5, include="nothing")


# -- the fixed-mask sparsifiers ---------------------------------------------------------------------------------------

STEPS, STOP = 12, 5


def build(method: str, layout: str, seed: int):
    torch.manual_seed(seed)
    model = mlp()
    if method == "grasp":
        scores = grasp_scores(model, batches((7,), 2, seed=seed))
    else:
        scores = synflow_scores(model, torch.randn(1, 7), sparsity=0.8, rounds=10)
    sparsify(model, 0.8, distribution="global", scores=scores, layout=layout)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, (GraSP if method == "grasp" else SynFlow)(model, opt)


def train(model, opt, sparsifier, gen, steps):
    for _ in range(steps):
        x = torch.randn(8, 7, generator=gen)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).backward()
        assert not sparsifier.step()
        opt.zero_grad()


@pytest.mark.parametrize("layout", ["sparse", "masked"])
@pytest.mark.parametrize("method", ["grasp", "synflow"])
def test_fixed_mask_resume_reproduces_uninterrupted_run(method, layout):
    model, opt, sparsifier = build(method, layout, seed=0)
    assert sparsifier.flops_rule == "sparse"
    masks = sparsifier.masks()
    train(model, opt, sparsifier, torch.Generator().manual_seed(5), STEPS)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(masks[k], v) for k, v in sparsifier.masks().items())  # fixed

    model, opt, sparsifier = build(method, layout, seed=0)
    gen = torch.Generator().manual_seed(5)
    train(model, opt, sparsifier, gen, STOP)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model, opt, sparsifier = build(method, layout, seed=1)  # other weights and masks, all overwritten
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    assert sparsifier.steps == STOP and checkpoint["sparsifier"]["kind"] == type(sparsifier).__name__
    train(model, opt, sparsifier, gen, STEPS - STOP)
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert_bits_equal(got[key], expected[key])
    other = SynFlow if method == "grasp" else GraSP
    with pytest.raises(
        ValueError, match=f"expected the state of a {other.__name__}, got '{type(sparsifier).__name__}'"
    ):
        other(model, opt).load_state_dict(sparsifier.state_dict())


def test_exports():
    for name in ("GraSP", "SynFlow", "grasp_scores", "synflow_scores"):
        assert getattr(sparsekern, name) is getattr(sparsekern.training, name)
        assert name in sparsekern.__all__ and name in sparsekern.training.__all__


# -- two ranks --------------------------------------------------------------------------------------------------------

WORLD = 2


def _worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, _worker_results)


def _worker_results(rank: int) -> dict:
    out = {}
    data = batches((2, 7, 7), 2, seed=10)[rank]  # each rank its own batch
    for layout in ("sparse", "masked"):
        torch.manual_seed(0)
        model = cnn()
        if layout == "sparse":  # SparseLinear replaces the Linear layers: wrap afterwards
            out["scores", layout] = grasp_scores(model, [data], group=dist.group.WORLD)
            sparsify(model, 0.8, distribution="global", scores=out["scores", layout], layout=layout)
            ddp = nn.parallel.DistributedDataParallel(model)
        else:  # the wrapper's group
            ddp = nn.parallel.DistributedDataParallel(model)
            out["scores", layout] = grasp_scores(ddp, [data])
            sparsify(ddp, 0.8, distribution="global", scores=out["scores", layout], layout=layout)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        sparsifier = GraSP(ddp, opt)  # checks the masks across ranks
        nn.functional.cross_entropy(ddp(data[0]), data[1]).backward()
        sparsifier.step()
        out["masks", layout] = sparsifier.masks()
        # the parameters (BatchNorm's running statistics are per rank under DDP)
        out["state", layout] = {k: v.detach().clone() for k, v in model.named_parameters()}
    # Scores from each rank's own batch alone: the masks differ, and the sparsifier says so on every rank.
    torch.manual_seed(0)
    model = cnn()
    sparsify(model, 0.8, distribution="global", scores=grasp_scores(model, [data]), layout="masked")
    try:
        GraSP(model, torch.optim.SGD(model.parameters(), lr=0.1), group=dist.group.WORLD)
        out["diverged"] = "no error"
    except RuntimeError as exc:
        out["diverged"] = str(exc)
    # A rank whose loss fails: every rank raises instead of waiting for it.
    loss = (lambda m: m(data[0]).sum()) if rank == 0 else (lambda m: 1 / 0)
    try:
        grasp_scores(cnn(), loss, group=dist.group.WORLD)
        out["failed"] = "no error"
    except (ValueError, ZeroDivisionError) as exc:
        out["failed"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("grasp_ddp")
    return rank_results(_worker, path, WORLD, 180)


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_grasp_two_ranks_identical_masks(ranks, layout):
    a, b = ranks
    for key in a["scores", layout]:
        assert_bits_equal(a["scores", layout][key], b["scores", layout][key])
    for key in a["masks", layout]:
        assert torch.equal(a["masks", layout][key], b["masks", layout][key])
    for key in a["state", layout]:
        assert_bits_equal(a["state", layout][key], b["state", layout][key])
    # One process that sees both ranks' batches gets the same scores, bit for bit (a sum of two is exact-order), on
    # the ranks' one thread (conv's reductions split differently over more threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        single = grasp_scores(cnn(), batches((2, 7, 7), 2, seed=10))
    finally:
        torch.set_num_threads(threads)
    for key in single:
        assert_bits_equal(a["scores", layout][key], single[key])


def test_grasp_two_ranks_divergent_masks_and_failures_raise_everywhere(ranks):
    for out in ranks:
        assert out["diverged"].startswith("GraSP: the new masks of rank 1 differ from rank 0's")
        assert out["diverged"].endswith("(compute grasp_scores with group= on synchronised weights)")
    assert ranks[0]["failed"] == (
        "ValueError: grasp_scores: another rank of group failed to compute its gradients (its error says why)"
    )
    assert ranks[1]["failed"].startswith("ZeroDivisionError")
