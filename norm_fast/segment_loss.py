"""The squared-error sums of the NORM loss: sum_i ||Y_i - T||^2 over the n segments.

Two ways to the same number (docs/design.md sections 4-5), both through the P-sized
custom op `expand_mse` and both free of any n*C_t*P tensor:

    direct_sq_sum      one fused pass expands every segment tile by tile and compares it
                       with the teacher tile (P-sized work grows with n);
    decomposed_sq_sum  mean plus spread: n * ||Abar (X - c) + bbar - T||^2 (one residual)
                       plus P * (the spread of the segments about their mean), exact for
                       any centre c; the P-sized work does not depend on n.

    data_sq_sum        when the expanded data is at hand anyway (training BatchNorm with
                       P <= C_s: `algebra.data_expansion`), the literal comparison itself
                       on it (N*C_t x P elements, no more than the weight W1 holds).

The loss itself is the sum divided by C_t * P (and by n for segment_reduction="mean").
"""
from __future__ import annotations

from torch import Tensor

from . import custom_ops
from .algebra import Expansion, Moments


def direct_sq_sum(x: Tensor, t: Tensor, exp: Expansion, n: int, backend: str,
                  precision: str = "ieee") -> Tensor:
    """sum_i ||A_i (x - shift) + b_i - t||^2 over the positions of x (B, C_s, L) and
    t (B, C_t, L), by the fused direct pass (its products in `precision`)."""
    sq, _ = custom_ops.expand_mse(x, t, exp.A, exp.b, exp.shift, n, False, backend, precision)
    return sq


def data_sq_sum(t: Tensor, exp: Expansion, n: int) -> Tensor:
    """sum_i ||Yc_i + b_i - t||^2 from the centred expanded data exp.Yc (n*C_t, P),
    t (B, C_t, L): the literal's order of operations. On a rank-deficient batch the
    folded map A has rows scaled by up to gamma/sqrt(eps) whose products cancel; the
    data does not (docs/design.md section 3)."""
    B, C_t, L = t.shape
    T = t.permute(1, 0, 2).reshape(C_t, B * L).to(exp.Yc.dtype)
    E = exp.Yc.view(n, C_t, B * L) + exp.b.view(n, C_t, 1) - T
    return E.square().sum()


def decomposed_sq_sum(mom: Moments, t: Tensor, exp: Expansion, n: int, backend: str,
                      precision: str = "ieee") -> Tensor:
    """The same sum, decomposed (docs/design.md section 4).

    For any centre c (C,), with D_i = A_i - Abar, e_i = b_i + A_i c (the bias about c),
    delta = mean(x) - c over this process's P positions and S their covariance:

        total = P * sum_i ( <D_i S, D_i> + ||(e_i + A_i delta) - mean_j(e_j + A_j delta)||^2 )
                + n * ||Abar (X - c) + mean_i e_i - T||^2

    (the cross terms vanish because the D_i and the deviations sum to zero over i).
    The centre is the expansion's own shift in training (the batch mean, global under
    synchronised BatchNorm: then delta is this process's offset from it), and this
    process's mean, detached, otherwise: the sum does not depend on c, so no gradient is
    lost, and a non-finite teacher value then stays in its own position's gradient, as
    in the literal computation (delta is 0 in value and carries the mean's gradient).
    """
    x = mom.x
    B, _, L = x.shape
    C_t = t.shape[1]
    if exp.shift is not None:
        c, e = exp.shift, exp.b
    else:
        c = mom.local_mean.detach()
        e = exp.b + exp.A @ c
    bbar = e.view(n, C_t).mean(0)
    if exp.shift is None or mom.local_mean is not mom.mean:
        e = e + exp.A @ (mom.local_mean - c)
    e2 = e.view(n, C_t)
    d = e2 - e2.mean(0)
    resid, _ = custom_ops.expand_mse(x, t, exp.Abar, bbar, c, 1, True, backend, precision)
    return (B * L) * (exp.spread + d.square().sum()) + n * resid
