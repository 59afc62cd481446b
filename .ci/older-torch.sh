#!/usr/bin/env bash
# CI: sparsekern on the oldest torch/triton pair this machine's package mirror has near the GPU machine's (torch
# 2.11 + triton 3.6, issue 12): torch 2.13.0+cpu and triton 3.6.0 in a second virtual environment, with sparsekern
# installed through scripts/setup.sh's no-venv path (SPARSEKERN_VENV=none PYTHON=...: the interpreter's torch as it
# is, --no-build-isolation, no torch from pip's index during the set-up), then a smoke subset of the tests (Triton in
# its interpreter). It works on a copy of the tracked files, so the extension built against the older torch never
# replaces the one in this checkout. Took 7 minutes on the 2-core machine (MAX_JOBS=1): 0.7 to install the pair (2 the
# first time), 4 to build the extension, 2.3 for the tests (666 passed, 152 skipped); with issue 15's tests 12 minutes
# while other jobs shared the machine (1081 passed, 129 skipped; the tests 4.8 of them).
#   OLDER_TORCH_DIR=DIR  keep the venv and the copy there (default: a temporary folder, removed at the end)
#   PYTHON=python3       the interpreter that creates the venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
step() { echo; echo "== [older torch, $((SECONDS - start))s] $*"; }

torch_spec="torch==2.13.0+cpu"
triton_spec="triton==3.6.0"
work=${OLDER_TORCH_DIR:-}
if [ -z "$work" ]; then
  work=$(mktemp -d -t sparsekern-older-torch-XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
venv=$work/venv
src=$work/src

step "a second venv with $torch_spec and $triton_spec (from the local mirror)"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
# numpy < 2.4: triton 3.6's interpreter turns a loop bound such as tl.minimum(...) into an int through a 1-element
# array, which numpy 2.4 refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars; 2.3
# warns); triton 3.8's interpreter does not. Compiled Triton on a GPU is not affected.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$torch_spec" "$triton_spec" \
  "numpy<2.4" tqdm pytest pytest-benchmark setuptools wheel ninja 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step "a copy of the tracked files (so the build stays out of this checkout)"
rm -rf "$src"
mkdir -p "$src"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$src"

step "scripts/setup.sh through its no-venv path: SPARSEKERN_VENV=none PYTHON=$venv/bin/python"
torch_before=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
SPARSEKERN_VENV=none PYTHON="$venv/bin/python" bash "$src/scripts/setup.sh"
torch_after=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "setup.sh replaced the interpreter's torch ($torch_before -> $torch_after)" >&2
  exit 1
fi
(cd / && "$venv/bin/python" -c "
import sparsekern, torch
info = sparsekern._extension.build_info()
assert info['loaded'], info
assert sparsekern.__file__.startswith('$src'), sparsekern.__file__
print('ok: sparsekern from', sparsekern.__file__, 'with its extension on torch', torch.__version__)")

step "smoke tests on torch $torch_after (Triton in its interpreter)"
cd "$src"
selftest=tests/test_selftest.py
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_package.py tests/test_semi24_compress.py tests/test_sparse_linear.py tests/test_spmm_triton.py \
  tests/test_training_rigl.py tests/test_outer_topk.py::test_opcheck_triton_op \
  tests/test_ell_cpu.py tests/test_ell_triton.py tests/test_sparse_linear_ell.py tests/test_export_semi24.py \
  tests/test_structure_fan_in.py \
  tests/test_outer_topk.py::test_exclusion_forms_agree tests/test_outer_topk.py::test_near_full_exclusion_and_all_ties \
  $selftest::test_summarize_tests_records $selftest::test_measured_crossovers_from_a_recorded_sweep \
  $selftest::test_crossover_snippet_is_the_tables_form $selftest::test_write_report $selftest::test_run_selftest_orchestration

step "done in $((SECONDS - start))s"
