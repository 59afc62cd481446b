#!/usr/bin/env bash
# The main job: set up, then measure 2:4 sparsity (`sparsekern bench semi24`). Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${SPARSEKERN_VENV:-.venv}/bin/sparsekern" bench semi24 "$@"
