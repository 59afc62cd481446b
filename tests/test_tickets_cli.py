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
    # the adaptive ratio from the same init to the same final sparsity, in at most the fixed schedule's prunes
    adaptive = result["adaptive"]
    assert adaptive["subsample"] == tickets_cli.ADAPTIVE_SAMPLES
    assert set(adaptive) == {"subsample", "seeds", "same_sparsity", "fewer_prunes", "accuracy_gap", "spread",
                             "within_spread", "agrees_with_papers"}  # fmt: skip
    (row,) = adaptive["seeds"]
    own = run["adaptive"]
    prunes = len(own["ticket"]) - 1
    assert row["seed"] == run["seed"] and row["prunes_fixed"] == levels - 1 and row["prunes_adaptive"] == prunes
    assert 1 <= prunes <= levels - 1 and len(own["sparsity"]) == prunes + 1
    assert own["sparsity"][0] == 0.0 and own["sparsity"][-1] == run["sparsity"][-1] == row["sparsity_adaptive"]
    assert adaptive["same_sparsity"] is True
    assert row["accuracy_fixed"] == run["ticket"][-1] and row["accuracy_adaptive"] == own["ticket"][-1]
    assert 0.0 <= row["accuracy_adaptive"] <= 100.0
    assert row["accuracy_adaptive"] > 30.0  # the adaptive tickets learn too
    assert len(own["p_star"]) == len(own["pruned"]) == len(own["forward_passes"]) == prunes
    for p_star, pruned in zip(own["p_star"], own["pruned"], strict=True):
        assert p_star in {0.0, *(k / 10 for k in range(1, 10))} and 0.2 <= pruned <= max(p_star, 0.2) + 1e-12
    assert all(n > 0 for n in own["forward_passes"]) and row["forward_passes"] == sum(own["forward_passes"])
    assert own["epsilon"] > 0.0
    assert adaptive["spread"] is None and adaptive["agrees_with_papers"] is None  # one seed: no verdict
    assert adaptive["accuracy_gap"] == pytest.approx(row["accuracy_adaptive"] - row["accuracy_fixed"], abs=1e-12)


def test_tickets_quick_prints_its_findings(tmp_path, capsys, monkeypatch):
    # the summary is built from the data: fake runs whose 96% level the reinit control wins
    runs = [
        {"seed": 4, "ticket": [90.0, 91.0, 80.0], "reinit": [None, 85.0, 85.0], "sparsity": [0.0, 0.5, 0.96]},
        {"seed": 5, "ticket": [92.0, 91.0, 82.0], "reinit": [None, 87.0, 86.0], "sparsity": [0.0, 0.5, 0.96]},
    ]
    for run in runs:
        run["adaptive"] = _adaptive([90.0, run["ticket"][-1]], [0.0, 0.96], [0.9])

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
    assert "adaptive ratio (2 seeds): every seed reached the final sparsity in fewer prunes" in text
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


def _adaptive(ticket, sparsity, p_star, passes=10):
    return {"ticket": ticket, "sparsity": sparsity, "epsilon": 0.1, "p_star": p_star,
            "pruned": [max(p, 0.2) for p in p_star], "forward_passes": [passes] * len(p_star)}  # fmt: skip


def test_tickets_adaptive_summary_on_hand_made_runs():
    # fixed: 4 prunes to 0.9; final accuracies 80 and 84 (spread 4 points)
    fixed = {"ticket": [95.0, 94.0, 92.0, 90.0, 80.0], "sparsity": [0.0, 0.2, 0.36, 0.49, 0.9]}
    runs = [
        {"seed": 1, **fixed, "adaptive": _adaptive([95.0, 93.0, 79.0], [0.0, 0.6, 0.9], [0.6, 0.5], passes=7)},
        {"seed": 2, **fixed, "ticket": fixed["ticket"][:-1] + [84.0],
         "adaptive": _adaptive([95.0, 93.0, 81.0], [0.0, 0.6, 0.9], [0.6, 0.5])},
    ]  # fmt: skip
    lines, found = tickets_cli.summarize_adaptive(runs)
    text = "\n".join(lines)
    assert [(s["prunes_fixed"], s["prunes_adaptive"]) for s in found["seeds"]] == [(4, 2), (4, 2)]
    assert found["seeds"][0]["forward_passes"] == 14 and found["seeds"][0]["p_star"] == [0.6, 0.5]
    assert found["fewer_prunes"] and found["same_sparsity"] and found["spread"] == 4.0
    assert found["accuracy_gap"] == -2.0 and found["within_spread"] and found["agrees_with_papers"] is True
    assert "agrees with Paul et al." in text and "-2.00 points vs fixed" in text
    # more than the spread below: does not agree, said so
    runs[1]["adaptive"]["ticket"][-1] = 70.0  # adaptive 79, 70 (spread 9): mean 74.5 vs 82, gap -7.5
    lines, found = tickets_cli.summarize_adaptive(runs)
    assert found["spread"] == 9.0 and found["within_spread"] is True  # 7.5 < 9: still within
    runs[0]["adaptive"]["ticket"][-1] = 71.0  # 71, 70 (spread 1) vs 80, 84 (spread 4): gap -11.5
    lines, found = tickets_cli.summarize_adaptive(runs)
    assert found["within_spread"] is False and found["agrees_with_papers"] is False
    assert "does NOT agree with Paul et al." in lines[-1]
    # as many prunes as the fixed ratio in one seed: not fewer, so no agreement even with equal accuracy
    runs[0]["adaptive"] = _adaptive([95.0] * 5 + [80.0], [0.0, 0.2, 0.36, 0.49, 0.6, 0.9], [0.0] * 5)
    runs[1]["adaptive"]["ticket"][-1] = 84.0
    lines, found = tickets_cli.summarize_adaptive(runs)
    assert found["seeds"][0]["prunes_adaptive"] == 5 and found["fewer_prunes"] is False
    assert found["within_spread"] is True and found["agrees_with_papers"] is False
    assert "NOT every seed reached the final sparsity in fewer prunes" in lines[-1]
    # an adaptive run that ends at another sparsity is named
    runs[1]["adaptive"]["sparsity"][-1] = 0.8
    lines, found = tickets_cli.summarize_adaptive(runs)
    assert found["same_sparsity"] is False and "NOT every adaptive run ended at the same sparsity" in lines[-1]
