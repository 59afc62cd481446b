#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv, the pinned dependencies, and an
# editable install of sparsekern with its C++/CUDA extension built. Quick when nothing changed (stamp files).
#   SPARSEKERN_BUILD_EXTENSION=0  pure-Python install (every op falls back to its reference)
#   SPARSEKERN_BUILD_CUDA=0       skip the CUDA sources even when a toolkit is found
#   SPARSEKERN_VENV=DIR           the virtual environment to create and use (default .venv)
#   SPARSEKERN_VENV=none          no virtual environment: use the interpreter PYTHON (default python3) and its torch
#                                 and triton as they are (e.g. a GPU machine without network): nothing is installed
#                                 from pip's index, only sparsekern itself (pip install --no-build-isolation
#                                 --no-deps -e .), built against that torch. Supported: torch >= 2.11, triton >= 3.6.
#   TORCH_CUDA_ARCH_LIST          the GPU archs to build for (default: the visible GPU's, else setup.py's list)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${SPARSEKERN_VENV:-.venv}
python=${PYTHON:-python3}
if [ "$venv" = none ]; then
  py=$python
  if ! "$py" -c "import torch" 2>/dev/null; then
    echo "setup: SPARSEKERN_VENV=none uses the torch of $py, which has none (set PYTHON=...)" >&2
    exit 1
  fi
  for module in setuptools wheel; do
    if ! "$py" -c "import $module" 2>/dev/null; then
      echo "setup: SPARSEKERN_VENV=none builds with $py's own $module, which is missing" >&2
      exit 1
    fi
  done
  "$py" -c "import triton, pytest" 2>/dev/null \
    || echo "setup: note: $py lacks triton or pytest (the Triton backend and the tests need them)"
  # the stamps of this interpreter, outside any venv
  stamps=build/setup-stamps/$("$py" -c "import sys; print(sys.executable)" | sha256sum | cut -c1-16)
  mkdir -p "$stamps"
  echo "setup: using $("$py" -c "import sys, torch; print(sys.executable, 'with torch', torch.__version__)")"
else
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "$python" -m venv "$venv"
  fi
  py="$(cd "$venv" && pwd)/bin/python"  # absolute: the import checks below run from /
  stamps=$venv

  # torch and triton come from this machine's disk (pip's configured mirror); never an isolated build env,
  # which would fetch another multi-GB torch.
  deps_hash=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
  if [ "$(cat "$venv/.deps-stamp" 2>/dev/null)" != "$deps_hash" ]; then
    echo "setup: installing dependencies (requirements-dev.txt)"
    "$py" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
    "$py" -c "import torch, triton, pytest, pytest_benchmark, tqdm" # fail loudly if anything is missing
    echo "$deps_hash" > "$venv/.deps-stamp"
  fi
fi

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # build for the GPU in front of us (one arch: a faster build); without one, setup.py's list
  arch=$("$py" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')" 2>/dev/null || true)
  if [ -n "$arch" ]; then
    export TORCH_CUDA_ARCH_LIST=$arch
    echo "setup: building for the visible GPU (TORCH_CUDA_ARCH_LIST=$arch)"
  fi
fi

build_hash=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat;
               "$py" -c "import torch; print(torch.__version__)";
               echo "${SPARSEKERN_BUILD_EXTENSION:-1} ${SPARSEKERN_BUILD_CUDA:-1} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}") \
             | sha256sum | cut -d' ' -f1)
# import from / so that the check finds the installed package, not this folder
if [ "$(cat "$stamps/.build-stamp" 2>/dev/null)" != "$build_hash" ] || ! (cd / && "$py" -c "import sparsekern") 2>/dev/null; then
  echo "setup: building and installing sparsekern (editable)"
  rm -f sparsekern/_C*.so
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
  if ! import_error=$(cd / && "$py" -c "import sparsekern" 2>&1); then
    echo "$import_error" | tail -20 >&2
    echo "setup: installing sparsekern into $py failed (see the messages above; an 'externally managed'" \
         "interpreter needs a venv: python3 -m venv --system-site-packages DIR keeps its torch)" >&2
    exit 1
  fi
  (cd / && "$py" -c "import sparsekern, json; print('setup: extension', json.dumps(sparsekern._extension.build_info()))")
  echo "$build_hash" > "$stamps/.build-stamp"
fi
