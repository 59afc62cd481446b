"""``sparsekern bench micro``: kernel microbenchmarks against dense, with floors that fail CI on a regression.

A short fixed set of cases (``FULL``) runs on every instruction set this CPU has (avx512, avx2, baseline; forced
with ``sparsekern._extension.use_cpu_isa``; ``--isa`` picks some). Each case pairs a sparsekern op with its dense
baseline, on inputs made once and shared by the ISAs:

* ``spmm fwd``: ``sparse_linear(path="sparse")`` forward, inference; baseline ``F.linear`` on the masked dense weight;
* ``linear fwd+bwd``: the same in training: forward (spmm), dX (spmm on the transposed index) and dW at the
  nonzeros (sddmm), the values changed after each call as an optimizer would; baseline dense ``F.linear``
  forward+backward (``sparsekern.bench.linear``'s builders);
* ``ell fwd`` / ``ell fwd+bwd``: the same two on a constant fan-in weight (every row the same count of nonzeros)
  with ``kernels="ell"`` (``ell_spmm``, ``ell_spmm_t``, ``ell_sddmm``); same baselines;
* ``dense path fwd+bwd``: ``sparse_linear(path="dense")`` at 50% sparsity (scatter of W into the layer's dense
  workspace, dense GEMMs, gather of dW at the nonzeros), what the layer falls back to; baseline as above;
* ``outer_topk fast`` / ``exact``: RigL's grow, k = 0.3 of the nonzeros; baseline ``g.T @ x``, mask and
  ``torch.topk`` (``sparsekern.bench.grow``'s dense path);
* ``csr_dense``: ``csr_dense_scatter_`` + ``csr_dense_gather`` of W's nonzeros; baseline torch's
  ``scatter_`` / ``index_select`` (``reference.csr_dense_*_reference``);
* ``semi24_compress``: fp16 2:4 compression; baseline torch's reference conversion
  (``sparse_semi_structured_from_dense_cutlass``).

Timing: after a few warm-up calls of each, baseline and op take turns (baseline, op, baseline, op, ...), each
turn a block of calls lasting about ``block_time`` whose fastest call counts (load from other processes only ever
adds time; on 2 shared cores an OpenMP call that loses a core waits a whole time slice), so a burst of load hits
both. A case's ratio is the median over the turns of baseline time / op time (above 1: sparsekern is faster).

Floors: a ratio below the floor of its (case, ISA) in ``FLOORS`` fails the run (exit code 1, a line naming the
case, the ISA, the ratio and the floor); so does a case that raises. How they were set: ``sparsekern bench micro
--calibrate 5`` (2026-12-03 08:56, git c47e64c, 127 s) ran the whole set five times on the idle 2-core machine CI
runs on (AMD EPYC Zen 4, AVX-512, 2 torch threads, nothing else running); per (case, ISA), the floor is FLOOR_FACTOR
(0.55) times the lowest of the five median ratios, rounded down to 2 significant digits (``calibration_table``),
and the range of the five is kept next to it. An earlier calibration on the same machine shared with other jobs
(load 8-12) saw lows down to half of these (load slows a turn's calls unevenly), and that was before the AVX2 paths
and the fast outer_topk landed. So a floor fails a kernel that lost about half its speed, not a noisy run. The avx2
and baseline figures come from forcing those ISAs on that AVX-512 machine; on a real AVX2-only CPU the dense
baselines run AVX2 too, so its ratios differ. CI machines are either kind, so a second calibration ran on an AVX2-only
AMD EPYC Zen 3 (``--calibrate 5``, 2026-12-03 20:11, git 8077b2d plus the ELL cases, 109 s, idle): the avx2 and
baseline floors are the lower of the two machines' (Zen 3's are lower for most: its dense baselines run AVX2
too), the observed ranges span both, and the ELL cases (added then) have avx2 and baseline floors from Zen 3 only
and no avx512 floor yet (calibrate on an AVX-512 CPU and add it). When a kernel gets faster, run the calibration
on both kinds and merge the tables it prints into ``FLOORS`` the same way. A (case, ISA) without a floor is
reported as such and never fails.

Runtime: one run of the set (3 ISAs) takes about 25 s on the 2 idle cores (the calibration above: 127 s for
five); ``--quick`` (tiny shapes, no floors) takes seconds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.sparse import _semi_structured_conversions as torch_conversions

from .. import _extension, ops, reference
from ..ops.csr_dense import csr_dense_gather, csr_dense_scatter_
from . import grow, harness, linear, semi24

Fn = Callable[[], Any]

FLOOR_FACTOR = 0.55


@dataclass(frozen=True)
class Case:
    """One microbenchmark: ``make()`` builds the inputs (once, for every ISA) and returns (baseline, op)."""

    name: str  # the key of FLOORS
    baseline: str  # what the ratio is against, for the report
    make: Callable[[], tuple[Fn, Fn]]


@dataclass(frozen=True)
class Floor:
    """The lowest ratio a (case, ISA) may show, and the range of ratios its calibration runs saw."""

    floor: float
    observed: tuple[float, float]


@dataclass(frozen=True)
class Settings:
    repeats: int = 7  # turns of each of baseline and op
    block_time: float = 0.05  # seconds of calls per turn


QUICK_SETTINGS = Settings(repeats=3, block_time=0.005)


def linear_case(
    mode: str, shape: tuple[int, int], batch: int, sparsity: float, path: str = "sparse", ell: bool = False
) -> Case:
    """sparse_linear (``mode`` "fwd" or "fwdbwd", ``path`` "sparse" or "dense") against dense F.linear; ``ell``: on
    a constant fan-in weight with kernels="ell"."""
    what = {("fwd", "sparse"): "spmm fwd", ("fwdbwd", "sparse"): "linear fwd+bwd"}.get((mode, path))
    what = what or f"{path} path {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}"
    if ell:
        what = f"ell {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}"

    def make() -> tuple[Fn, Fn]:
        p = linear.Problem(shape, batch, sparsity, "cpu", fan_in=ell)
        dense, _ = linear.build_dense(p, p.x, p.index.to_dense(p.values), p.grad, mode)
        op, _ = linear.build_sparsekern(p, p.x, p.values, p.grad, mode, "cpu", path, "ell" if ell else "auto")
        return dense, op

    baseline = "dense F.linear" + (" fwd+bwd" if mode == "fwdbwd" else "") + " on the masked weight"
    return Case(f"{what} {linear.label(shape)} B={batch} {harness.fmt_pct(sparsity)}", baseline, make)


def outer_topk_case(precision: str, n_out: int, n_in: int, batch: int, sparsity: float, alpha: float = 0.3) -> Case:
    """outer_topk with ``precision`` against the dense grow (g.T @ x, mask, torch.topk)."""
    case = grow.Case(n_out, n_in, batch, sparsity, alpha)

    def make() -> tuple[Fn, Fn]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            x, g, mask, active = grow.make_inputs(case, torch.float32, "cpu")
        op = lambda: ops.outer_topk(x, g, case.k, exclude=active, precision=precision, backend="cpu")  # noqa: E731
        return (lambda: grow.dense_grow(x, g, mask, case.k)), op

    name = f"outer_topk {precision} {case.label} B={batch} {harness.fmt_pct(sparsity)} α={alpha:g}"
    return Case(name, "dense g.T @ x, mask, torch.topk", make)


def csr_dense_case(shape: tuple[int, int], sparsity: float) -> Case:
    """csr_dense_scatter_ then csr_dense_gather of a weight's nonzeros against torch's scatter_ / index_select."""

    def make() -> tuple[Fn, Fn]:
        p = linear.Problem(shape, 1, sparsity, "cpu")
        index, values = p.index, p.values
        dense = torch.zeros(index.n_out, index.n_in)

        def op():
            csr_dense_scatter_(dense, values, index.row_ptr, index.col_idx)
            return csr_dense_gather(dense, index.row_ptr, index.col_idx)

        def base():
            reference.csr_dense_scatter_reference(dense, values, index.row_ptr, index.col_idx)
            return reference.csr_dense_gather_reference(dense, index.row_ptr, index.col_idx)

        return base, op

    name = f"csr_dense scatter+gather {linear.label(shape)} {harness.fmt_pct(sparsity)}"
    return Case(name, "torch scatter_ + index_select", make)


def semi24_case(shape: tuple[int, int]) -> Case:
    """semi24_compress of an fp16 2:4 weight against torch's reference conversion."""

    def make() -> tuple[Fn, Fn]:
        w = semi24.pruned_weight(shape, torch.float16)
        base = lambda: torch_conversions.sparse_semi_structured_from_dense_cutlass(w)  # noqa: E731
        return base, lambda: ops.semi24_compress(w, backend="cpu")

    return Case(f"semi24_compress fp16 {shape[0]}x{shape[1]}", "torch's reference conversion", make)


