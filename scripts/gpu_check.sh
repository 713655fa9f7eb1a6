#!/usr/bin/env bash
# One prepared command for a lent GPU machine (see scripts/gpu_check.py for what it measures):
#   bash scripts/gpu_check.sh OUTDIR          # on the GPU machine, with its preinstalled torch
#   bash scripts/gpu_check.sh OUTDIR --cpu    # dry mode on a CPU (what CI runs so the script keeps working)
#   ... --parts trainer,compiled --budget-s 300   # a subset, a time budget (gpu_check.py --help)
# The GPU machine has torch but not DeepSpeed and its pure-Python needs: they travel as wheels in .whl/
# (made here by scripts/gpu_wheels.sh; the device tool's `carry: [".whl"]`) and go to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUTDIR [--cpu]}
shift
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: DeepSpeed is not importable and there are no wheels in .whl/ (run scripts/gpu_wheels.sh here first)" >&2
    exit 2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
exec "$PY" scripts/gpu_check.py "$OUT" "$@"
