"""The precision plan: which precision each product of the fast forms runs in, per policy.

One table (`PLAN`) is the single source for the kernels (Triton's ``tl.dot``
input_precision, the eager kernel set's operand rounding), the cuBLAS/cuDNN calls of the
training step (their float32 flags) and the GPU time model (`dispatch.gpu_time_model`
prices each product at the rate of its planned precision). docs/design.md section 6 has
the emulated measurements behind every entry.

A *policy* is what the literal reference itself runs in (`resolve_policy`):

    float64    float64 tensors: every product in float64
    ieee       float32, the literal's convolutions IEEE (cudnn.allow_tf32 off; CPU)
    tf32       float32, the literal's convolutions on TF32 tensor cores (the CUDA default)
    tf32x3     float32, the P-sized products in 3xTF32 (precision="tf32x3")
    bfloat16   autocast to bfloat16 (or bfloat16 tensors)
    float16    autocast to float16 (or float16 tensors)

A *precision* is how one product multiplies (`PRECISIONS`): "float64"; "ieee" (float32
FMA); "tf32" (operands rounded to 10-bit mantissas, products exact, float32 accumulation);
"tf32x3" (a_hi b_hi + a_hi b_lo + a_lo b_hi with TF32 parts: about float32 accuracy at a
third of TF32's rate); "bfloat16" / "float16" (16-bit operands, float32 accumulation,
16-bit output where a cuDNN convolution returns it). The Gram under "ieee" is float64 FMA
dots (docs/design.md section 3), written "float64".

On a GPU the plan is what runs. On CPU there are no tensor cores: the C++ kernels and
the Triton interpreter multiply exactly whatever the plan says (at least as accurate as
planned), while the eager kernel set (``backend="torch"``) and the training step's own
products *emulate* every planned precision by rounding their operands
(`norm_fast/ops/products.py`): that is how tests/test_precision.py measures a plan on a
machine without a GPU. `override` swaps single entries (the tests' mutants; experiments).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping, Optional

import torch

from . import _checks

PRECISIONS = ("float64", "ieee", "tf32x3", "tf32", "bfloat16", "float16")
POLICIES = ("float64", "ieee", "tf32x3", "tf32", "bfloat16", "float16")
FLOAT32_POLICIES = ("ieee", "tf32x3", "tf32")   # what `precision=` may name

# name: (what it computes, multiply-adds of one training step, in terms of
#        P positions, C = C_s, T = C_t, O = n * C_t; docs/design.md sections 3-8)
PRODUCTS: Dict[str, str] = {
    "gram": "S = Xc Xc^T / P, the covariance (moments kernel)                 C^2 P",
    "w1s": "W1 S, for the decomposed loss [W1_i - Wbar; Wbar] S (cuBLAS)      (O [+ T]) C^2",
    "k": "K = W2 A, the folded contraction map (cuBLAS)                      O C^2",
    "contraction": "uc = K Xc, the contraction as one 1x1 convolution (cuDNN)      C^2 P",
    "residual": "R = Abar Xc + rb - T, the decomposed loss's residual (kernel)    T C P",
    "residual_grad": "G4 = R Xc^T / P (forward) and Abar^T e (cuDNN conv backward)  2 T C P",
    "direct": "E_i = A_i (Xc - m) + b_i - T, every segment (kernel; forward and the "
              "backward's recomputation)                                         2 O C P",
    "direct_grad": "dA = e Xc^T and A^T e of the direct loss (conv backward)        2 O C P",
    "contraction_grad": "g_K = g_uc Xc^T and K^T g_uc (cuDNN conv backward)           2 C^2 P",
    "small_grad": "g_W2 = g_K A^T, g_A = W2^T g_K, g_S = W1^T gW1S (cuBLAS)       3 O C^2",
    "gram_grad": "2 g_S Xc / P, the student's gradient through S (batched GEMM)   C^2 P",
    "gram_grad_direct": "the same product in the direct form's step (its loss's part of "
                        "g_S needs more than TF32: 9x)                       C^2 P",
}

# Which algorithm runs which product ("all": both fused forms).
USED_BY = {"residual": ("decomposed",), "residual_grad": ("decomposed",),
           "gram_grad": ("decomposed",),
           "direct": ("direct",), "direct_grad": ("direct",), "gram_grad_direct": ("direct",)}


def _row(gram, w1s, k, contraction, residual, residual_grad, direct, direct_grad,
         contraction_grad, small_grad, gram_grad, gram_grad_direct):
    return dict(gram=gram, w1s=w1s, k=k, contraction=contraction, residual=residual,
                residual_grad=residual_grad, direct=direct, direct_grad=direct_grad,
                contraction_grad=contraction_grad, small_grad=small_grad,
                gram_grad=gram_grad, gram_grad_direct=gram_grad_direct)


# The plan. Columns in the order of `_row`'s arguments. The measurements behind each
# entry (emulated on CPU, errors against float64 relative to the literal's own under the
# same policy: tests/precision_plan_harness.py) are in docs/design.md section 6. Under
# TF32 the entries above TF32 are those whose plain TF32 fails by 10-1800x: the Gram and
# W1 S (d/dgamma1 near convergence), the residual and the direct pass (d/dbeta1: TF32
# rounding of Xc leaves a mean over positions that the literal's BatchNorm removes right
# after its product), the student's gradient through S (the direct loss's d/df_s, 9x).
# 3xTF32 is planned only where a Triton tl.dot runs it (gram, residual, direct); the
# cuBLAS/cuDNN products that need more than TF32 run IEEE (one call, no split operands).
PLAN: Dict[str, Dict[str, str]] = {
    "float64": _row(*(["float64"] * 12)),
    #             gram      w1s     k       contr.  resid.    res_grad direct    dir_grad
    #             c_grad    small   gram_grad gram_grad_direct
    "ieee": _row("float64", "ieee", "ieee", "ieee", "ieee", "ieee", "ieee", "ieee",
                 "ieee", "ieee", "ieee", "ieee"),
    "tf32x3": _row("tf32x3", "ieee", "ieee", "ieee", "tf32x3", "ieee", "ieee", "ieee",
                   "ieee", "ieee", "ieee", "ieee"),
    "tf32": _row("tf32x3", "ieee", "tf32", "tf32", "tf32x3", "tf32", "tf32x3", "ieee",
                 "tf32", "tf32", "tf32", "ieee"),
    "bfloat16": _row("tf32x3", "ieee", "bfloat16", "bfloat16", "tf32x3", "bfloat16",
                     "tf32x3", "ieee", "bfloat16", "tf32", "tf32", "ieee"),
    "float16": _row("tf32x3", "ieee", "float16", "float16", "tf32x3", "float16",
                    "tf32x3", "ieee", "float16", "tf32", "tf32", "ieee"),
}

# flop/s of an H200 SXM (dense) per precision; a multiply-add is 2 flop. 3xTF32 is three
# TF32 products. Used by `dispatch.gpu_time_model` through `rate`.
H200_RATES = {"float64": 67e12, "ieee": 67e12, "tf32": 494e12, "tf32x3": 494e12 / 3,
              "bfloat16": 989e12, "float16": 989e12}

# What the literal reference's own convolutions run in, per policy: its yardstick. The
# "tf32x3" policy (precision="tf32x3") keeps every product at 3xTF32 or better and is held
# to the TF32 literal, as "tf32" is: against the IEEE literal only IEEE products pass
# (a 3xTF32 Gram put the direct loss's d/df_s at 5-9x the IEEE literal's error).
LITERAL = {"float64": "float64", "ieee": "ieee", "tf32": "tf32", "tf32x3": "tf32",
           "bfloat16": "bfloat16", "float16": "float16"}

_OVERRIDES: Dict[str, str] = {}


def check_policy(policy: str) -> str:
    return _checks.check_choice("policy", policy, POLICIES)


def of(policy: str, product: str) -> str:
    """The precision `product` runs in under `policy` (after any `override`)."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {sorted(PRODUCTS)}, got {product!r}")
    if product in _OVERRIDES:
        return _OVERRIDES[product]
    return PLAN[check_policy(policy)][product]


