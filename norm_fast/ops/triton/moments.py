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
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    ci = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    cj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = ci < C
    mask_j = cj < C
    ci64 = ci.to(tl.int64)
    cj64 = cj.to(tl.int64)
    s_i = tl.load(s_ptr + ci, mask=mask_i, other=0.0)
    s_j = tl.load(s_ptr + cj, mask=mask_j, other=0.0)

    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, ACC)
    row_sum = tl.full((BLOCK_I,), 0.0, ACC)
    start = pid_s * span
    for p0 in range(start, start + span, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        # int64 offsets: batch stride * B can pass 2**31.
        col = (p // L).to(tl.int64) * sxb + (p % L).to(tl.int64) * sxl
        m_ip = mask_i[:, None] & mask_p[None, :]
        m_pj = mask_p[:, None] & mask_j[None, :]
        # Shift on load; out-of-range entries must be 0 *after* the shift.
        xi = tl.load(x_ptr + ci64[:, None] * sxc + col[None, :], mask=m_ip, other=0.0)
        xi = tl.where(m_ip, xi.to(ACC) - s_i[:, None], 0.0)
        # The j tile is loaded already transposed, (BLOCK_P, BLOCK_J).
        xj = tl.load(x_ptr + col[:, None] + cj64[None, :] * sxc, mask=m_pj, other=0.0)
        xj = tl.where(m_pj, xj.to(ACC) - s_j[None, :], 0.0)
        acc += tl.dot(xi, xj, input_precision=PREC).to(ACC)
        row_sum += tl.sum(xi, axis=1)

    base = pid_s.to(tl.int64) * C * C
    tl.store(cov_ptr + base + ci64[:, None] * C + cj64[None, :], acc,
             mask=mask_i[:, None] & mask_j[None, :])
    # Only the first column of programs writes the row sums (same value everywhere).
    writer = (ci * 0 + pid_j) == 0
    tl.store(sum_ptr + pid_s.to(tl.int64) * C + ci64, row_sum, mask=mask_i & writer)


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


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean (C,) and biased covariance (C, C) of x (B, C, L) over its B*L positions.

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
    ybar = sum_part.sum(dim=0) / P
    cov = cov_part.sum(dim=0) / P - torch.outer(ybar, ybar)
    cov = (cov + cov.transpose(0, 1)) * 0.5
    return (s + ybar).to(cdt), cov.to(cdt)

