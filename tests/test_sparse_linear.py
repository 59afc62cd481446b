"""SparseLinear and sparse_linear: forward and every gradient against float64 references, exact topology rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_torch_error as _assert_close
from helpers import backend_params, bits, device_for, param_pairs, peak_rss_rise, run_python

import sparsekern
from sparsekern._csr import CSRIndex, random_flat
from sparsekern.nn import SparseLinear
from sparsekern.ops.sparse_linear import sparse_linear

BACKENDS = backend_params("cpu", "reference", "triton", "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, n_in, n_out): odd, not multiples of any tile; one batch past a 64-lane tile
SHAPES = [(1, 13, 7), (7, 37, 70), (67, 70, 33)]


def _mask(n_out, n_in, density, device="cpu"):
    if density == 0.0:
        return torch.zeros(n_out, n_in, dtype=torch.bool, device=device)
    if density == 1.0:
        return torch.ones(n_out, n_in, dtype=torch.bool, device=device)
    mask = torch.rand(n_out, n_in, device=device) < density
    mask[0] = False  # an empty row
    mask[-1] = True  # a full row
    return mask


@pytest.mark.parametrize(
    ("backend", "path"), param_pairs(BACKENDS, ["sparse", "dense"], lambda b, p: b != "reference" or p == "sparse")
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_forward_and_gradients(backend, dtype, shape, density, path):
    device = device_for(backend)
    batch, n_in, n_out = shape
    mask = _mask(n_out, n_in, density, device)
    index = CSRIndex.from_mask(mask)
    x = torch.randn(batch, n_in, device=device).to(dtype).requires_grad_()
    values = torch.randn(index.nnz, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n_out, device=device).to(dtype).requires_grad_()
    g = torch.randn(batch, n_out, device=device).to(dtype)

    y = sparse_linear(x, values, index, bias, backend=backend, path=path)
    y.backward(g)

    w64 = index.to_dense(values.detach().double())
    x64, g64 = x.detach().double(), g.double()
    y64 = F.linear(x64, w64, bias.detach().double())
    w_torch = index.to_dense(values.detach())
    torch_y = F.linear(x.detach(), w_torch, bias.detach())
    assert y.dtype == dtype and y.shape == (batch, n_out)
    _assert_close(y, y64, torch_y)

    gx64 = g64 @ w64
    _assert_close(x.grad, gx64, g @ w_torch)
    gw64 = (g64.T @ x64)[mask]
    _assert_close(values.grad, gw64, (g.T @ x.detach())[mask])
    assert torch.allclose(bias.grad.double(), g64.sum(0), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def test_gradcheck_float64():
    index = CSRIndex.from_mask(_mask(6, 9, 0.4))
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    values = torch.randn(index.nnz, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for path in ("sparse", "dense"):
        assert torch.autograd.gradcheck(
            lambda a, v, b, path=path: sparse_linear(a, v, index, b, path=path), (x, values, bias)
        )


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
def test_gradcheck_cpu_kernels_in_float32():
    """The C++ kernels have no float64; check their gradients against finite differences in float32."""
    index = CSRIndex.from_mask(_mask(5, 8, 0.5))
    x = torch.randn(3, 8, requires_grad=True)
    values = torch.randn(index.nnz, requires_grad=True)
    y = sparse_linear(x, values, index, backend="cpu", path="sparse")
    gx, gv = torch.autograd.grad(y.square().sum(), (x, values))
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    y64 = sparse_linear(x64, v64, index, backend="reference")
    gx64, gv64 = torch.autograd.grad(y64.square().sum(), (x64, v64))
    assert torch.allclose(gx.double(), gx64, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gv.double(), gv64, rtol=1e-4, atol=1e-5)


def test_layer_leading_shape_and_dense_equivalence():
    layer = SparseLinear(20, 12, sparsity=0.75)
    x = torch.randn(2, 3, 5, 20)
    y = layer(x)
    assert y.shape == (2, 3, 5, 12)
    assert torch.allclose(y, layer.to_dense()(x), rtol=1e-5, atol=1e-5)
    assert layer.nnz == round(0.25 * 240) and layer.values.shape == (layer.nnz,)
    assert torch.equal(layer.mask.sum(), torch.tensor(layer.nnz))
    rows, cols = layer.indices()
    assert torch.equal(layer.dense_weight()[rows, cols], layer.values.detach())
    assert "sparsity=0.7500, nnz=60" in repr(layer)


def test_from_dense_keeps_largest_and_round_trips():
    linear = torch.nn.Linear(16, 8)
    layer = SparseLinear.from_dense(linear, sparsity=0.5)
    magnitude = linear.weight.detach().abs()
    kept, dropped = magnitude[layer.mask], magnitude[~layer.mask]
    assert layer.nnz == 64 and kept.min() >= dropped.max()
    dense = layer.to_dense()
    assert torch.equal(dense.weight, linear.weight.detach() * layer.mask)
    assert torch.equal(dense.bias, linear.bias)
    mask = torch.rand(8, 16) < 0.3
    assert torch.equal(SparseLinear.from_dense(linear, mask=mask).mask, mask)


def test_state_dict_round_trip_with_other_topology():
    a, b = SparseLinear(30, 10, sparsity=0.9), SparseLinear(30, 10, sparsity=0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mask, a.mask) and torch.equal(b.values, a.values) and b.nnz == a.nnz
    x = torch.randn(4, 30)
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"values", "bias", "row_ptr", "col_idx"}


def test_update_topology_keeps_values_zeroes_new_and_maps_slots():
    layer = SparseLinear(6, 4, mask=torch.tensor([[1, 0, 1, 0, 0, 0]] * 4, dtype=torch.bool))
    old_flat, old_values = layer.flat_indices(), layer.values.detach().clone()
    values_param = layer.values
    drop = torch.tensor([0, 8])  # (0,0) and (1,2)
    grow = torch.tensor([1, 8, 23])  # (0,1) new, (1,2) regrown -> kept with its value, (3,5) new
    update = layer.update_topology(drop=drop, grow=grow)
    assert layer.values is values_param
    assert layer.nnz == 9 and update.nnz == 9
    new_flat = layer.flat_indices()
    expected = sorted((set(old_flat.tolist()) - {0}) | {1, 23})
    assert new_flat.tolist() == expected
    for slot, flat in enumerate(old_flat.tolist()):
        if flat == 0:
            assert update.old_to_new[slot] == -1
        else:
            assert new_flat[update.old_to_new[slot]] == flat
            assert layer.values[update.old_to_new[slot]] == old_values[slot]
    assert new_flat[update.grown].tolist() == [1, 23]
    assert layer.values[update.grown].tolist() == [0.0, 0.0]
    assert torch.equal(layer.index.csc_ptr, CSRIndex.from_mask(layer.mask).csc_ptr)


@pytest.mark.parametrize(
    "drop, grow, match",
    [
        ([0, 0], [], r"drop has repeated indices"),
        ([1], [], r"drop names inactive connection 1"),
        ([], [2], r"grow names connection 2, which is active and not dropped"),
        ([], [24], r"grow indices must lie in \[0, 24\)"),
        ([-1], [], r"drop indices must lie in"),
    ],
)
def test_update_topology_is_atomic_on_error(drop, grow, match):
    layer = SparseLinear(6, 4, mask=torch.tensor([[1, 0, 1, 0, 0, 0]] * 4, dtype=torch.bool))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        layer.update_topology(drop=torch.tensor(drop, dtype=torch.int64), grow=torch.tensor(grow, dtype=torch.int64))
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_topology_update_carries_optimizer_state():
    layer = SparseLinear(8, 4, sparsity=0.5)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(3, 8)).sum().backward()
    opt.step()
    state = opt.state[layer.values]["exp_avg"].clone()
    active = layer.flat_indices()
    inactive = torch.tensor(sorted(set(range(32)) - set(active.tolist()))[:2])
    update = layer.update_topology(drop=active[:2], grow=inactive)
    moved = update.apply(state)
    assert moved.shape == (layer.nnz,)
    assert torch.equal(moved[update.grown], torch.zeros(2))
    kept = update.old_to_new >= 0
    assert torch.equal(moved[update.old_to_new[kept]], state[kept])


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("sparsity", [0.8, 0.2], ids=["sparse-path", "dense-path"])
def test_torch_compile_fullgraph(sparsity):
    layer = SparseLinear(24, 16, sparsity=sparsity)
    x = torch.randn(5, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), layer(x)
    assert torch.allclose(y, y_eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.values))
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, layer.values))
    for got, want in zip(grads, grads_eager, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])  # fp16: always sparse
def test_dense_path_workspace_follows_values_and_topology(dtype):
    """The dense path reuses one dense weight per topology: it must see every value change (including fused
    AdamW's, which does not bump the version counter), a new topology, and a second call before backward."""
    torch.manual_seed(0)
    layer = SparseLinear(37, 29, mask=_mask(29, 37, 0.7), dtype=dtype)  # 70% density: the dense path
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    for step in range(3):
        x = torch.randn(6, 37, dtype=dtype)
        y1, y2 = layer(x), layer(x * 2)  # two calls in one graph, like a shared layer
        assert layer._workspace._weight is not None  # the dense path ran, through the workspace
        (y1.float().square().sum() + y2.float().sum()).backward()
        w = layer.dense_weight().detach().double().requires_grad_()
        x64 = x.double()
        r1, r2 = F.linear(x64, w, layer.bias.double()), F.linear(x64 * 2, w, layer.bias.double())
        (r1.square().sum() + r2.sum()).backward()
        _assert_close(y1, r1.detach(), F.linear(x, layer.dense_weight().detach(), layer.bias))
        rows, cols = layer.indices()
        expected = w.grad[rows, cols]
        tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
        assert torch.allclose(layer.values.grad.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
        opt.step()
        opt.zero_grad()
        if step == 1:  # a new topology: drop 5 connections, grow 5 others
            inactive = (~layer.mask).flatten().nonzero().flatten()
            layer.update_topology(drop=layer.flat_indices()[:5], grow=inactive[:5])
    with torch.no_grad():
        x = torch.randn(4, 37, dtype=dtype)
        assert torch.equal(layer(x), layer.to_dense()(x))


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])  # fp16: always sparse
def test_dense_path_inference_sees_every_value_edit(dtype):
    """In an inference loop the workspace rewrites only rows whose values changed: edits behind autograd's back
    (through .data: no version bump), a changed sign of zero, load_state_dict and in-place copies must all show."""
    torch.manual_seed(1)
    layer = SparseLinear(45, 33, mask=_mask(33, 45, 0.7), dtype=dtype)
    x = torch.randn(5, 45, dtype=dtype)

    def check():
        y = layer(x)
        assert layer._workspace._weight is not None  # the dense path ran
        assert torch.equal(bits(layer._workspace._weight), bits(layer.dense_weight().detach()))
        assert torch.equal(y, F.linear(x, layer.dense_weight().detach(), layer.bias))

    with torch.no_grad():
        check()
        check()  # nothing changed
        layer.values.data[100] += 1  # one value, no version bump
        check()
        layer.values.data[7] = 0.0
        check()
        layer.values.data[7] = -0.0  # equal as numbers, not as bits
        check()
        layer.values.copy_(torch.randn_like(layer.values))
        check()
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["values"] = torch.randn_like(layer.values)
        layer.load_state_dict(state)
        check()


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
def test_opcheck():
    index = CSRIndex.from_mask(_mask(9, 11, 0.4))
    x, values = torch.randn(5, 11), torch.randn(index.nnz)
    torch.library.opcheck(torch.ops.sparsekern.spmm.default, (x, index.row_ptr, index.col_idx, values, 9))
    g = torch.randn(5, 9)
    torch.library.opcheck(torch.ops.sparsekern.sddmm.default, (g, x, index.row_ptr, index.col_idx))
    args = (x.requires_grad_(), values.requires_grad_(), *index[:5], None, 9, "cpu")
    torch.library.opcheck(torch.ops.sparsekern.sparse_linear.default, args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"in_features": 0, "out_features": 3, "sparsity": 0.5}, ValueError, r"in_features must be a positive int"),
        ({"in_features": 4, "out_features": 3}, ValueError, r"exactly one of sparsity= or mask="),
        ({"in_features": 4, "out_features": 3, "sparsity": 1.5}, ValueError, r"sparsity must be a number in \[0, 1\]"),
        (
            {"in_features": 4, "out_features": 3, "mask": torch.ones(4, 3, dtype=torch.bool)},
            ValueError,
            r"mask must have shape \(3, 4\)",
        ),
        ({"in_features": 4, "out_features": 3, "mask": torch.ones(3, 4)}, TypeError, r"mask must have dtype bool"),
        ({"in_features": 4, "out_features": 3, "sparsity": 0.5, "dtype": torch.int32}, TypeError, r"dtype must be"),
    ],
    ids=["in0", "neither", "range", "mask-shape", "mask-dtype", "dtype"],
)
def test_layer_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseLinear(**kwargs)


