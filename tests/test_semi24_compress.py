"""semi24_compress / semi24_decompress: bit-identical to torch's CUTLASS conversion on every backend."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    HAS_GPU,
    assert_bits_equal,
    backend_params,
    bits,
    device_for,
    isa_params,
    param_pairs,
    random_semi24,
    run_python,
)
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_compress,
)
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_to_dense_cutlass as torch_decompress,
)

import sparsekern
from sparsekern import BackendUnavailableError
from sparsekern.ops import _backend


def isa_backends(*names: str):
    """backend_params, with "cpu" once per instruction set this machine runs ("cpu:avx2", ...): the C++ kernels'
    AVX-512, AVX2 and portable paths are each checked against torch."""
    params = []
    for p in backend_params(*names):
        if p.values[0] != "cpu":
            params.append(p)
            continue
        for isa in isa_params():
            params.append(pytest.param(f"cpu:{isa.values[0]}", marks=[*p.marks, *isa.marks], id=f"cpu-{isa.id}"))
    return params


@pytest.fixture
def backend(request):
    """The backend name of the param; "cpu:<isa>" runs the test with the CPU kernels forced to that ISA."""
    name, _, isa = request.param.partition(":")
    if not isa:
        yield name
        return
    with sparsekern._extension.use_cpu_isa(isa):
        yield name


BACKENDS = isa_backends("cpu", "reference", "triton", "cuda")
# minimum shapes, then odd multiples of them (not multiples of any power-of-two tile)
SMALL_SHAPES = {
    torch.float16: [(32, 64), (96, 192), (160, 320), (32, 448)],
    torch.bfloat16: [(32, 64), (96, 192), (64, 320)],
    torch.int8: [(16, 128), (48, 384), (80, 640), (16, 1152)],
    torch.float32: [(32, 32), (96, 96), (160, 224), (32, 416)],
}
SMALL = [
    pytest.param(dtype, shape, id=f"{str(dtype)[6:]}-{shape[0]}x{shape[1]}")
    for dtype in ALL_DTYPES
    for shape in SMALL_SHAPES[dtype]
]


def assert_round_trip(restored: torch.Tensor, dense: torch.Tensor) -> None:
    """decompress(compress(dense)) gives every nonzero (NaN included) back bit for bit and zeros elsewhere; only
    the sign of a zero may change (a dropped -0.0 comes back as +0.0)."""
    nonzero = dense != 0
    assert restored.dtype == dense.dtype and restored.shape == dense.shape
    assert torch.equal(bits(restored)[nonzero], bits(dense)[nonzero])
    assert bool((restored[~nonzero] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype, shape", SMALL)
def test_compress_bit_identical_to_torch(backend, dtype, shape):
    dense = random_semi24(*shape, dtype, device=device_for(backend))
    packed, meta = sparsekern.semi24_compress(dense, backend=backend)
    expected_packed, expected_meta = torch_compress(dense)
    assert_bits_equal(packed, expected_packed)
    assert_bits_equal(meta, expected_meta)


@pytest.fixture(scope="module")
def large_case():
    """(dense, torch's (packed, meta)) per (shape, dtype), drawn and converted by torch once for all backends."""
    cache = {}

    def get(shape, dtype):
        if (shape, dtype) not in cache:
            dense = random_semi24(*shape, dtype)
            cache.clear()  # one large case held at a time
            cache[shape, dtype] = dense, torch_compress(dense)
        return cache[shape, dtype]

    return get


# The large shapes run the reference once (fp16); the CPU kernel on every ISA runs every dtype. Backends vary
# fastest, so each large input is made once (large_case holds one).
LARGE = param_pairs(
    ALL_DTYPES,
    isa_backends("cpu", "reference"),
    lambda d, b: b != "reference" or d == torch.float16,
    lambda d: str(d)[6:],
)


@pytest.mark.parametrize(("dtype", "backend"), LARGE, indirect=["backend"])
@pytest.mark.parametrize("shape", [(4096, 4096), (3072, 10240)], ids=["4096x4096", "3072x10240"])
def test_compress_large_bit_identical(backend, shape, dtype, large_case):
    dense, (expected_packed, expected_meta) = large_case(shape, dtype)
    packed, meta = sparsekern.semi24_compress(dense, backend=backend)
    assert_bits_equal(packed, expected_packed)
    assert_bits_equal(meta, expected_meta)
    assert_round_trip(sparsekern.semi24_decompress(packed, meta, backend=backend), dense)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype, shape", SMALL)
def test_decompress_round_trip(backend, dtype, shape):
    dense = random_semi24(*shape, dtype, device=device_for(backend))
    packed, meta = torch_compress(dense)
    restored = sparsekern.semi24_decompress(packed, meta, backend=backend)
    assert_round_trip(restored, dense)
    if dtype != torch.float32:  # torch's fp32 to_dense loses low bits (see test_torch_fp32_to_dense_is_lossy)
        assert_bits_equal(restored, torch_decompress(packed, meta))


def test_torch_fp32_to_dense_is_lossy():
    """Documents why fp32 round trips are checked against the input rather than torch's to_dense: if torch
    fixes this, the docstring of semi24_decompress must change."""
    dense = random_semi24(64, 64, torch.float32, seed=0)
    dense = torch.nan_to_num(dense)
    packed, meta = torch_compress(dense)
    assert not torch.equal(torch_decompress(packed, meta), dense)
    assert torch.equal(sparsekern.semi24_decompress(packed, meta, backend="reference"), dense)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_hand_written_codes(backend):
    device = device_for(backend)
    # every group [1, 0, 0, 2]: columns 0 and 3 -> code 0b1100, four codes per int16 -> 0xCCCC
    dense = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float16).repeat(32, 16).to(device)
    packed, meta = sparsekern.semi24_compress(dense, backend=backend)
    assert torch.equal(packed.cpu(), torch.tensor([1.0, 2.0], dtype=torch.float16).repeat(32, 16))
    assert torch.equal(meta.cpu(), torch.full((32, 4), 0xCCCC - 0x10000, dtype=torch.int16))
    # all-zero groups are padded with columns 2 and 3, as torch does: 0b1110 -> 0xEEEE
    packed, meta = sparsekern.semi24_compress(torch.zeros(32, 64, dtype=torch.float16, device=device), backend=backend)
    assert torch.equal(meta.cpu(), torch.full((32, 4), 0xEEEE - 0x10000, dtype=torch.int16))
    assert torch.equal(bits(packed.cpu()), torch.zeros(32, 32, dtype=torch.int16))
    # fp32 1:2: a pair keeping its second element -> 0b1110; int8 packs 8 codes per int32
    dense = torch.tensor([0.0, 5.0], dtype=torch.float32).repeat(32, 16).to(device)
    packed, meta = sparsekern.semi24_compress(dense, backend=backend)
    assert torch.equal(packed.cpu(), torch.full((32, 16), 5.0))
    assert torch.equal(meta.cpu(), torch.full((32, 4), 0xEEEE - 0x10000, dtype=torch.int16))
    dense = torch.tensor([0, 7, 9, 0], dtype=torch.int8).repeat(16, 32).to(device)  # columns 1, 2 -> 0b1001
    packed, meta = sparsekern.semi24_compress(dense, backend=backend)
    assert torch.equal(packed.cpu(), torch.tensor([7, 9], dtype=torch.int8).repeat(16, 32))
    assert torch.equal(meta.cpu(), torch.full((16, 4), 0x99999999 - 2**32, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_not_sparse_names_first_bad_group(backend, dtype):
    shape = SMALL_SHAPES[dtype][1]
    dense = random_semi24(*shape, dtype, device=device_for(backend))
    group = 2 if dtype == torch.float32 else 4
    dense[5, 3 * group : 4 * group] = 1  # row 5, group 3: full
    dense[7, 0:group] = 1  # a later one, not reported
    kind = "1:2" if dtype == torch.float32 else "2:4"
    match = rf"dense is not {kind} sparse: row 5, columns {3 * group}\.\.{4 * group - 1}"
    with pytest.raises(ValueError, match=match):
        sparsekern.semi24_compress(dense, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_decompress_rejects_invalid_meta(backend):
    device = device_for(backend)
    packed, meta = sparsekern.semi24_compress(random_semi24(32, 64, torch.float16, device=device), backend=backend)
    meta = meta.clone()
    meta.view(-1)[0] = 0  # code 0b0000: the same column twice; element 0 holds logical (row 0, groups 0..3)
    with pytest.raises(ValueError, match=r"meta holds an invalid code for row 0, columns 0\.\.3"):
        sparsekern.semi24_decompress(packed, meta, backend=backend)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: [[1.0]], TypeError, r"dense must be a torch.Tensor, got list"),
        (lambda: torch.zeros(32, 64, dtype=torch.float64), TypeError, r"dense must have dtype float16, .*got float64"),
        (lambda: torch.zeros(64, dtype=torch.float16), ValueError, r"dense must be 2-D, got shape \(64,\)"),
        (lambda: torch.zeros(64, 32, dtype=torch.float16).t(), ValueError, r"dense must be contiguous"),
        (lambda: torch.zeros(16, 64, dtype=torch.float16), ValueError, r"16 rows.*multiple of 32 rows"),
        (lambda: torch.zeros(32, 96, dtype=torch.float16), ValueError, r"96 columns.*multiple of 64 columns"),
        (lambda: torch.zeros(16, 64, dtype=torch.int8), ValueError, r"64 columns.*multiple of 128 columns"),
        (lambda: torch.zeros(0, 64, dtype=torch.float16), ValueError, r"0 rows.*positive multiple of 32"),
    ],
    ids=["list", "float64", "1d", "noncontiguous", "rows", "cols", "int8-cols", "empty"],
)
def test_compress_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        sparsekern.semi24_compress(make())


