"""The ``"cpp"`` kernel set: the C++ extension's CPU kernels (csrc/cpu, csrc/norm_ops.h).

Same four functions, signatures and semantics as `norm_fast/ops/torch_ops.py` (the
contract), computed per chunk of positions as pack -> BLAS GEMM -> one fused pass
(centring, error, squared norm, error store, row sums), parallel over channels with
at::parallel_for.  CPU tensors only; `available()` says whether the extension could be
found or built, and why not.
"""
from __future__ import annotations

from . import _extension

_kernels = _extension.KernelSet("cpu", "cpp")
available = _kernels.available
moments = _kernels.moments
moments_backward = _kernels.moments_backward
expand_mse_forward = _kernels.expand_mse_forward
expand_mse_backward = _kernels.expand_mse_backward
