#!/usr/bin/env bash
# The GPU run in one command, for a machine with an NVIDIA GPU and no network (issue 12):
#   bash scripts/gpu-check.sh [--out DIR] [--quick] [--budget SECONDS] [--jobs N] [-- PYTEST_ARGS]
# builds the extension in place for the visible GPU (no pip, no index: the interpreter's own torch), runs the whole
# test suite on the GPU with compiled Triton, the GPU sweeps of `sparsekern bench semi24/linear/grow`, and writes
# DIR/report.md and DIR/report.json (default DIR: bench-results/gpu-check), printing each stage's time. Under 7
# minutes on an H100 with 16 cores (--quick: the GPU tests only and smaller sweeps, under 3).
# Exit code 0: all passed; 1: a build, test or bit-identity failure (see the report); 2: no GPU visible.
# The interpreter: PYTHON if set, else .venv/bin/python if there is one (and SPARSEKERN_VENV is not none), else python3.
# Same as: python -m sparsekern selftest --gpu ... (see sparsekern/selftest.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  venv=${SPARSEKERN_VENV:-.venv}
  if [ "$venv" != none ] && [ -x "$venv/bin/python" ]; then
    python=$venv/bin/python
  else
    python=python3
  fi
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "gpu-check: $python has no torch; set PYTHON to the interpreter whose torch should run the check" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m sparsekern selftest --gpu "$@"
