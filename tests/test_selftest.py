"""`sparsekern selftest --gpu` / scripts/gpu-check.sh, checked without a GPU: the exit code 2, the argument
handling, the pytest plugin and the tests stage (on a small fake suite), the sweeps stage and the crossover writer
(on recorded and freshly run `bench linear` sweeps), the report writer, and the orchestration with the stages
stubbed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from sparsekern import _extension, cli, selftest
from sparsekern.ops.sparse_linear import DENSITY_CROSSOVER, Crossover

NO_GPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEKERN_SELFTEST")}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------
# Without a GPU: exit code 2, early, with a clear message


def test_no_gpu_exits_2_before_writing_anything(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "sparsekern", "selftest", "--gpu", "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(**NO_GPU_ENV), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr and "nothing was built or run" in proc.stderr
    assert not out.exists()


def test_gpu_check_script_without_gpu_or_torch(tmp_path):
    script = str(ROOT / "scripts" / "gpu-check.sh")
    env = _env(PYTHON=sys.executable, **NO_GPU_ENV)
    proc = subprocess.run(
        ["bash", script, "--quick", "--out", str(tmp_path / "r")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU is visible" in proc.stderr
    proc = subprocess.run(["bash", script], env=_env(PYTHON="false"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "false has no torch; set PYTHON" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["selftest"], "the following arguments are required: --gpu"),
        (["selftest", "--gpu", "--budget", "0"], "expected a positive number of seconds, got '0'"),
        (["selftest", "--gpu", "--budget", "soon"], "expected a positive number of seconds, got 'soon'"),
        (["selftest", "--gpu", "--budget", "inf"], "expected a positive number of seconds, got 'inf'"),
        (["selftest", "--gpu", "--jobs", "0"], "expected a positive integer, got 0"),
        (["selftest", "--gpu", "--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_naming_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert cli.main(["selftest", "--gpu", "--out", str(target)]) == 2
    assert f"--out {target} is a file, not a directory" in capsys.readouterr().err


def test_arguments_parse():
    args = cli.build_parser().parse_args(
        [
            "selftest",
            "--gpu",
            "--quick",
            "--budget",
            "90",
            "--jobs",
            "3",
            "--arch",
            "8.0",
            "--",
            "tests/x.py",
            "-k",
            "y",
        ]
    )
    assert (args.quick, args.budget, args.jobs, args.arch) == (True, 90.0, 3, "8.0")
    assert args.pytest_args == ["tests/x.py", "-k", "y"]
    assert args.out == "bench-results/gpu-check" and not args.no_build and not args.no_sweeps


# ---------------------------------------------------------------------------------------------------------
# The tests stage and its pytest plugin

FAKE_SUITE = """
import os, time, pytest

def test_ok():
    pass

def test_fails():
    assert 1 == 2, "boom"

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_gpu_only():
    pass

def test_crashes():
    os._exit(3)

def test_sticky_cuda_error():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_after_the_crash():
    pass

@pytest.fixture
def broken():
    raise ValueError("setup broke")

def test_setup_error(broken):
    pass

@pytest.mark.xfail(reason="known", strict=False)
def test_known_bug():
    assert False
