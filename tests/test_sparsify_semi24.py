"""sparsekern.nn.sparsify_semi24: converts what it can, reports every nn.Linear with a reason; what CPU weights
become (skipped, dense 2:4 for accuracy checks, or compressed for storage); safe loading of a converted model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_gpu, run_python
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
    report = sparsify_semi24(model, prune=True, on_cpu="compressed")
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
    report = sparsify_semi24(model, on_cpu="compressed")
    assert [r.converted for r in report.layers] == [True, False, False]
    assert sparsify_semi24(model).layers[0].reason == "already a 2:4 semi-structured tensor"


def test_include_exclude_and_dtype():
    report = sparsify_semi24(_model(), include="encoder.*", exclude=["*.2"], prune=True, on_cpu="compressed")
    assert [(r.converted, r.reason) for r in report.layers] == [
        (True, "cutlass, pruned; on the CPU for storage/export only: the 2:4 matmul needs a CUDA GPU"),
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
    with pytest.raises(ValueError, match=r"on_cpu must be one of \('skip', 'dense', 'compressed'\), got 'fast'"):
        sparsify_semi24(model, prune=True, on_cpu="fast")
    assert not any(isinstance(p, torch.sparse.SparseSemiStructuredTensor) for p in model.parameters())


def test_cpu_default_skips_and_says_the_matmul_needs_cuda():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    report = sparsify_semi24(model, prune=True)
    assert not report.converted
    for entry in report.layers[:2]:
        assert entry.reason.startswith("on the CPU: the 2:4 matmul needs a CUDA GPU")
        assert "on_cpu='dense' to check accuracy" in entry.reason
    assert "10 rows" in report.layers[2].reason  # the shape reason comes before the CPU one
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    model["encoder"](torch.randn(3, 64, dtype=torch.float16))  # still runs


@pytest.mark.parametrize("with_transpose", [False, True], ids=["plain", "transposable"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_cpu_dense_keeps_the_decompressed_weight(dtype, with_transpose):
    if dtype == torch.int8:  # int8 2:4 shapes: 16 x 128; no int8 F.linear on the CPU, so weights only
        model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16))
        for layer in (model[0], model[2]):
            weight = torch.randint(-128, 128, layer.weight.shape, dtype=torch.int8)
            layer.weight = nn.Parameter(weight, requires_grad=False)
    else:
        model = _model(dtype)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = sparsify_semi24(model, prune=True, with_transpose=with_transpose, on_cpu="dense")
    converted = [r.name for r in report.converted]
    if dtype == torch.int8:
        assert converted == (["0"] if with_transpose else ["0", "2"])
        if with_transpose:  # the transpose of a 16 x 128 weight breaks int8's shape rule
            assert report.layers[1].reason == (
                "its transpose (with_transpose=True) has 16 columns, but int8 2:4 tensors need a positive multiple "
                "of 128 columns (shape (128, 16))"
            )
    else:
        assert converted == ["encoder.0", "encoder.2"]
    for entry in report.converted:
        assert entry.layout == "dense" and "kept dense on the CPU" in entry.reason
        weight = model.get_submodule(entry.name).weight
        assert type(weight) is nn.Parameter and weight.dtype == dtype
        assert weight.requires_grad == (dtype != torch.int8)
        # the values the 2:4 model holds on a GPU: compressed by sparsekern, decompressed, bit for bit
        expected = sparsekern.to_semi_structured(original[entry.name], prune=True, with_transpose=with_transpose)
        assert torch.equal(weight, sparsekern.semi24_decompress(expected.packed, expected.meta))
        mask = weight != 0
        assert torch.equal(weight[mask], original[entry.name][mask])
        fmt = sparsekern._semi24.FORMATS[dtype]
        groups = mask.reshape(mask.shape[0], -1, fmt.group).sum(-1)
        assert int(groups.max()) <= fmt.kept
        if with_transpose:
            groups_t = mask.t().reshape(mask.shape[1], -1, fmt.group).sum(-1)
            assert int(groups_t.max()) <= fmt.kept
    if dtype != torch.int8:  # the forward runs on the CPU, with exactly the pruned weights
        x = torch.randn(5, 64, dtype=dtype)
        first, second = model["encoder"][0], model["encoder"][2]
        expected = F.linear(F.relu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)
        assert torch.equal(model["encoder"](x), expected)


def test_cpu_dense_keeps_a_nan_of_an_already_sparse_weight():
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, ::2] = torch.randn(32, 32)  # fp32 is 1:2: one nonzero per pair
        layer.weight[5, 6] = float("nan")
    expected = layer.weight.detach().clone()
    (entry,) = sparsify_semi24(layer, on_cpu="dense").layers
    assert entry.converted and entry.layout == "dense"
    assert torch.equal(layer.weight.isnan(), expected.isnan())
    assert torch.equal(layer.weight.nan_to_num(), expected.nan_to_num())


def _attention_model(dtype):
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    return nn.ModuleDict(
        {
            "enc": nn.TransformerEncoderLayer(64, 2, dim_feedforward=128, batch_first=True),
            "mha": nn.MultiheadAttention(64, 2, batch_first=True),
            "proj": nn.modules.linear.NonDynamicallyQuantizableLinear(64, 64),
            "fc": nn.Linear(64, 64),
        }
    ).to(dtype)


@pytest.mark.parametrize("on_cpu", ["dense", "compressed"])
def test_layers_read_by_fused_attention_kernels_are_skipped(on_cpu):
    model = _attention_model(torch.float16)
    report = {r.name: r for r in sparsify_semi24(model, prune=True, on_cpu=on_cpu).layers}
    assert list(report) == ["enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "mha.out_proj", "proj", "fc"]
    assert report["enc.self_attn.out_proj"].reason.startswith(
        "out_proj of nn.MultiheadAttention 'enc.self_attn': torch's attention reads its weight itself"
    )
    assert report["mha.out_proj"].reason.startswith("out_proj of nn.MultiheadAttention 'mha'")
    for child in ("linear1", "linear2"):
        assert report[f"enc.{child}"].reason.startswith(
            f"{child} of nn.TransformerEncoderLayer 'enc': torch's fused encoder fast path"
        )
    assert report["proj"].reason.startswith("an attention output projection (NonDynamicallyQuantizableLinear)")
    assert [r.name for r in report.values() if r.converted] == ["fc"]
    for name in ("enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "mha.out_proj", "proj"):
        assert type(model.get_submodule(name).weight) is nn.Parameter


def test_attention_model_runs_on_the_cpu_after_dense_conversion():
    model = _attention_model(torch.float32)
    reference = _attention_model(torch.float32)
    reference.load_state_dict(model.state_dict())
    sparsify_semi24(model, prune=True, on_cpu="dense")
    with torch.no_grad():
        reference.fc.weight.copy_(model.fc.weight)
    model.eval()
    reference.eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():  # eval + no_grad: torch's fused attention and encoder fast paths
        assert torch.equal(model.enc(x), reference.enc(x))
        assert torch.equal(model.mha(x, x, x)[0], reference.mha(x, x, x)[0])
        assert torch.equal(model.fc(x), reference.fc(x))


def test_failed_conversion_leaves_the_model_unchanged():
    model = _model()
    with torch.no_grad():
        model["encoder"][2].weight[3, 5] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    for on_cpu in ("dense", "compressed"):
        with pytest.raises(ValueError, match=r"NaN"):
            sparsify_semi24(model, prune=True, on_cpu=on_cpu)
        for a, b in zip(before, model.parameters(), strict=True):
            assert type(b) is nn.Parameter and torch.equal(a.nan_to_num(), b.detach().nan_to_num())


def test_state_dict_loads_with_weights_only(tmp_path):
    model = _model()
    sparsify_semi24(model, prune=True, with_transpose=True, on_cpu="compressed")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    saved = tmp_path / "expected.pt"  # the plain tensors to compare against, in a file any loader reads
    torch.save(
        {
            f"{name}.{part}": getattr(m.weight, part)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)
            for part in ("packed", "meta", "packed_t", "meta_t")
        },
        saved,
    )
    # A fresh interpreter: importing sparsekern alone must make the 2:4 classes loadable.
    code = f"""
