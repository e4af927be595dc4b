"""Cross-check of the CPU peak-memory method against peak resident memory.

    python -m benchmarks.memory_crosscheck [shape] [pass]

For each NORM path, a fresh subprocess builds the module and inputs, runs warm steps,
then measures one step twice: with the allocator-event method of benchmarks/memory.py,
and as the rise of peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS
at the start of the step. The child runs with MALLOC_MMAP_THRESHOLD_=65536 and
MALLOC_TRIM_THRESHOLD_=0, so glibc returns freed blocks to the kernel and RSS follows
live memory. RSS also sees memory malloc'ed outside PyTorch's allocator (thread stacks,
library workspaces), so it reads a little higher; large gaps would mean the allocator
method misses something. Linux only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, warnings, torch
warnings.filterwarnings("ignore")
from benchmarks import memory, paths, shapes, steps
shape = shapes.scaled(shapes.select([sys.argv[1]])[0], "cpu")
path = [p for p in paths.discover("cpu")[0] if p.name == sys.argv[2]][0]
dev = torch.device("cpu")
call, module = paths.build_module(path, shape, dev)
step = steps.make_step(call, module, shape, dev, torch.float32, sys.argv[3])
for _ in range(3):
    step()
alloc = memory.peak_step_bytes(step, dev)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
step.clear()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                               # reset VmHWM to the current RSS
before = status("VmRSS:")
out = step()
rss = status("VmHWM:") - before
print(json.dumps({"path": path.name, "allocator_peak": alloc, "rss_peak": rss}))
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    shape = argv[0] if argv else "resnet34-resnet18"
    pass_ = argv[1] if len(argv) > 1 else "forward+backward"
    from benchmarks import paths
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    print(f"{shape}, {pass_}, float32: peak bytes above the step's start")
    print(f"{'path':28s} {'allocator events':>18s} {'peak RSS rise':>15s} {'RSS/alloc':>10s}")
    for p in paths.discover("cpu")[0]:
        if p.compiled:
            continue
        res = subprocess.run([sys.executable, "-c", CHILD, shape, p.name, pass_], env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{p.name:28s} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        ratio = r["rss_peak"] / r["allocator_peak"] if r["allocator_peak"] else float("nan")
        print(f"{p.name:28s} {r['allocator_peak'] / 2**20:15.1f} MiB "
              f"{r['rss_peak'] / 2**20:11.1f} MiB {ratio:9.2f}x")


if __name__ == "__main__":
    main()
