"""pytest-benchmark: the constant fan-in (ELL) CPU kernels against the CSR kernels at the same pattern, and the ELL
forward at online-inference batches against dense F.linear.

    pytest benchmarks/bench_ell_spmm.py --benchmark-enable       # 1024x1024, 90%, B=256, fp32
    SPARSEKERN_BENCH_QUICK=1 pytest benchmarks/bench_ell_spmm.py  # CI smoke: 64->96, B=70, each body run once

The CSR rows run what SparseLinear runs today on its sparse path: spmm (forward), spmm through the CSC with the
values permuted into CSC order (dX), sddmm (dW). Every benchmark also checks its result against float64.

An interleaved A/B comparison (the figures in the README), every variant timed in turn within one process,
medians of the per-round ratios::

    python benchmarks/bench_ell_spmm.py [--threads 2] [--rounds 15] [--isa avx2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sparsekern import _extension
from sparsekern._csr import CSRIndex

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK", "") == "1"
SHAPE, BATCH = ((96, 64), 70) if QUICK else ((1024, 1024), 256)  # (n_out, n_in)
SPARSITY = 0.9

pytestmark = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")


class Problem:
    """A random constant fan-in W (n_out, n_in) with k = round((1 - sparsity) * n_in) per row, in ELL and CSR/CSC,
    and fp32 activations x (batch, n_in), output gradients g (batch, n_out)."""

    def __init__(self, n_out: int, n_in: int, sparsity: float, batch: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.n_out, self.n_in, self.batch = n_out, n_in, batch
        self.k = max(1, round((1 - sparsity) * n_in))
        self.cols = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, : self.k].sort(1).values.int().contiguous()
        self.values = torch.randn(n_out, self.k, generator=gen)
        self.x = torch.randn(batch, n_in, generator=gen)
        self.g = torch.randn(batch, n_out, generator=gen)
        self.dense = torch.zeros(n_out, n_in).scatter_(1, self.cols.long(), self.values)
        self.index = CSRIndex.from_mask(self.dense != 0)
        assert torch.equal(self.index.col_idx, self.cols.view(-1)), "CSR of the pattern = the ELL index, flat"
        self.flat = self.values.view(-1)

    def calls(self) -> dict[str, tuple]:
        """{op: (ell call, csr call)} for fwd, dX and dW."""
        ops, i = torch.ops.sparsekern, self.index
        return {
            "fwd": (
                lambda: ops.ell_spmm(self.x, self.cols, self.values),
                lambda: ops.spmm(self.x, i.row_ptr, i.col_idx, self.flat, self.n_out),
            ),
            "dX": (
                lambda: ops.ell_spmm_t(self.g, self.cols, self.values, self.n_in),
                lambda: ops.spmm(self.g, i.csc_ptr, i.csc_row, self.flat[i.csc_perm], self.n_in),
            ),
            "dW": (
                lambda: ops.ell_sddmm(self.g, self.x, self.cols),
                lambda: ops.sddmm(self.g, self.x, i.row_ptr, i.col_idx).view(self.n_out, self.k),
            ),
        }

    def expected(self, op: str) -> torch.Tensor:
        x, g, w = self.x.double(), self.g.double(), self.dense.double()
        if op == "fwd":
            return x @ w.T
        if op == "dX":
            return g @ w
        return (g.T @ x).gather(1, self.cols.long())


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(*SHAPE, SPARSITY, BATCH)


@pytest.mark.parametrize("op", ["fwd", "dX", "dW"])
@pytest.mark.parametrize("layout", ["ell", "csr"])
def test_ell_vs_csr(benchmark, problem, op, layout):
    benchmark.group = f"{op} {SHAPE[1]}->{SHAPE[0]} B={BATCH} {SPARSITY:.0%} fp32"
    fn = problem.calls()[op][0 if layout == "ell" else 1]
    out = benchmark(fn)
    err = float((out.double() - problem.expected(op)).abs().max())
    benchmark.extra_info.update(isa=_extension.cpu_isa(), max_abs_error=err)
    assert err < 1e-3 * max(1.0, float(problem.expected(op).abs().max()))


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("impl", ["ell", "dense"])
def test_online_inference(benchmark, impl, batch):
    p = Problem(*SHAPE, SPARSITY, batch)
    benchmark.group = f"online fwd {SHAPE[1]}->{SHAPE[0]} B={batch} {SPARSITY:.0%} fp32"
    fn = (
        (lambda: torch.ops.sparsekern.ell_spmm(p.x, p.cols, p.values))
        if impl == "ell"
        else (lambda: F.linear(p.x, p.dense))
    )
    out = benchmark(fn)
    assert torch.allclose(out.double(), p.expected("fwd"), atol=1e-4, rtol=1e-4)


# --- interleaved A/B ---------------------------------------------------------------------------------------------


CLOCK = time.perf_counter


def _time(fn, reps: int) -> float:
    t0 = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - t0) / reps


def ab(variants: dict, rounds: int, target_s: float = 0.02) -> dict:
    """Median seconds per call of each variant, timed in turn within every round (noise hits all alike), and the
    median over rounds of each variant's time relative to the first variant's."""
    for fn in variants.values():
        fn()  # warm up: allocations, page faults, tile buffers
    reps = {name: max(1, int(target_s / max(_time(fn, 1), 1e-7))) for name, fn in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(_time(fn, reps[name]))
    first = next(iter(variants))
    return {
        name: (
            statistics.median(ts),
            statistics.median(a / b for a, b in zip(ts, times[first], strict=True)),
            (min(ts), max(ts)),
        )
        for name, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time (time.process_time), which a loaded machine's descheduling does not "
        "inflate; meaningful with --threads 1 (spinning worker threads count too)",
    )
    parser.add_argument("--isa", default=None, help="avx512, avx2 or baseline (default: the widest)")
    parser.add_argument("--shapes", default="1024x1024,1000x1537", help="n_out x n_in, comma-separated")
    parser.add_argument("--sparsities", default="0.9,0.98")
    parser.add_argument("--batches", default="256,2048")
    parser.add_argument("--online", default="1,4,16", help="online-inference batches (90%% sparsity, vs dense)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    _extension.set_cpu_isa(args.isa)
    isa, threads = _extension.cpu_isa(), torch.get_num_threads()
    print(f"# {cpu_model()}, isa={isa}, threads={threads}, clock={args.clock}, torch {torch.__version__}")
    print("| shape (out x in) | sparsity | B | op | ELL ms | CSR ms | CSR/ELL (median of rounds) |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_out, n_in = map(int, shape.split("x"))
        for sparsity in map(float, args.sparsities.split(",")):
            for batch in map(int, args.batches.split(",")):
                p = Problem(n_out, n_in, sparsity, batch)
                for op, (ell, csr) in p.calls().items():
                    r = ab({"ell": ell, "csr": csr}, args.rounds)
                    print(
                        f"| {shape} | {sparsity:.0%} | {batch} | {op} | {r['ell'][0] * 1e3:.3f} | "
                        f"{r['csr'][0] * 1e3:.3f} | {r['csr'][1]:.2f}x |",
                        flush=True,
                    )
    print()
    print("| shape (out x in) | B | ELL fwd us | dense F.linear us | dense/ELL (median of rounds) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(",")[:1]:
        n_out, n_in = map(int, shape.split("x"))
        for batch in map(int, args.online.split(",")):
            p = Problem(n_out, n_in, 0.9, batch)
            r = ab(
                {
                    "ell": lambda p=p: torch.ops.sparsekern.ell_spmm(p.x, p.cols, p.values),
                    "dense": lambda p=p: F.linear(p.x, p.dense),
                },
                args.rounds,
            )
            print(
                f"| {shape} | {batch} | {r['ell'][0] * 1e6:.1f} | {r['dense'][0] * 1e6:.1f} | {r['dense'][1]:.2f}x |",
                flush=True,
            )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
