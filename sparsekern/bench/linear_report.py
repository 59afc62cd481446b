"""The summaries of ``sparsekern bench linear`` (see :mod:`sparsekern.bench.linear`, which measures the rows):
DESIGN §6's goals against what a run achieved, the density from which the sparse path beats dense, the detail
tables and the notes that say how the numbers were made."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..ops import _backend
from ..ops.sparse_linear import density_crossover
from . import harness

MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward (dX, dW at the nonzeros)"}

# DESIGN §6: speedup over dense of the sparse layer, fp32, B=2048, on the 2-core CPU, on AVX-512 and AVX2 alike
# (an AVX-512 machine measures AVX2 with --isa avx2).
GOALS: dict[tuple[str, float], float] = {
    ("fwd", 0.9): 5.0,
    ("fwd", 0.95): 9.0,
    ("fwd", 0.98): 20.0,
    ("fwdbwd", 0.9): 4.0,
    ("fwdbwd", 0.95): 7.0,
    ("fwdbwd", 0.98): 14.0,
}
GOAL_BATCH = 2048
GOAL_DTYPE = "fp32"
AUTO_FLOOR = 0.95  # auto never below 0.95x dense, at any sparsity
# Issue 15, on constant fan-in weights: the ELL kernels >= 1.3x the CSR kernels at 90-98% (B 256 and 2048, forward
# and forward+backward), and online inference (B 1-16, forward) >= 3.4x dense at 90% (SRigL's figure).
ELL_VS_CSR = 1.3
ELL_VS_CSR_SPARSITIES = (0.9, 0.95, 0.98)
ELL_VS_CSR_BATCHES = (256, 2048)
ONLINE_VS_DENSE = 3.4
ONLINE_SPARSITY = 0.9
ONLINE_MAX_BATCH = 16
BASELINES_FROM = 0.8  # faster than torch CSR and SparseProp at every sparsity >= 80%


def _ms_cell(r: dict[str, Any], limit: int = 72) -> str:
    if "error" in r:  # the whole first line is in the notes and the JSON
        return r["error"] if len(r["error"]) <= limit else r["error"][: limit - 3] + "..."
    if "skipped" in r:
        return r["skipped"]
    stats = harness.Stats.from_dict(r.get("stats"))
    cell = harness.fmt_ms(stats)
    return cell + " n=1" if stats is not None and stats.n == 1 else cell


def _err_cell(row: dict[str, Any]) -> str:
    """The quantity where the sparse path's error is largest relative to dense's: 'dW 3.1e-05 / 2.9e-05'."""
    res = row["results"]
    sparse, dense = res["sparse"].get("errors"), res["dense"].get("errors")
    if sparse is None or dense is None:
        return "-"
    q = max(sparse, key=lambda k: sparse[k] / dense[k] if dense[k] > 0 else (math.inf if sparse[k] > 0 else 0))
    return f"{q} {sparse[q]:.2g} / {dense[q]:.2g}"


def _ok_cell(row: dict[str, Any]) -> str:
    if row["failed"]:
        return "FAILED"
    return "-" if row["ok"] is None else ("ok" if row["ok"] else "NO")


def _mib_pair(row: dict[str, Any]) -> str:
    dense, sparse = (harness.Stats.from_dict(row["results"][name].get("stats")) for name in ("dense", "sparse"))
    if dense is None and sparse is None:
        return "-"
    one = lambda s: "-" if s is None or s.peak_bytes is None else f"{s.peak_bytes / 2**20:.1f}"  # noqa: E731
    return f"{one(dense)} / {one(sparse)}"


DETAIL_HEADERS = [
    "shape",
    "B",
    "dtype",
    "sparsity",
    "dense ms median (IQR)",
    "sparse ms median (IQR)",
    "ELL ms median (IQR)",
    "auto ms median (IQR)",
    "auto path",
    "torch CSR ms",
    "SparseProp ms",
    "speedup sparse",
    "speedup ELL",
    "ELL vs CSR",
    "speedup auto",
    "vs CSR",
    "vs SparseProp",
    "peak MiB dense / sparse",
    "max err sparse / dense",
    "ok",
]


def detail_section(mode: str, rows: Sequence[dict[str, Any]]) -> harness.Section:
    shapes = list(dict.fromkeys(r["label"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    order = lambda r: (shapes.index(r["label"]), r["batch"], dtypes.index(r["dtype"]), r["sparsity"])  # noqa: E731
    table = []
    for r in sorted((r for r in rows if r["mode"] == mode), key=order):
        res = r["results"]
        table.append(
            [
                r["label"],
                r["batch"],
                r["dtype"],
                harness.fmt_pct(r["sparsity"]),
                _ms_cell(res["dense"]),
                _ms_cell(res["sparse"]),
                _ms_cell(res["ell"]),
                _ms_cell(res["auto"]),
                r["auto_path"],
                _ms_cell(res["torch_csr"]),
                _ms_cell(res["sparseprop"]),
                harness.fmt_ratio(r["speedup"]["sparse"]),
                harness.fmt_ratio(r["speedup"].get("ell")),
                harness.fmt_ratio(r.get("ell_vs_csr")),
                harness.fmt_ratio(r["speedup"]["auto"]),
                harness.fmt_ratio(r["vs_torch_csr"]),
                harness.fmt_ratio(r["vs_sparseprop"]),
                _mib_pair(r),
                _err_cell(r),
                _ok_cell(r),
            ]
        )
    return harness.Section(MODE_TITLES[mode], DETAIL_HEADERS, table, [])


def _goal_scope(rows: Sequence[dict[str, Any]]) -> tuple[int | None, str | None, list[str]]:
    """The batch and dtype the goals are read at (B=2048 fp32, else the closest the run has) and why."""
    notes = []
    batches = sorted({r["batch"] for r in rows})
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    if not batches:
        return None, None, notes
    batch = GOAL_BATCH if GOAL_BATCH in batches else batches[-1]
    dtype = GOAL_DTYPE if GOAL_DTYPE in dtypes else dtypes[0]
    if batch != GOAL_BATCH or dtype != GOAL_DTYPE:
        notes.append(
            f"This run has no B={GOAL_BATCH} {GOAL_DTYPE} cases: the speedup goals are read at B={batch} {dtype}, "
            "which says little about the goals."
        )
    return batch, dtype, notes


def _met(value: float | None, target: float, strict: bool = False) -> str:
    if value is None:
        return "-"
    return "yes" if (value > target if strict else value >= target) else "NO"


def _case_name(row: dict[str, Any]) -> str:
    return f"{row['label']} B={row['batch']} {row['dtype']} {harness.fmt_pct(row['sparsity'])}"


def goals(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """DESIGN §6's targets next to what this run achieved."""
    batch, dtype, notes = _goal_scope(rows)
    out: list[dict[str, Any]] = []
    if batch is None:
        return out, notes
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["label"] for r in rows))
    for mode in modes:
        for (goal_mode, sparsity), target in GOALS.items():
            if goal_mode != mode:
                continue
            for shape in shapes:
                match = [
                    r
                    for r in rows
                    if (r["mode"], r["label"], r["batch"], r["dtype"]) == (mode, shape, batch, dtype)
                    and math.isclose(r["sparsity"], sparsity)
                ]
                sp = match[0]["speedup"] if match else {"sparse": None, "auto": None}
                isa = f", {match[0]['cpu_isa']}" if match and match[0].get("cpu_isa") else ""
                out.append(
                    {
                        "goal": f"speedup over dense at {harness.fmt_pct(sparsity)}",
                        "mode": mode,
                        "scope": f"{shape}, B={batch}, {dtype}{isa}",
                        "target": target,
                        "sparse": sp["sparse"],
                        "auto": sp["auto"],
                        "met": _met(sp["auto"], target) if match else "not run",
                    }
                )
        in_mode = [r for r in rows if r["mode"] == mode]
        worst = min(
            (r for r in in_mode if r["speedup"]["auto"] is not None), key=lambda r: r["speedup"]["auto"], default=None
        )
        out.append(
            {
                "goal": f"auto never below {AUTO_FLOOR}x dense",
                "mode": mode,
                "scope": "every case" + (f" (worst: {_case_name(worst)})" if worst else ""),
                "target": AUTO_FLOOR,
                "sparse": None,
                "auto": worst["speedup"]["auto"] if worst else None,
                "met": _met(worst["speedup"]["auto"], AUTO_FLOOR) if worst else "-",
            }
        )
        for key, name in (("vs_torch_csr", "torch CSR"), ("vs_sparseprop", "SparseProp")):
            high = [r for r in in_mode if r["sparsity"] >= BASELINES_FROM - 1e-9 and r[key] is not None]
            worst = min(high, key=lambda r: r[key], default=None)
            scope = f"every case at >= {harness.fmt_pct(BASELINES_FROM)}"
            if worst:
                scope += f" (worst: {_case_name(worst)})"
            else:
                scope += f" ({name} did not run)"
            out.append(
                {
                    "goal": f"sparse path faster than {name}",
                    "mode": mode,
                    "scope": scope,
                    "target": 1.0,
                    "sparse": worst[key] if worst else None,
                    "auto": None,
                    "met": _met(worst[key], 1.0, strict=True) if worst else "-",
                }
            )
    out += ell_goals(rows)
    return out, notes


