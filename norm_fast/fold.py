"""Fold the trained Feature Transform into the classifier (DESIGN.md section 2).

In eval mode each BatchNorm is a per-channel affine map (a = gamma / sqrt(var + eps),
c = beta - a * mean), so the whole FT is `features = M x + m` per position with
    M = I + diag(a2) W2 diag(a1) W1     (C_s x C_s),     m = a2 o (W2 c1) + c2.
Average pooling commutes with it, so fc(pool(features)) = fc'(pool(f_s)) with
W' = W_fc M and b' = b_fc + W_fc m: the merged student has no extra parameter.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def _eval_affine(bn: nn.Module, C: int, dtype, device) -> Tuple[Tensor, Tensor]:
    if not isinstance(bn, nn.BatchNorm2d):
        return torch.ones(C, dtype=dtype, device=device), torch.zeros(C, dtype=dtype, device=device)
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot merge a BatchNorm without running statistics "
                         "(track_running_stats=False): its eval output depends on the batch")
    a = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.to(dtype)
    c = -a * bn.running_mean.to(dtype)
    if bn.bias is not None:
        c = c + bn.bias.to(dtype)
    return a, c


@torch.no_grad()
def ft_affine(module: nn.Module, dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """(M (C_s, C_s), m (C_s,)) with eval-mode features = M x + m at every position."""
    n, C_t, C_s = module.n, module.teacher_channels, module.student_channels
    dev = module.expand.weight.device
    W1 = module.expand.weight.reshape(n * C_t, C_s).to(dtype)
    W2 = module.contract.weight.reshape(C_s, n * C_t).to(dtype)
    a1, c1 = _eval_affine(module.expand_bn, n * C_t, dtype, dev)
    a2, c2 = _eval_affine(module.contract_bn, C_s, dtype, dev)
    M = a2[:, None] * (W2 @ (a1[:, None] * W1))
    if module.residual:
        M = M + torch.eye(C_s, dtype=dtype, device=dev)
    m = a2 * (W2 @ c1) + c2
    return M, m


@torch.no_grad()
def merge_into(module: nn.Module, fc: nn.Linear) -> nn.Linear:
    """A new nn.Linear equal to `fc` after the eval-mode FT and global average pooling.

    `fc` is left untouched; the result has fc's shape, dtype and device (with a bias
    even if fc had none, since the FT's shift m becomes one).
    """
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"merge_into expects an nn.Linear classifier, got {type(fc).__name__}")
    if fc.in_features != module.student_channels:
        raise ValueError(f"fc.in_features must equal the student channels "
                         f"{module.student_channels}, got {fc.in_features}")
    M, m = ft_affine(module)
    W = fc.weight.to(torch.float64)
    merged = nn.Linear(fc.in_features, fc.out_features, bias=True,
                       device=fc.weight.device, dtype=fc.weight.dtype)
    merged.weight.copy_((W @ M).to(fc.weight.dtype))
    bias = W @ m
    if fc.bias is not None:
        bias = bias + fc.bias.to(torch.float64)
    merged.bias.copy_(bias.to(fc.weight.dtype))
    return merged
