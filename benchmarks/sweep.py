"""Sweep shape x dtype x backend for 2:4 compress / decompress; writes <out>/<name>.md and .json.

A thin command line over :mod:`sparsekern.bench.semi24` (the code behind ``sparsekern bench semi24``) with more
shapes: every row is timed against torch's reference conversion and checked bit for bit, the plain-PyTorch
reference backend always runs, and the report is stamped with device, versions and git sha. 2:4 has a fixed
density (50%), so unlike the sweeps of other ops there is no density axis.

    python benchmarks/sweep.py                                   # every shape below, every dtype
    python benchmarks/sweep.py --shape 8192x8192 --dtype fp16 --backend cpu
    python benchmarks/sweep.py --quick                           # smoke run: small shapes, seconds

``sweep.py linear`` sweeps the sparse linear layer instead (sparsity x batch x shape x dtype x mode, against
dense F.linear, torch CSR and SparseProp) through :mod:`sparsekern.bench.linear`, the code behind
``sparsekern bench linear``; it writes <out>/linear-sweep.md and .json by default.

    python benchmarks/sweep.py linear --shape 4096x4096 --batch 2048 --mode fwd --sparsity 0.9 --sparsity 0.95
    python benchmarks/sweep.py linear --quick --backend reference

``sweep.py grow`` sweeps RigL's grow step (``sparsekern.outer_topk`` against dense g.T @ x, mask and torch.topk,
time and peak memory) over shape x batch x sparsity x drop fraction through :mod:`sparsekern.bench.grow`, the
code behind ``sparsekern bench grow``; it writes <out>/grow-sweep.md and .json by default.

    python benchmarks/sweep.py grow --shape 8192x8192 --batch 512 --sparsity 0.95 --alpha 0.3
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("fp16", "bf16", "int8", "fp32")
LINEAR_DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("cpu", "triton", "cuda", "reference")
# Square sizes around the 4096x4096 goal shape, on top of the model shapes of `sparsekern bench semi24`.
EXTRA_SQUARES = (1024, 2048, 8192)


def build_parser() -> argparse.ArgumentParser:
    from sparsekern.bench import positive_float, positive_int, size_pair

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --shape: the model shapes of `sparsekern bench semi24` plus squares "
        + ", ".join(f"{n}x{n}" for n in EXTRA_SQUARES)
        + ". On the CPU, triton is never timed (interpreter timings are not speeds) and cuda needs a GPU. "
        + "For the sparse linear sweep: sweep.py linear --help.",
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=size_pair("ROWSxCOLS", "4096x4096"),
        metavar="ROWSxCOLS",
        help="weight shape; repeatable",
    )
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable (default: all)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="repeatable (default: all that can run here); reference always runs",
    )
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed calls per case (default: %(default)s)")
    parser.add_argument(
        "--max-time",
        type=positive_float,
        default=10.0,
        help="seconds after which a case stops (at least 3 calls) (default: %(default)s)",
    )
    parser.add_argument("--linear", action="store_true", help="also time dense vs 2:4 F.linear (needs a GPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    parser.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    parser.add_argument("--name", default="semi24-sweep", help="file name stem (default: %(default)s)")
    return parser


def build_linear_parser() -> argparse.ArgumentParser:
    from sparsekern.bench import add_linear_arguments, positive_int

    parser = argparse.ArgumentParser(
        prog="sweep.py linear",
        description="Sweep the sparse linear layer (sparse_linear, path sparse and auto) against dense F.linear, "
        "torch.sparse.mm (CSR) and SparseProp; the code of `sparsekern bench linear`.",
        epilog="Unset axes take the defaults shown (the --quick ones with --quick).",
    )
    parser.add_argument("--dtype", action="append", choices=LINEAR_DTYPES, help="repeatable (default: all)")
    parser.add_argument(
        "--repeat", type=positive_int, default=None, help="timed calls per case (default: 5, or 3 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a 64->96 weight, B 8 and 70, 3 sparsities: seconds")
    parser.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    parser.add_argument("--name", default="linear-sweep", help="file name stem (default: %(default)s)")
    add_linear_arguments(parser)
    return parser


def main_linear(argv: list[str]) -> int:
    args = build_linear_parser().parse_args(argv)
    import torch

    from sparsekern.bench import linear

    if args.backend in ("cuda", "triton") and not torch.cuda.is_available():
        print(f"sweep.py linear: --backend {args.backend} needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    code, markdown, _ = linear.run_linear(
        grid=linear.grid_from_args(args),
        settings=linear.settings_from_args(args),
        backend=args.backend,
        out=args.out,
        name=args.name,
        title="sparsekern sparse linear sweep",
        isa=args.isa,
    )
    print(markdown)
    print(f"wrote {args.out}/{args.name}.md and {args.out}/{args.name}.json")
    return code


def main_grow(argv: list[str]) -> int:
    from sparsekern.bench import positive_float, positive_int, size_pair

    parser = argparse.ArgumentParser(
        prog="sweep.py grow",
        description="Sweep outer_topk (RigL grow) against dense g.T @ x + mask + torch.topk; the code of "
        "`sparsekern bench grow`. Every combination of the axes below is one case.",
    )
    parser.add_argument("--shape", action="append", type=size_pair("OUTxIN", "4096x4096"), metavar="OUTxIN")
    parser.add_argument("--batch", action="append", type=positive_int, metavar="B")
    parser.add_argument("--sparsity", action="append", type=float, metavar="S", help="in [0, 1)")
    parser.add_argument("--alpha", action="append", type=positive_float, metavar="A", help="drop fraction")
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"), help="repeatable (default: fp32)")
    parser.add_argument("--backend", choices=("cpu", "cuda", "triton", "reference"), default="cpu")
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed calls per case (default: %(default)s)")
    parser.add_argument("--max-time", type=positive_float, default=3.0, help="seconds per function (default: 3)")
    parser.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    parser.add_argument("--name", default="grow-sweep", help="file name stem (default: %(default)s)")
    args = parser.parse_args(argv)
    for s in args.sparsity or ():
        if not 0.0 <= s < 1.0:
            parser.error(f"--sparsity must be in [0, 1), got {s}")
    import torch

    from sparsekern.bench import grow

    if args.backend in ("cuda", "triton") and not torch.cuda.is_available():
        print(f"sweep.py grow: --backend {args.backend} needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    cases = tuple(
        grow.Case(n_out, n_in, b, s, a)
        for n_out, n_in in dict.fromkeys(args.shape or [(4096, 4096)])
        for b in dict.fromkeys(args.batch or [256, 2048])
        for s in dict.fromkeys(args.sparsity or [0.9, 0.99])
        for a in dict.fromkeys(args.alpha or [0.1, 0.3])
    )
    settings = grow.Settings(repeat=args.repeat, max_time=args.max_time)
    dtypes = list(dict.fromkeys(args.dtype or ["fp32"]))
    code, markdown, _ = grow.run_grow(cases, dtypes, args.backend, settings, args.out, name=args.name)
    print(markdown)
    print(f"wrote {args.out}/{args.name}.md and {args.out}/{args.name}.json")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "linear":
        return main_linear(argv[1:])
    if argv and argv[0] == "grow":
        return main_grow(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch is imported only now, so --help and argument errors stay fast.
    import torch

    from sparsekern import _semi24
    from sparsekern.bench import semi24

    dtypes = list(dict.fromkeys(args.dtype or DTYPES))
    if args.shape:
        weights = [semi24.Weight("", rows, cols) for rows, cols in dict.fromkeys(args.shape)]
    elif args.quick:
        weights = list(semi24.QUICK_WEIGHTS)
    else:
        weights = [*semi24.WEIGHTS, *(semi24.Weight("", n, n) for n in EXTRA_SQUARES)]
    for weight in weights:
        for dtype in dtypes:
            error = _semi24.shape_error("sweep.py", "--shape", weight.shape, semi24.DTYPES[dtype])
            if error:
                parser.error(error)
    backends = None if args.backend is None else sorted({*args.backend, "reference"})
    settings = semi24.Settings(
        repeat=3 if args.quick else args.repeat, warmup=1, min_time=0.05, max_time=2.0 if args.quick else args.max_time
    )
    if not torch.cuda.is_available() and args.linear:
        print("--linear: no CUDA GPU visible, F.linear is not measured", file=sys.stderr)
    code, markdown = semi24.run_semi24(
        weights=weights,
        dtypes=dtypes,
        settings=settings,
        out=args.out,
        name=args.name,
        title="sparsekern 2:4 conversion sweep",
        backends=backends,
        linear=args.linear,
    )
    print(markdown)
    print(f"wrote {args.out}/{args.name}.md and {args.out}/{args.name}.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
