"""IMP checkpoints: a run stopped anywhere (before the rewind point, between rounds, late in a round) and resumed
from the model's, optimizer's and IMP's state_dicts gives bit-identical masks, weights and report; a bad state
changes nothing; every round needs a new optimizer; the docstring example runs."""

from __future__ import annotations

import copy
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
@pytest.mark.parametrize("rewind_step, control", [(0, None), (2, None), (2, "reinit_pipeline"), (0, "random_pipeline")])
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


# -- learning-rate rewinding (Renda et al. 2020) and scheduler replay ---------------------------------------------
T, K = 8, 3  # round 0 trains T steps and saves the schedule at step K; later rounds train the remaining T - K

SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=T),  # cycles momentum
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
}


def build_lr(layout, rewind="lr", seed=0, scope="global"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    return model, IMP(model, 0.7, prune_fraction=0.4, rewind=rewind, rewind_step=K, scope=scope, layout=layout)


def run_lr(model, imp, data, schedule, *, stop=None, resume=None, on_end=None):
    """The remaining rounds with a new optimizer and scheduler each; the (lr, momentum) of every optimizer step per
    round. ``stop=(round, step)``: return a checkpoint taken before that step instead; ``resume``: a checkpoint's
    optimizer and scheduler states, loaded after start_round."""
    rates = []

    def checkpoint(optimizer=None, scheduler=None) -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer and optimizer.state_dict(),
                    "scheduler": scheduler and scheduler.state_dict(), "imp": imp.state_dict(),
                    "data": data.get_state(), "rates": rates}, buffer)  # fmt: skip
        buffer.seek(0)
        return buffer

    while imp.round < imp.rounds:
        if stop == (imp.round, None):
            return checkpoint()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = SCHEDULERS[schedule](optimizer)
        sparsifier = imp.start_round(optimizer, scheduler)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            resume = None
        rates.append([])
        for step in range(sparsifier.steps, T if imp.round == 0 else T - K):
            if stop == (imp.round, step):
                return checkpoint(optimizer, scheduler)
            group = optimizer.param_groups[0]
            rates[-1].append((group["lr"], group["momentum"]))
            x = torch.randn(8, 6, generator=data)
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).backward()
            sparsifier.step()
            scheduler.step()
            optimizer.zero_grad()
        if on_end is not None:
            on_end(model, imp)
        imp.end_round()
    return rates


def top_kept(layers_weights, layers_masks, count):
    """IMP's global prune re-stated: the ``count`` largest |w| among the active weights, ties to the earlier layer
    and lower flat index."""
    pairs = zip(layers_weights, layers_masks, strict=True)
    flat = torch.cat([w.reshape(-1)[m.reshape(-1)].abs().double() for w, m in pairs])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    out, start = [], 0
    for m in layers_masks:
        mask = torch.zeros(m.numel(), dtype=torch.bool)
        active = m.reshape(-1).nonzero().reshape(-1)
        mask[active[keep[start : start + active.numel()]]] = True
        out.append(mask.view(m.shape))
        start += active.numel()
    return out


@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("rewind", ["lr", "weights"])
@pytest.mark.parametrize("layout", ["masked", "sparse"])
def test_rewinding_replays_the_schedule_and_lr_rewinding_keeps_the_weights(layout, rewind, schedule):
    model, imp = build_lr(layout, rewind)
    ends = []

    def on_end(model, imp):  # what training left, just before the prune
        weights = [w.detach().clone() for w in _dense(model)]
        others = {n: t.detach().clone() for n, t in imp._rewound()["params"].items()}
        buffers = {n: t.clone() for n, t in imp._rewound()["buffers"].items()}
        ends.append((weights, imp.masks(), others, buffers))

    rewind_point = {}
    original = imp._save_rewind_point

    def save():  # the weights at step K of round 0 (rewind="weights")
        original()
        rewind_point.update(copy.deepcopy(imp._rewind))

    imp._save_rewind_point = save
    rates = run_lr(model, imp, torch.Generator().manual_seed(7), schedule, on_end=on_end)
    assert [len(r) for r in rates] == [T] + [T - K] * (imp.rounds - 1) and imp.rounds == 4
    for later in rates[1:]:  # step j of a later round runs at round 0's step K + j rate (and momentum)
        assert later == rates[0][K:]
    assert len({lr for lr, _ in rates[0]}) > 1  # the schedule does move
    counts = [row["overall"]["nnz"] for row in imp.report()]
    assert counts == [108, 65, 39, 33]
    # replay the prunes: each round's masks keep the largest trained |w|; lr rewinding keeps the trained values,
    # weight rewinding restores the step-K ones; the other parameters and buffers follow the same rule
    model2, imp2 = build_lr(layout, rewind)
    run_lr(model2, imp2, torch.Generator().manual_seed(7), schedule, stop=(1, None))  # right after round 0
    weights, masks, others, buffers = ends[0]
    expected = top_kept(weights, list(masks.values()), counts[1])
    got = imp2.masks()
    for name, mask in zip(got, expected, strict=True):
        assert torch.equal(got[name], mask), name
    source = weights if rewind == "lr" else rewind_point["dense"]
    for w, s, m in zip(_dense(model2), source, expected, strict=True):
        assert torch.equal(w.detach(), s * m)
    kept = {"params": others, "buffers": buffers} if rewind == "lr" else rewind_point
    for kind, tensors in imp2._rewound().items():
        for name, t in tensors.items():
            assert torch.equal(t.detach(), kept[kind][name]), name
    # the two sources differ, so the checks above tell them apart
    start = rewind_point["buffers"]["1.running_mean"] if rewind == "weights" else torch.zeros(12)
    assert not torch.equal(buffers["1.running_mean"], start)


