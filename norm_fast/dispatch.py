"""The one place that chooses which kernels run (backend) and which math (algorithm).

`resolve(...)` is entered once per forward, from `NORM.forward` or `norm_loss`, and returns
an immutable `Plan`; the caller branches on `plan.algorithm` once:

    "literal"     the reference computation (`reference.py`): expand, BatchNorm, compare
                  with N teacher copies. Only the eager kernel set runs it.
    "direct"      the FT folded into small maps (docs/design.md section 3), then one fused
                  expand + N-segment MSE pass over the positions (section 5, last part);
    "decomposed"  mean plus spread (section 4): P-sized work independent of N.

Kernel sets (objects with the op contract of `norm_fast/ops/spec.py`) are registered in
`REGISTRY`, name -> (kernel set, device types it runs on):

    "torch"   eager PyTorch (`ops/eager.py`); with algorithm "direct" (or "auto") this is
              the literal reference, the oracle;
    "triton"  fused Triton kernels (`ops/triton/`): CUDA tensors, or CPU tensors through
              Triton's interpreter (exact, slow: for tests);
    "cpp"     the C++ extension's CPU kernels;  "cuda"  its CUDA kernels (`ops/extension.py`);
    "auto"    the fastest available for the device (never the interpreter).

`custom_ops.py` receives the plan's backend name and looks the kernel set up in
`REGISTRY`: a dictionary read, not a second decision. The environment variables
NORM_FAST_BACKEND and NORM_FAST_ALGORITHM, when set, replace the arguments everywhere
(for forcing a path without editing code); they are validated like the arguments.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from . import _checks
from . import precision as precision_plan
from .ops import eager, extension
from .ops.triton import KERNELS as TRITON_KERNELS

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
ALGORITHMS = ("auto", "direct", "decomposed")

# name -> (kernel set, device types it runs on). "cpu" for triton = its interpreter.
REGISTRY: Dict[str, Tuple[Any, Tuple[str, ...]]] = {
    "torch": (eager, ("cpu", "cuda")),
    "triton": (TRITON_KERNELS, ("cpu", "cuda")),
    "cpp": (extension.CPP, ("cpu",)),
    "cuda": (extension.CUDA, ("cuda",)),
}
# Preference order of "auto" per device type (first available wins).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}
ENV_BACKEND, ENV_ALGORITHM = "NORM_FAST_BACKEND", "NORM_FAST_ALGORITHM"

_warned: set = set()


@dataclass(frozen=True)
class Plan:
    """What one forward runs. backend: a concrete name in REGISTRY; algorithm: "literal",
    "direct" or "decomposed"; kernels: the registered kernel set itself; precision: the
    precision policy (`norm_fast/precision.py`: "ieee", "tf32", "tf32x3", "bfloat16",
    "float16", "float64"), under which `precision.PLAN` gives every product's."""
    backend: str
    algorithm: str
    kernels: Any
    precision: str = "ieee"

    @property
    def literal(self) -> bool:
        return self.algorithm == "literal"


def check_backend(backend: str, what: str = "backend") -> str:
    return _checks.check_choice(what, backend, BACKENDS)


def check_algorithm(algorithm: str, what: str = "algorithm") -> str:
    return _checks.check_choice(what, algorithm, ALGORITHMS)


def check_precision(precision: str, what: str = "precision") -> str:
    return _checks.check_choice(what, precision,
                                ("auto",) + precision_plan.FLOAT32_POLICIES)


def resolve_precision(precision: str, device_type: str, dtype: torch.dtype,
                      product_dtype=None) -> str:
    """The precision policy (`norm_fast.precision.resolve_policy`): "auto" follows the
    literal, whose float32 convolutions are cuDNN's, on TF32 exactly when
    ``torch.backends.cudnn.allow_tf32`` is True (PyTorch's default): "tf32" on CUDA then,
    "ieee" otherwise and on CPU; 16-bit products (autocast) "bfloat16"/"float16";
    float64 "float64". An explicit "ieee" / "tf32" / "tf32x3" is kept for float32.
    Every product's precision under the policy is `precision.PLAN`'s."""
    return precision_plan.resolve_policy(precision, device_type, dtype, product_dtype)


def devices_of(backend: str) -> Tuple[str, ...]:
    """Device types a concrete backend runs on."""
    return REGISTRY[backend][1]


_availability: Dict[str, Tuple[bool, str]] = {}


def is_available(backend: str) -> Tuple[bool, str]:
    """(available, reason) for a concrete backend; probed once per process."""
    if backend not in _availability:
        try:
            _availability[backend] = REGISTRY[backend][0].available()
        except Exception as exc:  # a broken optional dependency must not break imports
            _availability[backend] = (False, f"{type(exc).__name__}: {exc}")
    return _availability[backend]


