#!/usr/bin/env bash
# The one command to run when a GPU/TPU is at hand (<= 8 minutes):
#   bash benchmarks/device_check.sh [--smoke] [--out DIR] [--budget-s S]
# 1. installs carried wheels from .whl/ (e.g. evosax, which the GPU image lacks) into
#    /tmp/site and puts it (and the repo) on PYTHONPATH;
# 2. runs benchmarks/device_check.py: `pytest -m device`, the matmul peak, the evaluator
#    throughput against the PyTorch loop, the compute dtypes, one paper-scale generation;
#    writes benchmarks/results/<machine>.json and .png.
# --smoke: the same steps at tiny sizes on CPU (tests/test_device_check.py runs it in make test).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
LIMIT=480  # the whole check, hard: the driver's own deadline is 450 s by default
for a in "$@"; do [ "$a" = "--smoke" ] && LIMIT=280; done
exec timeout -k 10 "$LIMIT" "$PY" benchmarks/device_check.py "$@"
