#!/usr/bin/env bash
# The test command: sets everything up (scripts/setup.sh), then runs the test suite. Without a GPU the
# Triton tests run in the Triton interpreter on CPU tensors. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
venv=${SPARSEKERN_VENV:-.venv}
if [ "$venv" = none ]; then py=${PYTHON:-python3}; else py=$venv/bin/python; fi

if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  interpret=0
else
  interpret=1
fi
echo "== tests (Triton kernels $([ $interpret = 1 ] && echo 'in the interpreter' || echo 'on the GPU'))"
TRITON_INTERPRET=$interpret "$py" -m pytest -q "$@"
