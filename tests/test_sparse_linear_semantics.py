"""sparse_linear / SparseLinear semantics beyond the plain product: double backward, threads, inf/NaN, autocast,
the ``weight`` copy, non-finite weights, construction memory and copies (issue 11)."""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, device_for, isa_params, peak_rss_rise
from torch import nn

import sparsekern
from sparsekern._csr import CSRIndex
from sparsekern.nn import SparseLinear
from sparsekern.ops.sparse_linear import _transposed, sparse_linear

PATHS = ["sparse", "dense"]
needs_extension = pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")


def _mask(n_out, n_in, density, generator=None):
    mask = torch.rand(n_out, n_in, generator=generator) < density
    mask[0] = False  # an empty row
    mask[-1] = True  # a full row
    return mask


def _error(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max())


# -- double backward ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_double_backward_gradgradcheck(path):
    mask = _mask(5, 7, 0.4)
    index = CSRIndex.from_mask(mask)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    values = torch.randn(index.nnz, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x, values, bias):
        return sparse_linear(x, values, index, bias, path=path)

    assert torch.autograd.gradgradcheck(fn, (x, values, bias))


def _second_order(x, values, linear):
    """d/d(x, values) of |dL/dx|^2 + |dL/dvalues|^2, L = |linear(x, values)|^2: values' part of the gradient
    depends on x and x's part on values, so both cross terms are exercised."""
    y = linear(x, values)
    gx, gv = torch.autograd.grad(y.square().sum(), (x, values), create_graph=True)
    return torch.autograd.grad(gx.square().sum() + gv.square().sum(), (x, values))


@needs_extension
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("path", PATHS)
def test_double_backward_of_the_kernels_matches_float64(cpu_isa, path):
    """float32 kernels on both paths against the float64 dense product (the dense path used to be off by ~6)."""
    index = CSRIndex.from_mask(_mask(33, 45, 0.5))
    x = torch.randn(19, 45, requires_grad=True)
    values = torch.randn(index.nnz, requires_grad=True)
    got = _second_order(x, values, lambda x, v: sparse_linear(x, v, index, path=path))
    x64, v64 = (t.detach().double().requires_grad_() for t in (x, values))
    want = _second_order(x64, v64, lambda x, v: x @ index.to_dense(v).T)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert _error(g, w) <= 1e-5 * float(w.abs().max())


def test_double_backward_through_the_layer_trains_a_gradient_penalty():
    """A gradient penalty through a float32 layer on its dense path (density 0.5), against float64."""
    torch.manual_seed(0)
    layer = SparseLinear(40, 24, sparsity=0.5)
    x = torch.randn(6, 40, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).tanh().sum(), x, create_graph=True)
    gx.square().sum().backward()
    dense = layer.to_dense().double()
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(dense(x64).tanh().sum(), x64, create_graph=True)
    gx64.square().sum().backward()
    for got, want in ((layer.values.grad, dense.weight.grad[layer.mask]), (layer.bias.grad, dense.bias.grad)):
        assert _error(got, want) <= 1e-5 * float(want.abs().max())


# -- threads -----------------------------------------------------------------------------------------------------
@needs_extension
def test_threads_share_one_layer_on_the_dense_path():
    """6 threads train (forward + backward) one layer at once on the dense path, half of them also running
    inference between: every result equals the single-thread float64 one. With one shared workspace (weight
    and gradient buffer), about 1 in 5 of these iterations came out wrong."""
    torch.manual_seed(0)
    layer = SparseLinear(512, 384, sparsity=0.2)  # density 0.8: the dense path in float32
    w64 = layer.index.to_dense(layer.values.detach().double())
    b64 = layer.bias.detach().double()
    n_threads, iterations = 6, 20
    inputs = [[torch.randn(48 + t, 512) for _ in range(iterations)] for t in range(n_threads)]
    failures: list[str] = []
    start = threading.Barrier(n_threads)

    def work(t):
        start.wait()
        for i, x in enumerate(inputs[t]):
            x = x.clone().requires_grad_()
            y = layer(x)
            y64 = x.detach().double() @ w64.T + b64
            gx, gv = torch.autograd.grad(y.square().sum(), (x, layer.values))
            g64 = 2 * y64
            if _error(y, y64) > 1e-4:
                failures.append(f"thread {t} iteration {i}: forward")
            if _error(gx, g64 @ w64) > 1e-3 or _error(gv, (g64.T @ x.detach().double())[layer.mask]) > 1e-3:
                failures.append(f"thread {t} iteration {i}: gradients")
            if t % 2:
                with torch.no_grad():
                    if _error(layer(x), y64) > 1e-4:
                        failures.append(f"thread {t} iteration {i}: inference")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:5]
    assert not layer._workspace._lock.locked()


