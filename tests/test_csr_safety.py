"""Memory safety of every CSR the public API accepts (issue 11): one validator (sparsekern._csr.check_csr), the
record of checked indices, SparseLinear's edited index buffers, its atomic load_state_dict, and the C++ entry
points' own scan. Crash cases run in a subprocess: a signal there is a failure, not a lost test run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern._csr import CSRIndex, check_csr, check_index, is_checked
from sparsekern.nn import SparseLinear
from sparsekern.ops.sddmm import sddmm
from sparsekern.ops.sparse_linear import sparse_linear
from sparsekern.ops.spmm import spmm

requires_ext = pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")


def _tensors(row_ptr, col_idx):
    return torch.tensor(row_ptr, dtype=torch.int64), torch.tensor(col_idx, dtype=torch.int32)


# Hand-made CSRs of a (3, 6) matrix. Valid ones include empty rows and nnz = 0.
VALID = {
    "plain": ([0, 2, 3, 5], [1, 4, 0, 2, 5]),
    "empty-rows": ([0, 0, 3, 3], [0, 2, 5]),
    "nnz0": ([0, 0, 0, 0], []),
    "full-row": ([0, 6, 6, 6], [0, 1, 2, 3, 4, 5]),
}
# (row_ptr, col_idx, the fault's message)
INVALID = {
    "non-monotone": (
        [0, 4, 2, 5],
        [1, 4, 0, 2, 5],
        r"row_ptr must be nondecreasing, got row_ptr\[2\]=2 < row_ptr\[1\]=4",
    ),
    "wrong-start": ([1, 2, 3, 5], [1, 4, 0, 2, 5], r"row_ptr must run from 0 to nnz=5, got 1\.\.5"),
    "wrong-end": ([0, 2, 3, 4], [1, 4, 0, 2, 5], r"row_ptr must run from 0 to nnz=5, got 0\.\.4"),
    "col-too-large": ([0, 2, 3, 5], [1, 4, 0, 2, 6], r"col_idx must lie in \[0, 6\)"),
    "col-negative": ([0, 2, 3, 5], [-1, 4, 0, 2, 5], r"col_idx must lie in \[0, 6\)"),
    "duplicate-col": ([0, 2, 3, 5], [1, 4, 0, 2, 2], r"col_idx must be ascending and unique within each row"),
    "unsorted-row": ([0, 2, 3, 5], [4, 1, 0, 2, 5], r"col_idx must be ascending and unique within each row"),
}


def _index_fields(row_ptr, col_idx, n_in):
    """A CSRIndex assembled field by field (never recorded as checked), CSC from the same CSR."""
    from sparsekern._csr import transpose_index

    return CSRIndex(row_ptr, col_idx, *transpose_index(row_ptr, col_idx.clamp(0, n_in - 1), n_in), 3, n_in)


@pytest.mark.parametrize("case", VALID, ids=list(VALID))
def test_validator_accepts_valid(case):
    row_ptr, col_idx = _tensors(*VALID[case])
    check_csr("t", row_ptr, col_idx, 3, 6)
    index = CSRIndex.from_csr(row_ptr, col_idx, 6)
    assert is_checked(index)
    assert check_index("t", CSRIndex(*index)) is not None  # a copy of the tuple: the same tensors, still checked


def test_validator_accepts_zero_rows():
    check_csr("t", *_tensors([0], []), 0, 6)
    assert CSRIndex.from_csr(*_tensors([0], []), 6).n_out == 0


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_validator_refuses_invalid(case):
    row_ptr, col_idx, message = INVALID[case]
    row_ptr, col_idx = _tensors(row_ptr, col_idx)
    with pytest.raises(ValueError, match="t: " + message):
        check_csr("t", row_ptr, col_idx, 3, 6)
    with pytest.raises(ValueError, match="CSRIndex.from_csr: " + message):
        CSRIndex.from_csr(row_ptr, col_idx, 6)
    with pytest.raises(ValueError, match="exclude's " + message):  # through outer_topk, named as its argument
        sparsekern.outer_topk(
            torch.randn(2, 6), torch.randn(2, 3), 1, exclude=CSRIndex(row_ptr, col_idx, *[None] * 3, 3, 6)
        )


@requires_ext
@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_cpp_entry_points_refuse_invalid(case):
    """Every C++ op scans the index itself, through torch.ops (no Python checks in front)."""
    row_ptr, col_idx, message = INVALID[case]
    row_ptr, col_idx = _tensors(row_ptr, col_idx)
    x, g, values = torch.randn(4, 6), torch.randn(4, 3), torch.randn(5)
    ops = torch.ops.sparsekern
    calls = {
        "spmm": lambda: ops.spmm(x, row_ptr, col_idx, values, 3),
        "sddmm": lambda: ops.sddmm(g, x, row_ptr, col_idx),
        "outer_topk": lambda: ops.outer_topk(x, g, 3, row_ptr, col_idx, False),
        "csr_dense_scatter_": lambda: ops.csr_dense_scatter_(torch.zeros(3, 6), values, row_ptr, col_idx),
        "csr_dense_gather": lambda: ops.csr_dense_gather(torch.zeros(3, 6), row_ptr, col_idx),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"{op}: {message}"):
            call()


@requires_ext
@pytest.mark.parametrize("case", VALID, ids=list(VALID))
def test_cpp_entry_points_accept_valid(case):
    row_ptr, col_idx = _tensors(*VALID[case])
    nnz = col_idx.numel()
    x, g, values = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.randn(nnz)
    dense = CSRIndex.from_csr(row_ptr, col_idx, 6).to_dense(values.double())
    y = torch.ops.sparsekern.spmm(x.float(), row_ptr, col_idx, values, 3)
    torch.testing.assert_close(y.double(), x @ dense.T, rtol=1e-5, atol=1e-5)
    out = torch.zeros(3, 6)
    torch.ops.sparsekern.csr_dense_scatter_(out, values, row_ptr, col_idx)
    assert torch.equal(out, dense.float())
    grad = torch.ops.sparsekern.sddmm(g.float(), x.float(), row_ptr, col_idx)
    torch.testing.assert_close(grad.double(), (g.T @ x)[dense != 0] if nnz else grad.double(), rtol=1e-5, atol=1e-5)


def test_public_functions_name_the_argument():
    row_ptr, col_idx = _tensors([0, 2, 3, 5], [1, 4, 0, 2, 6])
    x, values = torch.randn(4, 6), torch.randn(5)
    with pytest.raises(ValueError, match=r"spmm: col_idx must lie in \[0, 6\)"):
        spmm(x, row_ptr, col_idx, values, 3)
    with pytest.raises(ValueError, match=r"sddmm: col_idx must lie in \[0, 6\)"):
        sddmm(torch.randn(4, 3), x, row_ptr, col_idx)
    index = _index_fields(row_ptr, col_idx, 6)
    with pytest.raises(ValueError, match=r"sparse_linear: index's col_idx must lie in \[0, 6\)"):
        sparse_linear(x, values, index)
    with pytest.raises(TypeError, match="sparse_linear: index must be a sparsekern.CSRIndex, got tuple"):
        sparse_linear(x, values, tuple(index))
    good = CSRIndex.from_csr(*_tensors([0, 2, 3, 5], [1, 4, 0, 2, 5]), 6)
    swapped = good._replace(csc_row=good.csc_row.flip(0).contiguous())
    with pytest.raises(ValueError, match=r"sparse_linear: index.csc_row must be part of the transpose"):
        sparse_linear(x, values, swapped)
    with pytest.raises(ValueError, match=r"CSRIndex.from_flat: flat must lie in \[0, 18\)"):
        CSRIndex.from_flat(torch.tensor([3, 18]), 3, 6)
    with pytest.raises(ValueError, match=r"CSRIndex.pattern: flat must be strictly ascending"):
        CSRIndex.pattern(torch.tensor([3, 3]), 3, 6)
    with pytest.raises(TypeError, match=r"CSRIndex.from_mask: mask must have dtype bool"):
        CSRIndex.from_mask(torch.ones(3, 6))


def test_index_edited_in_place_is_checked_again():
    """A checked index is taken in O(1) until one of its tensors changes; then it is validated again."""
    index = CSRIndex.from_mask(torch.rand(7, 9) < 0.5)
    x, values = torch.randn(3, 9), torch.randn(index.nnz)
    assert is_checked(index)
    sparse_linear(x, values, index)
    index.col_idx[0] = 9
    assert not is_checked(index)
    with pytest.raises(ValueError, match=r"sparse_linear: index's col_idx must lie in \[0, 9\)"):
        sparse_linear(x, values, index)
    index.col_idx[0] = -3
    with pytest.raises(ValueError, match=r"index's col_idx must lie in \[0, 9\)"):
        sparse_linear(x, values, index)


def test_outer_topk_refuses_unsorted_sparse_csr_exclude():
    """torch does not check a sparse CSR tensor's invariants unless asked; outer_topk does, before narrowing."""
    x, g = torch.randn(4, 6), torch.randn(4, 3)
    crow, col = _tensors([0, 2, 3, 5], [4, 1, 0, 2, 5])
    exclude = torch.sparse_csr_tensor(crow, col.long(), torch.ones(5), (3, 6), check_invariants=False)
    with pytest.raises(ValueError, match="outer_topk: exclude's col_idx must be ascending and unique"):
        sparsekern.outer_topk(x, g, 3, exclude=exclude)
    wide = torch.sparse_csr_tensor(
        crow, torch.tensor([1, 4, 0, 2, 2**32 + 1]), torch.ones(5), (3, 6), check_invariants=False
    )
    with pytest.raises(ValueError, match=r"exclude's col_idx must lie in \[0, 6\)"):  # not wrapped to 1 by int32
        sparsekern.outer_topk(x, g, 3, exclude=wide)


