"""``sparsekern bench <name>``: benchmarks of sparsekern's ops, sharing :mod:`sparsekern.bench.harness`.

Each benchmark is one module here with a ``run(args) -> int``; it is listed in ``_BENCHES`` with its help text
and dtypes, and optionally a function adding options of its own (``linear``'s sweep axes). This file imports
neither torch nor the modules, so building the command line stays fast.
To add one (``grow``): write ``sparsekern/bench/<name>.py`` with ``run(args)`` and add a ``_Bench``. To let it force
an instruction set, add :func:`add_isa_argument` to its options and run it inside ``harness.isa_context(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CPU_ISAS",
    "add_bench_arguments",
    "add_isa_argument",
    "add_linear_arguments",
    "add_semi24_arguments",
    "positive_float",
    "positive_int",
    "run_bench",
    "size_pair",
]


@dataclass(frozen=True)
class _Bench:
    module: str
    help: str
    description: str
    dtypes: tuple[str, ...]  # the choices of --dtype; empty: the benchmark has no --dtype (its dtypes are fixed)
    # Adds the benchmark's own options to its subcommand's parser (after the shared ones).
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), such as 0.9, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a sparsity in [0, 1), such as 0.9, got {text!r}")
    return value


def size_pair(form: str, example: str):
    """An argparse type for two positive sizes written ``AxB``; ``form`` names them (``INxOUT``, ``ROWSxCOLS``)."""

    def parse(text: str) -> tuple[int, int]:
        try:
            first, second = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {form} such as {example}, got {text!r}") from None
        if first < 1 or second < 1:
            raise argparse.ArgumentTypeError(f"expected positive sizes in {form}, got {text!r}")
        return first, second

    return parse


# sparsekern._extension.ISAS, widest first (repeated here: building the command line must not import torch; a test
# checks that they agree).
CPU_ISAS = ("avx512", "avx2", "baseline")


def add_isa_argument(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    """Add ``--isa`` to a benchmark's parser: the instruction set the C++ CPU kernels are forced to, as
    ``SPARSEKERN_CPU_ISA`` does (with ``multiple``: repeatable). argparse refuses unknown names; run the benchmark
    inside :func:`sparsekern.bench.harness.isa_context`, which refuses an ISA this CPU lacks with a clear error."""
    default = "every one this CPU runs" if multiple else "the widest this CPU runs"
    parser.add_argument(
        "--isa",
        choices=CPU_ISAS,
        action="append" if multiple else "store",
        default=None,
        help=f"instruction set of the C++ CPU kernels{'; repeatable' if multiple else ''} (default: {default})",
    )


LINEAR_MODES = ("fwd", "fwdbwd")
LINEAR_BACKENDS = ("cpu", "cuda", "triton", "reference")


def add_linear_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep axes of ``sparsekern bench linear`` (also used by ``benchmarks/sweep.py linear``)."""
    parser.add_argument(
        "--sparsity",
        action="append",
        type=_sparsity,
        metavar="S",
        help="fraction of zero weights, in [0, 1); repeatable (default: 0.5 0.7 0.8 0.9 0.95 0.98 0.99)",
    )
    parser.add_argument(
        "--batch", action="append", type=positive_int, metavar="B", help="rows of x; repeatable (default: 256 2048)"
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=size_pair("INxOUT", "768x3072"),  # the weight of nn.Linear(IN, OUT)
        metavar="INxOUT",
        help="nn.Linear(IN, OUT); repeatable (default: 768x3072 3072x768 4096x4096)",
    )
    parser.add_argument(
        "--mode",
        action="append",
        choices=LINEAR_MODES,
        help="fwd: forward only; fwdbwd: forward + dX + dW at the nonzeros; repeatable (default: both)",
    )
    parser.add_argument(
        "--backend",
        choices=LINEAR_BACKENDS,
        default="cpu",
        help="sparsekern kernels to time (default: %(default)s, the C++ kernels on CPU tensors; cuda and triton "
        "run on a CUDA GPU; reference is the plain-PyTorch fallback)",
    )
    parser.add_argument(
        "--fan-in",
        action="store_true",
        help="constant fan-in masks (every row keeps round((1 - S) * IN) nonzeros): adds the ELL kernels' column "
        "and their goals (>= 1.3x the CSR kernels)",
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="online inference: unset axes default to B 1 4 16, forward only, fp32, sparsity 0.9 0.95 0.98, "
        "constant fan-in masks, against dense (SRigL's 3.4x at 90%% is the bar)",
    )
    add_isa_argument(parser)
    parser.add_argument(
        "--max-time",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="cut the timed calls of one function short once they total this long; a call this long is timed "
        "once or twice (default: 1.0, or 0.2 with --quick)",
    )