@torch.compiler.assume_constant_result
def _overrides(backend: str, algorithm: str) -> Tuple[str, str]:
    """The arguments, replaced by NORM_FAST_BACKEND / NORM_FAST_ALGORITHM when set.
    A constant of the graph under torch.compile (read at trace time)."""
    env_b = os.environ.get(ENV_BACKEND, "").strip()
    env_a = os.environ.get(ENV_ALGORITHM, "").strip()
    if env_b:
        backend = check_backend(env_b, f"environment variable {ENV_BACKEND}")
    if env_a:
        algorithm = check_algorithm(env_a, f"environment variable {ENV_ALGORITHM}")
    return backend, algorithm


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend for `backend` on `device_type` tensors.

    Probing imports optional modules (triton, the C++ extension), so under torch.compile
    it runs once at trace time and its answer is a constant of the graph."""
    check_backend(backend)
    if backend != "auto":
        if device_type not in devices_of(backend):
            raise ValueError(f"backend {backend!r} runs on {devices_of(backend)} tensors, "
                             f"got {device_type} tensors")
        ok, why = is_available(backend)
        if not ok:
            raise RuntimeError(f"norm_fast backend {backend!r} was requested but is not "
                               f"available: {why}")
        return backend
    skipped = []
    for name in AUTO_ORDER.get(device_type, ("torch",)):
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


# --- cost model (docs/design.md section 5) --------------------------------------------
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


# --- GPU time model (seconds) ------------------------------------------------------------
# On a GPU the multiply-add count misleads twice: each product runs at the rate of its
# precision (the literal's 1x1 convolutions on TF32 in float32 by cuDNN's default, bf16
# under autocast; the fused forms' products as `precision.PLAN` says, 3xTF32 at a third
# of TF32's rate), and a step of the fused forms issues more device operations than the
# literal, each paying a host-side launch. So on CUDA, per candidate,
#     time = max(host, device),   host = launches * LAUNCH_S,
#     device = sum over its products of 2 * macs / (rate of its planned precision)
#              + bytes / GPU_BANDWIDTH + launches * KERNEL_FLOOR_S
# with the rates of an H200 SXM's data sheet (dense, no sparsity, `precision.H200_RATES`)
# derated by GPU_EFFICIENCY (an estimate: nothing here was measured on a GPU yet), the
# products and their multiply-adds from `precision.macs` (tests/test_dispatch.py keeps
# model and plan in step), and the device operations of one training step as
# tests/launch_count.py counts them (asserted equal in tests/test_launch_count.py, so
# this table cannot drift from the code; the CUDA extension's are counted on CPU as its
# C++ twin taking the CUDA route, the same host code). Deterministic in the shapes:
# every DDP rank with the same per-rank batch chooses the same algorithm.
GPU_RATES = precision_plan.H200_RATES               # flop/s (a multiply-add is 2 flop)
GPU_BANDWIDTH = 4.8e12                              # bytes/s (HBM3e)
GPU_EFFICIENCY = 0.5                                # fraction of peak a product reaches
LAUNCH_S = 5e-6                                     # host time of one device operation
KERNEL_FLOOR_S = 2e-6                               # device time of one small kernel
LAUNCHES = {("torch", "literal"): 21,               # tests/test_launch_count.py
            ("triton", "direct"): 33, ("triton", "decomposed"): 35,
            ("cpp", "direct"): 152, ("cpp", "decomposed"): 241,
            ("cuda", "direct"): 115, ("cuda", "decomposed"): 172,
            ("torch", "decomposed"): 173}

_LITERAL_PASSES = 12      # reads + writes of the N*C_t*P expanded tensors, fwd + bwd


def model_policy(dtype: torch.dtype, literal_tf32: bool = True) -> str:
    """The precision policy the time model prices for products in `dtype`."""
    if dtype == torch.float32:
        return "tf32" if literal_tf32 else "ieee"
    return {torch.float64: "float64", torch.bfloat16: "bfloat16",
            torch.float16: "float16"}[dtype]


def gpu_product_seconds(B: int, C_s: int, C_t: int, H: int, W: int, n: int,
                        algorithm: str, policy: str) -> Dict[str, float]:
    """{product: estimated device seconds} of one training step of `algorithm`
    ("direct"/"decomposed") under `policy`: 2 * `precision.macs` at the rate of the
    product's planned precision, derated by GPU_EFFICIENCY."""
    out = {}
    for product in precision_plan.PRODUCTS:
        m = precision_plan.macs(product, B, C_s, C_t, H, W, n, algorithm)
        if m:
            prec = precision_plan.of(policy, product)
            out[product] = 2.0 * m / (GPU_RATES[prec] * GPU_EFFICIENCY)
    return out