# ---------------------------------------------------------------------------------------------------------------
# The crash cases of the issue, each in its own process.

_PRELUDE = """
import torch, sparsekern
from sparsekern._csr import CSRIndex
from sparsekern.nn import SparseLinear
def expect(error, text, call):
    try:
        call()
    except error as exc:
        assert text in str(exc), str(exc)
        print("REFUSED", type(exc).__name__)
    else:
        raise AssertionError("not refused")
"""

CRASHES = {
    "outer_topk-sparse-csr-non-monotone": """
crow = torch.tensor([0, 5, 0, 5]); col = torch.tensor([0, 1, 2, 3, 4])
exclude = torch.sparse_csr_tensor(crow, col, torch.ones(5), (3, 8), check_invariants=False)
expect(ValueError, "exclude's row_ptr must be nondecreasing",
       lambda: sparsekern.outer_topk(torch.randn(4, 8), torch.randn(4, 3), 19, exclude=exclude))
""",
    "outer_topk-csrindex-non-monotone": """
row_ptr = torch.tensor([0, 5, 0, 5]); col = torch.arange(5, dtype=torch.int32)
empty = torch.zeros(0, dtype=torch.int64)
exclude = CSRIndex(row_ptr=row_ptr, col_idx=col, csc_ptr=empty, csc_row=empty.int(), csc_perm=empty, n_out=3, n_in=8)
expect(ValueError, "exclude's row_ptr must be nondecreasing",
       lambda: sparsekern.outer_topk(torch.randn(4, 8), torch.randn(4, 3), 19, exclude=exclude))
""",
    "layer-col-huge-sparse": """
layer = SparseLinear(64, 32, sparsity=0.9)
layer.col_idx[0] = 10**8
expect(ValueError, "SparseLinear: col_idx must lie in [0, 64)", lambda: layer(torch.randn(5, 64)))
""",
    "layer-col-negative-dense": """
layer = SparseLinear(64, 32, sparsity=0.1)  # the dense path at this density
layer.col_idx[0] = -3
expect(ValueError, "SparseLinear: col_idx must lie in [0, 64)", lambda: layer(torch.randn(5, 64)))
""",
    "layer-row-ptr-huge": """
layer = SparseLinear(64, 32, sparsity=0.9)
layer.row_ptr[1] = 10**9
expect(ValueError, "SparseLinear: row_ptr must be nondecreasing", lambda: layer(torch.randn(5, 64)))
""",
    "layer-col-huge-behind-version-sparse": """
layer = SparseLinear(64, 32, sparsity=0.9)
layer(torch.randn(5, 64))
layer.col_idx.data[0] = 10**8  # no version bump: the C++ kernel's own scan refuses it
expect(ValueError, "spmm: col_idx must lie in [0, 64)", lambda: layer(torch.randn(5, 64)))
""",
    "layer-col-huge-behind-version-dense-scatter": """
layer = SparseLinear(64, 32, sparsity=0.1)
layer(torch.randn(5, 64))
layer.col_idx.data[0] = 10**8  # csr_dense_scatter_ would write out of bounds
expect(ValueError, "csr_dense_scatter_: col_idx must lie in [0, 64)", lambda: layer(torch.randn(5, 64)))
""",
    "from-csr-column-past-n-in": """
row_ptr = torch.tensor([0, 1, 2]); col = torch.tensor([0, 6 + 3], dtype=torch.int32)
expect(ValueError, "CSRIndex.from_csr: col_idx must lie in [0, 6)", lambda: CSRIndex.from_csr(row_ptr, col, 6))
""",
    "scatter-op-direct": """
row_ptr = torch.tensor([0, 1, 2]); col = torch.tensor([0, 10**8], dtype=torch.int32)
expect(ValueError, "csr_dense_scatter_: col_idx must lie in [0, 6)",
       lambda: torch.ops.sparsekern.csr_dense_scatter_(torch.zeros(2, 6), torch.ones(2), row_ptr, col))
""",
}


