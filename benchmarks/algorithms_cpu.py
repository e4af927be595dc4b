"""Per-algorithm cost on CPU at the decomposed-algorithm issue's shapes and batch sizes.

    python -m benchmarks.algorithms_cpu [--threads 1] [--repeat 3]

One forward + backward (float32, BatchNorm on, N=8, training), loss + features both
receiving gradients, for the literal reference and every norm_fast algorithm on the CPU
backends present, plus what "auto" resolves to. Time is the median of `--repeat` runs
after one warm-up, as *process CPU time* with `--threads` intra-op threads (default 1):
on a shared machine CPU time is far steadier than wall time, and ratios are taken within
one run. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

from norm_fast import NORM, dispatch

# (name, B, C_t, C_s, H, W): teacher -> student, the batch sizes the issue gives for CPU.
SHAPES = [
    ("resnet34-resnet18", 32, 512, 512, 7, 7),
    ("resnet50-mobilenet", 32, 2048, 1024, 7, 7),
    ("resnet32x4-resnet8x4", 64, 256, 256, 8, 8),
    ("wrn40_2-wrn16_2", 64, 128, 128, 8, 8),
    ("vgg13-vgg8", 64, 512, 512, 4, 4),
    ("resnet50-mobilenetv2", 64, 2048, 1280, 2, 2),
    ("issue-3 reference point", 64, 512, 512, 7, 7),
]
N = 8


def cpu_ms(module, f_s, f_t, repeat):
    def run():
        feats, loss = module(f_s, f_t)
        (loss + feats.sum() * 1e-3).backward()
    run()
    times = []
    for _ in range(repeat):
        t = time.process_time()
        run()
        times.append(time.process_time() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = [("torch", "direct"), ("torch", "decomposed")]
    if dispatch.is_available("cpp")[0]:
        paths += [("cpp", "direct"), ("cpp", "decomposed")]
    names = ["reference" if p == ("torch", "direct") else "/".join(p) for p in paths]
    print(f"threads={args.threads}, float32, forward+backward, N={N}, process CPU ms "
          f"(speed-up against the reference)\n")
    print("| shape | B | C_t->C_s | HxW | " + " | ".join(names) + " | auto picks |")
    print("|" + "---|" * (5 + len(names)))
    for name, B, C_t, C_s, H, W in SHAPES:
        torch.manual_seed(0)
        f_s = torch.randn(B, C_s, H, W).relu().requires_grad_()
        f_t = torch.randn(B, C_t, H, W).relu()
        cells, ref = [], None
        for backend, algorithm in paths:
            ms = cpu_ms(NORM(C_s, C_t, N, backend=backend, algorithm=algorithm), f_s, f_t,
                        args.repeat)
            ref = ms if ref is None else ref
            cells.append(f"{ms:.0f} ({ref / ms:.2f}x)")
        auto = NORM(C_s, C_t, N).resolve(f_s)
        auto = "reference" if auto.literal else f"{auto.backend}/{auto.algorithm}"
        print(f"| {name} | {B} | {C_t}->{C_s} | {H}x{W} | " + " | ".join(cells) + f" | {auto} |",
              flush=True)


if __name__ == "__main__":
    main()
