"""``sparsekern bench <name>``: benchmarks of sparsekern's ops, sharing :mod:`sparsekern.bench.harness`.

Each benchmark is one module here with a ``run(args) -> int``; it is listed in ``_BENCHES`` with its help text
and dtypes. This file imports neither torch nor the modules, so building the command line stays fast.
To add one (``linear``, ``grow``): write ``sparsekern/bench/<name>.py`` with ``run(args)`` and add a ``_Bench``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

__all__ = ["add_bench_arguments", "run_bench"]


@dataclass(frozen=True)
class _Bench:
    module: str
    help: str
    description: str
    dtypes: tuple[str, ...]


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
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
            "--repeat", type=_positive_int, default=None, help="timed calls per case (default: 5, or 3 with --quick)"
        )
        p.add_argument(
            "--dtype",
            action="append",
            choices=bench.dtypes,
            help="dtype to run; repeat the option for several (default: all)",
        )


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark that ``args.bench`` names; returns the process exit code."""
    bench = _BENCHES[args.bench]
    module = importlib.import_module(bench.module)
    try:
        return module.run(args)
    except OSError as exc:  # e.g. --out names a file or an unwritable directory
        print(f"sparsekern bench {args.bench}: {exc}", file=sys.stderr)
        return 1
