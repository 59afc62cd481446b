"""Data-parallel RigL: two CPU processes (gloo) under DDP reach identical masks, equal to one process that sees
both ranks' batches as micro-batches of the same step."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsekern.training import RigL, sparsify

WORLD, STEPS = 2, 4


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


LAYOUTS = ("compressed", "masked")


def _worker(rank: int, path: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=WORLD)
    try:
        for layout in LAYOUTS:  # one pair of processes for both layouts: starting them is the slow part
            model = nn.parallel.DistributedDataParallel(make(layout))
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
            rigl = RigL(model, opt, total_steps=STEPS, delta_t=1, t_end=STEPS)
            history = []
            for step in range(1, STEPS + 1):
                loss_of(model, *rank_batch(step, rank)).backward()
                rigl.step()
                opt.zero_grad()
                history.append(rigl.masks())
            state = {"history": history, "state": masks_and_weights(model.module)}
            torch.save(state, f"{path}/{layout}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(path),), nprocs=WORLD, join=True)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_masks_identical_and_exact(layout, ddp_runs):
    ranks = [torch.load(ddp_runs / f"{layout}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
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
