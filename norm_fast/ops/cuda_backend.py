"""The ``"cuda"`` kernel set: the extension's CUDA kernels (csrc/cuda, csrc/norm_ops.h).

Same four functions, signatures and semantics as `norm_fast/ops/torch_ops.py` (the
contract), computed per chunk of positions as pack -> cuBLAS GEMM (through ATen) ->
fused coalesced kernels (centring, error, squared norm, error store, row sums), all on
the current CUDA stream, fp32 accumulation for fp16/bf16/fp32 inputs.  CUDA tensors
only; `available()` says whether the extension has its CUDA kernels, and why not.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from . import _extension
from .torch_ops import DEFAULT_CHUNK_BYTES

_DEVICE = "cuda"
_NAME = "cuda"


def available() -> Tuple[bool, str]:
    return _extension.available(_DEVICE)


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    return tuple(_extension.checked_module(_DEVICE, _NAME, x).moments(x))


def moments_backward(x: Tensor, mean: Tensor, grad_mean: Optional[Tensor],
                     grad_cov: Optional[Tensor]) -> Tensor:
    ext = _extension.checked_module(_DEVICE, _NAME, x, mean, grad_mean, grad_cov)
    return ext.moments_backward(x, mean, grad_mean, grad_cov)


def expand_mse_forward(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
                       n: int, store_error: bool,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, Tensor]:
    if store_error and n != 1:
        raise ValueError(f"store_error needs n == 1 (one residual), got n={n}")
    ext = _extension.checked_module(_DEVICE, _NAME, x, t, a, b, shift)
    return tuple(ext.expand_mse_forward(x, t, a, b, shift, int(n), bool(store_error),
                                        int(chunk_bytes)))


def expand_mse_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                        shift: Optional[Tensor], n: int, err: Optional[Tensor],
                        grad_mask: List[bool],
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, ...]:
    ext = _extension.checked_module(_DEVICE, _NAME, x, t, a, b, shift, err)
    return tuple(ext.expand_mse_backward(grad, x, t, a, b, shift, int(n), err,
                                         [bool(m) for m in grad_mask], int(chunk_bytes)))
