"""`sparsekern tickets`: the quick run end to end, and every refusal before training."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sparsekern import cli
from sparsekern.tickets import cli as tickets_cli


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tickets")
    threads = torch.get_num_threads()
    try:
        # one thread: two on a busy 2-core machine spin-wait for each other
        code = cli.main(["tickets", "--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return code, out


def test_tickets_quick_writes_its_files(quick_run):
    code, out = quick_run
    assert code == 0
    for name in tickets_cli.OUT_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in tickets_cli.OUT_FILES[1:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_tickets_quick_json(quick_run):
    _, out = quick_run
    result = json.loads((out / "tickets.json").read_text())
    assert set(result) == {"config", "torch", "seeds", "summary", "level_connectivity", "instability", "adaptive"}
    assert result["config"]["sparsity"] == 0.8 and result["config"]["prune_fraction"] == 0.2
    assert result["adaptive"]["run"] is False  # not faked: the adaptive-ratio comparison is not wired in yet
    (run,) = result["seeds"]  # --quick: one seed
    levels = len(run["ticket"])
    # 20% of the remaining weights per round down to 80%: ceil(log(0.2) / log(0.8)) = 8 prunes, 9 levels
    assert levels == math.ceil(math.log(0.2) / math.log(0.8)) + 1 == 9
    assert run["sparsity"][0] == 0.0 and run["sparsity"][-1] == pytest.approx(0.8, abs=1e-3)
    assert all(a < b for a, b in zip(run["sparsity"], run["sparsity"][1:], strict=False))
    assert run["reinit"][0] is None and len(run["reinit"]) == levels
    for acc in run["ticket"] + run["reinit"][1:]:
        assert 0.0 <= acc <= 100.0
    assert run["ticket"][0] > 30.0  # two epochs of dense training learn the digits well above chance (10%)
    summary = result["summary"]
    assert [row["level"] for row in summary["table"]] == list(range(levels))
    assert len(summary["matching"]) == levels and len(summary["successive_barriers"]) == levels - 1
    assert summary["rewind_vs_reinit"] is None  # 80% never reaches the issue's >= 95% target: said so, not faked
    connectivity = result["level_connectivity"]
    assert connectivity["num_levels"] == levels and len(connectivity["pairs"]) == levels * (levels - 1) // 2
    for i in range(levels - 1):
        assert summary["successive_barriers"][i] == connectivity["barrier"][i][i + 1]
    for row in connectivity["barrier"]:
        assert all(0.0 <= b <= 1.0 for b in row)
    # each level's endpoint on the path is the level solution: its error is the ticket's test error
    path = dict(zip(connectivity["path"]["x"], connectivity["path"]["errors"], strict=True))
    for level in range(levels):
        assert 100.0 * (1.0 - path[float(level)]) == pytest.approx(run["ticket"][level], abs=1e-9)
    assert [row["k_epochs"] for row in result["instability"]] == [0, 1]
    for row in result["instability"]:
        assert 0.0 <= row["barrier"] <= 1.0 and len(row["pairs"]) == 1


def test_tickets_quick_prints_its_findings(tmp_path, capsys, monkeypatch):
    # the summary is built from the data: fake runs whose 96% level the reinit control wins
    runs = [
        {"seed": 4, "ticket": [90.0, 91.0, 80.0], "reinit": [None, 85.0, 85.0], "sparsity": [0.0, 0.5, 0.96]},
        {"seed": 5, "ticket": [92.0, 91.0, 82.0], "reinit": [None, 87.0, 86.0], "sparsity": [0.0, 0.5, 0.96]},
    ]

    class Levels:
        def barriers(self, reference):
            return [[0.0, 0.001, 0.2], [0.001, 0.0, 0.15], [0.2, 0.15, 0.0]]

    stability = [{"k_epochs": 0, "barrier": 0.05}]
    text, found = tickets_cli.summarize(tickets_cli.TicketsConfig.quick(), runs, Levels(), stability)
    # matching on the first seed's run (the one the connectivity measures): dense 90, level 2 at 80
    assert found["matching"] == [True, True, False]
    assert found["rewind_vs_reinit"]["wins"] == 0 and found["rewind_vs_reinit"]["agrees_with_papers"] is False
    assert "does NOT fully agree with Frankle & Carbin" in text
    assert found["levels"]["first_not_matching"] == 2 and found["levels"]["agrees_with_papers"] is True
    assert "level 2 is the first not matching dense in seed 4" in text and "15.00 points" in text
    assert "adaptive pruning ratio: not run" in text
    # a run whose level 1 already fails: nothing to compare its barrier with, said so rather than judged
    runs[0]["ticket"] = [90.0, 80.0, 80.0]
    text, found = tickets_cli.summarize(tickets_cli.TicketsConfig.quick(), runs, Levels(), stability)
    assert found["levels"]["first_not_matching"] == 1 and found["levels"]["agrees_with_papers"] is None
    assert found["levels"]["max_barrier_between_matching"] is None
    assert "no matching barrier to compare it with" in text and "0.10 points" in text


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(tickets_cli, "run_seed", refuse)
    monkeypatch.setattr(tickets_cli, "run_instability", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sparsity", "1"], r"--sparsity must lie in \(0, 1\), got 1.0"),
        (["--sparsity", "0"], r"--sparsity must lie in \(0, 1\), got 0.0"),
        (["--epochs", "0"], "--epochs must be a positive int, got 0"),
        (["--hidden", "-3"], "--hidden must be a positive int, got -3"),
        (["--seeds", "0"], "--seeds must be a positive int, got 0"),
        (["--seed", "-1"], r"--seed must be an int in \[0, 2\*\*32\), got -1"),
        (["--rewind-step", "-1"], "--rewind-step must be an int >= 0, got -1"),
        # --quick: 1438 training images in batches of 32, 2 epochs
        (["--rewind-step", "91"], "--rewind-step must be at most round 0's 90 steps, got 91"),
        (["--instability-epochs", "0,x"], "--instability-epochs must be comma-separated ints, got '0,x'"),
        (["--epochs", "2", "--instability-epochs", "0,2"], r"--instability-epochs must be epochs in \[0, 2\)"),
        (["--instability-epochs", "-1"], r"--instability-epochs must be epochs in \[0, "),
        (["--match-tol", "0"], r"--match-tol must lie in \(0, 100\) accuracy points, got 0.0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_tickets_refuses_bad_values_before_training(tmp_path, capsys, no_training, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"^sparsekern tickets: {message}"):
        cli.main(["tickets", "--quick", *argv, "--out", str(out)])
    assert capsys.readouterr().out == ""  # nothing printed, nothing run
    assert not out.exists()  # refused before the output folder is made


def test_tickets_refuses_an_unwritable_out_before_training(tmp_path, capsys, no_training):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    taken = tmp_path / "taken"
    (taken / "tickets.json").mkdir(parents=True)
    for out, message in [
        (a_file, "is not a writable folder (File exists)"),
        (a_file / "sub", "is not a writable folder (Not a directory)"),
        (taken, "holds 'tickets.json', which cannot be overwritten"),
        (Path("/proc"), "is not a writable folder ("),  # refuses new files even to root
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["tickets", "--quick", "--out", str(out)])
        assert str(exc.value).startswith(f"sparsekern tickets: --out {str(out)!r} {message}"), exc.value
        with pytest.raises(ValueError, match="^sparsekern tickets: out ") as exc:  # the library entry point too
            tickets_cli.run_tickets(tickets_cli.TicketsConfig.quick(), out)
        assert message in str(exc.value)
    assert capsys.readouterr().out == ""


def test_tickets_checks_for_matplotlib_before_training(tmp_path, monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"^sparsekern tickets: the plot needs matplotlib .*--no-plot skips it$"):
        cli.main(["tickets", "--quick", "--out", str(tmp_path)])
    with pytest.raises(AssertionError, match="training started"):  # --no-plot: past every check
        cli.main(["tickets", "--quick", "--no-plot", "--out", str(tmp_path)])
