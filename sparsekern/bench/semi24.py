"""``sparsekern bench semi24``: 2:4 conversion speed against torch's reference, and 2:4 F.linear speedup on a GPU.

Two parts:

* conversions (every machine): ``semi24_compress`` / ``semi24_decompress`` per available backend (the C++ one once
  per instruction set asked for with ``--isa``) against torch's plain-tensor reference conversion
  (``torch.sparse._semi_structured_conversions``), with a bit-identity check of every result;
* linear (only with a CUDA GPU of compute capability >= 8.0): dense ``F.linear(x, w)`` against the same pruned
  weight as a CUTLASS and a cuSPARSELt 2:4 tensor, at the shapes the 2:4 literature reports.

Nothing is timed under the Triton interpreter: its timings say nothing about the speed of the kernel.

Why conversion ratios used to swing 2x between runs (15.7x, 16.0x, 33.0x on one AVX2 machine): every call allocates
its outputs, and whether those pages were fresh (page-faulted in 4 KiB at a time, ~8 us each on a 2-core VM: 36 ms
for a 4096x4096 fp16 compress, more than its work) or recycled from what the process freed just before depended on
the order of the calls; torch's reference, for its part, faults in hundreds of MiB of temporaries per call and
varies with the load. So the conversions are timed in interleaved rounds (torch, then each backend and ISA, once
per round), medians over rounds, with the minor page faults per call of each side reported; the C++ kernels
allocate large outputs on 2 MiB huge pages (``csrc/include/sparsekern/cpu_alloc.h``), so their fresh outputs cost a
few faults instead of thousands.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.sparse import _semi_structured_conversions as torch_conversions

import sparsekern
from sparsekern import _extension, _semi24
from sparsekern._csr import as_bits
from sparsekern.ops import _backend
from sparsekern.ops.semi24_mask import group_topk_mask

from . import harness

NO_GPU_MESSAGE = (
    "No CUDA GPU of compute capability >= 8.0 visible: "
    "the dense vs 2:4 F.linear speedup is not measured on this machine."
)

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "fp32": torch.float32,
}
LINEAR_DTYPES = ("fp16", "bf16")
LINEAR_FORMATS = ("cutlass", "cusparselt")
OPS = ("compress", "decompress")


@dataclass(frozen=True)
class Weight:
    """A weight of ``nn.Linear(in_features, out_features)``: shape (out_features, in_features)."""

    name: str
    out_features: int
    in_features: int
    tokens: tuple[int, ...] = (1, 16, 128, 2048)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def label(self) -> str:
        size = f"{self.out_features}x{self.in_features}"
        return f"{size} ({self.name})" if self.name else size


# The shapes the 2:4 literature reports. PyTorch's 2:4 tutorial runs nn.Linear(10240, 3072) on a (3072, 10240) input.
WEIGHTS: tuple[Weight, ...] = (
    Weight("", 4096, 4096),
    Weight("2:4 tutorial 10240->3072", 3072, 10240, (1, 16, 128, 2048, 3072)),
    Weight("BERT-base 768->3072", 3072, 768),
    Weight("BERT-base 3072->768", 768, 3072),
    Weight("ViT-L MLP 1024->4096", 4096, 1024),
    Weight("ViT-L MLP 4096->1024", 1024, 4096),
    Weight("Llama-7B MLP 4096->11008", 11008, 4096),
    Weight("Llama-7B MLP 11008->4096", 4096, 11008),
)
# Small but valid for every dtype (int8 needs multiples of 16 x 128), so a smoke run takes seconds.
QUICK_WEIGHTS: tuple[Weight, ...] = (Weight("quick", 128, 256, (16,)), Weight("quick", 256, 512, (16, 128)))


@dataclass(frozen=True)
class Settings:
    """How hard to measure: timed calls, untimed warm-up calls, and the time cap for slow baselines."""

    repeat: int = 5
    warmup: int = 1
    max_time: float | None = 10.0
    min_time: float = 0.0

    def kwargs(self, device: str) -> dict[str, Any]:
        """The keyword arguments of :func:`harness.measure`."""
        return {
            "warmup": self.warmup,
            "repeat": self.repeat,
            "max_time": self.max_time,
            "min_time": self.min_time,
            "device": device,
        }


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (so -0.0 vs 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(as_bits(a), as_bits(b))


def pruned_weight(shape: tuple[int, int], dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0):
    """A magnitude-pruned 2:4 (fp32: 1:2) random weight, as ``to_semi_structured(prune=True)`` would keep it.

    Dropped positions hold +0.0 (``torch.where``, not ``w * mask``, which leaves -0.0), so a decompressed result
    can be compared with the input bit for bit.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w = (w * 40).round().clamp(-128, 127).to(dtype) if dtype == torch.int8 else w.to(dtype)
    fmt = _semi24.FORMATS[dtype]
    mask = group_topk_mask(w, keep=fmt.kept, group=fmt.group)
    return torch.where(mask, w, torch.zeros((), dtype=dtype)).contiguous().to(device)


