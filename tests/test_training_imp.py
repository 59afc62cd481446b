"""IMP checkpoints: a run stopped anywhere (before the rewind point, between rounds, late in a round) and resumed
from the model's, optimizer's and IMP's state_dicts gives bit-identical masks, weights and report; a bad state
changes nothing; every round needs a new optimizer; the docstring example runs."""

from __future__ import annotations

import doctest
import io

import pytest
import torch
from torch import nn

from sparsekern.training import IMP
from sparsekern.training.imp import SCOPES

STEPS = 4  # optimizer steps per round; 108 weights -> 65 -> 39 -> 33 (sparsity 0.7): 4 rounds


def build(layout, scope="global", rewind_step=2, control=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    imp = IMP(model, 0.7, prune_fraction=0.4, scope=scope, rewind_step=rewind_step, control=control,
              layout=layout, seed=5)  # fmt: skip
    return model, imp


def checkpoint(model, optimizer, imp, data) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                "imp": imp.state_dict(), "data": data.get_state()}, buffer)  # fmt: skip
    buffer.seek(0)
    return buffer


def run(model, imp, data, *, stop=None, optimizer_state=None):
    """Train the remaining rounds, STEPS optimizer steps each; with ``stop=(round, step)`` return the checkpoint
    taken before that step instead (step None: before the round starts)."""
    while imp.round < imp.rounds:
        if stop == (imp.round, None):
            return checkpoint(model, None, imp, data)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        sparsifier = imp.start_round(optimizer)
        if optimizer_state is not None:  # a resumed round: the optimizer's state after start_round
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        for step in range(sparsifier.steps, STEPS):
            if stop == (imp.round, step):
                return checkpoint(model, optimizer, imp, data)
            x = torch.randn(8, 6, generator=data)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
            loss.backward()
            sparsifier.step()
            optimizer.zero_grad()
        imp.end_round(loss=loss.item())
    return None


def same(a, b) -> bool:
    """Nested state equality, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


STOPS = {"round0-step1": (0, 1), "before-round1": (1, None), "round2-step3": (2, 3)}


@pytest.mark.parametrize("stop", STOPS.values(), ids=STOPS.keys())
@pytest.mark.parametrize("rewind_step, control", [(0, None), (2, None), (2, "reinit"), (0, "random_mask")])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("layout", ["masked", "compressed"])
def test_resume_reproduces_uninterrupted_run(layout, scope, rewind_step, control, stop):
    model, imp = build(layout, scope, rewind_step, control)
    assert run(model, imp, torch.Generator().manual_seed(7)) is None
    expected = {k: v.clone() for k, v in model.state_dict().items()}, imp.masks(), imp.report()
    # the final count is the sum of the layers' round(0.3 * numel), 22 + 11; each prune keeps round(0.6 * count)
    assert [row["overall"]["nnz"] for row in expected[2]] == [108, 65, 39, 33]
    if scope == "layer":
        assert [[r["nnz"] for r in row["layers"]] for row in expected[2]] == [[72, 36], [43, 22], [26, 13], [22, 11]]

    model, imp = build(layout, scope, rewind_step, control)
    state = torch.load(run(model, imp, torch.Generator().manual_seed(7), stop=stop))  # weights_only: plain data
    assert (state["imp"]["rewind"] is None) == (stop == (0, 1) and rewind_step == 2)  # saved at step 2 of round 0
    del model, imp

    model, imp = build(layout, scope, rewind_step, control, seed=1)  # other weights, all overwritten
    model.load_state_dict(state["model"])  # first: it holds the masks (and SparseLinear's sizes)
    imp.load_state_dict(state["imp"])
    data = torch.Generator()
    data.set_state(state["data"])
    assert imp.round == stop[0] and len(imp.history) == stop[0]
    assert run(model, imp, data, optimizer_state=state["optimizer"]) is None

    got = model.state_dict(), imp.masks(), imp.report()
    assert got[0].keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(got[0][key], value), key
    for name, mask in expected[1].items():
        assert torch.equal(got[1][name], mask), name
    assert got[2] == expected[2]


def test_load_state_dict_checks_everything_before_changing_anything():
    model, imp = build("compressed")
    state = torch.load(run(model, imp, torch.Generator().manual_seed(7), stop=(1, 2)))["imp"]

    # the order: a fresh model still has its dense masks until the model's state is loaded
    fresh_model, fresh = build("compressed", seed=1)
    with pytest.raises(ValueError, match="the mask of '0.weight' differs from the model's; load the model's"):
        fresh.load_state_dict(state)
    assert fresh.round == 0 and fresh.history == [] and fresh.state_dict()["rewind"] is None

    # a valid state that differs from the IMP's in generator and metrics, then broken in one field at a time
    other = {
        **state,
        "generator": torch.Generator().manual_seed(99).get_state(),
        "history": [{**row, "metrics": {"loss": -1.0}} for row in state["history"]],
    }
    rewind = state["rewind"]
    bad = [
        ({"kind": "RigL"}, "expected the state of an IMP, got 'RigL'"),
        ({k: v for k, v in other.items() if k != "rewind"}, r"the state lacks \['rewind'\]"),
        ({**other, "config": {**other["config"], "prune_fraction": 0.5}}, "configuration .* differs"),
        ({**other, "active": dict(reversed(other["active"].items()))}, "state has layers"),
        ({**other, "round": 2}, "round 2 after 1 history rows"),
        ({**other, "sparsifier": None}, "in a round, the round must be below 4"),
        ({**other, "in_round": False}, "in_round must be a bool, and False without sparsifier state"),
        ({**other, "rewind": None}, "expected a rewind point at round 1"),
        ({**other, "rewind": {**rewind, "dense": rewind["dense"][:1]}}, "the rewind point's tensors have shapes"),
        ({**other, "rewind": {**rewind, "params": {}}}, "the rewind point's tensors have shapes"),
        ({**other, "generator": torch.zeros(3)}, "the generator state must be a torch.uint8 tensor"),
    ]
    before = imp.state_dict()
    for broken, message in bad:
        with pytest.raises(ValueError, match=message):
            imp.load_state_dict(broken)
        assert same(imp.state_dict(), before), message
    imp.load_state_dict(other)  # the unbroken one loads, and changes what the broken ones did not
    assert not same(imp.state_dict(), before)
    assert imp.history[0].metrics == {"loss": -1.0} and torch.equal(imp.generator.get_state(), other["generator"])

    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), state)


@pytest.mark.parametrize("layout", ["masked", "compressed"])
def test_every_round_needs_a_new_optimizer(layout):
    model, imp = build(layout, rewind_step=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = imp.start_round(optimizer)
    model(torch.randn(4, 6)).sum().backward()
    sparsifier.step()
    imp.end_round()
    if layout == "masked":  # the same parameters, with momentum from round 0: no reset
        with pytest.raises(ValueError, match="the optimizer already has state; IMP resets the optimizer every"):
            imp.start_round(optimizer)
    else:  # the prune gave each SparseLinear a new, smaller values parameter
        with pytest.raises(ValueError, match="the optimizer does not hold a sparse parameter"):
            imp.start_round(torch.optim.SGD(optimizer.param_groups[0]["params"], lr=0.1))
    assert imp.round == 1 and not imp.state_dict()["in_round"]
    imp.start_round(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert imp.state_dict()["in_round"]


def test_docstring_example_runs():
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(recurse=False).find(IMP, "IMP", globs={}):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0 and attempted > 10
