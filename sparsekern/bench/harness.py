"""The shared benchmark harness: timing stats, peak memory, an environment stamp, markdown and JSON writers, and
forcing the instruction set of the C++ CPU kernels.

Every benchmark (``sparsekern bench <name>``, ``benchmarks/sweep.py``) times through :func:`measure` and writes
through :func:`write_report`, so every result file carries the same stamp and the same statistics.

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
