"""``sparsekern bench linear``: the sparse linear layer against dense, torch's CSR matmul and SparseProp.

Every case (shape x batch x sparsity x dtype x mode) times five implementations of ``y = x @ W.T`` for a
random unstructured sparse ``W`` (no bias):

* ``sparse``: ``sparse_linear(x, values, index, path="sparse")`` on the chosen backend (for CPU tensors the
  C++ kernels);
* ``auto``: ``path="auto"``, what :class:`sparsekern.nn.SparseLinear` runs: the sparse kernels, or below the
  measured density crossover (``DENSITY_CROSSOVER``) a dense GEMM on the scattered weight; every row says
  which path it took;
* ``dense``: ``F.linear`` on the masked dense weight, the baseline of every speedup;
* ``torch CSR``: ``torch.sparse.mm(W.to_sparse_csr(), x.T).T``;
* ``SparseProp``: ``sparseprop.modules.SparseLinear`` (fp32 on the CPU only), when the package is installed.

Mode ``fwd`` is inference: the forward without autograd, on weights that do not change between calls. Mode
``fwdbwd`` is the forward, then ``torch.autograd.grad`` of the output with a fixed random output gradient: dX and
the weight gradient (dense: the full (n_out, n_in) dW; sparsekern and SparseProp: only at the nonzeros; CSR:
torch's CSR gradient). As in training, sparsekern's values change between these calls (negated in place after
each, inside the timed region), so the dense path rewrites its whole workspace every time. Every result is
compared with a float64 computation; ``ok`` means sparsekern's error is at most twice dense's own error in the same
dtype (the flash-attention rule).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import _extension
from .._csr import CSRIndex
from ..ops import _backend
from ..ops.sparse_linear import DENSITY_CROSSOVER, DenseWorkspace, choose_path, density_crossover, sparse_linear
from . import harness

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward (dX, dW at the nonzeros)"}
IMPLS = ("dense", "sparse", "auto", "torch_csr", "sparseprop")  # the keys of every row's "results", in timing order
QUANTITIES = {"fwd": ("y",), "fwdbwd": ("y", "dX", "dW")}

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
BASELINES_FROM = 0.8  # faster than torch CSR and SparseProp at every sparsity >= 80%

SPARSEPROP_MISSING = "SparseProp: not installed (pip install --no-build-isolation sparseprop scipy pybind11)"


@dataclass(frozen=True)
class Grid:
    """The sweep: shapes are (in_features, out_features), the weight of ``nn.Linear(in, out)``."""

    shapes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    sparsities: tuple[float, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]

    def cases(self) -> list[tuple[tuple[int, int], int, float, str, str]]:
        """(shape, batch, sparsity, dtype, mode) in the order they run: one weight and input per
        (shape, batch, sparsity), shared by its dtypes and modes; sparsest first, so a baseline that is already
        hopeless at a high sparsity is not timed at the lower ones (see :func:`run_case`)."""
        return [
            (shape, batch, sparsity, dtype, mode)
            for shape in self.shapes
            for batch in self.batches
            for sparsity in sorted(self.sparsities, reverse=True)
            for dtype in self.dtypes
            for mode in self.modes
        ]


FULL = Grid(
    shapes=((768, 3072), (3072, 768), (4096, 4096)),
    batches=(256, 2048),
    sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
    dtypes=tuple(DTYPES),
    modes=MODES,
)
# Odd sizes (not multiples of any tile), a batch that is not a multiple of 64: a smoke run of seconds.
QUICK = Grid(shapes=((64, 96),), batches=(8, 70), sparsities=(0.5, 0.9, 0.98), dtypes=("fp32", "bf16"), modes=MODES)


@dataclass(frozen=True)
class Settings:
    """How hard to measure the functions of one case (all times in seconds); see :func:`time_interleaved`.

    repeat: rounds (at least 3 unless ``repeat`` is smaller); a function leaves once its rounds total
        ``max_time``, so multi-second calls do not dominate the run.
    min_time: what ``repeat`` rounds of one function take at least: a round repeats a fast call for
        ``min_time / repeat`` and counts the median.
    slow_factor: a first call of at least ``max_time`` and ``slow_factor`` times dense's is the only sample
        (it has lost to dense whatever the noise); a first call of ``max_time`` without that is one of two
        (:func:`warm_up_process` has paid the process's one-time costs before).
    """

    repeat: int = 5
    max_time: float = 1.0
    min_time: float = 0.05
    slow_factor: float = 2.0


def label(shape: Sequence[int]) -> str:
    return f"{shape[0]}->{shape[1]}"


def failure(exc: BaseException, limit: int = 120) -> str:
    """One line for a table cell: ``failed: Type: first line of the message``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return "failed: " + (text if len(text) <= limit else text[: limit - 3] + "...")


def sparseprop_class() -> tuple[type | None, str]:
    """SparseProp's SparseLinear if it can be imported, and a note saying what was found."""
    try:
        from sparseprop.modules import SparseLinear
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "sparseprop":
            return None, SPARSEPROP_MISSING
        return None, f"SparseProp: installed but not importable ({failure(exc)[8:]})"
    except Exception as exc:  # noqa: BLE001 -- a broken optional extra must not stop the benchmark
        return None, f"SparseProp: installed but not importable ({failure(exc)[8:]})"
    from importlib import metadata

    try:
        version = metadata.version("sparseprop")
    except metadata.PackageNotFoundError:
        version = "unknown version"
    return SparseLinear, f"SparseProp: sparseprop {version} (its SparseLinear; fp32 on the CPU only)"


# ---------------------------------------------------------------------------------------------------------
# One weight and its inputs


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    # Values that fp32 and bf16 hold exactly, so both dtypes see the same numbers and share one reference.
    return t.to(torch.bfloat16).float()


class Problem:
    """A random (n_out, n_in) weight at ``sparsity`` (exact nnz, uniform positions), x (B, n_in) and an output
    gradient (B, n_out), all fp32 holding bf16-exact values, with float64 references computed on first use."""

    def __init__(self, shape: tuple[int, int], batch: int, sparsity: float, device: str, seed: int = 0):
        n_in, n_out = shape
        gen = torch.Generator().manual_seed(seed)
        numel = n_in * n_out
        nnz = int(round((1.0 - sparsity) * numel))
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=gen)[:nnz]] = True
        self.index = CSRIndex.from_mask(mask.view(n_out, n_in).to(device))
        bound = 1.0 / math.sqrt(n_in)
        values = _bf16_exact((torch.rand(nnz, generator=gen) * 2 - 1) * bound)
        # SparseProp reads the nonzeros off the dense weight: a value of exactly 0 would drop out of its CSR.
        self.values = torch.where(values == 0, torch.full_like(values, bound), values).to(device)
        self.x = _bf16_exact(torch.randn(batch, n_in, generator=gen)).to(device)
        self.grad = _bf16_exact(torch.randn(batch, n_out, generator=gen)).to(device)
        self.shape, self.batch, self.sparsity = shape, batch, sparsity
        self._ref: dict[str, torch.Tensor] = {}

    def reference(self, mode: str) -> dict[str, torch.Tensor]:
        if "y" not in self._ref:
            w = self.index.to_dense(self.values.double())
            self._ref["y"] = self.x.double() @ w.T
        if mode == "fwdbwd" and "dX" not in self._ref:
            g, x = self.grad.double(), self.x.double()
            self._ref["dX"] = g @ self.index.to_dense(self.values.double())
            self._ref["dW"] = (g.T @ x)[self.index.rows(), self.index.col_idx.long()]
        return {q: self._ref[q] for q in QUANTITIES[mode]}


