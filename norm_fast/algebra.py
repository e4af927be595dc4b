"""The small algebra of the fast paths: everything that does not grow with P.

With X (C_s x P) the student positions, only the moments of X (mean, covariance), the
features (one C_s x C_s map applied per position) and one pass of `expand_mse` touch P;
the Feature Transform enters through C_s x C_s and N*C_t x C_s matrices
(docs/design.md sections 3-4). Autograd differentiates this algebra exactly; the P-sized
ops bring their own backward (`custom_ops.py`). This module calls no kernel itself: the
caller passes it the moments (`module.py`), and the loss sums live in `segment_loss.py`.

Notation used below: O = n*C_t expanded channels, C = C_s student channels.
The expansion is always written Y = A (X - shift) + b (shift None: Y = A X + b).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn


# --- BatchNorm behaviour -----------------------------------------------------------------
@dataclass(frozen=True)
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


def update_running(bn: nn.Module, state: BNState, mean: Tensor, var_biased: Tensor, P,
                   scale: Optional[Tensor] = None) -> None:
    """running <- (1 - f) running + f stat, with the unbiased variance (nn.BatchNorm2d).

    P, the number of positions the statistics cover, is an int or a 0-dim tensor (the
    global count under synchronised BatchNorm). `scale` (0-dim, a power of two) is the
    sigma of `Moments`: the statistics passed are those of X / sigma, so the mean is
    multiplied by sigma and the variance by sigma^2, in float64 so that the product does
    not overflow where the literal's statistics do not."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        f = state.factor
        if isinstance(f, Tensor):
            f = f.to(bn.running_mean.dtype)
        mean = mean.detach().double()
        var = var_biased.detach().double() * (P / (P - 1))
        if scale is not None:
            s = scale.double()
            mean, var = mean * s, var * s * s
        bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype) * f)
        bn.running_var.mul_(1 - f).add_(var.to(bn.running_var.dtype) * f)


