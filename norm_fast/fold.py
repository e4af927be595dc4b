"""Fold the trained Feature Transform into the classifier (docs/design.md section 2).

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

from . import algebra


@torch.no_grad()
def ft_affine(module: nn.Module, dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """(M (C_s, C_s), m (C_s,)) with eval-mode features = M x + m at every position.

    The same fold as the module's eval-mode forward (`algebra.fixed_expansion`,
    `algebra.contraction_map`, `algebra.fold_affine`), here in float64 by default."""
    n, C_t, C_s = module.n, module.teacher_channels, module.student_channels
    W1 = module.expand.weight.reshape(n * C_t, C_s).to(dtype)
    W2 = module.contract.weight.reshape(C_s, n * C_t).to(dtype)
    exp = algebra.fixed_expansion(W1, module.expand_bn if module.batchnorm else None, None, 0)
    K, k = algebra.contraction_map(W2, exp)
    a2, c2 = algebra.eval_affine(module.contract_bn if module.batchnorm else None, C_s,
                                 dtype, W1.device)
    M, m = algebra.fold_affine(K, k, a2, c2)
    if module.residual:
        M = M + torch.eye(C_s, dtype=dtype, device=W1.device)
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