def test_functional_bad_arguments():
    index = CSRIndex.from_mask(_mask(4, 6, 0.5))
    values = torch.randn(index.nnz)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \(2, 5\)"):
        sparse_linear(torch.randn(2, 5), values, index)
    with pytest.raises(TypeError, match=r"values must have dtype float16"):
        sparse_linear(torch.randn(2, 6).half(), values, index)
    with pytest.raises(ValueError, match=r"values must have one entry per nonzero"):
        sparse_linear(torch.randn(2, 6), values[:-1], index)
    with pytest.raises(ValueError, match=r"path must be one of"):
        sparse_linear(torch.randn(2, 6), values, index, path="fast")
    with pytest.raises(ValueError, match=r"bias must have 4 entries"):
        sparse_linear(torch.randn(2, 6), values, index, torch.randn(3))


def test_spmm_and_sddmm_check_indices():
    from sparsekern.ops.sddmm import sddmm
    from sparsekern.ops.spmm import spmm

    index = CSRIndex.from_mask(_mask(4, 6, 0.5))
    x, values = torch.randn(3, 6), torch.randn(index.nnz)
    bad_cols = index.col_idx.clone()
    bad_cols[0] = 6
    with pytest.raises(ValueError, match=r"col_idx must lie in \[0, 6\)"):
        spmm(x, index.row_ptr, bad_cols, values, 4)
    with pytest.raises(ValueError, match=r"row_ptr must have 5 entries"):
        spmm(x, index.row_ptr[:-1].contiguous(), index.col_idx, values, 4)
    with pytest.raises(TypeError, match=r"col_idx must have dtype int32"):
        spmm(x, index.row_ptr, index.col_idx.long(), values, 4)
    with pytest.raises(ValueError, match=r"g and x must have the same batch size"):
        sddmm(torch.randn(2, 4), x, index.row_ptr, index.col_idx)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
