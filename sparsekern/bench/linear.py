"""``sparsekern bench linear``: the sparse linear layer against dense, torch's CSR matmul and SparseProp.

Every case (shape x batch x sparsity x dtype x mode) times five implementations of ``y = x @ W.T`` for a
random unstructured sparse ``W`` (no bias):

* ``sparse``: ``sparse_linear(x, values, index, path="sparse", kernels="csr")`` on the chosen backend (for CPU
  tensors the C++ CSR kernels);
* ``ell``: ``kernels="ell"``, the constant fan-in (ELL) kernels on the same weight, timed when every row holds the
  same number of nonzeros (``--fan-in`` masks);
* ``auto``: ``path="auto"``, what :class:`sparsekern.nn.SparseLinear` runs: the sparse kernels, or below the
  measured density crossover (``DENSITY_CROSSOVER``) a dense GEMM on the scattered weight, and on a constant
  fan-in weight the ELL kernels; every row says which path it took;
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

This module measures (the sweep, the inputs, the implementations, one row per case); the interleaved timer is
:func:`harness.time_interleaved`, and the goals, crossovers and tables of the report are in
:mod:`sparsekern.bench.linear_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import _extension
from .._csr import CSRIndex
from ..ops.sparse_linear import DENSITY_CROSSOVER, DenseWorkspace, auto_takes_ell, choose_path, sparse_linear
from . import harness, linear_report
from .harness import failure

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd")
# the keys of every row's "results", in timing order
IMPLS = ("dense", "sparse", "ell", "auto", "torch_csr", "sparseprop")
QUANTITIES = {"fwd": ("y",), "fwdbwd": ("y", "dX", "dW")}

# Two steps: SparseProp's sdist builds against pybind11 without declaring it, so pybind11 must be there first.
SPARSEPROP_MISSING = (
    "SparseProp: not installed (pip install --no-build-isolation pybind11 scipy, then "
    "pip install --no-build-isolation --no-deps sparseprop)"
)


@dataclass(frozen=True)
class Grid:
    """The sweep: shapes are (in_features, out_features), the weight of ``nn.Linear(in, out)``."""

    shapes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    sparsities: tuple[float, ...]
    dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    fan_in: bool = False  # every row keeps the same number of nonzeros (constant fan-in): the ELL column runs

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
# Online inference (SRigL's setting): forward only, batches of 1 to 16, constant fan-in masks, against dense.
ONLINE = Grid(
    shapes=FULL.shapes, batches=(1, 4, 16), sparsities=(0.9, 0.95, 0.98), dtypes=("fp32",), modes=("fwd",), fan_in=True
)


def label(shape: Sequence[int]) -> str:
    return f"{shape[0]}->{shape[1]}"


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


def fan_in_mask(n_out: int, n_in: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """A bool (n_out, n_in) mask whose every row keeps ``round((1 - sparsity) * n_in)`` columns, uniformly at random."""
    k = int(round((1.0 - sparsity) * n_in))
    mask = torch.zeros(n_out, n_in, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.rand(n_out, n_in, generator=gen).topk(k, dim=1).indices, True)
    return mask


class Problem:
    """A random (n_out, n_in) weight at ``sparsity`` (exact nnz, uniform positions; with ``fan_in`` the same count
    ``round((1 - sparsity) * n_in)`` in every row), x (B, n_in) and an output gradient (B, n_out), all fp32 holding
    bf16-exact values, with float64 references computed on first use."""

    def __init__(
        self, shape: tuple[int, int], batch: int, sparsity: float, device: str, seed: int = 0, fan_in: bool = False
    ):
        n_in, n_out = shape
        gen = torch.Generator().manual_seed(seed)
        numel = n_in * n_out
        if fan_in:
            mask = fan_in_mask(n_out, n_in, sparsity, gen).view(-1)
            nnz = int(mask.sum())
        else:
            nnz = int(round((1.0 - sparsity) * numel))
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[torch.randperm(numel, generator=gen)[:nnz]] = True
        self.fan_in = fan_in
        self.index = CSRIndex.from_mask(mask.view(n_out, n_in).to(device))
        bound = 1.0 / math.sqrt(n_in)
        values = _bf16_exact((torch.rand(nnz, generator=gen) * 2 - 1) * bound)
        # SparseProp reads the nonzeros off the dense weight: a value of exactly 0 would drop out of its CSR.
        self.values = torch.where(values == 0, torch.full_like(values, bound), values).to(device)
        self.x = _bf16_exact(torch.randn(batch, n_in, generator=gen)).to(device)
        self.grad = _bf16_exact(torch.randn(batch, n_out, generator=gen)).to(device)
        self.shape, self.batch, self.sparsity = shape, batch, sparsity
        self.equal_rows = n_out > 0 and nnz % n_out == 0 and bool((self.index.row_ptr.diff() == nnz // n_out).all())
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


def build_sparsekern(
    p: Problem, x, values, grad, mode: str, backend: str, path: str, kernels: str = "auto"
) -> tuple[Fn, Extract]:
    # sparse_linear is looked up when called, so a test can replace it in this module. The workspace is what
    # SparseLinear keeps for the dense path (one dense weight per topology, only its nonzeros rewritten per call).
    workspace = DenseWorkspace()
    kw = {} if kernels == "auto" else {"kernels": kernels}

    def forward(xx, vv):
        return sparse_linear(xx, vv, p.index, backend=backend, path=path, workspace=workspace, **kw)

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


def max_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = {}
    for q, r in ref.items():
        g = got[q]
        if tuple(g.shape) != tuple(r.shape):
            raise RuntimeError(f"{q} has shape {tuple(g.shape)}, expected {tuple(r.shape)}")
        errors[q] = (g.double() - r).abs().max().item() if r.numel() else 0.0
    return errors


def within_dense(errors: dict[str, float], dense: dict[str, float], ref: dict[str, torch.Tensor], dtype) -> bool:
    """Each quantity's error within :func:`harness.within_twice` of dense's (twice, or one rounding of its scale)."""
    scales = {q: r.abs().max().item() if r.numel() else 0.0 for q, r in ref.items()}
    return all(harness.within_twice(errors[q], dense[q], scales[q], dtype) for q in ref)


def run_case(
    p: Problem,
    dtype_name: str,
    mode: str,
    backend: str,
    device: str,
    settings: harness.RoundSettings,
    sparseprop: type | None,
    sparseprop_note: str = SPARSEPROP_MISSING,
    hopeless: dict[tuple, float] | None = None,
) -> dict[str, Any]:
    """Time and check every implementation on one (weight, dtype, mode); returns the row (errors become cells).

    The implementations are timed in interleaved rounds (:func:`harness.time_interleaved`). ``hopeless`` carries,
    from case to case, the baselines (torch CSR, SparseProp) that were already slow and ``slow_factor`` x dense at a
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
    row["auto_sparse_from"] = linear_report.auto_sparse_from(backend, device, dtype, p.batch, mode == "fwdbwd")
    results: dict[str, dict[str, Any]] = {}
    group = (tuple(p.shape), p.batch, dtype_name, mode)
    builders: dict[str, Callable[[], tuple[Fn, Extract]]] = {
        "dense": lambda: build_dense(p, x, w, grad, mode),
        "sparse": lambda: build_sparsekern(p, x, values, grad, mode, backend, "sparse", "csr"),
    }
    # auto on the sparse path is the very same call as the ELL column (equal rows) or the CSR one
    auto_same_as = "ell" if p.equal_rows and p.index.nnz and auto_takes_ell(backend, p.batch) else "sparse"
    if p.equal_rows:
        builders["ell"] = lambda: build_sparsekern(p, x, values, grad, mode, backend, "sparse", "ell")
    else:
        results["ell"] = {"skipped": "rows hold unequal counts"}
    if row["auto_path"] != "sparse" or auto_same_as not in builders:
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
            at = harness.fmt_pct(hopeless[(*group, name)])
            results[name] = {"skipped": f"not timed: >= {settings.slow_factor:g}x dense already at {at}"}

    fns, extracts = {}, {}
    for name, build in builders.items():
        try:
            fns[name], extracts[name] = build()
        except Exception as exc:  # noqa: BLE001 -- reported in the row
            results[name] = {"error": failure(exc)}
    for name, timed_or_error in harness.time_interleaved(fns, settings, device).items():
        if isinstance(timed_or_error, Exception):
            results[name] = {"error": failure(timed_or_error)}
            continue
        stats, out = timed_or_error
        try:
            results[name] = {"stats": stats.to_dict(), "errors": max_errors(extracts[name](out), ref)}
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": failure(exc)}
    if "auto" not in results:
        results["auto"] = {**results[auto_same_as], "same_as": auto_same_as}
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

    row["speedup"] = {name: ratio(dense_median, median(name)) for name in ("sparse", "ell", "auto")}
    row["ell_vs_csr"] = ratio(median("sparse"), median("ell"))  # the CSR kernels' time / the ELL kernels'
    row["fan_in"] = p.fan_in
    row["vs_torch_csr"] = ratio(median("torch_csr"), median("sparse"))
    row["vs_sparseprop"] = ratio(median("sparseprop"), median("sparse"))
    dense_errors = results["dense"].get("errors")
    ok: bool | None = None
    for name in ("sparse", "ell", "auto"):
        r = results[name]
        if "errors" in r and dense_errors is not None:
            r["ok"] = within_dense(r["errors"], dense_errors, ref, dtype)
            ok = r["ok"] if ok is None else (ok and r["ok"])
    row["ok"] = ok
    row["failed"] = [name for name in ("sparse", "ell", "auto") if "error" in results[name]]
    return row


