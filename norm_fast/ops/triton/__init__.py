"""The Triton kernel set (``backend="triton"``): the op contract of `norm_fast/ops/spec.py`.

    moments(x)                          -> (mean, cov)      moments.py (fused kernel)
    moments_backward(x, mean, gm, gc)   -> dx               the eager GEMM (cuBLAS does it best)
    expand_mse_forward(...)             -> (sq, err)        expand_mse.py (fused kernel)
    expand_mse_backward(...)            -> (dx, dt, da, db, dshift)   expand_mse.py
    expansion_forward(...), expansion_backward(...)   the small algebra of the fused
                                        training step, one kernel each: expansion.py

CUDA tensors run compiled kernels; CPU tensors run the same kernels under Triton's
interpreter (slow, for tests and debugging; `TRITON_INTERPRET` need not be set).
Importing this package does not import Triton: `KERNELS.available()` does, once, and
says why not when Triton is missing or broken; the kernel functions then raise a
RuntimeError with that reason.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .. import eager


class TritonKernels:
    """The five members of the op contract; Triton itself is imported on first use."""

    name = "triton"
    moments_backward = staticmethod(eager.moments_backward)

    def __init__(self):
        self._state: Optional[Tuple[bool, str]] = None

    def available(self) -> Tuple[bool, str]:
        if self._state is None:
            try:
                import triton

                from . import expand_mse, expansion, moments  # noqa: F401  (the kernels)
                self._state = (True, f"triton {triton.__version__}")
            except Exception as exc:  # ImportError, or a Triton too old for the kernels
                self._state = (False, f"triton unusable: {type(exc).__name__}: {exc}")
        return self._state

    def _require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"the triton kernel set is unavailable ({why})")

    def moments(self, x, precision="float64"):
        self._require()
        from .moments import moments
        return moments(x, precision)

    def expand_mse_forward(self, *args, **kwargs):
        self._require()
        from .expand_mse import expand_mse_forward
        return expand_mse_forward(*args, **kwargs)

    def expand_mse_backward(self, *args, **kwargs):
        self._require()
        from .expand_mse import expand_mse_backward
        return expand_mse_backward(*args, **kwargs)


KERNELS = TritonKernels()


def _member(module: str, name: str):
    def call(self, *args, **kwargs):
        self._require()
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)
    call.__name__ = name
    return call


TritonKernels.expansion_forward = _member("expansion", "expansion_forward")
TritonKernels.expansion_backward = _member("expansion", "expansion_backward")
TritonKernels.centre_segments = _member("expansion", "centre_segments")
TritonKernels.decomposed_total = _member("expansion", "decomposed_total")
TritonKernels.centred_moments = _member("moments", "centred_moments")
TritonKernels.expand_error = _member("expand_mse", "expand_error")
