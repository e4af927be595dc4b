"""Triton kernels of the expand+MSE op: sum_i ||a_i (x - shift) + b_i - t||^2.

Contract: `norm_fast/ops/spec.py`, written out in `norm_fast/ops/eager.py` (same signatures, returns, dtypes). Sizes:

    x : (B, C_s, L) any strides     t : (B, C_t, L) any strides     P = B * L
    a : (n*C_t, C_s)                b : (n*C_t,)                    shift : (C_s,) or None
    E_i[:, p] = a_i (x[:, p] - shift) + b_i - t[:, p]      segment i = rows i*C_t:(i+1)*C_t

This is the literal (direct) form of the NORM loss of DESIGN.md section 1 with the
BatchNorm folded into (a, b) (section 3), and with n == 1 the decomposed algorithm's one
residual R = Abar Xc + bbar - T (section 4). Neither direction ever holds an
n*C_t*P tensor (section 5, last paragraph):

* forward: one fused kernel. A program owns a tile of positions and a tile of teacher
  channels; it loads its teacher tile once, and for each of the n segments forms
  a_i (x - shift) for that tile with tl.dot over C_s, subtracts the teacher tile, squares
  and accumulates. One partial sum per program, summed by torch (deterministic).
* backward: chunks of positions. A kernel recomputes the scaled error 2g*E of the chunk
  (n*C_t x chunk, at most `chunk_bytes`), the centred student chunk, and the teacher
  gradient of the chunk in the same pass; two GEMMs then give da and dx.

Accumulation is in the compute dtype: float64 for float64 inputs, float32 otherwise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as tlaunch
from ..spec import DEFAULT_CHUNK_BYTES, compute_dtype


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _x_slab(x_ptr, shift_ptr, k0, x_col, mask_cols, sxc, C_s,
            HAS_SHIFT: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_P) slab of the centred student, x[k0:k0+BLOCK_K, cols] - shift.

    x_col (BLOCK_P,) int64: offset of x[b, 0, l] of each column; mask_cols (BLOCK_P,).
    Rows past C_s read 0 and stay 0; masked columns hold -shift, which only ever meets
    masked-out outputs.
    """
    k = k0 + tl.arange(0, BLOCK_K)
    mask_k = k < C_s
    xt = tl.load(x_ptr + k.to(tl.int64)[:, None] * sxc + x_col[None, :],
                 mask=mask_k[:, None] & mask_cols[None, :], other=0.0).to(ACC)
    if HAS_SHIFT:
        s = tl.load(shift_ptr + k, mask=mask_k, other=0.0)
        xt = xt - s[:, None]
    return xt


