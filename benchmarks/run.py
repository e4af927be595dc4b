"""`make bench`: time and peak memory of every NORM path at the method's shapes, here.

    python -m benchmarks.run [--full] [--quick] [--memory-snapshot DIR] [--out DIR]

Runs every available path (see benchmarks/paths.py) x the six teacher->student shapes
(benchmarks/shapes.py; scaled down on CPU) x {forward, forward+backward} x the dtypes, then
a ResNet18-style training step with and without NORM (benchmarks/models.py). Prints a
table (median time and interquartile range, peak memory, ratios against the reference and
the compiled reference, all measured in this run) and writes into BENCH_OUT
(default benchmarks/results/<device name>/):
    results.json   list of records: shape, path, backend, algorithm, dtype, pass, time_ms
                   (median), peak_mem_bytes, batch, and more (spread, ratios, status)
    results.md     the tables, the environment and the methods
    results.png    time and peak memory per shape and path (forward+backward)
    run_info.json  environment, methods, left-out paths and the training-step records
results.json is rewritten after every measurement, so an interrupted run keeps what it had.

Environment knobs (command-line flags win):
    BENCH_OUT=dir              output folder
    BENCH_FULL=1               the real batch sizes (default on CUDA; CPU divides them)
    BENCH_QUICK=1              one warm-up call and 3 timed rounds (smoke runs)
    BENCH_SHAPES=a,b           only these shapes            BENCH_BATCH=n  batch override
    BENCH_PATHS=glob,...       only these paths (the reference always runs)
    BENCH_SKIP=glob,...        leave these paths out (e.g. reference-compiled)
    BENCH_DTYPES=float32,bfloat16   default: both on a GPU with native bfloat16, float32
                               on CPU (the pytest suite runs both wherever native)
    BENCH_PASSES=forward,forward+backward
    BENCH_STEP=0               skip the training step      BENCH_DEVICE=cpu|cuda
    BENCH_MEMORY_SNAPSHOT=dir  CUDA memory snapshots of the reference and fused paths
    BENCH_DEADLINE_S=s         start no new measurement after s seconds (rest: "skipped")
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import signal
import sys
import time
import traceback
import warnings
from typing import Dict, List, Optional

import torch

from . import memory, models, paths, report, shapes, steps, timing

# Compiled kernels not being built yet is expected while backends are being written;
# what was left out, and why, is listed in the output instead.
warnings.filterwarnings("ignore", message="norm_fast: no compiled kernels")


def _env_list(name: str) -> List[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model or 'unknown'} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    if device.type == "cpu":
        name = re.sub(r"\((\d+) cores\)", r"\1cores", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or device.type


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", default=_env_flag("BENCH_FULL"),
                   help="real batch sizes (default on CUDA)")
    p.add_argument("--quick", action="store_true", default=_env_flag("BENCH_QUICK"))
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", ""))
    p.add_argument("--memory-snapshot", default=os.environ.get("BENCH_MEMORY_SNAPSHOT", ""),
                   metavar="DIR")
    p.add_argument("--device", default=os.environ.get("BENCH_DEVICE", ""))
    return p.parse_args(argv)


class Progress:
    """A one-line-per-item text progress bar on stderr (no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = max(1, total), 0, time.time()

    def note(self, text: str) -> None:
        """A line without advancing the bar (warm-up and memory, before the timed rounds)."""
        print(f"{' ' * 26}{' ' * 9}{time.time() - self.start:6.0f}s    {text}", file=sys.stderr,
              flush=True)

    def item(self, label: str, result: str) -> None:
        self.done += 1
        frac = self.done / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        elapsed = time.time() - self.start
        print(f"[{bar}] {self.done:>3}/{self.total} {elapsed:6.0f}s  {label}: {result}",
              file=sys.stderr, flush=True)


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def base_record(path: paths.PathSpec, shape: shapes.Shape, dtype_name: str,
                device: torch.device) -> dict:
    rec = {"shape": shape.name, "path": path.name, "requested_backend": path.backend,
           "requested_algorithm": path.algorithm, "dtype": dtype_name, "batch": shape.batch,
           "student_channels": shape.student_channels,
           "teacher_channels": shape.teacher_channels, "height": shape.height,
           "width": shape.width, "n": shape.n, "device": device.type, "compiled": path.compiled,
           "memory_method": memory.method(device), "time_ms": None, "peak_mem_bytes": None}
    try:
        rec["backend"], rec["algorithm"] = paths.resolved(path, shape, device.type)
    except Exception as exc:
        rec["backend"], rec["algorithm"] = path.backend, path.algorithm
        rec["status"], rec["error"] = "failed", _error_text(exc)
    return rec


def _result_text(rec: dict) -> str:
    if rec.get("same_as"):
        return f"same computation as {rec['same_as']} here (not timed twice)"
    if rec.get("status") == "ok":
        return (f"{report.fmt_ms(rec['time_ms'])} ms (IQR {report.fmt_ms(rec.get('time_iqr_ms'))})"
                f", {report.fmt_bytes(rec['peak_mem_bytes'])}")
    return f"{rec.get('status')}: {rec.get('error')}"


def measure_shape(group: List[paths.PathSpec], shape: shapes.Shape, dtype_name: str,
                  pass_names: List[str], device: torch.device, policy: timing.Policy,
                  snapshot_dir: str, progress: Progress, deadline: float) -> List[dict]:
    """Records of every path in `group` at one (shape, dtype), for each pass.

    Per pass: each path is built (once for all passes), warmed up and its peak memory
    measured alone; then the timed rounds of all paths are interleaved
    (`timing.time_interleaved`). A failure (compile error, missing kernel, out of memory)
    is recorded in the path's records, never raised.
    """
    dtype = steps.DTYPES[dtype_name]
    bases = {p.name: base_record(p, shape, dtype_name, device) for p in group}
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
                rec.update(status="skipped", error="time budget (BENCH_DEADLINE_S) spent")
                continue
            if failures[p.name]:
                rec.update(status="failed", error=failures[p.name])
                continue
            try:
                if p.name not in built:
                    built[p.name] = paths.build_module(p, shape, device)
                call, module = built[p.name]
                step = steps.make_step(call, module, shape, device, dtype, pass_)
                if p.compiled and "compile_s" not in bases[p.name]:
                    t0 = time.perf_counter()
                    step()                       # compiles (forward graph; backward lazily)
                    bases[p.name]["compile_s"] = rec["compile_s"] = time.perf_counter() - t0
                warm = timing.warm_up(step, policy)
                rec["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
                if snapshot_dir and device.type == "cuda" and (p.name == "reference"
                                                               or p.is_fused_kernel):
                    fname = f"{shape.name}_{p.name}_{dtype_name}_{pass_.replace('+', '-')}.pickle"
                    ok, msg = memory.save_cuda_snapshot(step, device,
                                                        os.path.join(snapshot_dir, fname))
                    rec["memory_snapshot" if ok else "memory_snapshot_error"] = msg
                live.append((p, step, warm))
                progress.note(f"{dtype_name} {shape.name} {p.name} {pass_}: warm "
                              f"{report.fmt_ms(1e3 * warm)} ms, peak "
                              f"{report.fmt_bytes(rec['peak_mem_bytes'])}")
            except Exception as exc:
                failures[p.name] = _error_text(exc)
                rec.update(status="failed", error=failures[p.name],
                           traceback=traceback.format_exc(limit=4))
        if live:
            rounds = timing.interleaved_rounds([w for _, _, w in live], policy)
            timings, errors = timing.time_interleaved([s for _, s, _ in live], rounds)
            for (p, _, _), t, err in zip(live, timings, errors):
                rec = recs[p.name]
                if err is not None:
                    failures[p.name] = _error_text(err)
                    rec.update(status="failed", error=failures[p.name])
                else:
                    rec.update(t.as_dict(), status="ok", interleaved_with=len(live))
        for name, twin_name in twins.items():
            twin_rec = recs[twin_name]
            copied = {k: v for k, v in twin_rec.items() if k.startswith("time_") or k in (
                "rounds", "peak_mem_bytes", "status", "error", "interleaved_with")}
            recs[name].update(copied, same_as=twin_name)
        for p in group:
            out.append(recs[p.name])
            progress.item(f"{dtype_name} {shape.name} {p.name} {pass_}", _result_text(recs[p.name]))
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
            rec.update(status="skipped", error="time budget (BENCH_DEADLINE_S) spent")
            continue
        try:
            norm = None
            if norm_path is not None:
                rec["backend"], rec["algorithm"] = paths.resolved(norm_path, nshape, device.type)
                norm, _ = paths.build_module(norm_path, nshape, device)
            step = models.make_train_step(norm, config, device, steps.DTYPES[dtype_name])
            warm = timing.warm_up(step, step_policy)
            rec["peak_mem_bytes"] = memory.peak_step_bytes(step, device)
            live.append((rec, step, warm))
            progress.note(f"{dtype_name} training step, NORM: {rec['path']}: warm "
                          f"{report.fmt_ms(1e3 * warm)} ms, peak "
                          f"{report.fmt_bytes(rec['peak_mem_bytes'])}")
        except Exception as exc:
            rec.update(status="failed", error=_error_text(exc))
    if live:
        rounds = timing.interleaved_rounds([w for _, _, w in live], step_policy)
        timings, errors = timing.time_interleaved([st for _, st, _ in live], rounds)
        for (rec, _, _), t, err in zip(live, timings, errors):
            if err is not None:
                rec.update(status="failed", error=_error_text(err))
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    deadline = start + float(os.environ.get("BENCH_DEADLINE_S", "inf"))
    device = steps.pick_device(args.device)
    torch.manual_seed(0)
    policy = timing.policy_for(device.type, args.quick)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       device_slug(device))
    bf16_ok, bf16_why = steps.bf16_supported(device)
    # The quick default: both dtypes on a GPU, float32 alone on CPU (where bfloat16 doubles
    # the run for little news: norm_fast's small algebra runs in float32 either way).
    default_dtypes = ["float32", "bfloat16"] if (bf16_ok and device.type == "cuda") else ["float32"]
    dtype_names = _env_list("BENCH_DTYPES") or default_dtypes
    for d in dtype_names:
        if d not in steps.DTYPES:
            raise SystemExit(f"BENCH_DTYPES: unknown dtype {d!r}; known: {list(steps.DTYPES)}")
    skipped_paths = []
    if "bfloat16" in dtype_names and not bf16_ok:
        dtype_names.remove("bfloat16")
        skipped_paths.append(("bfloat16", bf16_why))
    pass_names = _env_list("BENCH_PASSES") or list(steps.PASSES)
    batch = int(os.environ["BENCH_BATCH"]) if os.environ.get("BENCH_BATCH") else None
    shape_list = [shapes.scaled(s, device.type, args.full, batch)
                  for s in shapes.select(_env_list("BENCH_SHAPES"))]
    all_paths, skipped = paths.discover(device.type)
    skipped_paths += skipped
    path_list = paths.filter_paths(all_paths, _env_list("BENCH_PATHS"), _env_list("BENCH_SKIP"))
    skipped_paths += [(p.name, "left out by BENCH_PATHS / BENCH_SKIP")
                      for p in all_paths if p not in path_list]
    eager = [p for p in path_list if not p.compiled]
    compiled = [p for p in path_list if p.compiled]
    run_step = os.environ.get("BENCH_STEP", "1").strip() not in ("0", "false", "no", "off")
    step_config = (models.QUICK_STEP if args.quick else
                   models.GPU_STEP if (device.type == "cuda" or args.full) else models.CPU_STEP)
    step_paths = [None] + [p for p in eager]
    total = (len(dtype_names) * len(shape_list) * len(path_list) * len(pass_names)
             + (len(dtype_names) * len(step_paths) if run_step else 0))

    full_real = args.full or device.type != "cpu"
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run"]
                            + (argv if argv is not None else sys.argv[1:])),
        "env_knobs": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
        "torch": torch.__version__, "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "scaling": ("real batch sizes" if full_real and batch is None else
                    f"batch overridden to {batch}" if batch is not None else shapes.SCALING_NOTE),
        "shapes": {s.name: s.describe() for s in shape_list},
        "memory_method": memory.method(device),
        "memory_method_short": ("cuda max_memory_allocated minus inputs" if device.type == "cuda"
                                else "cpu allocator events (torch.profiler), minus inputs"),
        "timing_method": (f"wall clock per call after device sync; per path a warm-up (>= "
                          f"{policy.min_calls} call(s) and {policy.min_seconds}s) and one "
                          f"memory-measuring call, then {policy.min_rounds}-"
                          f"{policy.max_rounds} timed rounds (about {policy.budget_s}s per "
                          "path) interleaved round-robin across the paths of a shape; median "
                          "and interquartile range; the compiled reference runs after all "
                          "eager paths"),
        "paths": [p.name for p in path_list], "skipped_paths": skipped_paths,
        "dtypes": dtype_names, "passes": pass_names, "quick": args.quick,
        "step_config": step_config.describe() if run_step else None,
        "load_average": "%.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tf32": _tf32_settings() if device.type == "cuda" else None,
    }
    print(f"norm_fast benchmarks on {info['device_name']} (torch {torch.__version__}); "
          f"{len(shape_list)} shapes ({info['scaling']}), paths: {', '.join(info['paths'])}; "
          f"dtypes: {', '.join(dtype_names)}; output: {out_dir}", file=sys.stderr, flush=True)
    for name, why in skipped_paths:
        print(f"  not run: {name}: {why}", file=sys.stderr)

    records: List[dict] = []
    step_records: List[dict] = []
    progress = Progress(total)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still write what was measured
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    interrupted = None
    try:
        # Eager paths first, compiled ones last: nothing eager runs after inductor's kernels.
        for group in (eager, compiled):
            for dtype_name in dtype_names:
                for shape in shape_list:
                    if not group:
                        continue
                    records += measure_shape(group, shape, dtype_name, pass_names, device,
                                             policy, args.memory_snapshot, progress, deadline)
                    report.write_all(out_dir, _ordered(records, path_list), step_records,
                                     info, final=False)
            if group is eager and run_step:
                for dtype_name in dtype_names:
                    step_records += measure_training_steps(step_paths, step_config, dtype_name,
                                                           device, policy, progress, deadline)
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupted"
        print(f"\ninterrupted ({interrupted}): writing what was measured", file=sys.stderr)
    records = _ordered(records, path_list)
    report.add_ratios(records)
    report.add_step_shares(step_records)
    info["wall_s"] = round(time.time() - start, 1)
    info["load_average"] = f"{info['load_average']} / {os.getloadavg()[0]:.2f}"
    if interrupted:
        info["interrupted"] = interrupted
    written = report.write_all(out_dir, records, step_records, info, final=True)
    print(report.render_text(records, step_records, info))
    print(f"\nwrote {', '.join(written)} in {info['wall_s']} s", file=sys.stderr)
    return 1 if interrupted else 0


def _tf32_settings() -> str:
    """PyTorch's defaults are left alone (what users get); recorded here."""
    try:
        return (f"matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                f"cudnn allow_tf32={torch.backends.cudnn.allow_tf32}")
    except Exception as exc:
        return f"unknown ({exc})"


def _ordered(records: List[dict], path_list: List[paths.PathSpec]) -> List[dict]:
    """Records sorted by dtype, pass, shape (the run's order) and path (the discovery order)."""
    rank = {p.name: i for i, p in enumerate(path_list)}
    firsts: dict = {}
    for r in records:
        for k in ("dtype", "shape"):
            firsts.setdefault((k, r[k]), len(firsts))
    def key(r: dict):
        pass_rank = steps.PASSES.index(r["pass"]) if r["pass"] in steps.PASSES else 9
        return (firsts[("dtype", r["dtype"])], pass_rank, firsts[("shape", r["shape"])],
                rank.get(r["path"], 99))
    return sorted(records, key=key)


if __name__ == "__main__":
    sys.exit(main())