# The CI set: 1024-2048 wide layers, B=256, 90-95% sparsity (see the module docstring for the runtime).
FULL: tuple[Case, ...] = (
    linear_case("fwd", (1024, 2048), 256, 0.9),
    linear_case("fwd", (2048, 2048), 256, 0.95),
    linear_case("fwdbwd", (1024, 2048), 256, 0.9),
    linear_case("fwdbwd", (2048, 2048), 256, 0.95),
    linear_case("fwd", (1024, 2048), 256, 0.9, ell=True),
    linear_case("fwdbwd", (1024, 2048), 256, 0.9, ell=True),
    linear_case("fwdbwd", (1024, 2048), 256, 0.5, path="dense"),
    outer_topk_case("fast", 2048, 1024, 256, 0.9),
    outer_topk_case("exact", 2048, 1024, 256, 0.9),
    csr_dense_case((2048, 2048), 0.9),
    semi24_case((1024, 1024)),
)
# Small odd shapes: a smoke run of seconds (no floors).
QUICK: tuple[Case, ...] = (
    linear_case("fwd", (96, 130), 70, 0.9),
    linear_case("fwdbwd", (96, 130), 70, 0.9),
    linear_case("fwd", (96, 130), 70, 0.9, ell=True),
    linear_case("fwdbwd", (96, 130), 70, 0.9, ell=True),
    linear_case("fwdbwd", (96, 130), 70, 0.5, path="dense"),
    outer_topk_case("fast", 100, 130, 33, 0.9),
    outer_topk_case("exact", 100, 130, 33, 0.9),
    csr_dense_case((96, 130), 0.9),
    semi24_case((64, 128)),
)