def test_portable_cpu_kernels_match_reference():
    """CI machines have AVX-512, so the portable spmm/sddmm path is forced in a subprocess."""
    code = (
        "import torch, sparsekern\n"
        "from sparsekern._csr import CSRIndex\n"
        "from sparsekern.ops.sparse_linear import sparse_linear\n"
        "assert sparsekern._extension.build_info()['cpu_isa'].startswith('baseline')\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    mask = torch.rand(37, 70) < 0.3\n"
        "    index = CSRIndex.from_mask(mask)\n"
        "    x = torch.randn(67, 70).to(dtype).requires_grad_()\n"
        "    v = torch.randn(index.nnz).to(dtype).requires_grad_()\n"
        "    y = sparse_linear(x, v, index, backend='cpu', path='sparse')\n"
        "    gx, gv = torch.autograd.grad(y.float().square().sum(), (x, v))\n"
        "    x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()\n"
        "    y64 = sparse_linear(x64, v64, index, backend='reference')\n"
        "    gx64, gv64 = torch.autograd.grad(y.detach().double().mul(2).mul(y64).sum(), (x64, v64))\n"
        "    tol = 1e-4 if dtype == torch.float32 else 3e-2\n"
        "    assert torch.allclose(y.double(), y64, rtol=tol, atol=tol), dtype\n"
        "    assert torch.allclose(gx.double(), gx64, rtol=tol, atol=tol * 10), dtype\n"
        "    assert torch.allclose(gv.double(), gv64, rtol=tol, atol=tol * 10), dtype\n"
    )
    result = run_python(code, SPARSEKERN_CPU_ISA="baseline")
    assert result.returncode == 0, result.stderr


