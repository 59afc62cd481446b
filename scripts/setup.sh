#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv, the pinned dependencies, and an
# editable install of sparsekern with its C++/CUDA extension built. Quick when nothing changed (stamp files).
#   SPARSEKERN_BUILD_EXTENSION=0  pure-Python install (every op falls back to its reference)
#   SPARSEKERN_BUILD_CUDA=0       skip the CUDA sources even when a toolkit is found
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${SPARSEKERN_VENV:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"

# torch and triton come from this machine's disk (pip's configured mirror); never an isolated build env,
# which would fetch another multi-GB torch.
deps_hash=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "setup: installing dependencies (requirements-dev.txt)"
  "$py" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import torch, triton, pytest, pytest_benchmark, tqdm" # fail loudly if anything is missing
  echo "$deps_hash" > "$venv/.deps-stamp"
fi

build_hash=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat;
               echo "${SPARSEKERN_BUILD_EXTENSION:-1} ${SPARSEKERN_BUILD_CUDA:-1} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}") \
             | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.build-stamp" 2>/dev/null)" != "$build_hash" ] || ! "$py" -c "import sparsekern" 2>/dev/null; then
  echo "setup: building and installing sparsekern (editable)"
  rm -f sparsekern/_C*.so
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$py" -c "import sparsekern, json; print('setup: extension', json.dumps(sparsekern._extension.build_info()))"
  echo "$build_hash" > "$venv/.build-stamp"
fi