# From `sparsekern bench micro --calibrate 5` on Zen 4 and on Zen 3, merged (see the module docstring).
FLOORS: dict[str, dict[str, Floor]] = {
    "spmm fwd 1024->2048 B=256 90%": {
        "avx512": Floor(3.0, observed=(5.59, 5.92)),
        "avx2": Floor(2.1, observed=(3.85, 5.77)),
        "baseline": Floor(0.98, observed=(1.80, 2.64)),
    },
    "spmm fwd 2048->2048 B=256 95%": {
        "avx512": Floor(5.6, observed=(10.33, 11.76)),
        "avx2": Floor(3.7, observed=(6.73, 10.62)),
        "baseline": Floor(1.9, observed=(3.48, 5.05)),
    },
    "linear fwd+bwd 1024->2048 B=256 90%": {
        "avx512": Floor(2.1, observed=(3.92, 4.21)),
        "avx2": Floor(1.5, observed=(2.91, 4.05)),
        "baseline": Floor(0.78, observed=(1.43, 1.97)),
    },
    "linear fwd+bwd 2048->2048 B=256 95%": {
        "avx512": Floor(3.9, observed=(7.15, 8.63)),
        "avx2": Floor(3.3, observed=(6.07, 7.87)),
        "baseline": Floor(1.6, observed=(2.95, 3.72)),
    },
    "ell fwd 1024->2048 B=256 90%": {
        "avx2": Floor(2.4, observed=(4.44, 5.18)),
        "baseline": Floor(1.0, observed=(1.97, 2.53)),
    },
    "ell fwd+bwd 1024->2048 B=256 90%": {
        "avx2": Floor(1.6, observed=(2.98, 3.67)),
        "baseline": Floor(0.74, observed=(1.36, 1.69)),
    },
    "dense path fwd+bwd 1024->2048 B=256 50%": {
        "avx512": Floor(0.5, observed=(0.92, 0.95)),
        "avx2": Floor(0.44, observed=(0.80, 0.95)),
        "baseline": Floor(0.44, observed=(0.82, 0.95)),
    },
    "outer_topk fast 2048x1024 B=256 90% α=0.3": {
        "avx512": Floor(1.7, observed=(3.22, 5.56)),
        "avx2": Floor(1.7, observed=(3.22, 4.85)),
        "baseline": Floor(0.71, observed=(1.29, 2.29)),
    },
    "outer_topk exact 2048x1024 B=256 90% α=0.3": {
        "avx512": Floor(1.5, observed=(2.79, 4.65)),
        "avx2": Floor(1.4, observed=(2.70, 4.54)),
        "baseline": Floor(0.75, observed=(1.36, 2.31)),
    },
    "csr_dense scatter+gather 2048->2048 90%": {
        "avx512": Floor(4.7, observed=(8.71, 10.33)),
        "avx2": Floor(2.6, observed=(4.76, 10.54)),
        "baseline": Floor(2.6, observed=(4.85, 10.96)),
    },
    "semi24_compress fp16 1024x1024": {
        "avx512": Floor(22.0, observed=(40.06, 50.37)),
        "avx2": Floor(21.0, observed=(39.43, 52.36)),
        "baseline": Floor(5.9, observed=(10.89, 15.61)),
    },
}


