"""The literal NORM computation (docs/design.md section 1): the oracle of every test and benchmark.

This is what the method's reference code does, in eager PyTorch: it materialises the
N-times expanded tensor Y (B, N*C_t, H, W) and N copies of the teacher. It is correct by
construction (it *is* the definition) and slow; `backend="torch"` runs it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _wide(y: Tensor) -> Tensor:
    return y.float() if y.dtype in (torch.float16, torch.bfloat16) else y


def reference_forward(module: nn.Module, f_s: Tensor, f_t: Optional[Tensor]
                      ) -> Tuple[Tensor, Optional[Tensor]]:
    """Literal FT + N-segment MSE through the module's own submodules.

    f_s: (B, C_s, H, W), f_t: (B, C_t, H, W) or None.
    Returns (features (B, C_s, H, W), loss 0-dim or None). BatchNorm running statistics
    are updated by the nn.BatchNorm2d submodules themselves.
    """
    y = module.expand_bn(module.expand(f_s))                    # (B, N*C_t, H, W)
    features = module.contract_bn(module.contract(y))
    if module.residual:
        features = features + f_s
    if f_t is None:
        return features, None
    if module.detach_teacher:
        f_t = f_t.detach()
    # mean over all N*C_t channels times N = sum over segments of each segment's MSE;
    # 16-bit outputs are compared in float32 (what autocast does with mse_loss), so the
    # loss is float32 for 16-bit inputs on every path.
    loss = F.mse_loss(_wide(y), _wide(f_t).repeat(1, module.n, 1, 1)) * module.n
    if module.segment_reduction == "mean":
        loss = loss / module.n
    return features, loss


def reference_norm_loss(f_s: Tensor, f_t: Tensor, weight: Tensor, n: int,
                        segment_reduction: str = "sum") -> Tensor:
    """Literal `mse_loss(conv2d(f_s, weight), f_t.repeat(1, n, 1, 1)) * n` (no BatchNorm)."""
    w = weight if weight.dim() == 4 else weight[:, :, None, None]
    loss = F.mse_loss(_wide(F.conv2d(f_s, w)), _wide(f_t).repeat(1, n, 1, 1)) * n
    return loss / n if segment_reduction == "mean" else loss
