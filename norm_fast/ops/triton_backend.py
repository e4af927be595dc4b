"""The ``"triton"`` kernel set: the contract of `norm_fast/ops/torch_ops.py` in Triton.

    moments(x)                          -> (mean, cov)      norm_fast/ops/moments.py
    moments_backward(x, mean, gm, gc)   -> dx               torch_ops' GEMM (cuBLAS)
    expand_mse_forward(...)             -> (sq, err)        norm_fast/ops/expand_mse.py
    expand_mse_backward(...)            -> (dx, dt, da, db, dshift)

CUDA tensors run compiled kernels; CPU tensors run the same kernels under Triton's
interpreter (slow, for tests and debugging; `TRITON_INTERPRET` need not be set).
Importing this module never fails: when Triton is missing or broken, `available()`
says why and the four functions raise a RuntimeError with that reason.
"""
from __future__ import annotations

from typing import Tuple

from . import torch_ops

__all__ = ["available", "moments", "moments_backward", "expand_mse_forward",
           "expand_mse_backward"]

try:
    import triton  # noqa: F401

    from .expand_mse import expand_mse_backward, expand_mse_forward
    from .moments import moments

    _REASON = f"triton {triton.__version__}"
    _OK = True
except Exception as exc:  # ImportError, or a Triton too old for our kernels
    _REASON = f"triton unusable: {type(exc).__name__}: {exc}"
    _OK = False

    def _unusable(*args, **kwargs):
        raise RuntimeError(f"the triton kernel set is unavailable ({_REASON})")

    moments = expand_mse_forward = expand_mse_backward = _unusable

# The backward of the moments is a (C, C) x (C, P) GEMM: cuBLAS already does it best.
moments_backward = torch_ops.moments_backward


def available() -> Tuple[bool, str]:
    """(True, "triton <version>") when the kernels import, else (False, the reason).

    This checks that Triton and its interpreter import and that the kernels were
    defined; whether a CUDA launch compiles is only known at the first launch.
    """
    return _OK, _REASON