# ---------------------------------------------------------------------------------------------------------
# The implementations. Each builder returns (fn, extract): fn() does the timed work and returns raw outputs,
# extract(outputs) gives {"y", "dX", "dW" at the nonzeros in CSR order} for the correctness check.

Fn = Callable[[], Any]
Extract = Callable[[Any], dict[str, torch.Tensor]]


def _no_grad(fn: Fn) -> Fn:
    def call():
        with torch.no_grad():
            return fn()

    return call


def _grads(mode: str, forward: Callable[[torch.Tensor, Any], torch.Tensor], x, param, grad) -> Fn:
    """fwd: ``forward(x, param)`` without autograd; fwdbwd: also grad wrt x and param from ``grad``."""
    if mode == "fwd":
        return _no_grad(lambda: (forward(x, param),))
    xr = x.detach().requires_grad_()

    def fn():
        y = forward(xr, param)
        gx, gp = torch.autograd.grad(y, (xr, param), grad)
        return y.detach(), gx, gp

    return fn


def _as_dict(mode: str, to_values: Callable[[Any], torch.Tensor] | None = None) -> Extract:
    def extract(out):
        if mode == "fwd":
            return {"y": out[0]}
        return {"y": out[0], "dX": out[1], "dW": out[2] if to_values is None else to_values(out[2])}

    return extract


