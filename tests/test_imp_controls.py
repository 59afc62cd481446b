"""The lottery-ticket controls of a level's actual ticket (IMP.control / IMP.ticket, as Frankle & Carbin and
facebookresearch/open_lth run them): reinit keeps the level's masks exactly and re-draws the weights; random_mask
keeps each layer's count at random places with the rewind weights; seeded, reproducible, carried by state_dict; the
IMP and its model are untouched; bad input raises. Also the old pipeline controls' names."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from sparsekern.training import IMP, Ticket
from sparsekern.training.drop_grow import as_layer
from sparsekern.training.sparsify import sparse_layers

LAYOUTS = ("masked", "sparse")
NAMES = ("0.weight", "3.weight")


def build(layout, rewind_step=0, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.BatchNorm1d(13), nn.ReLU(), nn.Linear(13, 3))
    initial = copy.deepcopy(model.state_dict())
    return model, initial, IMP(model, 0.8, prune_fraction=0.4, rewind_step=rewind_step, layout=layout, **kwargs)


def train(model, sparsifier, optimizer, data, steps=3, scheduler=None):
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        x = torch.randn(16, 7, generator=data)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).backward()
        sparsifier.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    return rates


def run(model, imp, schedule=False):
    """All rounds; returns each level's masks as the IMP trained them and each round's learning rates."""
    data, levels, rates = torch.Generator().manual_seed(3), [imp.masks()], []
    while imp.round < imp.rounds:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5) if schedule else None
        rates.append(train(model, imp.start_round(optimizer, scheduler), optimizer, data, scheduler=scheduler))
        imp.end_round()
        if imp.round < imp.rounds:
            levels.append(imp.masks())
    return levels, rates


def dense(model, name) -> torch.Tensor:
    layer = as_layer(sparse_layers(model)[name])
    module = layer.module
    return (module.dense_weight() if hasattr(module, "dense_weight") else module.weight).detach()


def others(model) -> dict[str, torch.Tensor]:
    """Everything but the sparse weights: biases and batch-norm parameters and statistics."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(("0.bias", "1.", "3.bias"))}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_controls_of_each_level(layout):
    model, initial, imp = build(layout)
    levels, _ = run(model, imp)
    assert imp.levels == len(levels) == imp.rounds
    for level in range(2, imp.levels):  # the tickets are nested; the controls below are of one level each
        assert all(not (levels[level][n] & ~levels[level - 1][n]).any() for n in NAMES)
    before = copy.deepcopy(model.state_dict())
    for level in range(1, imp.levels):
        ticket = imp.ticket(level)
        reinit = imp.control(level, "reinit", seed=11)
        shuffled = imp.control(level, "random_mask", seed=11)
        assert (ticket.kind, reinit.kind, shuffled.kind, reinit.level) == ("ticket", "reinit", "random_mask", level)
        for name in NAMES:
            mask, fan_in = levels[level][name], initial[name].shape[1]
            assert torch.equal(ticket.masks()[name], mask) and torch.equal(reinit.masks()[name], mask)
            # the ticket: the rewind (here initial) weights on the mask
            assert torch.equal(dense(ticket.model, name), initial[name] * mask)
            # reinit: the same mask, new weights from U(±1/sqrt(fan_in)), none equal to the rewind weights
            weight = dense(reinit.model, name)
            assert torch.equal(weight != 0, mask)
            assert not (weight[mask] == initial[name][mask]).any()
            assert weight.abs().max() <= 1 / math.sqrt(fan_in)
            # random mask: the level's count in every layer at other places, the rewind weights there
            other = shuffled.masks()[name]
            assert int(other.sum()) == int(mask.sum()) and not torch.equal(other, mask)
            assert torch.equal(dense(shuffled.model, name), initial[name] * other)
        for control in (ticket, reinit, shuffled):  # everything else at the rewind point
            for key, value in others(control.model).items():
                assert torch.equal(value, initial[key]), key
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the IMP's model is untouched


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seeds_reproduce_and_differ(layout):
    model, _, imp = build(layout)
    run(model, imp)
    for kind in ("reinit", "random_mask"):
        a, b, c = (imp.control(2, kind, seed=s).model.state_dict() for s in (4, 4, 5))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_random_mask_differs_from_the_ticket_in_every_layer():
    model, _, imp = build("masked")
    levels, _ = run(model, imp)
    level = imp.levels - 1
    masks = [imp.control(level, "random_mask", seed=s).masks() for s in range(5)]
    for name in NAMES:  # random draws: they differ from each other and from the ticket, and are not nested
        assert (
            len({tuple(m[name].flatten().tolist()) for m in masks} | {tuple(levels[level][name].flatten().tolist())})
            == 6
        )