@needs_extension
def test_dense_workspace_held_by_a_pending_backward():
    """A training call holds the workspace until its backward: a second call before that (a layer used twice, or
    another thread) gets its own weight, and dropping a graph without a backward gives the workspace back."""
    layer = SparseLinear(40, 30, sparsity=0.2)
    x1, x2 = torch.randn(5, 40, requires_grad=True), torch.randn(7, 40, requires_grad=True)
    y1 = layer(x1)
    assert layer._workspace._lock.locked()
    with pytest.warns(RuntimeWarning, match="dense workspace is busy"):
        y2 = layer(x2)  # a weight of its own
    loss = y1.square().sum() + (2 * y2).sum()
    loss.backward()
    assert not layer._workspace._lock.locked()
    dense = layer.to_dense()
    (dense(x1).square().sum() + (2 * dense(x2)).sum()).backward()
    assert torch.allclose(layer.values.grad, dense.weight.grad[layer.mask], rtol=1e-5, atol=1e-5)

    y = layer(x1)
    assert layer._workspace._lock.locked()
    del y  # no backward will come
    assert not layer._workspace._lock.locked()


@needs_extension
def test_dense_path_second_backward_with_retain_graph():
    layer = SparseLinear(40, 30, sparsity=0.2)
    x = torch.randn(5, 40, requires_grad=True)
    y = layer(x)
    first = torch.autograd.grad(y.square().sum(), (x, layer.values), retain_graph=True)
    with torch.no_grad():
        layer(torch.randn(5, 40))  # takes the workspace in between
    second = torch.autograd.grad(y.square().sum(), (x, layer.values))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_extension
def test_dense_path_values_changed_before_backward_is_reported():
    """As for nn.Linear: an in-place change of the values between a forward and its backward is an error, not a
    gradient of other numbers (the dense path now saves the values it multiplied)."""
    layer = SparseLinear(40, 30, sparsity=0.2)
    y = layer(torch.randn(5, 40))
    with torch.no_grad():
        layer.values.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# -- inf and NaN -------------------------------------------------------------------------------------------------
def _nonfinite_case(n_in, n_out, dtype, device, generator):
    index = CSRIndex.from_mask(_mask(n_out, n_in, 0.15, generator).to(device))
    values = torch.randn(index.nnz, generator=generator).to(device, dtype)
    values[:3] = 0.0  # stored zeros: real products (0 * inf = NaN there)
    x = torch.randn(6, n_in, generator=generator).to(device, dtype)
    x[0] = float("inf")  # an all-inf row
    x[1, 3] = float("nan")
    x[2, 5], x[2, 9] = float("-inf"), float("inf")
    x[3, 7] = float("-inf")
    return index, values, x


def _sparse_product64(x, values, index):
    """sum over the stored positions only, float64, from the definition (not any kernel)."""
    rows, cols = index.rows(), index.col_idx.long()
    products = x.double()[:, cols] * values.double()
    return torch.zeros(x.shape[0], index.n_out, dtype=torch.float64, device=x.device).index_add_(1, rows, products)


def _assert_same_nonfinite(actual, expected64):
    assert torch.equal(actual.isnan(), expected64.isnan())
    assert torch.equal(actual == float("inf"), expected64 == float("inf"))
    assert torch.equal(actual == float("-inf"), expected64 == float("-inf"))


