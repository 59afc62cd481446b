"""The CPU kernels' instruction-set selection: SPARSEKERN_CPU_ISA and set_cpu_isa force any ISA this CPU has, a
forced ISA it lacks (or an unknown name) is a clear ValueError from every op, and `sparsekern info` names it."""

from __future__ import annotations

import pytest
from helpers import isa_params, run_python

from sparsekern import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason=f"extension: {_extension.unavailable_reason}")
ISAS = ("avx512", "avx2", "baseline")


def test_available_isas_are_a_suffix_of_the_order():
    isas = _extension.available_isas()
    assert isas and isas[-1] == "baseline"
    assert tuple(isas) == ISAS[ISAS.index(isas[0]) :]
    assert _extension.build_info()["cpu_isa_supported"] == isas[0]


@pytest.mark.parametrize("cpu_isa", isa_params(), indirect=True)
def test_use_cpu_isa_switches_and_restores(cpu_isa):
    assert _extension.cpu_isa() == cpu_isa
    with _extension.use_cpu_isa("baseline"):
        assert _extension.cpu_isa() == "baseline"
    assert _extension.cpu_isa() == cpu_isa


def test_set_cpu_isa_refuses_bad_names_and_missing_isas():
    before = _extension.cpu_isa()
    with pytest.raises(ValueError, match=r"name must be one of avx512, avx2, baseline"):
        _extension.set_cpu_isa("sse9")
    missing = [isa for isa in ISAS if isa not in _extension.available_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match=rf"asks for {isa} kernels, but this CPU runs at most"):
            _extension.set_cpu_isa(isa)
    assert _extension.cpu_isa() == before  # nothing changed


@pytest.mark.parametrize("isa", ISAS)
def test_environment_variable_forces_or_refuses(isa):
    """In a fresh process (the variable is read once): an ISA the CPU has is used; one it lacks makes every op
    raise a ValueError naming the variable, and `sparsekern info` says so instead of crashing."""
    code = (
        "import torch, sparsekern\n"
        "from sparsekern import _extension\n"
        "from sparsekern._csr import CSRIndex\n"
        "from sparsekern.ops.sparse_linear import sparse_linear\n"
        "index = CSRIndex.from_mask(torch.rand(8, 16) < 0.5)\n"
        "x, v = torch.randn(5, 16), torch.randn(index.nnz)\n"
        "calls = {\n"
        "    'spmm': lambda: sparse_linear(x, v, index, backend='cpu', path='sparse'),\n"
        "    'outer_topk': lambda: sparsekern.outer_topk(x, torch.randn(5, 8), 3, backend='cpu'),\n"
        "    'semi24_compress': lambda: sparsekern.semi24_compress(torch.zeros(32, 64, dtype=torch.float16)),\n"
        "}\n"
        "for name, call in calls.items():\n"
        "    try:\n"
        "        call()\n"
        "        print(name, 'ran', _extension.cpu_isa())\n"
        "    except ValueError as exc:\n"
        "        print(name, 'refused', exc)\n"
        "from sparsekern import cli\n"
        "cli.main(['info'])\n"
    )
    result = run_python(code, SPARSEKERN_CPU_ISA=isa)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    if isa in _extension.available_isas():
        for name in ("spmm", "outer_topk", "semi24_compress"):
            assert f"{name} ran {isa}" in lines, result.stdout
        assert f"CPU kernels run {isa}" in result.stdout
    else:
        for name in ("spmm", "outer_topk", "semi24_compress"):
            assert any(
                line.startswith(f"{name} refused") and f"SPARSEKERN_CPU_ISA={isa} asks for {isa}" in line
                for line in lines
            ), result.stdout
        assert "CPU kernels: refused: " in result.stdout


def test_unknown_environment_value_is_refused():
    code = (
        "import torch, sparsekern\n"
        "try:\n"
        "    sparsekern.outer_topk(torch.randn(3, 4), torch.randn(3, 5), 2, backend='cpu')\n"
        "except ValueError as exc:\n"
        "    print('refused', exc)\n"
    )
    result = run_python(code, SPARSEKERN_CPU_ISA="avx10")
    assert result.returncode == 0, result.stderr
    assert "SPARSEKERN_CPU_ISA='avx10' is not an instruction set; use avx512, avx2 or baseline" in result.stdout


def test_isa_fixture_params_cover_the_machine():
    assert [p.values[0] for p in isa_params()] == _extension.available_isas()
