"""The harness's ISA support: every report row names the ISA that ran it, and ``--isa`` is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsekern import _extension
from sparsekern.bench import CPU_ISAS, harness

ROOT = Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")


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