def gpu_status() -> tuple[bool, str]:
    """Whether a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0) is visible, and what was seen."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    if cap < (8, 0):
        return False, f"{name} has compute capability {cap[0]}.{cap[1]}, below 8.0"
    return True, f"{name} (compute capability {cap[0]}.{cap[1]})"


def conversion_backends(gpu: bool) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The (backend, device) pairs to time, and why each other pair is not timed."""
    devices = {"cpu": ["cpu"], "triton": [], "cuda": [], "reference": ["cpu"]}
    skipped: dict[str, str] = {
        "triton on cpu": "on CPU tensors Triton runs only in its interpreter, whose timings are not speeds",
    }
    if gpu:
        for backend in ("triton", "cuda", "reference"):
            devices[backend].append("cuda")
    else:
        skipped["cuda"] = "no CUDA GPU of compute capability >= 8.0 visible"
    run: list[tuple[str, str]] = []
    for backend, on in devices.items():
        for device in on:
            reason = _backend.unavailable_reason(backend, torch.device(device))
            if reason is None:
                run.append((backend, device))
            else:
                skipped[f"{backend} on {device}"] = reason
    return run, skipped


def conversion_rows(
    weights: Sequence[Weight],
    dtypes: Sequence[str],
    backends: Sequence[tuple[str, str]],
    settings: Settings,
    progress: bool = True,
    isas: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Time compress and decompress per (weight, dtype, backend, ISA) against torch's reference conversion.

    ``isas``: the instruction sets the C++ backend runs, each a row of its own (default: the one it runs now).
    Compress results are compared bit for bit with torch's (packed, meta). Decompress runs on torch's
    (packed, meta) and is compared with torch's to_dense, except fp32, where torch's to_dense is lossy
    (torch 2.14) and the original dense weight is the oracle. A failing case becomes a row saying why.
    """
    isas = list(isas) if isas else [harness.current_isa()]
    devices = sorted({device for _, device in backends})
    cases = [(w, d, dev) for dev in devices for w in weights for d in dtypes]
    rows: list[dict[str, Any]] = []
    for weight, dtype_name, device in harness.progress(cases, "semi24 conversions", progress):
        runs = [(b, isa if b == "cpu" else None) for b, d in backends if d == device for isa in isas]
        runs = list(dict.fromkeys(runs))  # one run per non-CPU backend, whatever the ISAs
        rows += _conversion_case(weight, dtype_name, device, runs, settings)
    return rows


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class _Series:
    """The per-round samples of one timed function."""

    fn: Any
    isa: str | None = None
    seconds: list[float] = dataclasses.field(default_factory=list)  # one per round: the mean of its calls
    faults: list[float] = dataclasses.field(default_factory=list)  # minor page faults per call, per round
    calls: int = 0
    first: harness.Stats | None = None  # the warm-up call, with its peak memory
    error: str | None = None

    def call(self) -> Any:
        if self.isa is None:
            return self.fn()
        with _extension.use_cpu_isa(self.isa):
            return self.fn()

    def stats(self) -> harness.Stats:
        peak = self.first.peak_bytes if self.first else None
        kind = self.first.memory_kind if self.first else "not measured"
        return harness.Stats.from_samples(self.seconds, n=self.calls, peak_bytes=peak, memory_kind=kind)


def time_rounds(series: Sequence[_Series], settings: Settings, device: str) -> None:
    """Time the functions in interleaved rounds (each once per round, or repeatedly for ``min_time / repeat``
    when fast), so load from other processes and the allocator's state hit all of them alike. The first function
    is the baseline: rounds stop after ``repeat`` of them, or after 3 once its samples total ``max_time``."""
    for s in series:
        try:
            s.first = harness.measure(s.call, warmup=1, repeat=1, device=device)  # warm-up (and peak memory)
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            s.error = harness.failure(exc, 160)
    block = settings.min_time / settings.repeat
    live = [s for s in series if s.error is None]
    while live:
        for s in live:
            calls, faults, start = 0, _minor_faults(), time.perf_counter()
            while True:
                try:
                    s.call()
                except Exception as exc:  # noqa: BLE001
                    s.error = harness.failure(exc, 160)
                    break
                if device != "cpu":
                    torch.cuda.synchronize()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= block:
                    break
            if s.error is None:
                s.seconds.append(elapsed / calls)
                s.faults.append((_minor_faults() - faults) / calls)
                s.calls += calls
        base = series[0]
        n = len(base.seconds)
        total = sum(base.seconds)
        capped = settings.max_time is not None and total >= settings.max_time and n >= min(3, settings.repeat)
        live = [s for s in live if s.error is None]
        if n >= settings.repeat or capped or base.error is not None:
            break


def _conversion_case(
    weight: Weight, dtype_name: str, device: str, runs: Sequence[tuple[str, str | None]], settings: Settings
) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    base = {"weight": weight.label, "shape": list(weight.shape), "dtype": dtype_name, "device": device}
    from_dense = torch_conversions.sparse_semi_structured_from_dense_cutlass
    to_dense = torch_conversions.sparse_semi_structured_to_dense_cutlass
    try:
        dense = pruned_weight(weight.shape, dtype, device)
        packed, meta = from_dense(dense)
        checked_against = "input" if dtype == torch.float32 else "torch"
        oracle = dense if checked_against == "input" else to_dense(packed, meta)
    except Exception as exc:  # noqa: BLE001 -- reported in the table
        return [{**base, "op": op, "backend": "torch reference", "error": harness.failure(exc, 160)} for op in OPS]

    def ours(op: str, backend: str):
        if op == "compress":
            return lambda: sparsekern.semi24_compress(dense, backend=backend)
        return lambda: sparsekern.semi24_decompress(packed, meta, backend=backend)

    rows = []
    for op in OPS:
        torch_fn = (lambda: from_dense(dense)) if op == "compress" else (lambda: to_dense(packed, meta))
        series = [_Series(torch_fn)] + [_Series(ours(op, b), isa) for b, isa in runs]
        time_rounds(series, settings, device)
        ref = series[0]
        for (backend, isa), s in zip(runs, series[1:], strict=True):
            row = {**base, "op": op, "backend": backend, "isa": isa or "-"}
            row["checked_against"] = "torch" if op == "compress" else checked_against
            if ref.error is not None or s.error is not None:
                row["error"] = s.error or f"torch reference {ref.error}"
                rows.append(row)
                continue
            try:
                got = s.call()
                if op == "compress":
                    identical = bits_equal(got[0], packed) and bits_equal(got[1], meta)
                else:
                    identical = bits_equal(got, oracle)
            except Exception as exc:  # noqa: BLE001
                row["error"] = harness.failure(exc, 160)
                rows.append(row)
                continue
            ratios = [a / b for a, b in zip(ref.seconds, s.seconds, strict=True)]
            row.update(
                torch=ref.stats().to_dict(),
                stats=s.stats().to_dict(),
                ratio=ref.stats().median / s.stats().median,
                ratio_rounds=[min(ratios), max(ratios)],
                faults_per_call=statistics.median(s.faults),
                torch_faults_per_call=statistics.median(ref.faults),
                bit_identical=identical,
            )
            rows.append(row)
    return rows


def linear_rows(
    weights: Sequence[Weight],
    dtypes: Sequence[str],
    settings: Settings,
    device: str = "cuda",
    formats: Sequence[str] = LINEAR_FORMATS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Time dense ``F.linear(x, w)`` against the same pruned ``w`` as a 2:4 tensor of each format.

    speedup = dense time / sparse time (below 1x: a slowdown). Correctness: the largest |sparse - dense| output
    difference, and each one's error against an fp32 computation; the 2:4 result is called ok when its error is
    at most twice dense's (the flash-attention rule, :func:`harness.within_twice`). A failing case (e.g. a shape
    cuSPARSELt refuses) becomes a row saying why.
    """
    cases = [(w, t, d) for w in weights for t in w.tokens for d in dtypes if d in LINEAR_DTYPES]
    rows: list[dict[str, Any]] = []
    for weight, tokens, dtype_name in harness.progress(cases, "semi24 F.linear", progress):
        rows += _linear_case(weight, tokens, dtype_name, device, formats, settings)
    return rows


def _linear_case(
    weight: Weight, tokens: int, dtype_name: str, device: str, formats: Sequence[str], settings: Settings
) -> list[dict[str, Any]]:
    dtype = DTYPES[dtype_name]
    base = {
        "weight": weight.label,
        "shape": list(weight.shape),
        "tokens": tokens,
        "dtype": dtype_name,
        "device": device,
    }
    kw = settings.kwargs(device)
    try:
        w = pruned_weight(weight.shape, dtype, device)
        x = torch.randn(tokens, weight.in_features, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        dense_stats = harness.measure(lambda: F.linear(x, w), **kw)
        y_dense = F.linear(x, w).float()
        y_exact = F.linear(x.float(), w.float())
        dense_err = (y_dense - y_exact).abs().max().item()
    except Exception as exc:  # noqa: BLE001
        return [{**base, "format": "dense", "error": harness.failure(exc, 160)}]

    rows = []
    for fmt in formats:
        row = {**base, "format": fmt, "dense": dense_stats.to_dict(), "dense_err_vs_fp32": dense_err}
        try:
            ws = sparsekern.to_semi_structured(w, prune=True, format=fmt)
            stats = harness.measure(lambda ws=ws: F.linear(x, ws), **kw)
            y = F.linear(x, ws).float()
            err = (y - y_exact).abs().max().item()
            row.update(
                stats=stats.to_dict(),
                speedup=dense_stats.median / stats.median,
                max_abs_diff_vs_dense=(y - y_dense).abs().max().item(),
                sparse_err_vs_fp32=err,
                ok=harness.within_twice(err, dense_err, y_exact.abs().max().item(), dtype),
            )
        except Exception as exc:  # noqa: BLE001
            row["error"] = harness.failure(exc, 160)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Reporting


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def conversion_section(op: str, rows: list[dict[str, Any]]) -> harness.Section:
    """The table of one op ("compress" or "decompress")."""
    headers = [
        "weight",
        "dtype",
        "device",
        "backend",
        "ISA",
        "ms median (IQR)",
        "torch ref ms median (IQR)",
        "torch ref / backend (rounds' range)",
        "bit-identical",
        "checked against",
        "page faults / call backend / torch",
        "peak MiB backend / torch",
    ]
    table = []
    for r in rows:
        if r["op"] != op:
            continue
        head = [r["weight"], r["dtype"], r["device"], r["backend"], r.get("isa", "-")]
        if "error" in r:
            table.append([*head, r["error"], "-", "-", "-", r.get("checked_against", "-"), "-", "-"])
            continue
        stats, ref = harness.Stats.from_dict(r.get("stats")), harness.Stats.from_dict(r.get("torch"))
        low, high = r["ratio_rounds"]
        table.append(
            [
                *head,
                harness.fmt_ms(stats),
                harness.fmt_ms(ref),
                f"{harness.fmt_ratio(r['ratio'])} ({low:.3g}-{high:.3g})",
                _yes_no(r["bit_identical"]),
                r["checked_against"],
                f"{r['faults_per_call']:.0f} / {r['torch_faults_per_call']:.0f}",
                f"{harness.fmt_mib(stats.peak_bytes)} / {harness.fmt_mib(ref.peak_bytes)}",
            ]
        )
    torch_fn = f"sparse_semi_structured_{'from_dense' if op == 'compress' else 'to_dense'}_cutlass"
    notes = [
        f"torch ref = torch.sparse._semi_structured_conversions.{torch_fn}, timed on the same tensors in the same "
        "rounds (interleaved: torch, then each backend and ISA); torch ref / backend is the ratio of the medians "
        "(above 1x: the backend is faster), with the lowest and highest ratio of a single round.",
        "Every call allocates fresh outputs, as a user's call does (none is reused across calls); page faults / "
        "call is the median number of minor page faults per call, the cost of first touching those outputs "
        "(and torch's temporaries). The C++ kernels put outputs of 2 MiB or more on transparent huge pages.",
    ]
    if op == "decompress":
        notes.append(
            "Decompress runs on torch's (packed, meta); fp32 results are checked against the input weight, "
            "not torch's to_dense, which is lossy for fp32 in torch 2.14."
        )
    return harness.Section(f"2:4 {op}", headers, table, notes)


def linear_section(rows: list[dict[str, Any]]) -> harness.Section:
    headers = [
        "weight",
        "tokens",
        "dtype",
        "format",
        "dense ms median (IQR)",
        "2:4 ms median (IQR)",
        "speedup (dense / 2:4)",
        "max |2:4 - dense|",
        "err vs fp32 2:4 / dense",
        "ok",
        "peak MiB dense / 2:4",
    ]
    table = []
    for r in rows:
        dense = harness.Stats.from_dict(r.get("dense"))
        if "error" in r:
            table.append(
                [
                    r["weight"],
                    r["tokens"],
                    r["dtype"],
                    r["format"],
                    harness.fmt_ms(dense),
                    r["error"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                ]
            )
            continue
        stats = harness.Stats.from_dict(r["stats"])
        table.append(
            [
                r["weight"],
                r["tokens"],
                r["dtype"],
                r["format"],
                harness.fmt_ms(dense),
                harness.fmt_ms(stats),
                harness.fmt_ratio(r["speedup"]),
                f"{r['max_abs_diff_vs_dense']:.3g}",
                f"{r['sparse_err_vs_fp32']:.3g} / {r['dense_err_vs_fp32']:.3g}",
                _yes_no(r["ok"]),
                f"{harness.fmt_mib(dense.peak_bytes)} / {harness.fmt_mib(stats.peak_bytes)}",
            ]
        )
    notes = [
        "speedup = dense F.linear time / 2:4 F.linear time on the same pruned weight; below 1x is a slowdown.",
        "ok: the 2:4 output's max error against an fp32 F.linear is at most 2x the dense output's (or one rounding "
        "of the output's scale, where dense is exact).",
    ]
    return harness.Section("dense vs 2:4 F.linear (GPU)", headers, table, notes)


def run_semi24(
    *,
    weights: Sequence[Weight],
    dtypes: Sequence[str],
    settings: Settings,
    out: str,
    name: str = "semi24",
    title: str = "sparsekern bench semi24",
    backends: Sequence[str] | None = None,
    linear: bool = True,
    progress: bool = True,
    isas: Sequence[str] | None = None,
) -> tuple[int, str]:
    """Run both parts, write ``<out>/<name>.md`` and ``.json``; returns (exit code, markdown).

    ``isas``: the instruction sets the C++ CPU backend is timed with, a row each (default: the one it runs now).

    The exit code is 1 when a conversion failed or was not bit-identical (a sparsekern bug), else 0; a linear
    case that torch or cuSPARSELt refuses is reported in its row and does not change the exit code.
    """
    Path(out).mkdir(parents=True, exist_ok=True)  # fail on a bad --out before minutes of measuring
    gpu, gpu_seen = gpu_status()
    run_backends, skipped = conversion_backends(gpu)
    if backends is not None:
        for b, _ in run_backends:
            if b not in backends:
                skipped.setdefault(b, "not selected")
        run_backends = [(b, d) for b, d in run_backends if b in backends]
    env = harness.environment(gpu=gpu)
    notes = [NO_GPU_MESSAGE if not gpu else f"GPU: {gpu_seen}."]
    if not gpu:
        notes.append(
            f"(seen: {gpu_seen}). Every timing below is on the CPU ({env['cpu']}, {env['torch_threads']} "
            "torch threads); CPU timings are noisy, so compare ratios within this run."
        )
    cap = ""
    if settings.max_time is not None:
        cap = f" (fewer, at least 3, once the torch reference's total {settings.max_time} s)"
    notes.append(
        f"Timing: one warm-up call each, then {settings.repeat} interleaved rounds (each round times every "
        f"function once, or repeatedly for {settings.min_time / settings.repeat:.3g} s when faster, and counts the "
        f"mean){cap}; median and "
        "interquartile range (IQR) over rounds, in ms."
    )
    notes += [f"Not timed: backend `{name}`: {why}." for name, why in skipped.items()]
    notes.append(
        "Peak memory is that of the first call: on the CPU the rise of the process's peak RSS (a lower bound: "
        "memory the allocator kept from earlier calls is reused unseen), on CUDA the rise of "
        "torch.cuda.max_memory_allocated."
    )
    conv = conversion_rows(weights, dtypes, run_backends, settings, progress, isas)
    sections = [conversion_section(op, conv) for op in OPS]
    lin: list[dict[str, Any]] = []
    if gpu and linear:
        # F.linear at a few tokens takes microseconds: collect at least 0.1 s of samples.
        gpu_settings = dataclasses.replace(settings, min_time=max(settings.min_time, 0.1))
        lin = linear_rows(weights, dtypes, gpu_settings, progress=progress)
        sections.append(linear_section(lin))
    markdown = harness.render_markdown(title, env, notes, sections)
    data = {
        "benchmark": name,
        "environment": env,
        "notes": notes,
        "gpu_measured": bool(gpu and linear),
        "settings": dataclasses.asdict(settings),
        "isas": list(isas) if isas else [harness.current_isa()],
        "skipped_backends": skipped,
        "conversions": conv,
        "linear": lin,
    }
    harness.write_report(out, name, markdown, data)
    failed = [r for r in conv if "error" in r or not r.get("bit_identical", False)]
    return (1 if failed else 0), markdown


def select_weights(
    default: Sequence[Weight], shapes: Sequence[tuple[int, int]] | None, batches: Sequence[int] | None
) -> list[Weight]:
    """The weights of ``--shape`` (INxOUT; a shape of WEIGHTS keeps its name), else ``default``; ``--batch``
    replaces every weight's token counts."""
    weights = list(default)
    if shapes:
        named = {(w.in_features, w.out_features): w for w in WEIGHTS}
        weights = [named.get(s, Weight("", s[1], s[0])) for s in dict.fromkeys(shapes)]
    if batches:
        weights = [dataclasses.replace(w, tokens=tuple(dict.fromkeys(batches))) for w in weights]
    return weights


EXPORTED_SHAPES = ((4096, 11008), (11008, 4096))  # (in, out) of each nn.Linear: the Llama-7B MLP


def exported_chain(shapes: Sequence[tuple[int, int]], dtype: torch.dtype, device: str, seed: int = 0):
    """A chain of nn.Linear(in, out) with ReLU between them, random weights, in ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for n_in, n_out in shapes:
        linear = torch.nn.Linear(n_in, n_out, device="meta")
        linear.weight = torch.nn.Parameter(torch.randn(n_out, n_in, generator=gen).div_(n_in**0.5).to(dtype))
        linear.bias = torch.nn.Parameter(torch.randn(n_out, generator=gen).to(dtype))
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).to(device)


def run_exported_cli(args: argparse.Namespace) -> int:
    """``sparsekern bench semi24 --exported``: export a random chain of linear layers, pruned to 2:4, and time it
    against the dense pruned model (on a GPU; on the CPU the export itself is timed and the rows say why the float
    2:4 layers cannot run)."""
    shapes = [tuple(s) for s in args.shape] if args.shape else list(EXPORTED_SHAPES)
    for (_, n_out), (n_in, _) in zip(shapes, shapes[1:], strict=False):
        if n_out != n_in:
            print(f"sparsekern bench semi24 --exported: the shapes must chain (OUT of one is IN of the next): {shapes}")
            return 2
    dtype_name = (args.dtype or ["fp16"])[0]
    if dtype_name not in ("fp16", "bf16", "int8"):
        print(f"sparsekern bench semi24 --exported: --dtype must be fp16, bf16 or int8, got {dtype_name}")
        return 2
    gpu, _ = gpu_status()
    device = "cuda" if gpu else "cpu"
    float_dtype = torch.bfloat16 if dtype_name in ("bf16", "int8") else torch.float16
    model = exported_chain(shapes, float_dtype, device)
    start = time.perf_counter()
    exported, report = sparsekern.export_semi24(model, prune=True, dtype=DTYPES[dtype_name], inplace=False)
    if device == "cuda":
        torch.cuda.synchronize()
    export_s = time.perf_counter() - start
    reference = sparsekern.export.decompress_model(exported) if dtype_name != "int8" else _pruned_twin(model, report)
    tokens = (args.batch or [2048])[0]
    x = torch.randn(tokens, shapes[0][0], generator=torch.Generator().manual_seed(1)).to(float_dtype).to(device)
    settings = Settings(repeat=args.repeat or 5, warmup=1, min_time=0.1, max_time=2.0)
    rows, markdown = run_exported(exported, reference, x, report, out=args.out, settings=settings)
    print(markdown)
    print(f"export_semi24 took {export_s:.2f} s on {device} ({len(report.converted)} layers, prune=True)")
    print(f"wrote {Path(args.out) / 'semi24-exported.md'} and {Path(args.out) / 'semi24-exported.json'}")
    failed = gpu and any("error" in r or r.get("ok") is False for r in rows)
    return 1 if failed else 0


def _pruned_twin(model: torch.nn.Module, report) -> torch.nn.Module:
    """The dense model pruned as the export pruned it (for int8 exports, whose layers keep no float weight)."""
    from sparsekern.ops.semi24_mask import semi24_mask

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for entry in report.converted:
            layer = twin.get_submodule(entry.name)
            layer.weight.mul_(semi24_mask(layer.weight))
    return twin


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern bench semi24``."""
    if getattr(args, "exported", False):
        return run_exported_cli(args)
    quick = args.quick
    # min_time gives sub-millisecond calls enough samples for a stable median; max_time keeps the multi-second
    # torch baselines of the big shapes from dominating the run.
    settings = Settings(
        repeat=args.repeat or (3 if quick else 5), warmup=1, min_time=0.05, max_time=2.0 if quick else 10.0
    )
    dtypes = args.dtype or list(DTYPES)
    isas = args.isa or None
    if isas and "all" in isas:
        isas = _extension.available_isas()
    for isa in isas or ():
        if isa not in _extension.available_isas():
            have = ", ".join(_extension.available_isas()) or f"none: {_extension.unavailable_reason}"
            print(f"sparsekern bench semi24: --isa {isa}: this CPU runs {have}", file=sys.stderr)
            return 2
    code, markdown = run_semi24(
        weights=select_weights(QUICK_WEIGHTS if quick else WEIGHTS, args.shape, args.batch),
        backends=args.backend,
        dtypes=list(dict.fromkeys(dtypes)),
        settings=settings,
        out=args.out,
        isas=list(dict.fromkeys(isas)) if isas else None,
    )
    print(markdown)
    print(f"wrote {Path(args.out) / 'semi24.md'} and {Path(args.out) / 'semi24.json'}")
    if code:
        print(
            "sparsekern bench semi24: some conversions failed or were not bit-identical (see the table)",
            file=sys.stderr,
        )
    return code


# ---------------------------------------------------------------------------------------------------------
# An exported model (sparsekern.export_semi24) against the dense masked model it came from


def _layer_inputs(model: torch.nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer sees in one forward of ``model(x)``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def exported_model_rows(
    exported: torch.nn.Module,
    reference: torch.nn.Module,
    x: torch.Tensor,
    report,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Time an exported model against the dense model it came from, on the same input.

    ``exported, report = sparsekern.export_semi24(reference, ...)`` (``reference``: the masked or pruned dense model
    in the exported dtype, e.g. ``sparsekern.export.decompress_model(exported)``). One row per converted layer
    (dense ``F.linear`` on the reference layer's weight against the 2:4 layer, at the input the layer sees in
    ``reference(x)``) and one row for the whole forward. speedup = dense time / 2:4 time. Each row also gives the
    largest |2:4 - dense| output difference; float layers are called ok by the rule of :func:`linear_rows` (error
    against an fp32 computation at most twice dense's), int8 layers are not judged (their error is quantization).
    A failing case becomes a row saying why.
    """
    settings = settings or Settings(repeat=5, min_time=0.1, max_time=2.0)
    device = str(x.device)
    kw = settings.kwargs(device)
    names = [layer.name for layer in report.converted]
    inputs = _layer_inputs(reference, names, x)  # the reference runs anywhere (no 2:4 matmul on the CPU)
    rows: list[dict[str, Any]] = []
    for entry in report.converted:
        row: dict[str, Any] = {"layer": entry.name, "shape": list(entry.shape), "dtype": entry.export_dtype}
        row.update(format=entry.format, tokens=0, device=device)
        try:
            layer = exported.get_submodule(entry.name)
            ref_layer = reference.get_submodule(entry.name)
            inp = inputs[entry.name].reshape(-1, layer.in_features)
            row["tokens"] = inp.shape[0]
            w_dense = ref_layer.weight.detach()
            bias = None if ref_layer.bias is None else ref_layer.bias.detach()
            with torch.no_grad():
                dense_stats = harness.measure(lambda inp=inp, w=w_dense, b=bias: F.linear(inp, w, b), **kw)
                stats = harness.measure(lambda inp=inp, layer=layer: layer(inp), **kw)
                y_dense = F.linear(inp, w_dense, bias).float()
                y = layer(inp).float()
                y_exact = F.linear(inp.float(), w_dense.float(), None if bias is None else bias.float())
            err, dense_err = (y - y_exact).abs().max().item(), (y_dense - y_exact).abs().max().item()
            row.update(
                dense=dense_stats.to_dict(),
                stats=stats.to_dict(),
                speedup=dense_stats.median / stats.median,
                max_abs_diff_vs_dense=(y - y_dense).abs().max().item(),
                sparse_err_vs_fp32=err,
                dense_err_vs_fp32=dense_err,
                ok=None
                if entry.export_dtype == "int8"
                else harness.within_twice(err, dense_err, y_exact.abs().max().item(), inp.dtype),
            )
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            row["error"] = harness.failure(exc, 160)
        rows.append(row)
    row = {"layer": "(whole model)", "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    row.update(format="-", tokens=x.reshape(-1, x.shape[-1]).shape[0], device=device)
    try:
        with torch.no_grad():
            dense_stats = harness.measure(lambda: reference(x), **kw)
            stats = harness.measure(lambda: exported(x), **kw)
            diff = (exported(x).float() - reference(x).float()).abs().max().item()
        row.update(dense=dense_stats.to_dict(), stats=stats.to_dict(), speedup=dense_stats.median / stats.median)
        row.update(max_abs_diff_vs_dense=diff, ok=None)
    except Exception as exc:  # noqa: BLE001
        row["error"] = harness.failure(exc, 160)
    rows.append(row)
    return rows


def exported_section(rows: list[dict[str, Any]]) -> harness.Section:
    headers = ["layer", "shape", "dtype", "format", "tokens", "dense ms median (IQR)", "2:4 ms median (IQR)"]
    headers += ["speedup (dense / 2:4)", "max |2:4 - dense|", "ok"]
    table = []
    for r in rows:
        head = [r["layer"], "x".join(map(str, r["shape"])), r["dtype"], r["format"], r["tokens"]]
        if "error" in r:
            table.append([*head, harness.fmt_ms(harness.Stats.from_dict(r.get("dense"))), r["error"], "-", "-", "-"])
            continue
        table.append(
            [
                *head,
                harness.fmt_ms(harness.Stats.from_dict(r["dense"])),
                harness.fmt_ms(harness.Stats.from_dict(r["stats"])),
                harness.fmt_ratio(r["speedup"]),
                f"{r['max_abs_diff_vs_dense']:.3g}",
                _yes_no(r.get("ok")),
            ]
        )
    notes = [
        "An exported model (sparsekern.export_semi24) against the dense model it came from, on the same input: each "
        "converted layer at the input it sees in the dense forward, then the whole forward. speedup = dense "
        "time / 2:4 time; below 1x is a slowdown. ok: as in the F.linear table (float layers only; '-' for int8 "
        "layers, whose error is quantization, and for the whole model)."
    ]
    return harness.Section("exported model: dense vs 2:4", headers, table, notes)


def run_exported(
    exported: torch.nn.Module,
    reference: torch.nn.Module,
    x: torch.Tensor,
    report,
    *,
    out: str,
    settings: Settings | None = None,
    name: str = "semi24-exported",
) -> tuple[list[dict[str, Any]], str]:
    """:func:`exported_model_rows` written to ``<out>/<name>.md`` and ``.json``; returns (rows, markdown)."""
    gpu, seen = gpu_status()
    env = harness.environment(gpu=gpu)
    rows = exported_model_rows(exported, reference, x, report, settings)
    notes = [
        f"GPU: {seen}." if gpu else f"{NO_GPU_MESSAGE} (seen: {seen})",
        "Export report:",
        "```",
        str(report),
        "```",
    ]
    markdown = harness.render_markdown("sparsekern bench semi24: exported model", env, notes, [exported_section(rows)])
    data = {"benchmark": name, "environment": env, "report": report.to_dict(), "rows": rows}
    harness.write_report(out, name, markdown, data)
    return rows, markdown
