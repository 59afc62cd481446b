"""SparseLinear and sparse_linear on constant fan-in (ELL) weights: the ELL kernels against the CSR kernels and
float64 (forward, dX, dW; every dtype, odd shapes, every ISA), gradcheck, state_dict, the move between ELL and CSR
when a topology update makes the rows unequal (and back), torch.compile, and the errors of the switch."""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_torch_error as _assert_close
from helpers import backend_params, device_for, isa_params

import sparsekern
from sparsekern._csr import CSRIndex
from sparsekern.nn import SparseLinear
from sparsekern.ops import sparse_linear as sl
from sparsekern.ops.sparse_linear import choose_kernels, ell_width, sparse_linear


def _has_ell_kernels(key: str) -> bool:
    ops = ("ell_spmm", "ell_spmm_t", "ell_sddmm")
    return sparsekern._extension.available() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", key) for op in ops
    )


HAS_ELL_CPU = _has_ell_kernels("CPU")
needs_ell_cpu = pytest.mark.skipif(not HAS_ELL_CPU, reason="sparsekern._C has no CPU ELL kernels (rebuild it)")


def _ell_backends():
    params = []
    for p in backend_params("cpu", "reference", "triton", "cuda"):
        marks = list(p.marks) + ([needs_ell_cpu] if p.values[0] == "cpu" else [])
        params.append(pytest.param(*p.values, marks=marks, id=p.id))
    return params


BACKENDS = _ell_backends()
# The layer's logic (which family runs, topology moves, state_dict) in float64, whose calls run the reference
# kernels (so it is tested without the compiled ELL kernels too), and in float32 on the C++ kernels.
LAYER_DTYPES = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32", marks=needs_ell_cpu),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, n_in, n_out, fan_in): odd sizes, not multiples of any tile; one batch past a 64-lane tile; a full row
SHAPES = [(1, 13, 7, 3), (7, 37, 70, 5), (67, 70, 33, 17), (3, 9, 5, 9)]