def build_sparsekern(p: Problem, x, values, grad, mode: str, backend: str, path: str) -> tuple[Fn, Extract]:
    # sparse_linear is looked up when called, so a test can replace it in this module. The workspace is what
    # SparseLinear keeps for the dense path (one dense weight per topology, only its nonzeros rewritten per call).
    workspace = DenseWorkspace()
    forward = lambda xx, vv: sparse_linear(xx, vv, p.index, backend=backend, path=path, workspace=workspace)  # noqa: E731
    if mode == "fwd":  # inference: the weights do not change between calls
        return _grads(mode, forward, x, values, grad), _as_dict(mode)
    param = values.detach().clone().requires_grad_()  # its own copy: the values are shared by other cases
    step = _grads(mode, forward, x, param, grad)

    def training_step():  # as an optimizer step would, change every value after each call (timed, against us)
        out = step()
        with torch.no_grad():
            param.neg_()
        return out

    return training_step, _as_dict(mode)


def build_dense(p: Problem, x, w, grad, mode: str) -> tuple[Fn, Extract]:
    param = w if mode == "fwd" else w.detach().requires_grad_()
    rows, cols = p.index.rows(), p.index.col_idx.long()
    return _grads(mode, F.linear, x, param, grad), _as_dict(mode, lambda gw: gw[rows, cols])


def build_torch_csr(p: Problem, x, w, grad, mode: str) -> tuple[Fn, Extract]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w_csr = w.to_sparse_csr()
    param = w_csr if mode == "fwd" else w_csr.requires_grad_()
    rows, cols = p.index.rows(), p.index.col_idx.long()
    forward = lambda xx, ww: torch.sparse.mm(ww, xx.T).T  # noqa: E731
    return _grads(mode, forward, x, param, grad), _as_dict(mode, lambda gw: gw.to_dense()[rows, cols])


def build_sparseprop(cls: type, p: Problem, x, w, grad, mode: str) -> tuple[Fn, Extract]:
    module = cls(w.detach().clone())
    if module.W_val.numel() != p.index.nnz:
        raise RuntimeError(f"SparseProp holds {module.W_val.numel()} nonzeros, expected {p.index.nnz}")
    forward = lambda xx, _: module(xx)  # noqa: E731
    return _grads(mode, forward, x, module.W_val, grad), _as_dict(mode)


# ---------------------------------------------------------------------------------------------------------
# Measuring


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class _Timing:
    fn: Fn
    first: float
    rounds: list[float] = dataclasses.field(default_factory=list)  # one median per round
    calls: int = 0
    total: float = 0.0
    slow: bool = False
    memory: harness.Stats | None = None
    done: bool = False


