"""flops_report against hand counts (RigL paper, appendix H) for a small MLP and a small CNN, every training rule,
every sparsifier's declared rule, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.training import IMP, SET, SNIP, RigL, Sparsifier, Static, flops_report, sparsify
from sparsekern.training.flops import RULES


def _mlp(layout="sparse"):
    # 10 -> 20 -> 5 at 75% uniform: nnz 50 of 200 and 25 of 100
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    sparsify(model, 0.75, distribution="uniform", layout=layout)
    return model


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_mlp_hand_counts_every_rule(layout):
    model = _mlp(layout)
    # f_D = 200 + 100 = 300, f_S = 50 + 25 = 75 (one position per weight: flat inputs)
    expected = {
        "dense": 3 * 300 / 900,
        "sparse": 3 * 75 / 900,  # 225 / 900 = 0.25
        "rigl": (3 * 75 * 4 + 2 * 75 + 300) / 5 / 900,  # (900 + 150 + 300) / 5 = 270, ΔT = 4
        "dense_gradient": (2 * 75 + 300) / 900,  # 450 / 900 = 0.5
    }
    for rule, fraction in expected.items():
        report = flops_report(model, rule=rule, delta_t=4 if rule == "rigl" else None)
        assert report.dense_forward == 300 and report.sparse_forward == 75
        assert report.inference_fraction == 0.25
        assert report.training_fraction == pytest.approx(fraction, rel=1e-12)
        assert not report.positions_known
    rigl = flops_report(model, rule="rigl", delta_t=4)
    # per layer: (3·50·4 + 2·50 + 200) / 5 = 180 and (3·25·4 + 2·25 + 100) / 5 = 90
    assert [layer.training for layer in rigl.layers] == [180.0, 90.0]
    assert [(layer.name, layer.kind, layer.shape, layer.nnz) for layer in rigl.layers] == [
        ("0.weight", "Linear", (20, 10), 50),
        ("2.weight", "Linear", (5, 20), 25),
    ]
    assert flops_report(model).rule == "sparse"  # a sparsified model without a sparsifier: fixed masks


def test_mlp_tokens_are_positions():
    model = _mlp()
    # a batch of 3 sequences of 7 tokens: each weight is applied 7 times per sample
    report = flops_report(model, example_input=torch.randn(3, 7, 10))
    assert [layer.positions for layer in report.layers] == [7, 7]
    assert report.dense_forward == 300 * 7 and report.sparse_forward == 75 * 7 and report.positions_known
    assert flops_report(model, example_input=torch.randn(4, 10)).dense_forward == 300


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 8x8 -> 8x8: 64 positions, 4·3·3·3 = 108 weights
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 4x4
        nn.Conv2d(4, 6, 3),  # 4x4 -> 2x2: 4 positions, 6·4·3·3 = 216 weights
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 5),  # 1 position, 120 weights
    )


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_cnn_hand_counts(layout):
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    dense = flops_report(model, example_input=x)
    assert [layer.positions for layer in dense.layers] == [64, 4, 1]
    assert dense.dense_forward == 108 * 64 + 216 * 4 + 120 == 7896
    assert dense.rule == "dense" and dense.inference_fraction == 1.0 and dense.training_fraction == 1.0
    # the first conv dense, the others at half: nnz 108, 108, 60
    sparsify(model, 0.5, distribution="uniform", dense_first=True, layout=layout)
    report = flops_report(model, example_input=x)
    assert [layer.nnz for layer in report.layers] == [108, 108, 60]
    assert report.sparse_forward == 108 * 64 + 108 * 4 + 60 == 7404
    assert report.inference_fraction == 7404 / 7896
    assert report.training_fraction == pytest.approx(3 * 7404 / (3 * 7896), rel=1e-12)
    # (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) with ΔT = 10
    rigl = flops_report(model, example_input=x, rule="rigl", delta_t=10)
    assert rigl.training == pytest.approx((3 * 7404 * 10 + 2 * 7404 + 7896) / 11, rel=1e-12)
    # without an input every conv weight counts once: the sparse layers' density, not the FLOPs
    blind = flops_report(model)
    assert blind.dense_forward == 108 + 216 + 120 and blind.sparse_forward == 108 + 108 + 60
    assert "no example input" in str(blind) and "no example input" not in str(report)
    assert model.training  # the forward for the positions ran in eval mode and left the model as it was


def test_strided_conv_and_reused_module():
    conv = nn.Conv1d(2, 3, 3, stride=2)  # length 11 -> 5 positions, 18 weights
    assert flops_report(conv, example_input=torch.randn(1, 2, 11)).dense_forward == 18 * 5
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # the same weights applied twice per sample
    report = flops_report(model, example_input={"input": torch.randn(3, 5)})
    assert [(layer.name, layer.positions) for layer in report.layers] == [("0.weight", 2)]
    assert report.dense_forward == 50


def test_sparsifiers_declare_their_rules():
    model = _mlp()
    optimizer = _optimizer(model)
    assert Static(model, optimizer).flops_report().training_fraction == 0.25
    assert SNIP(model, optimizer).flops_report().rule == "sparse"
    assert SET(model, optimizer, total_steps=100).flops_report().rule == "sparse"
    rigl = RigL(model, optimizer, total_steps=100, delta_t=4)
    report = rigl.flops_report()
    assert (report.rule, report.delta_t) == ("rigl", 4)
    assert report.training_fraction == pytest.approx(270 / 900, rel=1e-12)
    assert rigl.flops_report(example_input=torch.randn(2, 3, 10)).dense_forward == 900
    imp = IMP(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)), 0.75)
    round_sparsifier = imp.start_round(_optimizer(imp.model))
    assert round_sparsifier.flops_report().rule == "sparse"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_sparsifier_class_declares_a_rule():
    import sparsekern.training  # noqa: F401  (every sparsifier module loaded)

    leaves = [
        c for c in _all_subclasses(Sparsifier) if c.__module__.startswith("sparsekern.") and not c.__subclasses__()
    ]
    assert {Static, SNIP, SET, RigL} <= set(leaves)
    for cls in leaves:
        assert cls.flops_rule in RULES and cls.flops_rule != "dense", cls
        if cls.flops_rule == "schedule":
            assert callable(getattr(cls, "counts_at", None)), cls
    assert Sparsifier.flops_rule is None  # the base declares nothing, so a new class cannot inherit a wrong count


class _Gradual(Sparsifier):
    """A stand-in for a "schedule" sparsifier (GMP's contract): nonzeros per step from counts_at."""

    flops_rule = "schedule"
    total_steps = 4

    def counts_at(self, step):
        return {"0.weight": [200, 200, 100, 50][step - 1], "2.weight": [100, 50, 25, 25][step - 1]}


def test_schedule_rule_sums_counts_at():
    model = _mlp()
    report = _Gradual(model, _optimizer(model)).flops_report()
    # mean nnz per step: (200 + 200 + 100 + 50) / 4 = 137.5 and (100 + 50 + 25 + 25) / 4 = 50
    assert [layer.training for layer in report.layers] == [3 * 137.5, 3 * 50.0]
    assert report.training_fraction == 3 * (137.5 + 50) / 900
    assert report.inference_fraction == 0.25  # inference: the masks as they are now


def test_report_table_and_dict():
    model = _mlp()
    report = flops_report(model, rule="rigl", delta_t=4)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rule"] == "rigl" and data["delta_t"] == 4 and data["formula"] == RULES["rigl"]
    assert data["inference_fraction"] == 0.25 and data["training_fraction"] == pytest.approx(0.3, rel=1e-12)
    assert [layer["positions"] for layer in data["layers"]] == [1, 1]
    lines = str(report).splitlines()
    assert lines[0].split() == ["weight", "kind", "shape", "nnz", "positions", "f_D", "inference", "training"]
    assert lines[3].split() == ["total", "300", "0.2500", "0.3000"]
    assert "ΔT=4" in lines[-1]


def test_sparsity_report_inference_fraction():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    report = sparsify(model, 0.75, distribution="uniform")
    assert report.inference_fraction == 75 / 300 == flops_report(model).inference_fraction
    assert sparsekern.sparsity_report(model).inference_fraction == 0.25


def test_errors():
    model = _mlp()
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        flops_report(3)
    with pytest.raises(TypeError, match="sparsifier must be a sparsekern Sparsifier, got SGD"):
        flops_report(model, _optimizer(model))
    with pytest.raises(ValueError, match=r"rule must be one of \('dense', .*got 'fast'"):
        flops_report(model, rule="fast")
    with pytest.raises(ValueError, match="rule and delta_t come from the sparsifier"):
        flops_report(model, Static(model, _optimizer(model)), rule="dense")
    with pytest.raises(ValueError, match="the 'rigl' rule needs delta_t, a positive int, got None"):
        flops_report(model, rule="rigl")
    with pytest.raises(ValueError, match="the 'rigl' rule needs delta_t, a positive int, got 0"):
        flops_report(model, rule="rigl", delta_t=0)
    with pytest.raises(ValueError, match="delta_t applies to the 'rigl' rule only, not 'sparse'"):
        flops_report(model, rule="sparse", delta_t=3)
    with pytest.raises(ValueError, match=r"the 'schedule' rule needs a sparsifier with counts_at"):
        flops_report(model, rule="schedule")
    with pytest.raises(ValueError, match="Sparsifier declares no valid flops_rule"):
        Sparsifier(model, _optimizer(model)).flops_report()
    no_steps = _Gradual(model, _optimizer(model))
    no_steps.total_steps = 0
    with pytest.raises(ValueError, match="_Gradual has flops_rule 'schedule' but no total_steps"):
        no_steps.flops_report()
    with pytest.raises(ValueError, match="no Linear, Conv or SparseLinear layer to count"):
        flops_report(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="example_input must be a batched tensor"):
        flops_report(model, example_input=(1, 2))

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="the example input reached no counted layer"):
        flops_report(Skips(), example_input=torch.randn(2, 3))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    attention = Attention()
    sparsify(attention, 0.5, layout="masked", include="attn")
    with pytest.raises(ValueError, match=r"attn is a MultiheadAttention, whose projections are not counted"):
        flops_report(attention)
    with pytest.raises(ValueError, match=r"attn is a MultiheadAttention"):  # dense too: no hook sees its work
        flops_report(Attention())
