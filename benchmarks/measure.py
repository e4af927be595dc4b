"""Measuring a group of NORM paths at one shape, and the ResNet18 training step.

Per pass, each path is built (once for all passes; a compiled path is compiled by its
first call, timed as `compile_s`), its peak memory measured on its first warm call
(benchmarks/memory.py; that call also warms it up), further warm-up calls made up to the
policy's minimum time, and then the timed rounds of all paths of the group interleaved
(benchmarks/timing.py). An "auto" path whose code is that of a benchmarked concrete path
at this shape (`paths.twin`) is timed once, through its twin. A failure (compile error,
missing kernel, out of memory) is recorded in the path's records, never raised.
"""
from __future__ import annotations

import gc
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import memory, models, paths, report, shapes, steps, timing
from .progress import Progress

DEADLINE_ERROR = "time budget spent (BENCH_BUDGET_S / BENCH_DEADLINE_S)"


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def base_record(path: paths.PathSpec, shape: shapes.Shape, dtype_name: str,
                device: torch.device, extra: Optional[dict] = None) -> dict:
    rec = {"shape": shape.name, "path": path.name, "requested_backend": path.backend,
           "requested_algorithm": path.algorithm, "dtype": dtype_name, "batch": shape.batch,
           "paper_batch": shape.paper_batch, "batch_scaled": shape.batch != shape.paper_batch,
           "student_channels": shape.student_channels,
           "teacher_channels": shape.teacher_channels, "height": shape.height,
           "width": shape.width, "n": shape.n, "device": device.type, "compiled": path.compiled,
           "memory_method": memory.method(device), "time_ms": None, "peak_mem_bytes": None,
           "noisy": None}
    rec.update(extra or {})
    try:
        rec["backend"], rec["algorithm"] = paths.resolved(path, shape, device.type)
    except Exception as exc:
        rec["backend"], rec["algorithm"] = path.backend, path.algorithm
        rec["status"], rec["error"] = "failed", error_text(exc)
    # A norm_fast path that runs the literal reference (auto's choice on small maps).
    rec["reference_fallback"] = (not path.is_reference
                                 and (rec["backend"], rec["algorithm"]) == ("torch", "direct"))
    return rec


def result_text(rec: dict) -> str:
    if rec.get("same_as"):
        return f"same computation as {rec['same_as']} here (timed once)"
    if rec.get("status") == "ok":
        return (f"{report.fmt_ms(rec['time_ms'])} ms (IQR {report.fmt_ms(rec.get('time_iqr_ms'))}"
                f"{', noisy' if rec.get('noisy') else ''}), "
                f"{report.fmt_bytes(rec['peak_mem_bytes'])}")
    return f"{rec.get('status')}: {rec.get('error')}"


def label(rec: dict) -> str:
    where = f"B={rec['batch']} N={rec['n']}"
    sweep = f"[{rec['sweep']} sweep] " if rec.get("sweep") else ""
    return f"{sweep}{rec['dtype']} {rec['shape']} {where} {rec['path']} {rec['pass']}"


