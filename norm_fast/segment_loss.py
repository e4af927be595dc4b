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

import torch
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


class _Residual(torch.autograd.Function):
    """sum_p ||M (x_p - s) + r - t_p||^2, the decomposed loss's one residual, with the
    products its gradient needs formed in the forward (docs/design.md section 4).

    x (B, C, L), t (B, C_t, L), M (C_t, C), r (C_t,) the bias about the centre s (C,).
    The kernel evaluates M x + (r - M s) with that bias formed in float64 (or, given raw
    with x = raw - origin, M raw + (r - M (origin + s)): the literal's order,
    `algebra.Moments.raw`); its rounding
    rho (C_t,) is returned with the means over the P positions
        G = sum_p R_p (x_p - s)^T / P (C_t, C),   SR = sum_p R_p / P (C_t,)
    (R the stored error): the caller's first-order corrections need them. They are the
    residual's gradient products (dM = 2gP G, dr = 2gP SR), formed by the kernel's backward
    in the forward, together with M^T R when x needs a gradient (one pass, as the
    backward would make it): the backward only scales them.
    -> (sum, G, SR, rho); only the sum is differentiable."""

    @staticmethod
    def forward(ctx, x, t, M, r, s, raw, origin, backend: str, precision: str):
        f64 = torch.float64
        centre = s.detach().to(f64)
        if raw is not None:                  # x = raw - origin: M raw + r - M (origin + s)
            centre = centre + origin.to(f64)
        bias64 = r.detach().to(f64) - M.detach().to(f64) @ centre
        bias = bias64.to(M.dtype)
        sq, err = custom_ops.expand_mse(x if raw is None else raw, t, M, bias, None, 1, True,
                                        backend, precision)
        # The products per position (2 * grad = 1 / P), so that sum_p R_p x_p^T cannot
        # overflow where the literal's gradient, scaled element by element, does not
        P = x.shape[0] * x.shape[2]
        unit = torch.full((), 0.5 / P, dtype=M.dtype, device=M.device)
        want_x, want_s = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        dx, _, G, SR, ds = custom_ops.expand_mse_backward(
            unit, x, t, M, r.to(M.dtype), s, 1, err, [want_x, False, True, True, want_s],
            backend, precision)
        rho = bias.to(f64) - bias64
        ctx.save_for_backward(err, G, SR, dx if want_x else None, ds if want_s else None)
        ctx.dtypes, ctx.P = (t.dtype, r.dtype), P
        ctx.mark_non_differentiable(G, SR, rho)
        return sq, G, SR, rho

    @staticmethod
    def backward(ctx, g, *_):
        err, G, SR, dx, ds = ctx.saved_tensors
        want_x, want_t, want_M, want_r, want_s = ctx.needs_input_grad[:5]
        g2 = 2 * g
        gP = g2 * ctx.P          # the forward's products are per position
        return (dx * gP.to(dx.dtype) if want_x else None,
                (err * -g2.to(err.dtype)).to(ctx.dtypes[0]) if want_t else None,
                G * gP.to(G.dtype) if want_M else None,
                (SR * gP.to(SR.dtype)).to(ctx.dtypes[1]) if want_r else None,
                ds * gP.to(ds.dtype) if want_s else None, None, None, None, None)


def decomposed_sq_sum(mom: Moments, t: Tensor, exp: Expansion, n: int, backend: str,
                      precision: str = "ieee") -> Tensor:
    """The same sum, decomposed (docs/design.md section 4).

    The expansion is Y_i = A_i (x - s0) + b_i (s0 = exp.shift, or 0). With M = exp.Abar
    (the segments' mean rounded to the compute dtype), D_i = A_i - M, a centre s (s0, or
    this process's mean, detached, when there is no shift: the sum does not depend on
    it), xbar and S the mean and covariance of this process's P positions:

        total = P * sum_i ( <D_i S, D_i> + ||D_i (xbar - s0) + b_i - bbar||^2 )
                + n * ||M (x - s) + bbar + M (s - s0) - T||^2  -  2 n <delta, G'>

    delta = M - mean_i A_i (exp.Abar_err), G' = sum_p R_p (x_p - s0)^T. The cross terms
    of the first two lines sum to -2 n <delta, G'> (the D_i sum to -n delta, not to 0):
    the rounding of the mean is first order in the loss, and near convergence, where
    the segments agree to 1e-3, it alone was 25x the literal's error (float32). The
    residual's bias rounding rho enters the same way and is corrected with it; both
    corrections carry no gradient (they are 0 in exact arithmetic). The small algebra
    (bbar, the biases' deviations, the corrections) is float64: C_t x C sized. A
    non-finite teacher value stays in its own position's gradient, as in the literal
    computation (the centre comes from x alone; xbar - s is 0 in value and carries the
    mean's gradient).
    """
    x = mom.x
    B, C, L = x.shape
    P = B * L
    C_t = t.shape[1]
    f64 = torch.float64
    s0 = exp.shift
    s = s0 if s0 is not None else mom.local_mean.detach()
    M = exp.Abar
    b2 = exp.b.to(f64).view(n, C_t)
    bbar = b2.mean(0)
    d = b2 - bbar
    if s0 is None or mom.local_mean is not mom.mean:
        # xbar - s0: 0 when the shift is this process's own batch mean (no term, no
        # gradient), else this process's offset from the centre
        off = mom.local_mean if s0 is None else mom.local_mean - s0
        d = d + ((exp.A.view(n, C_t, C) - M) @ off.to(M.dtype)).to(f64)
    cs = (s if s0 is None else s - s0).detach().to(f64)                # s - s0
    r = bbar + M.to(f64) @ cs                                          # the bias about s
    sq, G, SR, rho = _Residual.apply(x, t, M, r, s, mom.raw, mom.origin, backend, precision)
    delta, SR = exp.Abar_err, SR.to(f64)
    # G' = G + SR (s - s0)^T: <delta, G'> without forming it (G, SR are per position)
    corr = P * (-2 * (torch.linalg.vecdot(delta.flatten(), G.to(f64).flatten())
                      + torch.dot(delta @ cs, SR) + torch.dot(rho, SR))
                + torch.dot(rho, rho))
    total = P * (exp.spread.to(f64) + d.square().sum()) + n * (sq.to(f64) + corr)
    return total.to(sq.dtype)