def test_auto_path_depends_on_batch_and_training(monkeypatch):
    from sparsekern.ops import sparse_linear as op

    index = CSRIndex.from_mask(torch.arange(100 * 10).view(100, 10) % 10 < 4)  # density exactly 0.4
    big, small = torch.randn(256, 10), torch.randn(op.SMALL_BATCH, 10)
    assert op.choose_path("auto", index, big, "cpu") == "dense"  # 0.4 > inference 0.35
    assert op.choose_path("auto", index, small, "cpu") == "sparse"  # <= small-batch 0.5
    assert op.choose_path("auto", index, small, "cpu", training=True) == "dense"  # > training 0.35
    assert op.choose_path("auto", index, big, "reference") == "sparse"
    assert op.choose_path("dense", index, small, "cpu") == "dense"
    assert op.density_crossover("xla", torch.float32, 8, False) == 0.0

    taken = []
    real = op._dense_path
    monkeypatch.setattr(op, "_dense_path", lambda *a: taken.append("dense") or real(*a))
    values = torch.randn(index.nnz)
    if sparsekern._extension.available():
        sparse_linear(small, values, index)  # inference, small batch: sparse
        assert taken == []
        sparse_linear(small, values.requires_grad_(), index)  # a backward follows: dense
        assert taken == ["dense"]
        with torch.no_grad():
            sparse_linear(small, values, index)
        assert taken == ["dense"]


