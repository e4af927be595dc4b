"""Time (pytest-benchmark) and peak memory (extra_info) of every NORM path x shape x dtype x pass.

Each benchmark's `extra_info` holds the record of results.json (shape, path, backend and
algorithm that ran, dtype, pass, batch, peak_mem_bytes and the memory method), so
`--benchmark-json` output carries memory next to time. Groups are (shape, dtype, pass):
pytest-benchmark's table then compares the paths of one shape directly.
"""
from __future__ import annotations

import os
import time

import pytest

from benchmarks import memory, paths, steps, timing


def test_norm(benchmark, case, bench_config, module_cache, suite_policy):
    device = bench_config.device
    if module_cache.key == (case.path, case.shape, case.dtype) and module_cache.error:
        pytest.skip(module_cache.error)
    backend, algorithm = paths.resolved(case.path, case.shape, device.type)
    group, _ = paths.discover(device.type)
    twin = paths.twin(case.path, group, case.shape, device.type)
    if twin is not None:
        pytest.skip(f"same computation as {twin.name} at this shape ({backend}/{algorithm}): "
                    "timed there")
    try:
        call, module = module_cache.get(case, device)
        step = steps.make_step(call, module, case.shape, device, steps.DTYPES[case.dtype],
                               case.pass_)
        t0 = time.perf_counter()
        warm = timing.warm_up(step, suite_policy)   # compiles a compiled path
        warm_up_s = time.perf_counter() - t0
    except Exception as exc:
        # Only "this path cannot run on this device" is a skip; any other failure is a
        # failure of the benchmark (and of the path) and must show as one.
        if not isinstance(exc, RuntimeError) or "not available" not in str(exc):
            raise
        module_cache.error = f"{case.path.name} not available: {exc}"[:500]
        pytest.skip(module_cache.error)
    benchmark.group = f"{case.shape.name} {case.dtype} {case.pass_}"
    benchmark.extra_info.update({
        "shape": case.shape.name, "path": case.path.name, "backend": backend,
        "algorithm": algorithm, "requested_backend": case.path.backend,
        "requested_algorithm": case.path.algorithm, "dtype": case.dtype, "pass": case.pass_,
        "batch": case.shape.batch, "description": case.shape.describe(),
        "device": device.type, "warm_up_s": warm_up_s})
    # The memory measurement is one more warm call before the timed rounds.
    benchmark.extra_info["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
    benchmark.pedantic(step, rounds=timing.rounds_for(warm, suite_policy), iterations=1,
                       warmup_rounds=0)
    benchmark.extra_info["memory_method"] = memory.method(device)
    snap = bench_config.snapshot_dir
    if snap and device.type == "cuda" and (case.path.name == "reference"
                                           or case.path.is_fused_kernel):
        ok, msg = memory.save_cuda_snapshot(
            step, device, os.path.join(snap, case.id.replace("+", "-") + ".pickle"))
        benchmark.extra_info["memory_snapshot"] = msg if ok else f"failed: {msg}"
