"""All or nothing: a RigL/SET update or an IMP prune that fails anywhere while it commits (out of memory in the
second layer's topology change, while carrying optimizer state, inside the optimizer step it keeps) leaves every
layer, mask, value, gradient, optimizer state and step count as it was, and a retry gives the run that never
failed. Failures are injected by making one function of the commit raise at its k-th call, for every k."""

from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import torch
from test_training_imp import same
from torch import nn

from sparsekern import _csr
from sparsekern.nn import SparseLinear
from sparsekern.nn.sparse_linear import TopologyUpdate
from sparsekern.training import IMP, SET, RigL, drop_grow, imp, sparsify


class Injected(RuntimeError):
    pass


def inject(monkeypatch, owner, attr: str, fail_at: int | None, *, after: bool = False) -> list[int]:
    """Count the calls of ``owner.attr`` and raise Injected at call ``fail_at`` (None: never); ``after``: once the
    call has done its work. Returns the counter."""
    calls = [0]
    original = getattr(owner, attr)
    static = isinstance(inspect.getattr_static(owner, attr), (classmethod, staticmethod))

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at and not after:
            raise Injected(f"{attr} call {fail_at}")
        result = original(*args, **kwargs)
        if calls[0] == fail_at:
            raise Injected(f"{attr} call {fail_at}, after it ran")
        return result

    monkeypatch.setattr(owner, attr, staticmethod(wrapper) if static else wrapper)
    return calls


def snapshot(model, optimizer, sparsifier) -> dict:
    return copy.deepcopy(
        {
            "params": {n: (p.detach(), p.grad) for n, p in model.named_parameters()},
            "ids": [id(p) for p in model.parameters()],
            "buffers": dict(model.named_buffers()),
            "optimizer": optimizer.state_dict(),
            "sparsifier": sparsifier.state_dict(),
            "masks": sparsifier.masks(),
        }
    )


def without_ids(state: dict) -> dict:
    """The state without the parameters' identities (another build has other objects)."""
    return {k: v for k, v in state.items() if k != "ids"}


# Every function an update commits through: the index build, every carried tensor (values, gradient, each optimizer
# state tensor, layer by layer), the staging of a layer and of its optimizer state, and the masked layers' masks.
COMMIT_POINTS = {
    "index": (_csr.CSRIndex, "from_flat"),
    "carry": (TopologyUpdate, "apply"),
    "stage_layer": (SparseLinear, "_stage_topology"),
    "stage_state": (drop_grow, "stage_state"),
    "mask": (drop_grow, "flat_mask"),
}
OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def build(method: str, layout: str, optimizer: str, keep: bool):
    """A model one backward pass before an update step (step 2), with optimizer state from step 1."""
    torch.manual_seed(0)
    # float64: the reference kernels, fast at these sizes
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    sparsify(model, 0.7, layout=layout, generator=torch.Generator().manual_seed(0))
    opt = OPTIMIZERS[optimizer](model.parameters())
    kwargs = dict(total_steps=20, delta_t=2, keep_optimizer_step=keep)
    sparsifier = RigL(model, opt, **kwargs) if method == "rigl" else SET(model, opt, **kwargs, seed=3)
    data = torch.Generator().manual_seed(1)
    for step in (1, 2):
        for _ in range(2):  # two micro-batches
            x = torch.randn(6, 12, generator=data, dtype=torch.float64)
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        if step == 1:
            sparsifier.step()
            opt.zero_grad()
    return model, opt, sparsifier


# RigL over every layout, optimizer and keep_optimizer_step; SET commits through the same code: two of its cases
CASES = [
    *itertools.product(["rigl"], ["sparse", "masked"], OPTIMIZERS, [False, True]),
    ("set", "sparse", "adam", True),
    ("set", "masked", "sgd_momentum", False),
]


@pytest.mark.parametrize(
    "method, layout, optimizer, keep",
    CASES,
    ids=[f"{m}-{lay}-{o}-{'keep' if k else 'skip'}_step" for m, lay, o, k in CASES],
)
def test_failed_update_commit_changes_nothing(method, layout, optimizer, keep, monkeypatch):
    model, opt, sparsifier = build(method, layout, optimizer, keep)
    assert sparsifier.step()  # the run that never fails
    expected = snapshot(model, opt, sparsifier)

    points = dict(COMMIT_POINTS)
    if keep:  # a failure after the kept optimizer step has changed every parameter and its state in place
        points["optimizer_step"] = ("optimizer", "step")
    tried = 0
    for point, (owner, attr) in points.items():
        with monkeypatch.context() as m:  # count the calls of a successful update
            model, opt, sparsifier = build(method, layout, optimizer, keep)
            calls = inject(m, opt if owner == "optimizer" else owner, attr, None)
            sparsifier.step()
        for k in range(1, calls[0] + 1):
            model, opt, sparsifier = build(method, layout, optimizer, keep)
            before = snapshot(model, opt, sparsifier)
            with monkeypatch.context() as m:
                inject(m, opt if owner == "optimizer" else owner, attr, k, after=owner == "optimizer")
                with pytest.raises(Injected):
                    sparsifier.step()
            assert same(snapshot(model, opt, sparsifier), before), (point, k)
            assert sparsifier.step()  # the retry is the update that never failed
            assert same(without_ids(snapshot(model, opt, sparsifier)), without_ids(expected)), (point, k)
            tried += 1
    # every layer's index, values, gradient and optimizer state were hit (the sparse layout) or every mask (masked)
    n_state = 1 if optimizer == "sgd_momentum" else 2
    assert tried >= (3 * (3 + n_state) if layout == "sparse" else 3) + keep


@pytest.mark.parametrize("control", [None, "reinit_pipeline"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_failed_imp_prune_changes_nothing(layout, scope, control, monkeypatch):
    def build_imp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        model.double()
        imp_ = IMP(model, 0.8, prune_fraction=0.5, scope=scope, control=control, layout=layout, rewind_step=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = imp_.start_round(opt)
        for _ in range(3):
            model(torch.randn(7, 6, dtype=torch.float64)).square().mean().backward()
            sparsifier.step()
            opt.zero_grad()
        return model, imp_

    def state(model, imp_):
        return copy.deepcopy(
            {"model": model.state_dict(), "ids": [id(p) for p in model.parameters()], "imp": imp_.state_dict()}
        )

    model, imp_ = build_imp()
    imp_.end_round(loss=1.0)
    expected = state(model, imp_)
    points = {**COMMIT_POINTS, "imp_mask": (imp, "flat_mask"), "stage_imp": (imp, "_stage_topology"),
              "reinit": (imp, "_fresh_init")}  # fmt: skip
    tried = 0
    for point, (owner, attr) in points.items():
        with monkeypatch.context() as m:
            model, imp_ = build_imp()
            calls = inject(m, owner, attr, None)
            imp_.end_round(loss=1.0)
        for k in range(1, calls[0] + 1):
            model, imp_ = build_imp()
            before = state(model, imp_)
            with monkeypatch.context() as m:
                inject(m, owner, attr, k)
                with pytest.raises(Injected):
                    imp_.end_round(loss=1.0)
            assert same(state(model, imp_), before), (point, k)
            imp_.end_round(loss=1.0)  # the retry prunes as the run that never failed
            assert same(without_ids(state(model, imp_)), without_ids(expected)), (point, k)
            tried += 1
    assert tried >= 3 * (2 if layout == "sparse" else 1) + (3 if control == "reinit_pipeline" else 0)
