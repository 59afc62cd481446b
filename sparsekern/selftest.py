"""``sparsekern selftest --gpu`` (also ``bash scripts/gpu-check.sh``): the GPU run in one command.

On a machine with an NVIDIA GPU and no network, it proves (or disproves) the package there and records every GPU
figure the README lacks, within a short budget (default 7 minutes, 3 with ``--quick``), printing each stage's time:

1. build: the extension in place (``setup.py build_ext --inplace``: no pip, no index) for the visible GPU's arch
   (``TORCH_CUDA_ARCH_LIST`` from its compute capability), ``MAX_JOBS`` = the cores;
2. tests: the whole suite on the GPU with compiled Triton (``TRITON_INTERPRET`` unset), in ``--jobs`` pytest
   processes (Triton's compilation and the CPU tests use the cores), GPU tests first; this module is also the
   pytest plugin that records every result as it happens, so nothing stops the stage: a failure's traceback goes
   to the report, a crashed process (or one left with a sticky CUDA error) is restarted after the test it died in;
3. sweeps: ``sparsekern bench semi24``, ``linear`` (Triton and CUDA) and ``grow`` on the GPU, each in its own
   process with a time limit; the measured density crossovers of ``bench linear``, in the form of
   ``DENSITY_CROSSOVER`` in ``sparsekern/ops/sparse_linear.py``, for a developer to land;
4. the report: ``DIR/report.md`` and ``DIR/report.json`` plus the logs and the crossover snippet (at most
   :data:`MAX_FILES` files, each under 16 MiB).

Exit code 0 when everything built and passed, 1 when the build failed, a test failed or did not run, or a result
was not bit-identical where it must be (``bench semi24``) or less accurate than dense (``bench linear``), 2 when
no GPU is visible (checked first, before anything is written) or an argument is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
MAX_FILES = 8
FILE_LIMIT = 15 << 20  # every file written stays under this (the lease's limit is 16 MiB)
BUDGET = {False: 420.0, True: 180.0}  # seconds: under 7 minutes, --quick under 3
SWEEP_RESERVE = {False: 180.0, True: 50.0}  # kept for the sweeps when the build and the tests run long
TRACEBACK_LIMIT = 12_000  # characters of one failure's traceback kept
REPORT_FILES = ("report.md", "report.json", "build.log", "tests.log", "bench.log", "density_crossover.py")

NO_GPU_MESSAGE = (
    "sparsekern selftest --gpu: no CUDA GPU is visible ({seen}); nothing was built or run. Run it on a machine with "
    "an NVIDIA GPU (compute capability >= 8.0). Without one, `bash scripts/test.sh` runs the CPU test suite, which "
    "checks this command's parts."
)

# The pytest plugin's channel: where to append results, which shard to run, whether only GPU-relevant tests.
RESULTS_ENV = "SPARSEKERN_SELFTEST_RESULTS"
SHARD_ENV = "SPARSEKERN_SELFTEST_SHARD"
GPU_ONLY_ENV = "SPARSEKERN_SELFTEST_GPU_ONLY"
RESTART_EXIT = 75  # a test process that exits with this is started again on the tests it has not run
MAX_RESTARTS = 20
_GPU_REASON = re.compile(r"GPU|CUDA", re.IGNORECASE)
# Errors after which every later CUDA call of the process fails too: the rest of the shard runs in a new process.
_STICKY_CUDA = re.compile(r"illegal memory access|unspecified launch failure|device-side assert|misaligned address")


# ---------------------------------------------------------------------------------------------------------
# The pytest plugin (loaded with ``-p sparsekern.selftest`` by the tests stage; inert without RESULTS_ENV)

_restart_pending = False


def gpu_relevant(item: Any) -> bool:
    """Whether a collected test is one a CPU-only run skips or runs only in the Triton interpreter."""
    if "cuda" in item.nodeid.lower():
        return True
    for mark in item.iter_markers():
        if mark.name in ("gpu", "triton"):
            return True
        if mark.name == "skipif" and _GPU_REASON.search(str(mark.kwargs.get("reason", ""))):
            return True
    return False


def _append(record: dict[str, Any]) -> None:
    with open(os.environ[RESULTS_ENV], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The plugin's records (a partial last line, from a process killed while writing, is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    if not os.environ.get(RESULTS_ENV):
        return
    index, count = (int(part) for part in os.environ.get(SHARD_ENV, "0/1").split("/"))
    gpu_only = os.environ.get(GPU_ONLY_ENV) == "1"
    done = {r["nodeid"] for r in read_records(Path(os.environ[RESULTS_ENV])) if r.get("event") == "start"}
    # GPU tests first (sorted is stable: files keep their order), so a run cut short by its budget has run them;
    # shards deal the tests round-robin; a restarted shard skips what it ran (or died in) before.
    ordered = sorted(items, key=lambda item: not gpu_relevant(item))
    mine = [item for position, item in enumerate(ordered) if position % count == index]
    mine = [item for item in mine if not gpu_only or gpu_relevant(item)]
    if not done:
        _append({"event": "collected", "shard": index, "count": len(mine)})
    keep = [item for item in mine if item.nodeid not in done]
    kept = set(map(id, keep))
    dropped = [item for item in items if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if os.environ.get(RESULTS_ENV):
        _append({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report: Any) -> None:
    global _restart_pending
    if not os.environ.get(RESULTS_ENV):
        return
    record: dict[str, Any] = {
        "event": report.when,
        "nodeid": report.nodeid,
        "outcome": report.outcome,
        "duration": round(report.duration, 4),
    }
    if hasattr(report, "wasxfail"):
        record["xfail"] = True
    if report.failed:
        text = report.longreprtext
        record["longrepr"] = text if len(text) <= TRACEBACK_LIMIT else text[:2000] + "\n[...]\n" + text[-9000:]
        _restart_pending = _restart_pending or bool(_STICKY_CUDA.search(text))
    elif report.skipped and isinstance(report.longrepr, tuple):
        record["reason"] = str(report.longrepr[2])
    _append(record)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    if not os.environ.get(RESULTS_ENV):
        return
    _append({"event": "finish", "nodeid": nodeid})
    if _restart_pending:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(RESTART_EXIT)  # this process's CUDA context is broken: the runner starts a fresh one


def summarize_tests(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Fold the plugin's records into one result per test: counts, failures with their tracebacks, crashes."""
    tests: dict[str, dict[str, Any]] = {}
    collected = 0
    for r in records:
        event = r.get("event")
        if event == "collected":
            collected += r["count"]
            continue
        t = tests.setdefault(r["nodeid"], {"nodeid": r["nodeid"], "outcome": "crashed", "duration": 0.0})
        if event == "start" or event == "finish":
            t["finished"] = t.get("finished", False) or event == "finish"
            continue
        t["duration"] += r.get("duration", 0.0)
        if r["outcome"] == "failed":
            t["outcome"] = "failed" if event == "call" else "error"
            t["longrepr"] = t.get("longrepr", "") + (f"[{event}]\n" if event != "call" else "") + r["longrepr"]
        elif t["outcome"] in ("failed", "error"):
            continue  # a teardown after a failure does not undo it
        elif r["outcome"] == "skipped":
            t["outcome"] = "xfailed" if r.get("xfail") else "skipped"
            t["reason"] = r.get("reason", "")
        elif event == "call":
            t["outcome"] = "xpassed" if r.get("xfail") else "passed"
    for t in tests.values():
        if not t.pop("finished", False) and t["outcome"] not in ("failed", "error"):
            t["outcome"] = "crashed"
            t["longrepr"] = "The test process died during this test (see tests.log); later tests ran in a new one."
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    bad = [t for t in tests.values() if t["outcome"] in ("failed", "error", "crashed", "xpassed")]
    skipped: dict[str, int] = {}
    for t in tests.values():
        if t["outcome"] == "skipped":
            skipped[t.get("reason", "")] = skipped.get(t.get("reason", ""), 0) + 1
    slowest = sorted(tests.values(), key=lambda t: -t["duration"])[:15]
    return {
        "collected": collected,
        "ran": len(tests),
        "not_run": max(0, collected - len(tests)),
        "counts": dict(sorted(counts.items())),
        "failures": [{k: t.get(k) for k in ("nodeid", "outcome", "duration", "longrepr")} for t in bad],
        "skip_reasons": dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
        "slowest": [{"nodeid": t["nodeid"], "duration": round(t["duration"], 2)} for t in slowest],
    }


