"""Checkpoint and resume: a run stopped and resumed gives the same masks and weights as one that never stopped."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sparsekern.training import SET, RigL, Static, sparsify

STEPS, STOP = 30, 14  # with delta_t=5 the step after the stop (15) is an update step


def build(method: str, layout: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    sparsify(model, 0.8, layout=layout, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    kwargs = dict(total_steps=STEPS, delta_t=5, t_end=0.9)
    sparsifier = RigL(model, opt, **kwargs) if method == "rigl" else SET(model, opt, **kwargs, seed=11)
    return model, opt, sparsifier


def train(model, opt, sparsifier, data_gen, steps):
    for _ in range(steps):
        for _ in range(2):  # two micro-batches per optimizer step
            x = torch.randn(8, 10, generator=data_gen)
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).backward()
        sparsifier.step()
        opt.zero_grad()


def final_state(model, sparsifier):
    return {k: v.clone() for k, v in model.state_dict().items()}, sparsifier.masks()


@pytest.mark.parametrize("layout", ["sparse", "masked"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_resume_reproduces_uninterrupted_run(method, layout):
    model, opt, sparsifier = build(method, layout, seed=0)
    train(model, opt, sparsifier, torch.Generator().manual_seed(5), STEPS)
    expected_model, expected_masks = final_state(model, sparsifier)

    model, opt, sparsifier = build(method, layout, seed=0)
    data_gen = torch.Generator().manual_seed(5)
    train(model, opt, sparsifier, data_gen, STOP)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict(),
         "data": data_gen.get_state()},
        buffer,
    )  # fmt: skip
    del model, opt, sparsifier

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model, opt, sparsifier = build(method, layout, seed=1)  # another init and other masks, all overwritten
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sparsifier.load_state_dict(checkpoint["sparsifier"])
    data_gen = torch.Generator()
    data_gen.set_state(checkpoint["data"])
    assert sparsifier.steps == STOP
    train(model, opt, sparsifier, data_gen, STEPS - STOP)
    got_model, got_masks = final_state(model, sparsifier)

    assert got_model.keys() == expected_model.keys()
    for key in expected_model:
        assert torch.equal(got_model[key], expected_model[key]), key
    for key in expected_masks:
        assert torch.equal(got_masks[key], expected_masks[key]), key


def test_load_state_dict_errors():
    model, opt, rigl = build("rigl", "sparse", seed=0)
    state = rigl.state_dict()
    assert state["kind"] == "RigL" and state["steps"] == 0
    assert set(state["active"]) == {"0.weight", "2.weight", "4.weight"}
    with pytest.raises(ValueError, match="expected the state of a RigL, got 'Static'"):
        rigl.load_state_dict(Static(model, opt).state_dict())
    other = RigL(model, opt, total_steps=STEPS + 1, delta_t=5, t_end=0.9)
    with pytest.raises(ValueError, match="configuration .* differs"):
        rigl.load_state_dict(other.state_dict())
    _, _, elsewhere = build("rigl", "sparse", seed=1)
    with pytest.raises(ValueError, match="the mask of '0.weight' differs from the model's; load the model's"):
        rigl.load_state_dict(elsewhere.state_dict())


def test_load_state_dict_checks_steps_and_keys_before_changing_anything():
    np = pytest.importorskip("numpy")  # numpy integers are among the integer-likes accepted
    model, opt, sparsifier = build("set", "sparse", seed=0)
    train(model, opt, sparsifier, torch.Generator().manual_seed(5), 3)
    state = sparsifier.state_dict()
    other_generator = torch.Generator().manual_seed(99).get_state()

    def unchanged():
        return sparsifier.steps == 3 and torch.equal(sparsifier.generator.get_state(), state["generator"])

    # a valid generator beside a bad step count: refused whole, the generator too is left as it was
    for steps in (-7, "3", 3.7, 10**30, 2**53 + 1, True, None, torch.tensor(2.0)):
        with pytest.raises(ValueError, match=r"steps must be an int in \[0, 2\*\*53\], got"):
            sparsifier.load_state_dict({**state, "steps": steps, "generator": other_generator})
        assert unchanged(), steps
    for key in ("steps", "config", "active", "generator"):
        with pytest.raises(ValueError, match=rf"the state lacks \['{key}'\]"):
            sparsifier.load_state_dict({k: v for k, v in state.items() if k != key})
        assert unchanged(), key
    with pytest.raises(ValueError, match="the generator state must be a torch.uint8 tensor"):
        sparsifier.load_state_dict({**state, "steps": 5, "generator": torch.zeros(3)})
    assert unchanged()

    for steps, expected in ((np.int64(5), 5), (torch.tensor(6), 6), (2**53, 2**53), (0, 0)):
        sparsifier.load_state_dict({**state, "steps": steps})
        assert sparsifier.steps == expected and type(sparsifier.steps) is int