# ---------------------------------------------------------------------------------------------------------
# Measuring


def _warm_up(fn: Fn, budget: float) -> float:
    """Warm-up calls (allocations, lazy initialisation); returns the time of one call: the fastest of up to five
    calls after the first, as many as fit in ``budget`` seconds (at least one), so that one call slowed by other
    processes does not shrink every turn of a quick op to a single call."""
    fn()
    times: list[float] = []
    while len(times) < 5 and (not times or sum(times) < budget):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_pair(baseline: Fn, op: Fn, settings: Settings) -> dict[str, Any]:
    """Time ``baseline`` and ``op`` in alternating turns; returns the median ratio, its range and both Stats."""
    fns = {"baseline": baseline, "op": op}
    per_call = {name: _warm_up(fn, 2 * settings.block_time) for name, fn in fns.items()}
    calls = {name: max(1, round(settings.block_time / max(t, 1e-9))) for name, t in per_call.items()}
    turns: dict[str, list[float]] = {name: [] for name in fns}
    ratios = []
    for _ in range(settings.repeats):
        for name, fn in fns.items():
            turns[name].append(harness.measure(fn, warmup=0, repeat=calls[name], memory=False).min)
        ratios.append(turns["baseline"][-1] / turns["op"][-1])
    stats = {name: harness.Stats.from_samples(t, n=len(t) * calls[name]) for name, t in turns.items()}
    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "op": stats["op"].to_dict(),
        "baseline": stats["baseline"].to_dict(),
    }


def run_cases(cases: Sequence[Case], isas: Sequence[str], settings: Settings, progress: bool = True) -> list[dict]:
    """Every case on every ISA (cases outer: one case's inputs live at a time); one row each."""
    rows = []
    for case in harness.progress(list(cases), "micro", progress):
        try:
            baseline, op = case.make()
        except Exception as exc:  # noqa: BLE001 -- reported in its rows, and fails the run
            baseline = op = None
            error = harness.failure(exc)
        for isa in isas:
            row: dict[str, Any] = {"case": case.name, "isa": isa, "baseline_is": case.baseline}
            if op is None:
                rows.append({**row, "error": error})
                continue
            try:
                with harness.isa_context(isa):
                    rows.append({**row, **time_pair(baseline, op, settings)})
            except Exception as exc:  # noqa: BLE001
                rows.append({**row, "error": harness.failure(exc)})
        del baseline, op
    return rows