@triton.jit
def _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, rows, mask_c, x_col, mask_cols, t_tile,
                   C_s, sxc,
                   HAS_SHIFT: tl.constexpr, ACC: tl.constexpr, RND: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The segment loop shared by both kernels: the (BLOCK_C, BLOCK_P) error tile

        E_i[c, p] = a[rows] (x[:, p] - shift) + b[rows] - t_tile      (ACC, unmasked)

    rows (BLOCK_C,) int64: rows of segment i in a / b (masked by mask_c); the product
    runs over C_s in BLOCK_K slabs with tl.dot. RND: operands rounded to the input dtype
    (16-bit inputs); DOT: the dtype tl.dot multiplies in; accumulation stays in ACC.
    """
    acc = tl.full((BLOCK_C, BLOCK_P), 0.0, ACC)
    for k0 in range(0, C_s, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a_tile = tl.load(a_ptr + rows[:, None] * C_s + k.to(tl.int64)[None, :],
                         mask=mask_c[:, None] & (k < C_s)[None, :], other=0.0)
        x_tile = _x_slab(x_ptr, shift_ptr, k0, x_col, mask_cols, sxc, C_s,
                         HAS_SHIFT, ACC, BLOCK_K)
        acc += tl.dot(a_tile.to(RND).to(DOT), x_tile.to(RND).to(DOT),
                      input_precision=PREC).to(ACC)
    bias = tl.load(b_ptr + rows, mask=mask_c, other=0.0)
    return acc + bias[:, None] - t_tile


@triton.jit
def _expand_mse_fwd_kernel(
    x_ptr, t_ptr, a_ptr, b_ptr, shift_ptr, part_ptr, err_ptr,
    L, P, C_s, C_t, n,
    sxb, sxc, sxl, stb, stc, stl,
    HAS_SHIFT: tl.constexpr, STORE_ERR: tl.constexpr,
    ACC: tl.constexpr, RND: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums of sum_i ||E_i||^2, one per program.

    Program (pid_p, pid_c) covers positions p in [pid_p*BLOCK_P, +BLOCK_P) (p = b*L + l)
    and teacher channels c in [pid_c*BLOCK_C, +BLOCK_C).

    x_ptr     (B, C_s, L)  strides (sxb, sxc, sxl), any float dtype
    t_ptr     (B, C_t, L)  strides (stb, stc, stl)
    a_ptr     (n*C_t, C_s) contiguous, ACC dtype;   b_ptr (n*C_t,) ACC
    shift_ptr (C_s,) ACC (read only when HAS_SHIFT)
    part_ptr  (grid_p * grid_c,) ACC: this program's sum of squares
    err_ptr   (B, C_t, L) contiguous, ACC: E when STORE_ERR (n == 1)

    Registers per program: two (BLOCK_C, BLOCK_P) ACC tiles (teacher, segment
    accumulator), a (BLOCK_C,) running sum of squares, one a tile and one x tile.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = p < P
    mask_c = c < C_t
    mask_cp = mask_c[:, None] & mask_p[None, :]
    # int64 offsets: batch stride * B can pass 2**31 for large feature maps.
    bi = (p // L).to(tl.int64)
    li = (p % L).to(tl.int64)
    c64 = c.to(tl.int64)
    x_col = bi * sxb + li * sxl  # (BLOCK_P,) offset of x[b, 0, l]

    # The teacher tile is read once and compared with all n segments.
    t_off = bi[None, :] * stb + c64[:, None] * stc + li[None, :] * stl
    t_tile = tl.load(t_ptr + t_off, mask=mask_cp, other=0.0).to(ACC)

    # Squares are reduced over positions after each segment: a (BLOCK_C,) running sum
    # instead of a third (BLOCK_C, BLOCK_P) tile keeps register pressure down on GPU.
    sq = tl.full((BLOCK_C,), 0.0, ACC)
    for i in range(n):
        e = _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, i * C_t + c64, mask_c, x_col,
                           mask_p, t_tile, C_s, sxc, HAS_SHIFT, ACC, RND, DOT, PREC,
                           BLOCK_C, BLOCK_P, BLOCK_K)
        e = tl.where(mask_cp, e, 0.0)
        sq += tl.sum(e * e, axis=1)
        if STORE_ERR:
            # n == 1: the decomposed algorithm's residual, reduced in this same pass.
            e_off = (bi[None, :] * C_t + c64[:, None]) * L + li[None, :]
            tl.store(err_ptr + e_off, e, mask=mask_cp)
    total = tl.sum(sq, axis=0)
    tl.store(part_ptr + pid_p * tl.num_programs(1) + pid_c, total)


@triton.jit
def _expand_mse_bwd_err_kernel(
    x_ptr, t_ptr, a_ptr, b_ptr, shift_ptr, g2_ptr, e_ptr, xc_ptr, dt_ptr,
    p0, Pc, L, C_s, C_t, n,
    sxb, sxc, sxl, stb, stc, stl,
    HAS_SHIFT: tl.constexpr, WRITE_E: tl.constexpr, WRITE_XC: tl.constexpr,
    WRITE_DT: tl.constexpr,
    ACC: tl.constexpr, RND: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Scaled error, centred student and teacher gradient of one position chunk.

    The chunk is positions p0 + q, q in [0, Pc); program (pid_p, pid_c) covers
    q in [pid_p*BLOCK_P, +BLOCK_P) and teacher channels [pid_c*BLOCK_C, +BLOCK_C).
    With g2 = 2 * grad (g2_ptr, one ACC value):

    e_ptr  (n*C_t, Pc) contiguous ACC: g2 * E_i[c, p0 + q] at row i*C_t + c (WRITE_E)
    xc_ptr (C_s, Pc)   contiguous ACC: x - shift of the chunk, written by the
                       pid_c == 0 programs (WRITE_XC)
    dt_ptr (B, C_t, L) contiguous, t's dtype: -g2 * sum_i E_i at p0 + q (WRITE_DT);
                       the teacher tile is loaded once for all segments.
    Other arguments as in `_expand_mse_fwd_kernel`.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_q = q < Pc
    mask_c = c < C_t
    mask_cq = mask_c[:, None] & mask_q[None, :]
    p = p0 + q
    bi = (p // L).to(tl.int64)
    li = (p % L).to(tl.int64)
    c64 = c.to(tl.int64)
    q64 = q.to(tl.int64)
    x_col = bi * sxb + li * sxl

    if WRITE_XC:
        if pid_c == 0:  # one writer per position tile
            for k0 in range(0, C_s, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xt = _x_slab(x_ptr, shift_ptr, k0, x_col, mask_q, sxc, C_s, HAS_SHIFT, ACC,
                             BLOCK_K)
                tl.store(xc_ptr + k.to(tl.int64)[:, None] * Pc + q64[None, :], xt,
                         mask=(k < C_s)[:, None] & mask_q[None, :])

    t_off = bi[None, :] * stb + c64[:, None] * stc + li[None, :] * stl
    t_tile = tl.load(t_ptr + t_off, mask=mask_cq, other=0.0).to(ACC)
    g2 = tl.load(g2_ptr)

    e_sum = tl.full((BLOCK_C, BLOCK_P), 0.0, ACC)
    for i in range(n):
        rows = i * C_t + c64
        e = _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, rows, mask_c, x_col, mask_q,
                           t_tile, C_s, sxc, HAS_SHIFT, ACC, RND, DOT, PREC,
                           BLOCK_C, BLOCK_P, BLOCK_K)
        e = tl.where(mask_cq, e * g2, 0.0)
        e_sum += e
        if WRITE_E:
            tl.store(e_ptr + rows[:, None] * Pc + q64[None, :], e, mask=mask_cq)
    if WRITE_DT:
        dt_off = (bi[None, :] * C_t + c64[:, None]) * L + li[None, :]
        tl.store(dt_ptr + dt_off, (-e_sum).to(dt_ptr.dtype.element_ty), mask=mask_cq)


# ---------------------------------------------------------------------------------------
# Block sizes
# ---------------------------------------------------------------------------------------


def _blocks(P: int, C_s: int, C_t: int, dtype: torch.dtype, interpreted: bool):
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps) of both expand kernels; fixed, no autotune.

    Interpreter: every tl op is one numpy call, so cost ~ (number of programs) x (ops per
    program); the largest blocks that cover the problem win (up to 256/128/128).
    GPU (H100/H200): a program holds the teacher tile and the segment accumulator
    (BLOCK_C x BLOCK_P each) plus 64-bit pointer tiles for every load/store, so register
    pressure, not shared memory, is the limit. Chosen so that ptxas (sm_90a, Triton 3.6)
    reports no or negligible spills for both kernels:
      float32  ("ieee": FMA dot, whose K slab lives in registers): 64 x 64, K 16, 8 warps
               (fwd 201 regs; bwd 255 regs + 16 B stack; K 32 or 4 warps spill KBs);
      16-bit   (tensor cores, wgmma on sm_90):                       64 x 64, K 32, 8 warps
               (fwd 192 regs, bwd 254; 128-position tiles spill in the backward);
      float64  (DMMA):                                               64 x 32, K 16, 8 warps
               (fwd 150 regs, bwd 255, no spill).
    Not yet timed on a GPU: retune there. Every block is clamped to the power of two
    covering its dimension (>= 16, tl.dot's minimum) so small channel counts do not pay
    for empty rows.
    """
    if interpreted:
        return (tlaunch.pow2_block(P, 16, 256), tlaunch.pow2_block(C_t, 16, 128),
                tlaunch.pow2_block(C_s, 16, 128), 1)
    if dtype == torch.float64:
        bp, bc, bk = 64, 32, 16
    elif dtype == torch.float32:
        bp, bc, bk = 64, 64, 16
    else:
        bp, bc, bk = 64, 64, 32
    return (tlaunch.pow2_block(P, 16, bp), tlaunch.pow2_block(C_t, 16, bc),
            tlaunch.pow2_block(C_s, 16, bk), 8)


