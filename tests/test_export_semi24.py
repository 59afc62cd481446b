"""sparsekern.export_semi24: SparseLinear / masked / plain Linear layers -> nn.Linear with real 2:4 weights.

CPU: the round trip is bit-exact (every exported weight decompresses to the masked dense weight, packed/meta equal
torch's own CUTLASS conversion), the decompressed model computes what the masked model computes, the report's
figures are exact, every error path names what is wrong and leaves the model unchanged. GPU: the exported forward
against the dense masked model within the fp16/bf16 error rule, and `bench semi24` on an exported model."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import assert_bits_equal, requires_gpu
from torch import nn
from torch.sparse import _semi_structured_conversions as torch_conversions

import sparsekern
from sparsekern.export import ExportReport, Semi24Int8Linear, decompress_model, export_semi24
from sparsekern.nn import SparseLinear
from sparsekern.training.sparsify import make_masked

FLOAT_DTYPES = (torch.float16, torch.bfloat16)
KINDS = ("plain", "masked", "sparse")


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()).item())


def _linear_24(n_in: int, n_out: int, kind: str, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A 2:4 layer of the given kind: a plain Linear whose weight is 2:4, a masked Linear (2:4 weight_mask, with
    garbage off the mask to prove the mask is what counts), or a SparseLinear holding a 2:4 mask."""
    linear = nn.Linear(n_in, n_out, device="meta")
    linear.weight = nn.Parameter(torch.randn(n_out, n_in, generator=gen).to(dtype))
    linear.bias = nn.Parameter(torch.randn(n_out, generator=gen).to(dtype))
    mask = sparsekern.semi24_mask(linear.weight)
    if kind == "sparse":
        return SparseLinear.from_dense(linear, mask=mask)
    with torch.no_grad():
        linear.weight.mul_(mask)
    if kind == "masked":
        make_masked(linear, mask)
    return linear


