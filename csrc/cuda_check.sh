#!/usr/bin/env bash
# Compile every CUDA source under csrc/ with nvcc alone, for sm_80 (A100) and sm_90
# (H100/H200), no GPU needed, and print ptxas' registers / shared memory / spills per
# kernel.  Then syntax-check the torch binding of the kernels (csrc/cuda/*.cpp)
# against the installed torch's headers, so a binding error shows up on machines
# without a CUDA build of torch too.  Exits non-zero on any compile error.
#
#   bash csrc/cuda_check.sh            (also: make cuda-check)
# Environment: NVCC (compiler; default: PATH, then /usr/local/cuda/bin/nvcc),
# CUDA_ARCHS (default "80 90"), PY (python with torch for the binding check; default
# .venv/bin/python, then python3; the check is skipped when none imports torch).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "cuda-check: nvcc not found (set NVCC, or put the CUDA toolkit on PATH)" >&2
  exit 2
fi
ARCHS="${CUDA_ARCHS:-80 90}"
# The toolkit root (for cuda_runtime.h): nvcc may be a wrapper script elsewhere.
CUDA_ROOT=""
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" \
    /usr/local/cuda; do
  if [[ -n "$root" && -f "$root/include/cuda_runtime.h" ]]; then CUDA_ROOT="$root"; break; fi
done
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "cuda-check: $("$NVCC" --version | tail -n 2 | head -n 1)"
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done

status=0
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
for src in "${SOURCES[@]}"; do
  log="$WORK/$(basename "$src").log"
  if ! "$NVCC" -std=c++17 -O3 "${GENCODE[@]}" -Xptxas -v -c "$src" \
      -o "$WORK/$(basename "$src").o" >"$log" 2>&1; then
    echo "cuda-check: FAILED to compile $src" >&2
    cat "$log" >&2
    status=1
    continue
  fi
  echo
  echo "== $src"
  # ptxas -v prints, per kernel and arch:
  #   Compiling entry function '<mangled>' for 'sm_90'
  #   <n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads
  #   Used <n> registers, used <n> barriers, <n> bytes smem
  awk '
    /Compiling entry function/ {
      match($0, /function .[^ ]+. for .sm_[0-9]+./); s = substr($0, RSTART, RLENGTH)
      split(s, p, "'"'"'"); name = p[2]; arch = p[4]; stack = 0; st = 0; ld = 0; next
    }
    /bytes stack frame/ {
      for (i = 1; i <= NF; i++) {
        if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i
        if ($(i+2) == "spill" && $(i+3) ~ /^stores/) st = $i
        if ($(i+2) == "spill" && $(i+3) ~ /^loads/) ld = $i
      }
      next
    }
    /Used [0-9]+ registers/ {
      regs = 0; smem = 0
      for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^registers/) regs = $i
        if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
      }
      if (name != "") print arch "\t" name "\t" regs "\t" smem "\t" st "/" ld "\t" stack
      name = ""
    }
  ' "$log" >"$WORK/table.tsv"
  # Readable kernel names: demangle, drop namespaces and the parameter list.
  cut -f2 "$WORK/table.tsv" | { command -v c++filt >/dev/null && c++filt || cat; } |
    sed -e 's/^void //' -e 's/([^()]*)$//' -e 's/[A-Za-z_]*::(anonymous namespace)::\|(anonymous namespace)::\|[A-Za-z_]*:://g' \
    >"$WORK/names.txt"
  paste "$WORK/table.tsv" "$WORK/names.txt" | sort -t$'\t' -k1,1 -k7,7 |
    awk -F'\t' 'BEGIN {
        printf "%-6s  %-44s  %9s  %10s  %13s  %11s\n", "arch", "kernel", "registers",
               "smem (B)", "spill st/ld", "stack (B)"
        printf "%-6s  %-44s  %9s  %10s  %13s  %11s\n", "------", "--------------------------------------------", "---------", "----------", "-------------", "-----------"
      }
      { printf "%-6s  %-44s  %9s  %10s  %13s  %11s\n", $1, $7, $3, $4, $5, $6 }'
done

# The torch binding of the kernels: host-compiler syntax check against torch's headers.
PY="${PY:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -z "$CUDA_ROOT" ]]; then
  echo "cuda-check: CUDA headers not found (set CUDA_HOME): binding syntax check skipped"
elif TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"; then
  SHIM=()
  if [[ ! -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    # A CPU build of torch ships c10/cuda headers without this generated one.
    mkdir -p "$WORK/shim/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
      >"$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
    SHIM=(-I"$WORK/shim")
  fi
  CXX_BIN="${CXX:-c++}"
  echo
  for src in csrc/cuda/*.cpp; do
    if "$CXX_BIN" -std=c++20 -fsyntax-only -DNORM_FAST_WITH_CUDA=1 "${SHIM[@]}" \
        -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -I"$CUDA_ROOT/include" \
        "$src" >"$WORK/binding.log" 2>&1; then
      echo "cuda-check: binding $src compiles against torch $("$PY" -c 'import torch; print(torch.__version__)')"
    else
      echo "cuda-check: FAILED binding syntax check of $src" >&2
      grep -E "error" "$WORK/binding.log" | head -n 40 >&2
      status=1
    fi
  done
else
  echo "cuda-check: no python with torch ($PY): binding syntax check skipped"
fi

exit $status