@requires_ext
@pytest.mark.parametrize("case", CRASHES, ids=list(CRASHES))
def test_crash_cases_are_refused_in_a_subprocess(case):
    code = textwrap.dedent(_PRELUDE) + CRASHES[case]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# SparseLinear: edited buffers are followed (or refused); load_state_dict checks everything first.


def _reference(layer, x):
    return F.linear(x.double(), layer.dense_weight().detach().double(), layer.bias.detach().double())


@pytest.mark.parametrize("sparsity", [0.9, 0.3], ids=["sparse-path", "dense-path"])
def test_layer_follows_a_valid_edit_of_its_buffers(sparsity):
    """A valid in-place edit of col_idx is a new topology: the CSC and the dense workspace are rebuilt from it."""
    torch.manual_seed(0)
    layer = SparseLinear(40, 24, sparsity=sparsity)
    x = torch.randn(7, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        counts = layer.row_ptr[1:] - layer.row_ptr[:-1]
        row = int(((counts > 0) & (counts < 40)).nonzero()[0])  # a row with a nonzero and a free column
        lo, hi = int(layer.row_ptr[row]), int(layer.row_ptr[row + 1])
        cols = set(layer.col_idx[lo:hi].tolist())
        free = min(set(range(40)) - cols)
        new = sorted((cols - {max(cols)}) | {free}) if cols else []
        layer.col_idx[lo:hi] = torch.tensor(new, dtype=torch.int32)
        y = layer(x)
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    layer(x).sum().backward()  # the backward runs through the rebuilt CSC
    expected_dx = layer.dense_weight().detach().sum(0).expand(7, 40)
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-5)


