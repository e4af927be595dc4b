"""Triton kernel of the first two moments of the student positions.

    x : (B, C, L) any strides, P = B * L positions
    moments(x) -> mean (C,), biased covariance S (C, C), both in the compute dtype

These feed the BatchNorm statistics of the expansion without the expanded tensor
(docs/design.md section 3: mean(Z) = W1 xbar, var(Z) = diag(W1 S W1^T)) and the spread term
of the decomposed loss (section 4).

Numerics: `G/P - xbar xbar^T` cancels catastrophically when the mean is large against
the spread, which is the normal case for post-ReLU features (section 3). The kernel works
on *shifted* data: with a per-channel shift s and y = x - s,

    xbar = s + ybar,     S = sum_p y y^T / P - ybar ybar^T,      ybar = sum_p y / P

is exact for any s, and accurate when |ybar| is small against the spread. The shift is
the mean itself, from a bandwidth-bound reduction before the kernel, so ybar is pure
rounding and the correction term vanishes: the covariance is as accurate as a two-pass
centred product. (A sample shift such as x[0, :, 0] saves that read but leaves |ybar|
about one spread; measured, it cost 4x in the covariance's float32 error, which the
BatchNorm scale a1 = gamma / sqrt(diag(W1 S W1^T)) passes straight into the residual of
the decomposed loss near convergence.) The kernel itself reads x once.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import eager
from ..spec import compute_dtype
from . import launch as tlaunch


@triton.jit
def _pair_tiles(C, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """The channel tiles of program (pid_i, pid_j): ci, cj, their masks, int64 copies."""
    ci = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    cj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    return ci, cj, ci < C, cj < C, ci.to(tl.int64), cj.to(tl.int64)


@triton.jit
def _position_slab(p0, P, L, sxb, sxl, mask_i, mask_j, BLOCK_P: tl.constexpr):
    """Positions p0 + [0, BLOCK_P) (p = b*L + l): b, l (int64; batch stride * B can pass
    2**31), the offsets b*sxb + l*sxl, and the masks of the (i, p) and (p, j) tiles."""
    p = p0 + tl.arange(0, BLOCK_P)
    mask_p = p < P
    b = (p // L).to(tl.int64)
    l = (p % L).to(tl.int64)
    return (b, l, b * sxb + l * sxl, mask_i[:, None] & mask_p[None, :],
            mask_p[:, None] & mask_j[None, :])


@triton.jit
def _store_partials(cov_ptr, sum_ptr, acc, row_sum, ci, ci64, cj64, mask_i, mask_j, C):
    """This split's Gram tile, and (first column of programs only: the same value
    everywhere) its row sums."""
    pid_s = tl.program_id(2)
    base = pid_s.to(tl.int64) * C * C
    tl.store(cov_ptr + base + ci64[:, None] * C + cj64[None, :], acc,
             mask=mask_i[:, None] & mask_j[None, :])
    writer = (ci * 0 + tl.program_id(1)) == 0
    tl.store(sum_ptr + pid_s.to(tl.int64) * C + ci64, row_sum, mask=mask_i & writer)


@triton.jit
def _moments_kernel(
    x_ptr, s_ptr, cov_ptr, sum_ptr,
    L, P, C, span,
    sxb, sxc, sxl,
    ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partial shifted moments of one (channel tile, channel tile, position split).

    Program (pid_i, pid_j, pid_s) covers channels i in [pid_i*BLOCK_I, +BLOCK_I),
    j in [pid_j*BLOCK_J, +BLOCK_J) and positions [pid_s*span, +span) (span is a multiple
    of BLOCK_P; p = b*L + l).

    x_ptr   (B, C, L) strides (sxb, sxc, sxl), any float dtype
    s_ptr   (C,) ACC: the shift s
    cov_ptr (splits, C, C) ACC: sum_p (x_i - s_i)(x_j - s_j) over this split
    sum_ptr (splits, C) ACC: sum_p (x_i - s_i), written by the pid_j == 0 programs
    """
    ci, cj, mask_i, mask_j, ci64, cj64 = _pair_tiles(C, BLOCK_I, BLOCK_J)
    s_i = tl.load(s_ptr + ci, mask=mask_i, other=0.0)
    s_j = tl.load(s_ptr + cj, mask=mask_j, other=0.0)

    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, ACC)
    row_sum = tl.full((BLOCK_I,), 0.0, ACC)
    start = tl.program_id(2) * span
    for p0 in range(start, start + span, BLOCK_P):
        _, _, col, m_ip, m_pj = _position_slab(p0, P, L, sxb, sxl, mask_i, mask_j, BLOCK_P)
        # Shift on load; out-of-range entries must be 0 *after* the shift.
        xi = tl.load(x_ptr + ci64[:, None] * sxc + col[None, :], mask=m_ip, other=0.0)
        xi = tl.where(m_ip, xi.to(ACC) - s_i[:, None], 0.0)
        # The j tile is loaded already transposed, (BLOCK_P, BLOCK_J).
        xj = tl.load(x_ptr + col[:, None] + cj64[None, :] * sxc, mask=m_pj, other=0.0)
        xj = tl.where(m_pj, xj.to(ACC) - s_j[None, :], 0.0)
        acc += tl.dot(xi, xj, input_precision=PREC).to(ACC)
        row_sum += tl.sum(xi, axis=1)
    _store_partials(cov_ptr, sum_ptr, acc, row_sum, ci, ci64, cj64, mask_i, mask_j, C)


