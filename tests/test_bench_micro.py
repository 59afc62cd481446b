"""``sparsekern bench micro`` (CI's kernel microbenchmarks with floors) and the harness's ISA support: every report
row names the ISA that ran it, ``--isa`` is checked, and a ratio under its floor fails the run naming the case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsekern import _extension, cli
from sparsekern.bench import CPU_ISAS, harness, micro

ROOT = Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")


def _load(out: Path) -> dict:
    assert (out / "micro.md").is_file()
    return json.loads((out / "micro.json").read_text())


def _tiny_cases() -> tuple[micro.Case, ...]:
    return (micro.QUICK[0], micro.QUICK[-1])  # spmm fwd and semi24_compress: the cheapest two


@needs_extension
def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    assert cli.main(["bench", "micro", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)
    isas = _extension.available_isas()
    assert data["isas"] == isas
    assert {(r["case"], r["isa"]) for r in data["rows"]} == {(c.name, isa) for c in micro.QUICK for isa in isas}
    for row in data["rows"]:
        assert row["ratio"] > 0 and row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        assert len(row["ratios"]) == micro.QUICK_SETTINGS.repeats
        assert row["status"] == "no floor" and row["floor"] is None  # quick cases have no floors
        # The ISA that ran is in the row and in both timings.
        assert row["op"]["cpu_isa"] == row["isa"] and row["baseline"]["cpu_isa"] == row["isa"]
    assert data["failures"] == []
    assert data["environment"]["extension_cpu_isa"] == _extension.cpu_isa()
    markdown = (tmp_path / "micro.md").read_text()
    assert "| case | ISA | sparsekern ms median (IQR) |" in markdown
    for case in micro.QUICK:
        for isa in isas:
            assert f"| {case.name} | {isa} |" in markdown and f"| {case.name} | {isa} |" in printed
    assert _extension.cpu_isa() == isas[0]  # the forced ISAs were restored


@needs_extension
def test_ratio_below_floor_fails_naming_the_case(tmp_path, monkeypatch, capsys):
    case = micro.QUICK[0]
    isa = _extension.available_isas()[-1]
    monkeypatch.setattr(micro, "FLOORS", {case.name: {isa: micro.Floor(1e6, observed=(2e6, 3e6))}})
    argv = ["bench", "micro", "--quick", "--isa", isa, "--repeats", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {case.name!r} on {isa}: ratio " in err
    assert "is below its floor 1000000.00x (calibration saw 2000000.00x-3000000.00x)" in err
    assert "1 case(s) failed or fell below their floors" in err
    rows = _load(tmp_path)["rows"]
    assert {r["status"] for r in rows if r["case"] == case.name} == {"BELOW FLOOR"}
    assert {r["status"] for r in rows if r["case"] != case.name} == {"no floor"}
    assert len(rows[0]["ratios"]) == 2


@needs_extension
def test_a_slow_op_fails_its_floor_and_a_fast_one_passes(tmp_path):
    """A fake op 20x slower than its baseline falls under a floor of 0.5x; the same floor passes an honest pair."""

    def make_slow():
        return (lambda: time.sleep(0.0005)), (lambda: time.sleep(0.01))

    def make_fair():
        return (lambda: time.sleep(0.002)), (lambda: time.sleep(0.001))

    cases = (micro.Case("slow op", "sleep", make_slow), micro.Case("fair op", "sleep", make_fair))
    isa = _extension.available_isas()[0]
    floors = {name: {isa: micro.Floor(0.5, observed=(0.9, 1.1))} for name in ("slow op", "fair op")}
    settings = micro.Settings(repeats=3, block_time=0.01)
    code, markdown, data = micro.run_micro(cases, [isa], settings, tmp_path, floors=floors, progress=False)
    assert code == 1
    assert [r["status"] for r in data["rows"]] == ["BELOW FLOOR", "ok"]
    assert len(data["failures"]) == 1 and data["failures"][0].startswith(f"'slow op' on {isa}: ratio 0.0")
    assert "| slow op |" in markdown and "| BELOW FLOOR |" in markdown


@needs_extension
def test_an_op_that_raises_fails_the_run_and_the_rest_still_runs(tmp_path):
    def broken():
        raise RuntimeError("kernel exploded")

    cases = (micro.Case("broken op", "none", lambda: (lambda: None, broken)), micro.QUICK[-1])
    isas = _extension.available_isas()[-1:]
    settings = micro.Settings(repeats=1, block_time=0.001)
    for calibrate in (None, 2):
        code, markdown, data = micro.run_micro(cases, isas, settings, tmp_path, calibrate=calibrate, progress=False)
        assert code == 1
        assert data["failures"][0] == f"'broken op' on {isas[0]}: failed: RuntimeError: kernel exploded"
        assert [r["status"] for r in data["rows"]] == ["FAILED", "no floor"]
        assert "| broken op | " in markdown and "| FAILED |" in markdown
    assert "broken op" not in data["suggested_floors"]


@needs_extension
def test_calibrate_prints_a_floors_table_and_never_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(micro, "QUICK", _tiny_cases())
    monkeypatch.setattr(micro, "FLOORS", {micro.QUICK[0].name: {"baseline": micro.Floor(1e6, observed=(1e6, 1e6))}})
    argv = ["bench", "micro", "--quick", "--isa", "baseline", "--repeat", "1", "--calibrate", "2"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = _load(tmp_path)
    assert len(data["calibration_runs"]) == 2
    source = data["suggested_floors"]
    assert source in printed and source.startswith("FLOORS: dict[str, dict[str, Floor]] = {")
    table = eval(source.split("=", 1)[1], {"Floor": micro.Floor})  # the table is valid Python for micro.py
    assert set(table) == {c.name for c in micro.QUICK}
    for name, by_isa in table.items():
        ratios = [r["ratio"] for run in data["calibration_runs"] for r in run if r["case"] == name]
        floor = by_isa["baseline"]
        assert floor.observed == pytest.approx((min(ratios), max(ratios)), abs=0.006)
        assert 0.5 * min(ratios) <= floor.floor <= micro.FLOOR_FACTOR * min(ratios)


def test_round_down_keeps_two_significant_digits():
    assert micro._round_down(2.3999) == 2.3
    assert micro._round_down(0.0567) == 0.056
    assert micro._round_down(123.9) == 120.0
    assert micro._round_down(0.0) == 0.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--isa", "sse9"], "invalid choice: 'sse9'"),
        (["--repeats", "0"], "expected a positive integer, got 0"),
        (["--repeat", "-3"], "expected a positive integer, got -3"),
        (["--calibrate", "0"], "expected a positive integer, got 0"),
        (["--dtype", "fp32"], "unrecognized arguments: --dtype fp32"),
    ],
    ids=["unknown-isa", "repeats-zero", "repeat-negative", "calibrate-zero", "no-dtype-option"],
)
def test_bad_arguments_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "micro", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@needs_extension
def test_an_isa_this_cpu_lacks_is_refused(tmp_path, monkeypatch, capsys):
    """On an AVX2-only CPU, --isa avx512 is a clear error (exit 2) before anything runs; emulated here."""
    monkeypatch.setattr(_extension, "available_isas", lambda: ["avx2", "baseline"])
    assert cli.main(["bench", "micro", "--quick", "--isa", "avx512", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "sparsekern bench micro: --isa avx512: this CPU (" in err and ") runs only avx2, baseline" in err
    assert not (tmp_path / "r").exists()


def test_without_the_extension_micro_refuses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPARSEKERN_DISABLE_EXTENSION": "1"}
    cmd = [sys.executable, "-m", "sparsekern", "bench", "micro", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "needs the compiled extension, which is not loaded (switched off by SPARSEKERN_DISABLE_EXTENSION)" in (
        proc.stderr
    )


# ---------------------------------------------------------------------------------------------------------
# harness: ISA helpers and the ISA of every row


def test_cli_isa_names_match_the_extension():
    assert CPU_ISAS == _extension.ISAS


@needs_extension
@pytest.mark.parametrize("isa", _extension.available_isas() or ["baseline"])
def test_isa_context_forces_and_restores(isa):
    before = _extension.cpu_isa()
    with harness.isa_context(isa) as running:
        assert running == isa == _extension.cpu_isa() == harness.current_isa()
        assert harness.measure(lambda: None, repeat=1, memory=False).cpu_isa == isa
        assert harness.environment()["extension_cpu_isa"] == isa
    assert _extension.cpu_isa() == before
    with harness.isa_context(None) as running:  # no --isa: the choice is left alone
        assert running == before


def test_isa_context_reads_args_and_refuses_bad_names(monkeypatch):
    import argparse

    with pytest.raises(ValueError, match=r"--isa: expected one of avx512, avx2, baseline, got 'sse9'"):
        with harness.isa_context(argparse.Namespace(isa="sse9")):
            pass
    if _extension.available():
        monkeypatch.setattr(_extension, "available_isas", lambda: ["baseline"])
        with pytest.raises(ValueError, match=r"--isa avx2: this CPU \(.+\) runs only baseline"):
            with harness.isa_context(argparse.Namespace(isa="avx2")):
                pass


def test_add_isa_argument():
    import argparse

    from sparsekern.bench import add_isa_argument

    one, many = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_isa_argument(one)
    add_isa_argument(many, multiple=True)
    assert one.parse_args([]).isa is None and one.parse_args(["--isa", "avx2"]).isa == "avx2"
    assert many.parse_args(["--isa", "avx2", "--isa", "baseline"]).isa == ["avx2", "baseline"]


def test_every_markdown_row_names_its_isa():
    """render_markdown adds an ISA column before the first timing column (or last), from Section.isa or the
    environment stamp, and leaves a table that has one alone."""
    env = {"extension_cpu_isa": "avx2"}
    timed = harness.Section("t", ["shape", "dense ms (IQR)", "ok"], [["4x4", "1.0", "ok"]], [])
    untimed = harness.Section("g", ["goal", "met"], [["fast", "yes"]], [], isa="baseline")
    own = harness.Section("o", ["case", "ISA", "ms"], [["c", "avx512", "2"]], [])
    text = harness.render_markdown("r", env, [], [timed, untimed, own])
    assert "| shape | ISA | dense ms (IQR) | ok |\n|---|---|---|---|\n| 4x4 | avx2 | 1.0 | ok |" in text
    assert "| goal | met | ISA |\n|---|---|---|\n| fast | yes | baseline |" in text
    assert "| case | ISA | ms |\n|---|---|---|\n| c | avx512 | 2 |" in text
    assert timed.headers == ["shape", "dense ms (IQR)", "ok"]  # the section itself is unchanged
    no_ext = harness.render_markdown("r", {"extension_cpu_isa": "not loaded: off"}, [], [timed])
    assert "| 4x4 | none | 1.0 | ok |" in no_ext


def test_stats_round_trip_keeps_the_isa():
    stats = harness.Stats.from_samples([3.0, 1.0, 2.0], n=9, cpu_isa="avx2")
    assert (stats.median, stats.min, stats.max, stats.n, stats.cpu_isa) == (2.0, 1.0, 3.0, 9, "avx2")
    again = harness.Stats(**{k: v for k, v in stats.to_dict().items() if k != "iqr"})
    assert again == stats
    assert harness.Stats(1, 1, 1, 1, 1, 1).cpu_isa == harness.current_isa()
    with pytest.raises(ValueError, match="no samples"):
        harness.Stats.from_samples([])
