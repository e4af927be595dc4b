#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch and triton preinstalled, no network):
# environment, extension build, the test suite on CUDA, then `make bench`-style runs at
# the real shapes in float32 and bfloat16, all within GPU_CHECK_BUDGET_S (default 450 s,
# under 8 minutes). Installs nothing; runs python3 directly with PYTHONPATH=. .
#
#   bash benchmarks/gpu_check.sh            # results into $OUT (default ./gpu_out)
#   GPU_CHECK_STEPS="backends bench" bash benchmarks/gpu_check.sh    # a rerun of some steps
#
# Every step runs under `timeout`, its exit status and duration go to $OUT/summary.txt,
# its output to $OUT/logs.txt, and a failed step never stops the next one. Files in $OUT
# (8 at most, flat): summary.txt, logs.txt, results.json, results.md, results.png,
# run_info.json, and memory_snapshots.tar.gz when GPU_CHECK_SNAPSHOTS=1 and time is left.
# Commit them under benchmarks/results/<device name>/.
set -u
OUT="${OUT:-./gpu_out}"                 # relative to the caller's directory
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 2       # the repository root

PY="${PY:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
LOG="$OUT/logs.txt"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
START=$(date +%s)
: >"$SUMMARY"
: >"$LOG"
FAILED=0

STEPS=" ${GPU_CHECK_STEPS:-environment backends tests bench memory-snapshots} "

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT_S COMMAND...: run with a time limit; record status; never abort.
step() {
  local name="$1" limit="$2"; shift 2
  if [[ "$STEPS" != *" $name "* ]]; then
    echo "$name: not selected (GPU_CHECK_STEPS)" >>"$SUMMARY"
    return 0
  fi
  local remaining; remaining=$(left)
  if (( limit > remaining - 5 )); then limit=$(( remaining - 5 )); fi
  if (( limit < 10 )); then
    echo "$name: SKIPPED (time budget spent)" | tee -a "$SUMMARY"
    FAILED=1
    return 0
  fi
  echo "===== $name (limit ${limit}s) $(date -u +%H:%M:%S) =====" >>"$LOG"
  local t0=$SECONDS rc
  timeout -k 15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAILED"; fi
  [[ $status == ok ]] || FAILED=1
  echo "$name: $status (rc=$rc, $(( SECONDS - t0 ))s)" | tee -a "$SUMMARY"
  return 0
}

step environment 60 "$PY" - <<'PYEOF'
import os, platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
for mod in ("pytest", "pytest_benchmark", "ninja", "numpy"):
    try:
        __import__(mod); print(mod, "yes")
    except Exception as exc:
        print(mod, "no:", exc)
print("nvcc:", subprocess.run("command -v nvcc || ls /usr/local/cuda/bin/nvcc", shell=True,
                              capture_output=True, text=True).stdout.strip() or "not found")
os.system("nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv")
PYEOF

# Loads (JIT-builds, if needed) the C++/CUDA extension once, so the steps below find it built.
step backends 180 "$PY" - <<'PYEOF'
import warnings
from norm_fast import dispatch
warnings.simplefilter("ignore")
for b in ("torch", "triton", "cpp", "cuda"):
    print(b, dispatch.is_available(b))
PYEOF

step tests 180 "$PY" -m pytest -q tests -x -p no:cacheprovider

# Real shapes, float32 and bfloat16: eager paths, the training step (ResNet18, B=256,
# 224x224), then the compiled reference (fp32 shapes first); no measurement starts in the
# last 60 s, and what was not reached is recorded as "skipped" in results.json.
BENCH_LIMIT=$(( $(left) - 25 ))
if [[ "${GPU_CHECK_SNAPSHOTS:-0}" == 1 ]]; then BENCH_LIMIT=$(( BENCH_LIMIT - 60 )); fi
step bench $BENCH_LIMIT env BENCH_OUT="$OUT" BENCH_FULL=1 BENCH_DTYPES=float32,bfloat16 \
  BENCH_DEADLINE_S=$(( BENCH_LIMIT > 90 ? BENCH_LIMIT - 60 : BENCH_LIMIT / 3 )) "$PY" -m benchmarks.run

if [[ "${GPU_CHECK_SNAPSHOTS:-0}" == 1 ]]; then
  rm -rf "$WORK/snapshots"
  step memory-snapshots 55 env BENCH_OUT="$WORK/snapshot_run" BENCH_FULL=1 BENCH_QUICK=1 \
    BENCH_SHAPES=resnet34-resnet18 BENCH_DTYPES=float32 BENCH_PASSES=forward+backward \
    BENCH_STEP=0 BENCH_SKIP=reference-compiled BENCH_MEMORY_SNAPSHOT="$WORK/snapshots" \
    "$PY" -m benchmarks.run
  if compgen -G "$WORK/snapshots/*.pickle" >/dev/null; then
    tar -czf "$OUT/memory_snapshots.tar.gz" -C "$WORK" snapshots \
      && echo "memory snapshots: $(du -h "$OUT/memory_snapshots.tar.gz" | cut -f1)" | tee -a "$SUMMARY"
  fi
fi

echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$SUMMARY"
rm -rf "$WORK"
exit $FAILED