def _common(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor]):
    """Compute dtype, kernel dtypes and compute-dtype copies of the small operands."""
    cdt = compute_dtype(x.dtype)
    interpreted = tlaunch.uses_interpreter(x)
    rnd, dot, prec = tlaunch.dot_dtypes(x.dtype, interpreted)
    a_c = a.to(cdt).contiguous()
    b_c = b.to(cdt).contiguous()
    s_c = shift.to(cdt).contiguous() if shift is not None else b_c  # dummy pointer
    consts = dict(HAS_SHIFT=shift is not None, ACC=tlaunch.tl_dtype(cdt), RND=rnd, DOT=dot,
                  PREC=prec)
    return cdt, interpreted, a_c, b_c, s_c, consts


# ---------------------------------------------------------------------------------------
# Forward / backward helpers
# ---------------------------------------------------------------------------------------


def expand_mse_forward(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
                       n: int, store_error: bool,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, Tensor]:
    """sum_i ||a_i (x - shift) + b_i - t||^2 over all positions, in one fused pass.

    x (B, C_s, L), t (B, C_t, L): any strides; a (n*C_t, C_s); b (n*C_t,); shift (C_s,)
    or None. Returns (sq, err): sq 0-dim in the compute dtype; err (B, C_t, L) in the
    compute dtype when `store_error` (n == 1 only), else an empty tensor.

    Memory: the kernel keeps every expanded value in registers, so besides `err` it
    writes only one partial sum per program; `chunk_bytes` is accepted for parity with
    the torch kernel set and has nothing to bound here.
    """
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    cdt, interpreted, a_c, b_c, s_c, consts = _common(x, t, a, b, shift)
    if store_error and n != 1:
        raise ValueError(f"store_error needs n == 1 (one residual), got n={n}")
    err = (torch.empty((B, C_t, L), dtype=cdt, device=x.device) if store_error
           else x.new_empty((0,), dtype=cdt))
    if P == 0 or C_t == 0 or n == 0:
        if store_error:
            err.zero_()
        return torch.zeros((), dtype=cdt, device=x.device), err
    bp, bc, bk, warps = _blocks(P, C_s, C_t, x.dtype, interpreted)
    grid = (tlaunch.cdiv(P, bp), tlaunch.cdiv(C_t, bc))
    part = torch.empty(grid[0] * grid[1], dtype=cdt, device=x.device)
    tlaunch.launch(
        _expand_mse_fwd_kernel, grid,
        (x, t, a_c, b_c, s_c, part, err if store_error else part,
         L, P, C_s, C_t, n, *x.stride(), *t.stride()),
        dict(STORE_ERR=store_error, BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk, **consts),
        x.device, num_warps=warps)
    return part.sum(), err