def _model(kinds, dtype, gen, sizes=(128, 64, 128)):
    layers = []
    for i, kind in enumerate(kinds):
        layers += [_linear_24(sizes[i % 2], sizes[(i + 1) % 2], kind, dtype, gen), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _masked_dense(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: zeros off its mask, -0.0 as +0.0."""
    if isinstance(module, SparseLinear):
        w = module.dense_weight().detach()
    elif hasattr(module, "weight_mask"):
        w = torch.where(module.weight_mask, module.weight.detach(), torch.zeros((), dtype=module.weight.dtype))
    else:
        w = module.weight.detach()
    return torch.where(w == 0, torch.zeros((), dtype=w.dtype), w)


def _dense_twin(model: nn.Module) -> nn.Module:
    """The masked model with every layer a plain nn.Linear holding its masked dense weight."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_children()):
        if isinstance(module, (nn.Linear, SparseLinear)):
            linear = nn.Linear(module.in_features, module.out_features, device="meta")
            linear.weight = nn.Parameter(_masked_dense(module))
            linear.bias = nn.Parameter(module.bias.detach().clone())
            setattr(twin, name, linear)
    return twin


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert_bits_equal(now[key], value)


# ---------------------------------------------------------------------------------------------------------
# Round trip, CPU


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_is_bit_exact(kind, dtype):
    gen = torch.Generator().manual_seed(_seed())
    model = _model([kind, kind, kind], dtype, gen)
    expected = {name: _masked_dense(m) for name, m in model.named_children() if not isinstance(m, nn.ReLU)}
    exported, report = export_semi24(model)
    assert [(r.name, r.converted, r.format, r.export_dtype) for r in report.layers] == [
        (name, True, "cutlass", str(dtype).replace("torch.", "")) for name in ("0", "2", "4")
    ]
    for name, dense in expected.items():
        layer = exported.get_submodule(name)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
        weight = layer.weight
        assert isinstance(weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)
        packed, meta = torch_conversions.sparse_semi_structured_from_dense_cutlass(dense)
        assert_bits_equal(weight.packed, packed)
        assert_bits_equal(weight.meta, meta)
        assert_bits_equal(weight.to_dense(), dense)
        assert_bits_equal(sparsekern.semi24_decompress(weight.packed, weight.meta), dense)
        assert report[name].nnz == report[name].nnz_before == int(torch.count_nonzero(dense))
        assert report[name].magnitude_kept == 1.0 and not report[name].pruned
    # the exported model, evaluated through its decompressed weights, computes exactly what the masked model does
    x = torch.randn(7, 128, generator=gen).to(dtype)
    with torch.no_grad():
        y = decompress_model(exported)(x)
        assert_bits_equal(y, _dense_twin(model)(x))
        if kind != "sparse":  # SparseLinear's own kernels sum in another order: equal up to rounding only
            assert_bits_equal(y, model(x))
        else:
            y_sparse = model(x)
            assert (y - y_sparse).abs().max() <= 2**-6 * y_sparse.abs().max()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtype_casts_the_model_and_keeps_the_original(dtype):
    gen = torch.Generator().manual_seed(_seed())
    model = nn.Sequential(_linear_24(128, 64, "masked", torch.float32, gen), nn.LayerNorm(64), nn.Linear(64, 10))
    state = _state(model)
    expected = _masked_dense(model[0]).to(dtype)
    exported, report = export_semi24(model, dtype=dtype)
    _assert_same_state(model, state)  # inplace=False: the original is untouched, dtype included
    assert report["0"].converted and report["0"].dtype == "float32" and report["0"].export_dtype == str(dtype)[6:]
    assert_bits_equal(exported[0].weight.to_dense(), expected)
    assert exported[1].weight.dtype == dtype and exported[2].weight.dtype == dtype  # the whole model is cast
    assert "10 rows" in report["2"].reason
    x = torch.randn(5, 128, generator=gen).to(dtype)
    with torch.no_grad():
        assert_bits_equal(decompress_model(exported)(x), _dense_twin(model).to(dtype)(x))


def test_float32_layers_are_skipped_without_dtype():
    gen = torch.Generator().manual_seed(_seed())
    model = nn.Sequential(_linear_24(128, 64, "plain", torch.float32, gen))
    exported, report = export_semi24(model)
    assert not report.converted
    assert "float32 is 1:2, not 2:4" in report["0"].reason and "dtype=torch.float16" in report["0"].reason
    assert type(exported[0].weight) is nn.Parameter


def test_inplace_changes_the_model_itself_and_a_root_linear_is_replaced():
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["masked", "sparse"], torch.float16, gen)
    exported, report = export_semi24(model, inplace=True)
    assert exported is model and len(report.converted) == 2
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert not hasattr(model[0], "weight_mask")  # the mask buffer is gone with the masked layer
    root = _linear_24(128, 64, "plain", torch.float16, gen)
    new, report = export_semi24(root, inplace=True)
    assert new is not root and report.layers[0].name == "" and report.layers[0].converted
    assert isinstance(new.weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)


def test_a_data_parallel_wrapper_is_looked_through():
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["masked"], torch.float16, gen)
    exported, report = export_semi24(nn.DataParallel(model))
    assert type(exported) is nn.Sequential and report.layers[0].name == "0" and report.layers[0].converted


def test_a_module_used_twice_becomes_one_module_used_twice():
    gen = torch.Generator().manual_seed(_seed())
    shared = _linear_24(64, 64, "plain", torch.float16, gen)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    exported, report = export_semi24(model)
    assert [r.name for r in report.layers] == ["0"]  # named_modules lists it once
    assert exported[0] is exported[2] and isinstance(exported[0].weight, torch.sparse.SparseSemiStructuredTensor)