def add_micro_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sparsekern bench micro`` besides the shared ones."""
    add_isa_argument(parser, multiple=True)
    parser.add_argument(
        "--calibrate",
        type=positive_int,
        default=None,
        metavar="N",
        help="run the whole set N times and print the floors table that those runs suggest (never fails on a floor)",
    )


def add_semi24_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sparsekern bench semi24`` besides the shared ones."""
    parser.add_argument(
        "--isa",
        action="append",
        choices=("avx512", "avx2", "baseline", "all"),
        help="instruction set the C++ CPU kernels run, a row each; repeatable; all: every one this CPU has "
        "(default: the one they run now, see `sparsekern info`)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=size_pair("INxOUT", "4096x11008"),  # the weight of nn.Linear(IN, OUT), as in `bench linear`
        metavar="INxOUT",
        help="nn.Linear(IN, OUT); repeatable (default: every shape of the table in sparsekern/bench/semi24.py)",
    )
    parser.add_argument(
        "--batch",
        action="append",
        type=positive_int,
        metavar="B",
        help="rows (tokens) of x in the GPU F.linear part; repeatable (default: each shape's own, 1 16 128 2048)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=("cpu", "triton", "cuda", "reference"),
        help="sparsekern backend whose conversions are timed; repeatable (default: every one that runs here)",
    )
    parser.add_argument(
        "--exported",
        action="store_true",
        help="instead: time a model exported by sparsekern.export_semi24 (a chain of nn.Linear of the --shape "
        "weights, default the Llama-7B MLP 4096->11008->4096, pruned to 2:4; --dtype fp16, bf16 or int8) against "
        "the dense model at the first --batch tokens (default 2048); writes <out>/semi24-exported.md and .json",
    )