def _dense(model):
    return [m.dense_weight() if hasattr(m, "dense_weight") else m.weight for m in (model[0], model[3])]


LR_STOPS = {"round0-step2": (0, 2), "round0-step3": (0, K), "before-round1": (1, None), "round2-step2": (2, 2)}


@pytest.mark.parametrize("stop", LR_STOPS.values(), ids=LR_STOPS.keys())
@pytest.mark.parametrize("layout", ["masked", "sparse"])
def test_lr_rewinding_resume_reproduces_uninterrupted_run(layout, stop):
    model, imp = build_lr(layout)
    rates = run_lr(model, imp, torch.Generator().manual_seed(7), "onecycle")
    expected = {k: v.clone() for k, v in model.state_dict().items()}, imp.masks(), imp.report()

    model, imp = build_lr(layout)
    state = torch.load(run_lr(model, imp, torch.Generator().manual_seed(7), "onecycle", stop=stop))
    assert (state["imp"]["lr_rewind"] is None) == (stop[0] == 0)  # saved when step K + 1 of round 0 begins

    model, imp = build_lr(layout, seed=1)
    model.load_state_dict(state["model"])
    imp.load_state_dict(state["imp"])
    data = torch.Generator()
    data.set_state(state["data"])
    in_round = state["imp"]["in_round"]
    resumed = run_lr(model, imp, data, "onecycle", resume=state if in_round else None)
    done = state["rates"]
    if in_round:  # the interrupted round's rates continue where they stopped
        resumed[0] = done.pop() + resumed[0]
    assert done + resumed == rates
    got = model.state_dict(), imp.masks(), imp.report()
    for key, value in expected[0].items():
        assert torch.equal(got[0][key], value), key
    assert same(got[1], expected[1]) and got[2] == expected[2]


def test_lr_rewinding_bad_arguments_change_nothing():
    with pytest.raises(ValueError, match=r"rewind must be one of \('weights', 'lr'\), got 'both'"):
        IMP(nn.Sequential(nn.Linear(4, 4)), 0.5, rewind="both")
    for control in ("reinit_pipeline", "random_pipeline"):
        with pytest.raises(ValueError, match=f"control='{control}' replaces the rewound weights .* rewind='lr' keeps"):
            IMP(nn.Sequential(nn.Linear(4, 4)), 0.5, rewind="lr", control=control)

    model, imp = build_lr("masked")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler scheduler built on this round"):
        imp.start_round(optimizer, torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler scheduler built on this round"):
        imp.start_round(optimizer, "cosine")
    assert not imp.state_dict()["in_round"]

    for first, later, message in [
        (True, False, "round 0 was trained with a learning-rate scheduler; pass a new one"),
        (False, True, "round 0 was trained without a learning-rate scheduler .* no schedule to replay"),
    ]:
        model, imp = build_lr("masked")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sparsifier = imp.start_round(optimizer, SCHEDULERS["step"](optimizer) if first else None)
        for _ in range(K + 1):
            model(torch.randn(4, 6)).sum().backward()
            sparsifier.step()
            optimizer.zero_grad()
        imp.end_round()
        before = imp.state_dict()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=message):
            imp.start_round(optimizer, SCHEDULERS["step"](optimizer) if later else None)
        assert same(imp.state_dict(), before) and optimizer.param_groups[0]["lr"] == 0.1

    # round 0 that ends before step K has no rewind point, in either mode
    for rewind in ("lr", "weights"):
        model, imp = build_lr("masked", rewind)
        sparsifier = imp.start_round(torch.optim.SGD(model.parameters(), lr=0.1))
        model(torch.randn(4, 6)).sum().backward()
        sparsifier.step()
        with pytest.raises(ValueError, match="round 0 ended before step rewind_step=3, so there is no rewind point"):
            imp.end_round()


def test_lr_rewinding_load_state_dict_checks_the_schedule_point():
    model, imp = build_lr("masked")
    state = torch.load(run_lr(model, imp, torch.Generator().manual_seed(7), "step", stop=(1, 1)))["imp"]
    assert state["rewind"] is None and state["config"]["rewind"] == "lr"
    early = torch.load(run_lr(*build_lr("masked"), torch.Generator().manual_seed(7), "step", stop=(0, 1)))["imp"]
    bad = [
        ({**state, "lr_rewind": None}, "expected a learning-rate rewind point at round 1, step 1"),
        ({**state, "lr_rewind": {"scheduler": 3, "groups": []}}, "lr_rewind must be None or"),
        ({**state, "lr_rewind": {**state["lr_rewind"], "groups": [{"params": []}]}}, "lr_rewind must be None or"),
        ({**state, "rewind": {"params": {}, "buffers": {}, "dense": []}}, "expected no rewind point at round 1"),
        ({**state, "config": {**state["config"], "rewind": "weights"}}, "configuration .* differs"),
    ]
    before = imp.state_dict()
    for broken, message in bad:
        with pytest.raises(ValueError, match=message):
            imp.load_state_dict(broken)
        assert same(imp.state_dict(), before), message
    model, imp = build_lr("masked")
    with pytest.raises(ValueError, match="expected no learning-rate rewind point at round 0, step 1"):
        imp.load_state_dict({**early, "lr_rewind": state["lr_rewind"]})
    # a state saved before rewind= existed (no "rewind" in its config, no "lr_rewind") loads as weight rewinding
    model, imp = build("masked")
    old = torch.load(run(model, imp, torch.Generator().manual_seed(7), stop=(1, 2)))
    old["imp"]["config"].pop("rewind")
    old["imp"].pop("lr_rewind")
    fresh_model, fresh = build("masked", seed=1)
    fresh_model.load_state_dict(old["model"])
    fresh.load_state_dict(old["imp"])
    assert fresh.round == 1 and fresh.state_dict()["lr_rewind"] is None
