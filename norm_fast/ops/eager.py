"""The eager PyTorch kernel set (``backend="torch"``): the op contract of
`norm_fast/ops/spec.py` written out in plain PyTorch, the reading copy every other kernel
set is tested against. All sizes below use

    x : (B, C_s, L)   student positions (a view of f_s (B, C_s, H, W), any strides)
    t : (B, C_t, L)   teacher positions
    P = B * L         number of positions
    a : (n*C_t, C_s)  per-position affine map of the expansion (segment i = rows i*C_t:(i+1)*C_t)
    b : (n*C_t,)      its bias
    shift : (C_s,) or None   subtracted from x before `a` is applied (the batch mean)

The expanded error of segment i at position p is
    E_i[:, p] = a_i @ (x[:, p] - shift) + b_i - t[:, p]          (C_t)
and `expand_mse` returns  sum_i ||E_i||^2  over all positions (docs/design.md section 4).

Accumulation is in the *compute dtype*: float64 for float64 inputs, float32 otherwise.
Memory: the direct form never holds more than `chunk_bytes` of expanded error at once
(chunks of whole batch rows), so nothing of size n*C_t*P is allocated.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import products
from .spec import DEFAULT_CHUNK_BYTES, check_store_error, compute_dtype

# Positions per slab of a "tf32x3" Gram: each slab's products are summed in float32, the
# slabs in float64, as the Triton moments kernel sums its BLOCK_P-position tiles.
GRAM_SLAB = 32


def available() -> Tuple[bool, str]:
    """Always available: plain PyTorch ops on any device."""
    return True, f"torch {torch.__version__}"


def _batch_chunks(B: int, row_elems: int, itemsize: int, chunk_bytes: int):
    """Yield (b0, b1) ranges of batch rows whose error block fits in `chunk_bytes`."""
    per_row = max(1, row_elems * itemsize)
    step = max(1, min(B, chunk_bytes // per_row))
    for b0 in range(0, B, step):
        yield b0, min(B, b0 + step)


def _centred(x: Tensor, shift: Optional[Tensor], cdt: torch.dtype) -> Tensor:
    x = x.to(cdt)
    return x if shift is None else x - shift.to(cdt)[None, :, None]


def _segment_error(xc: Tensor, t: Tensor, a: Tensor, b: Tensor, n: int,
                   precision: str = "ieee") -> Tensor:
    """E for a chunk: xc (nb, C_s, L) -> (nb, n, C_t, L), the product in `precision`."""
    nb, _, L = xc.shape
    C_t = t.shape[1]
    e = products.mm(a, xc, precision) + b[None, :, None]  # (nb, n*C_t, L)
    e = e.view(nb, n, C_t, L)
    return e - t.to(e.dtype)[:, None]


def moments(x: Tensor, precision: str = "float64") -> Tuple[Tensor, Tensor]:
    """Mean (C,) and biased covariance (C, C) of x (B, C, L) over its B*L positions.

    Two passes (mean, then the centred product), so the covariance does not cancel when
    the mean is large against the spread (post-ReLU features; docs/design.md section 3).
    precision (the plan's "gram"): "float64" sums the products in float64 (float32 input
    is widened): a float32 sum over P positions errs by about eps * sqrt(P / 3) relative
    on the diagonal, and near convergence every per-row scale of the expansion derives
    from this covariance. "tf32x3" (or any other of the plan's) multiplies slabs of
    GRAM_SLAB positions in that precision, summed in float32, and the slabs in float64
    (docs/design.md section 6).
    """
    cdt = compute_dtype(x.dtype)
    B, C, L = x.shape
    P = B * L
    xf = x.to(cdt)
    mean = xf.sum(dim=(0, 2)) / P
    xc = xf - mean[None, :, None]
    # Corrected two-pass mean: the residuals' mean removes the first sum's rounding, so
    # a constant channel centres to exactly zero (as in the literal's BatchNorm).
    corr = xc.sum(dim=(0, 2)) / P
    mean = mean + corr
    xc = xc - corr[None, :, None]
    if cdt == torch.float64 or precision == "float64":
        xw = xc.double()
        cov = torch.tensordot(xw, xw, dims=([0, 2], [0, 2])) / P
    else:
        cov = _slab_gram(xc.to(torch.float32), precision) / P
    return mean, cov.to(cdt)


def _slab_gram(xc: Tensor, precision: str) -> Tensor:
    """sum_p xc_p xc_p^T (C, C) in float64: slabs of GRAM_SLAB positions multiplied in
    `precision` with float32 sums, the slabs summed in float64 (at most ~64 MiB of slab
    partials at once)."""
    B, C, L = xc.shape
    flat = xc.permute(1, 0, 2).reshape(C, B * L)
    pad = (-flat.shape[1]) % GRAM_SLAB
    flat = torch.nn.functional.pad(flat, (0, pad)).view(C, -1, GRAM_SLAB)
    k = flat.shape[1]
    group = max(1, (64 << 20) // max(1, 4 * C * C))
    out = torch.zeros((C, C), dtype=torch.float64, device=xc.device)
    for k0 in range(0, k, group):
        part = flat[:, k0:k0 + group]
        slabs = products.bilinear(lambda u, v: torch.einsum("cks,dks->kcd", u, v), part, part,
                                  precision)
        out += slabs.sum(0, dtype=torch.float64)
    return out


def centred_moments(x: Tensor, precision: str = "float64"
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The positions the fused training step reads, and their moments.

    x (B, C, L) -> (xc, origin, scales, mean, cov):
        origin (C,)   the channel means of x (summed in float64: a constant channel
                      centres to exactly zero), compute dtype;
        scales (2,)   (sigma, 1/sigma), sigma = `algebra.range_scale` of x: a power of two,
                      1 unless max |x| >= 2^50;
        xc (B, C, L)  (x - origin) / sigma, contiguous, in x's dtype;
        mean, cov     `moments(xc, precision)`: of the stored xc (mean a rounding
                      residual), the Gram in `precision`.
    The range scale and centring of docs/design.md section 3 in one op."""
    cdt = compute_dtype(x.dtype)
    B, C, L = x.shape
    amax = torch.linalg.vector_norm(x, float("inf"), dtype=cdt) if x.numel() else \
        torch.zeros((), dtype=cdt, device=x.device)
    _, e = torch.frexp(amax)
    k = (e - 50).clamp_min(0)
    scales = torch.ldexp(torch.ones(2, dtype=cdt, device=x.device), torch.stack((k, -k)))
    origin = (x.sum(dim=(0, 2), dtype=torch.float64) / max(B * L, 1)).to(cdt)
    xc = torch.addcmul((origin * -scales[1])[:, None], x, scales[1]).to(x.dtype)
    mean, cov = moments(xc, precision)
    return xc, origin, scales, mean, cov


def moments_backward(x: Tensor, mean: Tensor, grad_mean: Optional[Tensor],
                     grad_cov: Optional[Tensor], precision: str = "ieee") -> Tensor:
    """dL/dx for (mean, cov) = moments(x); returned in x's dtype, the product in
    `precision` (the plan's "gram_grad").

    cov = Xc Xc^T / P, so dX = (G + G^T) Xc / P + g_mean / P   (the dependence through
    the mean in Xc contributes (G + G^T) Xc 1 / P = 0, since Xc sums to zero).
    """
    B, C, L = x.shape
    P = B * L
    cdt = mean.dtype
    dx = torch.zeros((B, C, L), dtype=cdt, device=x.device)
    if grad_cov is not None:
        g = (grad_cov + grad_cov.transpose(0, 1)).to(cdt)
        dx = products.mm(g, x.to(cdt) - mean[None, :, None], precision)
    if grad_mean is not None:
        dx = dx + grad_mean.to(cdt)[None, :, None]
    return (dx / P).to(x.dtype)


def expand_mse_forward(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
                       n: int, store_error: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """sum_i ||a_i (x - shift) + b_i - t||^2 over all positions.

    Returns (sq, err): sq is a 0-dim tensor in the compute dtype; err is the error
    (B, C_t, L) in the compute dtype when `store_error` (only allowed for n == 1: the
    decomposed algorithm's one residual), else an empty tensor. precision: of the
    products (`norm_fast/precision.PRECISIONS`; `ops/products.bilinear`: on CPU emulated).
    """
    cdt = compute_dtype(x.dtype)
    B, C_s, L = x.shape
    C_t = t.shape[1]
    a = a.to(cdt)
    b = b.to(cdt)
    if store_error:
        check_store_error(n, store_error)
        e = _segment_error(_centred(x, shift, cdt), t, a, b, 1, precision).view(B, C_t, L)
        return e.square().sum(), e
    sq = torch.zeros((), dtype=cdt, device=x.device)
    itemsize = torch.finfo(cdt).bits // 8
    for b0, b1 in _batch_chunks(B, n * C_t * L, itemsize, chunk_bytes):
        e = _segment_error(_centred(x[b0:b1], shift, cdt), t[b0:b1], a, b, n, precision)
        sq = sq + e.square().sum()
    return sq, x.new_empty((0,), dtype=cdt)


def expand_mse_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                        shift: Optional[Tensor], n: int, err: Optional[Tensor],
                        grad_mask: List[bool], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        precision: str = "ieee", grad_precision: Optional[str] = None
                        ) -> Tuple[Tensor, ...]:
    """Gradients of g * expand_mse_forward(...)[0], with g = `grad` (0-dim): the error
    recomputed in `precision` as in `expand_mse_forward`, da and dx in `grad_precision`
    (default `precision`).

    grad_mask = [x, t, a, b, shift]: which gradients are wanted. Returns
    (dx, dt, da, db, dshift); an unwanted one is an empty tensor. dx and dt come in the
    dtypes of x and t, da/db/dshift in the compute dtype. With E the error:
        da = 2g sum_p E[:, p] xc[:, p]^T      db = 2g sum_p E[:, p]
        dx = 2g a^T E                         dt = -2g sum_i E_i      dshift = -sum_p dx
    `err` is the stored error (n == 1) or None: then E is recomputed chunk by chunk.
    """
    gp = grad_precision or precision
    want_x, want_t, want_a, want_b, want_s = grad_mask
    want_s = want_s and shift is not None
    cdt = compute_dtype(x.dtype)
    B, C_s, L = x.shape
    C_t = t.shape[1]
    a = a.to(cdt)
    b = b.to(cdt)
    g2 = 2 * grad.to(cdt)
    dx = torch.empty((B, C_s, L), dtype=cdt, device=x.device) if (want_x or want_s) else None
    dt = torch.empty((B, C_t, L), dtype=cdt, device=x.device) if want_t else None
    da = torch.zeros_like(a) if want_a else None
    db = torch.zeros_like(b) if want_b else None
    itemsize = torch.finfo(cdt).bits // 8
    chunks = [(0, B)] if err is not None else _batch_chunks(B, n * C_t * L, itemsize, chunk_bytes)
    for b0, b1 in chunks:
        xc = _centred(x[b0:b1], shift, cdt)
        if err is not None:
            e = err.view(B, 1, C_t, L)
        else:
            e = _segment_error(xc, t[b0:b1], a, b, n, precision)  # (nb, n, C_t, L)
        nb = b1 - b0
        ef = e.reshape(nb, n * C_t, L)
        if da is not None:
            # 2g applied to xc before the product: E xc^T cannot overflow where the
            # literal's gradient, scaled element by element, does not
            da += products.bilinear(lambda u, v: torch.tensordot(u, v, dims=([0, 2], [0, 2])),
                                    ef, xc * g2, gp)
        if db is not None:
            db += ef.sum(dim=(0, 2))
        if dx is not None:
            dx[b0:b1] = products.mm(a.transpose(0, 1), ef, gp)
        if dt is not None:
            dt[b0:b1] = -e.sum(dim=1)
    empty = x.new_empty((0,), dtype=cdt)
    dshift = -(dx.sum(dim=(0, 2)) * g2) if want_s else empty
    return (
        (dx * g2).to(x.dtype) if want_x else empty,
        (dt * g2).to(t.dtype) if want_t else empty,
        da if want_a else empty,
        db * g2 if want_b else empty,
        dshift,
    )


# --- the fused training step's ops (norm_fast/train_step.py) -------------------------------
def expand_error(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor], n: int,
                 g2: Tensor, precision: str = "ieee") -> Tensor:
    """g2 * E (B, n*C_t, L), E[:, i*C_t + c] = a_i (x - shift) + b_i - t: the scaled
    error of the direct loss for x (B, C_s, L), t (B, C_t, L), a (n*C_t, C_s), b, shift
    (C_s,) or None, g2 0-dim; in the compute dtype (x's dtype when 16-bit). The caller
    bounds its size (batch chunks of the fused step's backward)."""
    cdt = compute_dtype(x.dtype)
    with products.float32_flags(x.device, "ieee"):
        bias = b.to(cdt) if shift is None else b.to(cdt) - a.to(cdt) @ shift.to(cdt)
    y = products.mm(a.to(cdt), x.to(cdt), precision) + bias[:, None]
    B, C_t, L = t.shape
    e = (y.view(B, n, C_t, L) - t.to(cdt)[:, None]) * g2
    return e.view(B, n * C_t, L).to(x.dtype if x.dtype in (torch.float16, torch.bfloat16)
                                    else cdt)



