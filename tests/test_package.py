"""Packaging facts: the build finds the CUDA toolkit itself, the pure-Python switch, no CUDA init on import,
`sparsekern info` tells which backend runs where and why, and every example in a public docstring runs."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_python
from torch import nn

import sparsekern

ROOT = Path(__file__).resolve().parents[1]
# The public modules (ops, layers, training, data): every file there holding a docstring example.
DOCTEST_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for folder in ("ops", "nn", "training", "data", "tickets")
    for path in (ROOT / "sparsekern" / folder).glob("*.py")
    if ">>> " in path.read_text()
)


def _setup_module():
    spec = importlib.util.spec_from_file_location("sparsekern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_find_cuda_root_without_cuda_home(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root = _setup_module().find_cuda_root()
    assert root is not None
    for part in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so"):
        assert (Path(root) / part).exists(), part


def test_cuda_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert _setup_module().find_cuda_root() == str(tmp_path)


def test_pure_python_switch(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BUILD_EXTENSION", "0")
    assert _setup_module().extensions() == ([], {})


def test_import_does_not_initialise_cuda():
    code = (
        "import torch\n"
        "def refuse(*a, **k): raise AssertionError('CUDA initialised')\n"
        "torch.cuda._lazy_init = refuse\n"
        "torch.cuda.init = refuse\n"
        "import sparsekern, sparsekern.nn, sparsekern.cli\n"
        "sparsekern.cli.build_parser()\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_info_reports_backends():
    result = subprocess.run([sys.executable, "-m", "sparsekern", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch" in out and "extension:" in out and "cpu: auto picks" in out
    assert "cpu: reference" in out


def test_info_without_extension_says_why():
    result = subprocess.run(
        [sys.executable, "-m", "sparsekern", "info"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SPARSEKERN_DISABLE_EXTENSION": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "extension: not loaded -- switched off by SPARSEKERN_DISABLE_EXTENSION" in result.stdout
    assert "cpu: auto picks reference" in result.stdout
    assert "on CPU tensors torch's scatter_/index_select (switched off by SPARSEKERN_DISABLE" in result.stdout


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "sparsekern", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "info" in result.stdout and "bench" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "sparsekern", "nonsense"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_doctest_modules_found():
    assert {"sparsekern.ops.spmm", "sparsekern.nn.sparse_linear", "sparsekern.training.sparsify"} <= set(
        DOCTEST_MODULES
    )


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    """The examples run as written, assuming only ``import torch, sparsekern`` and ``from torch import nn``."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    extraglobs = {"torch": torch, "nn": nn, "sparsekern": sparsekern}
    torch.manual_seed(0)
    for test in doctest.DocTestFinder().find(module, name, extraglobs=extraglobs):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    assert results.attempted > 0, f"{name} holds '>>> ' but no example ran"