def test_a_control_trains_like_its_round():
    """Same static masks during training, and the learning-rate schedule replayed from rewind_step like the
    round's."""
    model, _, imp = build("masked", rewind_step=2)
    _, rates = run(model, imp, schedule=True)
    control = imp.control(2, "reinit", seed=0)
    mask = control.masks()
    optimizer = torch.optim.SGD(control.model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    got = train(control.model, control.start(optimizer, scheduler), optimizer, torch.Generator().manual_seed(1),
                scheduler=scheduler)  # fmt: skip
    assert got == rates[2] and rates[2][0] == 0.1 * 0.5**2
    assert all(torch.equal(control.masks()[n], mask[n]) for n in NAMES)
    assert all(torch.equal(dense(control.model, n) != 0, mask[n]) for n in NAMES)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_carries_the_levels(layout):
    model, _, imp = build(layout, rewind_step=1)
    run(model, imp)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "imp": imp.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only: plain data
    other_model, _, other = build(layout, rewind_step=1)
    other_model.load_state_dict(state["model"])
    other.load_state_dict(state["imp"])
    for level in range(1, imp.levels):
        a = imp.control(level, "random_mask", seed=2).model.state_dict()
        b = other.control(level, "random_mask", seed=2).model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # a state saved before levels were kept: only the current level's masks are known
    fresh_model, _, fresh = build(layout, rewind_step=1)
    fresh_model.load_state_dict(state["model"])
    fresh.load_state_dict({k: v for k, v in state["imp"].items() if k != "levels"})
    assert fresh.levels == imp.levels
    last = fresh.control(imp.levels - 1, "reinit", seed=0).masks()
    assert all(torch.equal(last[n], imp.masks()[n]) for n in NAMES)
    with pytest.raises(ValueError, match=f"level 1's masks were not recorded .* levels from {imp.levels - 1} on"):
        fresh.control(1, "reinit", seed=0)

    levels = state["imp"]["levels"]
    assert {t.dtype for t in levels["level_of"].values()} == {torch.int16}  # 2 bytes per weight, for all levels
    top = imp.levels - 1
    bad = [
        {**levels, "known_from": 0},
        {**levels, "known_from": top + 1},
        {**levels, "level_of": dict(reversed(levels["level_of"].items()))},
        {**levels, "level_of": {n: t.int() for n, t in levels["level_of"].items()}},
        {**levels, "level_of": {n: t[1:] for n, t in levels["level_of"].items()}},
        {**levels, "level_of": {n: t + 1 for n, t in levels["level_of"].items()}},
        [None] * imp.levels,
    ]
    for broken in bad:
        with pytest.raises(ValueError, match=rf"levels must be {{'known_from': an int in \[1, {top}\]"):
            fresh.load_state_dict({**state["imp"], "levels": broken})
    shifted = {**levels, "level_of": {n: t.clamp(max=top - 1) for n, t in levels["level_of"].items()}}
    with pytest.raises(ValueError, match="the last level's masks differ from the state's masks"):
        fresh.load_state_dict({**state["imp"], "levels": shifted})
    assert fresh.levels == imp.levels  # unchanged by the failed loads


def test_bad_controls():
    model, _, imp = build("masked")
    with pytest.raises(ValueError, match=r"level must be an int in \[1, 0\]"):
        imp.control(1, "reinit", seed=0)  # nothing pruned yet
    run(model, imp)
    for level in (0, imp.levels, True, 1.0):
        with pytest.raises(ValueError, match=rf"level must be an int in \[1, {imp.levels - 1}\] .* got {level!r}"):
            imp.control(level, "reinit", seed=0)
    with pytest.raises(ValueError, match=r"kind must be one of \('reinit', 'random_mask'\), got 'ticket'"):
        imp.control(1, "ticket", seed=0)
    with pytest.raises(TypeError, match="seed must be an int, got 1.5"):
        imp.control(1, "reinit", seed=1.5)

    control = imp.control(1, "reinit", seed=0)
    optimizer = torch.optim.SGD(control.model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD(control.model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler scheduler built on this"):
        control.start(optimizer, torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(ValueError, match="round 0 was trained without a learning-rate scheduler"):
        control.start(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1))
    train(control.model, control.start(optimizer), optimizer, torch.Generator())
    with pytest.raises(ValueError, match="this ticket was started already; make a new one"):
        control.start(optimizer)
    with pytest.raises(ValueError, match="the optimizer already has state; train the ticket with a new one"):
        imp.control(1, "reinit", seed=0).start(optimizer)

    for kwargs in ({"rewind": "lr"}, {"control": "reinit_pipeline"}):
        model, _, imp = build("masked", **kwargs)
        run(model, imp)
        with pytest.raises(ValueError, match="tickets are the masks of weight rewinding with control=None"):
            imp.control(1, "random_mask", seed=0)


def test_old_control_names_warn_and_keep_their_behaviour():
    for old, new in (("reinit", "reinit_pipeline"), ("random_mask", "random_pipeline")):
        with pytest.warns(FutureWarning, match=rf"control='{old}' is the pipeline control '{new}'.*imp.control"):
            model, _, imp = build("masked", control=old)
        assert imp.pipeline_control == new
        run(model, imp)
        state = imp.state_dict()
        assert state["config"]["control"] == new
        # a state saved before the rename loads into the renamed IMP
        model2, _, imp2 = build("masked", control=new)
        model2.load_state_dict(model.state_dict())
        imp2.load_state_dict({**state, "config": {**state["config"], "control": old}})
        assert imp2.round == imp.round
    assert issubclass(Ticket, object)


def test_controls_of_a_conv_model_in_float64():
    """Conv kernels (fan_in = in_channels · kernel size) and the model's dtype; made in the middle of a round."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4)).double()
    initial = copy.deepcopy(model.state_dict())
    imp = IMP(model, 0.7, prune_fraction=0.5)
    data = torch.Generator().manual_seed(0)
    for _ in range(2):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = imp.start_round(optimizer)
        for _ in range(2):
            x = torch.randn(8, 2, 5, 5, generator=data, dtype=torch.float64)
            nn.functional.cross_entropy(model(x), torch.arange(8) % 4).backward()
            sparsifier.step()
            optimizer.zero_grad()
        if imp.round == 0:
            imp.end_round()
    level = imp.masks()  # round 1 is in progress: level 1's masks are installed
    reinit, shuffled = imp.control(1, "reinit", seed=0), imp.control(1, "random_mask", seed=0)
    for name, fan_in in (("0.weight", 2 * 9), ("3.weight", 45)):
        weight = dense(reinit.model, name)
        assert weight.dtype == torch.float64 and torch.equal(weight != 0, level[name])
        assert weight.abs().max() <= 1 / math.sqrt(fan_in) and not torch.equal(weight, initial[name] * level[name])
        other = shuffled.masks()[name]
        assert int(other.sum()) == int(level[name].sum())
        assert torch.equal(dense(shuffled.model, name), initial[name] * other)
    assert shuffled.model[0].weight.grad is None and reinit.model[3].bias.grad is None


def test_levels_survive_a_resume_between_rounds():
    model, _, imp = build("sparse")
    data = torch.Generator().manual_seed(3)
    for _ in range(2):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train(model, imp.start_round(optimizer), optimizer, data)
        imp.end_round()
    state = copy.deepcopy({"model": model.state_dict(), "imp": imp.state_dict(), "data": data.get_state()})
    other_model, _, other = build("sparse")
    other_model.load_state_dict(state["model"])
    other.load_state_dict(state["imp"])
    other_data = torch.Generator()
    other_data.set_state(state["data"])
    for m, i, d in ((model, imp, data), (other_model, other, other_data)):
        while i.round < i.rounds:
            optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
            train(m, i.start_round(optimizer), optimizer, d)
            i.end_round()
    for level in range(1, imp.levels):
        a, b = imp.control(level, "reinit", seed=level).masks(), other.control(level, "reinit", seed=level).masks()
        assert all(torch.equal(a[n], b[n]) for n in NAMES)