def test_a_model_trained_with_srste_exports_without_pruning():
    """The path of issue 15: train with 2:4 masks (SR-STE), finalize, export: every group is already 2:4."""
    torch.manual_seed(_seed())
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    srste = sparsekern.SRSTE(model, optimizer, exclude="4")
    for _ in range(3):
        x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
        nn.functional.cross_entropy(model(x), y).backward()
        srste.step()
        optimizer.zero_grad()
    srste.finalize()
    exported, report = export_semi24(model, dtype=torch.bfloat16)
    assert [(r.name, r.converted, r.pruned) for r in report.layers] == [
        ("0", True, False),
        ("2", True, False),
        ("4", False, False),
    ]
    assert report.magnitude_kept == 1.0 and "10 rows" in report["4"].reason
    x = torch.randn(16, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert_bits_equal(decompress_model(exported)(x), model.to(torch.bfloat16)(x))


# ---------------------------------------------------------------------------------------------------------
# Pruning and the report's figures


def test_prune_reports_the_magnitude_kept_exactly():
    # one row pattern repeated: groups (1, 2, 3, 4) keep 3 + 4 and (-8, 0, 0, 1) is already 2:4; all exact in fp16
    row = torch.tensor([1.0, 2.0, 3.0, 4.0, -8.0, 0.0, 0.0, 1.0] * 8)
    linear = nn.Linear(64, 32, bias=False).half()
    with torch.no_grad():
        linear.weight.copy_(row.expand(32, 64))
    model = nn.Sequential(linear)
    exported, report = export_semi24(model, prune=True)
    entry = report["0"]
    assert entry.converted and entry.pruned
    assert entry.l1_before == 32 * 8 * 19.0 and entry.l1_kept == 32 * 8 * 16.0
    assert entry.magnitude_kept == 16.0 / 19.0
    assert entry.nnz_before == 32 * 8 * 6 and entry.nnz == 32 * 8 * 4
    assert report.magnitude_kept == 16.0 / 19.0
    pruned = torch.tensor([0.0, 0.0, 3.0, 4.0, -8.0, 0.0, 0.0, 1.0] * 8, dtype=torch.float16).expand(32, 64)
    assert_bits_equal(exported[0].weight.to_dense(), pruned.contiguous())
    assert "pruned to 2:4 (84.21% of |w| kept)" in entry.reason


@pytest.mark.parametrize("kind", KINDS)
def test_prune_matches_semi24_mask_on_unstructured_weights(kind):
    gen = torch.Generator().manual_seed(_seed())
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=gen))
    mask = torch.rand(64, 128, generator=gen) < 0.7  # unstructured: many groups hold 3 or 4
    if kind == "sparse":
        layer = SparseLinear.from_dense(linear, mask=mask)
    else:
        layer = linear
        if kind == "masked":
            make_masked(layer, mask)
        else:
            with torch.no_grad():
                layer.weight.mul_(mask)
    dense = _masked_dense(layer)
    expected = torch.where(sparsekern.semi24_mask(dense), dense, torch.zeros((), dtype=dense.dtype))
    exported, report = export_semi24(nn.Sequential(layer), prune=True)
    assert_bits_equal(exported[0].weight.to_dense(), expected)
    entry = report["0"]
    assert entry.kind == {"plain": "Linear", "masked": "Linear (masked)", "sparse": "SparseLinear"}[kind]
    assert entry.nnz == int(torch.count_nonzero(expected)) and entry.nnz_before == int(torch.count_nonzero(dense))
    assert entry.l1_before == float(dense.double().abs().sum())
    assert entry.l1_kept == float(expected.double().abs().sum())
    assert entry.magnitude_kept == entry.l1_kept / entry.l1_before < 1.0