def _first_call(fn: Fn, device: str) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def time_interleaved(
    fns: dict[str, Fn], settings: Settings, device: str, dense: str = "dense"
) -> dict[str, tuple[harness.Stats, Any] | Exception]:
    """Time the functions of one case in rounds, each function once per round, so that a burst of load from
    other processes hits all of them rather than one: the ratios between them are what this benchmark reports.

    Each function's first call is its warm-up, and its outputs are returned for checking. Then every round times
    each remaining function through :func:`harness.measure` (one call, or repeated calls for
    ``min_time / repeat`` when they are fast; the round's median counts). A function is done after ``repeat``
    rounds, or after 3 once its rounds total ``max_time``. On the CPU, where first calls compile nothing (once
    :func:`warm_up_process` has run), a first call of ``max_time`` or more is itself a sample: one more round
    follows, or none when it also took ``slow_factor`` times the first call of ``dense``. Returns, per name,
    (stats, outputs) or the exception.
    Stats: median and quartiles of the round medians, min and max of them, n = timed calls; peak memory is
    that of the first round.
    """
    results: dict[str, tuple[harness.Stats, Any] | Exception] = {}
    timings: dict[str, _Timing] = {}
    outputs: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            first, outputs[name] = _first_call(fn, device)
        except Exception as exc:  # noqa: BLE001 -- reported by the caller
            results[name] = exc
            continue
        timings[name] = _Timing(fn, first)
    dense_first = timings[dense].first if dense in timings else None
    if torch.device(device).type == "cpu":
        for name, t in timings.items():
            if t.first >= settings.max_time:
                t.slow, t.rounds, t.calls, t.total = True, [t.first], 1, t.first
                lost = dense_first is not None and name != dense and t.first >= settings.slow_factor * dense_first
                t.done = lost or settings.repeat == 1
    least = min(3, settings.repeat)
    block = settings.min_time / settings.repeat
    while not all(t.done for t in timings.values()):
        for name, t in timings.items():
            if t.done:
                continue
            try:
                stats = harness.measure(
                    t.fn, warmup=0, repeat=1, min_time=block, device=device, memory=t.memory is None
                )
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
        ordered = sorted(t.rounds)
        if len(ordered) == 1:
            q1 = median = q3 = ordered[0]
        else:
            q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        memory = t.memory or harness.Stats(0, 0, 0, 0, 0, 0)
        stats = harness.Stats(median, q1, q3, ordered[0], ordered[-1], t.calls, memory.peak_bytes, memory.memory_kind)
        results[name] = (stats, outputs[name])
    return results


def max_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = {}
    for q, r in ref.items():
        g = got[q]
        if tuple(g.shape) != tuple(r.shape):
            raise RuntimeError(f"{q} has shape {tuple(g.shape)}, expected {tuple(r.shape)}")
        errors[q] = (g.double() - r).abs().max().item() if r.numel() else 0.0
    return errors


def within_dense(errors: dict[str, float], dense: dict[str, float], ref: dict[str, torch.Tensor], dtype) -> bool:
    """Each error at most twice dense's, with a floor of one rounding of the largest value (dense may be exact)."""
    eps = torch.finfo(dtype).eps
    for q, r in ref.items():
        floor = eps * (r.abs().max().item() if r.numel() else 0.0)
        if not errors[q] <= max(2 * dense[q], floor):
            return False
    return True


