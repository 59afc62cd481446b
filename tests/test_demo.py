"""`sparsekern demo` in its quick mode, and the embedded digits data set."""

from __future__ import annotations

import json

import pytest
import torch

from sparsekern import cli
from sparsekern.data import load_digits
from sparsekern.training.demo import METHODS


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
    table = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in METHODS]
    assert [line.split()[0] for line in table][-len(METHODS) :] == list(METHODS)
    results = json.loads((tmp_path / "results.json").read_text())
    by_method = {r["method"]: r for r in results["results"]}
    assert set(by_method) == set(METHODS)
    assert results["config"]["epochs"] == 3 and results["config"]["sparsity"] == 0.9
    for method, r in by_method.items():
        assert len(r["curve"]) == 3 and 0 <= r["accuracy"] <= 100 and r["wall_s"] > 0 and r["layer_ms"] > 0
        if method == "dense":
            assert r["report"] is None
        else:
            assert abs(r["report"]["overall"]["sparsity"] - 0.9) < 1e-3
            assert [layer["layout"] for layer in r["report"]["layers"]] == ["compressed"] * 3
    assert [row["round"] for row in by_method["imp"]["extra"]["rounds"]] == [0, 1, 2, 3]
    assert by_method["dense"]["accuracy"] > 50  # 3 epochs already learn the digits
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--methods must name some of"):
        cli.main(["demo", "--quick", "--methods", "dense,magic", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--sparsity must lie in \(0, 1\)"):
        cli.main(["demo", "--quick", "--sparsity", "1.5", "--out", str(tmp_path)])