def test_report_str_and_to_dict():
    gen = torch.Generator().manual_seed(_seed())
    model = nn.Sequential(
        _linear_24(128, 64, "sparse", torch.float16, gen),
        nn.Conv2d(3, 8, 3).half(),
        nn.Linear(64, 10).half(),
    )
    _, report = export_semi24(model, exclude="2")
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "dtype", "nnz", "|w|", "kept", "result"]
    assert "SparseLinear" in lines[1] and "4096 (50.0%)" in lines[1] and "100.00%" in lines[1]
    assert "converted: cutlass float16" in lines[1]
    assert "Conv2d" in lines[2] and "skipped: Conv2d: torch's 2:4 kernels are matrix products" in lines[2]
    assert "skipped: matched by exclude" in lines[3]
    assert lines[-1] == "1 converted, 2 skipped; 100.00% of the converted layers' |w| kept"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["converted"] == 1 and data["skipped"] == 2 and data["magnitude_kept"] == 1.0
    assert data["layers"][0] == {
        "name": "0",
        "kind": "SparseLinear",
        "shape": [64, 128],
        "dtype": "float16",
        "converted": True,
        "reason": "cutlass float16",
        "format": "cutlass",
        "export_dtype": "float16",
        "pruned": False,
        "magnitude_kept": 1.0,
        "l1_before": report["0"].l1_before,
        "l1_kept": report["0"].l1_before,
        "nnz_before": 4096,
        "nnz": 4096,
    }
    assert [layer["kind"] for layer in data["layers"]] == ["SparseLinear", "Conv2d", "Linear"]
    assert isinstance(report, ExportReport) and report.skipped[0].shape == (8, 3, 3, 3)


def test_skip_reasons():
    gen = torch.Generator().manual_seed(_seed())

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear_24(64, 64, "plain", torch.float16, gen)
            self.mha = nn.MultiheadAttention(64, 4, dtype=torch.float16)
            self.enc = nn.TransformerEncoderLayer(64, 4, dim_feedforward=64, dtype=torch.float16)
            self.emb = nn.Embedding(10, 64, dtype=torch.float16)
            self.head = nn.Linear(64, 10, bias=False, dtype=torch.float16)
            self.tied = nn.Linear(64, 64, bias=False, dtype=torch.float16)
            self.tied2 = nn.Linear(64, 64, bias=False, dtype=torch.float16)
            self.tied2.weight = self.tied.weight

    model = Model()
    _, report = export_semi24(model, prune=True)
    reasons = {r.name: (r.converted, r.reason) for r in report.layers}
    assert reasons["fc"][0] and not reasons["fc"][1].startswith("skipped")
    assert "out_proj of nn.MultiheadAttention 'mha'" in reasons["mha.out_proj"][1]
    assert "linear1 of nn.TransformerEncoderLayer 'enc'" in reasons["enc.linear1"][1]
    assert "10 rows" in reasons["head"][1]
    assert "shared with tied.weight and tied2.weight (tied)" in reasons["tied"][1]
    assert not any(r.converted for r in report.layers if r.name != "fc")
    assert "emb" not in reasons  # embeddings are no layers to report

    class Conv1D(nn.Module):  # Hugging Face's transposed linear, recognised by its class name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(64, 128, dtype=torch.float16))

    _, report = export_semi24(nn.Sequential(Conv1D()))
    assert report["0"].kind == "Conv1D" and "convert it to an nn.Linear first" in report["0"].reason
    # an exported model exported again: its layers are already 2:4
    exported, _ = export_semi24(nn.Sequential(model.fc))
    _, again = export_semi24(exported)
    assert again.layers[0].reason == "already a 2:4 semi-structured layer"


def test_format_cusparselt_on_the_cpu_is_skipped_with_the_reason():
    gen = torch.Generator().manual_seed(_seed())
    _, report = export_semi24(nn.Sequential(_linear_24(128, 64, "plain", torch.float16, gen)), format="cusparselt")
    assert not report.converted and "format='cusparselt' needs the weight on CUDA" in report.layers[0].reason


# ---------------------------------------------------------------------------------------------------------
# int8