"""


def _fake_suite(tmp_path: Path, text: str = FAKE_SUITE) -> Path:
    path = tmp_path / "suite" / "test_fake.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(text))
    return path


def test_tests_stage_reports_every_failure_and_survives_crashes(tmp_path):
    suite = _fake_suite(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "tests.log"
    s = selftest.tests_stage(ROOT, sys.executable, 2, False, 240, work, log, [str(suite)])
    assert s["collected"] == 8 and s["ran"] == 8 and s["not_run"] == 0 and not s["timed_out"]
    assert s["counts"] == {"crashed": 1, "error": 1, "failed": 2, "passed": 2, "skipped": 1, "xfailed": 1}
    failures = {f["nodeid"].split("::")[1]: f for f in s["failures"]}
    assert set(failures) == {"test_fails", "test_crashes", "test_sticky_cuda_error", "test_setup_error"}
    assert "AssertionError: boom" in failures["test_fails"]["longrepr"]
    assert "ValueError: setup broke" in failures["test_setup_error"]["longrepr"]
    assert failures["test_crashes"]["outcome"] == "crashed"
    # both restarts happened: after the crash (exit 3) and after the sticky CUDA error (RESTART_EXIT)
    codes = sorted(code for codes in s["shard_exit_codes"].values() for code in codes)
    assert 3 in codes and selftest.RESTART_EXIT in codes
    assert s["skip_reasons"] == {"Skipped: needs a CUDA GPU": 1}
    text = log.read_text()
    assert "===== shard 0/2" in text and "===== shard 1/2" in text


def test_tests_stage_gpu_only_and_time_limit(tmp_path):
    suite = _fake_suite(
        tmp_path,
        """
        import time, pytest

        def test_cpu():
            pass

        @pytest.mark.triton
        def test_triton_kernel():
            pass

        @pytest.mark.parametrize("device", ["cpu", "cuda"])
        def test_device(device):
            if device == "cuda":
                time.sleep(600)
        """,
    )
    work = tmp_path / "work"
    work.mkdir()
    s = selftest.tests_stage(ROOT, sys.executable, 1, True, 15, work, tmp_path / "log", [str(suite)])
    # --quick keeps the GPU-relevant tests only: the triton-marked one and the cuda case; the cuda case hangs
    assert s["collected"] == 2 and s["timed_out"]
    assert s["counts"] == {"crashed": 1, "passed": 1}
    assert s["failures"][0]["nodeid"].endswith("test_device[cuda]")


def test_summarize_tests_records():
    records = [
        {"event": "collected", "shard": 0, "count": 5},
        {"event": "start", "nodeid": "a"},
        {"event": "setup", "nodeid": "a", "outcome": "passed", "duration": 0.5},
        {"event": "call", "nodeid": "a", "outcome": "failed", "duration": 1.0, "longrepr": "Trace A"},
        {"event": "teardown", "nodeid": "a", "outcome": "passed", "duration": 0.25},
        {"event": "finish", "nodeid": "a"},
        {"event": "start", "nodeid": "b"},
        {"event": "setup", "nodeid": "b", "outcome": "passed", "duration": 0.0},
        {"event": "call", "nodeid": "b", "outcome": "passed", "duration": 2.0},
        {"event": "teardown", "nodeid": "b", "outcome": "failed", "duration": 0.0, "longrepr": "Trace B"},
        {"event": "finish", "nodeid": "b"},
        {"event": "start", "nodeid": "c"},
        {"event": "setup", "nodeid": "c", "outcome": "passed", "duration": 0.0},
        {"event": "start", "nodeid": "d"},
        {"event": "setup", "nodeid": "d", "outcome": "skipped", "duration": 0.0, "reason": "why"},
        {"event": "teardown", "nodeid": "d", "outcome": "passed", "duration": 0.0},
        {"event": "finish", "nodeid": "d"},
    ]
    s = selftest.summarize_tests(records)
    assert (s["collected"], s["ran"], s["not_run"]) == (5, 4, 1)
    assert s["counts"] == {"crashed": 1, "error": 1, "failed": 1, "skipped": 1}
    by_id = {f["nodeid"]: f for f in s["failures"]}
    assert by_id["a"]["longrepr"] == "Trace A" and by_id["a"]["duration"] == 1.75
    assert by_id["b"]["longrepr"] == "[teardown]\nTrace B" and by_id["b"]["outcome"] == "error"
    assert by_id["c"]["outcome"] == "crashed"
    assert s["skip_reasons"] == {"why": 1}
    assert s["slowest"][0] == {"nodeid": "b", "duration": 2.0}


def test_read_records_drops_a_partial_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"event": "start", "nodeid": "a"}\n{"event": "fin')
    assert selftest.read_records(path) == [{"event": "start", "nodeid": "a"}]
    assert selftest.read_records(tmp_path / "missing.jsonl") == []


# ---------------------------------------------------------------------------------------------------------
# The build stage (its failures; the real build needs the GPU machine's toolkit and minutes)


def test_build_stage_failure_is_reported(tmp_path):
    (tmp_path / "sparsekern").mkdir()
    stale = tmp_path / "sparsekern" / "_C.abi3.so"
    stale.write_text("old")
    (tmp_path / "setup.py").write_text(
        "import os, sys\nprint('arch', os.environ['TORCH_CUDA_ARCH_LIST'])\nsys.exit(1)\n"
    )
    log = tmp_path / "build.log"
    result = selftest.build_stage(tmp_path, sys.executable, "9.0", 3, 60, log)
    assert result["problem"] == "the build failed (exit code 1; see build.log)"
    assert result["TORCH_CUDA_ARCH_LIST"] == "9.0" and result["MAX_JOBS"] == 3
    assert "arch 9.0" in log.read_text() and "arch 9.0" in result["log_tail"]
    assert not stale.exists()  # a library a process may have mapped is removed, never rewritten


def test_build_stage_time_limit(tmp_path):
    (tmp_path / "sparsekern").mkdir()
    (tmp_path / "setup.py").write_text("import time\ntime.sleep(600)\n")
    result = selftest.build_stage(tmp_path, sys.executable, "8.0", 1, 2, tmp_path / "build.log")
    assert result["problem"] == "the build ran past its 2 s limit" and result["exit_code"] is None


# ---------------------------------------------------------------------------------------------------------
# The sweeps: the plan covers the issue's figures, and its arguments parse


def test_sweep_plan_covers_issue_12():
    full = {s.name: s for s in selftest.sweep_plan(quick=False)}
    assert set(full) == {"semi24", "linear-triton", "linear-cuda", "grow-triton", "grow-cuda"}
    parser = cli.build_parser()
    semi24 = parser.parse_args(["bench", *full["semi24"].args])
    # the PyTorch 2:4 tutorial, BERT-base, ViT-L and Llama-7B MLP shapes, batch 1 to 2048, on the GPU backends
    assert set(semi24.shape) >= {(10240, 3072), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (4096, 11008)}
    assert semi24.batch == [1, 16, 64, 256, 2048] and semi24.backend == ["triton", "cuda"]
    for name in ("linear-triton", "linear-cuda"):
        linear = parser.parse_args(["bench", *full[name].args])
        assert linear.backend == name.split("-")[1] and {256, 2048} <= set(linear.batch)
        assert min(linear.sparsity) == 0.5 and max(linear.sparsity) == 0.99
        assert linear.dtype == ["fp32", "bf16"] and linear.mode == ["fwd", "fwdbwd"]
    for quick in (False, True):
        for sweep in selftest.sweep_plan(quick):
            args = parser.parse_args(["bench", *sweep.args, "--out", "x"])
            assert args.bench == sweep.json_name


# These run `bench` on the C++ CPU kernels, which CI's second pass switches off (SPARSEKERN_DISABLE_EXTENSION).
needs_extension = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")


@needs_extension
def test_semi24_shape_and_batch_options(tmp_path):
    from sparsekern.bench import semi24

    weights = semi24.select_weights(semi24.QUICK_WEIGHTS, [(4096, 11008), (64, 32)], [1, 64, 1])
    assert [w.label for w in weights] == ["11008x4096 (Llama-7B MLP 4096->11008)", "32x64"]
    assert all(w.tokens == (1, 64) for w in weights)
    assert semi24.select_weights(semi24.QUICK_WEIGHTS, None, None) == list(semi24.QUICK_WEIGHTS)
    argv = ["bench", "semi24", "--quick", "--shape", "256x128", "--dtype", "fp16", "--backend", "cpu", "--repeat", "1"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "semi24.json").read_text())
    assert {r["weight"] for r in data["conversions"]} == {"128x256"}
    assert {r["backend"] for r in data["conversions"]} == {"cpu"}
    assert data["skipped_backends"]["reference"] == "not selected"


@needs_extension
def test_sweeps_stage_runs_and_reads_back(tmp_path):
    plan = [
        selftest.Sweep(
            "linear-cpu",
            ("linear", "--quick", "--shape", "64x96", "--batch", "8", "--sparsity", "0.5", "--sparsity", "0.9")
            + ("--dtype", "fp32", "--repeat", "1"),
            1.0,
            "linear",
        ),
        selftest.Sweep("grow-cpu", ("grow", "--quick", "--isa", "sse"), 1.0, "grow"),  # refused by argparse: exit 2
    ]
    clock = selftest.Clock(300)
    results = selftest.sweeps_stage(ROOT, sys.executable, plan, clock, tmp_path, tmp_path / "bench.log")
    linear, grow = results["linear-cpu"], results["grow-cpu"]
    assert linear["status"] == "ok" and linear["exit_code"] == 0 and "| " in linear["markdown"]
    assert grow["status"] == "FAILED (exit code 2)" and "invalid choice: 'sse'" in grow["output_tail"]
    # the crossover writer reads a real sweep: 2 sparsities x 2 modes at B=8 (<= SMALL_BATCH)
    measured = selftest.measured_crossovers(linear["data"])
    assert measured["backend"] == "cpu" and set(measured["table"]) == {"fp32"}
    fields = measured["table"]["fp32"]
    assert fields["inference"] is None  # B=8 only: the small-batch field
    assert fields["small_batch"] in (0.0, 0.1, 0.5) and fields["training"] in (
        0.0,
        0.1,
        0.5,
    )  # 614 / 6144 nonzeros: 0.0999
    assert "NOT a CUDA sweep" in selftest.crossover_snippet(measured)


# ---------------------------------------------------------------------------------------------------------
# The crossover writer on a recorded sweep


def _row(label, batch, mode, sparsity, density, dtype="fp32"):
    return {"label": label, "batch": batch, "dtype": dtype, "mode": mode, "sparsity": sparsity, "density": density}


def _cross(label, batch, mode, beats, dtype="fp32", measured=True):
    return {
        "shape": label,
        "batch": batch,
        "dtype": dtype,
        "mode": mode,
        "measured": measured,
        "beats_dense_from": beats,
    }


RECORDED = {
    "backend": "triton",
    "device": "cuda",
    "density_crossover": {
        f"cuda:{name}": {"inference": 0.05, "small_batch": 0.05, "training": 0.05}
        for name in ("float32", "bfloat16", "float16")
    },
    "rows": [
        _row("768->3072", 2048, "fwd", 0.9, 0.10000016),
        _row("4096->4096", 2048, "fwd", 0.95, 0.05000001),
        _row("768->3072", 16, "fwd", 0.7, 0.3),
        _row("768->3072", 2048, "fwdbwd", 0.99, 0.01),
        _row("768->3072", 256, "fwd", 0.8, 0.2, "bf16"),
    ],
    "crossover": [
        _cross("768->3072", 2048, "fwd", 0.9),
        _cross("4096->4096", 2048, "fwd", 0.95),  # the smaller: the field's value
        _cross("768->3072", 16, "fwd", 0.7),
        _cross("768->3072", 2048, "fwdbwd", None),  # never beats dense: 0.0
        _cross("4096->4096", 2048, "fwdbwd", 0.99, measured=False),  # failed: ignored
        _cross("768->3072", 256, "fwd", 0.8, "bf16"),
    ],
}


def test_measured_crossovers_from_a_recorded_sweep():
    m = selftest.measured_crossovers(json.loads(json.dumps(RECORDED)))
    assert m["table"] == {
        "fp32": {"inference": 0.0501, "small_batch": 0.3, "training": 0.0},
        "bf16": {"inference": 0.2, "small_batch": None, "training": None},
    }
    assert [g["field"] for g in m["groups"]] == [
        "inference",
        "inference",
        "small_batch",
        "training",
        "training",
        "inference",
    ]
    assert m["groups"][4]["crossover"] is None
    # every weight at the sweep's sparsity takes the sparse path with the value written
    assert 0.05000001 <= m["table"]["fp32"]["inference"]


def test_crossover_snippet_is_the_tables_form():
    m = selftest.measured_crossovers(RECORDED)
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "date": "2026-12-03"}
    snippet = selftest.crossover_snippet(m, env)
    assert "NVIDIA H100 80GB HBM3" in snippet and "torch 2.11.0+cu130" in snippet and "NOT a CUDA" not in snippet
    entries = [line for line in snippet.splitlines() if not line.lstrip().startswith("#")]
    table = eval("{\n" + "\n".join(entries) + "\n}", {"torch": torch, "Crossover": Crossover})  # noqa: S307
    assert table == {
        ("cuda", torch.float32): Crossover(inference=0.0501, small_batch=0.3, training=0.0),
        ("cuda", torch.bfloat16): Crossover(inference=0.2, small_batch=0.05, training=0.05),
    }
    assert "# not measured, kept: small_batch, training" in snippet
    assert set(table) <= set(DENSITY_CROSSOVER)  # the keys the real table has


# ---------------------------------------------------------------------------------------------------------
# The report writer


def _report(**extra):
    report = {
        "command": "sparsekern selftest --gpu --quick",
        "quick": True,
        "budget_s": 180.0,
        "elapsed_s": 171.5,
        "environment": {"gpu": "NVIDIA H100", "gpu_capability": "9.0", "driver": "580.1", "torch": "2.11.0"},
        "stages": [
            {"name": "build", "status": "ok", "elapsed_s": 61.2, "limit_s": 90.0, "detail": ""},
            {"name": "tests", "status": "FAILED", "elapsed_s": 80.0, "limit_s": 100.0, "detail": "1 failed"},
        ],
        "problems": ["1 tests failed, errored or crashed (tracebacks below)"],
        "warnings": ["sweeps cut by the budget, without figures: grow-triton"],
        "tests": selftest.summarize_tests(
            [
                {"event": "collected", "shard": 0, "count": 1},
                {"event": "start", "nodeid": "tests/test_x.py::test_y"},
                {"event": "call", "nodeid": "tests/test_x.py::test_y", "outcome": "failed", "longrepr": "E  boom"},
                {"event": "finish", "nodeid": "tests/test_x.py::test_y"},
            ]
        ),
        "benches": {
            "semi24": {
                "status": "ok",
                "elapsed_s": 30.0,
                "command": "sparsekern bench semi24",
                "exit_code": 0,
                "markdown": "# sparsekern bench semi24\n\n## dense vs 2:4\n\n| a |\n|---|\n| 1 |\n",
                "data": {"rows": [1, 2, 3]},
            }
        },
        "crossover": {"measured": [selftest.measured_crossovers(RECORDED)], "snippet": "# snippet\n"},
        "exit_code": 1,
    }
    report.update(extra)
    return report


def test_write_report(tmp_path):
    (tmp_path / "tests.log").write_text("stale from an earlier run")
    big = "x" * (20 << 20)
    paths = selftest.write_report(tmp_path, _report(), {"build.log": "built", "bench.log": big})
    assert sorted(p.name for p in paths) == ["bench.log", "build.log", "report.json", "report.md"]
    assert not (tmp_path / "tests.log").exists()
    assert all(p.stat().st_size < 16 << 20 for p in paths)
    assert "bytes left out to keep this file under" in (tmp_path / "bench.log").read_text()
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# sparsekern GPU check: FAILED")
    assert "- FAILED: 1 tests failed" in md and "- note: sweeps cut by the budget" in md
    assert "### FAILED: `tests/test_x.py::test_y`" in md and "E  boom" in md
    assert "| build | ok | 61.2 | 90 |" in md
    assert "### sparsekern bench semi24" in md and "#### dense vs 2:4" in md  # the bench's headings nested
    assert "| fp32 | 0.0501 | 0.3 | 0.0 |" in md and "# snippet" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["exit_code"] == 1 and data["tests"]["counts"] == {"failed": 1}
    assert data["benches"]["semi24"]["data"]["rows"] == [1, 2, 3]


def test_write_report_limits(tmp_path):
    with pytest.raises(ValueError, match="at most 8 files, got 9"):
        selftest.write_report(tmp_path, _report(), {f"f{i}.log": "" for i in range(7)})
    passed = _report(problems=[], warnings=[], exit_code=0)
    selftest.write_report(tmp_path, passed)
    assert (tmp_path / "report.md").read_text().startswith("# sparsekern GPU check: PASSED")
    # a report.json over the limit drops the benches' rows first
    huge = _report()
    huge["benches"]["semi24"]["data"]["rows"] = ["y" * 1000] * 20_000
    text = selftest._fit_json(huge, 1 << 20)
    assert len(text) < 1 << 20 and "left out to fit" in json.loads(text)["benches"]["semi24"]["data"]["rows"]


# ---------------------------------------------------------------------------------------------------------
# The whole command with a pretend GPU and stubbed stages


@pytest.mark.parametrize("test_failure", [False, True])
def test_run_selftest_orchestration(tmp_path, monkeypatch, capsys, test_failure):
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(selftest, "_environment", lambda python: {"gpu": "Pretend H100", "torch": torch.__version__})

    def build(repo, python, arch, jobs, limit, log):
        calls["build"] = (arch, jobs, limit)
        log.write_text("build output\n")
        return {"seconds": 1.0, "exit_code": 0, "TORCH_CUDA_ARCH_LIST": arch}

    def tests(repo, python, jobs, gpu_only, limit, work, log, pytest_args):
        calls["tests"] = (jobs, gpu_only, limit, list(pytest_args))
        log.write_text("test output\n")
        records = [{"event": "collected", "shard": 0, "count": 1}, {"event": "start", "nodeid": "t"}]
        outcome = "failed" if test_failure else "passed"
        records += [{"event": "call", "nodeid": "t", "outcome": outcome, "longrepr": "E boom"}]
        records += [{"event": "finish", "nodeid": "t"}]
        return {**selftest.summarize_tests(records), "timed_out": False}

    def sweeps(repo, python, plan, clock, work, log):
        calls["sweeps"] = [s.name for s in plan]
        log.write_text("bench output\n")
        bench = {"status": "ok", "elapsed_s": 1.0, "command": "sparsekern bench linear", "exit_code": 0}
        return {"linear-triton": {**bench, "data": RECORDED}, "grow-triton": {**bench, "exit_code": None}}

    monkeypatch.setattr(selftest, "build_stage", build)
    monkeypatch.setattr(selftest, "tests_stage", tests)
    monkeypatch.setattr(selftest, "sweeps_stage", sweeps)
    out = tmp_path / "report"
    code = cli.main(["selftest", "--gpu", "--quick", "--out", str(out), "--jobs", "2", "--", "tests/test_a.py"])
    printed = capsys.readouterr().out
    assert code == (1 if test_failure else 0)
    assert calls["build"][:2] == ("9.0", os.cpu_count())
    assert calls["tests"][:2] == (2, True) and calls["tests"][3] == ["tests/test_a.py"]
    assert calls["sweeps"] == [s.name for s in selftest.sweep_plan(quick=True)]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.log", "build.log", "density_crossover.py", "report.json", "report.md", "tests.log"]
    assert len(names) <= selftest.MAX_FILES
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["build", "tests", "sweeps"]
    assert report["exit_code"] == code and report["environment"]["gpu"] == "Pretend H100"
    assert report["warnings"] == ["sweeps cut by the budget, without figures: grow-triton"]
    assert ("tests failed" in " ".join(report["problems"])) == test_failure
    assert '("cuda", torch.float32): Crossover(inference=0.0501' in (out / "density_crossover.py").read_text()
    for stage in ("build: ok in", "tests: ", "sweeps: "):
        assert stage in printed
    assert ("done: FAILED" in printed) == test_failure