def warm_up_process(grid: Grid, backend: str, device: str, sparseprop: type | None) -> None:
    """Run every implementation once on a tiny weight, so that one-time costs of the process (the autograd
    engine's threads take about 0.3 s on its first backward; thread pools, lazy library loading) land in no
    case's timings: a slow first call of a case counts as a sample (see :func:`harness.time_interleaved`)."""
    p = Problem((16, 24), 4, 0.5, device)
    pe = Problem((16, 24), 4, 0.5, device, fan_in=True)
    for dtype_name in grid.dtypes:
        dtype = DTYPES[dtype_name]
        x, values, grad = p.x.to(dtype), p.values.to(dtype), p.grad.to(dtype)
        w = p.index.to_dense(values)
        ell_inputs = (pe.x.to(dtype), pe.values.to(dtype), pe.grad.to(dtype))
        for mode in grid.modes:
            builds: list[tuple[Callable[..., tuple[Fn, Extract]], tuple]] = [
                (build_dense, (p, x, w, grad, mode)),
                (build_sparsekern, (p, x, values, grad, mode, backend, "sparse", "csr")),
                (build_sparsekern, (p, x, values, grad, mode, backend, "dense")),
                (build_sparsekern, (pe, *ell_inputs, mode, backend, "sparse", "ell")),
                (build_torch_csr, (p, x, w, grad, mode)),
            ]
            if sparseprop is not None and dtype == torch.float32 and torch.device(device).type == "cpu":
                builds.append((build_sparseprop, (sparseprop, p, x, w, grad, mode)))
            for build, args in builds:
                try:
                    build(*args)[0]()
                except Exception:  # noqa: BLE001 -- the cases report failures; this only warms up
                    pass
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_linear(
    *,
    grid: Grid,
    settings: harness.RoundSettings,
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
                forced.enter_context(harness.isa_context(isa))
            except ValueError as exc:  # unknown, this CPU lacks it, or the extension is not built
                raise IsaError(str(exc)) from None
        return _run_linear(grid, settings, backend, out, name, title, progress)


class IsaError(ValueError):
    """--isa asks for an instruction set this run cannot force."""


def _run_linear(
    grid: Grid, settings: harness.RoundSettings, backend: str, out: str, name: str, title: str, progress: bool
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
            bar.set_postfix_str(f"{label(shape)} B={batch} {harness.fmt_pct(sparsity)} {dtype} {mode}")
        if problem is None or (problem.shape, problem.batch, problem.sparsity) != (shape, batch, sparsity):
            problem = None  # free the previous weight first
            problem = Problem(shape, batch, sparsity, device, fan_in=grid.fan_in)
        rows.append(run_case(problem, dtype, mode, backend, device, settings, sparseprop, sparseprop_note, hopeless))
        rows[-1]["load_average"] = _load_average()  # this process counts about torch_threads of it
    problem = None

    notes = linear_report.run_notes(backend, device, settings, env, sparseprop_note)
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
    goal_rows, goal_notes = linear_report.goals(rows)
    cross = linear_report.crossovers(rows)
    sections = [linear_report.goals_section(goal_rows, goal_notes), linear_report.crossover_section(cross)]
    sections += [linear_report.detail_section(mode, rows) for mode in grid.modes]
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
    """The sweep the options ask for: each unset axis takes FULL's values (QUICK's with --quick, ONLINE's with
    --online); --fan-in makes every mask constant fan-in (ONLINE's always are)."""
    base = QUICK if args.quick else ONLINE if getattr(args, "online", False) else FULL

    def pick(values, default):
        return tuple(dict.fromkeys(values)) if values else default

    return Grid(
        shapes=pick(args.shape, base.shapes),
        batches=pick(args.batch, base.batches),
        sparsities=tuple(sorted(set(args.sparsity))) if args.sparsity else base.sparsities,
        dtypes=pick(args.dtype, base.dtypes),
        modes=pick(args.mode, base.modes),
        fan_in=base.fan_in or bool(getattr(args, "fan_in", False)),
    )


def settings_from_args(args: argparse.Namespace) -> harness.RoundSettings:
    quick = args.quick
    return harness.RoundSettings(
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
