"""Data parallel: two CPU processes (gloo) under DDP. RigL and IMP reach identical masks and weights on both ranks,
equal to one process that sees both ranks' batches as micro-batches of the same step; when the ranks' weights
genuinely diverge, every rank raises before a mask update and nothing changes. One pair of processes runs it all
(starting them is the slow part), joined with a timeout so that a hang in a collective fails instead of blocking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, rank_results
from test_training_imp import same
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsekern.training import IMP, SET, RigL, sparsify

WORLD, STEPS = 2, 4
IMP_STEPS = 3  # optimizer steps per IMP round; 224 weights -> 157 -> 112 (sparsity 0.5): 3 rounds
TIMEOUT_S = 180


def make(layout: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify(model, 0.75, layout=layout, generator=torch.Generator().manual_seed(0))
    return model


def rank_batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(6 + rank, 10, generator=gen)  # batch sizes differ across ranks
    return x, (x[:, :4] > 0).float()


def loss_of(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def masks_and_weights(model):
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.clone()
    return out


LAYOUTS = ("sparse", "masked")


def make_imp(layout: str, group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, IMP(model, 0.5, prune_fraction=0.3, rewind_step=1, layout=layout, group=group)


def sparse_weight(model) -> nn.Parameter:
    return model[0].values if hasattr(model[0], "values") else model[0].weight


def _rigl_run(rank: int, layout: str) -> dict:
    model = DDP(make(layout))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rigl = RigL(model, opt, total_steps=STEPS, delta_t=1, t_end=STEPS)
    history = []
    for step in range(1, STEPS + 1):
        loss_of(model, *rank_batch(step, rank)).backward()
        rigl.step()
        opt.zero_grad()
        history.append(rigl.masks())
    return {"history": history, "state": masks_and_weights(model.module)}


def _imp_run(rank: int, layout: str) -> dict:
    # The supported pattern: IMP on the model itself with group=, and a new DDP wrapper (and optimizer) every round.
    model, imp = make_imp(layout, dist.group.WORLD)
    masks, step = [], 0
    while imp.round < imp.rounds:
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.5)
        sparsifier = imp.start_round(opt)
        for _ in range(IMP_STEPS):
            step += 1
            loss_of(ddp, *rank_batch(step, rank)).backward()
            sparsifier.step()
            opt.zero_grad()
        imp.end_round()
        masks.append(imp.masks())
    return {"masks": masks, "state": masks_and_weights(model), "report": imp.report()}


def _diverged(rank: int, method: str, layout: str) -> dict:
    """Rank 1's sparse weights differ from rank 0's before a mask update: every rank must raise, nothing change;
    once rank 1 takes rank 0's weights again the same update succeeds."""
    if method == "imp":
        model, imp = make_imp(layout, dist.group.WORLD)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.5)
        sparsifier = imp.start_round(opt)
        for step in range(1, IMP_STEPS + 1):
            loss_of(ddp, *rank_batch(step, rank)).backward()
            sparsifier.step()
            opt.zero_grad()
        update, state, masks = imp.end_round, imp.state_dict, imp.masks
    else:
        model = make(layout)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.5)
        kwargs = dict(total_steps=STEPS, delta_t=1, t_end=STEPS)
        sparsifier = RigL(ddp, opt, **kwargs) if method == "rigl" else SET(ddp, opt, **kwargs, seed=3)
        loss_of(ddp, *rank_batch(1, rank)).backward()
        update, state, masks = sparsifier.step, sparsifier.state_dict, sparsifier.masks
    weight = sparse_weight(model)
    if rank == 1:
        with torch.no_grad():  # scale each weight by U(0, 2): masked zeros stay zero, the |w| order changes
            weight.mul_(2 * torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)))

    def snapshot():
        return copy.deepcopy((model.state_dict(), opt.state_dict(), state(), masks()))

    before = snapshot()
    try:
        update()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    after = snapshot()
    with torch.no_grad():
        dist.broadcast(weight, src=0)  # back in sync: the same update now goes through
    update()
    return {"error": error, "before": before, "after": after, "retried": masks()}


