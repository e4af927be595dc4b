"""Registers and spill bytes of every Triton kernel configuration compiled for sm_90, on CPU.

    python -m benchmarks.register_table            (markdown table on stdout)
    python -m benchmarks.register_table --check    (also exit 1 on a spill or a failed build)

Compiles ahead of time (Triton frontend, LLVM, ptxas; no GPU) every build a GPU run may
launch: both expand_mse kernels at each configuration of `GPU_CONFIGS`, x resident or not,
the moments kernel, and the fused training step's kernels (the error recomputation, the
channel statistics, centring moments and finalize kernels, the expansion's forward and
backward), for float32 (ieee and tf32), bfloat16 and float64, with the register ceiling
the launches use. The builds and the compile helper are the ones
tests/test_triton_ops.py asserts spill-free. Run it with each Triton version to compare;
`make triton-compat` (run by .ci/run) does it with Triton 3.6, the GPU machine's, installed
apart (`pip install --target`, put first on PYTHONPATH), so that a kernel that only the
CI's newer Triton compiles is caught before a GPU run.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

CASES = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"),
         (torch.bfloat16, "ieee"), (torch.float64, "ieee")]


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    import triton
    from test_triton_ops import _compile_for_sm90, gpu_kernel_builds, ptxas_usage
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90\n")
    print("| kernel | dtype | precision | config (P x C x K, warps, stages) | registers | "
          "spill bytes |")
    print("|---|---|---|---|---|---|")
    bad = []
    for dtype, precision in CASES:
        for name, kernel, ptrs, consts, warps, stages in gpu_kernel_builds(dtype, precision):
            kind, _, cfg = name.partition(" ")
            prec = precision if dtype == torch.float32 else "n/a"
            try:
                regs, spills = ptxas_usage(_compile_for_sm90(kernel, ptrs, consts, warps,
                                                             stages))
            except Exception as exc:  # a build this Triton cannot compile: say which
                regs, spills = "FAILED", f"{type(exc).__name__}: {str(exc)[:80]}"
            if regs == "FAILED" or spills:
                bad.append(f"{name} {str(dtype)[6:]} {prec}: {regs} {spills}")
            print(f"| {kind} | {str(dtype)[6:]} | {prec} | {cfg} | {regs} | {spills} |",
                  flush=True)
    if bad:
        print(f"\n{len(bad)} build(s) failed or spilled with Triton {triton.__version__}:\n  "
              + "\n  ".join(bad), file=sys.stderr)
    return 1 if (check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
