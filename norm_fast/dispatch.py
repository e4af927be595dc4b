"""The one place that chooses a backend (which kernels) and an algorithm (which math).

Backends (kernel sets with the contract of `norm_fast/ops/torch_ops.py`):
    "torch"   eager PyTorch. With algorithm "direct" this is the literal reference
              (`reference.py`, the oracle); with "decomposed", the decomposed algebra in
              PyTorch ops.
    "triton"  fused Triton kernels (CUDA tensors; CPU tensors through the interpreter).
    "cpp"     C++ extension, CPU tensors.       "cuda"  CUDA C++ extension, CUDA tensors.
    "auto"    the fastest available for the device (never the Triton interpreter).
Algorithms (DESIGN.md sections 4-5):
    "direct"      expand every segment and compare it with the teacher, tile by tile;
    "decomposed"  mean-plus-spread: cost independent of N;
    "auto"        the cheaper of the two under `cost_model`.
Adding a backend is one entry in `_KERNEL_MODULES` (and its device rule in `_DEVICE_RULES`).
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Dict, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
ALGORITHMS = ("auto", "direct", "decomposed")

_KERNEL_MODULES: Dict[str, str] = {
    "torch": "norm_fast.ops.torch_ops",
    "triton": "norm_fast.ops.triton_backend",
    "cpp": "norm_fast.ops.cpp_backend",
    "cuda": "norm_fast.ops.cuda_backend",
}
# Device types each backend can run on.
_DEVICE_RULES: Dict[str, Tuple[str, ...]] = {
    "torch": ("cpu", "cuda"),
    "triton": ("cpu", "cuda"),   # cpu = Triton's interpreter: exact but slow, for testing
    "cpp": ("cpu",),
    "cuda": ("cuda",),
}
# Preference order of "auto" per device type (first available wins).
_AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}

_warned: set = set()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return algorithm


def _probe(backend: str) -> Tuple[bool, str]:
    try:
        mod = importlib.import_module(_KERNEL_MODULES[backend])
    except Exception as exc:  # import errors of optional dependencies
        return False, f"{type(exc).__name__}: {exc}"
    available = getattr(mod, "available", None)
    return available() if available is not None else (True, "")


_availability: Dict[str, Tuple[bool, str]] = {}


def is_available(backend: str) -> Tuple[bool, str]:
    """(available, reason) for a concrete backend; probed once per process."""
    if backend not in _availability:
        _availability[backend] = _probe(backend)
    return _availability[backend]


def kernels(backend: str) -> ModuleType:
    """The kernel module of a concrete backend (raises RuntimeError if unavailable)."""
    ok, why = is_available(backend)
    if not ok:
        raise RuntimeError(f"norm_fast backend {backend!r} is not available: {why}")
    return importlib.import_module(_KERNEL_MODULES[backend])


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend for `backend` on `device_type` tensors.

    Probing imports optional modules (triton, the C++ extension), so under torch.compile
    it runs once at trace time and its answer is a constant of the graph."""
    check_backend(backend)
    if backend != "auto":
        if device_type not in _DEVICE_RULES[backend]:
            raise ValueError(f"backend {backend!r} runs on {_DEVICE_RULES[backend]} tensors, "
                             f"got {device_type} tensors")
        ok, why = is_available(backend)
        if not ok:
            raise RuntimeError(f"norm_fast backend {backend!r} was requested but is not "
                               f"available: {why}")
        return backend
    order = _AUTO_ORDER.get(device_type, ("torch",))
    skipped = []
    for name in order:
        ok, why = is_available(name)
        if ok:
            if skipped and name == "torch" and device_type not in _warned:
                _warned.add(device_type)
                warnings.warn("norm_fast: no compiled kernels for " + device_type + " tensors ("
                              + "; ".join(skipped) + "); using the pure-PyTorch paths",
                              RuntimeWarning, stacklevel=3)
            return name
        skipped.append(f"{name}: {why}")
    return "torch"


# --- cost model (DESIGN.md section 5) -------------------------------------------------
# Multiply-adds of forward + backward. The direct form pays ~6 per expanded element and
# channel; the decomposed form pays for the moments (C_s^2 P), the one residual
# (C_t C_s P) and P-independent algebra (N C_t C_s^2). `_ELEMENTWISE` charges the
# memory-bound passes over the N*C_t*P expanded elements (BatchNorm and MSE of the
# literal path, square-and-reduce of the fused one) in multiply-add equivalents, and
# `_DECOMPOSED_OVERHEAD` the fixed launch/algebra overhead; both were calibrated on the
# measurements quoted in README.md.
_ELEMENTWISE = {"cpu": 8.0, "cuda": 40.0}
_DECOMPOSED_OVERHEAD = {"cpu": 1.0, "cuda": 1.0}


def cost_model(B: int, C_s: int, C_t: int, H: int, W: int, n: int, device_type: str,
               batchnorm: bool = True) -> Dict[str, float]:
    """Estimated relative costs of the two algorithms for one forward + backward."""
    P = B * H * W
    e = _ELEMENTWISE.get(device_type, 8.0)
    direct = 6.0 * n * C_t * C_s * P + e * n * C_t * P
    decomposed = (5.0 * C_s * C_s * P + 3.0 * C_t * C_s * P + 5.0 * n * C_t * C_s * C_s
                  + e * (C_t + C_s) * P) * _DECOMPOSED_OVERHEAD.get(device_type, 1.0)
    return {"direct": direct, "decomposed": decomposed}


def resolve(backend: str, algorithm: str, device_type: str, B: int, C_s: int, C_t: int,
            H: int, W: int, n: int) -> Tuple[str, str]:
    """(concrete backend, concrete algorithm) for tensors of the given sizes."""
    check_algorithm(algorithm)
    requested = backend
    backend = resolve_backend(backend, device_type)
    if algorithm == "auto":
        if requested == "torch":
            # An explicit backend="torch" is the oracle: the literal computation.
            algorithm = "direct"
        else:
            cost = cost_model(B, C_s, C_t, H, W, n, device_type)
            algorithm = "decomposed" if cost["decomposed"] < cost["direct"] else "direct"
    return backend, algorithm
