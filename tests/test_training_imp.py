"""IMP checkpoints: a run stopped anywhere (before the rewind point, between rounds, late in a round) and resumed
from the model's, optimizer's and IMP's state_dicts gives bit-identical masks, weights and report; a bad state
changes nothing; every round needs a new optimizer; the docstring example runs."""

from __future__ import annotations

import doctest
import io
import itertools

import pytest
import torch
from helpers import run_python
from torch import nn

from sparsekern.training import IMP
from sparsekern.training.imp import SCOPES
from sparsekern.training.schedule import prune_counts

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
@pytest.mark.parametrize("layout", ["masked", "sparse"])
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
    model, imp = build("sparse")
    state = torch.load(run(model, imp, torch.Generator().manual_seed(7), stop=(1, 2)))["imp"]

    # the order: a fresh model still has its dense masks until the model's state is loaded
    fresh_model, fresh = build("sparse", seed=1)
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


@pytest.mark.parametrize("layout", ["masked", "sparse"])
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


def one_step_rounds(model, imp, n_in: int) -> None:
    """Every remaining round of ``imp``, one optimizer step each."""
    while imp.round < imp.rounds:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = imp.start_round(optimizer)
        model(torch.randn(5, n_in)).square().sum().backward()
        sparsifier.step()
        imp.end_round()


def test_small_targets_and_fractions_end_in_a_finite_schedule():
    # IMP(Linear(10, 10), 0.99) looped forever (round(0.8 * 2) stays 2 above a target of 1), as any small target
    # or prune_fraction could: run each case in a subprocess under a timeout, so a hang fails instead of stalling.
    code = """
import sys
import torch
from torch import nn
from sparsekern.training import IMP
sys.path.insert(0, "tests")
from test_training_imp import one_step_rounds
for layout, sparsity, fraction in [("masked", 0.99, 0.2), ("sparse", 0.99, 0.2), ("masked", 0.5, 0.001),
                                   ("sparse", 0.95, 0.01), ("masked", 0.9, 0.999)]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    imp = IMP(model, sparsity, prune_fraction=fraction, layout=layout)
    one_step_rounds(model, imp, 10)
    print(layout, sparsity, fraction, [row.report.nnz for row in imp.history])
"""
    result = run_python(code)  # under a timeout
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split()[:3]): eval(line.split(maxsplit=3)[3]) for line in result.stdout.splitlines()}
    assert rows[("masked", "0.99", "0.2")][-4:] == [4, 3, 2, 1] and len(rows[("masked", "0.99", "0.2")]) == 18
    assert rows[("sparse", "0.99", "0.2")] == rows[("masked", "0.99", "0.2")]
    assert rows[("masked", "0.5", "0.001")] == list(range(100, 49, -1))  # at least one weight per prune
    assert rows[("masked", "0.9", "0.999")] == [100, 10]
    for counts in rows.values():  # strictly fewer weights every round, down to exactly the target
        assert all(a > b for a, b in itertools.pairwise(counts))
    assert [counts[-1] for counts in rows.values()] == [1, 1, 50, 5, 10]


def test_a_schedule_past_the_round_limit_is_refused():
    with pytest.raises(ValueError, match=r"prune_fraction=1e-09 needs more than 1000 rounds to reach sparsity 0.9"):
        IMP(nn.Sequential(nn.Linear(200, 200)), 0.9, prune_fraction=1e-9)
    assert prune_counts(10**6, 1, 1e-9) is None


def test_no_extra_round_for_a_rounding_difference():
    # resnet18 at 36% pruned a fifth round to remove one weight: 11172032 -> 8937626 -> 7150101 -> 7150100, because
    # round(0.8 * round(0.8 * n)) != sum over layers of round(0.64 * n_l). Three 4x6 layers do the same: 72 -> 58 ->
    # 46 (round(0.8 * 58)) -> 45 (3 * round(0.64 * 24)). Counts are now round(n * 0.8^r), and a target within
    # rounding of it ends the schedule.
    assert prune_counts(11172032, 7150100, 0.2, tolerance=21 / 2) == [11172032, 8937626, 7150100]
    for scope in SCOPES:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 6), nn.Linear(6, 4))
        imp = IMP(model, 0.36, scope=scope, layout="sparse")
        assert imp.rounds == 3
        one_step_rounds(model, imp, 6)
        if scope == "layer":  # each layer by itself: 24 -> 19 -> its own round(0.64 * 24)
            assert [[layer.nnz for layer in row.report.layers] for row in imp.history] == [[24] * 3, [19] * 3, [15] * 3]
        else:
            assert [row.report.nnz for row in imp.history] == [72, 58, 45]


def test_numpy_metrics_give_a_state_dict_that_loads_with_weights_only():
    np = pytest.importorskip("numpy")  # the metrics users report come from numpy; without it there is no such case
    model, imp = build("masked")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = imp.start_round(optimizer)
    for _ in range(2):
        model(torch.randn(4, 6)).sum().backward()
        sparsifier.step()
    metrics = {
        "accuracy": np.float64(0.75), "loss": np.float32(0.5), "epoch": np.int64(3), "ok": np.bool_(True),
        "curve": np.array([0.5, 0.25]), "per_class": {"a": np.float16(0.5)}, "best": (np.int32(1), 2.5),
        "tensor": torch.tensor([1.0, 2.0], requires_grad=True), "note": None,
    }  # fmt: skip
    imp.end_round(**metrics)
    buffer = io.BytesIO()
    torch.save(imp.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    got = state["history"][0]["metrics"]
    assert got["accuracy"] == 0.75 and type(got["accuracy"]) is float
    assert got["loss"] == 0.5 and type(got["loss"]) is float
    assert got["epoch"] == 3 and type(got["epoch"]) is int
    assert got["ok"] is True and got["note"] is None
    assert torch.equal(got["curve"], torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert got["per_class"] == {"a": 0.5} and got["best"] == (1, 2.5) and type(got["best"][0]) is int
    assert torch.equal(got["tensor"], torch.tensor([1.0, 2.0])) and not got["tensor"].requires_grad
    imp.load_state_dict(state)  # and it loads back
    assert imp.history[0].metrics["epoch"] == 3

    model, imp = build("masked", rewind_step=0)
    sparsifier = imp.start_round(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(4, 6)).sum().backward()
    sparsifier.step()
    with pytest.raises(TypeError, match="metric 'when' must be a number, string, bool, None, tensor, numpy value"):
        imp.end_round(when=object())
    assert imp.round == 0 and imp.history == [] and imp.state_dict()["in_round"]  # refused before anything changed