# ---------------------------------------------------------------------------------------------------------
# The crossover writer


def _field(mode: str, batch: int, small_batch: int) -> str:
    if mode == "fwdbwd":
        return "training"
    return "small_batch" if batch <= small_batch else "inference"


TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CROSSOVER_FIELDS = ("inference", "small_batch", "training")


def measured_crossovers(sweep: dict[str, Any]) -> dict[str, Any]:
    """The density crossovers that one recorded ``sparsekern bench linear`` JSON measured, per dtype and field of
    ``Crossover`` (inference: fwd at B > SMALL_BATCH; small_batch: fwd at B <= SMALL_BATCH; training: fwdbwd).

    A (shape, B) group's crossover is the density of the smallest swept sparsity from which the sparse path beats
    dense at every larger swept one (its ``crossover`` entry), rounded up to 1e-4 so that weights at that
    sparsity pass ``index.density <= crossover``; 0.0 when sparse never beats dense. A field takes the smallest
    over its groups (auto then picks the sparse path only where it won on every shape and batch measured), None
    when nothing measured it.
    """
    from .ops.sparse_linear import SMALL_BATCH

    density: dict[tuple, float] = {}
    for r in sweep.get("rows", []):
        key = (r["label"], r["batch"], r["dtype"], r["mode"], r["sparsity"])
        density[key] = max(density.get(key, 0.0), r["density"])
    groups = []
    for c in sweep.get("crossover", []):
        if not c["measured"]:
            value = None
        elif c["beats_dense_from"] is None:
            value = 0.0
        else:
            d = density.get((c["shape"], c["batch"], c["dtype"], c["mode"], c["beats_dense_from"]))
            d = 1.0 - c["beats_dense_from"] if d is None else d
            value = min(1.0, math.ceil(round(d * 1e4, 6)) / 1e4)
        groups.append({**{k: c[k] for k in ("shape", "batch", "dtype", "mode")}, "crossover": value})
        groups[-1]["field"] = _field(c["mode"], c["batch"], SMALL_BATCH)
    table: dict[str, dict[str, float | None]] = {}
    for g in groups:
        fields = table.setdefault(g["dtype"], dict.fromkeys(CROSSOVER_FIELDS))
        if g["crossover"] is not None:
            old = fields[g["field"]]
            fields[g["field"]] = g["crossover"] if old is None else min(old, g["crossover"])
    return {
        "backend": sweep.get("backend"),
        "device": sweep.get("device"),
        "small_batch": SMALL_BATCH,
        "table": table,
        "groups": groups,
        "current": sweep.get("density_crossover", {}),
    }


