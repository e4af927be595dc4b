# Two entry points, each doing all set-up on a fresh machine:
#   make bench   the main job: time and peak memory of the literal reference against norm_fast
#   make test    the test suite
# Both build .venv. Where a torch is already importable by python3 (a GPU machine with
# torch and triton preinstalled), the venv sees it; otherwise the CPU build
# torch==2.13.0 is installed (never an unpinned torch: that pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0

.PHONY: venv test bench bench-deps bench-suite gpu-check cuda-check triton-compat clean

# Last step: the package with the extras test + triton (pytest, pytest-benchmark, numpy,
# scikit-learn; triton is already there), without build isolation so that the C++
# extension is compiled now against this torch (pip keeps the torch and triton installed
# above: they satisfy the package's ranges).
$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_PIN)"
	$(PY) -c "import ninja, setuptools, wheel" 2>/dev/null || $(PY) -m pip install -q ninja "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	touch $@

venv: $(VENV)/.ready

test: venv
	$(PY) -m pytest -q tests

# The optional `bench` dependencies: plots (matplotlib) and the progress bar (tqdm).
bench-deps: venv
	$(PY) -c "import matplotlib, tqdm" 2>/dev/null || $(PY) -m pip install -q matplotlib tqdm

# Headline at the paper's batch sizes (lowered where this machine's time budget demands),
# the N and batch sweeps and the plots, into a new benchmarks/results/<device>/<date-time>/.
# About 8-9 minutes on a 2-core CPU (BENCH_BUDGET_S, default 480 s on CPU).
bench: bench-deps
	$(PY) -m benchmarks.run

# The full pytest-benchmark suite (every path x shape x pass x dtype), JSON for
# --benchmark-compare, into a new folder per run.
bench-suite: venv
	d=benchmarks/results/pytest-benchmark/$$(date +%Y%m%d-%H%M%S); mkdir -p $$d && \
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$$d/pytest_benchmark.json

# One prepared run for a lent GPU machine (no network, installs nothing, <= 8 min):
# environment, extension build, CUDA tests, correctness, timing, profile into $(OUT).
# `make gpu-check DRY_RUN=1`: the same run on the CPU, tiny shapes, <= 2 min (CI runs it
# through tests/test_gpu_check.py). See benchmarks/gpu_check.py.
DRY_RUN ?= 0
OUT ?=
gpu-check:
	DRY_RUN="$(DRY_RUN)" OUT="$(OUT)" bash benchmarks/gpu_check.sh

# The Triton kernels compiled for sm_90 (no GPU needed) with Triton 3.6, the GPU machine's,
# installed apart from the venv's Triton: a build that fails or spills there fails here.
TRITON_GPU_VERSION ?= 3.6.0
TRITON_GPU_DIR ?= build/triton-gpu-machine
triton-compat: venv
	$(PY) -c "import sys; sys.path.insert(0, '$(TRITON_GPU_DIR)'); import triton; assert triton.__version__ == '$(TRITON_GPU_VERSION)'" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps --upgrade --target $(TRITON_GPU_DIR) "triton==$(TRITON_GPU_VERSION)"
	PYTHONPATH=$(TRITON_GPU_DIR) $(PY) -m benchmarks.register_table --check

clean:
	rm -rf $(VENV) build *.egg-info

# Compile every CUDA source with nvcc alone (sm_80, sm_90), no GPU needed; prints
# registers and shared memory per kernel.
cuda-check:
	bash csrc/cuda_check.sh