@needs_extension
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("where", ["x", "grad"])
def test_nonfinite_inputs_give_one_pattern_on_both_paths(cpu_isa, dtype, where):
    """Structural zeros are skipped on both paths, stored zeros are real products: for inf/NaN in x (forward),
    and for inf/NaN in the output gradient (the backward's dX), the same pattern as the float64 definition."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    index, values, x = _nonfinite_case(37, 29, dtype, "cpu", gen)
    if where == "grad":
        x = torch.randn(x.shape, generator=gen).to(dtype)
    expected = _sparse_product64(x, values, index)
    g = torch.randn(x.shape[0], index.n_out, generator=gen).to(dtype)
    if where == "grad":
        g[1] = float("inf")
        g[2, 4], g[3, 0] = float("nan"), float("-inf")
    expected_gx = _sparse_product64(g, values[index.csc_perm], _transposed(index))
    assert expected_gx.isnan().any() or where == "x"
    outputs = {}
    for path in PATHS:
        xr, vr = x.clone().requires_grad_(), values.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = sparse_linear(xr, vr, index, path=path)
        rerouted = [w for w in caught if "x holds inf or NaN" in str(w.message)]
        assert len(rerouted) == (path == "dense" and where == "x")
        _assert_same_nonfinite(y, expected)
        gx, gv = torch.autograd.grad(y, (xr, vr), g)
        _assert_same_nonfinite(gx, expected_gx)
        outputs[path] = (y, gx, gv)
    for a, b in zip(outputs["sparse"], outputs["dense"], strict=True):
        _assert_same_nonfinite(a, b.double())


@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
def test_nonfinite_inputs_on_the_other_backends(backend):
    device = device_for(backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    index, values, x = _nonfinite_case(37, 29, dtype, device, gen)
    y = sparse_linear(x, values, index, backend=backend)
    _assert_same_nonfinite(y, _sparse_product64(x, values, index))


@needs_extension
def test_nonfinite_values_agree_on_both_paths():
    """inf among the weights: the same products on both paths (x = 0 at a stored inf gives NaN on both)."""
    index = CSRIndex.from_mask(_mask(20, 30, 0.3))
    values = torch.randn(index.nnz)
    values[::7] = float("inf")
    values[3] = float("-inf")
    x = torch.randn(5, 30)
    x[0, index.col_idx[0].long()] = 0.0
    y_sparse, y_dense = (sparse_linear(x, values, index, path=p) for p in PATHS)
    _assert_same_nonfinite(y_sparse, y_dense.double())
    _assert_same_nonfinite(y_dense, _sparse_product64(x, values, index))


# -- autocast ----------------------------------------------------------------------------------------------------
@needs_extension
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_autocast_like_f_linear(path, dtype):
    """Forward and backward under torch.autocast on both paths, against F.linear under the same autocast: same
    output dtype, fp32 gradients on the fp32 master values, numbers within 2x torch's own error."""
    index = CSRIndex.from_mask(_mask(48, 64, 0.5))
    values = torch.randn(index.nnz, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    x = torch.randn(9, 64, requires_grad=True)
    g = torch.randn(9, 48)
    with torch.autocast("cpu", dtype=dtype):
        y = sparse_linear(x, values, index, bias, path=path)
    assert y.dtype == dtype
    y.backward(g.to(dtype))
    assert values.grad.dtype == bias.grad.dtype == x.grad.dtype == torch.float32

    weight = index.to_dense(values.detach()).requires_grad_()
    xt, bt = x.detach().requires_grad_(), bias.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        yt = F.linear(xt, weight, bt)
    assert yt.dtype == dtype
    yt.backward(g.to(dtype))

    # float64 of the same rounded inputs
    x64, w64, b64 = xt.detach().to(dtype).double(), weight.detach().to(dtype).double(), bias.detach().to(dtype).double()
    g64 = g.to(dtype).double()
    rows, cols = index.rows(), index.col_idx.long()
    checks = [
        (y, yt, x64 @ w64.T + b64),
        (x.grad, xt.grad, g64 @ w64),
        (values.grad, weight.grad[rows, cols], (g64.T @ x64)[rows, cols]),
    ]
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for ours, torchs, exact in checks:
        assert _error(ours, exact) <= 2 * _error(torchs, exact) + 2 * ulp * float(exact.abs().max())


@needs_extension
@pytest.mark.parametrize("sparsity", [0.9, 0.2], ids=["sparse-path", "dense-path"])
def test_autocast_through_a_model(sparsity):
    """An nn.Linear feeds the layer bfloat16 under autocast (this raised "values must have dtype bfloat16"):
    the layer computes in bfloat16 like nn.Linear, and its parameters and their gradients stay float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), SparseLinear(64, 32, sparsity=sparsity))
    reference = nn.Sequential(model[0], model[1].to_dense())
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = model(x), reference(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().square().mean().backward()
    sparse = model[1]
    assert sparse.values.dtype == sparse.values.grad.dtype == sparse.bias.grad.dtype == torch.float32
    grad_values, grad_first = sparse.values.grad, model[0].weight.grad
    model[0].weight.grad = None
    y_ref.float().square().mean().backward()
    assert torch.allclose(y.float(), y_ref.float(), rtol=2**-6, atol=2**-6)
    assert torch.allclose(grad_values, reference[1].weight.grad[sparse.mask], rtol=2**-5, atol=1e-3)
    assert torch.allclose(grad_first, model[0].weight.grad, rtol=2**-5, atol=1e-3)


# -- weight --------------------------------------------------------------------------------------------------------
def test_weight_is_a_read_only_dense_copy():
    layer = SparseLinear(20, 12, sparsity=0.7)
    weight = layer.weight
    assert torch.equal(weight, layer.to_dense().weight.detach())
    assert weight.shape == (12, 20) and not weight.requires_grad and not isinstance(weight, nn.Parameter)
    before = layer.values.detach().clone()
    weight.fill_(5.0)  # a copy: the layer is untouched
    assert torch.equal(layer.values.detach(), before) and torch.equal(layer.weight, layer.to_dense().weight.detach())
    for value in (nn.Parameter(torch.zeros(12, 20)), torch.zeros(12, 20)):
        with pytest.raises(AttributeError, match="SparseLinear.weight is a read-only dense copy"):
            layer.weight = value
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad", "no_grad-fastpath-off"])
def test_transformer_encoder_layer_in_eval(grad_mode, monkeypatch):
    """torch's TransformerEncoderLayer reads linear1/linear2.weight in eval (it crashed with an AttributeError).
    With grad enabled it then runs the layers' own (sparse) forward; under no_grad torch's fused fast path runs
    on the dense copies (correct, dense); with the fast path switched off the sparse forward runs again."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    sparsekern.training.sparsify(encoder, 0.8, distribution="uniform")
    assert isinstance(encoder.linear1, SparseLinear) and isinstance(encoder.linear2, SparseLinear)
    reference = copy.deepcopy(encoder)
    reference.linear1, reference.linear2 = encoder.linear1.to_dense(), encoder.linear2.to_dense()
    encoder.eval(), reference.eval()
    fused = []
    real_fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fused.append(1) or real_fused(*a))
    src = torch.randn(3, 5, 32)
    with torch.no_grad():
        reference.train()  # the reference through the plain (unfused) path
        want = reference(src)
    fused.clear()
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        if grad_mode == "grad":
            got = encoder(src)
        else:
            torch.backends.mha.set_fastpath_enabled(grad_mode == "no_grad")
            with torch.no_grad():
                got = encoder(src)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    assert bool(fused) == (grad_mode == "no_grad")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


