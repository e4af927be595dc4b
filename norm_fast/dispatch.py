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
# Multiply-adds of one forward + backward, per candidate:
#   literal     6 N C_t C_s P (expand, contract, their backward) plus the memory-bound
#               passes over the N C_t P expanded elements (BatchNorm, MSE, the repeated
#               teacher), charged `_EXPANDED_PASS` multiply-add equivalents per element;
#   direct      the fused pass and its chunked recompute (4 N C_t C_s P) plus the folded
#               C_s x C_s maps (5 N C_t C_s^2: the contraction K = W2 A and the BatchNorm
#               statistics) and the moments and features (5 C_s^2 P);
#   decomposed  5 N C_t C_s^2 + 5 C_s^2 P + 3 C_t C_s P, independent of N in its P part.
# Calibrated on this project's CPU measurements (README "Choosing the algorithm"): the
# three GEMM-bound forms run at about the same multiply-add rate there, and the literal
# form's expanded passes cost about 250 multiply-adds per element. The literal form is a
# candidate only for backend="auto" and only while its expanded tensors stay small.
_EXPANDED_PASS = {"cpu": 250.0, "cuda": 250.0}
LITERAL_MEMORY_LIMIT = 2**30   # bytes of expanded tensors the literal form may allocate
_LITERAL_COPIES = 5            # expanded tensors the literal forward + backward holds


def cost_model(B: int, C_s: int, C_t: int, H: int, W: int, n: int,
               device_type: str) -> Dict[str, float]:
    """Estimated multiply-add equivalents of one forward + backward per algorithm."""
    P = B * H * W
    NC = n * C_t
    return {
        "literal": 6.0 * NC * C_s * P + _EXPANDED_PASS.get(device_type, 250.0) * NC * P,
        "direct": 4.0 * NC * C_s * P + 5.0 * NC * C_s * C_s + 5.0 * C_s * C_s * P,
        "decomposed": 5.0 * NC * C_s * C_s + 5.0 * C_s * C_s * P + 3.0 * C_t * C_s * P,
    }


def resolve(backend: str, algorithm: str, device_type: str, B: int, C_s: int, C_t: int,
            H: int, W: int, n: int) -> Tuple[str, str]:
    """(concrete backend, concrete algorithm) for tensors of the given sizes.

    ("torch", "direct") is the literal computation. With backend="auto" and
    algorithm="auto" it competes with the fused forms wherever its expanded tensors fit
    `LITERAL_MEMORY_LIMIT` (small maps with wide channels: there, folding the FT into
    C_s x C_s maps costs more than expanding P positions).
    """
    check_algorithm(algorithm)
    requested = backend
    backend = resolve_backend(backend, device_type)
    if algorithm != "auto":
        return backend, algorithm
    if requested == "torch":
        return "torch", "direct"   # an explicit backend="torch" is the oracle
    cost = cost_model(B, C_s, C_t, H, W, n, device_type)
    if backend == "torch":
        cost["direct"] = cost["literal"]   # the torch backend's direct form is the literal one
    expanded_bytes = _LITERAL_COPIES * 4 * n * C_t * B * H * W
    if requested != "auto" or expanded_bytes > LITERAL_MEMORY_LIMIT:
        cost.pop("literal")
    choice = min(cost, key=cost.get)
    if choice == "literal":
        return "torch", "direct"
    if backend == "torch" and choice == "direct" and expanded_bytes > LITERAL_MEMORY_LIMIT:
        choice = "decomposed"   # never the literal form past the memory limit
    return backend, choice