def gpu_time_model(B: int, C_s: int, C_t: int, H: int, W: int, n: int, backend: str,
                   dtype: torch.dtype = torch.float32, literal_tf32: bool = True,
                   policy: str = None) -> Dict[str, float]:
    """Estimated seconds of one training forward + backward on an H200, per algorithm.

    dtype: the dtype the P-sized products run in (the autocast dtype under autocast);
    literal_tf32: whether the literal's float32 convolutions use TF32
    (torch.backends.cudnn.allow_tf32, True by default); policy: the precision policy
    (default from the two, `model_policy`). The literal's products are charged at its
    own precision (`precision.LITERAL`), each fused form's at the plan's
    (`gpu_product_seconds`).
    """
    policy = policy or model_policy(dtype, literal_tf32)
    P = B * H * W
    NC = n * C_t
    item = torch.finfo(dtype).bits // 8
    io = (C_s + C_t) * P * item * 6           # f_s, f_t, the features and their gradients
    lit_rate = GPU_RATES[precision_plan.LITERAL[policy]] * GPU_EFFICIENCY
    out = {}
    for algo in ("literal", "direct", "decomposed"):
        if algo == "literal":
            key = ("torch", "literal")
            products = 12.0 * NC * C_s * P / lit_rate
            extra = _LITERAL_PASSES * NC * P * item
        else:
            key = (backend, algo)
            products = sum(gpu_product_seconds(B, C_s, C_t, H, W, n, algo, policy).values())
            extra = 0.0
        launches = LAUNCHES.get(key, LAUNCHES[("torch", "decomposed")])
        device = products + (io + extra) / GPU_BANDWIDTH + launches * KERNEL_FLOOR_S
        out[algo] = max(launches * LAUNCH_S, device)
    return out


def literal_memory_limit(device_type: str) -> int:
    """Bytes of expanded tensors the literal form may allocate when auto picks it: 1 GiB on
    CPU; a quarter of the current device's memory on CUDA (35 GiB on an H200)."""
    if device_type == "cuda" and torch.cuda.is_available():
        return _cuda_memory() // 4
    return LITERAL_MEMORY_LIMIT


@torch.compiler.assume_constant_result
def _cuda_memory() -> int:
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _choose_algorithm(requested: str, backend: str, algorithm: str, device_type: str,
                      B: int, C_s: int, C_t: int, H: int, W: int, n: int,
                      dtype: torch.dtype = torch.float32) -> str:
    """The algorithm of the plan: "literal", "direct" or "decomposed"."""
    if backend == "torch" and algorithm in ("direct", "auto") and (
            algorithm == "direct" or requested == "torch"):
        return "literal"      # the torch backend's direct form is the literal reference
    if algorithm != "auto":
        return algorithm
    if device_type == "cuda":
        cost = gpu_time_model(B, C_s, C_t, H, W, n, backend, dtype,
                              bool(torch.backends.cudnn.allow_tf32))
    else:
        cost = cost_model(B, C_s, C_t, H, W, n, device_type)
    if backend == "torch":
        cost["direct"] = cost["literal"]
    expanded_bytes = _LITERAL_COPIES * 4 * n * C_t * B * H * W
    if requested != "auto" or expanded_bytes > literal_memory_limit(device_type):
        cost.pop("literal")
    choice = min(cost, key=cost.get)
    if backend == "torch" and choice == "direct":
        # never the literal form past the memory limit
        return ("literal" if expanded_bytes <= literal_memory_limit(device_type)
                else "decomposed")
    return choice


def product_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the P-sized products run in: the autocast dtype where autocast is on for
    the device and the tensors are float32, else the tensors' own."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def resolve(backend: str, algorithm: str, device_type: str, B: int, C_s: int, C_t: int,
            H: int, W: int, n: int, dtype: torch.dtype = torch.float32,
            precision: str = "auto") -> Plan:
    """The plan for tensors of the given sizes.

    With backend="auto" and algorithm="auto" the literal form competes with the fused
    forms wherever its expanded tensors fit `literal_memory_limit` (small maps with wide
    channels: there, folding the FT into C_s x C_s maps costs more than expanding P
    positions). An explicit backend="torch" with algorithm "direct" or "auto" is the
    literal reference. dtype: the student features' dtype; on CUDA the time model charges
    the dtype the products run in (the autocast dtype under autocast). precision: see
    `resolve_precision`.
    """
    backend, algorithm = _overrides(check_backend(backend), check_algorithm(algorithm))
    requested = backend
    backend = resolve_backend(backend, device_type)
    pdt = product_dtype(dtype, device_type)
    chosen = _choose_algorithm(requested, backend, algorithm, device_type, B, C_s, C_t, H, W,
                               n, pdt)
    if chosen == "literal":
        backend = "torch"
    return Plan(backend, chosen, REGISTRY[backend][0],
                resolve_precision(precision, device_type, dtype, pdt))