def test_update_topology_memory_is_nnz_sized():
    """A topology update never builds anything of n_out * n_in entries: at 8192^2 and 99% sparsity its peak
    extra memory stays below one byte per weight position (the old dense-bitmap version took 9 bytes)."""
    setup = (
        "torch.manual_seed(0)\n"
        "layer = sparsekern.nn.SparseLinear(8192, 8192, sparsity=0.99)\n"
        "flat = layer.flat_indices()\n"
        "drop = flat[torch.randperm(flat.numel())[:20000]]\n"
        "grow = torch.randint(0, 8192 * 8192, (40000,)).unique()\n"
        "grow = grow[~torch.isin(grow, flat)][:20000]"
    )
    measured = (
        "update = layer.update_topology(drop=drop, grow=grow)\n"
        "assert layer.nnz == flat.numel() and update.grown.numel() == 20000"
    )
    assert peak_rss_rise(setup, measured, OMP_NUM_THREADS="1") < 8192 * 8192


@pytest.mark.parametrize(
    "numel, count", [(1, 0), (1, 1), (10, 3), (10, 7), (1000, 500), (1000, 501), (97, 97), (1000, 124), (1000, 125)]
)
def test_random_flat_is_exact_distinct_and_sorted(numel, count):
    flat = random_flat(numel, count)
    assert flat.dtype == torch.int64 and flat.numel() == count
    assert torch.equal(flat, flat.unique())  # distinct and ascending
    assert count == 0 or (0 <= int(flat[0]) and int(flat[-1]) < numel)


@pytest.mark.parametrize("count", [2, 3])  # both through randperm (count >= numel / 8)
def test_random_flat_is_uniform_over_subsets(count):
    """All C(5, count) = 10 subsets about equally often: 20000 draws, 2000 expected each, sd about 42."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = {}
    for _ in range(20000):
        key = tuple(random_flat(5, count, generator=gen).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 10
    assert all(abs(c - 2000) < 6 * 42 for c in counts.values()), counts


def test_random_flat_by_rejection_is_uniform_over_positions():
    """Below numel / 8 it draws by rejection: 3 of 40 positions, 20000 times; each position 1500 times expected,
    sd about 37."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts = torch.zeros(40)
    for _ in range(20000):
        flat = random_flat(40, 3, generator=gen)
        assert flat.numel() == 3 and torch.equal(flat, flat.unique())
        counts[flat] += 1
    assert float((counts - 1500).abs().max()) < 6 * 37, counts


def test_random_layer_construction_is_nnz_sized():
    """SparseLinear(sparsity=) draws its positions without anything of n_out * n_in entries: randperm took 8
    bytes per position (512 MiB here, plus a 64 MiB bool mask); now the peak is O(nnz), nnz = 67109."""
    measured = (
        "layer = sparsekern.nn.SparseLinear(8192, 8192, sparsity=0.999, bias=False)\n"
        "assert layer.nnz == round(0.001 * 8192 * 8192)"
    )
    warm = "sparsekern.nn.SparseLinear(64, 64, sparsity=0.999)  # first-use costs (code pages) are not per nnz"
    assert peak_rss_rise(warm, measured, OMP_NUM_THREADS="1") < 8192 * 8192 // 4