def crossover_snippet(measured: dict[str, Any], environment: dict[str, Any] | None = None) -> str:
    """Python lines for ``DENSITY_CROSSOVER`` (sparsekern/ops/sparse_linear.py): one ("cuda", dtype) entry per
    measured dtype; a field no case measured keeps the table's current value and says so."""
    env = environment or {}
    lines = [
        f"# Measured by `sparsekern selftest --gpu` with `sparsekern bench linear --backend {measured['backend']}` "
        f"on {env.get('gpu') or 'an unnamed GPU'}",
        f"# (torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, {env.get('date', 'undated')}): the "
        "largest density at which the sparse path beat dense on every shape and batch swept.",
        '# Replace the ("cuda", ...) entries of DENSITY_CROSSOVER in sparsekern/ops/sparse_linear.py with:',
    ]
    if measured["device"] != "cuda":
        lines.append(f"# NOT a CUDA sweep (device {measured['device']!r}): these numbers are not CUDA crossovers.")
    for dtype, fields in measured["table"].items():
        torch_name = TORCH_DTYPE.get(dtype, dtype)
        current = measured["current"].get(f"cuda:{torch_name}", {})
        values, kept = [], []
        for name in CROSSOVER_FIELDS:
            value = fields.get(name)
            if value is None:
                value = current.get(name)
                kept.append(name)
            values.append(f"{name}={value!r}")
        note = f"  # not measured, kept: {', '.join(kept)}" if kept else ""
        lines.append(f'    ("cuda", torch.{torch_name}): Crossover({", ".join(values)}),{note}')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The report writer