def affine_params(bn: nn.Module, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(gamma, beta) of a BatchNorm in `dtype`, ones/zeros when affine=False."""
    C = bn.num_features
    dev = bn.running_mean.device if bn.running_mean is not None else bn.weight.device
    gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones(C, dtype=dtype, device=dev)
    beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros(C, dtype=dtype, device=dev)
    return gamma, beta


def eval_affine(bn: Optional[nn.Module], C: int, dtype: torch.dtype, device
                ) -> Tuple[Tensor, Tensor]:
    """(a, c) with eval-mode bn(z) = a * z + c per channel: a = gamma / sqrt(var + eps),
    c = beta - a * mean (docs/design.md section 2). Ones and zeros without a BatchNorm.
    The one eval-affine computation of the package: the module's eval forward and the
    merge (`fold.py`) both use it."""
    if not isinstance(bn, nn.BatchNorm2d):
        return (torch.ones(C, dtype=dtype, device=device),
                torch.zeros(C, dtype=dtype, device=device))
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("this BatchNorm has no running statistics (track_running_stats="
                         "False): its eval-mode output depends on the batch, so it is not "
                         "a fixed affine map")
    gamma, beta = affine_params(bn, dtype)
    a = gamma * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    return a, beta - a * bn.running_mean.to(dtype)


# --- moments of the student positions ------------------------------------------------------
@dataclass
class Moments:
    """The first two moments of the positions the P-sized ops read.

    x (B, C, L): those positions. In training with BatchNorm they are
    (f_s - origin) / sigma, centred once at origin = the batch mean (computed with a
    float64 accumulator, so a constant channel centres to exactly zero) and scaled by
    sigma = `scale`, a power of two chosen from max |f_s| (1 for every ordinary input),
    so that the covariance cannot overflow where the literal computation does not
    (docs/design.md section 3). Otherwise x is f_s itself and origin, scale are None.
    mean (C,), cov (C, C): of the global batch (under synchronised BatchNorm) or of x,
    in x's coordinates (so mean is a rounding residual when x is centred).
    local_mean, local_cov: of this process's positions (the same tensors without sync).
    count: positions the global statistics cover (int, or 0-dim tensor under sync).
    raw (B, C, L): f_s itself, when x = raw - origin (sigma 1) and the decomposed loss's
    residual is better taken from raw (`module._residual_source`), else None.
    """
    x: Tensor
    mean: Tensor
    cov: Tensor
    local_mean: Tensor
    local_cov: Tensor
    count: Union[int, Tensor]
    origin: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    raw: Optional[Tensor] = None


def is_one(scale: Tensor) -> bool:
    """Whether sigma is 1, asked only where the answer costs no device synchronisation
    (a CPU tensor, outside torch.compile): then the scaling pass can be skipped."""
    return (scale.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(scale == 1))


def range_scale(f_s: Tensor) -> Tensor:
    """sigma = 2^k, k = max(0, e - 50) where max |f_s| = m 2^e: 1 for every input whose
    entries stay below 2^50 (about 1e15), so ordinary inputs are not touched, and large
    enough beyond that for squares and C-term sums of f_s / sigma to stay finite in
    float32. A 0-dim tensor in the compute dtype; no host synchronisation."""
    lo, hi = torch.aminmax(f_s.detach())                    # one pass
    amax = torch.maximum(hi.abs(), lo.abs()).float()
    _, e = torch.frexp(amax)
    k = (e - 50).clamp_min(0)
    return torch.ldexp(torch.ones((), device=f_s.device), k)


# --- expansion -----------------------------------------------------------------------------
@dataclass
class Expansion:
    """Y = A (X - shift) + b for the N*C_t expanded channels (X in the coordinates of
    `Moments.x`), plus, for the decomposed loss, Abar (C_t, C) the mean of the n segment
    maps and spread = sum_i <D_i S_local, D_i> with D_i = A_i - Abar (docs/design.md
    section 4); Abar and spread are None when not asked for. Abar is the exact mean
    rounded to the compute dtype, spread is taken about it (D_i = A_i - Abar), and
    Abar_err (C_t, C, float64, no gradient) is Abar minus the exact mean: the decomposed
    loss corrects for it to first order (`segment_loss.decomposed_sq_sum`). Yc (N*C_t, P): the centred
    expanded data diag(a1) W1 (X - shift), columns p = b*L + l, when the statistics came
    from the data (`data_expansion`, P <= C_s): the contraction then takes the literal's
    order, W2 Yc, rather than the folded map W2 A (docs/design.md section 3)."""
    A: Tensor
    b: Tensor
    shift: Optional[Tensor]
    Abar: Optional[Tensor] = None
    spread: Optional[Tensor] = None
    Yc: Optional[Tensor] = None
    Abar_err: Optional[Tensor] = None


def segment_mean(A: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """(Abar, Abar_err): the mean over the n segments of A (n*C_t, C), summed in float64 and
    rounded to A's dtype, and that rounding (Abar minus the exact mean, float64, detached).

    Near convergence the segments agree to 1e-3 and everything the decomposed loss adds
    is a deviation from this mean; its rounding (half an ulp of |A|) is first order in
    the loss unless corrected (docs/design.md section 4)."""
    O, C = A.shape
    exact = A.view(n, O // n, C).mean(0, dtype=torch.float64)
    Abar = exact.to(A.dtype)
    return Abar, Abar.detach().to(torch.float64) - exact.detach()


def matrix_spread(A: Tensor, S: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum_i <D_i S, D_i>, Abar, Abar_err) by autograd-visible ops, D_i = A_i - Abar.

    The product is D S, of the deviations themselves (exact differences of nearly equal
    segments): never A S - Abar S, whose entries are differences of nearly equal totals
    with an absolute error of half an ulp of |A S| each, about 6e-5 of D S when the
    segments agree to 1e-3 (docs/design.md section 4). One GEMM, as A S was."""
    O, C = A.shape
    Abar, err = segment_mean(A, n)
    D = (A.view(n, O // n, C) - Abar).view(O, C)
    return torch.linalg.vecdot((D @ S).flatten(), D.flatten()), Abar, err


def _weighted_mean(w: Tensor, M: Tensor) -> Tensor:
    """mean_i diag(w_i) M_i (C_t, C) of w (n, C_t) and M (n, C_t, C): one addcmul per
    segment (a batched product here would run C_t tiny GEMMs)."""
    acc = M[0] * w[0][:, None]
    for i in range(1, M.shape[0]):
        acc.addcmul_(M[i], w[i][:, None])
    return acc.div_(M.shape[0])


class _BNExpansion(torch.autograd.Function):
    """A = diag(a1) W1, its batch variance and the matrix spread, one GEMM each way.

    forward(W1 (O, C), S (C, C) or None, scale (O,), eps, batch_stats, n_spread)
        batch_stats: scale is gamma1, var1 = diag(W1 S W1^T), a1 = gamma1 / sqrt(var1 + eps)
        otherwise:   scale is a1 itself (eval-mode BatchNorm: from the running variance)
        n_spread > 0: also spread = sum_i <D_i S, D_i> over the n_spread segments, with
        D_i = A_i - Abar, summed elementwise as docs/design.md section 5 demands.
    -> (A (O, C), Abar (C_t, C) or empty, var1 (O,) or empty, spread 0-dim, Abar_err)
    (Abar and Abar_err as `segment_mean` returns them; D_i = A_i - Abar.)

    var1 is a quadratic form of a covariance computed in floating point: its absolute
    error is about eps_float * |w|^2 * ||S||, so for a direction the batch does not span
    (rank-deficient S) it can come out slightly negative. It is clamped at 0: the
    clamped value is non-negative by construction and within the same bound of the
    truth (tests/test_robustness.py checks the bound); where the data is small enough
    to use instead (P <= C), `module.py` takes the variance from the data.

    Autograd through these ops costs two GEMMs in the backward of W1 S and about 40
    elementwise passes over O x C matrices. By hand (docs/design.md section 5) it needs
    one GEMM: with D S = A S - Abar S (= DS, formed in the forward),
        dW1 = a1 o gA' + g_sp a1 o DS + 2 g_var o (W1 S)        (no product with S)
        dS  = W1^T (g_sp a1 o D + g_var o W1)                    (the one GEMM)
    where gA' = gA + g_sp DS + gAbar / n (tiled) and g_var includes d a1 / d var1.
    """

    @staticmethod
    def forward(ctx, W1, S, scale, eps: float, batch_stats: bool, n_spread: int):
        O, C = W1.shape
        n = n_spread
        f64 = torch.float64
        T = O // n if n else O
        if S is None:
            W1S = None
        elif n:
            # the one large product, of the weights centred over the segments:
            # W1_i S = Wbar S + (W1_i - Wbar) S, so that D_i S below is formed from
            # deviations and never as a difference of nearly equal rows of W1 S
            W3 = W1.view(n, T, C)
            Wbar = W3.mean(0)
            dW = W3 - Wbar
            dWS = (dW.view(O, C) @ S).view(n, T, C)
            WbS = Wbar @ S
            W1S = (dWS + WbS).view(O, C)
        else:
            W1S = W1 @ S
        if batch_stats:
            # var1 = rowdot(W1 S, W1): the products rounded one by one, summed in float64.
            # A float32 sum over C errs by several ulps, which a1 inherits row by row, and
            # near convergence the loss's sensitivity to such a row scale is about
            # 2 eps |Y| / |E| per row (docs/design.md section 3). (Not as Wbar's part plus
            # the deviations': far from convergence those two cancel.)
            var64 = (W1S * W1).sum(1, dtype=f64).clamp_min_(0)   # biased batch variance
            inv64 = torch.rsqrt(var64 + eps)
            a64 = scale.to(f64) * inv64
            var1, inv, a1 = var64.to(W1.dtype), inv64.to(W1.dtype), a64.to(W1.dtype)
        else:
            var1, inv, a1 = W1.new_empty(0), None, scale
            a64 = scale.to(f64)
        A = W1 * a1[:, None]
        D = DS = None
        if n:
            a2 = a1.view(n, T)
            am = a64.view(n, T).mean(0)                                  # mean a1, float64
            # the mean of the A_i: mean a1 times Wbar (float64, C_t x C) plus the mean of
            # the deviations' products (small near convergence: float32 is enough), and
            # Abar's rounding
            exact = am[:, None] * Wbar.to(f64) + (_weighted_mean(a2, dW)).to(f64)
            Abar = exact.to(W1.dtype)
            err = Abar.to(f64) - exact
            D = (A.view(n, T, C) - Abar).view(O, C)
            # D_i S = (a1_i - mean a1) Wbar S + a1_i dW_i S - mean_k a1_k dW_k S (rows),
            # elementwise from the deviations (docs/design.md section 4); the mean of a1 in
            # float64, as a rounded one would add a common error to every D_i S
            da = (a64.view(n, T) - am).to(W1.dtype).view(n, T, 1)
            aWSbar = _weighted_mean(a2, dWS)
            DS = torch.addcmul(-aWSbar, a2.view(n, T, 1), dWS).addcmul_(da, WbS).view(O, C)
            spread = torch.linalg.vecdot(D.flatten(), DS.flatten())
            ctx.mark_non_differentiable(err)
        else:
            Abar, spread, err = W1.new_empty(0), W1.new_zeros(()), W1.new_empty(0)
        ctx.save_for_backward(W1, W1S, a1, inv, D, DS)
        ctx.batch_stats, ctx.n_spread = batch_stats, n_spread
        return A, Abar, var1, spread, err

    @staticmethod
    def backward(ctx, gA, gAbar, gvar1, gspread, _gerr):
        W1, W1S, a1, inv, D, DS = ctx.saved_tensors
        O, C = W1.shape
        n = ctx.n_spread
        # (every "x += M * v" is one addcmul_ pass: O x C passes are the cost on CPU)
        if gA is None:
            g = torch.zeros_like(W1)
            if n and gAbar is not None:
                g.view(n, O // n, C).add_(gAbar[None] / n)
        elif n and gAbar is not None:
            g = (gA.view(n, O // n, C) + gAbar[None] / n).view(O, C)
        else:
            g = gA.clone()
        gW1S = None                                              # gradient of W1 S
        if n and gspread is not None:
            g.addcmul_(DS, gspread)
            gW1S = D * (gspread * a1)[:, None]
        ga1 = torch.linalg.vecdot(g, W1)
        if gW1S is not None:
            ga1 = ga1 + torch.linalg.vecdot(D, W1S) * gspread
        gW1 = g.mul_(a1[:, None])
        if gW1S is not None:
            gW1.addcmul_(DS, (gspread * a1)[:, None])           # = gW1S @ S, as D S = DS
        if ctx.batch_stats:
            gv = -0.5 * ga1 * a1 * inv * inv                     # d a1 / d var1
            if gvar1 is not None:
                gv = gv + gvar1
            gscale = ga1 * inv
            gW1.addcmul_(W1S, (2 * gv)[:, None])
            gW1S = W1 * gv[:, None] if gW1S is None else gW1S.addcmul_(W1, gv[:, None])
        else:
            gscale = ga1
        gS = W1.transpose(0, 1) @ gW1S if (gW1S is not None and ctx.needs_input_grad[1]) else None
        return gW1, gS, gscale, None, None, None


def bn_expansion(W1: Tensor, S: Optional[Tensor], scale: Tensor, eps: float, batch_stats: bool,
                 n_spread: int):
    """See `_BNExpansion`: (A, Abar, var1, spread, Abar_err)."""
    return _BNExpansion.apply(W1, S, scale, eps, batch_stats, n_spread)


def data_expansion(W1: Tensor, xc: Tensor, gamma: Tensor, eps: float, n_spread: int):
    """(A, Abar, var1, spread, Yc) of a training-mode BatchNorm from the centred data itself.

    xc (C, P) with P <= C: Z = W1 xc (O x P) costs no more than W1 S (O x C), and every
    statistic is a sum of squares of Z, so it is non-negative and as accurate as the
    literal's (docs/design.md section 3): var1 = |Z_o|^2 / P and
    spread = |a1 Z - mean_i(a1 Z)|^2 / P (elementwise deviations); Yc = a1 Z, the
    normalised centred data (O x P). Plain autograd."""
    O, C = W1.shape
    P = xc.shape[1]
    # in xc's dtype (float64 from `batch_expansion`), the results in W1's
    dt, W, g = W1.dtype, W1.to(xc.dtype), gamma.to(xc.dtype)
    Z = W @ xc
    var1 = Z.square().sum(1) / P
    a1 = g * torch.rsqrt(var1 + eps)
    A = (W * a1[:, None]).to(dt)
    Yc = Z * a1[:, None]
    if not n_spread:
        return A, A.new_empty(0), var1.to(dt), A.new_zeros(()), Yc.to(dt)
    n = n_spread
    AZ = Yc.view(n, O // n, P)
    spread = (AZ - AZ.mean(0)).square().sum() / P
    return A, A.view(n, O // n, C).mean(0), var1.to(dt), spread.to(dt), Yc.to(dt)


def batch_expansion(W1: Tensor, bn: nn.Module, state: BNState, mom: Moments, n_spread: int,
                    synced: bool) -> Expansion:
    """Training-mode BatchNorm: Y = A (X - mean) + beta with the batch statistics of Z = W1 X
    (docs/design.md section 3), the running statistics updated as nn.BatchNorm2d does.

    The variance comes from the data when this process holds all of it and P <= C
    (`data_expansion`), else from the covariance (`_BNExpansion`, clamped at 0); with
    synchronised statistics the spread needs this process's own covariance."""
    gamma, beta = affine_params(bn, W1.dtype)
    eps = bn.eps
    if mom.scale is not None:
        eps = eps / mom.scale.to(W1.dtype).square()   # BN(W1 X) = BN_{eps/s^2}(W1 X/s)
    O, C = W1.shape
    P = mom.x.shape[0] * mom.x.shape[2]
    Yc = err = None
    if not synced and P <= C:
        # P <= C_s (tiny batches): O x C x P products cost no more than W1 S; in float64,
        # as the literal's BatchNorm accumulates its statistics in double on CPU
        x = mom.x.double() - mom.mean.double()[None, :, None]
        xc = x.permute(1, 0, 2).reshape(C, P)
        A, Abar, var1, spread, Yc = data_expansion(W1, xc, gamma, eps, n_spread)
    else:
        A, Abar, var1, spread, err = _BNExpansion.apply(W1, mom.cov, gamma, eps, True,
                                                        0 if synced else n_spread)
        if synced and n_spread:
            spread, Abar, err = matrix_spread(A, mom.local_cov, n_spread)
    if state.update:
        mean = mom.mean if mom.origin is None else mom.mean + mom.origin
        update_running(bn, state, W1 @ mean, var1, mom.count, mom.scale)
    if not n_spread:
        return Expansion(A, beta, mom.mean, Yc=Yc)
    return Expansion(A, beta, mom.mean, Abar, spread, Yc, err)


def fixed_expansion(W1: Tensor, bn: Optional[nn.Module], mom: Optional[Moments],
                    n_spread: int) -> Expansion:
    """No BatchNorm, or one normalising with its running statistics: Y = A X + b with
    A = diag(a) W1, b = c from `eval_affine`, a per-position map with no shift, so a
    non-finite input stays as local as in the literal (docs/design.md section 3).
    The decomposed loss needs the spread over this process's covariance. When the
    moments are of X / sigma (`Moments.scale`), A is sigma diag(a) W1: the same map on
    the scaled positions."""
    s = mom.scale.to(W1.dtype) if (mom is not None and mom.scale is not None) else None
    if bn is None:
        A = W1 if s is None else W1 * s                          # acts on mom.x = X / s
        c = W1.new_zeros(W1.shape[0])
        if n_spread and mom is not None:
            spread, Abar, err = matrix_spread(A, mom.local_cov, n_spread)
            return Expansion(A, c, None, Abar, spread, Abar_err=err)
        return Expansion(A, c, None)
    a, c = eval_affine(bn, W1.shape[0], W1.dtype, W1.device)
    if s is not None:
        a = a * s
    if n_spread and mom is not None:
        A, Abar, _, spread, err = _BNExpansion.apply(W1, mom.local_cov, a, 0.0, False, n_spread)
        return Expansion(A, c, None, Abar, spread, Abar_err=err)
    return Expansion(W1 * a[:, None], c, None)


# --- contraction -----------------------------------------------------------------------------
def contraction_map(W2: Tensor, exp: Expansion) -> Tuple[Tensor, Tensor]:
    """(K, k): contract(Y) = K X + k per position, K = W2 A (C x C), k = W2 (b - A shift)."""
    K = W2 @ exp.A
    k = W2 @ exp.b
    if exp.shift is not None:
        k = k - K @ exp.shift
    return K, k


def fold_affine(K: Tensor, k: Tensor, a2: Tensor, c2: Tensor) -> Tuple[Tensor, Tensor]:
    """(M, m) with a2 * (K x + k) + c2 = M x + m: the contraction and an affine
    (eval-mode) BatchNorm folded into one C x C map (docs/design.md section 2)."""
    return K * a2[:, None], a2 * k + c2
