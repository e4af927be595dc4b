"""Functional NORM loss: the expansion without BatchNorm and the N-segment MSE as one op."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, algebra, custom_ops, dispatch, segment_loss
from .ops.spec import compute_dtype, gemm_precision
from .reference import reference_norm_loss


def norm_loss(f_s: Tensor, f_t: Tensor, weight: Tensor, n: int, *,
              segment_reduction: str = "sum", backend: str = "auto",
              algorithm: str = "auto", precision: str = "auto") -> Tensor:
    """`mse_loss(conv2d(f_s, weight), f_t.repeat(1, n, 1, 1)) * n` without the expanded tensor.

    f_s (B, C_s, H, W), f_t (B, C_t, H, W), weight (n*C_t, C_s) or (n*C_t, C_s, 1, 1).
    Differentiable in f_s, f_t and weight. "mean" divides by n. Returns a 0-dim tensor
    (float32 for 16-bit inputs). precision: as in `NORM` (`dispatch.resolve_precision`).
    """
    _checks.check_n(n)
    _checks.check_reduction(segment_reduction)
    _checks.check_feature_map("f_s", f_s)
    _checks.check_feature_map("f_t", f_t)
    f_t = _checks.check_pair(f_s, f_t)
    B, C_s, H, W = f_s.shape
    C_t = f_t.shape[1]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    expected = (n * C_t, C_s)
    if weight.dim() not in (2, 4) or tuple(weight.shape[:2]) != expected or \
            (weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError(f"weight must have shape {expected} or {expected + (1, 1)} "
                         f"(n*C_t, C_s), got {tuple(weight.shape)}")
    _checks.check_param_compat(f_s, weight, "weight")
    plan = dispatch.resolve(backend, algorithm, f_s.device.type, B, C_s, C_t, H, W, n,
                            f_s.dtype, precision)
    backend, algorithm = plan.backend, plan.algorithm
    if plan.literal:
        return reference_norm_loss(f_s, f_t, weight, n, segment_reduction)
    dev = f_s.device.type
    cdt = compute_dtype(f_s.dtype)
    with torch.autocast(dev, enabled=False), gemm_precision(f_s.device, cdt, "ieee"):
        w = weight.reshape(n * C_t, C_s).to(cdt)
        x, t = f_s.flatten(2), f_t.flatten(2)
        mom = None
        if algorithm == "decomposed":
            # moments of X / sigma (1 for ordinary inputs) so that the covariance cannot
            # overflow where the literal's loss is finite (docs/design.md section 3)
            scale = algebra.range_scale(f_s)
            x = (f_s * scale.reciprocal().to(f_s.dtype)).flatten(2)
            mean, cov = custom_ops.moments(x, backend, plan.precision)
            mom = algebra.Moments(x, mean, cov, mean, cov, B * H * W, scale=scale)
        exp = algebra.fixed_expansion(w, None, mom, n if mom is not None else 0)
        if mom is not None:
            sq = segment_loss.decomposed_sq_sum(mom, t, exp, n, backend, plan.precision)
        else:
            sq = segment_loss.direct_sq_sum(x, t, exp, n, backend, plan.precision)
        loss = sq / (C_t * B * H * W)
    return loss / n if segment_reduction == "mean" else loss


def match_spatial(f_s: Tensor, f_t: Tensor) -> Tuple[Tensor, Tensor]:
    """Max-pool the larger map down to the smaller (kernel = stride = ratio), as the
    reference training code does. Both are (B, C, H, W); returns the pair in order."""
    _checks.check_feature_map("f_s", f_s)
    _checks.check_feature_map("f_t", f_t)
    hs, ws = f_s.shape[2:]
    ht, wt = f_t.shape[2:]
    if (hs, ws) == (ht, wt):
        return f_s, f_t
    if hs >= ht and ws >= wt:
        big, small, which = f_s, (ht, wt), "s"
    elif hs <= ht and ws <= wt:
        big, small, which = f_t, (hs, ws), "t"
    else:
        raise ValueError(f"cannot match spatial sizes {(hs, ws)} and {(ht, wt)}: one map must "
                         "be at least as large as the other in both dimensions")
    H, W = big.shape[2:]
    if H % small[0] or W % small[1]:
        raise ValueError(f"spatial sizes must divide: {(H, W)} is not a multiple of {small}")
    pooled = F.max_pool2d(big, kernel_size=(H // small[0], W // small[1]))
    return (pooled, f_t) if which == "s" else (f_s, pooled)