def run_case(
    p: Problem,
    dtype_name: str,
    mode: str,
    backend: str,
    device: str,
    settings: Settings,
    sparseprop: type | None,
    sparseprop_note: str = SPARSEPROP_MISSING,
    hopeless: dict[tuple, float] | None = None,
) -> dict[str, Any]:
    """Time and check every implementation on one (weight, dtype, mode); returns the row (errors become cells).

    The implementations are timed in interleaved rounds (:func:`time_interleaved`). ``hopeless`` carries, from case
    to case, the baselines (torch CSR, SparseProp) that were already slow and ``slow_factor`` x dense at a
    higher sparsity of the same (shape, batch, dtype, mode): their time only grows with the nonzeros, so they
    are not timed again at lower sparsities (a single call of torch CSR at 50% of 4096x4096, B=2048, takes
    about 30 s on the 2-core machine).
    """
    hopeless = {} if hopeless is None else hopeless
    dtype = DTYPES[dtype_name]
    row: dict[str, Any] = {
        "shape": list(p.shape),
        "label": label(p.shape),
        "batch": p.batch,
        "sparsity": p.sparsity,
        "density": p.index.density,
        "nnz": p.index.nnz,
        "dtype": dtype_name,
        "mode": mode,
        "backend": backend,
        "device": device,
        # the instruction set the C++ CPU kernels ran (None when this backend does not run them)
        "cpu_isa": _extension.cpu_isa() if backend == "cpu" else None,
    }
    x, values, grad = p.x.to(dtype), p.values.to(dtype), p.grad.to(dtype)
    w = p.index.to_dense(values)
    ref = p.reference(mode)
    try:
        row["auto_path"] = choose_path("auto", p.index, x, backend, training=mode == "fwdbwd")
    except Exception as exc:  # noqa: BLE001
        row["auto_path"] = failure(exc)
    results: dict[str, dict[str, Any]] = {}
    group = (tuple(p.shape), p.batch, dtype_name, mode)
    builders: dict[str, Callable[[], tuple[Fn, Extract]]] = {
        "dense": lambda: build_dense(p, x, w, grad, mode),
        "sparse": lambda: build_sparsekern(p, x, values, grad, mode, backend, "sparse"),
    }
    if row["auto_path"] != "sparse":  # else the very same call as path="sparse" once auto has chosen
        builders["auto"] = lambda: build_sparsekern(p, x, values, grad, mode, backend, "auto")
    builders["torch_csr"] = lambda: build_torch_csr(p, x, w, grad, mode)
    if sparseprop is None:
        results["sparseprop"] = {"skipped": "not installed" if sparseprop_note == SPARSEPROP_MISSING else "broken"}
    elif dtype != torch.float32 or torch.device(device).type != "cpu":
        results["sparseprop"] = {"skipped": "fp32 on the CPU only"}
    else:
        builders["sparseprop"] = lambda: build_sparseprop(sparseprop, p, x, w, grad, mode)
    for name in ("torch_csr", "sparseprop"):
        if (*group, name) in hopeless:
            del builders[name]
            at = _pct(hopeless[(*group, name)])
            results[name] = {"skipped": f"not timed: >= {settings.slow_factor:g}x dense already at {at}"}

    fns, extracts = {}, {}
    for name, build in builders.items():
        try:
            fns[name], extracts[name] = build()
        except Exception as exc:  # noqa: BLE001 -- reported in the row
            results[name] = {"error": failure(exc)}
    for name, timed_or_error in time_interleaved(fns, settings, device).items():
        if isinstance(timed_or_error, Exception):
            results[name] = {"error": failure(timed_or_error)}
            continue
        stats, out = timed_or_error
        try:
            results[name] = {"stats": stats.to_dict(), "errors": max_errors(extracts[name](out), ref)}
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": failure(exc)}
    if "auto" not in results:
        results["auto"] = {**results["sparse"], "same_as": "sparse"}
    dense_median = results["dense"]["stats"]["median"] if "stats" in results["dense"] else None
    for name in ("torch_csr", "sparseprop"):
        r = results[name]
        if dense_median is not None and "stats" in r:
            if r["stats"]["median"] >= max(settings.max_time, settings.slow_factor * dense_median):
                r["hopeless"] = True  # slow, and slower than slow_factor x dense: skipped at lower sparsities
                hopeless[(*group, name)] = p.sparsity
    results = {name: results[name] for name in IMPLS}
    row["results"] = results

    def median(name: str) -> float | None:
        r = results[name]
        return r["stats"]["median"] if "stats" in r else None

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or den is None or den <= 0 else num / den

    row["speedup"] = {name: ratio(dense_median, median(name)) for name in ("sparse", "auto")}
    row["vs_torch_csr"] = ratio(median("torch_csr"), median("sparse"))
    row["vs_sparseprop"] = ratio(median("sparseprop"), median("sparse"))
    dense_errors = results["dense"].get("errors")
    ok: bool | None = None
    for name in ("sparse", "auto"):
        r = results[name]
        if "errors" in r and dense_errors is not None:
            r["ok"] = within_dense(r["errors"], dense_errors, ref, dtype)
            ok = r["ok"] if ok is None else (ok and r["ok"])
    row["ok"] = ok
    row["failed"] = [name for name in ("sparse", "auto") if "error" in results[name]]
    return row


