"""The training step of the Feature Transform and its loss as one autograd.Function.

Training with both BatchNorms, the covariance route (P > C_s positions), no synchronised
statistics: the case a GPU training loop runs at every step. Composed from autograd-
visible ops (`module.NORM._fast_ft`), this step issued about 180 device operations
forward + backward, most of them elementwise ops on C x C and N*C_t x C matrices and
their autograd mirrors: on a GPU their launch overhead alone outweighs the arithmetic.
Here the forward computes what `_fast_ft` computes, with the small algebra grouped into
a few custom ops, and the backward is written by hand (docs/design.md section 8): 35
device operations a step on Triton against the literal's 21.

Notation (docs/design.md sections 3-5): x (B, C, L) the student map, P = B*L, O = n*C_t.
    xc = (x - o) / sigma            o the batch mean (detached), sigma the range scale
    m, S = mean, covariance of xc   (`custom_ops.centred_moments`, with xc itself)
    var1 = diag(W1 S W1^T), a1 = gamma1 / sqrt(var1 + eps1 / sigma^2), A = diag(a1) W1
    Y = A (xc - m) + beta1          the expanded, normalised map (never formed)
    K = W2 A, uc = K xc             the contraction less its per-channel constant W2 c1,
                                    c1 = beta1 - A m (bn2 removes it; its running mean
                                    gets it back)
    features = bn2(uc) [+ x],       loss = sum_i ||Y_i - T||^2 / (C_t P) [/ n]
The loss is the direct pass over the n segments or the decomposed form
    sum = P (spread + ||beta1_i - beta1bar||^2) + n ||Abar (xc - m) + beta1bar - T||^2
with, near convergence, the first-order corrections for the rounding of Abar and of
the residual's bias (docs/design.md section 4): they need G4 = sum_p R_p xc_p^T and
sum_p R_p, the residual's gradient products, which the forward therefore forms (one
convolution backward) and the backward reuses.

Backward (g_f the features' gradient, g the loss's; e the scaled error):
    g_uc, g_gamma2, g_beta2 = batch_norm_backward(g_f)          one op, as the literal's
    g_K = g_uc xc^T, K^T g_uc                                   one convolution backward
    Abar^T e (dAbar, sum e from the forward's G4 and sum R)       one convolution backward
      (direct: dA, dbeta1, A^T e per chunk of recomputed error)
    g_A = W2^T g_K, g_W2 = g_K A^T                              two GEMMs
    dW1, dgamma1, dbeta1, the gradient of W1 S and w           `expansion_backward`
    g_S = W1^T (gradient of W1 S)
    d/dxc = ... + 2 g_S xc / P + W1^T w,  d/dx = g_f + (d/dxc) / sigma
(the origin o is detached: every statistic is taken about xc's own mean, so nothing
depends on it; W1^T w = -(2 g_S m + Abar^T sum e) / P carries the gradient through m).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import custom_ops
from . import precision as plan
from .ops import products
from .ops.spec import DEFAULT_CHUNK_BYTES, compute_dtype, gemm_precision


@dataclass(frozen=True)
class StepConfig:
    n: int
    decomposed: bool
    residual: bool
    mean_reduction: bool
    backend: str
    precision: str     # the policy: every product's precision is plan.of(precision, name)
    eps1: float
    eps2: float
    momentum2: float


# On CPU a launch costs nothing and the C++ kernel set's composed route (its own moments
# kernel, autograd through the small algebra) is faster: measured at the standard CPU
# shape (B=64, 512->512, 7x7, N=8, 2 threads) 197 ms a step through this route against
# 175 ms. CPU tensors take this route only with the Triton interpreter (tests) and the
# eager kernel set (whose ops the CUDA extension shares).
COMPOSED_ON_CPU = ("cpp",)


def eligible(module: nn.Module, f_s: Tensor, f_t: Optional[Tensor], sync, backend: str
             ) -> bool:
    """Whether this step takes the fused route: training, two affine BatchNorms that
    track running statistics with a fixed momentum, a teacher whose gradient is not
    wanted, no synchronised statistics, more positions than student channels (with
    P <= C_s the expanded data itself is cheaper and more accurate: `algebra.data_expansion`),
    running statistics in the compute dtype (a module converted to 16 bits keeps the
    composed route), and not the C++ kernel set on CPU (`COMPOSED_ON_CPU`)."""
    if f_s.device.type == "cpu" and backend in COMPOSED_ON_CPU:
        return False
    if not (module.training and module.batchnorm and sync is None and f_t is not None):
        return False
    if not module.detach_teacher and f_t.requires_grad:
        return False
    for bn in (module.expand_bn, module.contract_bn):
        if not (isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
                and bn.running_mean is not None and isinstance(bn.momentum, float)
                and bn.num_batches_tracked is not None
                and bn.running_mean.dtype == compute_dtype(f_s.dtype)):
            return False
    B, C, H, W = f_s.shape
    return B * H * W > C


def run(module: nn.Module, f_s: Tensor, f_t: Tensor, backend: str, algorithm: str,
        precision: str) -> Tuple[Tensor, Tensor]:
    """(features (B, C_s, H, W) in the compute dtype, loss 0-dim) of `module` in training,
    its running statistics updated as nn.BatchNorm2d does."""
    n, C_t = module.n, module.teacher_channels
    bn1, bn2 = module.expand_bn, module.contract_bn
    cfg = StepConfig(n, algorithm == "decomposed", module.residual,
                     module.segment_reduction == "mean", backend, precision,
                     float(bn1.eps), float(bn2.eps), float(bn2.momentum))
    W1 = module.expand.weight.reshape(n * C_t, -1)
    W2 = module.contract.weight.reshape(-1, n * C_t)
    features, loss, mean1, var1 = _TrainStep.apply(
        f_s, f_t.detach(), W1, bn1.weight, bn1.bias, W2, bn2.weight, bn2.bias,
        bn2.running_mean, bn2.running_var, cfg)
    with torch.no_grad():
        torch._foreach_add_([bn1.num_batches_tracked, bn2.num_batches_tracked], 1)
        torch._foreach_lerp_([bn1.running_mean, bn1.running_var], [mean1, var1],
                             float(bn1.momentum))
    return features, loss


class _TrainStep(torch.autograd.Function):

    @staticmethod
    def forward(ctx, f_s, f_t, W1w, g1w, b1w, W2w, g2w, b2w, run_mean2, run_var2,
                cfg: StepConfig):
        n = cfg.n
        B, C, H, Wd = f_s.shape
        L, P = H * Wd, B * H * Wd
        C_t = f_t.shape[1]
        dt = f_s.dtype
        cdt = compute_dtype(dt)
        dev = f_s.device
        W1, g1, b1 = W1w.to(cdt), g1w.to(cdt), b1w.to(cdt)
        W2, g2, b2 = W2w.to(cdt), g2w.to(cdt), b2w.to(cdt)
        x = f_s.detach()

        # xc = (x - origin) / sigma and its moments, one op (docs/design.md section 3)
        pol = cfg.precision
        x3, o, scales, m, S = custom_ops.centred_moments(x.view(B, C, L), cfg.backend, pol)
        sigma, inv = scales[0], scales[1]
        xc = x3.view(B, C, H, Wd)

        # expansion: statistics, A = diag(a1) W1, the segments' means and spread (one op).
        # For the decomposed loss the product with S is of the weights centred over the
        # segments, [W1_i - Wbar; Wbar] S, so that D_i S comes from deviations (one GEMM)
        unbias = P / max(P - 1, 1)
        coef = 1.0 / (C_t * P * (n if cfg.mean_reduction else 1))
        O = W1.shape[0]
        if cfg.decomposed:
            prod = products.mm(custom_ops.centre_segments(W1, n, cfg.backend), S,
                               plan.of(pol, "w1s"))
            W1S, WbS = prod[:O], prod[O:]
        else:
            W1S, WbS = products.mm(W1, S, plan.of(pol, "w1s")), W1.new_empty((0,))
        a1, r1, A, mean1, var1u, c1, Abar, DS, Aerr, rb, rcoef, db, part = \
            custom_ops.expansion_forward(W1, W1S, WbS, g1, b1, o, m, sigma, inv, cfg.eps1,
                                         unbias, P * coef, n, cfg.decomposed, cfg.backend)
        # contraction: uc = K xc; its BatchNorm normalises with the batch statistics and
        # updates the running ones in the same pass. bn2 removes per-channel constants,
        # so the centring term is left out of uc and added to the running mean:
        # contract(Y) = W2 (A (xc - m) + beta1) = uc + W2 c1.
        K = products.mm(W2, A, plan.of(pol, "k"))
        uc = products.conv1x1(xc, K.to(dt), plan.of(pol, "contraction"))
        if uc.dtype != cdt:
            uc = uc.to(cdt)
        out2, mu2, istd2 = torch.ops.aten._native_batch_norm_legit(
            uc, g2, b2, run_mean2, run_var2, True, cfg.momentum2, cfg.eps2)
        run_mean2.addmv_(W2, c1, alpha=cfg.momentum2)
        features = out2 + x if cfg.residual else out2

        # loss (segment_loss.direct_sq_sum / decomposed_sq_sum)
        t = f_t.flatten(2)
        G = SR = None
        if cfg.decomposed:
            # R = Abar (xc - m) + bbar - T = Abar xc + rb - T, rb formed in float64
            resid, err = custom_ops.expand_mse(x3, t, Abar, rb, None, 1, True, cfg.backend,
                                               cfg.precision)
            # G4 = sum_p R_p xc_p^T and SR = sum_p R_p (over P): the residual's gradient products,
            # formed here (one convolution backward, which the backward then does not
            # repeat) because the loss's first-order corrections need them: -2 <Aerr, G>
            # for the rounding of Abar (the D_i then sum to -n Aerr; G = G4 - SR m^T) and
            # -2 <rho, SR> + P |rho|^2 for that of rb, one kernel with the sum
            # (per position, err / P: the product cannot overflow where the literal's
            # gradient, scaled element by element, does not)
            half = dt != cdt   # 16-bit: the bias gradient would come back rounded
            _, G4, SR = products.conv1x1_backward(
                (err * (1.0 / P)).view(B, C_t, H, Wd).to(dt), xc, Abar.to(dt), False, True,
                not half, plan.of(pol, "residual_grad"))
            SR = err.sum(dim=(0, 2)) * (1.0 / P) if half else SR
            G = G4.view(C_t, C).to(cdt)
            loss = custom_ops.decomposed_total(part, resid, Aerr, G, rcoef, SR, n * coef, P,
                                               cfg.backend)
        else:
            err = None
            sq, _ = custom_ops.expand_mse(x3, t, A, b1, m, n, False, cfg.backend,
                                          cfg.precision)
            loss = sq * coef

        ctx.cfg, ctx.shape = cfg, (B, C, H, Wd, C_t)
        ctx.save_for_backward(xc, t, W1, W1S, WbS, a1, r1, A, W2, K, m, inv, uc, g2, mu2,
                              istd2, Abar, DS, db, err, b1, G, SR)
        ctx.mark_non_differentiable(mean1, var1u)
        ctx.set_materialize_grads(False)
        return features, loss, mean1, var1u

    @staticmethod
    def backward(ctx, g_feat, g_loss, *_):
        (xc, t, W1, W1S, WbS, a1, r1, A, W2, K, m, inv, uc, g2, mu2, istd2,
         Abar, DS, db, err, b1, G, SR) = ctx.saved_tensors
        cfg = ctx.cfg
        B, C, H, Wd, C_t = ctx.shape
        n, P = cfg.n, B * H * Wd
        dt, cdt, dev = xc.dtype, W1.dtype, xc.device
        x3 = xc.view(B, C, -1)
        with torch.autocast(dev.type, enabled=False), gemm_precision(dev, cdt, "ieee"):
            if g_feat is None:
                g_feat = torch.zeros_like(uc)
            if g_loss is None:
                g_loss = torch.zeros((), dtype=cdt, device=dev)
            g_feat = g_feat.to(cdt)
            g_loss = g_loss.to(cdt)
            coef = 1.0 / (C_t * P * (n if cfg.mean_reduction else 1))   # loss = sum * coef

            # contraction BatchNorm and the 1x1 contraction map: one op each, as the
            # literal's. Every term of d/dxc is summed in acc; d/dx = g_f + acc / sigma.
            g_uc, g_g2, g_b2 = torch.ops.aten.native_batch_norm_backward(
                g_feat, uc, g2, None, None, mu2, istd2, True, cfg.eps2, [True, True, True])
            pol = cfg.precision
            acc, g_K4, _ = products.conv1x1_backward(g_uc.to(dt), xc, K.to(dt), True, True,
                                                     False, plan.of(pol, "contraction_grad"))
            g_K = g_K4.view(C, C).to(cdt)
            small = plan.of(pol, "small_grad")
            g_W2 = products.mm(g_K, A.t(), small)
            g_A = products.mm(W2.t(), g_K, small)
            acc = acc.to(cdt).view(B, C, -1)

            # the loss
            empty = W1.new_empty((0,))
            if cfg.decomposed:
                # R = Abar (xc - m) + bbar - T, sum n ||R||^2: with e = 2 n g R,
                # dAbar = 2 n g P (G4 - SR m^T), dbbar = 2 n g P SR (G4, SR formed in the
                # forward, per position; `expansion_backward` scales them), dxc = Abar^T e - Abar^T dbbar
                # / P (through m): one convolution backward for Abar^T e
                e = err * (g_loss * (2 * n * coef))
                g_xl = products.conv1x1_backward(
                    e.view(B, C_t, H, Wd).to(dt), xc, Abar.to(dt), True, False, False,
                    plan.of(pol, "residual_grad"))[0]
                g_Abar, g_bbar = G, SR
                g_Al = empty
                acc.add_(g_xl.view(B, C, -1))
            elif cfg.backend == "triton":
                # E_i = A_i (xc - m) + beta1_i - T recomputed (by whole samples, at most
                # DEFAULT_CHUNK_BYTES of error at once, as the Triton backward always
                # did) in the layout of a convolution's output gradient: e = 2 g E, then
                # dA = e (xc - m)^T, dbeta1 = sum_p e, dxc = A^T e - A^T dbeta1 / P
                # from one convolution backward per chunk.
                O = A.shape[0]
                g2 = g_loss * (2 * coef)
                step = max(1, DEFAULT_CHUNK_BYTES // max(1, O * (P // B) * xc.element_size()))
                g_Ad = g_b1 = None
                for b0 in range(0, B, step):
                    b1_ = min(B, b0 + step)
                    e = custom_ops.expand_error(x3[b0:b1_], t[b0:b1_], A, b1, m, n, g2,
                                                cfg.backend, cfg.precision)
                    half = e.dtype != cdt   # 16-bit e: sum it in float32 instead
                    g_xl, g_A4, es = products.conv1x1_backward(
                        e.view(b1_ - b0, O, H, Wd), xc[b0:b1_], A.to(dt), True, True,
                        not half, plan.of(pol, "direct_grad"))
                    if half:
                        es = e.sum(dim=(0, 2), dtype=cdt)
                    acc[b0:b1_].add_(g_xl.view(b1_ - b0, C, -1))
                    g_Ad = g_A4 if g_Ad is None else g_Ad.add_(g_A4)
                    g_b1 = es if g_b1 is None else g_b1.add_(es)
                g_b1 = g_b1.to(cdt)
                g_Al = torch.addr(g_Ad.view(O, C).to(cdt), g_b1, m, alpha=-1)
                g_Abar = g_bbar = empty
            else:
                # the kernel set's own chunked backward (C++/CUDA, eager)
                g_xl, _, g_Al, g_b1, _ = custom_ops.expand_mse_backward(
                    g_loss * coef, x3, t, A, b1, m, n, None, [True, False, True, True, False],
                    cfg.backend, cfg.precision)
                acc.add_(g_xl.view(B, C, -1))
                g_Abar = g_bbar = empty
            g_W1, g_W1S, g_g1, g_b1d, wv = custom_ops.expansion_backward(
                g_A, g_Al, g_Abar, g_bbar if cfg.decomposed else g_b1, g_loss, coef, W1, W1S,
                WbS, a1, r1, A, Abar, DS, db, m, P, n, cfg.decomposed, cfg.backend)
            if cfg.decomposed:
                g_b1 = g_b1d

            # S and m are moments of xc = (x - o) / sigma: d/dxc += 2 g_S (xc - m) / P
            # plus the loss's gradient through m, -Abar^T dbbar / P (A^T dbeta1 / P for
            # the direct loss); with g_S = W1^T gW1S, the per-channel constant of the two
            # is W1^T wv (`expansion_backward`)
            g_S = products.mm(W1.t(), g_W1S, small)
            gg = plan.of(pol, "gram_grad" if cfg.decomposed else "gram_grad_direct")
            if products.native(dev, gg, x3.to(cdt)):   # one batched GEMM, fused with the add
                with products.float32_flags(dev, gg):
                    acc.baddbmm_(g_S.expand(B, C, C), x3.to(cdt), alpha=2.0 / P)
            else:
                acc.add_(products.mm(g_S.expand(B, C, C), x3.to(cdt), gg), alpha=2.0 / P)
            acc.add_((W1.t() @ wv)[:, None])
            g_x = (torch.addcmul(g_feat.view(B, C, -1), acc, inv) if cfg.residual
                   else acc.mul_(inv)).view(B, C, H, Wd)
        return (g_x.to(dt), None, g_W1, g_g1, g_b1, g_W2, g_g2, g_b2, None, None, None)