def _blocks(P: int, C: int, interpreted: bool):
    """(BLOCK_I, BLOCK_J, BLOCK_P, splits, num_warps); fixed heuristics, no autotune.

    Interpreter: one split, blocks covering the problem (up to 128 channels, 512
    positions per step): fewest programs and numpy calls.
    GPU (H100/H200, 132 SMs): 64 x 64 channel tiles, 32 positions per dot step, 8 warps
    (ptxas, sm_90a: 162 registers in float32, 194 in float64, no spills; the float32
    "ieee" dot is FMA), and position splits until about two programs per SM are
    running; a split never gets fewer than 512 positions. Not yet timed on a GPU.
    """
    if interpreted:
        bc = tlaunch.pow2_block(C, 16, 128)
        return bc, bc, tlaunch.pow2_block(P, 16, 512), 1, 1
    bc = tlaunch.pow2_block(C, 16, 64)
    bp = 32
    tiles = tlaunch.cdiv(C, bc) ** 2
    splits = max(1, min(tlaunch.cdiv(264, tiles), P // 512))
    return bc, bc, bp, splits, 8


@triton.jit
def _channel_stats_kernel(
    x_ptr, sum_ptr, amax_ptr, L, P, C, sxb, sxc, sxl,
    AMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per channel c of x (B, C, L): sum_ptr[c] = sum_p x (float64: exact for a constant
    channel, so the origin sum / P centres it to exactly zero), amax_ptr[c] = max_p |x|
    (AMAX: the compute dtype). Program pid: channels [pid*BLOCK_C, +BLOCK_C)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    c64 = c.to(tl.int64)
    s = tl.zeros((BLOCK_C,), dtype=tl.float64)
    mx = tl.zeros((BLOCK_C,), dtype=AMAX)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        col = (p // L).to(tl.int64) * sxb + (p % L).to(tl.int64) * sxl
        m2 = mc[:, None] & (p < P)[None, :]
        v = tl.load(x_ptr + c64[:, None] * sxc + col[None, :], mask=m2, other=0.0)
        s += tl.sum(v.to(tl.float64), axis=1)
        mx = tl.maximum(mx, tl.max(tl.abs(v.to(AMAX)), axis=1))
    tl.store(sum_ptr + c, s, mask=mc)
    tl.store(amax_ptr + c, mx, mask=mc)


@triton.jit
def _range_scale(amax_ptr, C, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """(sigma, 1/sigma) in CDT from the channel maxima: sigma = 2^k, k = max(0, e - 50)
    for max |x| = m 2^e, m in [0.5, 1) (`algebra.range_scale`; k = 0 when the maximum is
    not finite), both built from their exponent bits: exact powers of two."""
    a = tl.zeros((BLOCK,), dtype=CDT)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        a = tl.maximum(a, tl.load(amax_ptr + c, mask=c < C, other=0.0))
    top = tl.max(a, axis=0)
    if CDT == tl.float64:
        ef = (top.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        k = tl.where(ef == 0x7FF, 0, tl.maximum(ef - 1022 - 50, 0))
        sigma = ((k + 1023) << 52).to(tl.float64, bitcast=True)
        inv = ((1023 - k) << 52).to(tl.float64, bitcast=True)
    else:
        ef = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF
        k = tl.where(ef == 0xFF, 0, tl.maximum(ef - 126 - 50, 0))
        sigma = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return sigma, inv


@triton.jit
def _centred_tile(x_ptr, off, mask, o, inv, XDT: tl.constexpr, CDT: tl.constexpr):
    """(x - o) / sigma of one tile, rounded to x's dtype as it is stored (the moments are
    of the stored values)."""
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(CDT)
    return ((v - o) * inv).to(XDT)


@triton.jit
def _centred_moments_kernel(
    x_ptr, sum_ptr, amax_ptr, xc_ptr, cov_ptr, rsum_ptr,
    L, P, C, span,
    sxb, sxc, sxl,
    XDT: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    DOT16: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """`_moments_kernel` on xc = (x - origin) / sigma, formed on load, origin = sum / P
    (`_channel_stats_kernel`), sigma `_range_scale`; the diagonal programs
    (pid_i == pid_j) also store xc (B, C, L) contiguous for the ops that follow, so x is
    read once here and xc never needs a pass of its own. Partials as `_moments_kernel`
    with no shift (xc is centred up to rounding)."""
    ci, cj, mask_i, mask_j, ci64, cj64 = _pair_tiles(C, BLOCK_I, BLOCK_J)
    _, inv = _range_scale(amax_ptr, C, CDT, 128)
    o_i = (tl.load(sum_ptr + ci, mask=mask_i, other=0.0) / P).to(CDT)
    o_j = (tl.load(sum_ptr + cj, mask=mask_j, other=0.0) / P).to(CDT)
    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, ACC)
    row_sum = tl.full((BLOCK_I,), 0.0, ACC)
    start = tl.program_id(2) * span
    for p0 in range(start, start + span, BLOCK_P):
        b, l, col, m_ip, m_pj = _position_slab(p0, P, L, sxb, sxl, mask_i, mask_j, BLOCK_P)
        yi = _centred_tile(x_ptr, ci64[:, None] * sxc + col[None, :], m_ip, o_i[:, None], inv,
                           XDT, CDT)
        if tl.program_id(0) == tl.program_id(1):
            tl.store(xc_ptr + (b[None, :] * C + ci64[:, None]) * L + l[None, :], yi,
                     mask=m_ip)
        yj = _centred_tile(x_ptr, col[:, None] + cj64[None, :] * sxc, m_pj, o_j[None, :], inv,
                           XDT, CDT)
        if DOT16:
            # Slabs: each BLOCK_P slab is summed on tensor cores in float32, the slabs in
            # float64. 16-bit xc: its products are exact in float32 (a float64 dot of
            # 16-bit values does not compile for sm_90 with Triton 3.6); float32 xc under
            # the plan's "tf32x3" Gram (PREC): three TF32 products, about float32
            # accuracy per slab (docs/design.md section 6).
            yi = tl.where(m_ip, yi, tl.zeros_like(yi))
            yj = tl.where(m_pj, yj, tl.zeros_like(yj))
            acc += tl.dot(yi, yj, input_precision=PREC).to(ACC)
            row_sum += tl.sum(yi.to(ACC), axis=1)
        else:
            yi = tl.where(m_ip, yi.to(ACC), 0.0)
            yj = tl.where(m_pj, yj.to(ACC), 0.0)
            acc += tl.dot(yi, yj, input_precision=PREC).to(ACC)
            row_sum += tl.sum(yi, axis=1)
    _store_partials(cov_ptr, rsum_ptr, acc, row_sum, ci, ci64, cj64, mask_i, mask_j, C)


@triton.jit
def _moments_finalize_kernel(
    cov_part, rsum_part, shift_ptr, sum_ptr, amax_ptr, mean_ptr, cov_ptr, o_ptr, scales_ptr,
    splits, P, C,
    CENTRED: tl.constexpr, CDT: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The partials of the position splits reduced (fixed order: deterministic):
    ybar = sum_s rsum / P, cov = (G + G^T) / (2P) - ybar ybar^T (exactly symmetric), in
    float64, stored in CDT; mean = shift + ybar (shift_ptr, float64), or with CENTRED
    mean = ybar, and also the origin sum / P and (sigma, 1/sigma) of `_range_scale`."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ci, cj, mask_i, mask_j, ci64, cj64 = _pair_tiles(C, BLOCK_I, BLOCK_J)
    m2 = mask_i[:, None] & mask_j[None, :]
    g = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    si = tl.zeros((BLOCK_I,), dtype=tl.float64)
    sj = tl.zeros((BLOCK_J,), dtype=tl.float64)
    for s in range(0, splits):
        base = s * C * C
        g += tl.load(cov_part + base + ci64[:, None] * C + cj64[None, :], mask=m2, other=0.0)
        g += tl.load(cov_part + base + cj64[None, :] * C + ci64[:, None], mask=m2, other=0.0)
        si += tl.load(rsum_part + s * C + ci64, mask=mask_i, other=0.0)
        sj += tl.load(rsum_part + s * C + cj64, mask=mask_j, other=0.0)
    yi = si / P
    yj = sj / P
    cov = g * 0.5 / P - yi[:, None] * yj[None, :]
    tl.store(cov_ptr + ci64[:, None] * C + cj64[None, :], cov.to(CDT), mask=m2)
    if pid_j == 0:
        if CENTRED:
            tl.store(mean_ptr + ci, yi.to(CDT), mask=mask_i)
            o = tl.load(sum_ptr + ci, mask=mask_i, other=0.0) / P
            tl.store(o_ptr + ci, o.to(CDT), mask=mask_i)
            if pid_i == 0:
                sigma, inv = _range_scale(amax_ptr, C, CDT, 128)
                tl.store(scales_ptr, sigma)
                tl.store(scales_ptr + 1, inv)
        else:
            sh = tl.load(shift_ptr + ci, mask=mask_i, other=0.0)
            tl.store(mean_ptr + ci, (sh + yi).to(CDT), mask=mask_i)


def _finalize_blocks(C: int, interpreted: bool) -> int:
    return tlaunch.pow2_block(C, 16, 128 if interpreted else 32)


def moments(x: Tensor, precision: str = "float64") -> Tuple[Tensor, Tensor]:
    """Mean (C,) and biased covariance (C, C) of x (B, C, L) over its B*L positions.
    (The composed route's moments: float64 FMA dots whatever `precision` says, at least
    as accurate as any plan; `norm_fast.precision.ran_in` reports it.)

    A mean reduction, then one read of x (any strides) by the shifted kernel (see the
    module docstring);
    the per-split partials are reduced by torch (deterministic, no atomics). The
    covariance is returned exactly symmetric ((S + S^T)/2: floating-point addition is
    commutative). Accumulated in float64 for every input dtype; returned in the compute
    dtype (float64 for float64 x, else float32). No TF32 whatever the flags say.
    """
    B, C, L = x.shape
    P = B * L
    if P == 0 or C == 0:
        return eager.moments(x)
    cdt = compute_dtype(x.dtype)
    interpreted = tlaunch.uses_interpreter(x)
    # Accumulated in float64 whatever the input (docs/design.md section 3): the Gram sum
    # over P positions is where a float32 covariance loses most, and on sm_90 a float64
    # dot (DMMA) runs at the float32 FMA rate the "ieee" dot would use anyway.
    acc = torch.float64
    if x.dtype in (torch.float16, torch.bfloat16):
        # Widened first (exact; one pass over C x P values): Triton 3.6, the GPU machine's,
        # cannot compile a float64 dot of 16-bit loads for sm_90 ("fp64 don't support
        # largeK MMA"; benchmarks/register_table.py run with Triton 3.6 shows it).
        x = x.float()
    s = x.sum(dim=(0, 2), dtype=acc) / P                  # the shift: the mean
    bi, bj, bp, splits, warps = _blocks(P, C, interpreted)
    span = tlaunch.cdiv(tlaunch.cdiv(P, splits), bp) * bp
    splits = tlaunch.cdiv(P, span)
    cov_part = torch.empty((splits, C, C), dtype=acc, device=x.device)
    sum_part = torch.empty((splits, C), dtype=acc, device=x.device)
    grid = (tlaunch.cdiv(C, bi), tlaunch.cdiv(C, bj), splits)
    tlaunch.launch(
        _moments_kernel, grid,
        (x, s, cov_part, sum_part, L, P, C, span, *x.stride()),
        dict(ACC=tlaunch.tl_dtype(acc), PREC="ieee", BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bp),
        x.device, num_warps=warps)
    mean = torch.empty((C,), dtype=cdt, device=x.device)
    cov = torch.empty((C, C), dtype=cdt, device=x.device)
    bf = _finalize_blocks(C, interpreted)
    tlaunch.launch(
        _moments_finalize_kernel, (tlaunch.cdiv(C, bf), tlaunch.cdiv(C, bf)),
        (cov_part, sum_part, s, s, s, mean, cov, mean, mean, splits, P, C),
        dict(CENTRED=False, CDT=tlaunch.tl_dtype(cdt), BLOCK_I=bf, BLOCK_J=bf), x.device,
        num_warps=4)
    return mean, cov


def centred_moments(x: Tensor, precision: str = "float64") -> Tuple[Tensor, ...]:
    """See `norm_fast.ops.eager.centred_moments`: (xc, origin, scales, mean, cov) in
    three launches: the channel sums and maxima, the centring moments kernel (which
    writes xc as it reads x), the reduction of its partials. precision (the plan's
    "gram"): "float64" float64 FMA dots for float32 x; "tf32x3" slabs of BLOCK_P
    positions in 3xTF32, summed in float64 (16-bit x: exact tensor-core slabs either way;
    the interpreter multiplies exactly whatever it says)."""
    B, C, L = x.shape
    P = B * L
    cdt = compute_dtype(x.dtype)
    dev = x.device
    interpreted = tlaunch.uses_interpreter(x)
    xc = torch.empty((B, C, L), dtype=x.dtype, device=dev)
    origin = torch.empty((C,), dtype=cdt, device=dev)
    scales = torch.empty((2,), dtype=cdt, device=dev)
    mean = torch.empty((C,), dtype=cdt, device=dev)
    cov = torch.empty((C, C), dtype=cdt, device=dev)
    if P == 0 or C == 0:
        return eager.centred_moments(x)
    sums = torch.empty((C,), dtype=torch.float64, device=dev)
    amax = torch.empty((C,), dtype=cdt, device=dev)
    bcs = tlaunch.pow2_block(C, 1, 16) if not interpreted else tlaunch.pow2_block(C, 1, 128)
    tlaunch.launch(
        _channel_stats_kernel, (tlaunch.cdiv(C, bcs),),
        (x, sums, amax, L, P, C, *x.stride()),
        dict(AMAX=tlaunch.tl_dtype(cdt), BLOCK_C=bcs,
             # GPU: 16 x 128 tiles (x 256 spills 8 bytes in float32 with Triton 3.6)
             BLOCK_P=tlaunch.pow2_block(P, 16, 512 if interpreted else 128)),
        dev, num_warps=4)
    acc = torch.float64
    # the interpreter's dot misreads 16-bit operands (launch.dot_dtypes) and multiplies
    # float32 exactly: there the float64 branch
    half = x.dtype in (torch.float16, torch.bfloat16) and not interpreted
    slab3 = precision == "tf32x3" and x.dtype == torch.float32 and not interpreted
    if precision not in ("float64", "tf32x3", "ieee"):
        raise ValueError(f"the moments kernel's Gram precision must be 'float64' or "
                         f"'tf32x3', got {precision!r}")
    bi, bj, bp, splits, warps = _blocks(P, C, interpreted)
    if x.dtype == torch.float64 and not interpreted:
        bp = 16  # float64 tiles: 32 positions spill 36 bytes (sm_90, Triton 3.9)
    span = tlaunch.cdiv(tlaunch.cdiv(P, splits), bp) * bp
    splits = tlaunch.cdiv(P, span)
    cov_part = torch.empty((splits, C, C), dtype=acc, device=dev)
    sum_part = torch.empty((splits, C), dtype=acc, device=dev)
    tlaunch.launch(
        _centred_moments_kernel, (tlaunch.cdiv(C, bi), tlaunch.cdiv(C, bj), splits),
        (x, sums, amax, xc, cov_part, sum_part, L, P, C, span, *x.stride()),
        dict(XDT=tlaunch.tl_dtype(x.dtype), CDT=tlaunch.tl_dtype(cdt),
             ACC=tlaunch.tl_dtype(acc), PREC="tf32x3" if slab3 else ("tf32" if half else "ieee"),
             DOT16=(half or slab3),
             BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bp),
        dev, num_warps=warps)
    bf = _finalize_blocks(C, interpreted)
    tlaunch.launch(
        _moments_finalize_kernel, (tlaunch.cdiv(C, bf), tlaunch.cdiv(C, bf)),
        (cov_part, sum_part, sums, sums, amax, mean, cov, origin, scales, splits, P, C),
        dict(CENTRED=True, CDT=tlaunch.tl_dtype(cdt), BLOCK_I=bf, BLOCK_J=bf), dev,
        num_warps=4)
    return xc, origin, scales, mean, cov