_BENCHES: dict[str, _Bench] = {
    "semi24": _Bench(
        module="sparsekern.bench.semi24",
        help="2:4 compress/decompress vs torch's reference conversion; dense vs 2:4 F.linear on a GPU",
        description=(
            "Times sparsekern.semi24_compress and semi24_decompress for every backend that can run here against "
            "torch's reference conversion (torch.sparse._semi_structured_conversions), checking that each result "
            "is bit-identical. With a CUDA GPU of compute capability >= 8.0 it also times dense F.linear against "
            "the same pruned weight as a CUTLASS and a cuSPARSELt 2:4 tensor (BERT-base, ViT-L, Llama-7B and "
            "PyTorch 2:4 tutorial shapes). Writes <out>/semi24.md and <out>/semi24.json and prints the table. "
            "Exit code 1 when a conversion fails or is not bit-identical."
        ),
        dtypes=("fp16", "bf16", "int8", "fp32"),
        add_arguments=lambda p: add_semi24_arguments(p),
    ),
    "linear": _Bench(
        module="sparsekern.bench.linear",
        help="sparse linear layer (sparse_linear) vs dense F.linear, torch.sparse.mm (CSR) and SparseProp",
        description=(
            "Times sparsekern.ops.sparse_linear (path='sparse', and path='auto' as SparseLinear runs it) against "
            "dense F.linear on the masked dense weight, torch.sparse.mm with a CSR weight, and SparseProp when it "
            "is installed, over sparsity x batch x shape x dtype, forward and forward+backward (dX and dW at the "
            "nonzeros), checking every result against a float64 reference. Prints the DESIGN goals next to the "
            "achieved speedups and the sparsity from which the sparse path beats dense. Writes <out>/linear.md and "
            "<out>/linear.json. Exit code 1 when a sparsekern call fails or its error exceeds twice dense's. With "
            "--fan-in every row keeps the same number of nonzeros and the constant fan-in (ELL) kernels are timed "
            "next to the CSR ones; --online times batches of 1 to 16 (inference) on such weights."
        ),
        dtypes=("fp32", "bf16", "fp16"),
        add_arguments=add_linear_arguments,
    ),
    "grow": _Bench(
        module="sparsekern.bench.grow",
        help="RigL grow: sparsekern.outer_topk vs dense g.T @ x, mask and torch.topk (time and peak memory)",
        description=(
            "Times sparsekern.outer_topk (the k highest-scoring inactive positions of |g.T @ x|, never forming it) "
            "with precision 'fast' and 'exact', interleaved with the GEMM g.T @ x alone (the floor) and the dense "
            "path (g.T @ x, masked, torch.topk), at 4096x4096, 90% sparse, drop fraction 0.3, B 64, 256 and 2048, "
            "at B=256 99% / 0.1, and at 16384x16384 (the dense path is skipped where it would not "
            "fit in memory), with the peak memory of each. Prints the goals next to the achieved figures. "
            "Writes <out>/grow.md and <out>/grow.json."
        ),
        dtypes=("fp32", "bf16"),
        add_arguments=lambda p: (
            p.add_argument(
                "--backend",
                choices=("cpu", "cuda", "triton", "reference"),
                default="cpu",
                help="sparsekern kernel to time (default: %(default)s; cuda and triton need a CUDA GPU)",
            ),
            add_isa_argument(p),
        ),
    ),
    "micro": _Bench(
        module="sparsekern.bench.micro",
        help="CI's kernel microbenchmarks: each CPU op on each ISA as a ratio to its dense baseline, with floors",
        description=(
            "Times a short fixed set of cases (spmm forward; the sparse linear forward+backward, i.e. spmm, spmm dX "
            "and sddmm; outer_topk fast and exact; csr_dense scatter+gather; the dense path; semi24_compress) on "
            "every instruction set this CPU runs, each as a ratio to its dense baseline timed in the same process "
            "in alternation (median over --repeat turns). Writes <out>/micro.md and <out>/micro.json. Exit code 1 "
            "when a case fails or its ratio falls below its floor (see sparsekern/bench/micro.py for the floors and "
            "how they were set), 2 when an --isa cannot run here."
        ),
        dtypes=(),
        add_arguments=add_micro_arguments,
    ),
    "e2e": _Bench(
        module="sparsekern.bench.e2e",
        help="training end to end: wide MLP dense vs RigL on masked weights vs RigL on SparseLinear",
        description=(
            "Trains the MLP 64-4096-4096-10 on the UCI digits (B=256) dense, with RigL on masked dense weights and "
            "with RigL on SparseLinear (the 4096x4096 layer at --sparsity, default 0.95; the small first and last "
            "layers dense), the runs of a seed taking turns epoch by epoch, the sparse one once per --isa. Reports "
            "training seconds per epoch, the speedup over dense and the test accuracy against DESIGN's goal. "
            "--repeat is the number of seeds (default 3, 1 with --quick). Writes <out>/e2e.md and <out>/e2e.json."
        ),
        dtypes=("fp32",),
        add_arguments=lambda p: importlib.import_module("sparsekern.bench.e2e").add_arguments(p),
    ),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one subcommand per benchmark to the ``sparsekern bench`` parser."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, bench in _BENCHES.items():
        p = sub.add_parser(name, help=bench.help, description=bench.description)
        p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run of seconds")
        p.add_argument(
            "--out", default="bench-results", help="directory for the .md and .json results (default: %(default)s)"
        )
        p.add_argument(
            "--repeat",
            "--repeats",
            type=positive_int,
            default=None,
            help="timed calls per case (default: 5, or 3 with --quick; micro: turns of baseline and op, default 7)",
        )
        if bench.dtypes:
            p.add_argument(
                "--dtype",
                action="append",
                choices=bench.dtypes,
                help="dtype to run; repeat the option for several (default: all)",
            )
        if bench.add_arguments is not None:
            bench.add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark that ``args.bench`` names; returns the process exit code."""
    bench = _BENCHES[args.bench]
    module = importlib.import_module(bench.module)
    try:
        return module.run(args)
    except OSError as exc:  # e.g. --out names a file or an unwritable directory
        print(f"sparsekern bench {args.bench}: {exc}", file=sys.stderr)
        return 1
