"""What the steps of `make gpu-check` share: the mode (GPU or DRY_RUN), its shapes, the
output files, atomic writes, progress lines and the path list.

The run writes at most eight flat files into $OUT (what comes back from a lent machine):
    summary.txt        one screen: step status, PASS/FAIL counts, speed-ups, auto's misses
    run_info.json      environment (GPU, driver, versions, TF32 flags, backends) and the
                       run's settings: `make bench`'s info file, read by report.rerender
    tests.txt          the CUDA-targeted pytest runs
    correctness.json   one PASS/FAIL row per (shape, dtype, path, quantity), a row a line
    results.json       timing records in `make bench`'s format (report.REQUIRED_KEYS ...)
    results.md, results.png   written by benchmarks/report.py from the two JSON files
    profile.txt        the profiler pass and the kernel-rate comparison with torch.mm

DRY_RUN=1 (`GPU_CHECK_DRY_RUN=1` for the step processes) runs every step on the CPU with
tiny shapes; the Triton kernels then run under Triton's interpreter, and steps that need
CUDA say "skipped: no CUDA".
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterable, List, Optional, Tuple

from .shapes import SHAPES, Shape

FILES = ("summary.txt", "run_info.json", "tests.txt", "correctness.json", "results.json",
         "results.md", "results.png", "profile.txt")
MAIN_SHAPE = SHAPES[0]            # resnet34-resnet18, B=256, 512->512, 7x7
CORRECTNESS_SHAPES = (SHAPES[0], SHAPES[1])   # + resnet50-mobilenet, B=256, 2048->1024
DTYPE_NAMES = ("float32", "bfloat16")
# Tiny stand-ins for DRY_RUN: the paper shapes' names, spatial sizes and batch ratios
# kept, channels divided by 32 (min 8), N=4, batch 4 (ImageNet) or 2 (CIFAR).
DRY_CHANNEL_DIVISOR = 32


def dry_run() -> bool:
    return os.environ.get("GPU_CHECK_DRY_RUN", "").strip() not in ("", "0")


def tiny(shape: Shape) -> Shape:
    """The DRY_RUN stand-in of a paper shape (same name: the report groups by name)."""
    return Shape(shape.name, 4 if shape.batch >= 256 else 2,
                 max(8, shape.teacher_channels // DRY_CHANNEL_DIVISOR),
                 max(8, shape.student_channels // DRY_CHANNEL_DIVISOR),
                 shape.height, shape.width, n=4)


def run_shapes(shapes: Iterable[Shape]) -> List[Shape]:
    return [tiny(s) for s in shapes] if dry_run() else list(shapes)


def device():
    import torch
    if dry_run():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device (use DRY_RUN=1 for the CPU rehearsal)")
    return torch.device("cuda")


def compile_backend() -> str:
    """torch.compile's backend for the compiled literal: inductor on the GPU; in DRY_RUN
    aot_eager (Dynamo + AOTAutograd without code generation: inductor's CPU C++ build
    alone would take most of the rehearsal's two minutes)."""
    return os.environ.get("GPU_CHECK_COMPILE_BACKEND") or ("aot_eager" if dry_run() else "inductor")


def out_path(out_dir: str, name: str) -> str:
    if name not in FILES:
        raise ValueError(f"gpu-check writes only {FILES}, not {name!r}")
    return os.path.join(out_dir, name)


def write_atomic(path: str, text: str) -> None:
    """Replace `path` in one step, so a run killed mid-write leaves the previous version."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_rows(path: str, rows: List[dict]) -> None:
    """A JSON list with one row per line (greppable, and json.load-able)."""
    write_atomic(path, "[\n" + ",\n".join(json.dumps(r, sort_keys=False, default=str)
                                          for r in rows) + "\n]\n")


def read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def say(step: str, text: str) -> None:
    """A progress line on stderr (the device's reply carries the tail of the output)."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {step}: {text}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class Deadline:
    """Seconds left until an absolute time (time.time()); steps check it before each unit
    of work and record "skipped: budget" for what does not start."""

    def __init__(self, at: float):
        self.at = at

    def left(self) -> float:
        return self.at - time.time()

    def spent(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def step_args(prog: str, argv=None, extra=()):
    """The command line every step child takes: --out DIR --deadline EPOCH_S (+ `extra`,
    (flag, help) pairs of string options). Returns (args, device, Deadline); the
    "no compiled kernels" warning is silenced (the environment step reports it)."""
    import argparse
    import warnings
    p = argparse.ArgumentParser(prog=f"python -m {prog}")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline", type=float, required=True, help="absolute time.time()")
    for flag, help_ in extra:
        p.add_argument(flag, default="", help=help_)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="norm_fast: no compiled kernels")
    return args, device(), Deadline(args.deadline)


def available_backends(device_type: str) -> List[Tuple[str, bool, str]]:
    """[(backend, usable on this device type, reason)] for every concrete backend."""
    from norm_fast import dispatch
    from .paths import CONCRETE_BACKENDS
    out = []
    for name in CONCRETE_BACKENDS:
        if device_type not in dispatch.devices_of(name):
            out.append((name, False, f"runs on {dispatch.devices_of(name)} tensors only"))
            continue
        ok, why = dispatch.is_available(name)
        out.append((name, bool(ok), why))
    return out


def norm_fast_paths(device_type: str, backends: Optional[Iterable[str]] = None):
    """PathSpecs of every usable backend x algorithm (without the torch-direct/auto pair,
    which is the literal reference), then norm_fast-auto (NORM's defaults). Unlike
    `paths.discover`, Triton on CPU is included: in DRY_RUN it runs its interpreter."""
    from .paths import ALGORITHMS, PathSpec
    wanted = set(backends) if backends is not None else None
    out = []
    for name, ok, _ in available_backends(device_type):
        if not ok or (wanted is not None and name not in wanted):
            continue
        for alg in ALGORITHMS:
            if name == "torch" and alg in ("direct", "auto"):
                continue
            out.append(PathSpec(f"norm_fast-{name}-{alg}", name, alg))
    if wanted is None or "auto" in wanted:
        out.append(PathSpec("norm_fast-auto", "auto", "auto"))
    return out