def _cap(text: str, limit: int = FILE_LIMIT) -> str:
    """``text`` cut in the middle to at most ``limit`` bytes of UTF-8, saying how much was left out."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    keep = limit // 2 - 200
    cut = len(data) - 2 * keep
    return (
        data[:keep].decode("utf-8", errors="ignore")
        + f"\n\n[... {cut} bytes left out to keep this file under {limit} bytes ...]\n\n"
        + data[-keep:].decode("utf-8", errors="ignore")
    )


def _fence(text: str) -> str:
    return "```\n" + text.replace("```", "`` `") + "\n```"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the verdict, the machine, each stage's time, every test failure with its traceback, every figure."""
    env = report.get("environment", {})
    verdict = "PASSED" if report["exit_code"] == EXIT_OK else "FAILED"
    parts = [
        f"# sparsekern GPU check: {verdict}",
        "",
        f"`{report.get('command', 'sparsekern selftest --gpu')}` on {env.get('gpu', '?')} (compute capability "
        f"{env.get('gpu_capability', '?')}, driver {env.get('driver', '?')}), {report.get('elapsed_s', 0):.0f} s "
        f"of a {report.get('budget_s', 0):.0f} s budget{' (--quick)' if report.get('quick') else ''}.",
        "",
    ]
    parts += [f"- FAILED: {reason}" for reason in report.get("problems", [])] or ["- every stage passed"]
    parts += [f"- note: {warning}" for warning in report.get("warnings", [])]
    parts += ["", "## Machine and versions", ""]
    parts += _table(["what", "value"], [[k, v] for k, v in env.items()])
    parts += ["", "## Stages", ""]
    parts += _table(
        ["stage", "status", "seconds", "limit", "detail"],
        [
            [
                s["name"],
                s["status"],
                f"{s['elapsed_s']:.1f}",
                f"{s['limit_s']:.0f}" if s.get("limit_s") else "-",
                s["detail"],
            ]
            for s in report.get("stages", [])
        ],
    )
    build = report.get("build")
    if build:
        parts += ["", "## Build", ""]
        parts += [f"- {k}: {v}" for k, v in build.items() if k != "log_tail"]
        if build.get("log_tail"):
            parts += ["", "Last lines of build.log:", "", _fence(build["log_tail"])]
    tests = report.get("tests")
    if tests:
        parts += ["", "## Tests", ""]
        counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items()) or "none ran"
        parts.append(f"{tests['collected']} selected, {tests['ran']} ran: {counts}; not run: {tests['not_run']}.")
        if tests["skip_reasons"]:
            parts += ["", "Skipped, by reason:", ""]
            parts += [f"- {n}x {reason or '(no reason)'}" for reason, n in tests["skip_reasons"].items()]
        for f in tests["failures"]:
            parts += ["", f"### {f['outcome'].upper()}: `{f['nodeid']}`", "", _fence(f.get("longrepr") or "")]
        if tests["slowest"]:
            parts += [
                "",
                "Slowest tests (s): " + ", ".join(f"`{t['nodeid']}` {t['duration']}" for t in tests["slowest"]),
            ]
    crossover = report.get("crossover")
    if crossover:
        parts += ["", "## Measured CUDA density crossovers (for ops/sparse_linear.py)", ""]
        for m in crossover.get("measured", []):
            parts += [f"Backend `{m['backend']}` (per dtype: the smallest over the shapes and batches swept):", ""]
            parts += _table(
                ["dtype", *CROSSOVER_FIELDS],
                [[d, *(f.get(n) for n in CROSSOVER_FIELDS)] for d, f in m["table"].items()],
            )
            parts.append("")
        if crossover.get("snippet"):
            parts += ["To land (also in density_crossover.py):", "", "```python", crossover["snippet"].rstrip(), "```"]
    for name, bench in report.get("benches", {}).items():
        parts += [
            "",
            f"## bench {name}: {bench['status']} ({bench['elapsed_s']:.1f} s)",
            "",
            f"`{bench['command']}`",
            "",
        ]
        if bench.get("markdown"):
            parts.append(re.sub(r"^(#+) ", r"##\1 ", bench["markdown"], flags=re.MULTILINE))  # nest its headings
        elif bench.get("output_tail"):
            parts.append(_fence(bench["output_tail"]))
    return "\n".join(parts) + "\n"


def _fit_json(report: dict[str, Any], limit: int) -> str:
    """report.json under ``limit`` bytes: first the benches' raw rows go (their tables stay in report.md), then the
    failures' tracebacks are shortened."""
    text = json.dumps(report, indent=1, default=str)
    if len(text.encode()) <= limit:
        return text
    for bench in report.get("benches", {}).values():
        if isinstance(bench.get("data"), dict) and "rows" in bench["data"]:
            bench["data"]["rows"] = f"left out to fit {limit} bytes; the tables are in report.md"
    for f in report.get("tests", {}).get("failures", []):
        if f.get("longrepr") and len(f["longrepr"]) > 1500:
            f["longrepr"] = f["longrepr"][:300] + "\n[...]\n" + f["longrepr"][-1200:]
    text = json.dumps(report, indent=1, default=str)
    return text if len(text.encode()) <= limit else _cap(text, limit)


