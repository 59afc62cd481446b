"""`sparsekern demo` in its quick mode (its table and the wide-MLP section), and the embedded digits data set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern import cli
from sparsekern.data import load_digits
from sparsekern.training import demo
from sparsekern.training.demo import DEFAULT_METHODS, METHODS, WIDE_METHODS


def test_digits_data():
    images, labels = load_digits()
    assert images.shape == (1797, 64) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert sorted(set(labels.tolist())) == list(range(10))


def test_demo_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        # one thread: the quick run is a few seconds; two threads on a busy 2-core machine spin-wait for each other
        assert cli.main(["demo", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    small, wide_text = out.split("wide MLP, where the sparse layers pay off")
    table = [line for line in small.splitlines() if line.split()[:1] and line.split()[0] in METHODS]
    assert [line.split()[0] for line in table][-len(DEFAULT_METHODS) :] == list(DEFAULT_METHODS)
    results = json.loads((tmp_path / "results.json").read_text())
    by_method = {r["method"]: r for r in results["results"]}
    assert set(by_method) == set(DEFAULT_METHODS)
    assert results["config"]["epochs"] == 3 and results["config"]["sparsity"] == 0.9
    for method, r in by_method.items():
        assert len(r["curve"]) == 3 and 0 <= r["accuracy"] <= 100 and r["wall_s"] > 0 and r["layer_ms"] > 0
        if method in ("dense", "small_dense"):
            assert r["report"] is None
        else:
            sparsity = r["report"]["overall"]["sparsity"]
            if method == "rigl_2:4":
                assert sparsity == 0.5  # 2:4 whatever --sparsity says
            else:  # constant fan-in rounds each layer's budget to whole rows: at most half a row per layer
                assert abs(sparsity - 0.9) < (0.5 / 64 if method == "rigl_fan_in" else 1e-3)
            assert [layer["layout"] for layer in r["report"]["layers"]] == ["sparse"] * 3
    assert [row["round"] for row in by_method["imp"]["extra"]["rounds"]] == [0, 1, 2, 3]
    _check_structured_rows(by_method, small)
    _check_flops(by_method, table)
    assert by_method["dense"]["accuracy"] > 50  # 3 epochs already learn the digits
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # the wide-MLP section (quick: 64-256-256-10, 3 epochs, one seed), measured in this run
    assert wide_text.startswith(": MLP 64-256-256-10, B=256, 3 epochs, the 256x256 layer at 95% sparsity")
    wide_rows = [
        line.split()[0] for line in wide_text.splitlines() if line.split()[:1] and line.split()[0] in WIDE_METHODS
    ]
    assert wide_rows == list(WIDE_METHODS)
    assert "RigL on SparseLinear >= 4x dense per epoch" in wide_text
    wide = results["wide"]
    assert wide["config"]["hidden"] == 256 and wide["config"]["sparsity"] == 0.95 and wide["isa"]["cpu"]
    assert [r["method"] for r in wide["results"]] == list(WIDE_METHODS)
    for r in wide["results"]:
        assert r["s_per_epoch"] > 0 and len(r["runs"]) == 1 and 0 <= r["accuracy"] <= 100
        (run,) = r["runs"]
        assert len(run["epoch_s"]) == 3 and len(run["curve"]) == 3
        if r["method"] == "dense":
            assert r["speedup_vs_dense"] == 1.0 and run["report"] is None
        else:
            (layer,) = run["report"]["layers"]
            assert layer["nnz"] == round(0.05 * 256 * 256) and layer["shape"] == [256, 256]
            assert run["mask_updates"] == 4 and run["mask_moved"] > 0
    assert wide["results"][0]["accuracy"] > 50


def _check_flops(by_method, table):
    """The FLOPs column and JSON against the rules, from the quick run's own nonzero counts (hidden 64, ΔT 10)."""
    dense_weights = 64 * 64 + 64 * 64 + 64 * 10
    flops = {method: r["flops"] for method, r in by_method.items()}
    assert flops["dense"]["training"] == flops["dense"]["inference"] == 1.0 and flops["dense"]["rule"] == "dense"
    for method in ("static", "snip", "set", "rigl", "imp"):
        nnz = by_method[method]["report"]["overall"]["nnz"]  # flat inputs: one position per weight
        assert flops[method]["inference"] == pytest.approx(nnz / dense_weights, rel=1e-12)
    for method in ("static", "snip", "set"):
        assert flops[method]["training"] == flops[method]["inference"] and flops[method]["rule"] == "sparse"
    f_s = flops["rigl"]["inference"]
    assert flops["rigl"]["training"] == pytest.approx((3 * f_s * 10 + 2 * f_s + 1) / 11 / 3, rel=1e-12)
    # IMP: the sum of its rounds, each a full run at its round's density (round 0 dense: at least 1)
    rounds = by_method["imp"]["extra"]["rounds"]
    assert flops["imp"]["rule"] == "sparse x 4 rounds" and rounds[0]["sparsity"] == 0
    assert flops["imp"]["training"] == pytest.approx(sum(1 - row["sparsity"] for row in rounds), rel=1e-12)
    small = by_method["small_dense"]
    assert small["extra"]["weights"] == sum(
        a * b for a, b in zip([64, *small["extra"]["widths"]], small["extra"]["widths"], strict=False)
    )
    assert (
        flops["small_dense"]["training"]
        == flops["small_dense"]["inference"]
        == small["extra"]["weights"] / dense_weights
    )
    rows = {line.split()[0]: line.split() for line in table}
    assert rows["rigl"][5] == f"{flops['rigl']['training']:.3f}x" and rows["rigl"][6] == f"{f_s:.3f}x"