@pytest.mark.parametrize("kind", KINDS)
def test_int8_export_round_trip_and_cpu_forward(kind):
    gen = torch.Generator().manual_seed(_seed())
    model = _model([kind, kind], torch.float32, gen, sizes=(128, 256))  # int8 CUTLASS: columns a multiple of 128
    dense = [_masked_dense(model[0]), _masked_dense(model[2])]
    exported, report = export_semi24(model, dtype=torch.int8)
    assert [(r.converted, r.export_dtype, r.kind) for r in report.layers] == [
        (True, "int8", {"plain": "Linear", "masked": "Linear (masked)", "sparse": "SparseLinear"}[kind])
    ] * 2
    for i, w in zip((0, 2), dense, strict=True):
        layer = exported[i]
        assert isinstance(layer, Semi24Int8Linear) and layer.weight.dtype == torch.int8
        scale = w.abs().amax(dim=1) / 127
        assert_bits_equal(layer.weight_scale, scale)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        assert_bits_equal(layer.weight.to_dense(), q)
        packed, meta = torch_conversions.sparse_semi_structured_from_dense_cutlass(q)
        assert_bits_equal(layer.weight.packed, packed)
        assert_bits_equal(layer.weight.meta, meta)
        assert report.layers[i // 2].nnz == int(torch.count_nonzero(q))
        # half a step, plus the float32 rounding of q * scale (|q| <= 127: a few ulps of 127 * scale)
        assert ((layer.dequantized_weight() - w).abs() <= scale[:, None] * (0.5 + 1e-4)).all()
    # the CPU forward is the CUTLASS int8 computation, exactly: int32 sums, then the scales in float32
    x = torch.randn(3, 5, 128, generator=gen)
    layer = exported[0]
    x2 = x.reshape(-1, 128)
    xs = x2.abs().amax(dim=1, keepdim=True) / 127
    xq = (x2 / xs).round().clamp(-127, 127)
    acc = (xq.double() @ layer.weight.to_dense().double().t()).float()
    expected = (acc * layer.weight_scale * xs + model[0].bias.detach()).reshape(3, 5, 256)
    with torch.no_grad():
        assert_bits_equal(layer(x), expected)
        assert_bits_equal(layer.emulated_forward(x), expected)
        # quantization error: bounded well within a few % of the output scale on random data
        y, y_ref = exported(x), _dense_twin(model)(x)
    assert (y - y_ref).abs().max() <= 0.05 * y_ref.abs().max()


def test_int8_layer_keeps_a_half_precision_model_half():
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["plain"], torch.bfloat16, gen)
    exported, _ = export_semi24(model, dtype=torch.int8)
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        y = exported(x)
    assert y.dtype == torch.bfloat16 and exported[0].bias.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int8"):
        exported(x.to(torch.int8))
    # decompress_model keeps int8 layers (their forward decompresses) and shares their frozen weights
    copied = decompress_model(exported)
    assert isinstance(copied[0], Semi24Int8Linear) and copied[0] is not exported[0]
    assert copied[0].weight is exported[0].weight


def test_decompress_model_copies_or_changes_in_place():
    gen = torch.Generator().manual_seed(_seed())
    shared = _linear_24(128, 128, "plain", torch.float16, gen)
    exported, _ = export_semi24(nn.Sequential(shared, nn.ReLU(), shared))
    expected = _masked_dense(shared)
    copied = decompress_model(exported)
    assert isinstance(exported[0].weight, torch.sparse.SparseSemiStructuredTensorCUTLASS)  # the original is kept
    assert copied[0] is copied[2] and type(copied[0].weight) is nn.Parameter
    assert_bits_equal(copied[0].weight.detach(), expected)
    assert decompress_model(exported, inplace=True) is exported
    assert exported[0] is exported[2] and type(exported[0].weight) is nn.Parameter
    assert_bits_equal(exported[0].weight.detach(), expected)
    with pytest.raises(TypeError, match="decompress_model: inplace must be True or False, got 1"):
        decompress_model(exported, inplace=1)


