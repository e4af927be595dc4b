"""Registers and spill bytes of every Triton kernel configuration compiled for sm_90, on CPU.

    python -m benchmarks.register_table            (markdown table on stdout)

Compiles ahead of time (Triton frontend, LLVM, ptxas; no GPU) every build a GPU run may
launch: both expand_mse kernels at each configuration of `GPU_CONFIGS`, x resident or not,
and the moments kernel, for float32 (ieee and tf32), bfloat16 and float64, with the register
ceiling the launches use. The builds and the compile helper are the ones
tests/test_triton_ops.py asserts spill-free. Run it with each Triton version to compare.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

CASES = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"),
         (torch.float64, "ieee")]


def main() -> int:
    import triton
    from test_triton_ops import _compile_for_sm90, gpu_kernel_builds, ptxas_usage
    warnings.simplefilter("ignore")
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90\n")
    print("| kernel | dtype | precision | config (P x C x K, warps, stages) | registers | "
          "spill bytes |")
    print("|---|---|---|---|---|---|")
    for dtype, precision in CASES:
        for name, kernel, ptrs, consts, warps, stages in gpu_kernel_builds(dtype, precision):
            regs, spills = ptxas_usage(_compile_for_sm90(kernel, ptrs, consts, warps, stages))
            kind, _, cfg = name.partition(" ")
            prec = precision if dtype == torch.float32 else "n/a"
            print(f"| {kind} | {str(dtype)[6:]} | {prec} | {cfg} | {regs} | {spills} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
