"""The op contract every kernel set implements, and the constants they share.

A *kernel set* is an object with five members (the eager PyTorch one is
`norm_fast/ops/eager.py`, the reading copy of this contract; the others are
`norm_fast/ops/triton/` and the C++/CUDA extension in `norm_fast/ops/extension.py`):

    available()                                   -> (bool, reason)
    moments(x)                                    -> (mean (C,), cov (C, C))
    moments_backward(x, mean, grad_mean, grad_cov)-> dx (B, C, L)
    expand_mse_forward(x, t, a, b, shift, n, store_error, chunk_bytes=..., precision=...)
                                                  -> (sq 0-dim, err (B, C_t, L) or empty)
    expand_mse_backward(grad, x, t, a, b, shift, n, err, grad_mask, chunk_bytes=...,
                        precision=...)            -> (dx, dt, da, db, dshift)

`moments` and `moments_backward` are always exact (IEEE float32 or float64); the two
expand_mse functions take their float32 product precision from `precision` (PRECISIONS).

Sizes: x (B, C_s, L) the student positions (a view of f_s (B, C_s, H, W), any strides),
t (B, C_t, L) the teacher's, P = B * L; a (n*C_t, C_s) the expansion map (segment i is
rows i*C_t:(i+1)*C_t), b (n*C_t,) its bias, shift (C_s,) or None. The error of segment i
at position p is E_i[:, p] = a_i (x[:, p] - shift) + b_i - t[:, p] and `expand_mse`
returns sum_i ||E_i||^2 (docs/design.md section 4). Every function accumulates in the
compute dtype below; `norm_fast/custom_ops.py` makes them differentiable custom ops.
"""
from __future__ import annotations

import contextlib

import torch

# Upper bound on the expanded-error block a direct backward holds at once (bytes): the
# chunking that keeps every path free of an n*C_t*P tensor (docs/design.md, invariants).
DEFAULT_CHUNK_BYTES = 64 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The precisions a product can be planned in (`norm_fast/precision.py`, the plan): "ieee"
# exact float32; "tf32" tensor cores, 10-bit mantissa operands; "tf32x3" three TF32
# products, about float32 accuracy (Triton's tl.dot; elsewhere split operands,
# `ops/products.bilinear`); "bfloat16"/"float16" 16-bit operands; "float64".
PRECISIONS = ("float64", "ieee", "tf32x3", "tf32", "bfloat16", "float16")


@contextlib.contextmanager
def gemm_precision(device: torch.device, dtype: torch.dtype, precision: str):
    """Within the block, float32 cuBLAS GEMMs on CUDA use `precision`: TF32 for "tf32",
    exact otherwise, whatever ``torch.backends.cuda.matmul`` says; restored afterwards.

    The precision-sensitive small algebra runs under "ieee" (covariance, spread,
    variances: docs/design.md section 3), the P-sized products under the plan's policy.
    The flag is process-wide: a matmul launched by another thread meanwhile sees it too.
    Only the current API (``fp32_precision``) is read and written; a value set through
    the legacy ``allow_tf32`` reads through it and stays readable afterwards. Nothing
    changes for other dtypes or devices.
    """
    if dtype != torch.float32:
        yield
        return
    from .products import float32_flags   # (products imports this module)
    with float32_flags(device, precision):
        yield


def check_store_error(n: int, store_error: bool) -> None:
    """The stored error is the decomposed algorithm's one residual: only for n == 1."""
    if store_error and n != 1:
        raise ValueError(f"store_error needs n == 1 (one residual), got n={n}")