# ---------------------------------------------------------------------------------------------------------
# Errors: nothing is half-converted


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_24_group_names_layer_row_and_columns(kind):
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["plain", kind], torch.float16, gen)
    layer = model[2]
    # row 5, columns 8..11 get a third nonzero
    with torch.no_grad():
        if kind == "sparse":
            mask = layer.mask
            mask[5, 8:12] = torch.tensor([True, True, True, False])
            weight = layer.dense_weight().detach()
            weight[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float16)
            lin = nn.Linear(64, 128, dtype=torch.float16)
            lin.weight.copy_(weight)
            lin.bias.copy_(layer.bias)
            model[2] = SparseLinear.from_dense(lin, mask=mask)
        else:
            layer.weight[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float16)
            if kind == "masked":
                layer.weight_mask[5, 8:12] = torch.tensor([True, True, True, False])
    state = _state(model)
    expected_kind = {"plain": "Linear", "masked": "Linear (masked)", "sparse": "SparseLinear"}[kind]
    with pytest.raises(
        ValueError,
        match=rf"export_semi24: layer '2' \({re.escape(expected_kind)} 128x64\) is not 2:4 sparse: "
        r"row 5, columns 8\.\.11 hold "
        r"3 nonzeros \(2:4 keeps at most 2; 1 such group in this layer\); pass prune=True .*exclude='2'.*"
        r"the model is unchanged",
    ):
        export_semi24(model, inplace=True)
    _assert_same_state(model, state)
    assert type(model[0]) is nn.Linear and isinstance(model[0].weight, nn.Parameter)
    assert not isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)  # layer 0 (valid) untouched


def test_masked_weight_off_the_mask_does_not_count():
    gen = torch.Generator().manual_seed(_seed())
    layer = _linear_24(128, 64, "masked", torch.float16, gen)
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer stepped the weight without the mask: everything is nonzero now
    expected = _masked_dense(layer)
    exported, report = export_semi24(nn.Sequential(layer))
    assert report["0"].converted and report["0"].magnitude_kept == 1.0
    assert_bits_equal(exported[0].weight.to_dense(), expected)


def test_every_bad_layer_is_listed():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128)).half()
    with pytest.raises(ValueError, match=r"layer '0' .* \(1 more layer: see below\).*\n  layer '1' \(Linear 128x64\)"):
        export_semi24(model)
    # a pruned export of the same model works
    _, report = export_semi24(model, prune=True)
    assert len(report.converted) == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_raises_and_changes_nothing(bad):
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["plain", "masked"], torch.float16, gen)
    with torch.no_grad():
        model[2].weight[3, 1] = bad
        model[2].weight_mask[3, 1] = True
        model[2].weight[3, 0] = 0  # keep the group 2:4 so the non-finite value is what fails
        model[2].weight[3, 2:4] = 0
    state = _state(model)
    what = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"layer '2' \(Linear \(masked\) 128x64\) holds {what}"):
        export_semi24(model, prune=True, inplace=True)
    _assert_same_state(model, state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prune": 1}, TypeError, "prune must be True or False, got 1"),
        ({"inplace": "yes"}, TypeError, "inplace must be True or False, got 'yes'"),
        ({"dtype": "fp16"}, TypeError, "dtype must be None or a torch.dtype, got 'fp16'"),
        (
            {"dtype": torch.float32},
            ValueError,
            "dtype must be None, torch.float16, torch.bfloat16 or torch.int8, got torch.float32",
        ),
        ({"format": "cslt"}, ValueError, r"format must be one of \('auto', 'cutlass', 'cusparselt'\), got 'cslt'"),
        ({"backend": "gpu"}, ValueError, "backend must be one of .*got 'gpu'"),
        ({"include": 3}, TypeError, "include must be a glob pattern or a non-empty list of glob patterns"),
        ({"exclude": []}, TypeError, "exclude must be a glob pattern or a non-empty list"),
        (
            {"include": "enc*"},
            ValueError,
            r"include pattern 'enc\*' matches no linear or conv layer \(layers: "
            r"\['0', '2'\]\)",
        ),
    ],
)
def test_bad_arguments_raise_and_change_nothing(kwargs, error, match):
    gen = torch.Generator().manual_seed(_seed())
    model = _model(["plain", "masked"], torch.float16, gen)
    state = _state(model)
    with pytest.raises(error, match=match):
        export_semi24(model, inplace=True, **kwargs) if "inplace" not in kwargs else export_semi24(model, **kwargs)
    _assert_same_state(model, state)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="export_semi24: model must be an nn.Module, got dict"):
        export_semi24({})
    with pytest.raises(TypeError, match="decompress_model: model must be an nn.Module, got list"):
        decompress_model([])


