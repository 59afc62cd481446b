"""The benchmark command, its harness and the sweep script (smoke runs on tiny shapes, in seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern import _extension, cli
from sparsekern.bench import harness, semi24

ROOT = Path(__file__).resolve().parents[1]
HAS_SM80 = semi24.gpu_status()[0]
STAMP_FIELDS = ("date", "cpu", "torch_threads", "gpu", "torch", "triton", "sparsekern", "git_sha")


def _load(out: Path) -> dict:
    assert (out / "semi24.md").is_file()
    return json.loads((out / "semi24.json").read_text())


def test_bench_semi24_quick_in_process(tmp_path, capsys):
    assert cli.main(["bench", "semi24", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)

    assert all(field in data["environment"] for field in STAMP_FIELDS)
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["sparsekern"] == sparsekern.__version__
    rows = data["conversions"]
    expected_backends = {"reference"} | ({"cpu"} if _extension.available() else set())
    for op in ("compress", "decompress"):
        for dtype in semi24.DTYPES:
            got = {r["backend"] for r in rows if r["op"] == op and r["dtype"] == dtype and r["device"] == "cpu"}
            assert got == expected_backends, (op, dtype, got)
    for row in rows:
        assert "error" not in row, row
        assert row["bit_identical"] is True, row
        assert row["stats"]["median"] > 0 and row["stats"]["iqr"] >= 0 and row["ratio"] > 0
    assert "| yes |" in printed and "| NO |" not in printed
    assert printed.count("| yes |") == len(rows)
    assert (semi24.NO_GPU_MESSAGE in printed) == (not HAS_SM80)
    assert (semi24.NO_GPU_MESSAGE in (tmp_path / "semi24.md").read_text()) == (not HAS_SM80)
    assert data["gpu_measured"] == HAS_SM80
    # Triton is never timed on CPU tensors, and the report says why.
    assert (
        "`triton on cpu`: on CPU tensors Triton runs only in its interpreter, whose timings are not speeds" in printed
    )


def test_bench_semi24_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sparsekern", "bench", "semi24", "--quick", "--dtype", "fp16", "--dtype", "int8"]
    proc = subprocess.run([*cmd, "--repeat", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| weight | dtype | device | backend |" in proc.stdout
    assert (semi24.NO_GPU_MESSAGE in proc.stdout) == (not HAS_SM80)
    data = _load(tmp_path)
    assert {r["dtype"] for r in data["conversions"]} == {"fp16", "int8"}
    assert all(r["bit_identical"] for r in data["conversions"])


@pytest.mark.skipif(not _extension.available(), reason="needs the compiled extension")
def test_bench_semi24_rows_name_the_isa(tmp_path, capsys):
    """--isa all: a row per instruction set for the C++ backend, each bit-identical, with its faults and the
    range of the per-round ratios; other backends have one row whatever the ISAs."""
    argv = ["bench", "semi24", "--quick", "--dtype", "fp16", "--isa", "all", "--repeat", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| backend | ISA |" in printed and "page faults / call" in printed
    data = _load(tmp_path)
    assert data["isas"] == _extension.available_isas()
    for op in ("compress", "decompress"):
        for weight in {r["weight"] for r in data["conversions"]}:
            rows = [r for r in data["conversions"] if r["op"] == op and r["weight"] == weight]
            assert sorted(r["isa"] for r in rows if r["backend"] == "cpu") == sorted(_extension.available_isas())
            assert [r["isa"] for r in rows if r["backend"] == "reference"] == ["-"]
            for r in rows:
                assert r["bit_identical"] is True, r
                low, high = r["ratio_rounds"]
                assert 0 < low <= r["ratio"] * (1 + 1e-9) and r["ratio"] <= high * (1 + 1e-9)
                assert r["faults_per_call"] >= 0 and r["torch_faults_per_call"] >= 0


def test_bench_semi24_isa_the_cpu_lacks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_extension, "available_isas", lambda: ["baseline"])
    assert cli.main(["bench", "semi24", "--quick", "--isa", "avx2", "--out", str(tmp_path)]) == 2
    assert "--isa avx2: this CPU runs baseline" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "semi24", "--repeat", "0"], "expected a positive integer, got 0"),
        (["bench", "semi24", "--repeat", "many"], "expected a positive integer, got 'many'"),
        (["bench", "semi24", "--dtype", "fp64"], "invalid choice: 'fp64'"),
        (["bench", "semi24", "--isa", "sse"], "invalid choice: 'sse'"),
        (["bench", "semi24", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench"], "required: BENCHMARK"),
        (["bench", "nosuch"], "invalid choice: 'nosuch'"),
    ],
    ids=["repeat-zero", "repeat-text", "bad-dtype", "bad-isa", "unknown-option", "no-benchmark", "unknown-benchmark"],
)
def test_bench_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_out_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["bench", "semi24", "--quick", "--dtype", "fp16", "--out", str(blocker)]) == 1
    assert "sparsekern bench semi24:" in capsys.readouterr().err


def test_bench_reports_wrong_results(tmp_path, monkeypatch, capsys):
    """A backend whose output is not torch's is shown as NO and fails the run; one that raises becomes a row."""
    real = sparsekern.semi24_compress

    def wrong(dense, backend="auto"):
        packed, meta = real(dense, backend=backend)
        if backend == "cpu":
            raise RuntimeError("boom")
        return packed, meta ^ 1

    monkeypatch.setattr(sparsekern, "semi24_compress", wrong)
    assert cli.main(["bench", "semi24", "--quick", "--dtype", "fp16", "--repeat", "1", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "| NO |" in captured.out
    assert "not bit-identical" in captured.err
    rows = [r for r in _load(tmp_path)["conversions"] if r["op"] == "compress"]
    assert all(r["bit_identical"] is False for r in rows if r["backend"] == "reference")
    if _extension.available():
        assert any(r.get("error") == "failed: RuntimeError: boom" for r in rows if r["backend"] == "cpu")


def test_linear_rows_report_failures_instead_of_crashing():
    """On the CPU the 2:4 F.linear has no kernel: each format gets a row saying why, dense is still timed."""
    settings = semi24.Settings(repeat=1, warmup=0, max_time=None)
    weight = semi24.Weight("tiny", 64, 128, (16,))
    rows = semi24.linear_rows([weight], ["fp16", "int8"], settings, device="cpu", progress=False)
    assert [r["format"] for r in rows] == ["cutlass", "cusparselt"]  # int8 is not an F.linear dtype here
    for row in rows:
        assert row["dense"]["median"] > 0
        assert row["error"].startswith("failed: ")
    assert "cusparselt" in rows[1]["error"]
    section = semi24.linear_section(rows)
    assert len(section.rows) == 2 and section.rows[0][5].startswith("failed: ")


def test_conversion_backends_without_gpu():
    run, skipped = semi24.conversion_backends(gpu=False)
    assert ("reference", "cpu") in run
    assert all(device == "cpu" for _, device in run)
    assert "interpreter" in skipped["triton on cpu"]
    assert "no CUDA GPU" in skipped["cuda"]


def test_bits_equal_sees_signed_zeros():
    assert semi24.bits_equal(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert not semi24.bits_equal(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))


def test_pruned_weight_is_semi24_with_positive_zeros():
    for dtype, fmt in ((torch.float16, (4, 2)), (torch.int8, (4, 2)), (torch.float32, (2, 1))):
        w = semi24.pruned_weight((32, 128), dtype)
        group, kept = fmt
        assert ((w != 0).reshape(32, -1, group).sum(-1) <= kept).all()
        if dtype.is_floating_point:
            assert not torch.signbit(w[w == 0]).any()


# ---------------------------------------------------------------------------------------------------------
# harness


def test_measure_trivial_function():
    stats = harness.measure(lambda: sum(range(1000)), warmup=1, repeat=7)
    assert stats.n == 7
    assert stats.median > 0 and stats.iqr >= 0
    assert stats.min <= stats.q1 <= stats.median <= stats.q3 <= stats.max


def test_measure_min_time_and_max_time():
    assert harness.measure(lambda: None, repeat=1, min_time=0.02, memory=False).n > 1
    slow = harness.measure(lambda: time.sleep(0.01), repeat=1000, max_time=0.05, memory=False)
    assert 3 <= slow.n < 20
    assert slow.median >= 0.01


def test_measure_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        harness.measure(lambda: None, repeat=0)


def test_stats_round_trip_through_a_result_row():
    stats = harness.Stats.from_samples([0.3, 0.1, 0.2, 0.4], n=40, peak_bytes=123, memory_kind="k")
    assert (stats.median, stats.min, stats.max, stats.n) == (0.25, 0.1, 0.4, 40)
    row = json.loads(json.dumps(stats.to_dict()))  # as a report's JSON holds it, "iqr" included
    assert harness.Stats.from_dict(row) == stats
    assert harness.Stats.from_dict(None) is None
    with pytest.raises(ValueError, match="no samples"):
        harness.Stats.from_samples([])


def test_within_twice_rule_and_formats():
    eps = torch.finfo(torch.bfloat16).eps
    assert harness.within_twice(2e-3, 1e-3, 1.0, torch.bfloat16)
    assert not harness.within_twice(2.1e-3, 1e-3, 0.0, torch.float32)
    assert harness.within_twice(4 * eps, 0.0, 4.0, torch.bfloat16)  # dense exact: one rounding of the scale
    assert not harness.within_twice(5 * eps, 0.0, 4.0, torch.bfloat16)
    assert not harness.within_twice(float("nan"), 1.0, 1.0, torch.float32)
    assert [harness.fmt_pct(s) for s in (0.95, 0.5, 0.999)] == ["95%", "50%", "99.9%"]


def test_measure_cpu_peak_memory():
    if harness._rss_reset() is None:
        pytest.skip("this system cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    # 64 MiB is above glibc's largest mmap threshold (32 MiB), so it is fresh memory and raises RSS.
    stats = harness.measure(lambda: torch.ones(16 * 2**20), warmup=1, repeat=1)
    assert stats.peak_bytes is not None and stats.peak_bytes >= 60 * 2**20
    assert stats.memory_kind.startswith("peak RSS")


def test_environment_stamp():
    env = harness.environment()
    assert all(field in env for field in STAMP_FIELDS)
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu"]


def test_markdown_table_escapes_pipes():
    table = harness.markdown_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_write_report(tmp_path):
    md, js = harness.write_report(tmp_path / "new", "x", "# hi\n", {"rows": [1]})
    assert md.read_text() == "# hi\n" and json.loads(js.read_text()) == {"rows": [1]}


# ---------------------------------------------------------------------------------------------------------
# benchmarks/sweep.py


def _sweep(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep.py"), *args], capture_output=True, text=True, env=env
    )


def test_sweep_help():
    proc = _sweep("--help")
    assert proc.returncode == 0 and "--shape" in proc.stdout


def test_sweep_runs(tmp_path):
    proc = _sweep("--shape", "64x128", "--dtype", "fp16", "--backend", "cpu", "--repeat", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "semi24-sweep.json").read_text())
    assert {r["backend"] for r in data["conversions"]} <= {"cpu", "reference"}
    assert "reference" in {r["backend"] for r in data["conversions"]}  # the reference always runs
    assert all(r["bit_identical"] for r in data["conversions"])


def test_sweep_rejects_bad_shape():
    proc = _sweep("--shape", "100x100", "--dtype", "fp16")
    assert proc.returncode == 2 and "positive multiple of 32 rows" in proc.stderr