def _check_structured_rows(by_method: dict, out: str) -> None:
    """The fan-in row: every layer's nnz is rows x its fan-in, both kernels timed; the 2:4 row: the layers torch's
    float16 2:4 tensors take (multiples of 32 rows and 64 columns) exported, the 10-row head skipped with why."""
    fan_in = by_method["rigl_fan_in"]
    layers = {layer["name"]: layer for layer in fan_in["report"]["layers"]}
    for name, k in fan_in["extra"]["fan_in"].items():
        assert layers[name]["nnz"] == layers[name]["shape"][0] * k
    assert fan_in["extra"]["ell_layer_ms"] > 0 and fan_in["extra"]["csr_layer_ms"] > 0
    semi = by_method["rigl_2:4"]["extra"]
    assert semi["exported"] == ["0", "2"] and list(semi["skipped"]) == ["4"]
    assert "multiple of 32 rows" in semi["skipped"]["4"]
    assert 0 <= semi["fp16_accuracy"] <= 100
    assert "on the ELL kernels vs" in out and "identical to the trained model's in float16" in out


def test_demo_quick_new_methods(tmp_path, capsys):
    """The rows of the other methods of the literature, and their FLOPs under each one's rule."""
    threads = torch.get_num_threads()
    new = ["grasp", "synflow", "gmp", "snfs", "ste", "srste"]
    try:
        argv = ["demo", "--quick", "--no-wide", "--no-plot", "--threads", "1", "--methods", ",".join(new)]
        assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line.split()[:1] and line.split()[0] in new] == new
    by_method = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    dense_weights = 64 * 64 + 64 * 64 + 64 * 10
    for method, r in by_method.items():
        assert len(r["curve"]) == 3 and 0 <= r["accuracy"] <= 100
        layers = r["report"]["layers"]
        assert [layer["layout"] for layer in layers] == ["sparse"] * 3  # STE/SR-STE: converted after finalize()
        f_s = r["report"]["overall"]["nnz"] / dense_weights
        assert r["flops"]["inference"] == pytest.approx(f_s, rel=1e-12)
        expected = {
            "grasp": ("sparse", f_s),
            "synflow": ("sparse", f_s),
            "snfs": ("dense_gradient", (2 * f_s + 1) / 3),
            "ste": ("dense_gradient", (2 * f_s + 1) / 3),
            "srste": ("dense_gradient", (2 * f_s + 1) / 3),
        }
        if method in expected:
            rule, training = expected[method]
            assert r["flops"]["rule"] == rule and r["flops"]["training"] == pytest.approx(training, rel=1e-12)
    assert by_method["srste"]["report"]["overall"]["sparsity"] == 0.5  # 2:4 whatever --sparsity says
    for method in ("grasp", "synflow", "gmp", "snfs", "ste"):
        assert abs(by_method[method]["report"]["overall"]["sparsity"] - 0.9) < 1e-3
    # GMP: dense at first, pruned on its (per-layer, data-free) schedule: 3 f_S(t) summed over its 135 steps
    gmp = by_method["gmp"]["flops"]
    model = demo.make_mlp(64, 0)
    sparsekern.sparsify(model, 0.0)
    schedule = sparsekern.GMP(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=135,
                              delta_t=10, distribution="erk")  # fmt: skip
    expected = sum(sum(schedule.counts_at(t).values()) for t in range(1, 136)) / 135 / dense_weights
    assert gmp["rule"] == "schedule" and gmp["training"] == pytest.approx(expected, rel=1e-12)
    assert gmp["inference"] < gmp["training"] < 1.0


