"""``sparsekern bench grow``: a quick smoke run (seconds), its report, the goal rows on hand-made rows, and bad
arguments."""

from __future__ import annotations

import json

import pytest
import torch

from sparsekern import _extension, cli
from sparsekern.bench import grow


def test_bench_grow_quick(tmp_path, capsys):
    args = ["bench", "grow", "--quick", "--backend", "reference", "--dtype", "fp32", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "grow.json").read_text())
    assert (tmp_path / "grow.md").read_text() in printed
    assert data["backend"] == "reference" and data["device"] == "cpu"
    assert data["environment"]["torch"] == torch.__version__
    rows = data["rows"]
    assert [(r["n_out"], r["n_in"], r["batch"]) for r in rows] == [(c.n_out, c.n_in, c.batch) for c in grow.QUICK]
    for r, case in zip(rows, grow.QUICK, strict=True):
        assert r["k"] == case.k > 0
        for name in ("fast", "exact", "gemm", "dense"):
            assert r[name]["median"] > 0 and r[name]["n"] >= 1
        assert r["fast_vs_gemm"] > 0 and r["exact_vs_fast"] > 0 and r["speedup"] > 0
        assert 0.9 <= r["agreement"] <= 1.0
        assert r["isa"] == "- (reference)"
    assert "No goal case in this run" in printed and "fast / gemm" in printed


@pytest.mark.skipif(not _extension.available(), reason="needs the C++ extension")
def test_bench_grow_forced_isa(tmp_path, capsys):
    """--isa forces the CPU kernels' ISA for the run, stamps it on every row, and restores the previous choice."""
    before = _extension.cpu_isa()
    isa = _extension.available_isas()[-1]  # the narrowest: never the default on an AVX machine
    args = ["bench", "grow", "--quick", "--dtype", "fp32", "--repeat", "1", "--isa", isa, "--out", str(tmp_path)]
    assert cli.main(args) == 0
    data = json.loads((tmp_path / "grow.json").read_text())
    assert data["isa"] == isa and {r["isa"] for r in data["rows"]} == {isa}
    assert data["environment"]["extension_cpu_isa"] == isa
    assert f"CPU kernels' ISA: {isa} (forced with --isa)" in capsys.readouterr().out
    assert _extension.cpu_isa() == before


def test_bench_grow_isa_errors(capsys):
    assert cli.main(["bench", "grow", "--quick", "--backend", "reference", "--isa", "avx2"]) == 2
    assert "--isa applies to --backend cpu" in capsys.readouterr().err


def test_goal_rows():
    stats = {"median": 1.0, "q1": 1.0, "q3": 1.0, "min": 1.0, "max": 1.0, "n": 1, "memory_kind": "x", "iqr": 0.0}
    goal = grow.GOAL_CASES[0]
    rows = [
        {**vars(goal), "dtype": "fp32", "isa": "avx2", "fast_vs_gemm": 1.3, "exact_vs_fast": 1.5,
         "memory_ratio": 0.05, "fast": {**stats, "peak_bytes": 1}},
        {**vars(goal), "dtype": "bf16", "isa": "avx2", "fast_vs_gemm": 9.0, "exact_vs_fast": 9.0,
         "fast": {**stats, "peak_bytes": 1}},
        {"n_out": 16384, "n_in": 16384, "batch": 256, "sparsity": 0.9, "alpha": 0.3, "dtype": "fp32",
         "fast": {**stats, "peak_bytes": 5 << 30}},
    ]  # fmt: skip
    table = grow.goals(rows).rows
    assert [r[-1] for r in table] == ["NOT met", "met", "met", "NOT met"]
    assert table[0][2] == "1.30" and table[1][2] == "1.50" and table[2][2] == "5.0%"
    assert "B=64" in table[0][0] and "(avx2)" in table[0][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what is said when no GPU is visible")
def test_backend_needs_a_gpu(capsys):
    assert cli.main(["bench", "grow", "--quick", "--backend", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
