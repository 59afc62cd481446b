"""``sparsekern bench grow``: RigL's grow step, ``sparsekern.outer_topk`` against its floor, the GEMM ``g.T @ x``
alone, and against "dense Gᵀ X, mask, torch.topk".

Every case draws x (B, n_in), g (B, n_out) and a random active set at the given sparsity, and asks for the
k = α · (1 − sparsity) · n_out · n_in highest-scoring inactive positions, as RigL's update at drop fraction α does.

* ``fast`` and ``exact``: ``outer_topk(x, g, k, exclude=<the active set as a sparse CSR tensor>, precision=...)``
  on the chosen backend (for CPU tensors the C++ kernel, on the ISA ``--isa`` forces), argument checks included;
* ``gemm``: ``g.T @ x`` alone, the floor of every exact grow (each must compute all n_out · n_in scores);
* ``dense``: ``(g.T @ x).abs_().masked_fill_(active, -1)`` and ``torch.topk`` of it, what every public RigL
  implementation does (its bool mask is an input, made before the timing, like sparsekern's CSR).

The four are timed interleaved, round after round (each round calls each once, in a rotating order), so a load
change on a shared machine hits all of them alike; ratios (fast / gemm, exact / fast) are the medians of the
per-round ratios. Peak memory is the rise of the process's peak RSS during the first call (CPU; CUDA: the
allocator's peak), inputs excluded. ``agreement`` is the share of positions fast and the dense path both return:
they sum in other orders, so scores at the cut-off can swap places; exactness against sparsekern's own
definitions is what the tests check. The dense path is skipped where its scores and torch.topk's working copy would
not fit in the memory available (the table says so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _extension, ops
from ..ops.outer_topk import exclusion_csr
from . import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    n_out: int
    n_in: int
    batch: int
    sparsity: float
    alpha: float

    @property
    def k(self) -> int:
        return int(self.alpha * (1.0 - self.sparsity) * self.n_out * self.n_in)

    @property
    def label(self) -> str:
        return f"{self.n_out}x{self.n_in}"


GOAL_CASES = tuple(Case(4096, 4096, b, 0.9, 0.3) for b in (64, 256, 2048))
FULL = GOAL_CASES + (Case(4096, 4096, 256, 0.99, 0.1), Case(16384, 16384, 256, 0.9, 0.3))
QUICK = (Case(512, 768, 64, 0.9, 0.3), Case(384, 256, 33, 0.99, 0.1))
# DESIGN §6 and issue 10, fp32: fast within 1.25x of the GEMM alone, exact within 2x of fast, extra peak memory at
# most 10% of the dense path's, and 16384² under 4 GiB extra.
GOAL_FAST_VS_GEMM, GOAL_EXACT_VS_FAST, GOAL_MEMORY_RATIO = 1.25, 2.0, 0.10
LARGE_LIMIT = 4 << 30


@dataclass(frozen=True)
class Settings:
    repeat: int = 5
    max_time: float = 3.0


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dense_bytes(case: Case) -> int:
    """What the dense path holds at once: the fp32 scores and torch.topk's working copy (a value and an int64
    index per entry on the CPU)."""
    return case.n_out * case.n_in * (4 + 12)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """x, g and the active set, as a bool mask (dense path) and a sparse CSR tensor (sparsekern)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.n_in, generator=gen).to(dtype)
    g = torch.randn(case.batch, case.n_out, generator=gen).to(dtype)
    mask = torch.empty(case.n_out, case.n_in, dtype=torch.bool)
    step = max(1, (1 << 22) // case.n_in)  # row blocks: no n_out x n_in float temporary
    for r0 in range(0, case.n_out, step):
        mask[r0 : r0 + step] = torch.rand(min(step, case.n_out - r0), case.n_in, generator=gen) >= case.sparsity
    row_ptr, col_idx = exclusion_csr("bench grow", mask, case.n_out, case.n_in, mask.device)
    active = torch.sparse_csr_tensor(
        row_ptr, col_idx, torch.ones(col_idx.numel(), dtype=torch.bool), (case.n_out, case.n_in), check_invariants=False
    )
    return x.to(device), g.to(device), mask.to(device), active.to(device)


def dense_grow(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.mm(g.T.float(), x.float()).abs_().masked_fill_(mask, -1.0)
    values, index = torch.topk(scores.view(-1), k)
    return index, values


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 1.0
    return float(torch.isin(a, b).sum()) / a.numel()


def _interleaved(fns: dict[str, Callable[[], Any]], settings: Settings, device: str) -> dict[str, Any]:
    """Times every function of ``fns`` round after round, each once per round in a rotating order, after one
    untimed call each (whose peak memory is recorded). Returns the Stats of each and the per-round samples."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peaks = {}
    for name, fn in fns.items():
        with harness._PeakMemory(torch.device(device)) as peak:
            fn()
            sync()
        peaks[name] = peak
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for r in range(harness._MAX_SAMPLES):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - t0)
        done, spent = r + 1, time.perf_counter() - started
        if done >= settings.repeat or (done >= min(3, settings.repeat) and spent > settings.max_time):
            break
    stats = {
        name: harness.Stats.from_samples(samples[name], peak_bytes=peaks[name].bytes, memory_kind=peaks[name].kind)
        for name in names
    }
    return {"stats": stats, "samples": samples}


def _ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """The median of the per-round ratios num / den (both timed in the same round)."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def run_case(case: Case, dtype: str, backend: str, device: str, settings: Settings) -> dict[str, Any]:
    x, g, mask, active = make_inputs(case, DTYPES[dtype], device)
    row: dict[str, Any] = {**dataclasses.asdict(case), "k": case.k, "dtype": dtype, "nnz": active.values().numel()}
    fns: dict[str, Callable[[], Any]] = {
        precision: (lambda p=precision: ops.outer_topk(x, g, case.k, exclude=active, precision=p, backend=backend))
        for precision in ("fast", "exact")
    }
    fns["gemm"] = lambda: torch.mm(g.T, x)
    available = _available_memory()
    dense_fits = not (device == "cpu" and available is not None and dense_bytes(case) * 1.5 > available)
    if dense_fits:
        fns["dense"] = lambda: dense_grow(x, g, mask, case.k)
    else:
        row["dense_skipped"] = (
            f"dense path skipped: it needs about {dense_bytes(case) / 2**30:.1f} GiB, "
            f"{available / 2**30:.1f} GiB available"
        )
    timed = _interleaved(fns, settings, device)
    for name in ("fast", "exact", "gemm", "dense"):
        row[name] = timed["stats"][name].to_dict() if name in timed["stats"] else None
    row["fast_vs_gemm"] = _ratio(timed["samples"], "fast", "gemm")
    row["exact_vs_fast"] = _ratio(timed["samples"], "exact", "fast")
    if dense_fits:
        row["speedup"] = _ratio(timed["samples"], "dense", "fast")  # dense time / fast time
        fast_peak, dense_peak = row["fast"]["peak_bytes"], row["dense"]["peak_bytes"]
        if fast_peak is not None and dense_peak:
            row["memory_ratio"] = fast_peak / dense_peak
        row["agreement"] = _agreement(fns["fast"]()[0], dense_grow(x, g, mask, case.k)[0])
    return row


def _mib(d: dict[str, Any] | None) -> str:
    return "-" if d is None else harness.fmt_mib(d["peak_bytes"])


def detail_section(rows: list[dict[str, Any]]) -> harness.Section:
    headers = [
        "shape", "B", "sparsity", "α", "k", "dtype", "ISA", "fast ms (IQR)", "exact ms (IQR)", "gemm ms (IQR)",
        "dense ms (IQR)", "fast / gemm", "exact / fast", "dense / fast", "fast peak MiB", "dense peak MiB",
        "memory ratio", "agreement",
    ]  # fmt: skip
    table = []
    for r in rows:
        table.append(
            [
                f"{r['n_out']}x{r['n_in']}",
                r["batch"],
                r["sparsity"],
                r["alpha"],
                r["k"],
                r["dtype"],
                r.get("isa", "-"),
                harness.fmt_ms(harness.Stats.from_dict(r["fast"])),
                harness.fmt_ms(harness.Stats.from_dict(r["exact"])),
                harness.fmt_ms(harness.Stats.from_dict(r["gemm"])),
                harness.fmt_ms(harness.Stats.from_dict(r["dense"])) if r["dense"] else r.get("dense_skipped", "-"),
                f"{r['fast_vs_gemm']:.2f}",
                f"{r['exact_vs_fast']:.2f}",
                harness.fmt_ratio(r.get("speedup")),
                _mib(r["fast"]),
                _mib(r["dense"]),
                f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "-",
                f"{r['agreement']:.5f}" if "agreement" in r else "-",
            ]
        )
    notes = [
        "Times: median and IQR of the interleaved timed calls; ratios: medians of the per-round ratios; peak: rise "
        "of peak memory during the first call."
    ]
    return harness.Section("Cases", headers, table, notes)


def _status(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def goals(rows: list[dict[str, Any]]) -> harness.Section:
    table = []
    for r in rows:
        case = Case(r["n_out"], r["n_in"], r["batch"], r["sparsity"], r["alpha"])
        where = f"{case.label} B={case.batch} {case.sparsity:.0%} α={case.alpha} ({r.get('isa', '-')})"
        if case in GOAL_CASES and r["dtype"] == "fp32":
            fast, exact, ratio = r.get("fast_vs_gemm"), r.get("exact_vs_fast"), r.get("memory_ratio")
            table.append(
                [
                    f"{where}: fast time / GEMM g.T @ x alone",
                    f"<= {GOAL_FAST_VS_GEMM:g}",
                    "-" if fast is None else f"{fast:.2f}",
                    _status(None if fast is None else fast <= GOAL_FAST_VS_GEMM),
                ]
            )
            table.append(
                [
                    f"{where}: exact time / fast time",
                    f"<= {GOAL_EXACT_VS_FAST:g}",
                    "-" if exact is None else f"{exact:.2f}",
                    _status(None if exact is None else exact <= GOAL_EXACT_VS_FAST),
                ]
            )
            table.append(
                [
                    f"{where}: extra peak memory vs dense",
                    f"<= {GOAL_MEMORY_RATIO:.0%}",
                    "-" if ratio is None else f"{ratio:.1%}",
                    _status(None if ratio is None else ratio <= GOAL_MEMORY_RATIO),
                ]
            )
        if case.n_out * case.n_in >= 16384 * 16384:
            peak = r["fast"]["peak_bytes"]
            table.append(
                [
                    f"{case.label} B={case.batch}: sparsekern extra peak memory",
                    "< 4 GiB",
                    harness.fmt_mib(peak) + " MiB",
                    "-" if peak is None else ("met" if peak < LARGE_LIMIT else "NOT met"),
                ]
            )
    notes = [] if table else ["No goal case in this run (the goals are set for the full run, fp32)."]
    return harness.Section("Goals (DESIGN §6, issue 10)", ["goal", "target", "achieved", "status"], table, notes)


def run_grow(
    cases: tuple[Case, ...],
    dtypes: list[str],
    backend: str,
    settings: Settings,
    out: str | Path,
    name: str = "grow",
    isa: str | None = None,
) -> tuple[int, str, dict[str, Any]]:
    """Runs the cases; ``isa`` forces the C++ CPU kernels' instruction set (None: the widest this CPU runs)."""
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    forced = _extension.use_cpu_isa(isa) if isa is not None else contextlib.nullcontext()
    with forced:
        env = harness.environment(gpu=device == "cuda")
        ran_isa = _extension.cpu_isa() if backend == "cpu" else f"- ({backend})"
        rows = []
        for case in harness.progress(list(cases), "grow"):
            for dtype in dtypes:
                rows.append({**run_case(case, dtype, backend, device, settings), "isa": ran_isa})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    notes = [
        f"- backend {backend!r} on {device} ({env['gpu'] or env['cpu']}, {env['torch_threads']} torch threads), "
        f"CPU kernels' ISA: {ran_isa}" + (" (forced with --isa)" if isa is not None else ""),
        f"- 1-minute load average at the end: {load:.2f} on {env['cpu_count']} cores (other processes distort "
        "CPU timings)"
        if load is not None
        else "- load average: unknown",
        "- gemm: torch.mm(g.T, x) alone, the floor; dense: (g.T @ x).abs_().masked_fill_(mask, -1) then torch.topk",
        "- every path does the same n_out * n_in * B multiply-adds; sparsekern saves the dense scores, the masked "
        "pass and the full top-k, so its speedup over dense shrinks as B grows and the GEMM dominates",
        "- memory: " + (rows[0]["fast"]["memory_kind"] if rows else "not measured"),
    ]
    notes += [f"- {r['n_out']}x{r['n_in']} B={r['batch']}: {r['dense_skipped']}" for r in rows if "dense_skipped" in r]
    markdown = harness.render_markdown(
        "sparsekern grow: outer_topk vs dense", env, notes, [goals(rows), detail_section(rows)]
    )
    data = {"benchmark": name, "environment": env, "backend": backend, "device": device, "isa": ran_isa, "rows": rows}
    harness.write_report(out, name, markdown, data)
    return 0, markdown, data


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern bench grow``."""
    if args.backend in ("cuda", "triton") and not torch.cuda.is_available():
        print(f"sparsekern bench grow: --backend {args.backend} needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    settings = Settings(repeat=args.repeat or (3 if args.quick else 5), max_time=0.5 if args.quick else 3.0)
    dtypes = list(dict.fromkeys(args.dtype or DTYPES))
    isa = getattr(args, "isa", None)
    if isa is not None and args.backend != "cpu":
        print(f"sparsekern bench grow: --isa applies to --backend cpu, got --backend {args.backend}", file=sys.stderr)
        return 2
    if isa is not None and isa not in _extension.available_isas():
        runs = ", ".join(_extension.available_isas()) or f"none: {_extension.unavailable_reason}"
        print(f"sparsekern bench grow: --isa {isa}: this CPU's kernels run {runs}", file=sys.stderr)
        return 2
    code, markdown, _ = run_grow(QUICK if args.quick else FULL, dtypes, args.backend, settings, args.out, isa=isa)
    print(markdown)
    print(f"wrote {Path(args.out) / 'grow.md'} and {Path(args.out) / 'grow.json'}")
    return code
