"""The shared benchmark harness: timing stats, peak memory, an environment stamp, markdown and JSON writers, and
forcing the instruction set of the C++ CPU kernels.

Every benchmark (``sparsekern bench <name>``, ``benchmarks/sweep.py``) times through :func:`measure` (or
:func:`time_interleaved`, which times the functions of one case round after round) and writes through
:func:`write_report`, so every result file carries the same stamp and the same statistics; a result row's timings
are ``Stats.to_dict()`` and come back with :meth:`Stats.from_dict`. :func:`within_twice` is the accuracy rule and
:func:`failure` the one-line cell of a failed call.

Every row names the instruction set the C++ CPU kernels ran: each :class:`Stats` records it when it is made
(``cpu_isa``, so every timing in a JSON report carries it), and :func:`render_markdown` gives every table an ISA
column (the section's ``isa``, else the environment stamp's). A benchmark that switches ISA inside one run (``bench
micro``) adds its own ISA column or sets ``Section.isa`` per section. To let a benchmark force an ISA, add
``sparsekern.bench.add_isa_argument`` to its parser (in ``sparsekern/bench/__init__.py``, which must not import
torch) and run it inside :func:`isa_context`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _extension

# A safety net for min_time on functions that take nanoseconds.
_MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class Stats:
    """Timings of one function, in seconds, plus the peak memory of its first call (bytes, None: not measured)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int
    peak_bytes: int | None = None
    memory_kind: str = "not measured"
    # The instruction set the C++ CPU kernels ran when these timings were made (see :func:`current_isa`).
    cpu_isa: str = field(default_factory=lambda: current_isa())

    @classmethod
    def from_samples(cls, samples: Sequence[float], n: int | None = None, **kwargs: Any) -> Stats:
        """Median, quartiles, min and max of ``samples`` (seconds); ``n``: calls behind them (default: one each)."""
        if not samples:
            raise ValueError("Stats.from_samples: no samples")
        q1, median, q3 = _quartiles(samples)
        return cls(median, q1, q3, min(samples), max(samples), len(samples) if n is None else n, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Stats | None:
        """The Stats that :meth:`to_dict` wrote into a result row (None stays None: a function not timed)."""
        if data is None:
            return None
        return cls(**{k: v for k, v in data.items() if k != "iqr"})

    @property
    def iqr(self) -> float:
        """The interquartile range, the spread reported next to every median."""
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr": self.iqr}


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


# ---------------------------------------------------------------------------------------------------------
# Peak memory. CUDA: the caching allocator's own counters. CPU: torch allocates outside Python's allocator, so
# tracemalloc sees nothing; instead reset the kernel's RSS high-water mark (Linux >= 4.0: "5" > clear_refs) and
# read VmHWM afterwards. Free memory that glibc still holds would be reused without raising RSS, so it is handed
# back first (malloc_trim); what the allocator keeps anyway makes the CPU figure a lower bound.


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _rss_reset() -> int | None:
    """Reset the RSS high-water mark; returns the current RSS in bytes, or None when this system cannot."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _read_status_kib("VmRSS")
    return None if rss is None else rss * 1024


class _PeakMemory:
    """Context manager: the peak extra memory of the code inside it (``.bytes``, None when not measurable)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.kind = "not measured"

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_reset()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            self.kind = "CUDA max_memory_allocated rise"
        elif self._base is not None:
            hwm = _read_status_kib("VmHWM")
            if hwm is not None:
                self.bytes = max(0, hwm * 1024 - self._base)
                self.kind = "peak RSS rise (lower bound)"


# ---------------------------------------------------------------------------------------------------------
# Timing


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeat: int = 5,
    min_time: float = 0.0,
    max_time: float | None = None,
    device: str | torch.device = "cpu",
    memory: bool = True,
) -> Stats:
    """Time ``fn()`` and return median, quartiles and sample count (:class:`Stats`, seconds).

    Args:
        fn: the work, called with no arguments; its result is discarded.
        warmup: untimed calls first (compilation, caches, lazy initialisation).
        repeat: timed calls; more are made while their total is below ``min_time``.
        max_time: stop once the timed calls have taken this long and at least ``min(3, repeat)`` were made, so
            multi-second baselines do not dominate a run. ``Stats.n`` says how many were made.
        device: CPU timing uses ``time.perf_counter``; CUDA timing uses CUDA events around each call, after a
            synchronize, so queued asynchronous work is counted.
        memory: record the peak memory of the first call (CUDA allocator counters, or the rise of the process's
            peak RSS on Linux; None where neither is available).
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"measure: repeat must be >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    peak = _PeakMemory(device)
    samples: list[float] = []

    def timed() -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for i in range(warmup):
        if i == 0 and memory:
            with peak:
                fn()
        else:
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    while len(samples) < _MAX_SAMPLES:
        if not samples and warmup == 0 and memory:
            with peak:
                samples.append(timed())
        else:
            samples.append(timed())
        total = sum(samples)
        if max_time is not None and total >= max_time and len(samples) >= min(3, repeat):
            break
        if len(samples) >= repeat and total >= min_time:
            break
    return Stats.from_samples(samples, peak_bytes=peak.bytes, memory_kind=peak.kind)


@dataclass(frozen=True)
class RoundSettings:
    """How hard :func:`time_interleaved` measures the functions of one case (all times in seconds).

    repeat: rounds (at least 3 unless ``repeat`` is smaller); a function leaves once its rounds total
        ``max_time``, so multi-second calls do not dominate the run.
    min_time: what ``repeat`` rounds of one function take at least: a round repeats a fast call for
        ``min_time / repeat`` and counts the median.
    slow_factor: a first call of at least ``max_time`` and ``slow_factor`` times the baseline's is the only
        sample (it has lost to the baseline whatever the noise); a first call of ``max_time`` without that is one
        of two (the caller has paid the process's one-time costs before, e.g. ``bench linear``'s
        ``warm_up_process``).
    """

    repeat: int = 5
    max_time: float = 1.0
    min_time: float = 0.05
    slow_factor: float = 2.0


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Timing:
    fn: Callable[[], Any]
    first: float
    rounds: list[float] = field(default_factory=list)  # one median per round
    calls: int = 0
    total: float = 0.0
    slow: bool = False
    memory: Stats | None = None
    done: bool = False


def _first_call(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def time_interleaved(
    fns: dict[str, Callable[[], Any]], settings: RoundSettings, device: str | torch.device, baseline: str = "dense"
) -> dict[str, tuple[Stats, Any] | Exception]:
    """Time the functions of one case in rounds, each function once per round, so that a burst of load from
    other processes hits all of them rather than one: the ratios between them are what a benchmark reports.

    Each function's first call is its warm-up, and its outputs are returned for checking. Then every round times
    each remaining function through :func:`measure` (one call, or repeated calls for ``min_time / repeat`` when
    they are fast; the round's median counts). A function is done after ``repeat`` rounds, or after 3 once its
    rounds total ``max_time``. On the CPU, where first calls compile nothing (once the process is warm), a first
    call of ``max_time`` or more is itself a sample: one more round follows, or none when it also took
    ``slow_factor`` times the first call of ``baseline``. Returns, per name, (stats, outputs) or the exception.
    Stats: median and quartiles of the round medians, min and max of them, n = timed calls; peak memory is
    that of the first round.
    """
    results: dict[str, tuple[Stats, Any] | Exception] = {}
    timings: dict[str, _Timing] = {}
    outputs: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            first, outputs[name] = _first_call(fn, device)
        except Exception as exc:  # noqa: BLE001 -- reported by the caller
            results[name] = exc
            continue
        timings[name] = _Timing(fn, first)
    base_first = timings[baseline].first if baseline in timings else None
    if torch.device(device).type == "cpu":
        for name, t in timings.items():
            if t.first >= settings.max_time:
                t.slow, t.rounds, t.calls, t.total = True, [t.first], 1, t.first
                lost = base_first is not None and name != baseline and t.first >= settings.slow_factor * base_first
                t.done = lost or settings.repeat == 1
    least = min(3, settings.repeat)
    block = settings.min_time / settings.repeat
    while not all(t.done for t in timings.values()):
        for name, t in timings.items():
            if t.done:
                continue
            try:
                stats = measure(t.fn, warmup=0, repeat=1, min_time=block, device=device, memory=t.memory is None)
            except Exception as exc:  # noqa: BLE001 -- reported by the caller
                results[name], t.done = exc, True
                continue
            if t.memory is None:
                t.memory = stats
            t.rounds.append(stats.median)
            t.calls += stats.n
            t.total += stats.median * stats.n
            n = len(t.rounds)
            t.done = n >= 2 if t.slow else n >= settings.repeat or (n >= least and t.total >= settings.max_time)
    for name, t in timings.items():
        if name in results:
            continue
        peak = (t.memory.peak_bytes, t.memory.memory_kind) if t.memory else (None, "not measured")
        stats = Stats.from_samples(t.rounds, n=t.calls, peak_bytes=peak[0], memory_kind=peak[1])
        results[name] = (stats, outputs[name])
    return results


def within_twice(error: float, dense_error: float, scale: float, dtype: torch.dtype) -> bool:
    """The accuracy rule of every benchmark (flash-attention's): an error against a float64 (or fp32) reference
    is at most twice what the dense computation makes in the same ``dtype``, with a floor of one rounding of the
    result's ``scale`` (its largest |value|), since dense may happen to be exact. NaN fails."""
    return error <= max(2 * dense_error, torch.finfo(dtype).eps * scale)


def failure(exc: BaseException, limit: int = 120) -> str:
    """One line for a table cell: ``failed: Type: first line of the message``, at most ``limit`` characters
    after ``failed: `` (the whole message belongs in the notes or the JSON)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return "failed: " + (text if len(text) <= limit else text[: limit - 3] + "...")


def progress(items: Sequence[Any], desc: str, enabled: bool = True) -> Iterable[Any]:
    """A tqdm progress bar (on stderr) over the cases of a benchmark; it disappears when done."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------
# Instruction sets of the C++ CPU kernels


def current_isa() -> str:
    """The instruction set the C++ CPU kernels run now: "avx512", "avx2" or "baseline"; "none" without the
    extension (every op then runs its plain-PyTorch reference); "refused: ..." when SPARSEKERN_CPU_ISA names one
    this CPU lacks."""
    return _extension.cpu_isa()


def check_isa(name: str, option: str = "--isa") -> str:
    """``name`` if the C++ CPU kernels can be forced to it here; else a ValueError naming ``option``, the ISA and
    what this machine offers (unknown name, an ISA this CPU lacks, or no extension)."""
    if name not in _extension.ISAS:
        raise ValueError(f"{option}: expected one of {', '.join(_extension.ISAS)}, got {name!r}")
    if not _extension.available():
        raise ValueError(
            f"{option} {name}: the C++ extension is not loaded ({_extension.unavailable_reason}), so no CPU kernel "
            "can be forced to an instruction set"
        )
    have = _extension.available_isas()
    if name not in have:
        raise ValueError(f"{option} {name}: this CPU ({cpu_name()}) runs only {', '.join(have)}")
    return name


@contextlib.contextmanager
def isa_context(args: argparse.Namespace | str | None) -> Iterator[str]:
    """Run the body with the C++ CPU kernels forced to ``args.isa`` (or the ISA named directly; None: leave the
    choice as it is) and restore the previous choice after. Yields the ISA that runs.

    Raises:
        ValueError: the ISA is unknown or this CPU or build cannot run it (see :func:`check_isa`).

    Example::

        >>> with harness.isa_context(args) as isa:  # doctest: +SKIP
        ...     code = run_my_bench(args)            # every Stats and report row says `isa`
    """
    name = args if isinstance(args, str) or args is None else getattr(args, "isa", None)
    if name is None:
        yield current_isa()
        return
    with _extension.use_cpu_isa(check_isa(name)):
        yield name


# ---------------------------------------------------------------------------------------------------------
# Environment stamp


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_sha(path: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding ``path`` (default: this package), with "-dirty" for local changes."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a checkout, no git, or no commit yet
    return f"{sha}-dirty" if dirty else sha


def environment(gpu: bool = False) -> dict[str, Any]:
    """What a result depends on: device names, versions, git sha, date, threads."""
    import sparsekern
    from sparsekern import _extension

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = _extension.build_info()
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "gpu_capability": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "sparsekern": sparsekern.__version__,
        "extension_cpu_isa": build.get("cpu_isa") if build["loaded"] else f"not loaded: {build['reason']}",
        "git_sha": git_sha(),
        "platform": platform.platform(),
    }
    if gpu and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


# ---------------------------------------------------------------------------------------------------------
# Formatting and writing


def _num(value: float) -> str:
    """Three significant digits without scientific notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def fmt_ms(stats: Stats | None) -> str:
    """The median and, in brackets, the IQR, in milliseconds."""
    if stats is None:
        return "-"
    return f"{_num(stats.median * 1e3)} ({_num(stats.iqr * 1e3)})"


def fmt_ratio(ratio: float | None) -> str:
    """A speed ratio; slowdowns stay visible as values below 1x."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def fmt_pct(fraction: float) -> str:
    """A sparsity or density as a percentage: 0.95 -> "95%"."""
    return f"{100 * fraction:g}%"


def fmt_mib(nbytes: int | None) -> str:
    return "not measured" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One titled table of a report, with notes printed above it. ``isa``: the instruction set its rows ran
    (default: the environment stamp's ``extension_cpu_isa``); ignored when the table has an ISA column itself."""

    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: list[str]
    isa: str | None = None


ISA_HEADER = "ISA"


def with_isa_column(section: Section, isa: str) -> tuple[list[str], list[list[Any]]]:
    """The section's headers and rows with an ISA column, placed before its first timing column (a header with
    "ms" in it: the timings are what the ISA explains) or last; unchanged when it has one."""
    if ISA_HEADER in section.headers:
        return list(section.headers), [list(row) for row in section.rows]
    at = next((i for i, h in enumerate(section.headers) if "ms" in h.split()), len(section.headers))
    headers = [*section.headers[:at], ISA_HEADER, *section.headers[at:]]
    return headers, [[*row[:at], section.isa or isa, *row[at:]] for row in section.rows]


def render_markdown(title: str, env: dict[str, Any], notes: Sequence[str], sections: Sequence[Section]) -> str:
    """The report: title, notes, the environment stamp, then each section's table, every row naming its ISA."""
    stamp = ", ".join(f"{k}: {v}" for k, v in env.items())
    parts = [f"# {title}", "", *notes, "", f"Environment: {stamp}", ""]
    isa = str(env.get("extension_cpu_isa") or current_isa())
    isa = "none" if isa.startswith("not loaded") else isa
    for section in sections:
        parts += [f"## {section.title}", ""]
        if section.notes:
            parts += [*section.notes, ""]
        headers, rows = with_isa_column(section, isa)
        parts += [markdown_table(headers, rows) if rows else "(no rows)", ""]
    return "\n".join(parts)


def write_report(out_dir: str | Path, name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` and ``<out_dir>/<name>.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md_path, json_path
