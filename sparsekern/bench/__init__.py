"""``sparsekern bench <name>``: benchmarks of sparsekern's ops, sharing :mod:`sparsekern.bench.harness`.

Each benchmark is one module here with a ``run(args) -> int``; it is listed in ``_BENCHES`` with its help text
and dtypes, and optionally a function adding options of its own (``linear``'s sweep axes). This file imports
neither torch nor the modules, so building the command line stays fast.
To add one (``grow``): write ``sparsekern/bench/<name>.py`` with ``run(args)`` and add a ``_Bench``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["add_bench_arguments", "add_linear_arguments", "positive_float", "positive_int", "run_bench", "size_pair"]


@dataclass(frozen=True)
class _Bench:
    module: str
    help: str
    description: str
    dtypes: tuple[str, ...]
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
        "--isa",
        choices=("avx512", "avx2", "baseline"),
        default=None,
        help="run the C++ CPU kernels on this instruction set (default: the widest this CPU has; a lower one "
        "measures what a CPU without the wider one runs)",
    )
    parser.add_argument(
        "--max-time",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="cut the timed calls of one function short once they total this long; a call this long is timed "
        "once or twice (default: 1.0, or 0.2 with --quick)",
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
            "<out>/linear.json. Exit code 1 when a sparsekern call fails or its error exceeds twice dense's."
        ),
        dtypes=("fp32", "bf16", "fp16"),
        add_arguments=add_linear_arguments,
    ),
    "grow": _Bench(
        module="sparsekern.bench.grow",
        help="RigL grow: sparsekern.outer_topk vs dense g.T @ x, mask and torch.topk (time and peak memory)",
        description=(
            "Times sparsekern.outer_topk (the k highest-scoring inactive positions of |g.T @ x|, never forming it) "
            "against the dense path (g.T @ x, masked, torch.topk) at 4096x4096 with B 256 and 2048, sparsity 0.9 "
            "and 0.99, drop fraction 0.1 and 0.3, and at 16384x16384 (the dense path is skipped where it would not "
            "fit in memory), with the peak memory of each. Prints the DESIGN goals next to the achieved figures. "
            "Writes <out>/grow.md and <out>/grow.json."
        ),
        dtypes=("fp32", "bf16"),
        add_arguments=lambda p: p.add_argument(
            "--backend",
            choices=("cpu", "cuda", "triton", "reference"),
            default="cpu",
            help="sparsekern kernel to time (default: %(default)s; cuda and triton need a CUDA GPU)",
        ),
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
            "--repeat", type=positive_int, default=None, help="timed calls per case (default: 5, or 3 with --quick)"
        )
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
