#!/usr/bin/env bash
# The main job: set up, then `sparsekern demo`: train an MLP on the embedded UCI digits with dense, RigL, SET,
# SNIP, static and IMP at 90% sparsity, then the wide MLP 64-4096-4096-10 (dense vs RigL on masked weights vs RigL
# on SparseLinear at 95%); prints the tables and writes sparsekern-demo/{results.json,accuracy.png}.
# Extra arguments are passed on (e.g. --quick, --sparsity 0.95, --out DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
venv=${SPARSEKERN_VENV:-.venv}
if [ "$venv" = none ]; then py=${PYTHON:-python3}; else py=$venv/bin/python; fi
exec "$py" -m sparsekern demo "$@"
