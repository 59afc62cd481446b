"""sparsekern.nn.sparsify_semi24: converts what it can, reports every nn.Linear with a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import sparsify_semi24


def _model(dtype=torch.float16):
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    return nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
            "head": nn.Linear(64, 10),
        }
    ).to(dtype)


def test_prune_converts_eligible_and_reports_the_rest():
    model = _model()
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = sparsify_semi24(model, prune=True)
    assert [(r.name, r.converted) for r in report.layers] == [("encoder.0", True), ("encoder.2", True), ("head", False)]
    assert "10 rows" in report.layers[2].reason
    for name in ("encoder.0", "encoder.2"):
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)
        assert torch.equal(weight.to_dense(), before[name] * sparsekern.semi24_mask(before[name]))
    assert torch.equal(model.head.weight, before["head"])
    text = str(report)
    assert "encoder.0" in text and "skipped: the weight has 10 rows" in text and "2 converted, 1 skipped" in text


def test_without_prune_skips_dense_weights_with_reason():
    model = _model()
    report = sparsify_semi24(model)
    assert not report.converted
    assert "hold more than 2 nonzeros (pass prune=True to prune it)" in report.layers[0].reason


def test_already_sparse_weight_is_converted_without_prune():
    model = _model()
    with torch.no_grad():
        model["encoder"][0].weight.mul_(sparsekern.semi24_mask(model["encoder"][0].weight))
    report = sparsify_semi24(model)
    assert [r.converted for r in report.layers] == [True, False, False]
    assert sparsify_semi24(model).layers[0].reason == "already a 2:4 semi-structured tensor"


def test_include_exclude_and_dtype():
    report = sparsify_semi24(_model(), include="encoder.*", exclude=["*.2"], prune=True)
    assert [(r.converted, r.reason) for r in report.layers] == [
        (True, "cutlass, pruned"),
        (False, "matched by exclude"),
        (False, "not matched by include"),
    ]
    report = sparsify_semi24(_model(torch.float64), prune=True)
    assert report.layers[0].reason.startswith("dtype float64 has no 2:4 format")


def test_bad_arguments_change_nothing():
    model = _model()
    with pytest.raises(TypeError, match=r"include must be a glob pattern or a list of glob patterns"):
        sparsify_semi24(model, include=[1])
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got str"):
        sparsify_semi24("model")
    assert not any(isinstance(p, torch.sparse.SparseSemiStructuredTensor) for p in model.parameters())
