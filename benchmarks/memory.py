"""Peak memory of one step, above what was live when it started (inputs, parameters).

CUDA: `torch.cuda.reset_peak_memory_stats`, then one step;
      peak = max_memory_allocated - memory_allocated before the step.
CPU:  PyTorch's CPU allocator has no peak counter, so one step runs under
      `torch.profiler.profile(profile_memory=True)`, which records every allocation and
      free of PyTorch's CPU allocator in order; peak = the maximum of their running sum.
      It sees every tensor (eager ops, torch.compile'd kernels, extensions that allocate
      through ATen), not memory a library mallocs on its own; unlike peak RSS it does not
      depend on what glibc kept from earlier steps.
      The profiler's library (kineto) prints "USDT: ... profiler_start / profiler_stop"
      lines on stderr at every start and stop; `_quiet_kineto` raises its log threshold
      above them (KINETO_LOG_LEVEL=6, read when the profiler first starts) unless the user
      set KINETO_LOG_LEVEL.
Both count the step's outputs and whatever autograd saved, and start after the previous
call's gradients were dropped (`step.clear()`), so a step's own gradients are counted.
"""
from __future__ import annotations

import gc
import os
from typing import Callable, Tuple

import torch

CUDA_METHOD = ("cuda max_memory_allocated during one warm step minus memory_allocated "
               "before it (inputs and parameters excluded)")
CPU_METHOD = ("cpu allocator events: torch.profiler(profile_memory=True) over one warm step, "
              "peak of the running sum of PyTorch CPU allocations and frees (inputs and "
              "parameters excluded; memory malloc'ed outside PyTorch's allocator not seen)")


def method(device: torch.device) -> str:
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def _prepare(step: Callable[[], object]) -> None:
    clear = getattr(step, "clear", None)
    if clear is not None:
        clear()
    gc.collect()


def peak_step_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `step` above those live when it started."""
    _prepare(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    return _cpu_peak_bytes(step)


def _quiet_kineto() -> None:
    """Kineto logs at levels VERBOSE 0 .. ERROR 4 and USDT 5 (its trace markers, printed
    at every profiler start/stop); 6 keeps the terminal free of them. Kineto reads the
    variable when it initialises (the first profiler start), so this must run before."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _cpu_peak_bytes(step: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    _quiet_kineto()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and str(e.device_type()).endswith("CPU")]
    order = sorted(range(len(events)), key=lambda i: (events[i].start_ns(), i))
    running = peak = 0
    for i in order:
        running += events[i].nbytes()
        peak = max(peak, running)
    return int(peak)


def save_cuda_snapshot(step: Callable[[], object], device: torch.device, path: str,
                       max_entries: int = 200_000) -> Tuple[bool, str]:
    """One warm step recorded with `torch.cuda.memory._record_memory_history`, dumped to
    `path` (open it at https://pytorch.org/memory_viz). (ok, message)."""
    if device.type != "cuda":
        return False, "memory snapshots need CUDA"
    _prepare(step)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        torch.cuda.memory._record_memory_history(max_entries=max_entries)
        out = step()
        torch.cuda.synchronize(device)
        torch.cuda.memory._dump_snapshot(path)
        del out
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            torch.cuda.memory._record_memory_history(enabled=None)
        except Exception:
            pass
    return True, path
