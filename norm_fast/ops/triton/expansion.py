"""Triton kernels of the expansion's small algebra: the BatchNorm'd map A = diag(a1) W1,
its statistics and the decomposed loss's spread, forward and backward, one launch each.

Contract (the eager reading copy is `norm_fast/ops/eager.py`: `expansion_forward`,
`expansion_backward`). O = n*C_t rows, C = C_s columns; row i*C_t + j is row j of
segment i. Every matrix is (O, C) or (C_t, C), contiguous, in the compute dtype.

Why kernels: written as PyTorch ops this is about 25 elementwise passes and reductions
over O x C matrices forward and 15 backward, each a launch of a few microseconds on a GPU
for microseconds of work (docs/design.md section 8). The work is O(n C_t C) loads; a
program owns BLOCK_R teacher rows j for all n segments, so the means over the segments
(Abar, the mean of a1 W1 S) are complete inside the program and nothing is combined
across programs except the spread's partial sums (one per teacher row, summed by the
caller: deterministic). The products W1 S and W2^T g_K stay cuBLAS GEMMs (one launch
each, every SM busy): formed inside these kernels they would run on C_t / 16 programs
only, a few SMs for the O C^2 multiply-adds at the shapes of the paper.

Within a program, values written in one phase and read in the next (a1 after the
variance pass) go through global memory with a CTA barrier between (`tl.debug_barrier`:
bar.sync makes a block's global writes visible to the whole block).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as tlaunch


@triton.jit
def _slab(c0, rows, mj, C, BLOCK_C: tl.constexpr):
    """Columns c0 + [0, BLOCK_C) of the (BLOCK_R, C) rows `rows` (int64) of an (O, C)
    matrix: c, its mask, the tile's mask and offsets."""
    c = c0 + tl.arange(0, BLOCK_C)
    mc = c < C
    return c, mc, mj[:, None] & mc[None, :], rows[:, None] * C + c[None, :]