def test_layer_refuses_a_bad_edit_then_recovers():
    layer = SparseLinear(16, 8, mask=torch.arange(8 * 16).view(8, 16) % 2 == 0)  # 8 nonzeros in every row
    x = torch.randn(3, 16)
    before = layer(x).detach()
    old = int(layer.col_idx[1])
    layer.col_idx[1] = layer.col_idx[0]  # a repeated column in row 0
    with pytest.raises(ValueError, match="SparseLinear: col_idx must be ascending and unique within each row"):
        layer(x)
    layer.col_idx[1] = old
    assert torch.equal(layer(x).detach(), before)


def test_layer_with_replaced_buffer_is_checked():
    layer = SparseLinear(16, 8, sparsity=0.5)
    bad = layer.col_idx.clone()
    bad[-1] = 16
    layer.col_idx = bad
    with pytest.raises(ValueError, match=r"SparseLinear: col_idx must lie in \[0, 16\)"):
        layer(torch.randn(3, 16))


def _layer_and_other_topology():
    torch.manual_seed(3)
    layer = SparseLinear(12, 6, sparsity=0.5)
    other = SparseLinear(12, 6, sparsity=0.25)
    return layer, {k: v.clone() for k, v in other.state_dict().items()}


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer, snapshot):
    now = layer.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), k


