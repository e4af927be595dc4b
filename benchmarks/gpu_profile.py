"""Step 6 of `make gpu-check`: one profiler pass at the main shape, and kernel rates.

1. torch.profiler over PROFILED_STEPS forward+backward steps of norm_fast-auto and of the
   eager literal at resnet34-resnet18 (B=256, 512->512, 7x7, N=8), float32: kernels
   launched per step, GPU busy time (the union of kernel intervals) against the step's
   wall time (busy / wall well under 1: the step is host-bound: launches and Python), and
   the top kernels by GPU time.
2. The achieved rate of norm_fast's main kernels (each available kernel set: `moments`,
   a C x C Gram over P positions, 2 C^2 P flop; `expand_mse_forward` with n=N (direct)
   and n=1 (the decomposed form's mean segment), 2 n C_t C_s P flop), float32 and
   bfloat16 inputs, against torch.mm of the same (M x K) @ (K x P) sizes in fp32
   (allow_tf32 off), TF32 (on) and bfloat16; CUDA events, median of 20 calls after 3.
DRY_RUN: the same code on CPU tensors (CPU ops instead of kernels, wall clock; TF32 and
GPU busy time "skipped: no CUDA"). Writes profile.txt, rewritten after each part.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch

from norm_fast import dispatch

from . import gpu_common as C
from . import paths
from .gpu_timing import make_step

PROFILED_STEPS = 5
RATE_CALLS, RATE_WARMUP = 20, 3


def _timed_ms(fn: Callable, device: torch.device, calls: int = RATE_CALLS) -> float:
    """Median milliseconds of `fn` (events on CUDA, wall clock on CPU)."""
    for _ in range(RATE_WARMUP):
        fn()
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _union_us(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def profile_path(path: paths.PathSpec, shape, device: torch.device) -> List[str]:
    """Lines: kernels per step, busy vs wall, top kernels of one path's fwd+bwd step."""
    from torch.profiler import ProfilerActivity, profile
    call, module = paths.build_module(path, shape, device)
    step = make_step(call, module, shape, device, torch.float32, "forward+backward")
    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            step()
        sync()
        wall_ms = 1e3 * (time.perf_counter() - t0) / PROFILED_STEPS
    want = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    evs = [e for e in prof.events() if e.device_type == want]
    if device.type == "cpu":            # top-level CPU ops stand in for kernels
        evs = [e for e in evs if e.cpu_parent is None]
    spans = [(e.time_range.start, e.time_range.end) for e in evs]
    busy_ms = _union_us(spans) / 1e3 / PROFILED_STEPS
    what = "kernels" if device.type == "cuda" else "top-level CPU ops (DRY_RUN)"
    lines = [f"{path.name} ({'/'.join(paths.resolved(path, shape, device.type))}), "
             f"float32 forward+backward, {PROFILED_STEPS} steps profiled:",
             f"  {what} per step: {len(evs) / PROFILED_STEPS:.1f}",
             f"  wall per step: {wall_ms:.3f} ms (profiler on)"]
    if device.type == "cuda":
        lines.append(f"  GPU busy per step: {busy_ms:.3f} ms = {100 * busy_ms / wall_ms:.0f}% "
                     f"of wall ({'host-bound' if busy_ms < 0.7 * wall_ms else 'GPU-bound'})")
    else:
        lines.append("  GPU busy time: skipped: no CUDA")
    totals = {}
    for e in evs:
        dur = (e.time_range.end - e.time_range.start) / 1e3
        n, t = totals.get(e.name, (0, 0.0))
        totals[e.name] = (n + 1, t + dur)
    all_ms = sum(t for _, t in totals.values()) or 1.0
    lines.append(f"  largest {what} (ms per step, calls per step, share of their time):")
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:8]:
        lines.append(f"    {t / PROFILED_STEPS:9.3f}  {n / PROFILED_STEPS:5.1f}  "
                     f"{100 * t / all_ms:4.0f}%  {name[:90]}")
    return lines


