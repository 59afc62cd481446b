"""Test helpers: fresh random inputs, backend parametrisation, bit-level comparison, the error rule against
float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsekern import _extension

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.int8, torch.float32)
BITS_DTYPE = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.int8: torch.int8,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t, so torch.equal compares -0.0 and NaN payloads exactly."""
    return t.view(BITS_DTYPE.get(t.dtype, t.dtype))


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(bits(actual), bits(expected)), "tensors differ bit-wise"


# The slack on top of twice torch's error, relative to the result's scale (its largest |value|, at least 1). bf16 and
# fp16: two roundings, as a kernel rounds its sum and then the sum with the bias, each up to half an ulp, where torch
# rounds once and may land almost exactly (half an ulp was too tight: about 1 bf16 draw in 6 of test_sparse_linear's
# 1x13x7 case failed by a legitimate double rounding). fp32: ~80 ulps, as torch's fp32 GEMM can be nearly exact
# where another summation order is not. A wrong term is far larger than either.
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def max_abs_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    """max |actual - expected64| in float64, on the CPU (0 for empty tensors)."""
    if expected64.numel() == 0:
        return 0.0
    return float((actual.detach().cpu().double() - expected64.detach().cpu()).abs().max())


def assert_within_torch_error(actual: torch.Tensor, expected64: torch.Tensor, torch_result: torch.Tensor) -> None:
    """The one error rule of every kernel test (flash-attention's): a kernel's max error against the float64
    reference ``expected64`` is at most twice the error torch makes computing the same thing in the same dtype
    (``torch_result``), plus ``ROUNDING[dtype]`` times the result's scale."""
    assert actual.dtype == torch_result.dtype, (actual.dtype, torch_result.dtype)
    assert actual.shape == expected64.shape, (tuple(actual.shape), tuple(expected64.shape))
    scale = max(float(expected64.abs().max()) if expected64.numel() else 0.0, 1.0)
    err, torch_err = max_abs_error(actual, expected64), max_abs_error(torch_result, expected64)
    bound = 2 * torch_err + ROUNDING[actual.dtype] * scale
    assert err <= bound, f"error {err:.3g} > 2 x torch's {torch_err:.3g} + {ROUNDING[actual.dtype]:g} x {scale:.3g}"


def random_semi24(m: int, k: int, dtype: torch.dtype, *, seed: int | None = None, device="cpu") -> torch.Tensor:
    """A fresh exactly-2:4 (fp32: 1:2) matrix: random kept positions, ~15% of kept values zeroed (so groups
    with 0 or 1 nonzeros appear), and for floats some -0.0 and NaN among the values."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    group, kept = (2, 1) if dtype == torch.float32 else (4, 2)
    keep = torch.rand(m, k // group, group, generator=gen).argsort(-1) < kept
    keep &= torch.rand(m, k // group, group, generator=gen) > 0.15
    if dtype == torch.int8:
        values = torch.randint(-128, 128, (m, k // group, group), generator=gen).to(torch.int8)
        dense = torch.where(keep, values, torch.zeros((), dtype=torch.int8))
    else:
        values = torch.randn(m, k // group, group, generator=gen, dtype=torch.float64) * 100
        special = torch.rand(m, k // group, group, generator=gen)
        values = torch.where(special < 0.02, torch.full((), float("nan"), dtype=torch.float64), values)
        values = torch.where((special > 0.98), torch.full((), -0.0, dtype=torch.float64), values)
        # dropped positions hold -0.0 or +0.0, both of which count as zero
        dropped = torch.where(special < 0.5, -0.0, 0.0).to(torch.float64)
        dense = torch.where(keep, values, dropped).to(dtype)
    return dense.reshape(m, k).to(device)


def backend_params(*names: str):
    """pytest params for backends with the marks each needs: 'cpu' needs the extension, 'triton' the interpreter
    or a GPU (and the triton mark), 'cuda' a GPU."""
    params = []
    for name in names:
        marks = []
        if name == "cpu":
            marks.append(
                pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")
            )
        if name == "triton":
            marks.append(pytest.mark.triton)
            marks.append(
                pytest.mark.skipif(
                    not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton needs a GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)",
                )
            )
        if name == "cuda":
            marks.append(pytest.mark.gpu)
            marks.append(requires_gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def param_pairs(firsts, seconds, keep, ids=str) -> list:
    """pytest params (a, b) for the pairs of two parametrisations that ``keep(a, b)`` accepts, with the marks and
    ids of both (``ids`` names a plain value): a product without the combinations that can never run, instead of a
    test that skips them on every machine."""

    def parts(p):
        if isinstance(p, type(pytest.param(None))):
            return p.values[0], list(p.marks), p.id if p.id is not None else ids(p.values[0])
        return p, [], ids(p)

    pairs = []
    for a, b in ((parts(a), parts(b)) for a in firsts for b in seconds):
        if keep(a[0], b[0]):
            pairs.append(pytest.param(a[0], b[0], marks=[*a[1], *b[1]], id=f"{a[2]}-{b[2]}"))
    return pairs


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return "cuda"
    return "cpu"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter at the repository root, with extra environment variables (for what
    is read once per process: SPARSEKERN_CPU_ISA, CUDA initialisation)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def peak_rss_rise(setup: str, measured: str, **env: str) -> int:
    """Bytes by which a fresh interpreter's peak RSS rises while it runs ``measured`` (after ``setup``; both
    Python source, ``import torch, sparsekern`` done): the high-water mark is reset first (/proc/self/clear_refs)."""
    code = (
        "import torch, sparsekern\n"
        f"{setup}\n"
        "def kib(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "before = kib('VmRSS:')\n"
        f"{measured}\n"
        "print((kib('VmHWM:') - before) * 1024)\n"
    )
    result = run_python(code, **env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def spawn_ranks(worker, args: tuple, nprocs: int, timeout_s: float = 180) -> None:
    """worker(rank, *args) in nprocs fresh processes; if they are not all done within timeout_s, kill them and fail
    (a rank that hangs in a collective must fail the test, not block CI)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{nprocs} processes still running after {timeout_s} s (a rank hangs in a collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def gloo_rank(rank: int, path: str, world: int, run) -> None:
    """This process as ``rank`` of a gloo group of ``world`` CPU processes (one thread each, file rendezvous in
    ``path``): saves ``run(rank)`` to ``path/rank{rank}.pt``, the frame of every two-process worker. The group goes
    down only after what ``run`` built is freed: a DDP wrapper alive at its group's destruction can abort the
    process ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save(run(rank), f"{path}/rank{rank}.pt")
        gc.collect()
    finally:
        dist.destroy_process_group()


def rank_results(worker, path, nprocs: int, timeout_s: float = 180) -> list:
    """Run ``worker(rank, str(path))`` in ``nprocs`` processes (:func:`spawn_ranks`); each saves what it found to
    ``path / f"rank{rank}.pt"``, returned in rank order."""
    spawn_ranks(worker, (str(path),), nprocs, timeout_s)
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def isa_params():
    """pytest params for every CPU instruction set this machine runs (widest first), for a test that takes the
    ``cpu_isa`` fixture: an AVX-512 machine tests avx512, avx2 and baseline; an AVX2 one avx2 and baseline. Without
    the extension: one param, skipped with the reason."""
    isas = _extension.available_isas()
    if not isas:
        reason = f"extension: {_extension.unavailable_reason}"
        return [pytest.param("none", marks=pytest.mark.skipif(True, reason=reason))]
    return [pytest.param(isa, id=isa) for isa in isas]