def judge(rows: list[dict], floors: dict[str, dict[str, Floor]]) -> list[str]:
    """Set each row's floor and status; returns one message per row below its floor or failed."""
    failures = []
    for row in rows:
        floor = floors.get(row["case"], {}).get(row["isa"])
        row["floor"] = None if floor is None else floor.floor
        row["observed"] = None if floor is None else list(floor.observed)
        if "error" in row:
            row["status"] = "FAILED"
            failures.append(f"{row['case']!r} on {row['isa']}: {row['error']}")
        elif floor is None:
            row["status"] = "no floor"
        elif row["ratio"] >= floor.floor:
            row["status"] = "ok"
        else:
            row["status"] = "BELOW FLOOR"
            low, high = floor.observed
            failures.append(
                f"{row['case']!r} on {row['isa']}: ratio {row['ratio']:.2f}x (baseline time / sparsekern time, "
                f"median of {len(row['ratios'])}) is below its floor {floor.floor:.2f}x (calibration saw "
                f"{low:.2f}x-{high:.2f}x)"
            )
    return failures


# ---------------------------------------------------------------------------------------------------------
# Reporting


def _ms(d: dict[str, Any]) -> str:
    return harness.fmt_ms(harness.Stats.from_dict(d))


def _range(low: float, high: float) -> str:
    return f"{harness.fmt_ratio(low)}-{harness.fmt_ratio(high)}"


def ratio_section(rows: list[dict]) -> harness.Section:
    headers = [
        "case", "ISA", "sparsekern ms median (IQR)", "baseline ms median (IQR)", "ratio (median)", "ratio range",
        "floor", "calibration range", "status", "baseline",
    ]  # fmt: skip
    table = []
    for r in rows:
        floor = ["-" if r["floor"] is None else harness.fmt_ratio(r["floor"])]
        floor.append("-" if r["observed"] is None else _range(*r["observed"]))
        if "error" in r:
            table.append([r["case"], r["isa"], r["error"], "-", "-", "-", *floor, r["status"], r["baseline_is"]])
            continue
        timings = [_ms(r["op"]), _ms(r["baseline"]), harness.fmt_ratio(r["ratio"])]
        table.append(
            [
                r["case"],
                r["isa"],
                *timings,
                _range(r["ratio_min"], r["ratio_max"]),
                *floor,
                r["status"],
                r["baseline_is"],
            ]
        )
    notes = [
        "ratio: baseline time / sparsekern time, both timed in alternating turns in this process (above 1: "
        "sparsekern is faster); median over the turns, and the lowest and highest turn."
    ]
    return harness.Section("Ratios against the dense baselines", headers, table, notes)


def _notes(settings: Settings, env: dict[str, Any]) -> list[str]:
    return [
        f"- {settings.repeats} turns of each of baseline and op per case, each turn {settings.block_time * 1e3:g} ms "
        "of calls (at least one) whose fastest call counts; two to six warm-up calls of each first; the ms columns "
        "give the median (IQR) of the turns.",
        f"- CPU: {env['cpu']}, {env['torch_threads']} torch threads; the dense baselines run torch's own kernels "
        "whatever the ISA column says (it names the ISA forced on sparsekern's C++ kernels).",
        "- floors: see sparsekern/bench/micro.py (FLOORS and how they were set); a case without one never fails.",
    ]


def calibration_table(runs: list[list[dict]]) -> tuple[str, dict[str, dict[str, Floor]]]:
    """From several runs of the set: the suggested FLOORS as Python source, and as a dict."""
    seen: dict[str, dict[str, list[float]]] = {}
    for rows in runs:
        for r in rows:
            if "ratio" in r:  # a failed case suggests no floor
                seen.setdefault(r["case"], {}).setdefault(r["isa"], []).append(r["ratio"])
    floors: dict[str, dict[str, Floor]] = {}
    lines = ["FLOORS: dict[str, dict[str, Floor]] = {"]
    for case, by_isa in seen.items():
        lines.append(f"    {case!r}: {{")
        for isa, ratios in by_isa.items():
            low, high = min(ratios), max(ratios)
            floor = _round_down(FLOOR_FACTOR * low)
            floors.setdefault(case, {})[isa] = Floor(floor, (round(low, 2), round(high, 2)))
            lines.append(f"        {isa!r}: Floor({floor!r}, observed=({low:.2f}, {high:.2f})),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines), floors


def _round_down(value: float) -> float:
    """Down to 2 significant digits, so a floor never rounds up past what was seen."""
    if value <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.floor(value / step) * step:.6g}")