def rate_lines(shape, device: torch.device) -> List[str]:
    """TFLOP/s of the main kernels of each kernel set against torch.mm of their sizes."""
    B, C_s, C_t, L, n = shape.batch, shape.student_channels, shape.teacher_channels, \
        shape.height * shape.width, shape.n
    P = B * L
    gen = torch.Generator(device=device).manual_seed(0)
    lines = [f"kernel rates at {shape.name} ({shape.describe()}), P={P}: TFLOP/s (ms)"]
    sets = [(name, dispatch.REGISTRY[name][0]) for name, ok, _ in C.available_backends(device.type)
            if ok and name != "torch"]
    sizes = {"moments": (C_s, P, C_s), f"expand_mse n={n}": (n * C_t, C_s, P),
             "expand_mse n=1": (C_t, C_s, P)}

    def rnd(*s, dtype=torch.float32):
        return torch.randn(*s, generator=gen, device=device).to(dtype)

    header = f"  {'op':18s} {'M x K x N':>22s}  " + "  ".join(
        f"{c:>16s}" for c in ["mm fp32", "mm tf32", "mm bf16"] + [
            f"{k} {d}" for k, _ in sets for d in ("fp32", "bf16")])
    lines.append(header)
    for op, (M, K, N) in sizes.items():
        flop = 2.0 * M * K * N
        cells = []
        for prec in ("fp32", "tf32", "bf16"):
            if prec == "tf32" and device.type != "cuda":
                cells.append("skipped: no CUDA")
                continue
            dt = torch.bfloat16 if prec == "bf16" else torch.float32
            A, X = rnd(M, K, dtype=dt), rnd(K, N, dtype=dt)
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            try:
                ms = _timed_ms(lambda: torch.mm(A, X), device)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            cells.append(f"{flop / ms / 1e9:.3g} ({ms:.3g})")
            del A, X
        for name, ks in sets:
            for dt in (torch.float32, torch.bfloat16):
                try:
                    if op == "moments":
                        x = rnd(B, C_s, L, dtype=dt)
                        fn = lambda: ks.moments(x)
                    else:
                        nn_ = n if op.endswith(f"n={n}") and n != 1 else 1
                        x, t = rnd(B, C_s, L, dtype=dt), rnd(B, C_t, L, dtype=dt)
                        a, b = rnd(nn_ * C_t, C_s) / C_s ** 0.5, rnd(nn_ * C_t)
                        fn = lambda: ks.expand_mse_forward(x, t, a, b, None, nn_, False)
                    ms = _timed_ms(fn, device, RATE_CALLS if device.type == "cuda" else 2)
                    cells.append(f"{flop / ms / 1e9:.3g} ({ms:.3g})")
                except Exception as exc:
                    cells.append("failed: " + C.error_text(exc)[:40])
        lines.append(f"  {op:18s} {f'{M} x {K} x {N}':>22s}  " + "  ".join(f"{c:>16s}" for c in cells))
    lines.append("  (flop = 2 M K N; moments: the C x C Gram over P; expand_mse: the expansion "
                 "GEMM, its MSE epilogue not counted)")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args, device, deadline = C.step_args("benchmarks.gpu_profile", argv)
    shape = C.run_shapes([C.MAIN_SHAPE])[0]
    path = C.out_path(args.out, "profile.txt")
    lines = [f"profile at {shape.name} ({shape.describe()}) on {device.type}"
             + (" (DRY_RUN: CPU, tiny shape)" if C.dry_run() else ""), ""]
    parts = [lambda: profile_path(paths.PathSpec("norm_fast-auto", "auto", "auto"), shape, device),
             lambda: profile_path(paths.REFERENCE, shape, device),
             lambda: rate_lines(shape, device)]
    for part in parts:
        if deadline.spent():
            lines += ["skipped: budget", ""]
            continue
        try:
            lines += part() + [""]
        except Exception as exc:
            lines += [f"failed: {C.error_text(exc)}", ""]
        C.write_atomic(path, "\n".join(lines))
        C.say("profile", lines[-2] if len(lines) > 1 else "")
    C.write_atomic(path, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
