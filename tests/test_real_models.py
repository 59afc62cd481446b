"""sparsify() on the models users bring: torchvision, timm and transformers models (tiny configs, random weights)
when those libraries are installed, and self-contained stand-ins for each pattern that always run: a language
model whose head is tied to its embedding, torch's MultiheadAttention / TransformerEncoderLayer, and a GPT-2
shaped block of transposed-linear ``Conv1D`` layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear
from sparsekern.training import keep_masks, sparsify, sparsity_report
from sparsekern.training.sparsify import is_conv1d, sparse_layers

LAYOUTS = ["sparse", "masked"]


def need(name: str):
    """The library, or a skip that says why (a missing dependency of it skips the same way)."""
    return pytest.importorskip(name, reason=f"{name} is not installed (or one of its dependencies is missing)")


def masks_of(model) -> dict[str, torch.Tensor]:
    return {n: m.mask if isinstance(m, SparseLinear) else m.weight_mask for n, m in sparse_layers(model).items()}


def train(model, optimizer, batches, loss_fn, *, sparsifier=None):
    for batch in batches:
        loss_fn(model, batch).backward()
        (sparsifier or optimizer).step()
        optimizer.zero_grad()


def assert_zeros_are_the_masks(model):
    report = sparsity_report(model)
    assert all(r.off_mask == 0 for r in report.layers), [(r.name, r.off_mask) for r in report.layers]
    assert report.measured_sparsity >= report.sparsity
    return report


# -- stand-ins ----------------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's attribute layout: y = x @ weight + bias with weight (nx, nf), ``nf``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("layout", ["sparse", "masked"])
def test_transposed_linear_conv1d_is_masked(layout):
    net = nn.Sequential(Conv1D(12, 5), nn.ReLU(), Conv1D(3, 12))
    w0 = net[0].weight.detach().clone()
    report = sparsify(net, 0.75, layout=layout, distribution="uniform", generator=torch.Generator().manual_seed(0))
    assert [(r.name, r.kind, r.shape, r.nnz, r.layout) for r in report.layers] == [
        ("0.weight", "Conv1D", (5, 12), 15, "masked"),
        ("2.weight", "Conv1D", (12, 3), 9, "masked"),
    ]
    assert is_conv1d(net[0])
    mask = net[0].weight_mask
    assert torch.equal(net[0].weight.detach(), w0 * mask)
    x = torch.randn(2, 4, 5)
    assert net(x).shape == (2, 4, 3)
    # not a Conv1D: the name alone is not enough (nf must be the weight's second dim)
    odd = Conv1D(4, 4)
    odd.nf = 5
    assert not is_conv1d(odd)
    with pytest.raises(ValueError, match=r"left dense: weight: Conv1D.weight is not the weight of a supported layer"):
        sparsify(odd, 0.5)


class TinyLM(nn.Module):
    """A GPT-2 shaped language model: token and position embeddings, Conv1D attention and MLP projections (or
    nn.Linear ones), and an output head tied to the token embedding."""

    def __init__(self, vocab=50, dim=16, positions=12, conv1d=True):
        super().__init__()
        proj = Conv1D if conv1d else (lambda n_out, n_in: nn.Linear(n_in, n_out))
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
        self.c_attn, self.c_proj = proj(3 * dim, dim), proj(dim, dim)
        self.c_fc, self.mlp_proj = proj(4 * dim, dim), proj(dim, 4 * dim)
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as language models do

    def forward(self, ids):
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        q, k, v = self.c_attn(h).chunk(3, dim=-1)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        h = h + self.c_proj(nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal))
        h = h + self.mlp_proj(torch.relu(self.c_fc(self.ln(h))))
        return self.lm_head(h)


def lm_loss(model, ids):
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("conv1d", [True, False], ids=["conv1d", "linear"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tied_lm_keeps_its_embedding_and_head_dense_and_tied(layout, conv1d):
    torch.manual_seed(0)
    model = TinyLM(conv1d=conv1d)
    embedding = model.wte.weight.detach().clone()
    report = sparsify(model, 0.9, layout=layout, generator=torch.Generator().manual_seed(0))
    assert [r.name for r in report.layers] == ["c_attn.weight", "c_proj.weight", "c_fc.weight", "mlp_proj.weight"]
    assert {r.layout for r in report.layers} == {"sparse" if layout == "sparse" and not conv1d else "masked"}
    assert model.lm_head.weight is model.wte.weight and type(model.lm_head) is nn.Linear
    assert torch.equal(model.wte.weight.detach(), embedding)  # not one zero more in the embedding
    assert not hasattr(model.wte, "weight_mask") and not hasattr(model.lm_head, "weight_mask")
    assert {s.name: s.reason for s in report.skipped} == {
        "wte.weight": "tied: the same Parameter as lm_head.weight; left dense and tied",
        "wpe.weight": "embedding: never sparsified",
    }
    assert report.sparsity == pytest.approx(0.9, abs=1e-3)
    # training keeps the tie and the masks, through a sparsifier and through a plain optimizer loop
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (4, 12), generator=gen) for _ in range(3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, batches, lm_loss, sparsifier=sparsekern.Static(model, opt))
    if layout == "masked" or conv1d:
        keep_masks(model, opt)
    train(model, opt, batches, lm_loss)
    assert model.lm_head.weight is model.wte.weight
    assert not torch.equal(model.wte.weight.detach(), embedding)  # trained, dense
    assert_zeros_are_the_masks(model)
    # the state_dict loads into the same model sparsified the same way
    fresh = TinyLM(conv1d=conv1d)
    sparsify(fresh, 0.9, layout=layout, generator=torch.Generator().manual_seed(0))
    fresh.load_state_dict(model.state_dict())
    ids = batches[0]
    torch.testing.assert_close(fresh(ids), model(ids))


def test_transformer_encoder_layer_covers_every_matrix():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    report = sparsify(layer, 0.8, layout="masked", generator=torch.Generator().manual_seed(0))
    assert [r.name for r in report.layers] == [
        "self_attn.in_proj_weight",
        "self_attn.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ]
    assert report.skipped == () and report.coverage == 1.0
    assert str(report).splitlines()[1].split()[:3] == ["self_attn.in_proj_weight", "MultiheadAttention", "48x16"]
    x = torch.randn(3, 5, 16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    keep_masks(layer, opt)
    train(layer, opt, [x, x], lambda m, b: m(b).square().mean())
    assert_zeros_are_the_masks(layer)
    w = layer.self_attn.in_proj_weight.detach()
    assert not bool(w[~layer.self_attn.in_proj_weight_mask].any())
    # eval takes torch's fused path, which reads in_proj_weight itself: the same function as training mode
    expected = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_transformer_encoder_layer_compressed_trains():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    report = sparsify(layer, 0.8, generator=torch.Generator().manual_seed(0))
    assert [(r.name, r.layout) for r in report.layers] == [
        ("self_attn.in_proj_weight", "masked"),
        ("self_attn.out_proj.weight", "masked"),  # MultiheadAttention reads out_proj.weight itself
        ("linear1.weight", "sparse"),
        ("linear2.weight", "sparse"),
    ]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sparsifier = sparsekern.Static(layer, opt)
    x = torch.randn(3, 5, 16)
    before = masks_of(layer)
    train(layer, opt, [x, x], lambda m, b: m(b).square().mean(), sparsifier=sparsifier)
    assert all(torch.equal(before[n], m) for n, m in masks_of(layer).items())
    assert_zeros_are_the_masks(layer)


# -- the real libraries (tiny configs, random weights; skipped when not installed) -----------------------------------


def test_torchvision_resnet18():
    torchvision = need("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    report = sparsify(model, 0.9, generator=torch.Generator().manual_seed(0))
    assert len(report.layers) == 21 and report.skipped == () and report.coverage == 1.0  # 20 convs + fc
    assert isinstance(model.fc, SparseLinear) and hasattr(model.conv1, "weight_mask")
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    train(model, opt, [(x, y)], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
          sparsifier=sparsekern.Static(model, opt))  # fmt: skip
    assert_zeros_are_the_masks(model)


def test_timm_vit_tiny():
    timm = need("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    report = sparsify(model, 0.9, generator=torch.Generator().manual_seed(0))
    assert {s.name: s.reason.split(" is ")[0] for s in report.skipped} == {
        "cls_token": "VisionTransformer.cls_token",
        "pos_embed": "VisionTransformer.pos_embed",
    }
    assert report.layers[0].name == "patch_embed.proj.weight" and report.layers[0].layout == "masked"
    assert isinstance(model.blocks[0].attn.qkv, SparseLinear) and isinstance(model.head, SparseLinear)
    assert len(report.layers) == 1 + 12 * 4 + 1 and report.coverage > 0.99
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    train(model, opt, [(x, y)], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
          sparsifier=sparsekern.Static(model, opt))  # fmt: skip
    assert_zeros_are_the_masks(model)


def _gpt2(transformers):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_gpt2(layout):
    transformers = need("transformers")
    torch.manual_seed(0)
    model = _gpt2(transformers)
    embedding = model.transformer.wte.weight.detach().clone()
    report = sparsify(model, 0.9, layout=layout, generator=torch.Generator().manual_seed(0))
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [r.name for r in report.layers] == [f"transformer.h.{i}.{n}.weight" for i in range(2) for n in per_block]
    assert {(r.kind, r.layout) for r in report.layers} == {("Conv1D", "masked")}  # GPT-2's real matrices
    assert {s.name: s.reason for s in report.skipped} == {
        "transformer.wte.weight": "tied: the same Parameter as lm_head.weight; left dense and tied",
        "transformer.wpe.weight": "embedding: never sparsified",
    }
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight.detach(), embedding)
    # an HF Trainer-style loop: a plain optimizer, the masks kept by keep_masks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keep_masks(model, opt)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    train(model, opt, [ids, ids], lambda m, b: m(b, labels=b).loss)
    assert_zeros_are_the_masks(model)
    model.tie_weights()
    fresh = _gpt2(transformers)
    sparsify(fresh, 0.9, layout=layout, generator=torch.Generator().manual_seed(0))
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_transformers_bert():
    transformers = need("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.BertModel(config)
    report = sparsify(model, 0.9, generator=torch.Generator().manual_seed(0))
    assert len(report.layers) == 2 * 6 + 1 and {r.layout for r in report.layers} == {"sparse"}  # + the pooler
    assert sorted(s.name for s in report.skipped) == [
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.word_embeddings.weight",
    ]
    assert {s.reason for s in report.skipped} == {"embedding: never sparsified"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    train(model, opt, [ids], lambda m, b: m(b).last_hidden_state.square().mean(),
          sparsifier=sparsekern.Static(model, opt))  # fmt: skip
    assert_zeros_are_the_masks(model)