def _duplicate_column(state):
    state["col_idx"][1] = state["col_idx"][0]


def _unsorted_row(state):
    state["col_idx"][0], state["col_idx"][1] = int(state["col_idx"][1]), int(state["col_idx"][0])


LOAD_FAULTS = {
    "duplicate-col": (_duplicate_column, ValueError, r"col_idx must be ascending and unique within each row"),
    "unsorted-row": (_unsorted_row, ValueError, r"col_idx must be ascending and unique within each row"),
    "values-short": (
        lambda s: s.update(values=s["values"][:-1]),
        ValueError,
        r"values must have one entry per nonzero",
    ),
    "values-long": (
        lambda s: s.update(values=torch.cat([s["values"], s["values"][:1]])),
        ValueError,
        r"values must have one entry per nonzero",
    ),
    "values-missing": (lambda s: s.pop("values"), ValueError, r"values is missing"),
    "bias-shape": (lambda s: s.update(bias=torch.zeros(7)), ValueError, r"bias must have 6 entries, got 7"),
    "col-range": (lambda s: s["col_idx"].__setitem__(-1, 12), ValueError, r"col_idx must lie in \[0, 12\)"),
    "row-ptr-alone": (lambda s: s.pop("col_idx"), ValueError, r"row_ptr and col_idx must be loaded together"),
    "row-ptr-dtype": (lambda s: s.update(row_ptr=s["row_ptr"].int()), TypeError, r"row_ptr must have dtype int64"),
}


@pytest.mark.parametrize("fault", LOAD_FAULTS, ids=list(LOAD_FAULTS))
def test_load_state_dict_refuses_and_changes_nothing(fault):
    layer, state = _layer_and_other_topology()
    edit, error, match = LOAD_FAULTS[fault]
    if fault in ("duplicate-col", "unsorted-row"):
        assert int(state["row_ptr"][1]) >= 2  # row 0 holds two nonzeros to break
    edit(state)
    snapshot = _snapshot(layer)
    x = torch.randn(4, 12)
    y = layer(x).detach()
    with pytest.raises(error, match="SparseLinear.load_state_dict: " + match):
        layer.load_state_dict(state, strict=False)
    _assert_unchanged(layer, snapshot)
    assert torch.equal(layer(x).detach(), y)


def test_load_state_dict_names_the_layer():
    model = torch.nn.Sequential(SparseLinear(12, 6, sparsity=0.5))
    state = model.state_dict()
    state["0.values"] = state["0.values"][:-1]
    with pytest.raises(ValueError, match=r"0's values must have one entry per nonzero"):
        model.load_state_dict(state)


def test_load_state_dict_of_another_topology_is_checked_once():
    layer, state = _layer_and_other_topology()
    layer.load_state_dict(state)
    assert is_checked(layer.index)  # no rebuild on the next forward
    assert torch.equal(layer.col_idx, state["col_idx"])
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.mask.sum() == layer.nnz
    state["col_idx"][0] = 5  # the loaded tensors are copied, never shared with the state dict
    assert not torch.equal(layer.col_idx, state["col_idx"])


def test_inference_tensors_are_recorded_by_identity():
    """A layer built under inference_mode has no version counters: it is taken as checked, not rebuilt per call."""
    with torch.inference_mode():
        layer = SparseLinear(16, 8, sparsity=0.5)
        assert is_checked(layer.index)
        csc_ptr = layer.csc_ptr
        x = torch.randn(3, 16)
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
        assert layer.csc_ptr is csc_ptr