def test_exported_state_dict_loads_with_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(_seed())
    exported, _ = export_semi24(_model(["sparse", "masked"], torch.float16, gen))
    torch.save(exported.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    fresh, _ = export_semi24(_model(["plain", "plain"], torch.float16, gen))
    fresh.load_state_dict(state, assign=True)
    for i in (0, 2):
        assert_bits_equal(fresh[i].weight.to_dense(), exported[i].weight.to_dense())


def test_bench_exported_model_on_the_cpu_reports_every_row(tmp_path):
    """bench semi24 on an exported model runs anywhere; on the CPU the float 2:4 layers cannot run (no CPU 2:4
    matmul) and say so in their row, the int8 ones (CPU emulation) are timed."""
    from sparsekern.bench import semi24 as bench

    gen = torch.Generator().manual_seed(_seed())
    model = _model(["masked", "plain"], torch.float32, gen, sizes=(128, 256))
    settings = bench.Settings(repeat=2, warmup=0, max_time=0.5)
    x = torch.randn(16, 128, generator=gen)
    exported, report = export_semi24(model, dtype=torch.int8)
    rows, markdown = bench.run_exported(exported, _dense_twin(model), x, report, out=str(tmp_path), settings=settings)
    assert [r["layer"] for r in rows] == ["0", "2", "(whole model)"]
    assert all("error" not in r and r["speedup"] > 0 for r in rows)
    assert rows[0]["ok"] is None and "exported model: dense vs 2:4" in markdown
    data = json.loads((tmp_path / "semi24-exported.json").read_text())
    assert data["report"]["converted"] == 2
    half = model.half()
    exported, report = export_semi24(half)
    rows = bench.exported_model_rows(exported, decompress_model(exported), x.half(), report, settings)
    assert all("error" in r for r in rows)  # torch has no CPU 2:4 matmul


# ---------------------------------------------------------------------------------------------------------
# GPU


def _gpu_model(kinds, dtype, gen):
    return _model(kinds, dtype, gen, sizes=(1024, 2048)).cuda()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["cutlass", "cusparselt"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_forward_matches_the_masked_model(fmt, dtype):
    gen = torch.Generator().manual_seed(_seed())
    model = _gpu_model(["sparse", "masked", "plain"], dtype, gen).eval()
    twin = _dense_twin(model.cpu()).cuda()
    model.cuda()
    exported, report = export_semi24(model, format=fmt)
    assert [r.format for r in report.converted] == [fmt] * 3
    x = torch.randn(256, 1024, generator=gen).to(dtype).cuda()
    with torch.no_grad():
        y = exported(x).double()
        y_dense = twin(x).double()
        y_exact = twin.double()(x.double())
    sparse_err, dense_err = (y - y_exact).abs().max().item(), (y_dense - y_exact).abs().max().item()
    assert sparse_err <= max(2 * dense_err, torch.finfo(dtype).eps * y_exact.abs().max().item()), (
        sparse_err,
        dense_err,
    )
    # the exported weights decompress to the masked weights on the GPU as on the CPU
    decompressed = decompress_model(exported)
    for i in (0, 2, 4):
        assert_bits_equal(decompressed[i].weight, twin[i].weight.to(dtype))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["cutlass", "cusparselt"])
def test_cuda_int8_forward(fmt):
    gen = torch.Generator().manual_seed(_seed())
    model = _gpu_model(["masked", "plain"], torch.bfloat16, gen)
    exported, report = export_semi24(model, dtype=torch.int8, format=fmt)
    assert [r.format for r in report.converted] == [fmt] * 2
    x = torch.randn(100, 1024, generator=gen).to(torch.bfloat16).cuda()  # 100 tokens: padded to 112
    with torch.no_grad():
        y = exported[0](x).float()
        y_ref = exported[0].emulated_forward(x).float()  # exact int32 sums, the same float32 epilogue
    if fmt == "cutlass":  # the same sums and epilogue: equal up to one bf16 rounding of the output
        torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=0)
    else:  # the sums rounded to bf16 before the scales
        torch.testing.assert_close(y, y_ref, rtol=2**-6, atol=1e-3 * y_ref.abs().max().item())
    with torch.no_grad():  # and the whole model is close to the float model (quantization error only)
        y_model, y_float = exported(x).float(), model(x).float()
    assert (y_model - y_float).abs().max() <= 0.05 * y_float.abs().max()