def fan_in_mask(n_out: int, n_in: int, k: int, device="cpu") -> torch.Tensor:
    """A bool (n_out, n_in) mask with exactly k True entries per row, at random columns."""
    mask = torch.zeros(n_out, n_in, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.rand(n_out, n_in).topk(k, dim=1).indices, True)
    return mask.to(device)


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel calls of sparse_linear's sparse path: ELL (ell_spmm, ell_spmm_t, ell_sddmm) and CSR (spmm,
    sddmm), so a test knows which family ran."""
    counts: collections.Counter = collections.Counter()

    def counting(name, real):
        def call(*args):
            counts[name] += 1
            return real(*args)

        return call

    for name in ("_ell_spmm", "_ell_spmm_t", "_ell_sddmm"):
        monkeypatch.setattr(sl, name, counting(name.lstrip("_"), getattr(sl, name)))
    monkeypatch.setattr(sl._spmm, "run", counting("spmm", sl._spmm.run))
    monkeypatch.setattr(sl._sddmm, "run", counting("sddmm", sl._sddmm.run))
    return counts


def _run(x, values, index, bias, g, **kw):
    x = x.detach().clone().requires_grad_()
    values = values.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = sparse_linear(x, values, index, bias, **kw)
    y.backward(g)
    return y.detach(), x.grad, values.grad, bias.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ell_path_equals_csr_path_and_float64(backend, dtype, shape, calls):
    device = device_for(backend)
    batch, n_in, n_out, k = shape
    mask = fan_in_mask(n_out, n_in, k, device)
    index = CSRIndex.from_mask(mask)
    assert ell_width(index) == k
    x = torch.randn(batch, n_in, device=device).to(dtype)
    values = torch.randn(index.nnz, device=device).to(dtype)
    bias = torch.randn(n_out, device=device).to(dtype)
    g = torch.randn(batch, n_out, device=device).to(dtype)

    ell = _run(x, values, index, bias, g, backend=backend, path="sparse", kernels="ell")
    assert [calls[n] for n in ("ell_spmm", "ell_spmm_t", "ell_sddmm", "spmm", "sddmm")] == [1, 1, 1, 0, 0]
    csr = _run(x, values, index, bias, g, backend=backend, path="sparse", kernels="csr")
    assert calls["spmm"] == 2 and calls["sddmm"] == 1 and calls["ell_spmm"] == 1  # forward, dX (CSC), dW
    auto = _run(x, values, index, bias, g, backend=backend, path="sparse")  # kernels="auto": equal rows
    if sl.auto_takes_ell(backend, batch):  # ELL, except at the batch sizes where CSR is measured faster
        assert calls["ell_spmm"] == 2 and calls["spmm"] == 2
        expected = ell
    else:
        assert calls["ell_spmm"] == 1 and calls["spmm"] == 4
        expected = csr
    for a, b in zip(expected, auto, strict=True):
        assert torch.equal(a, b)

    w64 = index.to_dense(values.double())
    x64, g64 = x.double(), g.double()
    w = index.to_dense(values)
    want = {
        "y": (F.linear(x64, w64, bias.double()), F.linear(x, w, bias)),
        "dX": (g64 @ w64, g @ w),
        "dW": ((g64.T @ x64)[mask], (g.T @ x)[mask]),
    }
    for got_ell, got_csr, (ref64, torch_result) in zip(ell[:3], csr[:3], want.values(), strict=True):
        assert got_ell.dtype == dtype and got_ell.shape == ref64.shape
        _assert_close(got_ell, ref64, torch_result)
        _assert_close(got_csr, ref64, torch_result)
        # the same products in fp32, summed in another order (or the same): at most a few roundings apart
        tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
        scale = max(float(ref64.abs().max()), 1.0)
        assert float((got_ell.double() - got_csr.double()).abs().max()) <= 2 * tol * scale
    assert torch.allclose(ell[3].double(), g64.sum(0), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


@needs_ell_cpu
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_ell_path_on_every_isa(cpu_isa, dtype, calls):
    """Each instruction set's ELL kernels through the layer: forward, dX and dW against float64 (odd shapes, a batch
    past one 64-lane tile), and equal to the CSR path within a few roundings."""
    torch.manual_seed(7)
    batch, n_in, n_out, k = 69, 83, 41, 11
    layer = SparseLinear(n_in, n_out, mask=fan_in_mask(n_out, n_in, k), dtype=dtype)
    assert layer.fan_in == k
    x = torch.randn(batch, n_in).to(dtype).requires_grad_()
    g = torch.randn(batch, n_out).to(dtype)
    layer(x).backward(g)
    assert calls["ell_spmm"] == calls["ell_spmm_t"] == calls["ell_sddmm"] == 1 and calls["spmm"] == 0
    w64, x64, g64 = layer.dense_weight().detach().double(), x.detach().double(), g.double()
    w = layer.dense_weight().detach()
    rows, cols = layer.indices()
    _assert_close(layer(x.detach()), F.linear(x64, w64, layer.bias.double()), F.linear(x.detach(), w, layer.bias))
    _assert_close(x.grad, g64 @ w64, g @ w)
    _assert_close(layer.values.grad, (g64.T @ x64)[rows, cols], (g.T @ x.detach())[rows, cols])


def test_gradcheck_float64():
    index = CSRIndex.from_mask(fan_in_mask(6, 9, 4))
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    values = torch.randn(index.nnz, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fn = lambda a, v, b: sparse_linear(a, v, index, b, path="sparse", kernels="ell")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values, bias))
    assert torch.autograd.gradgradcheck(fn, (x, values, bias))  # create_graph: differentiable sparse ops


@needs_ell_cpu
def test_gradcheck_cpu_kernels_in_float32():
    """The C++ ELL kernels have no float64: their gradients against finite differences in float32."""
    index = CSRIndex.from_mask(fan_in_mask(5, 8, 3))
    x = torch.randn(3, 8, requires_grad=True)
    values = torch.randn(index.nnz, requires_grad=True)
    fn = lambda a, v: sparse_linear(a, v, index, backend="cpu", path="sparse", kernels="ell")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_double_backward_matches_csr():
    torch.manual_seed(3)
    index = CSRIndex.from_mask(fan_in_mask(7, 10, 4))
    x = torch.randn(5, 10, requires_grad=True)
    values = torch.randn(index.nnz, requires_grad=True)
    results = []
    for kernels in ("ell", "csr"):
        y = sparse_linear(x, values, index, path="sparse", kernels=kernels)
        gx, gv = torch.autograd.grad(y.square().sum(), (x, values), create_graph=True)
        results.append(torch.autograd.grad(gx.sum() + gv.square().sum(), (x, values)))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
def test_leading_dims_no_bias_and_inference(dtype, calls):
    layer = SparseLinear(12, 9, bias=False, mask=fan_in_mask(9, 12, 5), dtype=dtype)
    x = torch.randn(2, 5, 12, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 5, 9) and calls["ell_spmm"] == 1
    assert torch.allclose(y, x @ layer.dense_weight().detach().T, rtol=1e-5, atol=1e-6)


def test_unequal_rows_take_csr_and_ell_raises_naming_the_row(calls):
    mask = fan_in_mask(6, 10, 4)
    mask[3, (~mask[3]).nonzero()[0]] = True  # row 3 holds 5
    index = CSRIndex.from_mask(mask)
    assert ell_width(index) is None
    x = torch.randn(4, 10)
    values = torch.randn(index.nnz)
    y = sparse_linear(x, values, index, path="sparse")
    assert calls["spmm"] == 1 and calls["ell_spmm"] == 0
    assert torch.allclose(y, x @ index.to_dense(values).T, rtol=1e-5, atol=1e-6)
    message = "kernels='ell' needs the same number of nonzeros in every row, but row 3 holds 5 where row 0 holds 4"
    with pytest.raises(ValueError, match=message):
        sparse_linear(x, values, index, kernels="ell")
    with pytest.raises(ValueError, match=f"SparseLinear: {message}"):
        SparseLinear(10, 6, mask=mask, kernels="ell")
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'csr', 'ell'\), got 'ELL'"):
        sparse_linear(x, values, index, kernels="ELL")
    with pytest.raises(ValueError, match=r"SparseLinear: kernels must be one of .*, got 'sparse'"):
        SparseLinear(10, 6, mask=mask, kernels="sparse")


@needs_ell_cpu
def test_auto_keeps_csr_at_the_batches_of_ell_csr_batches(calls, monkeypatch):
    """kernels="auto" runs CSR at the batch sizes ELL_CSR_BATCHES names for a backend (a measured rule; here a
    made-up one on the C++ kernels), ELL elsewhere; kernels="ell" runs ELL at every batch size."""
    monkeypatch.setitem(sl.ELL_CSR_BATCHES, "cpu", (2, 8))
    index = CSRIndex.from_mask(fan_in_mask(12, 30, 3))
    values = torch.randn(index.nnz)
    expected = {1: "ell", 2: "csr", 8: "csr", 9: "ell"}
    for batch, family in expected.items():
        x = torch.randn(batch, 30)
        before = (calls["ell_spmm"], calls["spmm"])
        y = sparse_linear(x, values, index, path="sparse")
        assert (calls["ell_spmm"] - before[0], calls["spmm"] - before[1]) == ((1, 0) if family == "ell" else (0, 1))
        assert torch.allclose(y, x @ index.to_dense(values).T, rtol=1e-5, atol=1e-5)
        sparse_linear(x, values, index, path="sparse", kernels="ell")
        assert calls["ell_spmm"] - before[0] == (2 if family == "ell" else 1)


def test_empty_rows_keep_csr_under_auto(calls):
    index = CSRIndex.from_mask(torch.zeros(4, 6, dtype=torch.bool))
    assert ell_width(index) == 0 and choose_kernels("auto", index) is None and choose_kernels("ell", index) == 0
    x, values, bias = torch.randn(3, 6), torch.zeros(0), torch.randn(4)
    assert torch.equal(sparse_linear(x, values, index, bias, path="sparse"), bias.expand(3, 4))
    assert calls["spmm"] == 1 and calls["ell_spmm"] == 0


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
def test_topology_update_moves_between_ell_and_csr(dtype, calls):
    """A topology update that makes the rows unequal moves the layer to the CSR kernels (under "ell", a forward
    then raises naming the row); one that evens them out again moves it back, with identical results to CSR."""
    torch.manual_seed(5)
    layer = SparseLinear(40, 8, mask=fan_in_mask(8, 40, 6), dtype=dtype)  # density 0.15: the sparse path
    assert layer.fan_in == 6 and "kernels='auto', fan_in=6" in repr(layer)
    x = torch.randn(12, 40, dtype=dtype, requires_grad=True)

    def check(family: str):
        before = calls[f"{family}_spmm" if family == "ell" else "spmm"]
        y = layer(x)
        y.square().sum().backward()
        assert calls[f"{family}_spmm" if family == "ell" else "spmm"] > before
        w = layer.dense_weight().detach().double().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y64 = F.linear(x64, w, layer.bias.detach().double())
        y64.square().sum().backward()
        assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5)
        rows, cols = layer.indices()
        assert torch.allclose(layer.values.grad.double(), w.grad[rows, cols], rtol=1e-4, atol=1e-4)
        assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
        layer.zero_grad()
        x.grad = None

    check("ell")
    inactive = (~layer.mask).flatten().nonzero().flatten()
    row0 = layer.flat_indices()[:1]  # a connection of row 0
    grown = inactive[inactive >= 40][:1]  # an inactive connection of another row
    layer.update_topology(drop=row0, grow=grown)
    assert layer.fan_in is None and "fan_in" not in repr(layer)
    check("spmm")
    layer.kernels = "ell"
    with pytest.raises(ValueError, match="but row 1 holds 7 where row 0 holds 5"):
        layer(x)
    layer.kernels = "auto"
    layer.update_topology(drop=grown, grow=row0)  # back to six per row
    assert layer.fan_in == 6
    check("ell")
    layer.kernels = "csr"
    assert "kernels='csr', fan_in=6" in repr(layer)
    check("spmm")


@pytest.mark.parametrize("dtype", LAYER_DTYPES)
def test_state_dict_round_trip_and_copies(dtype, calls):
    torch.manual_seed(11)
    ell_layer = SparseLinear(20, 12, mask=fan_in_mask(12, 20, 7), dtype=dtype)
    other = SparseLinear(20, 12, sparsity=0.5, dtype=dtype)  # unequal rows (almost surely; checked)
    assert other.fan_in is None
    other.load_state_dict(ell_layer.state_dict())
    assert other.fan_in == 7 and torch.equal(other.mask, ell_layer.mask)
    x = torch.randn(10, 20, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(other(x), ell_layer(x))
    assert calls["ell_spmm"] == 2
    back = SparseLinear(20, 12, sparsity=0.5, dtype=dtype)
    ell_layer.load_state_dict(back.state_dict())  # and to unequal rows
    assert ell_layer.fan_in is None
    for clone in (copy.deepcopy(other), pickle.loads(pickle.dumps(other))):
        assert clone.fan_in == 7 and clone.kernels == "auto"
        with torch.no_grad():
            assert torch.equal(clone(x), other(x))


def test_edited_index_buffers_are_followed(calls):
    """A loaded topology (copied into the index buffers) re-derives the fan-in with the rest of the index."""
    layer = SparseLinear(10, 4, mask=fan_in_mask(4, 10, 3), dtype=torch.float64)
    with torch.no_grad():
        mask = fan_in_mask(4, 10, 3)
        mask[1] = True  # row 1 full
        row_ptr, col_idx = sparsekern._csr.csr_from_mask(mask)
    state = {
        **layer.state_dict(),
        "row_ptr": row_ptr,
        "col_idx": col_idx,
        "values": torch.randn(int(mask.sum()), dtype=torch.float64),
    }
    layer.load_state_dict(state)
    assert layer.fan_in is None
    with torch.no_grad():
        layer(torch.randn(2, 10, dtype=torch.float64))
    assert calls["spmm"] == 1


def test_from_dense_takes_kernels():
    linear = torch.nn.Linear(9, 5)
    layer = SparseLinear.from_dense(linear, mask=fan_in_mask(5, 9, 2), kernels="csr")
    assert layer.kernels == "csr" and layer.fan_in == 2
    with pytest.raises(ValueError, match="kernels='ell' needs the same number"):
        SparseLinear.from_dense(linear, sparsity=0.5, kernels="ell")  # 22 or 23 of 45: unequal rows


@needs_ell_cpu  # the references branch on data, so compiled calls need the kernels
@pytest.mark.parametrize("kernels", ["auto", "ell"])
def test_torch_compile_fullgraph(kernels, dtype=torch.float32):
    layer = SparseLinear(24, 16, mask=fan_in_mask(16, 24, 5), kernels=kernels, dtype=dtype)
    x = torch.randn(12, 24, dtype=dtype, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), layer(x)
    graphs = []

    def record(gm, inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch.compile(layer, fullgraph=True, backend=record)(x)
    assert any("sparsekern.ell_spmm" in g for g in graphs) and not any("sparsekern.spmm" in g for g in graphs)
    assert torch.allclose(y, y_eager, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.values))
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, layer.values))
    for got, want in zip(grads, grads_eager, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_ell_cpu  # without the extension, auto's fallback warning breaks the graph before the check
def test_ell_under_compile_needs_fan_in():
    index = CSRIndex.from_mask(fan_in_mask(4, 8, 2))
    values = torch.randn(index.nnz)

    @torch.compile(fullgraph=True, backend="eager")
    def fn(x):
        return sparse_linear(x, values, index, path="sparse", kernels="ell")

    with pytest.raises(Exception, match="kernels='ell' under torch.compile needs fan_in="):
        fn(torch.randn(3, 8))


@needs_ell_cpu
@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_ell_dx_takes_the_csc_from_the_measured_batch(cpu_isa, dtype, calls):
    """The ELL path's backward runs dX by ell_spmm_t below ELL_DX_CSC_BATCH[("cpu", isa)] rows and by spmm through
    the CSC from there on (measured faster there; AVX2 has no threshold: ell_spmm_t at every batch); forward and dW
    stay ELL; both sides match float64."""
    threshold = sl.ELL_DX_CSC_BATCH.get(("cpu", cpu_isa))
    assert (threshold is not None) == (cpu_isa == "avx512")
    mask = fan_in_mask(21, 37, 5)
    index = CSRIndex.from_mask(mask)
    values = torch.randn(index.nnz).to(dtype)
    bias = torch.randn(21).to(dtype)
    cases = [(600, "ell_spmm_t")]
    if threshold is not None:
        cases = [(threshold - 1, "ell_spmm_t"), (threshold, "spmm"), (threshold + 77, "spmm")]
    for batch, dx_by in cases:
        assert sl.ell_dx_takes_csc("cpu", batch) == (dx_by == "spmm")
        x, g = torch.randn(batch, 37).to(dtype), torch.randn(batch, 21).to(dtype)
        before = collections.Counter(calls)
        y, dx, dv, _ = _run(x, values, index, bias, g, backend="cpu", path="sparse", kernels="auto")
        ran = {name: calls[name] - before[name] for name in ("ell_spmm", "ell_spmm_t", "ell_sddmm", "spmm", "sddmm")}
        want = {"ell_spmm": 1, "ell_spmm_t": 0, "ell_sddmm": 1, "spmm": 0, "sddmm": 0}
        want[dx_by] = 1
        assert ran == want, batch
        w64 = index.to_dense(values.double())
        _assert_close(y, F.linear(x.double(), w64, bias.double()), F.linear(x, index.to_dense(values), bias))
        _assert_close(dx, g.double() @ w64, g @ index.to_dense(values))
        _assert_close(dv, (g.double().T @ x.double())[mask], (g.T @ x)[mask])
    assert not sl.ell_dx_takes_csc("reference", 10**6) and not sl.ell_dx_takes_csc("triton", 10**6)


def test_info_says_whether_the_ell_kernels_are_compiled_in(monkeypatch):
    """`sparsekern info` names the ELL kernels' status per device (the fast path's visibility) and the dX rule."""
    import subprocess
    import sys

    from sparsekern import _extension, cli

    result = subprocess.run([sys.executable, "-m", "sparsekern", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    want = "C++ CPU compiled in" if HAS_ELL_CPU else "C++ CPU no (extension not loaded)"
    line = next(s for s in result.stdout.splitlines() if s.startswith("constant fan-in (ELL) kernels"))
    assert want in line
    assert "dX goes through the CSC (cpu/avx512 from B >= 512)" in result.stdout
    assert "C++ CPU no (extension not loaded)" in cli._ell_info({"loaded": False, "reason": "x"})[0]
    if _extension.available():
        monkeypatch.setattr(sl, "_has_ell_kernels", lambda key: False)
        build = dict(_extension.build_info(), with_cuda=True)
        text = cli._ell_info(build)[0]
        assert "C++ CPU NOT compiled in (an extension built before them: rebuild)" in text
        assert "CUDA C++ NOT compiled in" in text
        assert "CUDA C++ not built (no CUDA sources" in cli._ell_info(dict(build, with_cuda=False))[0]
