#!/usr/bin/env bash
# Create .venv-recbole: RecBole 1.2.1 + CPU torch, pinned, apart from the project's .venv so
# the peer never touches the project's dependencies. Idempotent; run from anywhere.
#
#   bash bench/recbole/setup.sh && \
#   .venv/bin/python bench/recbole/export_splits.py && \
#   OMP_NUM_THREADS=1 .venv-recbole/bin/python bench/recbole/run_sasrec.py
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${RECBOLE_VENV:-.venv-recbole}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -r bench/recbole/requirements.txt
# --no-deps: recbole declares ray<=2.6.3 for its tuning module only (see requirements.txt).
"$VENV/bin/pip" install -q --no-deps recbole==1.2.1
"$VENV/bin/python" -c "import recbole, torch, numpy; print('recbole', recbole.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"