@requires_gpu
@pytest.mark.gpu
def test_cuda_bench_semi24_on_an_exported_model(tmp_path):
    from sparsekern.bench import semi24 as bench

    gen = torch.Generator().manual_seed(_seed())
    model = _model(["plain", "plain"], torch.float16, gen, sizes=(4096, 11008)).cuda()
    exported, report = export_semi24(model, prune=True)
    x = torch.randn(2048, 4096, generator=gen).half().cuda()
    rows, markdown = bench.run_exported(exported, decompress_model(exported), x, report, out=str(tmp_path))
    print(markdown)
    assert [r["layer"] for r in rows] == ["0", "2", "(whole model)"]
    assert all("error" not in r for r in rows), rows
    assert all(r["ok"] for r in rows[:2]), rows


def test_bench_semi24_exported_command(tmp_path, capsys):
    from sparsekern import cli

    argv = ["bench", "semi24", "--exported", "--shape", "256x128", "--shape", "128x256", "--dtype", "int8"]
    assert cli.main([*argv, "--batch", "16", "--repeat", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "semi24-exported.json").read_text())
    assert [r["layer"] for r in data["rows"]] == ["0", "2", "(whole model)"]
    assert all("error" not in r for r in data["rows"])  # int8 layers run on the CPU (exact emulation)
    assert [layer["export_dtype"] for layer in data["report"]["layers"]] == ["int8", "int8"]
    assert "export_semi24 took" in capsys.readouterr().out
    bad = ["bench", "semi24", "--exported", "--shape", "256x128", "--shape", "256x128", "--out", str(tmp_path)]
    assert cli.main(bad) == 2
    assert "the shapes must chain" in capsys.readouterr().out


def test_docstring_examples():
    """The examples of sparsekern.export run as written (as tests/test_package.py runs the ops/nn/training ones)."""
    import doctest

    import sparsekern.export

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    torch.manual_seed(0)
    tests = doctest.DocTestFinder().find(
        sparsekern.export, "sparsekern.export", extraglobs={"torch": torch, "nn": nn, "sparsekern": sparsekern}
    )
    assert sum(len(t.examples) for t in tests) >= 4
    for test in tests:
        runner.run(test, out=out.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(out)


def test_shape_constraints_per_format():
    from sparsekern.export import _shape_reason

    assert _shape_reason((32, 64), torch.float16, "cutlass") is None
    assert _shape_reason((32, 64), torch.float16, "cusparselt") is None
    # cuSPARSELt alone would take 16 x 16, but the weight goes through the CUTLASS compressor's checks first
    assert "32 rows" in _shape_reason((16, 64), torch.float16, "cusparselt")
    assert _shape_reason((16, 128), torch.int8, "cutlass") is None
    assert _shape_reason((16, 128), torch.int8, "cusparselt") == (
        "the weight has 16 rows, but int8 cuSPARSELt 2:4 tensors need a positive multiple of 32 rows (shape (16, 128))"
    )
