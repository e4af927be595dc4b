#!/usr/bin/env bash
# `make gpu-check`: one prepared run for a lent GPU machine (python3 with torch and triton
# preinstalled, no network: installs nothing). All the work is in benchmarks/gpu_check.py
# (steps, time limits, the global deadline, the files); this wrapper picks the interpreter.
#
#   bash benchmarks/gpu_check.sh                 # GPU: <= 8 min, into $OUT
#   DRY_RUN=1 bash benchmarks/gpu_check.sh       # CPU rehearsal: tiny shapes, <= 2 min
#
# OUT (default benchmarks/results/<gpu name>/<date-time>/, DRY_RUN build/gpu-check-dry-run/
# <date-time>/) receives at most 8 flat files: summary.txt, run_info.json, tests.txt,
# correctness.json, results.json, results.md, results.png, profile.txt.
# GPU_CHECK_BUDGET_S overrides the total budget (default 450 s; DRY_RUN 105 s).
# GPU_CHECK_PY overrides the interpreter (default: .venv/bin/python when it imports torch,
# else python3). Not PY: the Makefile's own PY (.venv/bin/python) would reach us as that.
set -u
cd "$(dirname "$0")/.." || exit 2          # the repository root
PY="${GPU_CHECK_PY:-}"
if [[ -z "$PY" ]]; then
  PY=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
  fi
fi
case "${DRY_RUN:-0}" in
  ""|0|no|false) export GPU_CHECK_DRY_RUN=0 ;;
  *) export GPU_CHECK_DRY_RUN=1 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check ${OUT:+--out "$OUT"}