def expansion_forward(W1: Tensor, W1S: Tensor, WbS: Tensor, gamma: Tensor, beta: Tensor,
                      origin: Tensor, mean: Tensor, sigma: Tensor, inv: Tensor, eps: float,
                      unbias: float, part_scale: float, n: int, decomposed: bool
                      ) -> Tuple[Tensor, ...]:
    """The training-mode BatchNorm'd expansion from W1 (O, C) and its product with S, the
    covariance of the centred positions xc = (x - origin) / sigma, mean their mean
    (docs/design.md sections 3-5, 8). eps is the BatchNorm's (divided by sigma^2 here),
    unbias = P / (P - 1).

    The product comes in the form the loss needs: with `decomposed`, W1S (O, C) is
    (W1 - Wbar) S and WbS (C_t, C) is Wbar S, Wbar (C_t, C) the mean of W1's segments
    (`centre_segments`), so that D_i S is formed from deviations (section 4); otherwise
    W1S is W1 S and WbS is empty. Returns
        a1 (O,)  = gamma / sqrt(var1 + eps / sigma^2), var1 = rowdot(W1 S, W1) >= 0
        r1 (O,)  = 1 / sqrt(var1 + eps / sigma^2)
        A (O, C) = diag(a1) W1, rounded entry by entry (a1's per-row scale is float64)
        mean1 (O,), var1u (O,): the batch mean W1 (origin + sigma mean) and unbiased
                  variance sigma^2 var1 unbias, for the running statistics
        c1 (O,)  = beta - A mean: the expansion's output is A xc + c1 (the contraction's
                  running mean needs W2 c1)
    and with `decomposed` (else empty tensors)
        Abar (C_t, C): the mean of A over the n segments, exact, then rounded
        DS (O, C): D_i S, D_i = A_i - Abar, from the deviations
        Aerr (C_t, C): Abar minus the exact mean (its rounding)
        rb (C_t,): the residual's bias about xc's origin: bbar - Abar mean, formed in
                  float64 (the residual is Abar xc + rb - T); rho its rounding
        rcoef (C_t,): rho - Aerr mean: with G4 = sum_p R_p xc_p^T and SR = sum_p R_p, the
                  loss's first-order correction is -2 (<Aerr, G4> + <rcoef, SR>) + P |rho|^2
                  (`decomposed_total`; docs/design.md section 4)
        db (O,): beta's deviations from its mean over the segments
        part (C_t,): per teacher row j, part_scale times
                   sum_i <A_i - Abar, DS_i>_j + db_ij^2 + n rho_j^2
                   (the caller sums them: the spread, the biases' spread and the
                   correction's P |rho|^2)
    The variance, a1 and every mean over the segments are float64 sums (section 3).
    Elementwise deviations, never a difference of totals (section 5)."""
    f64 = torch.float64
    O, C = W1.shape
    W1Sf = W1S if not decomposed else (W1S.view(n, O // n, C) + WbS).view(O, C)
    var64 = (W1Sf * W1).sum(1, dtype=f64).clamp_min(0)
    r64 = torch.rsqrt(var64 + eps * inv.to(f64) ** 2)
    a64 = gamma.to(f64) * r64
    a1, r1 = a64.to(W1.dtype), r64.to(W1.dtype)
    A = torch.addcmul(W1 * a1[:, None], W1, (a64 - a1.to(f64)).to(W1.dtype)[:, None])
    mean1 = W1 @ torch.addcmul(origin, mean, sigma)
    var1u = (var64 * (sigma.to(f64) ** 2 * unbias)).to(W1.dtype)
    c1 = beta - A @ mean
    if not decomposed:
        return (a1, r1, A, mean1, var1u, c1, *(W1.new_empty((0,)) for _ in range(7)))
    T = O // n
    exact = torch.einsum("ij,ijc->jc", a64.view(n, T), W1.view(n, T, C).to(f64)) / n
    Abar = exact.to(W1.dtype)
    Aerr = (Abar.to(f64) - exact).to(W1.dtype)
    a3 = a64.view(n, T, 1)
    aWS = a1.view(n, T, 1) * W1S.view(n, T, C)
    DS = torch.addcmul(aWS - aWS.mean(0), (a3 - a3.mean(0)).to(W1.dtype), WbS)
    b2 = beta.view(n, T).to(f64)
    bbar = b2.mean(0)
    db = (b2 - bbar).to(W1.dtype).reshape(O)
    rb64 = bbar - Abar.to(f64) @ mean.to(f64)
    rb = rb64.to(W1.dtype)
    rho = rb.to(f64) - rb64
    rcoef = (rho - (Abar.to(f64) - exact) @ mean.to(f64)).to(W1.dtype)
    part = (((A.view(n, T, C) - Abar) * DS).sum(dim=(0, 2))
            + db.view(n, T).square().sum(0) + (n * rho * rho).to(W1.dtype)) * part_scale
    return a1, r1, A, mean1, var1u, c1, Abar, DS.view(O, C), Aerr, rb, rcoef, db, part


def decomposed_total(part: Tensor, resid: Tensor, Aerr: Tensor, G4: Tensor, rcoef: Tensor,
                     SR: Tensor, ncoef: float, P: int) -> Tensor:
    """The decomposed loss, 0-dim:
    sum(part) + ncoef (resid - 2 P (<Aerr, G4> + <rcoef, SR>)), part, Aerr, rcoef from
    `expansion_forward`, resid = ||R||^2, G4 = sum_p R_p xc_p^T / P and SR = sum_p R_p / P
    of the residual R over its P positions (docs/design.md section 4)."""
    corr = torch.dot(Aerr.flatten(), G4.flatten()) + torch.dot(rcoef, SR)
    return part.sum() + ncoef * (resid - (2 * P) * corr)


def centre_segments(W1: Tensor, n: int) -> Tensor:
    """(O + C_t, C): the rows W1_i - Wbar of every segment, then Wbar (C_t, C), the mean of
    the n segments of W1 (O, C): one GEMM with S gives both products
    `expansion_forward` takes (docs/design.md section 4)."""
    O, C = W1.shape
    W3 = W1.view(n, O // n, C)
    Wbar = W3.mean(0)
    return torch.cat(((W3 - Wbar).view(O, C), Wbar))


def expansion_backward(gA: Tensor, gA2: Tensor, gAbar: Tensor, gsum: Tensor, g_out: Tensor,
                       coef: float, W1: Tensor, W1S: Tensor, WbS: Tensor, a1: Tensor,
                       r1: Tensor, A: Tensor, Abar: Tensor, DS: Tensor, db: Tensor,
                       mean: Tensor, P: int, n: int, decomposed: bool) -> Tuple[Tensor, ...]:
    """Backward of `expansion_forward` (docs/design.md section 8).

    gA (O, C): the gradient of A from the contraction (W2^T g_K); gA2 (O, C) or empty:
    another one (the direct loss's); decomposed: gAbar (C_t, C) and gsum (C_t,) are the
    residual's products per position, G4 = sum_p R_p xc_p^T / P and SR = sum_p R_p / P,
    not yet scaled: the gradients of Abar and bbar are 2 n gl P (G4 - SR mean^T) and
    2 n gl P SR; direct: gAbar is empty and gsum the loss's dbeta1 (O,). g_out (0-dim) times coef: gl, the loss gradient divided by C_t P, so
    that P (spread + ||db||^2) has gradient P gl. W1S, WbS as `expansion_forward` took
    them; A, Abar, DS as it returned them. Returns
        gW1 (O, C), gW1S (O, C) the gradient of the product W1 S (the caller forms
        g_S = W1^T gW1S), ggamma (O,), gbeta (O,) (empty when not decomposed), and
        wv (O,) = -(2 gW1S mean + a1 s) / P, s = dbbar / n tiled over the segments
        (decomposed) or dbeta1: W1^T wv is the per-channel constant of the student's
        gradient, -(2 g_S mean + Abar^T dbbar) / P."""
    O, C = W1.shape
    gl = g_out.to(W1.dtype) * coef
    G = gA if gA2.numel() == 0 else gA + gA2
    gb = W1.new_empty((0,))
    g_sp = gl * (2 * P)
    if decomposed:
        T = O // n
        W1S = (W1S.view(n, T, C) + WbS).view(O, C)
        g_r = gl * (2 * n * P)
        gAb = torch.addr(gAbar, gsum, mean, alpha=-1)
        G = (G.view(n, T, C) + gAb * (g_r / n) + DS.view(n, T, C) * g_sp).view(O, C)
        s = (gsum * (g_r / n)).repeat(n)
        gb = s + db * g_sp
    else:
        s = gsum
    ga1 = torch.linalg.vecdot(G, W1)
    gvar = ga1 * a1 * r1 * r1 * -0.5
    gW1 = G * a1[:, None] + (2 * gvar)[:, None] * W1S
    gW1S = W1 * gvar[:, None]
    if decomposed:
        D = A.view(n, O // n, C) - Abar
        gW1S = gW1S + D.view(O, C) * (gl * P * a1)[:, None]
    wv = -(2 * (gW1S @ mean) + a1 * s) / P
    return gW1, gW1S, ga1 * r1, gb, wv
