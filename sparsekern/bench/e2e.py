"""``sparsekern bench e2e``: training end to end where sparse layers pay off (DESIGN §6, the last goal).

Trains the MLP 64-4096-4096-10 on the embedded UCI digits (B=256, a few epochs) three ways, the runs of a seed
taking turns epoch by epoch: dense (nn.Linear), RigL on masked dense weights (``sparsify(layout="masked")``) and RigL on
:class:`~sparsekern.nn.SparseLinear` (``sparsify``'s default layout), once per instruction set asked for (``--isa``:
the sparse kernels' ISA; the dense and masked runs use torch's GEMM, whatever the CPU has). Only the 4096x4096
layer is sparse (uniform at ``--sparsity``; the 64x4096 and 4096x10 layers are 1.8% of the weights and stay
dense). Reports training seconds per epoch (mask updates included, test evaluation excluded), the speedup over
dense per seed, and the test accuracy over the seeds, against the goal: RigL on SparseLinear >= 4x faster than
dense per epoch at 95%, accuracy within the seeds' spread of RigL on masked weights.

The training itself is :func:`sparsekern.training.demo.run_wide`, the same code as the demo's wide section.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from .. import _extension
from ..training import demo
from . import harness


def default_isas() -> list[str | None]:
    """Every ISA this CPU runs down to AVX2 (so an AVX-512 machine also measures the forced AVX2 path), or the
    one ``SPARSEKERN_CPU_ISA`` forces, or [None] without the extension (the reference kernels)."""
    if not _extension.available() or os.environ.get("SPARSEKERN_CPU_ISA"):
        return [None]
    return [isa for isa in _extension.available_isas() if isa != "baseline"] or [None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sparsekern bench e2e`` besides the shared ones (``--repeat`` is the number of seeds)."""
    demo.add_wide_arguments(parser, seeds=False)
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--isa",
        action="append",
        choices=_extension.ISAS,
        help="instruction set of the sparse kernels; repeatable (default: each one this CPU runs down to avx2, "
        "or the one SPARSEKERN_CPU_ISA forces)",
    )


def sections(results: list[demo.WideResult]) -> list[harness.Section]:
    headers = ["method", "layers", "s/epoch (median over seeds)", "speedup vs dense (median, range)",
               "test acc % (mean ± sd)", "per-seed acc %", "sparsity of hidden layer", "masks moved",
               "mask updates", "ISA"]  # fmt: skip
    rows = []
    for r in results:
        first = r.runs[0]
        layer = (first.report or {}).get("layers", [None])[0]
        rows.append([
            r.method,
            r.label,
            f"{r.s_per_epoch:.3f}",
            f"{harness.fmt_ratio(r.speedup)} ({min(r.speedups):.2f}-{max(r.speedups):.2f})",
            f"{r.accuracy:.2f} ± {r.accuracy_sd:.2f}",
            ", ".join(f"{a:.2f}" for a in r.accuracies),
            f"{layer['sparsity']:.4f} ({layer['nnz']} nnz)" if layer else "dense",
            "-" if first.mask_moved is None else f"{sum(x.mask_moved for x in r.runs) / len(r.runs):.1%}",
            "-" if first.report is None else str(first.mask_updates),
            r.isa or "- (torch's GEMM)",  # the harness would stamp the process's ISA on every row
        ])  # fmt: skip
    # each goal line names the ISA of the sparse run it judges: "goal (avx2): ..."
    goals = [[line, re.match(r"goal \((\w+)\)", line)[1] if line.startswith("goal (") else "-"]
             for line in demo.wide_goal(results)]  # fmt: skip
    return [
        harness.Section("Goals (DESIGN §6)", ["goal, judged on this run", "ISA"], goals, []),
        harness.Section("Runs", headers, rows, []),
    ]


def run_e2e(cfg: demo.WideConfig, isas: list[str | None], out: str | Path) -> tuple[str, dict[str, Any]]:
    """Run the comparison and write ``<out>/e2e.md`` and ``<out>/e2e.json``; returns the markdown and the data."""
    env = harness.environment()
    results = demo.run_wide(cfg, isas=isas, echo=lambda line: print(line, file=sys.stderr))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    notes = [
        f"- {cfg.describe()}; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}",
        f"- {env['cpu']}, {env['torch_threads']} torch threads; sparse kernels: "
        + ", ".join(r.isa or "?" for r in results if r.method == "rigl-sparse")
        + (" (forced by SPARSEKERN_CPU_ISA)" if os.environ.get("SPARSEKERN_CPU_ISA") else ""),
        "- dense and masked runs use torch's own GEMM (MKL/oneDNN at the widest ISA of this CPU), so a forced "
        "lower ISA of the sparse kernels is compared against a dense baseline an older CPU would not have",
        "- s/epoch: training time of the steps of every epoch (mask updates included, test evaluation excluded), "
        "mean over the epochs of a run; speedup: dense s/epoch over the method's, per seed (the runs of a seed "
        "take turns epoch by epoch)",
        "- every run of a seed starts from the same weights, mask and batch order; the two RigL runs differ only "
        "in their arithmetic",
        f"- 1-minute load average at the end: {load:.2f} on {env['cpu_count']} cores" if load is not None else "",
    ]
    markdown = harness.render_markdown("sparsekern e2e: wide MLP training", env, notes, sections(results))
    data = {
        "benchmark": "e2e",
        "environment": env,
        "config": cfg.__dict__,
        "description": cfg.describe(),
        "results": [r.to_dict() for r in results],
        "goal": demo.wide_goal(results),
    }
    harness.write_report(out, "e2e", markdown, data)
    return markdown, data


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern bench e2e``."""
    fn = "sparsekern bench e2e"
    if args.isa:
        isas: list[str | None] = list(dict.fromkeys(args.isa))
        if not _extension.available():
            print(f"{fn}: --isa needs the C++ extension, which is not loaded", file=sys.stderr)
            return 2
        lacking = [isa for isa in isas if isa not in _extension.available_isas()]
        if lacking:
            print(f"{fn}: --isa {lacking[0]}: this CPU runs only {', '.join(_extension.available_isas())}",
                  file=sys.stderr)  # fmt: skip
            return 2
    else:
        isas = default_isas()
    args.seeds = args.repeat or (None if args.quick else 3)
    try:
        cfg = demo.wide_config(args, fn)
        demo.set_threads(fn, args.threads)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    markdown, _ = run_e2e(cfg, isas, args.out)
    print(markdown)
    print(f"wrote {Path(args.out) / 'e2e.md'} and {Path(args.out) / 'e2e.json'}")
    return 0