def test_decompress_bad_input():
    packed, meta = sparsekern.semi24_compress(torch.zeros(32, 64, dtype=torch.float16), backend="reference")
    with pytest.raises(TypeError, match=r"meta must have dtype int16; got int32"):
        sparsekern.semi24_decompress(packed, meta.int())
    with pytest.raises(
        ValueError, match=r"meta must have shape \(32, 4\) for packed of shape \(32, 32\), got \(32, 2\)"
    ):
        sparsekern.semi24_decompress(packed, meta[:, :2].contiguous())
    with pytest.raises(ValueError, match=r"the dense matrix of packed has 32 columns"):
        sparsekern.semi24_decompress(packed[:, :16].contiguous(), meta)
    with pytest.raises(TypeError, match=r"packed must be a torch.Tensor"):
        sparsekern.semi24_decompress(None, meta)


def test_backend_errors(monkeypatch):
    dense = torch.zeros(32, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        sparsekern.semi24_compress(dense, backend="gpu")
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' is not available: .*takes CUDA tensors"):
        sparsekern.semi24_compress(dense, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match=r"backend='triton' is not available: .*TRITON_INTERPRET=1"):
            sparsekern.semi24_compress(dense, backend="triton")


def test_auto_falls_back_visibly_without_extension(monkeypatch):
    monkeypatch.setattr(sparsekern._extension, "_C", None)
    monkeypatch.setattr(sparsekern._extension, "unavailable_reason", "switched off for this test")
    dense = random_semi24(32, 64, torch.float16)
    with pytest.warns(RuntimeWarning, match=r"semi24_compress: using the plain-PyTorch reference .*switched off"):
        packed, meta = sparsekern.semi24_compress(dense)
    assert_bits_equal(meta, torch_compress(dense)[1])
    with pytest.raises(BackendUnavailableError, match=r"backend='cpu' is not available: switched off for this test"):
        sparsekern.semi24_compress(dense, backend="cpu")
    assert _backend.resolve("semi24_compress", dense.device, "auto") == "reference"


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d)[6:])
def test_opcheck(dtype):
    dense = random_semi24(*SMALL_SHAPES[dtype][0], dtype)
    dense = torch.nan_to_num(dense) if dense.is_floating_point() else dense
    torch.library.opcheck(torch.ops.sparsekern.semi24_compress.default, (dense,))
    packed, meta = torch.ops.sparsekern.semi24_compress(dense)
    torch.library.opcheck(torch.ops.sparsekern.semi24_decompress.default, (packed, meta))


