"""The ``sparsekern`` command line: ``sparsekern info``, ``bench …``, ``demo``, ``tickets`` and ``selftest --gpu``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _extension
    from .ops import _backend

    lines = [
        f"sparsekern {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import triton

        lines.append(
            f"triton {triton.__version__} (TRITON_INTERPRET={'1' if _backend.triton_interpret() else 'unset'})"
        )
    except ImportError:
        lines.append("triton: not installed")
    build = _extension.build_info()
    if build["loaded"]:
        cuda = f"CUDA {build['cuda_version']} for {build['cuda_archs']}" if build["with_cuda"] else "no CUDA sources"
        lines.append(f"extension: {build['path']} ({cuda})")
        from .bench.harness import cpu_name

        forced = os.environ.get("SPARSEKERN_CPU_ISA")
        how = f"forced by SPARSEKERN_CPU_ISA={forced}" if forced else "the widest this CPU runs"
        if build["cpu_isa"].startswith("refused"):
            lines.append(f"CPU kernels: {build['cpu_isa']}")
        else:
            isas = ", ".join(_extension.available_isas())
            lines.append(f"CPU kernels run {build['cpu_isa']} ({how}; {cpu_name()} supports {isas})")
    else:
        lines.append(f"extension: not loaded -- {build['reason']}; every op runs its plain-PyTorch reference")
    cuda_ok = torch.cuda.is_available()
    lines.append(f"GPU: {torch.cuda.get_device_name() if cuda_ok else 'none visible'}")
    lines.append("backends (device: backend -> status):")
    for device, names in (("cpu", ("cpu", "triton", "reference")), ("cuda", ("triton", "cuda", "reference"))):
        for name in names:
            reason = _backend.unavailable_reason(name, torch.device(device))
            if device == "cuda" and reason is None and name != "reference" and not cuda_ok:
                reason = "no CUDA GPU visible"
            lines.append(f"  {device}: {name:9s} -> {'available' if reason is None else 'unavailable: ' + reason}")
        lines.append(f"  {device}: auto picks {_auto_choice(device, cuda_ok)}")
    from .ops.sparse_linear import DENSITY_CROSSOVER, SMALL_BATCH

    lines.append("sparse_linear dispatch (path='auto'): sparse kernels up to this density, dense-masked GEMM above:")
    for (device, dtype), c in DENSITY_CROSSOVER.items():
        source = {
            ("cpu", torch.float32): "measured, see README",
            ("cpu", torch.bfloat16): "measured at B 256 and 2048; the small batch set like fp32's",
            ("cpu", torch.float16): "measured: no fast fp16 GEMM on the CPU, sparse always wins",
        }.get((device, dtype), "not measured on a GPU: DESIGN's estimate")
        lines.append(
            f"  {device} {str(dtype).replace('torch.', '')}: forward {c.inference:g} (batch <= {SMALL_BATCH}: "
            f"{c.small_batch:g}), training {c.training:g} ({source})"
        )
    if _extension.available():
        scatter = "the C++ kernel, rewriting only the rows whose values changed"
    else:
        scatter = f"torch's scatter_/index_select ({_extension.unavailable_reason})"
    lines.append(
        f"  dense path: W's nonzeros moved by csr_dense_scatter_/gather: on CPU tensors {scatter}; on CUDA tensors "
        "torch's scatter_/index_select"
    )
    lines.extend(_ell_info(build))
    lines.append(
        "outer_topk (RigL grow): backend='auto' as above (C++ on CPU tensors, Triton on CUDA tensors); every "
        "backend returns the same bits (one float32 summation order); float64 runs the reference"
    )
    if args.json:
        print(json.dumps({"lines": lines, "extension": build}, indent=2))
    else:
        print("\n".join(lines))
    return 0


def _ell_info(build: dict) -> list[str]:
    """Whether the constant fan-in (ELL) kernels are compiled in: without them sparse_linear keeps the CSR kernels
    on equal-row weights (kernels="auto") and the ell_* ops run their plain-PyTorch references."""
    from .ops.sparse_linear import ELL_DX_CSC_BATCH, _has_ell_kernels

    def status(key: str) -> str:
        if not build["loaded"]:
            return "no (extension not loaded)"
        if key == "CUDA" and not build["with_cuda"]:
            return "not built (no CUDA sources in this extension)"
        return "compiled in" if _has_ell_kernels(key) else "NOT compiled in (an extension built before them: rebuild)"

    dx = ", ".join(f"{backend}/{isa} from B >= {b}" for (backend, isa), b in ELL_DX_CSC_BATCH.items()) or "never"
    return [
        f"constant fan-in (ELL) kernels ell_spmm/ell_spmm_t/ell_sddmm: C++ CPU {status('CPU')}; CUDA C++ "
        f"{status('CUDA')}; Triton on CUDA tensors (or TRITON_INTERPRET=1)",
        "  sparse_linear kernels='auto' runs them on equal-row weights (constant fan-in) when compiled in, else CSR; "
        f"the ELL path's dX goes through the CSC ({dx})",
    ]


def _auto_choice(device: str, cuda_ok: bool) -> str:
    import torch

    from .ops import _backend

    if device == "cuda" and not cuda_ok:
        return "nothing (no CUDA GPU visible)"
    for name in {"cpu": ("cpu",), "cuda": ("triton", "cuda")}[device]:
        if _backend.unavailable_reason(name, torch.device(device)) is None:
            return name
    return "reference (fallback, warned once per op)"


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _demo(args: argparse.Namespace) -> int:
    from .training.demo import demo_main

    return demo_main(args)


def _tickets(args: argparse.Namespace) -> int:
    from .tickets.cli import tickets_main

    return tickets_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Fast, exact sparse kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the extension build, and which backend each device uses")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmarks (see `sparsekern bench --help`)")
    from .bench import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    demo = sub.add_parser("demo", help="train an MLP on the UCI digits with every sparse-training method, FLOPs too")
    from .training.demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)
    tickets = sub.add_parser(
        "tickets", help="lottery tickets on the digits: IMP levels vs re-init, instability, level connectivity"
    )
    from .tickets.cli import add_tickets_arguments

    add_tickets_arguments(tickets)
    tickets.set_defaults(func=_tickets)
    from .selftest import add_selftest_arguments, run_selftest

    selftest = sub.add_parser("selftest", help="the GPU check: build, every test and the GPU figures, one report")
    add_selftest_arguments(selftest)
    selftest.set_defaults(func=run_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