# ---------------------------------------------------------------------------------------------------------
# Reporting


def _stats(r: dict[str, Any]) -> harness.Stats | None:
    if "stats" not in r:
        return None
    return harness.Stats(**{k: v for k, v in r["stats"].items() if k != "iqr"})


def _ms_cell(r: dict[str, Any], limit: int = 72) -> str:
    if "error" in r:  # the whole first line is in the notes and the JSON
        return r["error"] if len(r["error"]) <= limit else r["error"][: limit - 3] + "..."
    if "skipped" in r:
        return r["skipped"]
    stats = _stats(r)
    cell = harness.fmt_ms(stats)
    return cell + " n=1" if stats is not None and stats.n == 1 else cell


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


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
    dense, sparse = _stats(row["results"]["dense"]), _stats(row["results"]["sparse"])
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
    "auto ms median (IQR)",
    "auto path",
    "torch CSR ms",
    "SparseProp ms",
    "speedup sparse",
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
                _pct(r["sparsity"]),
                _ms_cell(res["dense"]),
                _ms_cell(res["sparse"]),
                _ms_cell(res["auto"]),
                r["auto_path"],
                _ms_cell(res["torch_csr"]),
                _ms_cell(res["sparseprop"]),
                harness.fmt_ratio(r["speedup"]["sparse"]),
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
                        "goal": f"speedup over dense at {_pct(sparsity)}",
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
                "scope": "every case"
                + (
                    f" (worst: {worst['label']} B={worst['batch']} {worst['dtype']} {_pct(worst['sparsity'])})"
                    if worst
                    else ""
                ),
                "target": AUTO_FLOOR,
                "sparse": None,
                "auto": worst["speedup"]["auto"] if worst else None,
                "met": _met(worst["speedup"]["auto"], AUTO_FLOOR) if worst else "-",
            }
        )
        for key, name in (("vs_torch_csr", "torch CSR"), ("vs_sparseprop", "SparseProp")):
            high = [r for r in in_mode if r["sparsity"] >= BASELINES_FROM - 1e-9 and r[key] is not None]
            worst = min(high, key=lambda r: r[key], default=None)
            scope = f"every case at >= {_pct(BASELINES_FROM)}"
            if worst:
                scope += f" (worst: {worst['label']} B={worst['batch']} {worst['dtype']} {_pct(worst['sparsity'])})"
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
    return out, notes


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
        "on the sparse path (time of the baseline / time of sparsekern).",
        *notes,
    ]
    return harness.Section("Goals", headers, table, section_notes)


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
        first = members[0]
        if first["backend"] == "reference":
            auto_from = "always (the reference backend has no dense path choice)"
        else:
            crossover = density_crossover(torch.device(first["device"]).type, DTYPES[dtype], batch, mode == "fwdbwd")
            auto_from = "never" if crossover == 0.0 else f">= {_pct(round(1 - crossover, 6))}"
        out.append(
            {
                "shape": shape,
                "batch": batch,
                "dtype": dtype,
                "mode": mode,
                "measured": bool(measured),
                "beats_dense_from": beats_from,
                "auto_sparse_from": auto_from,
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
            beats = _pct(c["beats_dense_from"])
        curve = " ".join(f"{_pct(s)}:{harness.fmt_ratio(v)}" for s, v in c["speedups"].items())
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


def _notes(backend: str, device: str, settings: Settings, env: dict[str, Any], sparseprop_note: str) -> list[str]:
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
        "auto = sparse_linear(path='auto'), as SparseLinear calls it; when it takes the sparse path its timing is "
        "the sparse path's (the same call once the path is chosen).",
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


def warm_up_process(grid: Grid, backend: str, device: str, sparseprop: type | None) -> None:
    """Run every implementation once on a tiny weight, so that one-time costs of the process (the autograd
    engine's threads take about 0.3 s on its first backward; thread pools, lazy library loading) land in no
    case's timings: a slow first call of a case counts as a sample (see :func:`time_interleaved`)."""
    p = Problem((16, 24), 4, 0.5, device)
    for dtype_name in grid.dtypes:
        dtype = DTYPES[dtype_name]
        x, values, grad = p.x.to(dtype), p.values.to(dtype), p.grad.to(dtype)
        w = p.index.to_dense(values)
        for mode in grid.modes:
            builds: list[tuple[Callable[..., tuple[Fn, Extract]], tuple]] = [
                (build_dense, (p, x, w, grad, mode)),
                (build_sparsekern, (p, x, values, grad, mode, backend, "sparse")),
                (build_sparsekern, (p, x, values, grad, mode, backend, "dense")),
                (build_torch_csr, (p, x, w, grad, mode)),
            ]
            if sparseprop is not None and dtype == torch.float32 and torch.device(device).type == "cpu":
                builds.append((build_sparseprop, (sparseprop, p, x, w, grad, mode)))
            for build, args in builds:
                try:
                    build(*args)[0]()
                except Exception:  # noqa: BLE001 -- the cases report failures; this only warms up
                    pass
    _sync(device)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_linear(
    *,
    grid: Grid,
    settings: Settings,
    backend: str,
    out: str,
    name: str = "linear",
    title: str = "sparsekern bench linear",
    progress: bool = True,
    isa: str | None = None,
) -> tuple[int, str, dict[str, Any]]:
    """Run the sweep, write ``<out>/<name>.md`` and ``.json``; returns (exit code, markdown, data).

    ``isa`` ("avx512", "avx2", "baseline") forces the C++ CPU kernels' instruction set for the run (None: the
    widest this CPU has); IsaError when this CPU lacks it or the backend runs no CPU kernels. The exit code is 1
    when a sparsekern call failed or its error exceeded twice dense's (a sparsekern bug or a missing kernel); a
    baseline that fails (torch CSR in bf16, say) only gets a row cell.
    """
    Path(out).mkdir(parents=True, exist_ok=True)  # fail on a bad --out before minutes of measuring
    with contextlib.ExitStack() as forced:
        if isa is not None:
            if backend != "cpu":
                raise IsaError(f"--isa {isa} picks the C++ CPU kernels' path, which --backend {backend} does not run")
            try:
                forced.enter_context(_extension.use_cpu_isa(isa))
            except (ValueError, RuntimeError) as exc:  # this CPU lacks it, or the extension is not built
                raise IsaError(f"--isa {isa}: {exc}") from None
        return _run_linear(grid, settings, backend, out, name, title, progress)


class IsaError(ValueError):
    """--isa asks for an instruction set this run cannot force."""


def _run_linear(
    grid: Grid, settings: Settings, backend: str, out: str, name: str, title: str, progress: bool
) -> tuple[int, str, dict[str, Any]]:
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    env = harness.environment(gpu=device == "cuda")
    load_before = _load_average()
    sparseprop, sparseprop_note = sparseprop_class()
    rows: list[dict[str, Any]] = []
    problem: Problem | None = None
    hopeless: dict[tuple, float] = {}
    warm_up_process(grid, backend, device, sparseprop)
    bar = harness.progress(grid.cases(), "linear", progress)
    for shape, batch, sparsity, dtype, mode in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{label(shape)} B={batch} {_pct(sparsity)} {dtype} {mode}")
        if problem is None or (problem.shape, problem.batch, problem.sparsity) != (shape, batch, sparsity):
            problem = None  # free the previous weight first
            problem = Problem(shape, batch, sparsity, device)
        rows.append(run_case(problem, dtype, mode, backend, device, settings, sparseprop, sparseprop_note, hopeless))
        rows[-1]["load_average"] = _load_average()  # this process counts about torch_threads of it
    problem = None

    notes = _notes(backend, device, settings, env, sparseprop_note)
    loads = [r["load_average"] for r in rows if r["load_average"] is not None]
    if load_before is not None and loads:
        notes.append(
            f"Load average (1 min) before the run {load_before:.2f}, during it up to {max(loads):.2f} (this run "
            f"adds about {env['torch_threads']}; every row's is in the JSON) on {env['cpu_count']} cores: other "
            "processes on the cores distort CPU timings."
        )
    csr_failures = sorted(
        {
            (r["dtype"], r["mode"], r["results"]["torch_csr"]["error"])
            for r in rows
            if "error" in r["results"]["torch_csr"]
        }
    )
    for dtype, mode, error in csr_failures:
        notes.append(f"torch CSR {dtype} {mode}: {error}")
    sk_failures = sorted({(r["results"][n]["error"], n) for r in rows for n in r["failed"]})
    for error, impl in sk_failures:
        notes.append(f"sparsekern {impl} path FAILED: {error}")
    goal_rows, goal_notes = goals(rows)
    cross = crossovers(rows)
    sections = [goals_section(goal_rows, goal_notes), crossover_section(cross)]
    sections += [detail_section(mode, rows) for mode in grid.modes]
    markdown = harness.render_markdown(title, env, [f"- {n}" for n in notes], sections)
    data = {
        "benchmark": name,
        "environment": env,
        "notes": notes,
        "backend": backend,
        "device": device,
        "sparseprop": sparseprop_note,
        "grid": dataclasses.asdict(grid),
        "settings": dataclasses.asdict(settings),
        "density_crossover": {
            f"{d}:{str(t).removeprefix('torch.')}": dataclasses.asdict(v) for (d, t), v in DENSITY_CROSSOVER.items()
        },
        "goals": goal_rows,
        "crossover": cross,
        "rows": rows,
    }
    harness.write_report(out, name, markdown, data)
    bad = [r for r in rows if r["failed"] or r["ok"] is False]
    return (1 if bad else 0), markdown, data


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The sweep the options ask for: each unset axis takes FULL's values (QUICK's with --quick)."""
    base = QUICK if args.quick else FULL

    def pick(values, default):
        return tuple(dict.fromkeys(values)) if values else default

    return Grid(
        shapes=pick(args.shape, base.shapes),
        batches=pick(args.batch, base.batches),
        sparsities=tuple(sorted(set(args.sparsity))) if args.sparsity else base.sparsities,
        dtypes=pick(args.dtype, base.dtypes),
        modes=pick(args.mode, base.modes),
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        repeat=args.repeat or (3 if quick else 5),
        max_time=args.max_time or (0.2 if quick else 1.0),
        min_time=0.01 if quick else 0.05,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sparsekern bench linear``."""
    if args.backend in ("cuda", "triton") and not torch.cuda.is_available():
        print(
            f"sparsekern bench linear: --backend {args.backend} times CUDA tensors, but no CUDA GPU is visible",
            file=sys.stderr,
        )
        return 2
    try:
        code, markdown, _ = run_linear(
            grid=grid_from_args(args),
            settings=settings_from_args(args),
            backend=args.backend,
            out=args.out,
            isa=args.isa,
        )
    except IsaError as exc:
        print(f"sparsekern bench linear: {exc}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"wrote {Path(args.out) / 'linear.md'} and {Path(args.out) / 'linear.json'}")
    if code:
        print(
            "sparsekern bench linear: some sparsekern calls failed or were less accurate than dense (see the table)",
            file=sys.stderr,
        )
    return code