@pytest.mark.triton
@pytest.mark.skipif(
    not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
def test_opcheck_triton_ops():
    compress_mod = importlib.import_module("sparsekern.ops.semi24_compress")
    decompress_mod = importlib.import_module("sparsekern.ops.semi24_decompress")

    dense = torch.nan_to_num(random_semi24(32, 64, torch.float16))
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(compress_mod._triton_op(), (dense,), test_utils=checks)
    packed, meta = compress_mod._triton_op()(dense)
    torch.library.opcheck(decompress_mod._triton_op(), (packed, meta), test_utils=checks)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
def test_torch_compile_fullgraph():
    dense = random_semi24(64, 128, torch.bfloat16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(x):
        packed, meta = sparsekern.semi24_compress(x, backend="cpu")
        return packed * 2, sparsekern.semi24_decompress(packed, meta, backend="cpu")

    packed2, restored = roundtrip(dense)
    expected_packed, _ = torch_compress(dense)
    assert torch.equal(bits(packed2), bits(expected_packed * 2))
    assert_round_trip(restored, dense)


@pytest.mark.skipif(not sparsekern._extension.available(), reason="needs the compiled extension")
def test_portable_cpu_kernel_is_bit_identical():
    """The CI machine has AVX-512, so the portable (non-VBMI2) kernel is forced in a subprocess."""
    code = (
        "import torch, sparsekern, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from helpers import random_semi24, assert_bits_equal\n"
        "from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass as ref\n"
        "info = sparsekern._extension.build_info()\n"
        "assert info['cpu_isa'].startswith('baseline'), info\n"
        "for dtype, shape in [(torch.float16, (96, 192)), (torch.bfloat16, (64, 128)), (torch.int8, (48, 384)),\n"
        "                     (torch.float32, (96, 96))]:\n"
        "    dense = random_semi24(*shape, dtype)\n"
        "    packed, meta = sparsekern.semi24_compress(dense, backend='cpu')\n"
        "    expected = ref(dense)\n"
        "    assert_bits_equal(packed, expected[0]); assert_bits_equal(meta, expected[1])\n"
        "    dense[3, 4:8] = 1\n"
        "    try:\n"
        "        sparsekern.semi24_compress(dense, backend='cpu'); raise SystemExit('no error')\n"
        "    except ValueError as e:\n"
        "        assert 'row 3, columns 4..' in str(e), e\n"
    )
    result = run_python(code, SPARSEKERN_CPU_ISA="baseline")
    assert result.returncode == 0, result.stderr
