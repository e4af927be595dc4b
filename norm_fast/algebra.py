"""The small algebra of the fast paths: everything that does not grow with P.

With X (C_s x P) the student positions, only the moments of X (mean, covariance) and one
pass of `expand_mse` touch P; the Feature Transform enters through C_s x C_s and
N*C_t x C_s matrices (DESIGN.md sections 3-4). Autograd differentiates this algebra
exactly; the P-sized ops bring their own backward (`custom_ops.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import custom_ops


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


def matrix_spread(A: Tensor, AS: Tensor, n: int):
    """(sum_i <D_i S, D_i>, Abar, D) by autograd-visible elementwise ops.

    A, AS = A S (n*C_t, C_s); D_i = A_i - Abar. The general path (synchronised BatchNorm,
    no BatchNorm); `bn_expansion` is the fused one.
    """
    O, C_s = A.shape
    A3, AS3 = A.view(n, O // n, C_s), AS.view(n, O // n, C_s)
    Abar = A3.mean(0)
    D = A3 - Abar
    return ((AS3 - AS3.mean(0)) * D).sum(), Abar, D


class _BNExpansion(torch.autograd.Function):
    """A = diag(a1) W1, its batch variance and the matrix spread, one GEMM each way.

    forward(W1 (O, C), S (C, C) or None, scale (O,), eps, batch_stats, n_spread)
        batch_stats: scale is gamma1, var1 = diag(W1 S W1^T), a1 = gamma1 / sqrt(var1 + eps)
        otherwise:   scale is a1 itself (eval-mode BatchNorm: from the running variance)
        n_spread > 0: also spread = sum_i <D_i S, D_i> over the n_spread segments, with
        D_i = A_i - Abar, summed elementwise as DESIGN.md s.5 demands.
    -> (A (O, C), Abar (C_t, C) or empty, var1 (O,) or empty, spread 0-dim)

    Autograd through these ops costs two GEMMs in the backward of W1 S and about 40
    elementwise passes over O x C matrices. By hand (DESIGN.md s.5) it needs one GEMM:
    with D S = A S - Abar S (= DS, formed in the forward),
        dW1 = a1 o gA' + g_sp a1 o DS + 2 g_var o (W1 S)        (no product with S)
        dS  = W1^T (g_sp a1 o D + g_var o W1)                    (the one GEMM)
    where gA' = gA + g_sp DS + gAbar / n (tiled) and g_var includes d a1 / d var1.
    """

    @staticmethod
    def forward(ctx, W1, S, scale, eps: float, batch_stats: bool, n_spread: int):
        O, C = W1.shape
        W1S = W1 @ S if S is not None else None                 # the one large product
        if batch_stats:
            var1 = torch.linalg.vecdot(W1S, W1)                 # biased batch variance
            inv = torch.rsqrt(var1 + eps)
            a1 = scale * inv
        else:
            var1, inv, a1 = W1.new_empty(0), None, scale
        A = W1 * a1[:, None]
        D = DS = None
        if n_spread:
            n = n_spread
            A3 = A.view(n, O // n, C)
            Abar = A3.mean(0)
            D = (A3 - Abar).view(O, C)
            AS3 = (W1S * a1[:, None]).view(n, O // n, C)
            DS = (AS3 - AS3.mean(0)).view(O, C)
            spread = torch.linalg.vecdot(D.flatten(), DS.flatten())
        else:
            Abar, spread = W1.new_empty(0), W1.new_zeros(())
        ctx.save_for_backward(W1, W1S, a1, inv, D, DS)
        ctx.batch_stats, ctx.n_spread = batch_stats, n_spread
        return A, Abar, var1, spread

    @staticmethod
    def backward(ctx, gA, gAbar, gvar1, gspread):
        W1, W1S, a1, inv, D, DS = ctx.saved_tensors
        O, C = W1.shape
        n = ctx.n_spread
        g = gA.clone() if gA is not None else torch.zeros_like(W1)
        if n and gAbar is not None:
            g.view(n, O // n, C).add_(gAbar[None] / n)
        gW1S = None                                              # gradient of W1 S
        if n and gspread is not None:
            g.add_(DS * gspread)
            gW1S = D * (gspread * a1)[:, None]
        ga1 = torch.linalg.vecdot(g, W1)
        if gW1S is not None:
            ga1 = ga1 + torch.linalg.vecdot(D, W1S) * gspread
        gW1 = g * a1[:, None]
        if gW1S is not None:
            gW1.add_(DS * (gspread * a1)[:, None])              # = gW1S @ S, as D S = DS
        if ctx.batch_stats:
            gv = -0.5 * ga1 * a1 * inv * inv                     # d a1 / d var1
            if gvar1 is not None:
                gv = gv + gvar1
            gscale = ga1 * inv
            gW1.add_(W1S * (2 * gv)[:, None])
            gW1S = W1 * gv[:, None] if gW1S is None else gW1S.add_(W1 * gv[:, None])
        else:
            gscale = ga1
        gS = W1.transpose(0, 1) @ gW1S if (gW1S is not None and ctx.needs_input_grad[1]) else None
        return gW1, gS, gscale, None, None, None


def bn_expansion(W1: Tensor, S: Optional[Tensor], scale: Tensor, eps: float, batch_stats: bool,
                 n_spread: int):
    """See `_BNExpansion`: (A, Abar, var1, spread)."""
    return _BNExpansion.apply(W1, S, scale, eps, batch_stats, n_spread)


def decomposed_sq_sum(x: Tensor, t: Tensor, Abar: Tensor, b: Tensor, xbar: Tensor,
                      spread: Tensor, n: int, backend: str, D: Optional[Tensor] = None,
                      delta: Optional[Tensor] = None) -> Tensor:
    """sum_i ||A_i (X - xbar) + b_i - T||^2 over the P positions of x, decomposed.

    x (B, C_s, L), t (B, C_t, L); Abar (C_t, C_s), the segments' mean map; b (n*C_t,);
    xbar (C_s,); spread = sum_i <D_i S_x, D_i> with S_x the covariance of x's own
    positions. When xbar is a mean over more positions than x's (synchronised
    BatchNorm), delta = mean(x) - xbar and D (n, C_t, C_s) the deviations D_i.

    DESIGN.md s.4: with D_i = A_i - Abar, d_i = b_i - bbar,
        total = P * (sum_i <D_i S_x, D_i> + sum_i ||D_i delta + d_i||^2)
                + n * ||Abar (X - xbar) + bbar - T||^2
    (the cross terms vanish because the D_i and d_i sum to zero over i). Only the one
    residual touches P.
    """
    B, C_s, L = x.shape
    C_t = t.shape[1]
    b2 = b.view(n, C_t)
    bbar = b2.mean(0)
    d = b2 - bbar
    if delta is not None:
        d = d + D @ delta
    resid, _ = custom_ops.expand_mse(x, t, Abar, bbar, xbar, 1, True, backend)
    return (B * L) * (spread + d.square().sum()) + n * resid


def direct_sq_sum(x: Tensor, t: Tensor, A: Tensor, b: Tensor, xbar: Optional[Tensor], n: int,
                  backend: str) -> Tensor:
    """sum_i ||A_i (X - xbar) + b_i - T||^2 by the fused direct pass (xbar None: uncentred)."""
    sq, _ = custom_ops.expand_mse(x, t, A, b, xbar, n, False, backend)
    return sq
