"""The ``"cuda"`` kernel set: the extension's CUDA kernels (csrc/cuda, csrc/norm_ops.h).

Same four functions, signatures and semantics as `norm_fast/ops/torch_ops.py` (the
contract), computed per chunk of positions as pack -> cuBLAS GEMM (through ATen) ->
fused coalesced kernels (centring, error, squared norm, error store, row sums), all on
the current CUDA stream, fp32 accumulation for fp16/bf16/fp32 inputs.  CUDA tensors
only; `available()` says whether the extension has its CUDA kernels, and why not.
"""
from __future__ import annotations

from . import _extension

_kernels = _extension.KernelSet("cuda", "cuda")
available = _kernels.available
moments = _kernels.moments
moments_backward = _kernels.moments_backward
expand_mse_forward = _kernels.expand_mse_forward
expand_mse_backward = _kernels.expand_mse_backward