@triton.jit
def _expansion_fwd_kernel(
    w_ptr, ws_ptr, wbs_ptr, g_ptr, b_ptr, o_ptr, m_ptr, sig_ptr, inv_ptr, a64_ptr,
    a1_ptr, r1_ptr, A_ptr, mean1_ptr, var1u_ptr, c1_ptr, abar_ptr, ds_ptr, aerr_ptr,
    rb_ptr, rc_ptr, db_ptr, part_ptr,
    C, C_t, n, eps, unbias, part_scale,
    DECOMP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program pid: teacher rows j in [pid*BLOCK_R, +BLOCK_R), every segment.

    w_ptr W1 (O, C); ws_ptr W1 S (O, C), or with DECOMP (W1_i - Wbar) S and wbs_ptr
    Wbar S (C_t, C); g_ptr, b_ptr gamma1, beta1 (O,); o_ptr origin (C,), m_ptr the mean
    of the centred positions (C,), sig_ptr / inv_ptr sigma, 1/sigma (0-dim); a64_ptr a
    float64 scratch (O,) for a1.
    Phase 1 (per segment, over C): var1 = rowdot(W1 S, W1) >= 0 summed in float64,
    r1 = 1/sqrt(var1 + eps / sigma^2) and a1 = gamma1 r1 in float64 (a rounded a1 would
    scale a whole row of A by one relative error: docs/design.md section 3); the new
    running mean W1 (o + sigma m) and running variance sigma^2 var1 P/(P-1) (unbias);
    c1 = beta1 - a1 rowdot(W1, m).
    Phase 2 (per C slab, segments inside): A = a1 W1, each entry rounded once; with
    DECOMP Abar, the exact mean of the segments (float64) rounded, Aerr its rounding,
    DS_i = (a1_i - mean a1) Wbar S + a1_i dW_i S - mean_k a1_k dW_k S (from deviations),
    sum_i <A_i - Abar, DS_i> elementwise; rb = bbar - Abar m and its rounding rho
    (float64), rcoef = rho - Aerr m; beta1's deviations db from
    its float64 mean; part_ptr[j] = part_scale times the spread's, ||db||^2's and
    n rho^2's share of teacher row j.
    """
    pid = tl.program_id(0)
    j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mj = j < C_t
    sig = tl.load(sig_ptr)
    for i in range(n):
        rows = (i * C_t + j).to(tl.int64)
        var = tl.zeros((BLOCK_R,), dtype=tl.float64)
        mu = tl.zeros((BLOCK_R,), dtype=sig.dtype)
        wm = tl.zeros((BLOCK_R,), dtype=sig.dtype)
        for c0 in range(0, C, BLOCK_C):
            c, mc, mk, off = _slab(c0, rows, mj, C, BLOCK_C)
            w = tl.load(w_ptr + off, mask=mk, other=0.0)
            ws = tl.load(ws_ptr + off, mask=mk, other=0.0)
            if DECOMP:
                moff = j.to(tl.int64)[:, None] * C + c[None, :]
                ws += tl.load(wbs_ptr + moff, mask=mk, other=0.0)
            mean = tl.load(m_ptr + c, mask=mc, other=0.0)
            z = tl.load(o_ptr + c, mask=mc, other=0.0) + mean * sig
            var += tl.sum((w * ws).to(tl.float64), axis=1)
            mu += tl.sum(w * z[None, :], axis=1)
            wm += tl.sum(w * mean[None, :], axis=1)
        var = tl.maximum(var, 0.0)
        inv64 = tl.load(inv_ptr).to(tl.float64)     # (loaded here: nothing float64 stays
        r = 1.0 / tl.sqrt(var + eps * inv64 * inv64)  # live across the loop, sm_90 spilled)
        g = tl.load(g_ptr + rows, mask=mj, other=0.0)
        a = g.to(tl.float64) * r
        a1 = a.to(sig.dtype)
        tl.store(a64_ptr + rows, a, mask=mj)
        tl.store(a1_ptr + rows, a1, mask=mj)
        tl.store(c1_ptr + rows, tl.load(b_ptr + rows, mask=mj, other=0.0) - a1 * wm, mask=mj)
        tl.store(r1_ptr + rows, r.to(sig.dtype), mask=mj)
        tl.store(mean1_ptr + rows, mu, mask=mj)
        tl.store(var1u_ptr + rows, (var * (sig.to(tl.float64) * sig * unbias)).to(sig.dtype),
                 mask=mj)
    tl.debug_barrier()

    part = tl.zeros((BLOCK_R,), dtype=sig.dtype)
    if DECOMP:
        asum = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for i in range(n):
            asum += tl.load(a64_ptr + (i * C_t + j), mask=mj, other=0.0)
        amean = asum / n
        rbacc = tl.zeros((BLOCK_R,), dtype=tl.float64)
        errm = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mc = c < C
        mk = mj[:, None] & mc[None, :]
        moff = j.to(tl.int64)[:, None] * C + c[None, :]
        abar = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
        awsbar = tl.zeros((BLOCK_R, BLOCK_C), dtype=sig.dtype)
        for i in range(n):
            rows = (i * C_t + j).to(tl.int64)
            off = rows[:, None] * C + c[None, :]
            a = tl.load(a64_ptr + rows, mask=mj, other=0.0)
            p = tl.load(w_ptr + off, mask=mk, other=0.0).to(tl.float64) * a[:, None]
            tl.store(A_ptr + off, p.to(sig.dtype), mask=mk)
            if DECOMP:
                abar += p
                awsbar += a.to(sig.dtype)[:, None] * tl.load(ws_ptr + off, mask=mk, other=0.0)
        if DECOMP:
            abar = abar / n
            M = abar.to(sig.dtype)
            awsbar = awsbar / n
            tl.store(abar_ptr + moff, M, mask=mk)
            aerr = M.to(tl.float64) - abar
            tl.store(aerr_ptr + moff, aerr.to(sig.dtype), mask=mk)
            mc64 = tl.load(m_ptr + c, mask=mc, other=0.0).to(tl.float64)
            rbacc += tl.sum(tl.where(mk, M.to(tl.float64) * mc64[None, :], 0.0), axis=1)
            errm += tl.sum(tl.where(mk, aerr * mc64[None, :], 0.0), axis=1)
            wbs = tl.load(wbs_ptr + moff, mask=mk, other=0.0)
            for i in range(n):
                rows = (i * C_t + j).to(tl.int64)
                off = rows[:, None] * C + c[None, :]
                a = tl.load(a64_ptr + rows, mask=mj, other=0.0)
                w = tl.load(w_ptr + off, mask=mk, other=0.0)
                d = (w.to(tl.float64) * a[:, None]).to(sig.dtype) - M
                ds = (a.to(sig.dtype)[:, None] * tl.load(ws_ptr + off, mask=mk, other=0.0)
                      - awsbar) + (a - amean).to(sig.dtype)[:, None] * wbs
                tl.store(ds_ptr + off, ds, mask=mk)
                part += tl.sum(tl.where(mk, d * ds, 0.0), axis=1)
    if DECOMP:
        bsum = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for i in range(n):
            bsum += tl.load(b_ptr + i * C_t + j, mask=mj, other=0.0).to(tl.float64)
        bbar = bsum / n
        rb64 = bbar - rbacc
        rb = rb64.to(sig.dtype)
        tl.store(rb_ptr + j, rb, mask=mj)
        rho = rb.to(tl.float64) - rb64
        tl.store(rc_ptr + j, (rho - errm).to(sig.dtype), mask=mj)
        part += tl.where(mj, (n * rho * rho).to(sig.dtype), 0.0)
        for i in range(n):
            rows = i * C_t + j
            dbi = tl.where(mj, (tl.load(b_ptr + rows, mask=mj, other=0.0).to(tl.float64)
                                - bbar).to(sig.dtype), 0.0)
            tl.store(db_ptr + rows, dbi, mask=mj)
            part += dbi * dbi
        tl.store(part_ptr + j, part * part_scale, mask=mj)


@triton.jit
def _total_kernel(part_ptr, resid_ptr, aerr_ptr, g_ptr, rc_ptr, sr_ptr, out_ptr, C_t, CC,
                  ncoef, twoP, BLOCK: tl.constexpr):
    """One program: sum(part) + ncoef (resid - 2 P (<Aerr, G4> + <rcoef, SR>)), the sums
    in a fixed order (`ops/eager.decomposed_total`)."""
    dt = tl.load(part_ptr).dtype
    acc = tl.zeros((BLOCK,), dtype=dt)
    for k0 in range(0, CC, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        acc += tl.load(aerr_ptr + k, mask=k < CC, other=0.0) \
            * tl.load(g_ptr + k, mask=k < CC, other=0.0).to(dt)
    psum = tl.zeros((BLOCK,), dtype=dt)
    for k0 in range(0, C_t, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mk = k < C_t
        acc += tl.load(rc_ptr + k, mask=mk, other=0.0) \
            * tl.load(sr_ptr + k, mask=mk, other=0.0).to(dt)
        psum += tl.load(part_ptr + k, mask=mk, other=0.0)
    corr = tl.sum(acc, axis=0)
    total = tl.sum(psum, axis=0) + ncoef * (tl.load(resid_ptr) - twoP * corr)
    tl.store(out_ptr, total)


@triton.jit
def _centre_kernel(w_ptr, out_ptr, C, C_t, n, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[W1_i - Wbar; Wbar] (O + C_t, C) from W1 (O, C): program (pid_r, pid_c) owns a
    BLOCK_R x BLOCK_C tile of teacher rows for every segment (`ops/eager.centre_segments`)."""
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mj = j < C_t
    mk = mj[:, None] & (c < C)[None, :]
    moff = j.to(tl.int64)[:, None] * C + c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.load(w_ptr).dtype)
    for i in range(n):
        acc += tl.load(w_ptr + (i * C_t) * C + moff, mask=mk, other=0.0)
    wbar = acc / n
    for i in range(n):
        off = (i * C_t) * C + moff
        tl.store(out_ptr + off, tl.load(w_ptr + off, mask=mk, other=0.0) - wbar, mask=mk)
    tl.store(out_ptr + (n * C_t) * C + moff, wbar, mask=mk)