def ell_goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's goals, from the rows whose weight has constant fan-in (``--fan-in``, ``--online``): the ELL
    kernels against the CSR kernels on the same weight (per mode and dtype), and online inference against dense
    (per dtype, forward). A goal whose cases the run lacks says "not run"; a run without such rows has none."""
    fan = [r for r in rows if r.get("fan_in")]
    out: list[dict[str, Any]] = []
    if not fan:
        return out

    def goal(name, mode, dtype, cases, key, target, where):
        measured = [r for r in cases if key(r) is not None]
        worst = min(measured, key=key, default=None)
        isa = next((f", {r['cpu_isa']}" for r in cases if r.get("cpu_isa")), "")
        scope = f"{len(cases)} cases {where}, {dtype}{isa}" + (f" (worst: {_case_name(worst)})" if worst else "")
        met = "not run" if not cases else (_met(key(worst), target) if worst else "-")
        return {"goal": name, "mode": mode, "scope": scope, "target": target, "met": met, "worst": worst}

    dtypes = list(dict.fromkeys(r["dtype"] for r in fan))
    for mode in dict.fromkeys(r["mode"] for r in fan):
        for dtype in dtypes:
            cases = [
                r
                for r in fan
                if (r["mode"], r["dtype"]) == (mode, dtype)
                and r["batch"] in ELL_VS_CSR_BATCHES
                and any(math.isclose(r["sparsity"], s) for s in ELL_VS_CSR_SPARSITIES)
            ]
            g = goal(
                f"ELL kernels >= {ELL_VS_CSR}x the CSR kernels (constant fan-in)",
                mode,
                dtype,
                cases,
                lambda r: r.get("ell_vs_csr"),
                ELL_VS_CSR,
                "at 90-98%, B 256/2048",
            )
            worst = g.pop("worst")
            out.append({**g, "sparse": worst["ell_vs_csr"] if worst else None, "auto": None})
    if any(r["mode"] == "fwd" for r in fan):
        for dtype in dtypes:
            cases = [
                r
                for r in fan
                if (r["mode"], r["dtype"]) == ("fwd", dtype)
                and r["batch"] <= ONLINE_MAX_BATCH
                and math.isclose(r["sparsity"], ONLINE_SPARSITY)
            ]
            g = goal(
                f"online inference >= {ONLINE_VS_DENSE}x dense at {harness.fmt_pct(ONLINE_SPARSITY)} (SRigL)",
                "fwd",
                dtype,
                cases,
                lambda r: r["speedup"].get("auto"),
                ONLINE_VS_DENSE,
                f"at B <= {ONLINE_MAX_BATCH}",
            )
            worst = g.pop("worst")
            sparse = worst["speedup"].get("ell") if worst else None
            out.append({**g, "sparse": sparse, "auto": worst["speedup"]["auto"] if worst else None})
    return out


def goals_section(goal_rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> harness.Section:
    table = [
        [
            g["goal"],
            g["mode"],
            g["scope"],
            (">" if g["goal"].startswith("sparse path faster") else ">=") + harness.fmt_ratio(g["target"]),
            harness.fmt_ratio(g["sparse"]),
            harness.fmt_ratio(g["auto"]),
            g["met"],
        ]
        for g in goal_rows
    ]
    headers = ["goal (DESIGN §6)", "mode", "measured on", "target", "achieved: sparse path", "achieved: auto", "met"]
    section_notes = [
        "Speedup goals are judged on auto (what SparseLinear runs); the comparisons with torch CSR and SparseProp "
        "on the sparse path (time of the baseline / time of sparsekern). ELL vs CSR: the CSR kernels' time / the "
        "ELL kernels' time on the same constant fan-in weight (the 'achieved: sparse path' column).",
        *notes,
    ]
    return harness.Section("Goals", headers, table, section_notes)


def auto_sparse_from(backend: str, device: str, dtype: torch.dtype, batch: int, training: bool) -> str:
    """From which sparsity ``path="auto"`` takes the sparse path (``DENSITY_CROSSOVER``), as a report cell."""
    if backend == "reference":
        return "always (the reference backend has no dense path choice)"
    crossover = density_crossover(torch.device(device).type, dtype, batch, training)
    return "never" if crossover == 0.0 else f">= {harness.fmt_pct(round(1 - crossover, 6))}"


def crossovers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, B, dtype, mode): the smallest swept sparsity from which the sparse path beats dense at every
    larger swept sparsity too (None: never), and where auto switches to the sparse path."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["batch"], r["dtype"], r["mode"]), []).append(r)
    out = []
    for (shape, batch, dtype, mode), members in groups.items():
        members = sorted(members, key=lambda r: r["sparsity"])
        speedups = [(r["sparsity"], r["speedup"]["sparse"]) for r in members]
        measured = [s for s in speedups if s[1] is not None]
        beats_from: float | None = None
        for sparsity, speedup in reversed(measured):
            if speedup <= 1.0:
                break
            beats_from = sparsity
        out.append(
            {
                "shape": shape,
                "batch": batch,
                "dtype": dtype,
                "mode": mode,
                "measured": bool(measured),
                "beats_dense_from": beats_from,
                "auto_sparse_from": members[0]["auto_sparse_from"],
                "speedups": dict(speedups),
            }
        )
    return out


def crossover_section(cross: Sequence[dict[str, Any]]) -> harness.Section:
    table = []
    for c in cross:
        if not c["measured"]:
            beats = "not measured (sparse path failed)"
        elif c["beats_dense_from"] is None:
            beats = "never (in this sweep)"
        else:
            beats = harness.fmt_pct(c["beats_dense_from"])
        curve = " ".join(f"{harness.fmt_pct(s)}:{harness.fmt_ratio(v)}" for s, v in c["speedups"].items())
        table.append([c["shape"], c["batch"], c["dtype"], c["mode"], beats, c["auto_sparse_from"], curve])
    headers = [
        "shape",
        "B",
        "dtype",
        "mode",
        "sparse beats dense from",
        "auto takes sparse at (DENSITY_CROSSOVER)",
        "sparse speedup by sparsity",
    ]
    notes = [
        "sparse beats dense from: the smallest swept sparsity at which the sparse path is faster than dense there and "
        "at every larger swept sparsity. Compare with where auto switches to it: where they differ, auto leaves "
        "speed behind and DENSITY_CROSSOVER in ops/sparse_linear.py needs recalibrating."
    ]
    return harness.Section("Crossover: where the sparse path starts to beat dense", headers, table, notes)


def run_notes(
    backend: str, device: str, settings: harness.RoundSettings, env: dict[str, Any], sparseprop_note: str
) -> list[str]:
    """The notes above every table: device, backend, what each column means and how it was timed."""
    notes = []
    if torch.device(device).type == "cpu":
        notes.append(
            f"Device: CPU ({env['cpu']}, {env['torch_threads']} torch threads); no GPU speed is measured here. "
            "CPU timings are noisy: compare ratios within this run."
        )
    else:
        notes.append(f"Device: {torch.cuda.get_device_name()}.")
    if backend == "cpu":
        notes.append(
            f"CPU kernels: {env['extension_cpu_isa']} (every row's `cpu_isa` in the JSON; force one with --isa)."
        )
    reason = _backend.unavailable_reason(backend, torch.device(device))
    what = {
        "cpu": " (the C++ kernels)",
        "reference": " (the plain-PyTorch fallback: scatter + an fp32 dense GEMM; its timings are not a kernel's)",
    }
    notes.append(
        f"sparsekern backend: `{backend}`"
        + what.get(backend, "")
        + ("" if reason is None else f" -- NOT AVAILABLE here: {reason}; its rows report the failure")
        + "."
    )
    notes += [
        "Speedup = dense time / sparsekern time (above 1x: sparsekern is faster). vs CSR and vs SparseProp = their "
        "time / the sparse path's time.",
        "sparse = the CSR kernels (kernels='csr'); ELL = the constant fan-in kernels (kernels='ell'), timed only "
        "where every row holds the same number of nonzeros (--fan-in, --online); ELL vs CSR = sparse time / ELL "
        "time on that weight.",
        "auto = sparse_linear(path='auto'), as SparseLinear calls it; when it takes the sparse path its timing is "
        "the sparse path's (the same call once the path is chosen): the ELL column's on a constant fan-in weight.",
        "torch CSR: torch.sparse.mm(W.to_sparse_csr(), x.T).T; forward+backward takes grad wrt x and the CSR "
        "weight (torch returns a CSR gradient at the nonzeros). Where torch has no kernel (e.g. bf16 on the CPU) or "
        "no autograd, the cell says why.",
        sparseprop_note + ".",
        "Forward+backward: dense computes dX and the full dense dW; sparsekern dX and dW at the nonzeros only.",
        "Inputs: no bias; weight values, x and the output gradient hold bf16-exact numbers so fp32 and bf16 share "
        "one float64 reference. ok: the sparse path's (and auto's) max abs error against float64 is at most twice "
        "dense F.linear's in the same dtype, for y (and dX, dW); the error column shows the worst quantity.",
        f"Timing: each function's first call is its warm-up and the checked result; then the functions of a case "
        f"are timed in turn, round after round (up to {settings.repeat} rounds; after 3 a function stops once its "
        f"rounds total {settings.max_time} s), so load from other processes hits them alike; a round of a fast "
        f"function repeats it for {settings.min_time / settings.repeat:.3g} s. Median (IQR) of the round medians, "
        "in ms. A first "
        f"call over {settings.max_time} s counts as a sample: n=2 with one more round, n=1 when it also took "
        f"{settings.slow_factor:g}x dense. Sparsities run from the highest down; a baseline (torch CSR, "
        f"SparseProp) over {settings.max_time} s and {settings.slow_factor:g}x dense is not timed at the lower "
        "sparsities of the same shape, B, dtype and mode.",
        "Peak MiB: the first timed call's rise of the process's peak RSS on the CPU (a lower bound: memory the "
        "allocator kept is reused unseen), of torch.cuda.max_memory_allocated on CUDA.",
    ]
    return notes
