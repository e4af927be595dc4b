"""The standard CPU training step timed against another checkout, alternating.

    python benchmarks/step_ab.py OTHER_CHECKOUT [--pairs 8] [--steps 15]

The step: NORM(512, 512, n=8) in training (backend and algorithm "auto"), B=64, 7x7,
float32, post-ReLU f_s, forward + backward of loss + <features, g>. Each run is a fresh
process importing one checkout (its norm_fast, with its own built extension, first on
sys.path); the two checkouts alternate, and each run reports the median of `steps`
steps after three warm-up steps. Prints every pair, the means and their ratio (this
checkout / the other): a ratio measured in one run, as the machines are shared.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEP = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, norm_fast
assert norm_fast.__file__.startswith(sys.argv[1]), norm_fast.__file__
from norm_fast import NORM
torch.manual_seed(0)
m = NORM(512, 512, 8).train()
f_s = torch.relu(torch.randn(64, 512, 7, 7)).requires_grad_()
f_t, g = torch.randn(64, 512, 7, 7), torch.randn(64, 512, 7, 7)
def step():
    feats, loss = m(f_s, f_t)
    torch.autograd.backward((loss, feats), (None, g))
for _ in range(3):
    step()
ts = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
plan = m.resolve(f_s)
print(sorted(ts)[len(ts) // 2] * 1e3, plan.backend, plan.algorithm)
"""


def run(root: str, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", STEP, os.path.abspath(root), str(steps)],
                         capture_output=True, text=True, check=True, cwd=os.path.abspath(root))
    return float(out.stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pairs = []
    for _ in range(args.pairs):
        pairs.append((run(args.other, args.steps), run(here, args.steps)))
        print(f"other {pairs[-1][0]:7.1f} ms   this {pairs[-1][1]:7.1f} ms", flush=True)
    other = sum(p[0] for p in pairs) / len(pairs)
    this = sum(p[1] for p in pairs) / len(pairs)
    print(f"mean: other {other:.1f} ms, this {this:.1f} ms, ratio {this / other:.3f}")


if __name__ == "__main__":
    main()