# -- non-finite weights --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_magnitude_masks_reject_nonfinite_weights(bad):
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[1, 2] = bad
    what = "NaN" if bad != bad else "inf"
    with pytest.raises(ValueError, match=rf"SparseLinear.from_dense: linear.weight contains {what}"):
        SparseLinear.from_dense(linear, sparsity=0.5)
    with pytest.raises(ValueError, match=rf"semi24_mask: w contains {what}"):
        sparsekern.semi24_mask(linear.weight.detach())
    # with an explicit mask nothing is ranked: the weights are copied as they are
    layer = SparseLinear.from_dense(linear, mask=torch.ones(4, 8, dtype=torch.bool))
    assert torch.equal(layer.weight.isnan(), linear.weight.detach().isnan())


# -- memory and copies ---------------------------------------------------------------------------------------------
def test_random_flat_dense_draw_is_count_sized():
    """Half of 8192^2 positions: randperm(numel) took 8 bytes per position and a bool per position (576 MiB) on
    top of the result; the blocked draw needs the result (8 bytes per drawn position) and O(block)."""
    count = 8192 * 8192 // 2
    measured = f"flat = sparsekern._csr.random_flat(8192 * 8192, {count})\nassert flat.numel() == {count}"
    warm = "sparsekern._csr.random_flat(4096, 2048)"
    assert peak_rss_rise(warm, measured, OMP_NUM_THREADS="1") < 8 * count * 1.2


def test_random_flat_blocks_draw_uniform_subsets():
    """Through the blocked draw with blocks of 2: all C(6, 3) = 20 subsets about equally often (1000 expected
    each of 20000 draws, sd about 31), so the per-block counts follow the hypergeometric law."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    counts: dict[tuple, int] = {}
    for _ in range(20000):
        flat = sparsekern._csr.random_flat(6, 3, generator=gen, block=2)
        assert torch.equal(flat, flat.unique())
        counts[tuple(flat.tolist())] = counts.get(tuple(flat.tolist()), 0) + 1
    assert len(counts) == 20
    assert all(abs(c - 1000) < 6 * 31 for c in counts.values()), counts


def test_half_sparse_layer_construction_memory():
    """SparseLinear(8192, 8192, sparsity=0.5): the layer keeps 20 bytes per nonzero (values, columns, the
    transposed index); building it peaked at 44 bytes per nonzero (1408 MiB) with randperm, now below 40 (the
    transposed index's sort sets the peak)."""
    measured = "layer = sparsekern.nn.SparseLinear(8192, 8192, sparsity=0.5, bias=False)"
    warm = "sparsekern.nn.SparseLinear(64, 64, sparsity=0.5)"
    assert peak_rss_rise(warm, measured, OMP_NUM_THREADS="1") < 40 * (8192 * 8192 // 2)


@needs_extension
def test_copies_and_pickles_leave_the_dense_workspace_behind():
    layer = SparseLinear(300, 200, sparsity=0.2)  # dense path
    x = torch.randn(4, 300)
    with torch.no_grad():
        y = layer(x)
    assert layer._workspace._weight is not None  # 240 KB of dense weight held
    fresh = SparseLinear(300, 200, mask=layer.mask)
    fresh.load_state_dict(layer.state_dict())
    assert len(pickle.dumps(layer)) == len(pickle.dumps(fresh))  # the same bytes as a layer never called
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._workspace is not layer._workspace and twin._workspace._weight is None
        with torch.no_grad():
            assert torch.equal(twin(x), y)
