"""`make bench`: time and peak memory of NORM's paths at the paper's shapes, and two sweeps.

    python -m benchmarks.run [--quick] [--full] [--plan] [--out DIR] [--memory-snapshot DIR]

(`--plan`: probe, print the batches and the estimated time of every measurement group,
and stop.)

1. Headline: every available path (benchmarks/paths.py) at the six teacher->student shapes
   (benchmarks/shapes.py) at the paper batch (256 ImageNet, 64 CIFAR), forward+backward;
   a shape whose literal does not fit the time budget here runs at the largest halving
   that does, and its rows say so (benchmarks/plan.py).
2. N sweep: resnet34-resnet18, N = 1..16; batch sweep: one ImageNet and one CIFAR pair
   (benchmarks/sweeps.py), with the cost model's prediction beside each point.
3. NORM's share of a ResNet18-style training step (benchmarks/models.py).
Eager measurements run first, the compiled literal last (nothing eager is timed after
inductor's kernels ran in the process). Prints the tables and writes into a new folder
per run, `benchmarks/results/<device>/<date-time>/` (git-ignored; `--out` to choose):
    results.json   {"schema": 2, "rows": [...], "sweeps": [...], "training_step": [...]}
    results.md     the tables, the environment, the methods
    results.png    all figures in one; headline.png, n_sweep.png, batch_sweep.png
    run_info.json  environment, methods, batch choices, left-out paths
results.json is rewritten after every measurement group, so an interrupted run keeps
what it had.

Environment knobs (command-line flags win):
    BENCH_OUT=dir              output folder (default: new per run, see above)
    BENCH_BUDGET_S=s           wall-time budget the batches are fitted to (CPU default
                               480; CUDA: none); BENCH_DEADLINE_S=s: start no new
                               measurement after s seconds (default: budget + 40)
    BENCH_CALL_CAP_S=s         the most one literal forward+backward may take (60)
    BENCH_FULL=1               paper batches everywhere, no budget (GPUs)
    BENCH_QUICK=1              one warm-up call and 3 timed rounds (smoke runs)
    BENCH_SHAPES=a,b           headline shapes            BENCH_BATCH=n  headline batch
    BENCH_PATHS=glob,...       only these paths (the reference always runs)
    BENCH_SKIP=glob,...        leave these paths out (e.g. reference-compiled)
    BENCH_DTYPES=float32,bfloat16   default: both on a GPU with native bfloat16, else float32
    BENCH_PASSES=forward,forward+backward   default: forward+backward
    BENCH_SWEEPS=n,batch       which sweeps (default both; "none" for neither)
    BENCH_N_VALUES=1,2,4,8,16  BENCH_N_BATCH=b  the N sweep's values and batch
    BENCH_SWEEP_BATCHES=a,b    the batch sweep's values (both shapes)
    BENCH_STEP=0               skip the training step     BENCH_DEVICE=cpu|cuda
    BENCH_MEMORY_SNAPSHOT=dir  CUDA memory snapshots of the reference and fused paths
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from norm_fast import dispatch

from . import memory, models, paths, plan, report, shapes, steps, sweeps, timing
from .measure import measure_group, measure_training_steps
from .progress import Progress

# Compiled kernels not being built yet is expected while backends are being written;
# what was left out, and why, is listed in the output instead.
warnings.filterwarnings("ignore", message="norm_fast: no compiled kernels")

CPU_BUDGET_S = 480.0


def _env_list(name: str) -> List[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _env_ints(name: str) -> List[int]:
    try:
        return [int(v) for v in _env_list(name)]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated integers, got "
                         f"{os.environ.get(name)!r}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name}: expected a number of seconds, got {raw!r}")


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


def default_out_dir(device: torch.device) -> str:
    """benchmarks/results/<device>/<date-time>/: new for every run, never an old one."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        device_slug(device))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, k = os.path.join(root, stamp), 1
    while os.path.exists(out):
        k += 1
        out = os.path.join(root, f"{stamp}-{k}")
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", default=_env_flag("BENCH_FULL"),
                   help="paper batches everywhere, no time budget")
    p.add_argument("--quick", action="store_true", default=_env_flag("BENCH_QUICK"))
    p.add_argument("--plan", action="store_true",
                   help="print the batches and estimated times, measure nothing")
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", ""))
    p.add_argument("--memory-snapshot", default=os.environ.get("BENCH_MEMORY_SNAPSHOT", ""),
                   metavar="DIR")
    p.add_argument("--device", default=os.environ.get("BENCH_DEVICE", ""))
    return p.parse_args(argv)