def test_demo_no_wide(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        argv = ["demo", "--quick", "--no-wide", "--methods", "dense", "--threads", "1", "--no-plot", "--out"]
        assert cli.main([*argv, str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "wide MLP" not in out and "wide dense" not in out
    assert json.loads((tmp_path / "results.json").read_text())["wide"] is None


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--methods must name some of"):
        cli.main(["demo", "--quick", "--methods", "dense,magic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--sparsity must lie in \(0, 1\)"):
        cli.main(["demo", "--quick", "--sparsity", "1.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^sparsekern demo: --wide-hidden must be a positive int, got 0$"):
        cli.main(["demo", "--quick", "--wide-hidden", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^sparsekern demo: --wide-sparsity must lie in \(0, 1\), got 0.0$"):
        cli.main(["demo", "--quick", "--wide-sparsity", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^sparsekern demo: --wide-delta-t must be a positive int, got 0$"):
        cli.main(["demo", "--quick", "--wide-delta-t", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^sparsekern demo: --threads must be >= 1, got 0$"):
        cli.main(["demo", "--quick", "--threads", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


@pytest.fixture
def no_training(monkeypatch):
    """Any run that gets past the checks fails the test at once instead of training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "run_seeds", refuse)
    monkeypatch.setattr(demo, "run_wide", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive int, got 0"),
        (["--epochs", "-1"], "--epochs must be a positive int, got -1"),
        (["--seeds", "0"], "--seeds must be a positive int, got 0"),
        (["--hidden", "0"], "--hidden must be a positive int, got 0"),
        (["--hidden", "-3"], "--hidden must be a positive int, got -3"),
        (["--sparsity", "0"], "--sparsity must lie in (0, 1), got 0.0"),
        (["--sparsity", "nan"], "--sparsity must lie in (0, 1), got nan"),
        (["--seed", "-1"], "--seed must be an int in [0, 2**32), got -1"),
        (["--seed", str(2**64)], f"--seed must be an int in [0, 2**32), got {2**64}"),
        (["--methods", ","], f"--methods must name some of {','.join(METHODS)} (or all), got ','"),
        (["--methods", "all,dense"], f"--methods must name some of {','.join(METHODS)} (or all), got 'all,dense'"),
        (["--wide-epochs", "0"], "--wide-epochs must be a positive int, got 0"),
        (["--wide-seeds", "-2"], "--wide-seeds must be a positive int, got -2"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_demo_refuses_bad_values_before_training(tmp_path, capsys, no_training, argv, message, quick):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *(["--quick"] if quick else []), *argv, "--out", str(out)])
    assert str(exc.value) == f"sparsekern demo: {message}"
    assert capsys.readouterr().out == ""  # nothing printed, nothing run
    assert not out.exists()  # checked before the output folder is even made


def test_demo_methods_all(tmp_path, monkeypatch):
    ran = []

    def record(method, cfg):
        ran.append(cfg.methods)
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "run_seeds", record)
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["demo", "--quick", "--no-plot", "--methods", "all", "--out", str(tmp_path)])
    assert ran == [METHODS] and set(DEFAULT_METHODS) < set(METHODS)


def _bad_folders(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    taken = tmp_path / "taken"
    (taken / "results.json").mkdir(parents=True)
    return [
        (a_file, "is not a writable folder (File exists)"),
        (a_file / "sub", "is not a writable folder (Not a directory)"),
        (taken, "holds 'results.json', which cannot be overwritten"),
        # /proc refuses new files even to root (a chmod would not stop root)
        (Path("/proc"), "is not a writable folder ("),
    ]


def test_demo_refuses_an_unwritable_out_before_training(tmp_path, capsys, no_training):
    for out, message in _bad_folders(tmp_path):
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--quick", "--out", str(out)])
        assert str(exc.value).startswith(f"sparsekern demo: --out {str(out)!r} {message}"), exc.value
        with pytest.raises(ValueError, match="^sparsekern demo: out ") as exc:  # the library entry point too
            demo.run_demo(demo.Config.quick(), out)
        assert message in str(exc.value)
    assert capsys.readouterr().out == ""


def test_demo_checks_for_matplotlib_before_training(tmp_path, monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"^sparsekern demo: the plot needs matplotlib .*--no-plot skips it$"):
        cli.main(["demo", "--quick", "--out", str(tmp_path)])
    with pytest.raises(AssertionError, match="training started"):  # --no-plot: past every check
        cli.main(["demo", "--quick", "--no-plot", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # the write probe leaves nothing behind


def test_config_check_names_fields():
    with pytest.raises(ValueError, match=r"^run: imp_prune_fraction must lie in \(0, 1\), got 1$"):
        demo.Config(imp_prune_fraction=1).check("run")
    with pytest.raises(ValueError, match=r"^run: lr must be a positive number, got -0.1$"):
        demo.Config(lr=-0.1).check("run")
    with pytest.raises(ValueError, match=r"^run: methods must name some of .*, got \('dense', 'magic'\)$"):
        demo.Config(methods=("dense", "magic")).check("run")
    with pytest.raises(ValueError, match=r"^run: batch must be a positive int, got True$"):
        demo.WideConfig(batch=True).check("run")
    assert demo.Config().check("run") == demo.Config()


def test_demo_header_names_only_the_methods_run():
    assert demo._starts(("dense", "rigl")) == "ERK"
    assert demo._starts(("synflow", "gmp")) == "ERK; SynFlow: global; GMP: dense to ERK"
    assert demo._starts(tuple(METHODS)) == (
        "ERK; SNIP, GraSP, SynFlow, IMP: global; GMP: dense to ERK; RigL fan-in: ERK, equal rows; RigL 2:4, SR-STE: 2:4"
    )