def table(policy: str) -> Dict[str, str]:
    """{product: precision} under `policy`, overrides applied (reports, gpu-check)."""
    return {p: of(policy, p) for p in PRODUCTS}


@contextlib.contextmanager
def override(entries: Mapping[str, str]) -> Iterator[None]:
    """Within the block, `of` answers `entries` ({product: precision}) under every policy:
    the mutants of tests/test_precision.py (one product dropped to plain TF32) and
    experiments. Process-wide, restored on exit."""
    for product, prec in entries.items():
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {sorted(PRODUCTS)}, got {product!r}")
        _checks.check_choice(f"precision of {product}", prec, PRECISIONS)
    old = dict(_OVERRIDES)
    _OVERRIDES.update(entries)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


def resolve_policy(precision: str, device_type: str, dtype: torch.dtype,
                   product_dtype: Optional[torch.dtype] = None) -> str:
    """The policy for tensors of `dtype` whose P-sized products run in `product_dtype`
    (the autocast dtype under autocast; default `dtype`).

    float64 tensors: "float64". 16-bit products (autocast or 16-bit tensors): "bfloat16"
    / "float16". float32: `precision` when given ("ieee", "tf32", "tf32x3"); with "auto",
    "tf32" on CUDA exactly when ``torch.backends.cudnn.allow_tf32`` is True (PyTorch's
    default: the flag the literal's convolutions obey), else "ieee" (CPU included)."""
    _checks.check_choice("precision", precision, ("auto",) + FLOAT32_POLICIES)
    pdt = product_dtype or dtype
    if dtype == torch.float64:
        return "float64"
    if pdt == torch.bfloat16:
        return "bfloat16"
    if pdt == torch.float16:
        return "float16"
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def rate(precision: str, rates: Mapping[str, float] = H200_RATES) -> float:
    """flop/s of one product in `precision` (data-sheet peak; the caller derates)."""
    return rates[precision]


def macs(product: str, B: int, C_s: int, C_t: int, H: int, W: int, n: int,
         algorithm: str) -> float:
    """Multiply-adds of `product` in one training forward + backward of `algorithm`
    ("direct" or "decomposed"); 0 where the algorithm does not run it (`PRODUCTS` has
    the formulas)."""
    P, C, T, O = B * H * W, C_s, C_t, n * C_t
    if algorithm not in USED_BY.get(product, (algorithm,)):
        return 0.0
    return float({
        "gram": C * C * P, "w1s": (O + (T if algorithm == "decomposed" else 0)) * C * C,
        "k": O * C * C, "contraction": C * C * P, "residual": T * C * P,
        "residual_grad": 2 * T * C * P, "direct": 2 * O * C * P, "direct_grad": 2 * O * C * P,
        "contraction_grad": 2 * C * C * P, "small_grad": 3 * O * C * C, "gram_grad": C * C * P,
        "gram_grad_direct": C * C * P,
    }[product])