def _git_describe() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True,
                               timeout=10).stdout.strip()
        return (rev + (" (with uncommitted changes)" if dirty else "")) if rev else "unknown"
    except Exception:
        return "unknown"


class Job:
    """One measurement group: paths at one shape (a headline shape or a sweep point)."""

    def __init__(self, group: List[paths.PathSpec], shape: shapes.Shape, dtype: str,
                 passes: List[str], extra: dict):
        self.group, self.shape, self.dtype, self.passes, self.extra = (group, shape, dtype,
                                                                       passes, extra)

    @property
    def is_sweep(self) -> bool:
        return bool(self.extra.get("sweep"))


def plan_runs(args, device, policy, path_list, dtype_names, pass_names, budget, cap, info
              ) -> Tuple[List[Job], List[Job]]:
    """(eager jobs, compiled jobs) with the batches fitted to the budget (plan.py)."""
    eager = [p for p in path_list if not p.compiled]
    compiled = [p for p in path_list if p.compiled]
    est = plan.Estimator(device, policy)
    fixed_batch = int(os.environ["BENCH_BATCH"]) if os.environ.get("BENCH_BATCH") else None
    fit = not args.full and budget != float("inf")
    headline = shapes.select(_env_list("BENCH_SHAPES"))
    if fixed_batch is not None:
        choices = {s.name: plan.BatchChoice(fixed_batch, s.paper_batch, "BENCH_BATCH")
                   for s in headline}
    elif not fit and cap == float("inf"):
        choices = {s.name: plan.BatchChoice(s.paper_batch, s.paper_batch, "paper batch")
                   for s in headline}
    else:
        print("probing each shape once (literal and decomposed at a small batch) to fit the "
              "batches to the budget ...", file=sys.stderr, flush=True)
        n_dt = len(dtype_names)
        choices = plan.choose_batches(
            headline, lambda s: n_dt * est.group_s(path_list, s, pass_names), est,
            budget * plan.SHARES["headline"] if fit else float("inf"), cap)
    info["batches"] = {name: c.reason for name, c in choices.items()}

    eager_jobs: List[Job] = []
    compiled_jobs: List[Job] = []
    for dtype in dtype_names:
        for s in headline:
            c = choices[s.name]
            shape = s.at(batch=c.batch)
            extra = {"batch_choice": c.reason}
            if eager:
                eager_jobs.append(Job(eager, shape, dtype, pass_names, extra))
            if compiled:
                compiled_jobs.append(Job(compiled, shape, dtype, pass_names, extra))

    wanted = _env_list("BENCH_SWEEPS") or ["n", "batch"]
    sweep_pass = ["forward+backward"]
    if "n" in wanted:
        base = shapes.by_name(sweeps.N_SWEEP_SHAPE)
        n_values = _env_ints("BENCH_N_VALUES") or list(sweeps.N_VALUES)
        nb = _env_ints("BENCH_N_BATCH") or ([fixed_batch] if fixed_batch else [])
        sweep_paths = path_list
        if nb:
            n_batch, why = nb[0], "BENCH_N_BATCH / BENCH_BATCH"
        elif not fit and cap == float("inf"):
            n_batch, why = base.paper_batch, "paper batch"
        else:
            def n_cost(_, b):
                return sum(est.group_s(sweep_paths, base.at(batch=b, n=n), sweep_pass)
                           for n in n_values)
            top = base.paper_batch
            while top // 2 >= 8 and est.literal_call_s(base.at(batch=top, n=max(n_values))) > cap:
                top //= 2
            n_batch = plan.shrink_to_budget({"n": top}, {"n": min(8, top)}, n_cost,
                                            budget * plan.SHARES["n"] if fit else float("inf"))["n"]
            why = (f"{est.describe(base.at(batch=n_batch, n=max(n_values)))}; the largest "
                   f"halving of {base.paper_batch} whose sweep fits its share of the budget"
                   f" ({budget * plan.SHARES['n']:.0f} s)" if fit else "call cap")
        info["batches"]["N sweep"] = f"B={n_batch}: {why}"
        for n in n_values:
            shape = base.at(batch=n_batch, n=n)
            extra = {"sweep": "n", "batch_scaled": n_batch != base.paper_batch,
                     "batch_choice": why}
            g = [p for p in sweep_paths if not p.compiled]
            eager_jobs.append(Job(g, shape, "float32", sweep_pass, extra))
            if compiled:
                compiled_jobs.append(Job(compiled, shape, "float32", sweep_pass, extra))
    if "batch" in wanted:
        backend = dispatch.resolve_backend("auto", device.type)
        keep = ("reference", "norm_fast-auto", f"norm_fast-{backend}-direct",
                f"norm_fast-{backend}-decomposed")
        g = [p for p in eager if p.name in keep]
        given = _env_ints("BENCH_SWEEP_BATCHES")
        for name, values in sweeps.BATCH_SWEEPS.items():
            base = shapes.by_name(name)
            vals = list(given or values)
            if fit and not given:
                share = budget * plan.SHARES["batch"] / len(sweeps.BATCH_SWEEPS)
                while len(vals) > 3 and sum(est.group_s(g, base.at(batch=b), sweep_pass)
                                            for b in vals) > share:
                    vals.pop()
            info["batches"][f"batch sweep {name}"] = f"B in {vals}"
            for b in vals:
                eager_jobs.append(Job(g, base.at(batch=b), "float32", sweep_pass,
                                      {"sweep": "batch", "batch_scaled": False}))
    info["probe_s"] = round(est.probe_s, 1)
    if args.plan:
        total = 0.0
        for j in eager_jobs + compiled_jobs:
            t = est.group_s(j.group, j.shape, j.passes)
            total += t
            print(f"  {j.extra.get('sweep') or 'headline':8s} {j.dtype} {j.shape.describe():36s}"
                  f" {', '.join(p.name for p in j.group)}: about {t:.0f} s", file=sys.stderr)
        print(f"  total about {total:.0f} s (+ the training step); probes took "
              f"{est.probe_s:.0f} s", file=sys.stderr)
    return eager_jobs, compiled_jobs


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    device = steps.pick_device(args.device)
    torch.manual_seed(0)
    policy = timing.policy_for(device.type, args.quick)
    budget = _env_float("BENCH_BUDGET_S", CPU_BUDGET_S if device.type == "cpu" else float("inf"))
    cap = _env_float("BENCH_CALL_CAP_S", 60.0)
    if args.full:
        budget, cap = float("inf"), float("inf")
    deadline = start + _env_float("BENCH_DEADLINE_S", budget + 40.0)
    out_dir = args.out or default_out_dir(device)
    bf16_ok, bf16_why = steps.bf16_supported(device)
    default_dtypes = ["float32", "bfloat16"] if (bf16_ok and device.type == "cuda") else ["float32"]
    dtype_names = _env_list("BENCH_DTYPES") or default_dtypes
    for d in dtype_names:
        if d not in steps.DTYPES:
            raise SystemExit(f"BENCH_DTYPES: unknown dtype {d!r}; known: {list(steps.DTYPES)}")
    skipped_paths = []
    if "bfloat16" in dtype_names and not bf16_ok:
        dtype_names.remove("bfloat16")
        skipped_paths.append(("bfloat16", bf16_why))
    pass_names = _env_list("BENCH_PASSES") or ["forward+backward"]
    for p in pass_names:
        if p not in steps.PASSES:
            raise SystemExit(f"BENCH_PASSES: unknown pass {p!r}; known: {list(steps.PASSES)}")
    all_paths, skipped = paths.discover(device.type)
    skipped_paths += skipped
    path_list = paths.filter_paths(all_paths, _env_list("BENCH_PATHS"), _env_list("BENCH_SKIP"))
    skipped_paths += [(p.name, "left out by BENCH_PATHS / BENCH_SKIP")
                      for p in all_paths if p not in path_list]
    run_step = os.environ.get("BENCH_STEP", "1").strip() not in ("0", "false", "no", "off")
    step_config = (models.QUICK_STEP if args.quick else
                   models.GPU_STEP if (device.type == "cuda" or args.full) else models.CPU_STEP)
    step_paths = [None] + [p for p in path_list if not p.compiled]

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.run"]
                            + (argv if argv is not None else sys.argv[1:])),
        "env_knobs": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
        "git": _git_describe(), "out_dir": out_dir,
        "torch": torch.__version__, "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "budget": (f"{budget:.0f} s (batches fitted to it: benchmarks/plan.py), per literal "
                   f"call at most {cap:.0f} s" if budget != float("inf") else
                   "none" + (f"; per literal call at most {cap:.0f} s"
                             if cap != float("inf") else "")),
        "memory_method": memory.method(device),
        "memory_method_short": ("cuda max_memory_allocated minus inputs" if device.type == "cuda"
                                else "cpu allocator events (torch.profiler), minus inputs"),
        "timing_method": (f"wall clock per call after device sync, and process CPU time; per "
                          f"path one memory-measuring call (also the first warm-up), warm-up "
                          f"up to {policy.min_seconds}s, then {policy.min_rounds}-"
                          f"{policy.max_rounds} timed rounds (about {policy.budget_s}s per "
                          "path) interleaved round-robin across the paths of a shape; median "
                          "and interquartile range (noisy: IQR > 20% of the median); the "
                          "compiled literal runs after all eager paths"),
        "model_method": ("dispatch.cost_model multiply-adds of the algorithm that ran; one "
                         "rate per path and sweep, the geometric mean of MACs / measured "
                         "seconds over its points (benchmarks/sweeps.py)"),
        "paths": [p.name for p in path_list], "skipped_paths": skipped_paths,
        "dtypes": dtype_names, "passes": pass_names, "quick": args.quick,
        "step_config": step_config.describe() if run_step else None,
        "load_average": "%.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tf32": _tf32_settings() if device.type == "cuda" else None,
    }
    print(f"norm_fast benchmarks on {info['device_name']} (torch {torch.__version__}, "
          f"{info['threads'] or device.type} threads); paths: {', '.join(info['paths'])}; "
          f"dtypes: {', '.join(dtype_names)}; budget: {info['budget']}; output: {out_dir}",
          file=sys.stderr, flush=True)
    for name, why in skipped_paths:
        print(f"  not run: {name}: {why}", file=sys.stderr)

    eager_jobs, compiled_jobs = plan_runs(args, device, policy, path_list, dtype_names,
                                          pass_names, budget, cap, info)
    for what, why in info["batches"].items():
        print(f"  batch, {what}: {why}", file=sys.stderr)
    if args.plan:
        return 0
    total = (sum(len(j.group) * len(j.passes) for j in eager_jobs + compiled_jobs)
             + (len(dtype_names) * len(step_paths) if run_step else 0))
    progress = Progress(total)
    records: List[dict] = []
    sweep_rows: List[dict] = []
    step_records: List[dict] = []

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still write what was measured
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    interrupted = None
    try:
        for jobs in (eager_jobs, compiled_jobs):
            for job in jobs:
                recs = measure_group(job.group, job.shape, job.dtype, job.passes, device,
                                     policy, progress, deadline, args.memory_snapshot,
                                     job.extra)
                (sweep_rows if job.is_sweep else records).extend(recs)
                report.write_all(out_dir, records, step_records, info, final=False,
                                 sweeps=sweep_rows)
            if jobs is eager_jobs and run_step:
                for dtype_name in dtype_names:
                    step_records += measure_training_steps(step_paths, step_config, dtype_name,
                                                           device, policy, progress, deadline)
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupted"
        progress.write(f"\ninterrupted ({interrupted}): writing what was measured")
    progress.close()
    records = _ordered(records, path_list)
    sweep_rows = _ordered(sweep_rows, path_list)
    report.add_ratios(records + sweep_rows)
    sweeps.add_model(sweep_rows)
    report.add_step_shares(step_records)
    info["wall_s"] = round(time.time() - start, 1)
    info["load_average"] = f"{info['load_average']} / {os.getloadavg()[0]:.2f}"
    if interrupted:
        info["interrupted"] = interrupted
    written = report.write_all(out_dir, records, step_records, info, final=True,
                               sweeps=sweep_rows)
    print(report.render_text(records, step_records, info, sweep_rows))
    print(f"\nwrote {', '.join(os.path.basename(w) for w in written)} into {out_dir} "
          f"in {info['wall_s']} s", file=sys.stderr)
    return 1 if interrupted else 0


def _tf32_settings() -> str:
    """PyTorch's defaults are left alone (what users get); recorded here."""
    try:
        return (f"matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                f"cudnn allow_tf32={torch.backends.cudnn.allow_tf32}")
    except Exception as exc:
        return f"unknown ({exc})"


def _ordered(records: List[dict], path_list: List[paths.PathSpec]) -> List[dict]:
    """Records sorted by sweep, dtype, pass, shape (the run's order), swept value and path
    (the discovery order)."""
    rank = {p.name: i for i, p in enumerate(path_list)}
    firsts: Dict = {}
    for r in records:
        for k in ("sweep", "dtype", "shape"):
            firsts.setdefault((k, r.get(k)), len(firsts))

    def key(r: dict):
        pass_rank = steps.PASSES.index(r["pass"]) if r["pass"] in steps.PASSES else 9
        return (firsts[("sweep", r.get("sweep"))], firsts[("dtype", r["dtype"])], pass_rank,
                firsts[("shape", r["shape"])], r.get("n") or 0, r["batch"],
                rank.get(r["path"], 99))
    return sorted(records, key=key)


if __name__ == "__main__":
    sys.exit(main())