def measure_group(group: List[paths.PathSpec], shape: shapes.Shape, dtype_name: str,
                  pass_names: List[str], device: torch.device, policy: timing.Policy,
                  progress: Progress, deadline: float, snapshot_dir: str = "",
                  extra: Optional[dict] = None) -> List[dict]:
    """Records of every path in `group` at one (shape, dtype), for each pass; `extra`
    fields (sweep, batch_choice, ...) are added to every record."""
    dtype = steps.DTYPES[dtype_name]
    bases = {p.name: base_record(p, shape, dtype_name, device, extra) for p in group}
    failures: Dict[str, Optional[str]] = {p.name: bases[p.name].get("error") for p in group}
    built: Dict[str, tuple] = {}
    out: List[dict] = []
    twins = {}
    for p in group:
        try:
            t = paths.twin(p, group, shape, device.type)
        except Exception:
            t = None
        if t is not None:
            twins[p.name] = t.name
    for pass_ in pass_names:
        recs = {p.name: dict(bases[p.name], **{"pass": pass_}) for p in group}
        live = []                                    # (path, step, warm seconds)
        for p in group:
            rec = recs[p.name]
            if p.name in twins:
                continue                             # filled in from its twin below
            if time.time() > deadline:
                rec.update(status="skipped", error=DEADLINE_ERROR)
                continue
            if failures[p.name]:
                rec.update(status="failed", error=failures[p.name])
                continue
            progress.doing(label(rec))
            try:
                if p.name not in built:
                    built[p.name] = paths.build_module(p, shape, device)
                call, module = built[p.name]
                step = steps.make_step(call, module, shape, device, dtype, pass_)
                if p.compiled and "compile_s" not in bases[p.name]:
                    t0 = time.perf_counter()
                    step()                       # compiles (forward graph; backward lazily)
                    bases[p.name]["compile_s"] = rec["compile_s"] = time.perf_counter() - t0
                # The memory call is the first warm-up call (its peak does not depend on
                # warmth); warm_up then adds calls up to the policy's minimum time.
                t0 = time.perf_counter()
                rec["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
                first = time.perf_counter() - t0
                warm = first if first >= policy.min_seconds else timing.warm_up(
                    step, timing.Policy(min_calls=1, min_seconds=policy.min_seconds - first,
                                        max_calls=policy.max_calls))
                if snapshot_dir and device.type == "cuda" and (p.name == "reference"
                                                               or p.is_fused_kernel):
                    fname = (f"{shape.name}_B{shape.batch}_N{shape.n}_{p.name}_{dtype_name}_"
                             f"{pass_.replace('+', '-')}.pickle")
                    ok, msg = memory.save_cuda_snapshot(step, device, f"{snapshot_dir}/{fname}")
                    rec["memory_snapshot" if ok else "memory_snapshot_error"] = msg
                live.append((p, step, warm))
            except Exception as exc:
                failures[p.name] = error_text(exc)
                rec.update(status="failed", error=failures[p.name],
                           traceback=traceback.format_exc(limit=4))
        if live:
            rounds = timing.interleaved_rounds([w for _, _, w in live], policy)
            timings, errors = timing.time_interleaved([s for _, s, _ in live], rounds)
            for (p, _, _), t, err in zip(live, timings, errors):
                rec = recs[p.name]
                if err is not None:
                    failures[p.name] = error_text(err)
                    rec.update(status="failed", error=failures[p.name])
                else:
                    rec.update(t.as_dict(), status="ok", interleaved_with=len(live))
        for name, twin_name in twins.items():
            twin_rec = recs[twin_name]
            copied = {k: v for k, v in twin_rec.items() if k.startswith("time_") or k in (
                "rounds", "peak_mem_bytes", "status", "error", "interleaved_with", "noisy")}
            recs[name].update(copied, same_as=twin_name)
        for p in group:
            out.append(recs[p.name])
            progress.item(label(recs[p.name]), result_text(recs[p.name]))
        del live
    del built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_training_steps(norm_paths: List[Optional[paths.PathSpec]],
                           config: models.StepConfig, dtype_name: str, device: torch.device,
                           policy: timing.Policy, progress: Progress,
                           deadline: float) -> List[dict]:
    """One record per NORM path (None: the plain student) for the ResNet18 training step.
    Warm-up and memory per model, then the timed rounds of all models interleaved."""
    s = models.Student.last_stage_size(config.image_size)
    nshape = shapes.Shape("resnet18-last-stage", config.batch, models.Student.LAST_CHANNELS,
                          models.Student.LAST_CHANNELS, s, s)
    step_policy = timing.for_training_step(policy)
    recs, live = [], []                              # live: (record, step, warm seconds)
    for norm_path in norm_paths:
        rec = {"path": norm_path.name if norm_path else "none", "dtype": dtype_name,
               "batch": config.batch, "image_size": config.image_size,
               "config": config.describe(), "memory_method": memory.method(device),
               "time_ms": None, "peak_mem_bytes": None, "backend": None, "algorithm": None}
        recs.append(rec)
        if time.time() > deadline:
            rec.update(status="skipped", error=DEADLINE_ERROR)
            continue
        progress.doing(f"training step, NORM: {rec['path']}")
        try:
            norm = None
            if norm_path is not None:
                rec["backend"], rec["algorithm"] = paths.resolved(norm_path, nshape, device.type)
                norm, _ = paths.build_module(norm_path, nshape, device)
            step = models.make_train_step(norm, config, device, steps.DTYPES[dtype_name])
            warm = timing.warm_up(step, step_policy)
            rec["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
            live.append((rec, step, warm))
        except Exception as exc:
            rec.update(status="failed", error=error_text(exc))
    if live:
        rounds = timing.interleaved_rounds([w for _, _, w in live], step_policy)
        timings, errors = timing.time_interleaved([st for _, st, _ in live], rounds)
        for (rec, _, _), t, err in zip(live, timings, errors):
            if err is not None:
                rec.update(status="failed", error=error_text(err))
            else:
                rec.update(t.as_dict(), status="ok", interleaved_with=len(live))
    for rec in recs:
        progress.item(f"{dtype_name} training step, NORM: {rec['path']}",
                      f"{report.fmt_ms(rec['time_ms'])} ms" if rec.get("status") == "ok"
                      else f"{rec.get('status')}: {rec.get('error')}")
    del live
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return recs