DIVERGED = [("rigl", "sparse"), ("set", "masked"), ("imp", "masked"), ("imp", "sparse")]


def _worker(rank: int, path: str):
    gloo_rank(rank, path, WORLD, _worker_results)


def _worker_results(rank: int) -> dict:
    results = {}
    for layout in LAYOUTS:
        results["rigl", layout] = _rigl_run(rank, layout)
        results["imp", layout] = _imp_run(rank, layout)
    for method, layout in DIVERGED:
        results["diverged", method, layout] = _diverged(rank, method, layout)
    try:  # sparsify(layout="sparse") replaces the Linear layers a wrapper made before IMP holds
        IMP(DDP(nn.Sequential(nn.Linear(4, 4))), 0.5, layout="sparse")
        results["wrapped"] = "no error"
    except ValueError as exc:
        results["wrapped"] = str(exc)
    return results


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    return rank_results(_worker, path, WORLD, TIMEOUT_S)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_masks_identical_and_exact(layout, ddp_runs):
    ranks = [run["rigl", layout] for run in ddp_runs]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # One process, both ranks' batches as micro-batches of each step, each loss halved as DDP averages: the same
    # gradient (halving is exact), so the same masks after every update step.
    model = make(layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rigl = RigL(model, opt, total_steps=STEPS, delta_t=1, t_end=STEPS)
    initial = rigl.masks()
    for step in range(1, STEPS):
        for rank in range(WORLD):
            (loss_of(model, *rank_batch(step, rank)) / WORLD).backward()
        assert rigl.step()
        opt.zero_grad()
        got = rigl.masks()
        assert all(torch.equal(got[k], ranks[0]["history"][step - 1][k]) for k in got), step
    assert any(not torch.equal(initial[k], got[k]) for k in got)  # the masks did move


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_imp_masks_and_weights_identical_and_exact(layout, ddp_runs):
    ranks = [run["imp", layout] for run in ddp_runs]
    assert same(ranks[0], ranks[1])  # masks after every prune, final weights and masks, report
    assert [row["overall"]["nnz"] for row in ranks[0]["report"]] == [224, 157, 112]

    # One process, both ranks' batches as micro-batches of each step, each loss halved: the same gradients, so
    # the same weights, prunes and rewinds, bit for bit.
    model, imp = make_imp(layout, None)
    masks, step = [], 0
    while imp.round < imp.rounds:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        sparsifier = imp.start_round(opt)
        for _ in range(IMP_STEPS):
            step += 1
            for rank in range(WORLD):
                (loss_of(model, *rank_batch(step, rank)) / WORLD).backward()
            sparsifier.step()
            opt.zero_grad()
        imp.end_round()
        masks.append(imp.masks())
    assert same({"masks": masks, "state": masks_and_weights(model), "report": imp.report()}, ranks[0])


@pytest.mark.parametrize("method, layout", DIVERGED)
def test_ddp_diverged_weights_raise_on_every_rank_and_change_nothing(method, layout, ddp_runs):
    ranks = [run["diverged", method, layout] for run in ddp_runs]
    fn = {"rigl": "RigL.step", "set": "SET.step", "imp": "IMP.end_round"}[method]
    for rank in ranks:
        assert rank["error"] is not None and rank["error"].startswith(f"{fn}: the new masks of rank 1 differ from ")
        assert rank["error"].endswith("are the weights synchronised (DDP)? nothing changed")
        assert same(rank["before"], rank["after"])  # weights, masks, optimizer and sparsifier/IMP state
    assert not same(ranks[0]["before"][0], ranks[1]["before"][0])  # the ranks did diverge
    assert same(ranks[0]["retried"], ranks[1]["retried"])
    assert not same(ranks[0]["retried"], ranks[0]["before"][3])  # the retried update moved the masks


def test_ddp_wrapper_made_before_a_compressed_imp_is_refused(ddp_runs):
    for run in ddp_runs:
        assert run["wrapped"].startswith("IMP: layout='sparse' replaces the Linear layers, so a Distributed")