def expand_mse_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                        shift: Optional[Tensor], n: int, err: Optional[Tensor],
                        grad_mask: List[bool],
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, ...]:
    """Gradients of g * expand_mse_forward(...)[0], g = `grad` (0-dim).

    grad_mask = [x, t, a, b, shift]. Returns (dx, dt, da, db, dshift): dx (B, C_s, L) in
    x's dtype, dt (B, C_t, L) in t's dtype, da (n*C_t, C_s), db (n*C_t,), dshift (C_s,)
    in the compute dtype; an unwanted one is an empty tensor. With E the error:
        da = 2g sum_p E xc^T    db = 2g sum_p E    dx = 2g a^T E
        dt = -2g sum_i E_i      dshift = -sum_p dx = -a^T db

    Why chunks and GEMMs rather than one recompute kernel: da needs a reduction over
    all P positions and dx one over all n*C_t expanded channels. A single kernel gridded
    over positions would have to combine da across programs with atomics (not
    deterministic) or, gridded so that one program owns a (C_s tile, positions) block of
    dx, recompute E once per C_s tile. Chunking over positions recomputes E exactly
    once, in a kernel that also writes the centred student chunk and finishes dt (the
    teacher tile loaded once for all segments), and leaves the two contractions
        da += E_chunk @ xc_chunk^T      (n*C_t, C_s)
        dx[chunk] = E_chunk^T @ a       (chunk, C_s)  -- the sum over n*C_t does the
                                                          segment sum
    to cuBLAS GEMMs (tensor cores for 16-bit inputs). Memory: at most `chunk_bytes` of error (at least one
    position) plus C_s * chunk for the centred student; never n*C_t*P.

    `err` (n == 1): the error stored by the forward; then nothing is recomputed.
    """
    want_x, want_t, want_a, want_b, want_s = grad_mask
    want_s = want_s and shift is not None
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    K = n * C_t
    cdt, interpreted, a_c, b_c, s_c, consts = _common(x, t, a, b, shift)
    dev = x.device
    g2 = (2 * grad.to(device=dev, dtype=cdt)).reshape(1)
    empty = x.new_empty((0,), dtype=cdt)

    if err is not None:
        return _backward_from_error(g2, x, t, a_c, shift, err, cdt,
                                    (want_x, want_t, want_a, want_b, want_s), empty)

    need_e = want_x or want_a or want_b or want_s
    dt = torch.empty((B, C_t, L), dtype=t.dtype, device=dev) if want_t else None
    # dx is gathered position-major, (P, C_s): each chunk's GEMM writes a contiguous
    # row block; the final transpose to (B, C_s, L) is one copy of dx.
    dx_pc = torch.empty((P, C_s), dtype=cdt, device=dev) if want_x else None
    da = torch.zeros((K, C_s), dtype=cdt, device=dev) if want_a else None
    e_rowsum = torch.zeros((K,), dtype=cdt, device=dev) if (want_b or want_s) else None

    if P > 0 and C_t > 0 and (need_e or want_t):
        itemsize = torch.finfo(cdt).bits // 8
        if need_e and K > 0:
            pc = max(1, min(P, chunk_bytes // (K * itemsize)))
        else:
            pc = P  # only dt: no error buffer, one launch over every position
        bp, bc, bk, warps = _blocks(pc, C_s, C_t, x.dtype, interpreted)
        if need_e and pc > bp:
            pc -= pc % bp  # whole position tiles per chunk
        e_buf = torch.empty(K * pc, dtype=cdt, device=dev) if need_e else None
        xc_buf = torch.empty(C_s * pc, dtype=cdt, device=dev) if want_a else None
        for p0 in range(0, P, pc):
            pcur = min(pc, P - p0)
            e = e_buf[:K * pcur].view(K, pcur) if need_e else None
            xc = xc_buf[:C_s * pcur].view(C_s, pcur) if want_a else None
            grid = (tlaunch.cdiv(pcur, bp), tlaunch.cdiv(C_t, bc))
            tlaunch.launch(
                _expand_mse_bwd_err_kernel, grid,
                (x, t, a_c, b_c, s_c, g2,
                 e if need_e else g2, xc if want_a else g2, dt if want_t else g2,
                 p0, pcur, L, C_s, C_t, n, *x.stride(), *t.stride()),
                dict(WRITE_E=need_e, WRITE_XC=want_a, WRITE_DT=want_t,
                     BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk, **consts),
                dev, num_warps=warps)
            if da is not None:
                da.addmm_(e, xc.t())
            if e_rowsum is not None:
                e_rowsum += e.sum(dim=1)
            if dx_pc is not None:
                torch.mm(e.t(), a_c, out=dx_pc[p0:p0 + pcur])
    elif want_t:
        dt.zero_()
    if dx_pc is not None and (P == 0 or C_t == 0 or n == 0):
        dx_pc.zero_()

    dx = empty
    if want_x:
        dx = torch.empty((B, C_s, L), dtype=x.dtype, device=dev)
        dx.copy_(dx_pc.view(B, L, C_s).transpose(1, 2))  # transpose and cast in one pass
    return (
        dx,
        dt if want_t else empty,
        da if want_a else empty,
        e_rowsum if want_b else empty,
        -(a_c.t() @ e_rowsum) if want_s else empty,
    )


def _backward_from_error(g2: Tensor, x: Tensor, t: Tensor, a_c: Tensor,
                         shift: Optional[Tensor], err: Tensor, cdt: torch.dtype,
                         wants, empty: Tensor) -> Tuple[Tensor, ...]:
    """Backward with the stored error err (B, C_t, L) (n == 1): GEMMs only.

    err holds E unscaled, so each product is scaled by g2 = 2g afterwards (the small
    ones: da, db, dshift) or on the way out (dx, dt: one elementwise pass each).
    """
    want_x, want_t, want_a, want_b, want_s = wants
    e = err.to(cdt)
    xc = None
    if want_a:
        xc = x.to(cdt)
        if shift is not None:
            xc = xc - shift.to(cdt)[None, :, None]
    esum = e.sum(dim=(0, 2)) if (want_b or want_s) else None
    g = g2[0]
    return (
        (torch.matmul(a_c.t(), e) * g).to(x.dtype) if want_x else empty,
        (e * (-g)).to(t.dtype) if want_t else empty,
        torch.tensordot(e, xc, dims=([0, 2], [0, 2])) * g if want_a else empty,
        esum * g if want_b else empty,
        -(a_c.t() @ esum) * g if want_s else empty,
    )
