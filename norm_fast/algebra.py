"""The small algebra of the fast paths: everything that does not grow with P.

With X (C_s x P) the student positions, only the moments of X (mean, covariance) and one
pass of `expand_mse` touch P; the Feature Transform enters through C_s x C_s and
N*C_t x C_s matrices (DESIGN.md sections 3-4). Autograd differentiates this algebra
exactly; the P-sized ops bring their own backward (`library.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import library


@dataclass
class BNState:
    """How one nn.BatchNorm2d behaves in this forward (mirrors _BatchNorm.forward)."""
    batch_stats: bool                 # normalise with batch statistics
    update: bool                      # update the running statistics
    factor: Optional[object] = None   # exponential average factor (float or 0-dim tensor)


def bn_state(bn: Optional[nn.Module], training: bool) -> Optional[BNState]:
    if bn is None:
        return None
    batch_stats = training or (bn.running_mean is None and bn.running_var is None)
    update = training and bn.track_running_stats and bn.running_mean is not None
    factor = None
    if update:
        if bn.momentum is None:
            # Cumulative average, as nn.BatchNorm2d: 1 / num_batches_tracked, kept as a
            # tensor so that no host-device synchronisation happens here.
            factor = 1.0 / (bn.num_batches_tracked.to(torch.float64) + 1.0)
        else:
            factor = bn.momentum
    return BNState(batch_stats, update, factor)


def update_running(bn: nn.Module, state: BNState, mean: Tensor, var_biased: Tensor, P):
    """running <- (1 - f) running + f stat, with the unbiased variance (nn.BatchNorm2d).

    P, the number of positions the statistics cover, is an int or a 0-dim tensor (the
    global count under synchronised BatchNorm)."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        f = state.factor
        if isinstance(f, Tensor):
            f = f.to(bn.running_mean.dtype)
        var = var_biased.detach() * (P / (P - 1))
        bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype) * f)
        bn.running_var.mul_(1 - f).add_(var.to(bn.running_var.dtype) * f)


def bn_affine(bn: nn.Module, dtype: torch.dtype):
    """(gamma, beta) of a BatchNorm in `dtype`, ones/zeros when affine=False."""
    C = bn.num_features
    dev = bn.running_mean.device if bn.running_mean is not None else None
    gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones(C, dtype=dtype, device=dev)
    beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros(C, dtype=dtype, device=dev)
    return gamma, beta


def segment_sq_sum(x: Tensor, t: Tensor, A: Tensor, b: Tensor, xbar: Optional[Tensor],
                   AS: Optional[Tensor], n: int, algorithm: str, backend: str,
                   delta: Optional[Tensor] = None) -> Tensor:
    """sum_i ||A_i (X - xbar) + b_i - T||^2 over the P positions of x.

    x (B, C_s, L), t (B, C_t, L); A (n*C_t, C_s); b (n*C_t,); xbar (C_s,) or None (then X
    is not centred). "decomposed" needs xbar and AS = A S_x (n*C_t, C_s), S_x the biased
    covariance of x's own positions; when xbar is a mean over more positions than x's
    (synchronised BatchNorm), delta = mean(x) - xbar, else None.

    decomposed (DESIGN.md s.4): with D_i = A_i - Abar, d_i = b_i - bbar,
        total = P * (sum_i <D_i S_x, D_i> + sum_i ||D_i delta + d_i||^2)
                + n * ||Abar (X - xbar) + bbar - T||^2
    (the cross terms vanish because the D_i and d_i sum to zero over i). The spread is
    summed elementwise over (A_i S - Abar S) o (A_i - Abar): never as
    <A S, A> - n <Abar S, Abar>, whose two totals cancel near convergence (s.5).
    """
    if algorithm == "direct":
        sq, _ = library.expand_mse(x, t, A, b, xbar, n, False, backend)
        return sq
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    A3, AS3, b2 = A.view(n, C_t, C_s), AS.view(n, C_t, C_s), b.view(n, C_t)
    Abar, bbar = A3.mean(0), b2.mean(0)
    d = b2 - bbar
    if delta is not None:
        d = d + (A3 - Abar) @ delta
    spread = ((AS3 - AS3.mean(0)) * (A3 - Abar)).sum() + d.square().sum()
    resid, _ = library.expand_mse(x, t, Abar, bbar, xbar, 1, True, backend)
    return P * spread + n * resid