import torch, sparsekern
from torch import nn
state = torch.load({str(path)!r}, weights_only=True)
model = nn.ModuleDict({{"encoder": nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                       "head": nn.Linear(64, 10)}}).half()
model.load_state_dict(state, assign=True)
expected = torch.load({str(saved)!r}, weights_only=True)
for key, value in expected.items():
    name, part = key.rsplit(".", 1)
    weight = model.get_submodule(name).weight
    assert type(weight) is torch.sparse.SparseSemiStructuredTensorCUTLASS and isinstance(weight, nn.Parameter)
    assert torch.equal(getattr(weight, part), value), key
assert type(model.head.weight) is nn.Parameter
print("loaded", len(expected))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["loaded", "8"]
    # without sparsekern's registration torch refuses it: the test above is not vacuous
    result = run_python(f"import torch\ntorch.load({str(path)!r}, weights_only=True)")
    assert result.returncode != 0 and "SparseSemiStructuredTensorCUTLASS" in result.stderr


@requires_gpu
@pytest.mark.gpu
def test_cuda_attention_model_runs_after_conversion(tmp_path):
    """On CUDA the converted layers run on the 2:4 kernels, the skipped ones keep torch's fused attention and
    encoder paths working, and the state_dict round trip gives a model computing the same."""
    model = _attention_model(torch.float16).cuda().eval()
    report = sparsify_semi24(model, prune=True)
    assert [r.name for r in report.converted] == ["fc"] and report.converted[0].layout == "semi-structured"
    x = torch.randn(2, 8, 64, dtype=torch.float16, device="cuda")
    with torch.no_grad():  # eval + no_grad: the fused fast paths
        model.enc(x)
        model.mha(x, x, x)
        y = model.fc(x)
    dense = sparsekern.semi24_decompress(model.fc.weight.packed, model.fc.weight.meta)
    expected = F.linear(x.double(), dense.double(), model.fc.bias.double())
    torch_error = (F.linear(x, dense, model.fc.bias).double() - expected).abs().max()
    assert (y.double() - expected).abs().max() <= 2 * torch_error + 1e-3
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = _attention_model(torch.float16).cuda().eval()
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), assign=True)
    with torch.no_grad():
        assert torch.equal(loaded.fc(x), y)