def check_isas(requested: Sequence[str] | None) -> list[str]:
    """The ISAs to run (default: every one this CPU runs), each checked; ValueError naming a bad one."""
    if not _extension.available():
        raise ValueError(f"needs the compiled extension, which is not loaded ({_extension.unavailable_reason})")
    if not requested:
        return _extension.available_isas()
    return [harness.check_isa(isa) for isa in dict.fromkeys(requested)]


def run_micro(
    cases: Sequence[Case],
    isas: Sequence[str],
    settings: Settings,
    out: str | Path,
    floors: dict[str, dict[str, Floor]] | None = None,
    calibrate: int | None = None,
    progress: bool = True,
    name: str = "micro",
) -> tuple[int, str, dict[str, Any]]:
    """Run the set (``calibrate`` times, or once), write ``<out>/<name>.md`` and ``.json``; returns (exit code,
    markdown, data). Exit code 1 when a case fails or, unless calibrating, a ratio is below its floor."""
    Path(out).mkdir(parents=True, exist_ok=True)  # fail on a bad --out before minutes of measuring
    floors = FLOORS if floors is None else floors
    env = harness.environment()
    start = time.perf_counter()
    runs = [run_cases(cases, isas, settings, progress) for _ in range(calibrate or 1)]
    seconds = time.perf_counter() - start
    failures = judge(runs[-1], floors)
    notes = [*_notes(settings, env), f"- ISAs: {', '.join(isas)}; {len(runs)} run(s) of the set in {seconds:.0f} s."]
    sections = [ratio_section(runs[-1])]
    data: dict[str, Any] = {
        "benchmark": name,
        "environment": env,
        "settings": {"repeats": settings.repeats, "block_time": settings.block_time},
        "isas": list(isas),
        "seconds": seconds,
        "rows": runs[-1],
        "failures": failures,
    }
    if calibrate:
        source, suggested = calibration_table(runs)
        data["calibration_runs"] = runs
        data["suggested_floors"] = source
        rows = [
            [c, isa, harness.fmt_ratio(f.floor), _range(*f.observed)]
            for c, b in suggested.items()
            for isa, f in b.items()
        ]
        sections.append(
            harness.Section(
                f"Calibration: {calibrate} runs, floor = {FLOOR_FACTOR} x the lowest ratio seen",
                ["case", "ISA", "suggested floor", "ratios seen"],
                rows,
                ["The last run's ratios are above; paste the FLOORS table printed at the end into micro.py."],
            )
        )
    markdown = harness.render_markdown("sparsekern bench micro: kernels against dense", env, notes, sections)
    harness.write_report(out, name, markdown, data)
    if calibrate:  # floors are not judged; a case that failed in any run still fails
        markdown += "\n```python\n" + data["suggested_floors"] + "\n```\n"
        data["failures"] = [f"{r['case']!r} on {r['isa']}: {r['error']}" for rows in runs for r in rows if "error" in r]
        return (1 if data["failures"] else 0), markdown, data
    return (1 if failures else 0), markdown, data


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern bench micro``."""
    prog = "sparsekern bench micro"
    try:
        isas = check_isas(args.isa)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    settings = QUICK_SETTINGS if args.quick else Settings()
    if args.repeat is not None:
        settings = Settings(repeats=args.repeat, block_time=settings.block_time)
    cases = QUICK if args.quick else FULL
    progress = sys.stderr.isatty()  # a progress bar in a CI log is noise
    code, markdown, data = run_micro(cases, isas, settings, args.out, calibrate=args.calibrate, progress=progress)
    print(markdown)
    print(f"wrote {Path(args.out) / 'micro.md'} and {Path(args.out) / 'micro.json'} ({data['seconds']:.0f} s)")
    for failure in data["failures"] if code else ():
        print(f"{prog}: FAILED: {failure}", file=sys.stderr)
    if code:
        print(
            f"{prog}: {len(data['failures'])} case(s) failed or fell below their floors: a kernel got slower (or "
            "broke), or this machine is much slower than the one the floors were calibrated on (re-calibrate: "
            "sparsekern bench micro --calibrate 5, see sparsekern/bench/micro.py)",
            file=sys.stderr,
        )
    return code