def write_report(out: str | Path, report: dict[str, Any], files: dict[str, str] | None = None) -> list[Path]:
    """Write ``report.md``, ``report.json`` and the extra text ``files`` (name -> text) into ``out``, each cut to
    stay under 16 MiB, and remove what an earlier run left under this module's file names; returns the paths.
    At most :data:`MAX_FILES` files in all (a ValueError otherwise: the lease can carry no more)."""
    files = dict(files or {})
    if len(files) + 2 > MAX_FILES:
        raise ValueError(f"write_report: at most {MAX_FILES} files, got {len(files) + 2}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    texts = {"report.md": _cap(render_markdown(report)), "report.json": _fit_json(report, FILE_LIMIT) + "\n"}
    texts.update({name: _cap(text) for name, text in files.items()})
    paths = []
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths


# ---------------------------------------------------------------------------------------------------------
# The stages


@dataclass
class Clock:
    """The run's budget: every stage's limit is cut from what is left of it."""

    budget: float
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def _stage_line(clock: Clock, text: str) -> None:
    print(f"== [{clock.elapsed():6.1f} s] {text}", flush=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: pytest's or the build's children too
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run(cmd: Sequence[str], *, cwd: Path, env: dict[str, str], limit: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` with its output appended to ``log``; (exit code or None when killed at ``limit``, seconds)."""
    start = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    return rc, time.monotonic() - start


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env(repo: Path, **extra: str) -> dict[str, str]:
    """The environment of the stages' processes: this checkout first on the path, Triton compiled."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def build_stage(repo: Path, python: str, arch: str, jobs: int, limit: float, log: Path) -> dict[str, Any]:
    """Build the extension in place for ``arch``; check that it loads with its CUDA kernels for that arch."""
    for old in (repo / "sparsekern").glob("_C*.so"):
        old.unlink()  # never rewrite a library a process may have mapped
    ninja = shutil.which("ninja") is not None
    env = child_env(repo, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs), SPARSEKERN_BUILD_CUDA="1")
    rc, seconds = _run([python, "setup.py", "build_ext", "--inplace"], cwd=repo, env=env, limit=limit, log=log)
    result: dict[str, Any] = {
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": jobs,
        "ninja": "found" if ninja else "NOT found: torch compiles the sources one after another (MAX_JOBS unused)",
        "seconds": round(seconds, 1),
        "exit_code": rc,
    }
    info: dict[str, Any] = {}
    if rc == 0:
        probe = "import json, sparsekern; print(json.dumps(sparsekern._extension.build_info()))"
        proc = subprocess.run([python, "-c", probe], cwd=repo, env=child_env(repo), capture_output=True, text=True)
        try:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            info = {"loaded": False, "reason": proc.stderr.strip()[-2000:]}
    result["extension"] = info
    archs = str(info.get("cuda_archs", ""))
    if rc is None:
        result["problem"] = f"the build ran past its {limit:.0f} s limit"
    elif rc != 0:
        result["problem"] = f"the build failed (exit code {rc}; see build.log)"
    elif not info.get("loaded"):
        result["problem"] = f"the built extension does not load: {info.get('reason')}"
    elif not info.get("with_cuda"):
        result["problem"] = "the extension was built without its CUDA sources (no CUDA toolkit found? see build.log)"
    elif arch.replace(".", "") not in archs.replace(".", ""):
        result["problem"] = f"the extension's CUDA archs {archs!r} lack the GPU's {arch}"
    result["log_tail"] = _tail(log)
    return result


def tests_stage(
    repo: Path, python: str, jobs: int, gpu_only: bool, limit: float, work: Path, log: Path, pytest_args: Sequence[str]
) -> dict[str, Any]:
    """Run the test suite in ``jobs`` pytest processes (each a shard), restarting a shard that died after the test
    it died in, until all are done or ``limit`` seconds have passed; returns :func:`summarize_tests`'s summary."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    deadline = time.monotonic() + limit
    cmd = [python, "-m", "pytest", "-p", "sparsekern.selftest", "-p", "no:cacheprovider", "-q", "--tb=long"]
    cmd += list(pytest_args) or ["tests"]
    shards: dict[int, dict[str, Any]] = {}

    def start(i: int) -> None:
        env = child_env(
            repo,
            **{RESULTS_ENV: str(work / f"results-{i}.jsonl"), SHARD_ENV: f"{i}/{jobs}", "OMP_NUM_THREADS": threads},
        )
        env.pop(GPU_ONLY_ENV, None)  # a surrounding run's (this stage runs inside the suite's own tests too)
        if gpu_only:
            env[GPU_ONLY_ENV] = "1"
        out = open(work / f"shard-{i}.log", "ab")  # noqa: SIM115 -- closed when the shard ends
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        shards[i] = {**shards.get(i, {"restarts": -1}), "proc": proc, "out": out}
        shards[i]["restarts"] += 1

    for i in range(jobs):
        start(i)
    timed_out, exits = False, {}
    while any(s["proc"] is not None for s in shards.values()):
        time.sleep(0.2)
        for i, s in shards.items():
            proc = s["proc"]
            if proc is None or proc.poll() is None:
                continue
            s["out"].close()
            s["proc"] = None
            exits.setdefault(i, []).append(proc.returncode)
            # 0 passed, 1 some failed, 5 nothing to run; anything else (a crash, RESTART_EXIT) leaves tests to run
            if proc.returncode not in (0, 1, 5) and s["restarts"] < MAX_RESTARTS and time.monotonic() < deadline:
                start(i)
        if time.monotonic() > deadline:
            for s in shards.values():
                if s["proc"] is not None:
                    _kill(s["proc"])
                    s["out"].close()
                    s["proc"] = None
                    timed_out = True
    records = [r for i in range(jobs) for r in read_records(work / f"results-{i}.jsonl")]
    summary = summarize_tests(records)
    summary.update(jobs=jobs, gpu_only=gpu_only, timed_out=timed_out, shard_exit_codes=exits, command=" ".join(cmd))
    with open(log, "ab") as f:
        for i in range(jobs):
            f.write(f"\n===== shard {i}/{jobs} (exit codes {exits.get(i)}) =====\n".encode())
            shard_log = work / f"shard-{i}.log"
            if shard_log.exists():
                f.write(shard_log.read_bytes())
    return summary


@dataclass(frozen=True)
class Sweep:
    """One ``sparsekern bench`` run of the sweeps stage: its name in the report, its arguments, its share of
    the time left, and which exit codes mean a wrong result."""

    name: str
    args: tuple[str, ...]
    share: float
    json_name: str


_SEMI24_SHAPES = ("10240x3072", "768x3072", "3072x768", "1024x4096", "4096x1024", "4096x11008", "11008x4096")
_LINEAR_SPARSITIES = ("0.5", "0.7", "0.8", "0.9", "0.95", "0.98", "0.99")


def _repeat(option: str, values: Iterable[str]) -> tuple[str, ...]:
    return tuple(part for value in values for part in (option, value))


def sweep_plan(quick: bool) -> list[Sweep]:
    """The GPU sweeps, sized for the budget: the issue's shapes, batches and dtypes, few rounds each."""
    if quick:
        semi24 = (
            _repeat("--shape", ("10240x3072", "4096x11008"))
            + _repeat("--batch", ("1", "64", "2048"))
            + _repeat("--dtype", ("fp16", "bf16"))
        )
        linear = (
            ("--quick", "--shape", "4096x4096")
            + _repeat("--batch", ("256", "2048"))
            + _repeat("--sparsity", ("0.5", "0.9", "0.95", "0.99"))
        )
        grow: tuple[tuple[str, ...], ...] = (("--quick", "--backend", "triton"),)
    else:
        semi24 = _repeat("--shape", _SEMI24_SHAPES) + _repeat("--batch", ("1", "16", "64", "256", "2048"))
        linear = (
            ("--quick", "--repeat", "5", "--max-time", "0.5")  # --quick: its timing settings; the axes are given
            + _repeat("--shape", ("768x3072", "4096x4096"))
            + _repeat("--batch", ("16", "256", "2048"))
            + _repeat("--sparsity", _LINEAR_SPARSITIES)
        )
        grow = (("--backend", "triton", "--repeat", "3"), ("--backend", "cuda", "--repeat", "3"))
    linear += _repeat("--dtype", ("fp32", "bf16")) + _repeat("--mode", ("fwd", "fwdbwd"))
    plan = [
        Sweep("semi24", ("semi24", "--repeat", "3", *semi24, *_repeat("--backend", ("triton", "cuda"))), 3.0, "semi24")
    ]
    plan += [Sweep(f"linear-{b}", ("linear", "--backend", b, *linear), 2.0, "linear") for b in ("triton", "cuda")]
    plan += [Sweep(f"grow-{g[g.index('--backend') + 1]}", ("grow", "--dtype", "fp32", *g), 2.0, "grow") for g in grow]
    return plan


def sweeps_stage(
    repo: Path, python: str, plan: Sequence[Sweep], clock: Clock, work: Path, log: Path
) -> dict[str, dict[str, Any]]:
    """Run each sweep in its own process with its share of the time left; read back its JSON and markdown."""
    results: dict[str, dict[str, Any]] = {}
    for n, sweep in enumerate(plan):
        shares = sum(s.share for s in plan[n:])
        limit = max(20.0, clock.left() * sweep.share / shares)
        out = work / sweep.name
        cmd = [python, "-m", "sparsekern", "bench", *sweep.args, "--out", str(out)]
        _stage_line(clock, f"sweep {sweep.name} (limit {limit:.0f} s)")
        rc, seconds = _run(cmd, cwd=repo, env=child_env(repo), limit=limit, log=log)
        result: dict[str, Any] = {"command": " ".join(["sparsekern", "bench", *sweep.args]), "exit_code": rc}
        result["elapsed_s"] = round(seconds, 1)
        json_path, md_path = out / f"{sweep.json_name}.json", out / f"{sweep.json_name}.md"
        if json_path.exists():
            result["data"] = json.loads(json_path.read_text())
            result["markdown"] = md_path.read_text() if md_path.exists() else ""
        if rc is None:
            result["status"] = f"timed out at {limit:.0f} s (no figures)"
        elif rc == 0:
            result["status"] = "ok"
        else:
            result["status"] = f"FAILED (exit code {rc})"
            result["output_tail"] = _tail(log, 40)
        print(f"   {sweep.name}: {result['status']} in {seconds:.1f} s", flush=True)
        results[sweep.name] = result
    return results


SWEEP_FAILURES = {
    "semi24": "a 2:4 conversion failed or was not bit-identical to torch's",
    "linear": "a sparse_linear call failed or was more than 2x less accurate than dense",
    "grow": "the grow benchmark failed",
}


# ---------------------------------------------------------------------------------------------------------
# The command


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_selftest_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import positive_int

    parser.add_argument(
        "--gpu", action="store_true", required=True, help="the GPU check (the only self-test): build, tests, sweeps"
    )
    parser.add_argument(
        "--out", default="bench-results/gpu-check", help="directory for the report (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="GPU tests only and smaller sweeps: under 3 minutes")
    parser.add_argument(
        "--budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="the time the whole run may take; stages are cut to fit it (default: 420, or 180 with --quick)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        metavar="N",
        help="pytest processes running the suite side by side (default: a quarter of the cores, 1 to 4)",
    )
    parser.add_argument("--no-build", action="store_true", help="use the extension built already (skip the build)")
    parser.add_argument("--no-sweeps", action="store_true", help="build and test only")
    parser.add_argument(
        "--arch", default=None, help="TORCH_CUDA_ARCH_LIST for the build (default: the visible GPU's, e.g. 9.0)"
    )
    parser.add_argument(
        "pytest_args", nargs="*", metavar="PYTEST_ARG", help="after --: what pytest runs (default: tests)"
    )


def _environment(python: str) -> dict[str, Any]:
    import torch

    from .bench import harness

    env = harness.environment(gpu=True)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown (no nvidia-smi)"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30).stdout
        nvcc = nvcc.strip().splitlines()[-1] if nvcc.strip() else "not found"
    except (OSError, subprocess.SubprocessError):
        nvcc = "not found on PATH"
    env.update(driver=driver, nvcc=nvcc, python_executable=python)
    env["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env.pop("extension_cpu_isa", None)  # the parent's, from before the build; the build stage reports the new one
    return env


def run_selftest(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern selftest --gpu``."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"sparsekern selftest: --out {args.out} is a file, not a directory", file=sys.stderr)
        return EXIT_NO_GPU
    import torch

    if not torch.cuda.is_available():
        seen = f"torch {torch.__version__}, " + (
            f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build of torch"
        )
        print(NO_GPU_MESSAGE.format(seen=seen), file=sys.stderr)
        return EXIT_NO_GPU
    clock = Clock(args.budget or BUDGET[args.quick])
    repo = Path(__file__).resolve().parents[1]
    python = sys.executable
    major, minor = torch.cuda.get_device_capability()
    arch = args.arch or f"{major}.{minor}"
    cores = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(4, cores // 4))
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(python)
    _stage_line(clock, f"sparsekern GPU check on {env['gpu']} (sm_{major}{minor}), budget {clock.budget:.0f} s")
    report: dict[str, Any] = {
        "command": "sparsekern " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "budget_s": clock.budget,
        "environment": env,
        "stages": [],
        "problems": [],  # each one fails the run
        "warnings": [],  # reported, but no result was wrong
    }
    files: dict[str, str] = {}
    reserve = 0.0 if args.no_sweeps else SWEEP_RESERVE[args.quick]
    with tempfile.TemporaryDirectory(prefix="sparsekern-selftest-") as tmp:
        work = Path(tmp)

        def stage(name: str, status: str, seconds: float, limit: float | None, detail: str) -> None:
            report["stages"].append(
                {"name": name, "status": status, "elapsed_s": round(seconds, 1), "limit_s": limit, "detail": detail}
            )
            _stage_line(clock, f"{name}: {status} in {seconds:.1f} s{' -- ' + detail if detail else ''}")

        if not (repo / "setup.py").exists():
            report["problems"].append(f"{repo} is not a source checkout (no setup.py): cannot build or test")
        elif args.no_build:
            stage("build", "skipped", 0.0, None, "--no-build: the extension built already")
        else:
            limit = max(60.0, clock.left() - reserve - (45.0 if args.quick else 90.0))
            _stage_line(clock, f"build for TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={cores} (limit {limit:.0f} s)")
            build = build_stage(repo, python, arch, cores, limit, work / "build.log")
            report["build"] = build
            files["build.log"] = (work / "build.log").read_text(errors="replace")
            stage("build", "FAILED" if "problem" in build else "ok", build["seconds"], limit, build.get("problem", ""))
            if "problem" in build:
                report["problems"].append(build["problem"])
        if (repo / "setup.py").exists():
            limit = max(60.0, clock.left() - reserve)
            what = "GPU tests" if args.quick else "the whole test suite"
            _stage_line(clock, f"tests: {what}, {jobs} pytest processes, compiled Triton (limit {limit:.0f} s)")
            start = time.monotonic()
            tests = tests_stage(repo, python, jobs, args.quick, limit, work, work / "tests.log", args.pytest_args)
            report["tests"] = tests
            files["tests.log"] = (work / "tests.log").read_text(errors="replace")
            counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items())
            bad = len(tests["failures"])
            status = "ok" if not bad and not tests["not_run"] and tests["ran"] else "FAILED"
            stage("tests", status, time.monotonic() - start, limit, f"{counts}; not run: {tests['not_run']}")
            if bad:
                report["problems"].append(f"{bad} tests failed, errored or crashed (tracebacks below)")
            if tests["not_run"]:
                why = "the stage ran out of time" if tests["timed_out"] else "their process died"
                report["problems"].append(f"{tests['not_run']} tests did not run: {why}")
            if not tests["ran"]:
                report["problems"].append("no test ran")
        if not args.no_sweeps:
            start = time.monotonic()
            benches = sweeps_stage(repo, python, sweep_plan(args.quick), clock, work, work / "bench.log")
            report["benches"] = benches
            files["bench.log"] = (work / "bench.log").read_text(errors="replace")
            for name, bench in benches.items():
                if bench["exit_code"] not in (0, None):
                    report["problems"].append(f"bench {name}: {SWEEP_FAILURES[name.split('-')[0]]}")
            timed_out = [n for n, b in benches.items() if b["exit_code"] is None]
            if timed_out:
                report["warnings"].append(f"sweeps cut by the budget, without figures: {', '.join(timed_out)}")
            sweeps = [b["data"] for n, b in benches.items() if n.startswith("linear") and "data" in b]
            if sweeps:
                measured = [measured_crossovers(s) for s in sweeps]
                chosen = next((m for m in measured if m["backend"] == "triton"), measured[0])
                snippet = crossover_snippet(chosen, env)
                report["crossover"] = {"measured": measured, "snippet": snippet, "snippet_backend": chosen["backend"]}
                files["density_crossover.py"] = snippet
            status = "ok" if all(b["status"] == "ok" for b in benches.values()) else "incomplete or failed"
            stage(
                "sweeps",
                status,
                time.monotonic() - start,
                None,
                ", ".join(f"{n}: {b['status']}" for n, b in benches.items()),
            )
    report["exit_code"] = EXIT_FAILED if report["problems"] else EXIT_OK
    report["elapsed_s"] = round(clock.elapsed(), 1)
    report["stage_seconds"] = {s["name"]: s["elapsed_s"] for s in report["stages"]}
    paths = write_report(out, report, files)
    _stage_line(
        clock, f"done: {'PASSED' if report['exit_code'] == EXIT_OK else 'FAILED'}; wrote {', '.join(map(str, paths))}"
    )
    for problem in report["problems"] + report["warnings"]:
        print(f"   - {problem}", flush=True)
    return report["exit_code"]
