#!/usr/bin/env bash
# The float32 precision and robustness tests under the BLAS code paths and thread counts CI
# hosts differ by (docs/design.md section 4, "Measuring float32 error"): the default
# (AVX-512 on an AVX-512 host), AVX2 and SSE-compatible code paths of MKL (products),
# oneDNN (the literal's convolutions) and ATen (reductions), 1 and 2 threads.
# Each run prints the worst ratios ours/literal of the all-segments-converged regime.
#   bash tests/precision_envs.sh            (from the repository root, after `make venv`)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
status=0
for isa in default AVX2 COMPATIBLE; do
  for threads in 1 2; do
    env=(OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads)
    case $isa in
      AVX2) env+=(MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) ;;
      COMPATIBLE) env+=(MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default) ;;
    esac
    echo "=== ${env[*]}"
    env "${env[@]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_precision.py \
      tests/test_robustness.py 2>&1 | tail -1 || status=1
    for regime in one all; do
      env "${env[@]}" "$PY" tests/test_precision.py $regime | sed -n "s/^worst/  $regime: worst/p"
    done
  done
done
exit $status
