"""Step 5 of `make gpu-check`: time and peak memory of every path at the six paper shapes.

Shapes at their paper batch sizes (ImageNet pairs B=256, CIFAR pairs B=64), float32 and
bfloat16 (autocast, float32 parameters), passes forward (autograd recording) and
forward+backward (gradients from the loss and the features). Paths: the eager literal
(`reference`), the compiled literal (`reference-compiled`, torch.compile; the first
call's seconds reported apart as `compile_s`), every norm_fast backend x algorithm,
`norm_fast-auto`, and `norm_fast-auto-cudagraph` (auto's whole step captured in one CUDA
graph and replayed; a capture failure is recorded with its reason).

Time (CUDA): CUDA events around each call, after a 256 MiB write that flushes the L2
(60 MB on an H200) outside the events, so every call reads its inputs from HBM, as in
training; 3 warm-up calls, then 10-100 timed calls (about ROW_SECONDS per row); median
and interquartile range. DRY_RUN (CPU): wall clock, benchmarks/timing.py's QUICK policy.
Peak memory: benchmarks/memory.py (max_memory_allocated after a reset, minus inputs).

Order (most important first; the deadline turns the rest into "skipped: budget"):
resnet34-resnet18 forward+backward in float32 then bfloat16, then its forward, every path
including the compiled literal; then the other shapes' eager paths and the graph
(forward+backward first); then their compiled literal.
Records: `make bench`'s format (report.REQUIRED_KEYS and more), results.json rewritten
after every (shape, dtype); run_info.json gets the timing method.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional

import torch

from . import gpu_common as C
from . import memory, paths, report, steps, timing
from .shapes import SHAPES

ROW_SECONDS = 0.25
WARMUP_CALLS = 3
MIN_REPS, MAX_REPS = 10, 100
FLUSH_BYTES = 256 * 2**20
COMPILE_RESERVE_S = {False: 60.0, True: 5.0}   # (GPU, DRY_RUN): no compile starts with less left
GRAPH = paths.PathSpec("norm_fast-auto-cudagraph", "auto", "auto")

CUDA_TIMING = (f"CUDA events around each call, L2 flushed before each ({FLUSH_BYTES >> 20} MiB "
               f"write outside the events); {WARMUP_CALLS} warm-up calls, then "
               f"{MIN_REPS}-{MAX_REPS} calls (about {ROW_SECONDS}s per row); median and "
               "interquartile range")
CPU_TIMING = ("DRY_RUN: wall clock of 2 calls after the first call and the memory call "
              "(benchmarks/timing.py time_rounds); rehearsal numbers, not measurements")


# --- closures ----------------------------------------------------------------------------

def make_step(call: Callable, module: torch.nn.Module, shape, device: torch.device,
              dtype: torch.dtype, pass_: str, autocast_cache: bool = True, inputs=None):
    """steps.make_step without the trailing device synchronisation (the CUDA events
    bracket the work; a sync inside would add the host's wake-up to every time)."""
    return steps.make_step(call, module, shape, device, dtype, pass_, sync=False,
                           autocast_cache=autocast_cache, inputs=inputs)


def capture_graph(call, module, shape, device, dtype, pass_):
    """auto's whole step (forward, or forward+backward with fresh gradients) recorded in
    one torch.cuda.CUDAGraph; returns the replay closure. Warm-up on a side stream first
    (the capture needs the allocator and the kernels already initialised); autocast's
    weight cache is off (a cached cast would be captured once and then go stale)."""
    step = make_step(call, module, shape, device, dtype, pass_, autocast_cache=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    step.clear()                      # gradients allocated inside the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    torch.cuda.synchronize()

    def replay():
        graph.replay()
    replay.clear = lambda: None
    replay.keep = (graph, static_out, step)
    return replay


# --- timing ---------------------------------------------------------------------------------

class EventTimer:
    """CUDA-event timing with an L2 flush before each call (triton.testing.do_bench's
    method, kept here so that its API changes between Triton versions do not matter)."""

    def __init__(self, device: torch.device):
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)

    def __call__(self, step: Callable) -> timing.Timing:
        for _ in range(WARMUP_CALLS):
            step()
        torch.cuda.synchronize()
        est = self._times(step, 2)
        reps = int(min(MAX_REPS, max(MIN_REPS, ROW_SECONDS / max(1e-6, min(est)))))
        return timing.Timing([t for t in self._times(step, reps)])

    def _times(self, step: Callable, reps: int) -> List[float]:
        start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()
            start[i].record()
            step()
            end[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(start, end)]   # seconds


def cpu_timer(step: Callable) -> timing.Timing:
    """DRY_RUN: the first call and the memory call were the warm-up; 2 timed calls."""
    return timing.time_rounds(step, 2)


# --- records --------------------------------------------------------------------------------

def base_record(path: paths.PathSpec, shape, dtype_name: str, pass_: str,
                device: torch.device) -> dict:
    """A record with `make bench`'s keys (see benchmarks/report.py)."""
    rec = {"shape": shape.name, "path": path.name, "requested_backend": path.backend,
           "requested_algorithm": path.algorithm, "dtype": dtype_name, "pass": pass_,
           "batch": shape.batch, "student_channels": shape.student_channels,
           "teacher_channels": shape.teacher_channels, "height": shape.height,
           "width": shape.width, "n": shape.n, "device": device.type,
           "compiled": path.compiled, "memory_method": memory.method(device),
           "time_ms": None, "peak_mem_bytes": None, "status": "pending"}
    try:
        rec["backend"], rec["algorithm"] = paths.resolved(path, shape, device.type)
    except Exception as exc:
        rec["backend"], rec["algorithm"] = path.backend, path.algorithm
        rec["status"], rec["error"] = "failed", C.error_text(exc)
    return rec


class Runner:
    """Times (shape, dtype) groups in priority order and keeps results.json current."""

    def __init__(self, out_dir: str, deadline: C.Deadline, device: torch.device):
        self.out_dir, self.deadline, self.device = out_dir, deadline, device
        self.records: List[dict] = []
        self.inputs: Dict[tuple, tuple] = {}
        self.timer = EventTimer(device) if device.type == "cuda" else cpu_timer
        self.info = C.read_json(C.out_path(out_dir, "run_info.json"), {})
        self.info.update({
            "timing_method": CUDA_TIMING if device.type == "cuda" else CPU_TIMING,
            "memory_method": memory.method(device),
            "memory_method_short": ("cuda max_memory_allocated minus inputs"
                                    if device.type == "cuda" else
                                    "cpu allocator events (torch.profiler), minus inputs"),
            "compile_backend": C.compile_backend(),
            "scaling": ("DRY_RUN tiny shapes: channels / 32, N=4, B=4 or 2" if C.dry_run()
                        else "paper batch sizes (ImageNet pairs 256, CIFAR pairs 64)"),
        })

    def save(self) -> None:
        records = [dict(r) for r in self.records]
        report.add_ratios(records)
        report.write_all(self.out_dir, records, [], self.info, final=False)

    def group(self, shape, dtype_name: str, pass_: str, path_list: List[paths.PathSpec],
              with_graph: bool, built: dict) -> None:
        """One pass of every path in `path_list` (+ the graph) at one (shape, dtype)."""
        dtype = steps.DTYPES[dtype_name]
        twins = {}
        for p in path_list:
            t = paths.twin(p, path_list, shape, self.device.type)
            if t is not None:
                twins[p.name] = t.name
        recs = {}
        if self.deadline.spent():        # nothing starts: record the group as skipped
            for p in path_list + ([GRAPH] if with_graph else []):
                self.records.append(dict(base_record(p, shape, dtype_name, pass_, self.device),
                                         status="skipped", error="budget"))
            return
        for p in path_list + ([GRAPH] if with_graph else []):
            rec = recs[p.name] = base_record(p, shape, dtype_name, pass_, self.device)
            self.records.append(rec)
            if p.name in twins:
                continue
            self._row(p, rec, shape, dtype, pass_, built)
            if rec["status"] != "skipped":
                self.save()
        for name, twin_name in twins.items():
            copied = {k: v for k, v in recs[twin_name].items() if k.startswith("time_")
                      or k in ("rounds", "peak_mem_bytes", "status", "error")}
            recs[name].update(copied, same_as=twin_name)
        self.save()

    def _row(self, p, rec, shape, dtype, pass_, built) -> None:
        label = f"{shape.name} B={shape.batch} {rec['dtype']} {pass_} {p.name}"
        if rec["status"] == "failed":
            return
        if self.deadline.spent():
            rec.update(status="skipped", error="budget")
            return
        if p is GRAPH and self.device.type != "cuda":
            rec.update(status="skipped", error="no CUDA (CUDA graphs)")
            C.say("timing", f"{label}: skipped: no CUDA")
            return
        try:
            key = "reference-compiled" if p.compiled else ("norm_fast-auto" if p is GRAPH else p.name)
            if key not in built:
                built[key] = self._build(p if p is not GRAPH else paths.PathSpec(
                    "norm_fast-auto", "auto", "auto"), shape)
            call, module = built[key]
            if p is GRAPH:
                try:
                    step = capture_graph(call, module, shape, self.device, dtype, pass_)
                except Exception as exc:
                    rec.update(status="failed", error="capture failed: " + C.error_text(exc))
                    C.say("timing", f"{label}: {rec['error']}")
                    self._settle()
                    return
                rec["cuda_graph"] = True
                rec["note"] = "peak memory: the graph's pool is allocated at capture"
            else:
                key_in = (shape.name, shape.batch, dtype)
                if key_in not in self.inputs:      # one set per (shape, dtype), not per row
                    self.inputs.clear()
                    self.inputs[key_in] = steps.make_inputs(shape, self.device, dtype)
                step = make_step(call, module, shape, self.device, dtype, pass_,
                                 inputs=self.inputs[key_in])
            if p.compiled:
                ckey = f"compile_s {rec['dtype']}"
                if ckey not in built and self.deadline.left() < COMPILE_RESERVE_S[C.dry_run()]:
                    rec.update(status="skipped", error="budget (too little left to "
                               "compile)")
                    return
                if ckey not in built:
                    t0 = time.perf_counter()
                    step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    built[ckey] = time.perf_counter() - t0
                rec["compile_s"] = round(built[ckey], 2)
            if p is not GRAPH:
                step()                                   # first call: kernels compiled
                rec["peak_mem_bytes"] = memory.peak_step_bytes(step, self.device)
            rec.update(self.timer(step).as_dict(), status="ok")
            C.say("timing", f"{label}: {report.fmt_ms(rec['time_ms'])} ms "
                  f"(IQR {report.fmt_ms(rec['time_iqr_ms'])}), "
                  f"{report.fmt_bytes(rec['peak_mem_bytes'])}"
                  + (f", compile {rec['compile_s']} s" if p.compiled else ""))
        except Exception as exc:
            rec.update(status="failed", error=C.error_text(exc))
            C.say("timing", f"{label}: failed: {rec['error']}")
            self._settle()

    def _settle(self) -> None:
        """After a failure: finish the device's queue and free the cache; an error that
        sticks to the CUDA context is recorded by the next row, not raised here."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as exc:
            C.say("timing", f"device error after a failure: {C.error_text(exc)}")

    def _build(self, p: paths.PathSpec, shape):
        if not p.compiled:
            return paths.build_module(p, shape, self.device)
        _, module = paths.build_module(paths.REFERENCE, shape, self.device)
        torch._dynamo.reset()    # a fresh cache per shape: no fallback to eager on a limit
        return torch.compile(module, dynamic=False, backend=C.compile_backend()), module


def plan():
    """[(shape, dtype, pass, eager paths?, compiled literal?)] in priority order: the main
    shape (both passes, both dtypes, every path), then the other shapes' eager paths
    (forward+backward first), then their compiled literal."""
    shapes = C.run_shapes(SHAPES)
    main, others = shapes[0], shapes[1:]
    passes = ("forward+backward", "forward")
    units = [(main, d, p, True, True) for p in passes for d in C.DTYPE_NAMES]
    units += [(s, d, p, True, False) for p in passes for s in others for d in C.DTYPE_NAMES]
    # shape by shape: the next shape's torch._dynamo.reset() drops this one's graphs
    units += [(s, d, p, False, True) for s in others for p in passes for d in C.DTYPE_NAMES]
    return units


def main(argv: Optional[List[str]] = None) -> int:
    args, device, deadline = C.step_args("benchmarks.gpu_timing", argv)
    runner = Runner(args.out, deadline, device)
    eager = [paths.REFERENCE] + C.norm_fast_paths(device.type)
    C.say("timing", f"paths: {', '.join(x.name for x in eager)}, reference-compiled "
          f"({C.compile_backend()}), {GRAPH.name}")
    # memory.peak_step_bytes collects garbage before every row: with torch and triton
    # loaded that is ~0.25 s a call; frozen start-up objects make it microseconds
    gc.freeze()
    try:
        run_units(runner, eager, device)
    finally:
        gc.unfreeze()        # (nanobind's leak check at exit would see frozen objects)
    return 0


def run_units(runner: Runner, eager: List[paths.PathSpec], device: torch.device) -> None:
    units = plan()
    last_eager = {u[0].name: i for i, u in enumerate(units) if u[3]}
    built_by_shape: Dict[str, dict] = {}
    for i, (shape, dtype_name, pass_, with_eager, with_compiled) in enumerate(units):
        built = built_by_shape.setdefault(shape.name, {})
        group = (eager if with_eager else []) + ([paths.REFERENCE_COMPILED] if with_compiled else [])
        runner.group(shape, dtype_name, pass_, group, with_graph=with_eager, built=built)
        eager_keys = [k for k in built if k != "reference-compiled" and
                      not k.startswith("compile_s")]
        if i == last_eager[shape.name] and eager_keys:  # keep only this shape's compiled one
            for key in eager_keys:
                del built[key]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    runner.save()


if __name__ == "__main__":
    raise SystemExit(main())
