"""``sparsekern bench linear`` and ``sweep.py linear``: smoke runs on tiny shapes (seconds), failure rows, bad
arguments, and the summaries (goals, crossover) on hand-made rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsekern import _extension, cli
from sparsekern.bench import harness, linear, linear_report

ROOT = Path(__file__).resolve().parents[1]
STAMP_FIELDS = ("date", "cpu", "torch_threads", "gpu", "torch", "triton", "sparsekern", "git_sha")
HAS_SPARSEPROP = importlib.util.find_spec("sparseprop") is not None
QUICK = ["bench", "linear", "--quick", "--backend", "reference"]


def _load(out: Path, name: str = "linear") -> dict:
    assert (out / f"{name}.md").is_file()
    return json.loads((out / f"{name}.json").read_text())


def _cpu_kernels_work() -> bool:
    p = linear.Problem((16, 24), 4, 0.5, "cpu")
    try:
        fn, _ = linear.build_sparsekern(p, p.x, p.values, p.grad, "fwdbwd", "cpu", "sparse")
        fn()
    except Exception:  # noqa: BLE001
        return False
    return True


def test_bench_linear_quick_in_process(tmp_path, capsys):
    assert cli.main([*QUICK, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)
    markdown = (tmp_path / "linear.md").read_text()

    assert all(field in data["environment"] for field in STAMP_FIELDS)
    assert data["environment"]["torch"] == torch.__version__
    assert data["backend"] == "reference" and data["device"] == "cpu"
    rows = data["rows"]
    grid = linear.QUICK
    assert len(rows) == len(grid.cases()) == 24
    assert {(r["batch"], r["sparsity"], r["dtype"], r["mode"]) for r in rows} == {
        (b, s, d, m) for b in grid.batches for s in grid.sparsities for d in grid.dtypes for m in grid.modes
    }
    for r in rows:
        res = r["results"]
        assert r["failed"] == [] and r["ok"] is True, r
        assert r["nnz"] == round((1 - r["sparsity"]) * 64 * 96)
        assert r["auto_path"] == "sparse"  # the reference backend has no dense-path choice
        assert res["auto"]["same_as"] == "sparse"
        for name in ("dense", "sparse"):
            assert res[name]["stats"]["median"] > 0 and res[name]["stats"]["iqr"] >= 0
            assert set(res[name]["errors"]) == set(linear.QUANTITIES[r["mode"]])
        assert r["speedup"]["sparse"] > 0
        if r["dtype"] == "fp32":
            assert "stats" in res["torch_csr"], res["torch_csr"]  # torch has fp32 CSR kernels and autograd
            assert r["vs_torch_csr"] > 0
        else:
            assert "stats" in res["torch_csr"] or res["torch_csr"]["error"].startswith("failed: ")
        if not HAS_SPARSEPROP:
            assert res["sparseprop"] == {"skipped": "not installed"}
        elif r["dtype"] == "bf16":
            assert res["sparseprop"] == {"skipped": "fp32 on the CPU only"}
    assert (data["sparseprop"] == linear.SPARSEPROP_MISSING) == (not HAS_SPARSEPROP)
    assert (linear.SPARSEPROP_MISSING in markdown) == (not HAS_SPARSEPROP)

    for text in (printed, markdown):
        assert "## Goals" in text and "## Crossover" in text
        assert "## forward\n" in text and "## forward+backward" in text
        lines = text.splitlines()
        assert sum(line.startswith("| 64->96 |") and line.endswith("| ok |") for line in lines) == len(rows)
        assert "| NO |\n" not in text.split("## Crossover")[1] and "FAILED" not in text
        assert "Environment: date:" in text
    assert "This run has no B=2048 fp32 cases" in markdown
    # Goals: three sparsity targets per mode per shape, plus the floor and the two baselines.
    assert len(data["goals"]) == 2 * (3 + 3)
    assert {g["met"] for g in data["goals"] if "95%" in g["goal"]} == {"not run"}
    assert len(data["crossover"]) == 2 * 2 * 2  # batch x dtype x mode


def test_bench_linear_cpu_backend(tmp_path, capsys):
    """The default backend times the C++ kernels; without them every sparsekern cell says why and the run fails.
    Every case, on either path, is checked (fwdbwd changes its values between calls: on copies, not on the shared
    problem that later dtypes and modes read)."""
    code = cli.main(["bench", "linear", "--quick", "--repeat", "2", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    rows = _load(tmp_path)["rows"]
    assert {r["backend"] for r in rows} == {"cpu"}
    if _cpu_kernels_work():
        assert code == 0, captured.err
        assert all(r["ok"] is True and not r["failed"] for r in rows)
        assert all(r["results"]["auto"]["ok"] is True for r in rows if r["auto_path"] == "dense")
        paths = {(m, p) for m in linear.MODES for p in ("sparse", "dense")}
        assert {(r["mode"], r["auto_path"]) for r in rows} == paths
    else:
        assert code == 1
        assert "some sparsekern calls failed" in captured.err
        assert "sparsekern sparse path FAILED: " in captured.out
        for r in rows:
            assert r["results"]["sparse"]["error"].startswith("failed: ")
            assert "stats" in r["results"]["dense"]  # the baselines still ran


def test_bench_linear_reports_failures_and_wrong_results(tmp_path, monkeypatch, capsys):
    """A sparse path that raises becomes failure rows, one that is wrong is marked NO; both fail the run."""
    real = linear.sparse_linear

    def broken(x, values, index, bias=None, *, backend="auto", path="auto", workspace=None, **kw):
        if x.dtype == torch.bfloat16:
            raise RuntimeError("boom")
        return real(x, values, index, bias, backend=backend, path=path, workspace=workspace, **kw) * 1.01

    monkeypatch.setattr(linear, "sparse_linear", broken)
    argv = [*QUICK, "--batch", "8", "--sparsity", "0.9", "--repeat", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "some sparsekern calls failed or were less accurate than dense" in captured.err
    assert "sparsekern sparse path FAILED: failed: RuntimeError: boom" in captured.out
    rows = _load(tmp_path)["rows"]
    for r in rows:
        if r["dtype"] == "bf16":
            assert r["failed"] == ["sparse", "auto"]
            assert r["results"]["sparse"]["error"] == "failed: RuntimeError: boom"
            assert r["speedup"]["sparse"] is None and "stats" in r["results"]["dense"]
        else:
            assert r["failed"] == [] and r["ok"] is False
            assert r["results"]["sparse"]["ok"] is False
    assert "| FAILED |" in captured.out and "| NO |" in captured.out


def test_bench_linear_fan_in_times_the_ell_kernels(tmp_path, capsys):
    """--fan-in: equal rows, the ELL column next to CSR, auto is the ELL call, and the issue-15 goals are read."""
    argv = [*QUICK, "--fan-in", "--batch", "8", "--dtype", "fp32", "--repeat", "1", "--max-time", "0.01"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)
    assert data["grid"]["fan_in"] is True and len(data["rows"]) == 3 * 2
    for r in data["rows"]:
        res = r["results"]
        assert r["fan_in"] is True and r["ok"] is True and r["failed"] == []
        assert r["nnz"] == 96 * round((1 - r["sparsity"]) * 64)  # the same count in every row
        assert res["ell"]["ok"] is True and res["ell"]["stats"]["median"] > 0
        assert res["auto"]["same_as"] == "ell" and r["ell_vs_csr"] > 0 and r["speedup"]["ell"] > 0
    goals = {g["goal"]: g for g in data["goals"]}
    ell_goal = goals["ELL kernels >= 1.3x the CSR kernels (constant fan-in)"]
    assert ell_goal["scope"].startswith("0 cases") and ell_goal["met"] == "not run"  # B=8 is out of its scope
    assert goals["online inference >= 3.4x dense at 90% (SRigL)"]["auto"] is not None
    assert "| ELL ms median (IQR) |" in printed and "ELL vs CSR" in printed


def test_bench_linear_unequal_rows_skip_the_ell_column(tmp_path, capsys):
    argv = [*QUICK, "--batch", "8", "--sparsity", "0.9", "--mode", "fwd", "--dtype", "fp32", "--repeat", "1"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (r,) = _load(tmp_path)["rows"]
    assert r["results"]["ell"] == {"skipped": "rows hold unequal counts"} and r["ell_vs_csr"] is None
    assert r["results"]["auto"]["same_as"] == "sparse" and r["fan_in"] is False


def test_online_grid_and_fan_in_flag():
    import argparse

    blank = dict(quick=False, shape=None, batch=None, sparsity=None, dtype=None, mode=None)
    assert linear.grid_from_args(argparse.Namespace(**blank, online=True, fan_in=False)) == linear.ONLINE
    assert linear.ONLINE.batches == (1, 4, 16) and linear.ONLINE.modes == ("fwd",) and linear.ONLINE.fan_in
    grid = linear.grid_from_args(argparse.Namespace(**blank, online=False, fan_in=True))
    assert grid.fan_in and grid.batches == linear.FULL.batches


def test_fan_in_problem_has_equal_rows():
    p = linear.Problem((37, 23), 9, 0.8, "cpu", fan_in=True)
    counts = p.index.row_ptr.diff()
    assert p.equal_rows and bool((counts == round(0.2 * 37)).all())
    assert not linear.Problem((37, 23), 9, 0.8, "cpu").equal_rows


def test_ell_goals():
    def row(batch, mode, sparsity, ell_vs_csr, auto):
        r = _row("768->3072", batch, "fp32", mode, sparsity, 1.0, auto=auto)
        r.update(fan_in=True, ell_vs_csr=ell_vs_csr)
        r["speedup"]["ell"] = auto
        return r

    rows = [
        row(256, "fwd", 0.9, 1.5, 6.0),
        row(2048, "fwd", 0.98, 1.2, 20.0),
        row(2048, "fwdbwd", 0.95, 1.4, 8.0),
        row(4, "fwd", 0.9, 1.1, 3.0),
        row(16, "fwd", 0.9, 1.1, 4.0),
        row(16, "fwd", 0.5, 1.1, 0.5),  # outside every scope
    ]
    by = {(g["goal"], g["mode"]): g for g in linear_report.ell_goals(rows)}
    fwd = by["ELL kernels >= 1.3x the CSR kernels (constant fan-in)", "fwd"]
    assert fwd["sparse"] == 1.2 and fwd["met"] == "NO" and "768->3072 B=2048 fp32 98%" in fwd["scope"]
    assert by["ELL kernels >= 1.3x the CSR kernels (constant fan-in)", "fwdbwd"]["met"] == "yes"
    online = by["online inference >= 3.4x dense at 90% (SRigL)", "fwd"]
    assert online["auto"] == 3.0 and online["met"] == "NO" and "B=4" in online["scope"]
    assert linear_report.ell_goals([_row("a", 256, "fp32", "fwd", 0.9, 2.0)]) == []  # no fan-in rows: no goals


def test_bench_linear_baseline_failure_keeps_exit_code(tmp_path, monkeypatch, capsys):
    def no_csr(*args, **kwargs):
        raise NotImplementedError("no CSR here")

    monkeypatch.setattr(linear, "build_torch_csr", no_csr)
    argv = [*QUICK, "--batch", "8", "--sparsity", "0.9", "--mode", "fwd", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _load(tmp_path)["rows"]
    assert all(r["results"]["torch_csr"]["error"] == "failed: NotImplementedError: no CSR here" for r in rows)
    assert all(r["vs_torch_csr"] is None and r["ok"] is True for r in rows)
    assert "torch CSR fp32 fwd: failed: NotImplementedError: no CSR here" in printed


def test_bench_linear_options_select_the_sweep(tmp_path, capsys):
    argv = [*QUICK, "--shape", "40x24", "--shape", "24x40", "--batch", "5", "--sparsity", "0.75", "--dtype", "fp32"]
    assert cli.main([*argv, "--mode", "fwdbwd", "--repeat", "1", "--max-time", "0.01", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = _load(tmp_path)
    assert [(r["shape"], r["batch"], r["sparsity"], r["dtype"], r["mode"]) for r in data["rows"]] == [
        ([40, 24], 5, 0.75, "fp32", "fwdbwd"),
        ([24, 40], 5, 0.75, "fp32", "fwdbwd"),
    ]
    assert data["settings"]["repeat"] == 1 and data["settings"]["max_time"] == 0.01
    assert all(r["ok"] for r in data["rows"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1"], "expected a sparsity in [0, 1), such as 0.9, got '1'"),
        (["--sparsity", "most"], "expected a sparsity in [0, 1), such as 0.9, got 'most'"),
        (["--batch", "0"], "expected a positive integer, got 0"),
        (["--shape", "768"], "expected INxOUT such as 768x3072, got '768'"),
        (["--shape", "0x8"], "expected positive sizes in INxOUT, got '0x8'"),
        (["--mode", "bwd"], "invalid choice: 'bwd'"),
        (["--backend", "gpu"], "invalid choice: 'gpu'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--max-time", "0"], "expected a positive number, got '0'"),
        (["--repeat", "-1"], "expected a positive integer, got -1"),
    ],
    ids=[
        "sparsity-one",
        "sparsity-text",
        "batch-zero",
        "shape-one-number",
        "shape-zero",
        "mode",
        "backend",
        "dtype",
        "max-time",
        "repeat",
    ],
)
def test_bench_linear_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "linear", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension")
def test_bench_linear_isa_forces_the_cpu_kernels(tmp_path, capsys):
    """--isa runs every row on that instruction set and records it; the choice is restored afterwards."""
    before = _extension.cpu_isa()
    argv = ["bench", "linear", "--quick", "--shape", "40x24", "--batch", "5", "--sparsity", "0.9", "--dtype", "fp32"]
    assert cli.main([*argv, "--repeat", "1", "--isa", "baseline", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)
    assert {r["cpu_isa"] for r in data["rows"]} == {"baseline"} and all(r["ok"] for r in data["rows"])
    assert data["environment"]["extension_cpu_isa"] == "baseline"
    assert "CPU kernels: baseline" in printed
    assert _extension.cpu_isa() == before


def test_bench_linear_isa_errors(tmp_path, capsys):
    assert cli.main([*QUICK, "--isa", "baseline", "--out", str(tmp_path)]) == 2
    assert "--isa baseline picks the C++ CPU kernels' path, which --backend reference does not run" in (
        capsys.readouterr().err
    )
    missing = [isa for isa in _extension.ISAS if isa not in _extension.available_isas()]
    if missing:  # a CPU without AVX-512 (or the extension not built): a clear error, exit code 2
        assert cli.main(["bench", "linear", "--quick", "--isa", missing[0], "--out", str(tmp_path)]) == 2
        assert f"--isa {missing[0]}: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "linear", "--isa", "sse2"])
    assert exc.value.code == 2 and "invalid choice: 'sse2'" in capsys.readouterr().err


def test_linear_options_stay_with_linear(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "semi24", "--sparsity", "0.9"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --sparsity 0.9" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_linear_cuda_backend_without_gpu(tmp_path, capsys):
    assert cli.main(["bench", "linear", "--quick", "--backend", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "linear.json").exists()


def test_bench_linear_out_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([*QUICK, "--out", str(blocker)]) == 1
    assert "sparsekern bench linear:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# pieces


def test_problem_is_exact_and_shared_by_dtypes():
    p = linear.Problem((37, 23), 9, 0.8, "cpu")
    assert p.index.nnz == round(0.2 * 37 * 23) and p.index.n_out == 23 and p.index.n_in == 37
    for t in (p.values, p.x, p.grad):
        assert torch.equal(t, t.to(torch.bfloat16).float())  # bf16-exact: fp32 and bf16 see the same numbers
    assert bool((p.values != 0).all())
    w = p.index.to_dense(p.values).double()
    ref = p.reference("fwdbwd")
    torch.testing.assert_close(ref["y"], p.x.double() @ w.T, rtol=0, atol=0)
    torch.testing.assert_close(ref["dX"], p.grad.double() @ w, rtol=0, atol=0)
    full = p.grad.double().T @ p.x.double()
    torch.testing.assert_close(ref["dW"], full[w != 0], rtol=0, atol=0)  # CSR order is row-major


def test_within_dense_rule():
    ref = {"y": torch.tensor([1.0, -4.0], dtype=torch.float64)}
    assert linear.within_dense({"y": 2e-3}, {"y": 1e-3}, ref, torch.float32)
    assert not linear.within_dense({"y": 2.1e-3}, {"y": 1e-3}, ref, torch.float32)
    # dense exact: one rounding of the largest value is allowed, more is not
    eps = torch.finfo(torch.float32).eps
    assert linear.within_dense({"y": 4 * eps}, {"y": 0.0}, ref, torch.float32)
    assert not linear.within_dense({"y": 5 * eps}, {"y": 0.0}, ref, torch.float32)
    assert not linear.within_dense({"y": float("nan")}, {"y": 1e-3}, ref, torch.float32)


def test_time_interleaved_runs_rounds_in_turn():
    log = []
    fns = {name: (lambda name=name: log.append(name) or name) for name in ("dense", "a", "b")}
    settings = harness.RoundSettings(repeat=3, max_time=10.0, min_time=0.0)
    results = harness.time_interleaved(fns, settings, "cpu")
    assert log == ["dense", "a", "b"] * 4  # first calls (warm-up, outputs), then 3 rounds
    for name, (stats, out) in results.items():
        assert out == name and stats.n == 3 and stats.q1 <= stats.median <= stats.q3


def test_time_interleaved_caps_slow_calls():
    settings = harness.RoundSettings(repeat=5, max_time=0.01, min_time=0.0, slow_factor=2.0)
    calls = {"dense": 0, "lost": 0, "slow": 0, "fast": 0}

    def sleeper(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(seconds)
            return name

        return fn

    fns = {"dense": sleeper("dense", 0.012), "lost": sleeper("lost", 0.05), "slow": sleeper("slow", 0.015)}
    fns["fast"] = sleeper("fast", 0)
    results = harness.time_interleaved(fns, settings, "cpu")
    lost, _ = results["lost"]  # over max_time and 2x dense's first call: the first call is the only sample
    assert lost.n == 1 and calls["lost"] == 1 and lost.median >= 0.05 and lost.peak_bytes is None
    for name in ("dense", "slow"):  # over max_time only: the first call and one more
        stats, out = results[name]
        assert out == name and stats.n == 2 and calls[name] == 2 and stats.min >= 0.012
    fast, _ = results["fast"]  # warm-up, then rounds until 5 or max_time
    assert fast.n >= 3 and calls["fast"] == fast.n + 1


def test_time_interleaved_reports_exceptions():
    state = {"calls": 0}

    def flaky():
        state["calls"] += 1
        if state["calls"] > 1:
            raise RuntimeError("second call")
        return 1

    def broken():
        raise ValueError("first call")

    fns = {"dense": lambda: 0, "flaky": flaky, "broken": broken}
    results = harness.time_interleaved(fns, harness.RoundSettings(repeat=3, min_time=0.0), "cpu")
    assert isinstance(results["broken"], ValueError) and isinstance(results["flaky"], RuntimeError)
    assert results["dense"][0].n == 3


def test_hopeless_baseline_is_not_timed_at_lower_sparsities(tmp_path, monkeypatch, capsys):
    real = linear.build_torch_csr

    def slow_csr(*args, **kwargs):
        fn, extract = real(*args, **kwargs)

        def slow():
            time.sleep(0.25)  # far over max_time and 2x dense, even on a loaded machine
            return fn()

        return slow, extract

    monkeypatch.setattr(linear, "build_torch_csr", slow_csr)
    argv = [*QUICK, "--batch", "8", "--mode", "fwd", "--dtype", "fp32", "--max-time", "0.01", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    rows = {r["sparsity"]: r for r in _load(tmp_path)["rows"]}
    assert list(rows) == [0.98, 0.9, 0.5]  # sparsest first
    assert rows[0.98]["results"]["torch_csr"]["hopeless"] is True
    assert rows[0.98]["results"]["torch_csr"]["stats"]["n"] == 1
    for s in (0.9, 0.5):
        assert rows[s]["results"]["torch_csr"] == {"skipped": "not timed: >= 2x dense already at 98%"}
        assert rows[s]["ok"] is True


def _row(label, batch, dtype, mode, sparsity, sparse, auto=None, csr=None, sp=None, backend="cpu"):
    training = mode == "fwdbwd"
    return {
        "label": label,
        "batch": batch,
        "dtype": dtype,
        "mode": mode,
        "sparsity": sparsity,
        "backend": backend,
        "device": "cpu",
        "cpu_isa": "avx2" if backend == "cpu" else None,
        "speedup": {"sparse": sparse, "auto": sparse if auto is None else auto},
        "auto_sparse_from": linear_report.auto_sparse_from(backend, "cpu", linear.DTYPES[dtype], batch, training),
        "vs_torch_csr": csr,
        "vs_sparseprop": sp,
    }


def test_crossover_is_the_start_of_the_winning_run():
    speeds = {0.5: 0.5, 0.7: 1.2, 0.8: 0.9, 0.9: 1.5, 0.95: 3.0}
    rows = [_row("a", 256, "fp32", "fwd", s, v) for s, v in speeds.items()]
    rows += [_row("a", 256, "fp32", "fwdbwd", s, 0.5) for s in speeds]
    rows += [_row("a", 256, "bf16", "fwd", s, None) for s in speeds]
    rows += [_row("a", 8, "fp32", "fwd", s, v) for s, v in speeds.items()]
    cross = {(c["batch"], c["dtype"], c["mode"]): c for c in linear_report.crossovers(rows)}
    assert cross[256, "fp32", "fwd"]["beats_dense_from"] == 0.9  # 70% wins, but 80% loses again
    assert cross[256, "fp32", "fwd"]["auto_sparse_from"] == ">= 65%"  # DENSITY_CROSSOVER inference 0.35
    assert cross[256, "fp32", "fwdbwd"]["auto_sparse_from"] == ">= 65%"  # training 0.35
    assert cross[8, "fp32", "fwd"]["auto_sparse_from"] == ">= 50%"  # small batch 0.5
    assert cross[256, "fp32", "fwdbwd"]["beats_dense_from"] is None and cross[256, "fp32", "fwdbwd"]["measured"]
    assert not cross[256, "bf16", "fwd"]["measured"]
    table = linear_report.crossover_section(list(cross.values())).rows
    assert [row[4] for row in table] == ["90%", "never (in this sweep)", "not measured (sparse path failed)", "90%"]


def test_goals_read_at_b2048_fp32():
    rows = [
        _row("768->3072", 2048, "fp32", "fwd", 0.9, 5.5, csr=1.5, sp=0.8),
        _row("768->3072", 2048, "fp32", "fwd", 0.95, 8.5, csr=2.0),
        _row("768->3072", 2048, "fp32", "fwd", 0.5, 0.2, auto=0.95, csr=0.5),
        _row("768->3072", 256, "fp32", "fwd", 0.9, 9.0, auto=0.85),
        _row("768->3072", 2048, "bf16", "fwd", 0.9, 0.1),
    ]
    goal_rows, notes = linear_report.goals(rows)
    assert notes == []
    by_goal = {g["goal"]: g for g in goal_rows}
    assert by_goal["speedup over dense at 90%"]["auto"] == 5.5 and by_goal["speedup over dense at 90%"]["met"] == "yes"
    assert by_goal["speedup over dense at 90%"]["scope"] == "768->3072, B=2048, fp32, avx2"  # the ISA that ran
    assert by_goal["speedup over dense at 95%"]["met"] == "NO"
    assert by_goal["speedup over dense at 98%"]["met"] == "not run"
    floor = by_goal[f"auto never below {linear_report.AUTO_FLOOR}x dense"]
    assert floor["auto"] == 0.1 and floor["met"] == "NO" and "bf16" in floor["scope"]
    csr = by_goal["sparse path faster than torch CSR"]
    assert csr["sparse"] == 1.5 and csr["met"] == "yes"  # the 50% row is below the 80% scope
    assert by_goal["sparse path faster than SparseProp"]["met"] == "NO"
    section = linear_report.goals_section(goal_rows, notes)
    assert len(section.rows) == len(goal_rows) and section.rows[0][3] == ">=5.00x"
    assert linear_report.AUTO_FLOOR == 0.95  # DESIGN §6: never below 0.95x dense


def test_failure_text_is_one_short_line():
    exc = NotImplementedError("Could not run 'x'\nwith arguments from the 'CPU' backend " + "y" * 300)
    text = harness.failure(exc)
    assert text.startswith("failed: NotImplementedError: Could not run 'x'") and "\n" not in text
    assert harness.failure(RuntimeError()) == "failed: RuntimeError"
    assert len(harness.failure(RuntimeError("z" * 500))) == len("failed: ") + 120


def test_stats_cells():
    stats = harness.Stats(0.002, 0.001, 0.003, 0.001, 0.003, 1)
    assert linear_report._ms_cell({"stats": stats.to_dict()}) == "2 (2) n=1"
    assert linear_report._ms_cell({"skipped": "fp32 on the CPU only"}) == "fp32 on the CPU only"
    assert linear_report._ms_cell({"error": "failed: " + "x" * 100}).endswith("...")


# ---------------------------------------------------------------------------------------------------------
# benchmarks/sweep.py linear


def _sweep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), *args], capture_output=True, text=True, env=env
    )


def test_sweep_linear_runs(tmp_path):
    proc = _sweep(
        "linear", "--quick", "--backend", "reference", "--batch", "8", "--mode", "fwd", "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    data = _load(tmp_path, "linear-sweep")
    assert data["benchmark"] == "linear-sweep" and len(data["rows"]) == 3 * 2
    assert all(r["ok"] for r in data["rows"])
    assert "# sparsekern sparse linear sweep" in proc.stdout


def test_sweep_linear_help_and_bad_arguments():
    proc = _sweep("linear", "--help")
    assert proc.returncode == 0 and "--sparsity" in proc.stdout and "--name" in proc.stdout
    proc = _sweep("linear", "--sparsity", "2")
    assert proc.returncode == 2 and "expected a sparsity in [0, 1)" in proc.stderr
    proc = _sweep("--sparsity", "0.9")  # the 2:4 sweep has no density axis
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