@triton.jit
def _expansion_bwd_kernel(
    ga_ptr, ga2_ptr, gabar_ptr, gsum_ptr, gout_ptr, w_ptr, ws_ptr, wbs_ptr, a1_ptr, r1_ptr,
    A_ptr, abar_ptr, ds_ptr, db_ptr, m_ptr,
    gw_ptr, gws_ptr, gg_ptr, gb_ptr, wv_ptr,
    C, C_t, n, P, coef,
    HAS_GA2: tl.constexpr, DECOMP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program pid: teacher rows j in [pid*BLOCK_R, +BLOCK_R), one segment after another.

    gl = gout_ptr[0] * coef (the loss gradient divided by C_t P), g_sp = 2 P gl,
    g_r = 2 n P gl. With G the total gradient of A, gA (+ gA2) (+ g_r gAbar / n + g_sp DS_i:
    the residual's, gAbar = G4 - SR m^T with G4 = sum_p R_p xc_p^T / P and SR = gsum,
    sum_p R_p / P, unscaled (the loss has 2 n P gl times them), and the spread's d/dA_i =
    2 D_i S), formed in the first pass and kept in gw_ptr until the second overwrites it:
        g_a1 = rowdot(G, W1), g_gamma1 = g_a1 r1, g_var = -a1 r1^2 g_a1 / 2
        gW1 = a1 G + 2 g_var W1 S,   gW1S = g_var W1 (+ P gl a1 (A_i - Abar))
        gbeta1 = g_r gsum / n + g_sp db                                  (DECOMP)
        wv = -(2 rowdot(gW1S, m) + a1 s) / P, s = g_r gsum / n (DECOMP) or gsum (the
             direct loss's dbeta1): W1^T wv is the gradient's constant per student
             channel, -(2 g_S m + Abar^T dbbar) / P (docs/design.md section 8)
    gW1S is the gradient of the product W1 S: the caller forms g_S = W1^T gW1S. With
    DECOMP W1 S is ws_ptr (the deviations' product) + wbs_ptr (Wbar S), as the forward took.
    gsum_ptr: sum_p R_p (C_t,) with DECOMP, else the direct loss's dbeta1 (O,).
    """
    pid = tl.program_id(0)
    j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mj = j < C_t
    gl = tl.load(gout_ptr).to(tl.load(w_ptr).dtype) * coef
    g_sp = gl * (2 * P)
    g_half = gl * P
    if DECOMP:
        g_rn = gl * (2 * P)
        sr = tl.load(gsum_ptr + j, mask=mj, other=0.0)
        gbb = sr * g_rn
    for i in range(n):
        rows = (i * C_t + j).to(tl.int64)
        a = tl.load(a1_ptr + rows, mask=mj, other=0.0)
        r = tl.load(r1_ptr + rows, mask=mj, other=0.0)
        ga1 = tl.zeros((BLOCK_R,), dtype=gl.dtype)
        for c0 in range(0, C, BLOCK_C):
            c, _, mk, off = _slab(c0, rows, mj, C, BLOCK_C)
            G = tl.load(ga_ptr + off, mask=mk, other=0.0)
            if HAS_GA2:
                G += tl.load(ga2_ptr + off, mask=mk, other=0.0)
            if DECOMP:
                moff = j.to(tl.int64)[:, None] * C + c[None, :]
                gab = tl.load(gabar_ptr + moff, mask=mk, other=0.0) \
                    - sr[:, None] * tl.load(m_ptr + c, mask=c < C, other=0.0)[None, :]
                G += gab * g_rn + g_sp * tl.load(ds_ptr + off, mask=mk, other=0.0)
            tl.store(gw_ptr + off, G, mask=mk)
            ga1 += tl.sum(G * tl.load(w_ptr + off, mask=mk, other=0.0), axis=1)
        tl.debug_barrier()
        tl.store(gg_ptr + rows, ga1 * r, mask=mj)
        gvar = ga1 * a * r * r * -0.5
        u = tl.zeros((BLOCK_R,), dtype=gl.dtype)
        for c0 in range(0, C, BLOCK_C):
            c, mc, mk, off = _slab(c0, rows, mj, C, BLOCK_C)
            G = tl.load(gw_ptr + off, mask=mk, other=0.0)
            w = tl.load(w_ptr + off, mask=mk, other=0.0)
            ws = tl.load(ws_ptr + off, mask=mk, other=0.0)
            if DECOMP:
                moff = j.to(tl.int64)[:, None] * C + c[None, :]
                ws += tl.load(wbs_ptr + moff, mask=mk, other=0.0)
            tl.store(gw_ptr + off, a[:, None] * G + (2 * gvar)[:, None] * ws, mask=mk)
            gws = gvar[:, None] * w
            if DECOMP:
                abar = tl.load(abar_ptr + moff, mask=mk, other=0.0)
                gws += (g_half * a)[:, None] * (tl.load(A_ptr + off, mask=mk, other=0.0) - abar)
            tl.store(gws_ptr + off, gws, mask=mk)
            u += tl.sum(gws * tl.load(m_ptr + c, mask=mc, other=0.0)[None, :], axis=1)
        if DECOMP:
            d = tl.load(db_ptr + rows, mask=mj, other=0.0)
            tl.store(gb_ptr + rows, gbb + g_sp * d, mask=mj)
            s = gbb
        else:
            s = tl.load(gsum_ptr + rows, mask=mj, other=0.0)
        tl.store(wv_ptr + rows, -(2 * u + a * s) / P, mask=mj)


def _blocks(C_t: int, C: int, dtype: torch.dtype, interpreted: bool) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps). Interpreter: blocks covering the problem (fewest
    programs). GPU: 16 rows x 128 columns (32 in float64: 128 and 64 spill 16-36 bytes in the
    decomposed backward, sm_90), 4 warps (elementwise tiles, 16 values a thread):
    C_t / 16 programs, each streaming its n * 16 rows of W1 and W1 S twice."""
    if interpreted:
        return tlaunch.pow2_block(C_t, 16, 64), tlaunch.pow2_block(C, 16, 256), 1
    return 16, tlaunch.pow2_block(C, 16, 32 if dtype == torch.float64 else 128), 4


def expansion_forward(W1: Tensor, W1S: Tensor, WbS: Tensor, gamma: Tensor, beta: Tensor,
                      origin: Tensor, mean: Tensor, sigma: Tensor, inv: Tensor, eps: float,
                      unbias: float, part_scale: float, n: int, decomposed: bool
                      ) -> Tuple[Tensor, ...]:
    """See `norm_fast.ops.eager.expansion_forward` (same arguments and results)."""
    O, C = W1.shape
    C_t = O // n
    dev, dt = W1.device, W1.dtype
    br, bc, warps = _blocks(C_t, C, dt, tlaunch.uses_interpreter(W1))
    # separate buffers (a custom op's results may not alias): allocations, no launches
    a1, r1, mean1, var1u, c1 = (torch.empty((O,), dtype=dt, device=dev) for _ in range(5))
    a64 = torch.empty((O,), dtype=torch.float64, device=dev)       # scratch
    A = torch.empty((O, C), dtype=dt, device=dev)
    shapes = ([(C_t, C), (O, C), (C_t, C), (C_t,), (C_t,), (O,), (C_t,)]
              if decomposed else [(0,)] * 7)
    abar, ds, aerr, rb, rc, db, part = (torch.empty(s, dtype=dt, device=dev) for s in shapes)
    tlaunch.launch(
        _expansion_fwd_kernel, (tlaunch.cdiv(C_t, br),),
        (W1, W1S, WbS if decomposed else W1S, gamma, beta, origin, mean, sigma, inv, a64,
         a1, r1, A, mean1, var1u, c1,
         *((abar, ds, aerr, rb, rc, db, part) if decomposed else (a1,) * 7),
         C, C_t, n, float(eps), float(unbias), float(part_scale)),
        dict(DECOMP=bool(decomposed), BLOCK_R=br, BLOCK_C=bc), dev, num_warps=warps,
        num_stages=1)
    return a1, r1, A, mean1, var1u, c1, abar, ds, aerr, rb, rc, db, part


def centre_segments(W1: Tensor, n: int) -> Tensor:
    """See `norm_fast.ops.eager.centre_segments` (same arguments and result)."""
    O, C = W1.shape
    C_t = O // n
    out = torch.empty((O + C_t, C), dtype=W1.dtype, device=W1.device)
    if tlaunch.uses_interpreter(W1):
        br, bc, warps = tlaunch.pow2_block(C_t, 16, 64), tlaunch.pow2_block(C, 16, 256), 1
    else:
        br, bc, warps = 16, 64, 4
    tlaunch.launch(_centre_kernel, (tlaunch.cdiv(C_t, br), tlaunch.cdiv(C, bc)),
                   (W1, out, C, C_t, n), dict(BLOCK_R=br, BLOCK_C=bc), W1.device,
                   num_warps=warps, num_stages=1)
    return out


def expansion_backward(gA: Tensor, gA2: Tensor, gAbar: Tensor, gsum: Tensor, g_out: Tensor,
                       coef: float, W1: Tensor, W1S: Tensor, WbS: Tensor, a1: Tensor,
                       r1: Tensor, A: Tensor, Abar: Tensor, DS: Tensor, db: Tensor,
                       mean: Tensor, P: int, n: int, decomposed: bool) -> Tuple[Tensor, ...]:
    """See `norm_fast.ops.eager.expansion_backward` (same arguments and results)."""
    O, C = W1.shape
    C_t = O // n
    dev, dt = W1.device, W1.dtype
    br, bc, warps = _blocks(C_t, C, dt, tlaunch.uses_interpreter(W1))
    gW1, gW1S = (torch.empty((O, C), dtype=dt, device=dev) for _ in range(2))
    gg, wv = (torch.empty((O,), dtype=dt, device=dev) for _ in range(2))
    gb = torch.empty((O,) if decomposed else (0,), dtype=dt, device=dev)
    has2 = gA2.numel() > 0
    dummy = gg
    tlaunch.launch(
        _expansion_bwd_kernel, (tlaunch.cdiv(C_t, br),),
        (gA.contiguous(), gA2 if has2 else dummy, gAbar.contiguous() if decomposed else dummy,
         gsum.contiguous(), g_out, W1, W1S, WbS if decomposed else dummy, a1, r1,
         A if decomposed else dummy, Abar if decomposed else dummy,
         DS if decomposed else dummy, db if decomposed else dummy, mean,
         gW1, gW1S, gg, gb if decomposed else dummy, wv, C, C_t, n, P, float(coef)),
        dict(HAS_GA2=has2, DECOMP=bool(decomposed), BLOCK_R=br, BLOCK_C=bc), dev,
        num_warps=warps, num_stages=1)
    return gW1, gW1S, gg, gb, wv


def decomposed_total(part: Tensor, resid: Tensor, Aerr: Tensor, G4: Tensor, rcoef: Tensor,
                     SR: Tensor, ncoef: float, P: int) -> Tensor:
    """See `norm_fast.ops.eager.decomposed_total` (same arguments and result)."""
    out = torch.empty((), dtype=part.dtype, device=part.device)
    block = 64 if tlaunch.uses_interpreter(part) else 1024
    tlaunch.launch(_total_kernel, (1,),
                   (part, resid, Aerr.contiguous(), G4.contiguous(), rcoef, SR.contiguous(),
                    out, part.shape[0], Aerr.numel(), float(ncoef), float(2 * P)),
                   dict(BLOCK=block), part.device, num_warps=4 if block > 64 else 1,
                   num_stages=1)
    return out
