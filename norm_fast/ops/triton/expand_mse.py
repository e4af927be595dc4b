"""Triton kernels of the expand+MSE op: sum_i ||a_i (x - shift) + b_i - t||^2.

Contract: `norm_fast/ops/spec.py`, written out in `norm_fast/ops/eager.py` (same
signatures, returns, dtypes; plus the `precision` keyword below). Sizes:

    x : (B, C_s, L) any strides     t : (B, C_t, L) any strides     P = B * L
    a : (n*C_t, C_s)                b : (n*C_t,)                    shift : (C_s,) or None
    E_i[:, p] = a_i (x[:, p] - shift) + b_i - t[:, p]      segment i = rows i*C_t:(i+1)*C_t

This is the literal (direct) form of the NORM loss of docs/design.md section 1 with the
BatchNorm folded into (a, b) (section 3), and with n == 1 the decomposed algorithm's one
residual R = Abar Xc + bbar - T (section 4). Neither direction ever holds an
n*C_t*P tensor (section 5, last paragraph):

* forward: one fused kernel. A program owns a tile of positions and a tile of teacher
  channels; it loads its teacher tile once, and for each of the n segments forms
  a_i (x - shift) for that tile with tl.dot over C_s (`_segment_error`, shared with the
  backward), subtracts the teacher tile, squares and accumulates. One partial sum per
  program, summed by torch (deterministic).
* backward: chunks of positions. A kernel recomputes the error E of the chunk
  (n*C_t x chunk, at most `chunk_bytes`), the centred student chunk, and the teacher
  gradient of the chunk in the same pass; two GEMMs then give da and dx.

Loop order. For a fixed (position tile, channel tile) the x K-slabs are the same for
every segment, so the ideal is to read each once. Holding all of them needs C_s x
BLOCK_P values (C_s = 2048, 64 positions: 512 KB in float32), far beyond registers or
shared memory (228 KB per SM); swapping the loops (K outside, segments inside) would
instead need n accumulator tiles. So: when C_s fits one K slab (C_s <= BLOCK_K) the slab
is loaded once and kept in registers for all segments (X_RESIDENT); otherwise each
segment re-reads the slabs, which hit L2 (one position tile's x panel is C_s * BLOCK_P
elements, read by grid_c * n programs close together in time).

Addressing. L (the spatial size) is a compile-time constant, so `p // L`, `p % L` are
multiply-shifts and the compiler sees runs of consecutive l; with unit stride along l
(X_CONTIG / T_CONTIG) the x and t tiles load 16 bytes a thread when L has a power-of-two
factor (e.g. 32x32, 56x56 maps; not 7x7). One compiled variant per distinct L.

Precision. Accumulation is in the compute dtype: float64 for float64 inputs, float32
otherwise. float32 products follow `precision` ("ieee" exact, "tf32" tensor cores,
"tf32x3"); 16-bit inputs multiply 16-bit operands on tensor cores, in the kernels and in
the backward's GEMMs (E and a rounded once to the input dtype; x as it is, its shift
folded into the bias: `_common`, docs/design.md section 3). The moments kernel
(covariance, precision-sensitive) is always exact. The interpreter (CPU tensors) always
multiplies exactly.

Tuning. On CUDA the block sizes are autotuned per kernel over a small pruned set
(`GPU_CONFIGS`, all spill-free on sm_90), keyed on (position-count bucket, C_s, C_t, n,
dtypes, compile-time constants); see `autotune_enabled` for the first-call cost, the
determinism switch and CUDA-graph capture. The interpreter uses its own large blocks.
"""
from __future__ import annotations

import inspect
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as tlaunch
from ..spec import DEFAULT_CHUNK_BYTES, check_store_error, compute_dtype, gemm_precision


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
def _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, x_res, rows, mask_c, x_col, mask_cols,
                   t_tile, C_s, sxc,
                   HAS_SHIFT: tl.constexpr, X_RESIDENT: tl.constexpr, ACC: tl.constexpr,
                   RND: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The segment loop shared by both kernels: the (BLOCK_C, BLOCK_P) error tile

        E_i[c, p] = a[rows] (x[:, p] - shift) + b[rows] - t_tile      (ACC, unmasked)

    rows (BLOCK_C,) int64: rows of segment i in a / b (masked by mask_c). The product
    runs over C_s in BLOCK_K slabs with tl.dot; with X_RESIDENT (C_s <= BLOCK_K) the one
    slab is `x_res`, loaded by the caller once for all segments, else each slab is
    re-read here (from L2: the x panel of one position tile is C_s * BLOCK_P elements).
    RND: operands rounded to the input dtype (16-bit inputs); DOT: the dtype tl.dot
    multiplies in; PREC its input_precision; accumulation stays in ACC.
    """
    if X_RESIDENT:
        k = tl.arange(0, BLOCK_K)
        a_tile = tl.load(a_ptr + rows[:, None] * C_s + k[None, :],
                         mask=mask_c[:, None] & (k < C_s)[None, :], other=0.0)
        acc = tl.dot(a_tile.to(RND).to(DOT), x_res.to(RND).to(DOT),
                     input_precision=PREC).to(ACC)
    else:
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
def _tile(p0, n_pos, C_t, sxb, sxl, stb, stl, L: tl.constexpr, X_CONTIG: tl.constexpr,
          T_CONTIG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: positions p0 + q, q in [pid_p*BLOCK_P, +BLOCK_P) of n_pos, and
    teacher channels c in [pid_c*BLOCK_C, +BLOCK_C) of C_t. Returns q, c64 (int64), the
    masks of q, c and of the (BLOCK_C, BLOCK_P) tile, (b, l) of each position and the
    offsets of x[b, 0, l] and t[b, 0, l] (int64: batch stride * B can pass 2**31)."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_q = q < n_pos
    mask_c = c < C_t
    bi, li, x_col = _positions(p0 + q, L, sxb, sxl, X_CONTIG)
    _, _, t_col = _positions(p0 + q, L, stb, stl, T_CONTIG)
    return (q, c.to(tl.int64), mask_q, mask_c, mask_c[:, None] & mask_q[None, :], bi, li,
            x_col, t_col)


@triton.jit
def _positions(pos, L: tl.constexpr, sb, sl, L_CONTIG: tl.constexpr):
    """(b, l) of flat positions pos = b*L + l, and the offsets b*sb + l*sl (int64).

    L is a compile-time constant: `pos // L` and `pos % L` become multiply-shifts, and
    the compiler's contiguity analysis sees runs of gcd(BLOCK_P, L's power-of-two
    factor) consecutive l; with L_CONTIG (sl == 1, asserted by the caller) those runs
    are consecutive addresses, so the loads vectorise (up to 16 bytes a thread).
    """
    bi = (pos // L).to(tl.int64)
    li = (pos % L).to(tl.int64)
    if L_CONTIG:
        off = bi * sb + li
    else:
        off = bi * sb + li * sl
    return bi, li, off


@triton.jit
def _expand_mse_fwd_kernel(
    x_ptr, t_ptr, a_ptr, b_ptr, shift_ptr, part_ptr, err_ptr,
    P, C_s, C_t, n, P_BUCKET,
    sxb, sxc, sxl, stb, stc, stl,
    L: tl.constexpr, X_CONTIG: tl.constexpr, T_CONTIG: tl.constexpr,
    HAS_SHIFT: tl.constexpr, STORE_ERR: tl.constexpr, X_RESIDENT: tl.constexpr,
    ACC: tl.constexpr, RND: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums of sum_i ||E_i||^2, one per program.

    Program (pid_p, pid_c) covers positions p in [pid_p*BLOCK_P, +BLOCK_P) (p = b*L + l)
    and teacher channels c in [pid_c*BLOCK_C, +BLOCK_C).

    x_ptr     (B, C_s, L)  strides (sxb, sxc, sxl), any float dtype (sxl == 1: X_CONTIG)
    t_ptr     (B, C_t, L)  strides (stb, stc, stl)                   (stl == 1: T_CONTIG)
    a_ptr     (n*C_t, C_s) contiguous, ACC or (16-bit inputs) the input dtype
    b_ptr     (n*C_t,) ACC;  shift_ptr (C_s,) ACC (read only when HAS_SHIFT)
    part_ptr  (grid_p * grid_c,) ACC: this program's sum of squares
    err_ptr   (B, C_t, L) contiguous, ACC: E when STORE_ERR (n == 1)
    P_BUCKET  unused: the autotuner's key for the position count (powers of two).

    Registers per program: two (BLOCK_C, BLOCK_P) ACC tiles (teacher, segment
    accumulator), a (BLOCK_C,) running sum of squares, one a tile and one x tile (kept
    across segments when X_RESIDENT).
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    _, c64, mask_p, mask_c, mask_cp, bi, li, x_col, t_col = _tile(
        0, P, C_t, sxb, sxl, stb, stl, L, X_CONTIG, T_CONTIG, BLOCK_P, BLOCK_C)

    # The teacher tile is read once and compared with all n segments.
    t_tile = tl.load(t_ptr + c64[:, None] * stc + t_col[None, :], mask=mask_cp,
                     other=0.0).to(ACC)
    if X_RESIDENT:  # C_s fits one K slab: read x once for all segments
        x_res = _x_slab(x_ptr, shift_ptr, 0, x_col, mask_p, sxc, C_s, HAS_SHIFT, ACC,
                        BLOCK_K)
    else:
        x_res = 0.0

    # Squares are reduced over positions after each segment: a (BLOCK_C,) running sum
    # instead of a third (BLOCK_C, BLOCK_P) tile keeps register pressure down on GPU.
    sq = tl.full((BLOCK_C,), 0.0, ACC)
    for i in range(n):
        e = _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, x_res, i * C_t + c64, mask_c,
                           x_col, mask_p, t_tile, C_s, sxc, HAS_SHIFT, X_RESIDENT, ACC, RND,
                           DOT, PREC, BLOCK_C, BLOCK_P, BLOCK_K)
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
    p0, Pc, C_s, C_t, n, P_BUCKET,
    sxb, sxc, sxl, stb, stc, stl,
    L: tl.constexpr, X_CONTIG: tl.constexpr, T_CONTIG: tl.constexpr,
    HAS_SHIFT: tl.constexpr, WRITE_E: tl.constexpr, WRITE_XC: tl.constexpr,
    WRITE_DT: tl.constexpr, E_BKL: tl.constexpr, X_RESIDENT: tl.constexpr,
    ACC: tl.constexpr, RND: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Scaled error, centred student and teacher gradient of one position chunk.

    The chunk is positions p0 + q, q in [0, Pc); program (pid_p, pid_c) covers
    q in [pid_p*BLOCK_P, +BLOCK_P) and teacher channels [pid_c*BLOCK_C, +BLOCK_C).
    With g2 = 2 * grad (g2_ptr, one ACC value):

    e_ptr  (n*C_t, Pc) contiguous: g2 * E_i[c, p0 + q] at row i*C_t + c (WRITE_E),
                       or with E_BKL (p0 == 0) (B, n*C_t, L) contiguous, [b, i*C_t + c, l],
                       computed in ACC and rounded to e_ptr's dtype (the input dtype for
                       16-bit inputs: the GEMMs that read it then run on tensor cores)
    xc_ptr (C_s, Pc)   contiguous: x - shift of the chunk in xc_ptr's dtype (as e_ptr),
                       written by the pid_c == 0 programs (WRITE_XC)
    dt_ptr (B, C_t, L) contiguous, t's dtype: -g2 * sum_i E_i at p0 + q (WRITE_DT);
                       the teacher tile is loaded once for all segments.
    Other arguments as in `_expand_mse_fwd_kernel`.
    """
    pid_c = tl.program_id(1)
    q, c64, mask_q, mask_c, mask_cq, bi, li, x_col, t_col = _tile(
        p0, Pc, C_t, sxb, sxl, stb, stl, L, X_CONTIG, T_CONTIG, BLOCK_P, BLOCK_C)
    q64 = q.to(tl.int64)

    if X_RESIDENT:
        x_res = _x_slab(x_ptr, shift_ptr, 0, x_col, mask_q, sxc, C_s, HAS_SHIFT, ACC,
                        BLOCK_K)
    else:
        x_res = 0.0
    if WRITE_XC:
        if pid_c == 0:  # one writer per position tile
            for k0 in range(0, C_s, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                if X_RESIDENT:
                    xt = x_res
                else:
                    xt = _x_slab(x_ptr, shift_ptr, k0, x_col, mask_q, sxc, C_s, HAS_SHIFT,
                                 ACC, BLOCK_K)
                tl.store(xc_ptr + k.to(tl.int64)[:, None] * Pc + q64[None, :],
                         xt.to(xc_ptr.dtype.element_ty),
                         mask=(k < C_s)[:, None] & mask_q[None, :])

    t_tile = tl.load(t_ptr + c64[:, None] * stc + t_col[None, :], mask=mask_cq,
                     other=0.0).to(ACC)
    g2 = tl.load(g2_ptr)

    e_sum = tl.full((BLOCK_C, BLOCK_P), 0.0, ACC)
    for i in range(n):
        rows = i * C_t + c64
        e = _segment_error(x_ptr, a_ptr, b_ptr, shift_ptr, x_res, rows, mask_c, x_col,
                           mask_q, t_tile, C_s, sxc, HAS_SHIFT, X_RESIDENT, ACC, RND, DOT,
                           PREC, BLOCK_C, BLOCK_P, BLOCK_K)
        e = tl.where(mask_cq, e * g2, 0.0)
        e_sum += e
        if WRITE_E:
            if E_BKL:  # (B, n*C_t, L), the layout of a convolution's output gradient
                e_off = (bi[None, :] * (n * C_t) + rows[:, None]) * L + li[None, :]
            else:
                e_off = rows[:, None] * Pc + q64[None, :]
            tl.store(e_ptr + e_off, e.to(e_ptr.dtype.element_ty), mask=mask_cq)
    if WRITE_DT:
        dt_off = (bi[None, :] * C_t + c64[:, None]) * L + li[None, :]
        tl.store(dt_ptr + dt_off, (-e_sum).to(dt_ptr.dtype.element_ty), mask=mask_cq)


# ---------------------------------------------------------------------------------------
# Block sizes: the interpreter's, the GPU default, and the autotuned set
# ---------------------------------------------------------------------------------------

# GPU configurations (BLOCK_P, BLOCK_C, BLOCK_K, num_warps, num_stages) per kernel and
# input dtype; the first of each list is the default (used when autotuning is off). Every
# one compiles for sm_90 without register spills with Triton 3.6 and 3.9, x resident or
# not, for every float32 precision
# (tests/test_triton_ops.py::test_gpu_configs_compile_without_spills).
# Registers, not shared memory, limit these kernels: a program holds the teacher tile
# and the segment accumulator (BLOCK_C x BLOCK_P each, ACC; the backward a third, the
# running error sum for dt) plus 64-bit address tiles. "ieee" float32 dots are FMA loops
# whose K slab lives in registers: K 16. 16-bit runs on tensor cores (wgmma on sm_90).
# Measured and left out (spill bytes, Triton 3.9 / 3.6): 16-bit 128x128x32 (fwd 832 /
# -, bwd 3796 / -), fwd 64x128x32 s3 (0 / 32), fwd 64x64x64 s3 (0 / 112), bwd 128x64x32
# (312 / -), float32 fwd 128x32x16 s2 (0 / 16); so 16-bit tiles stop at 128 x 64.
GPU_CONFIGS = {
    "fwd": {
        torch.float32: [(64, 64, 16, 8, 2), (128, 32, 16, 8, 1), (32, 64, 16, 8, 2)],
        torch.bfloat16: [(64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 32, 8, 3)],
        torch.float64: [(64, 32, 16, 8, 2), (32, 32, 16, 4, 2)],
    },
    "bwd": {
        torch.float32: [(64, 32, 16, 8, 2), (32, 64, 16, 8, 2), (32, 32, 16, 4, 2)],
        torch.bfloat16: [(64, 64, 32, 8, 2), (64, 64, 32, 8, 3), (128, 32, 32, 8, 2)],
        torch.float64: [(64, 32, 16, 8, 2), (32, 32, 16, 4, 2)],
    },
}
for _kind in GPU_CONFIGS.values():
    _kind[torch.float16] = _kind[torch.bfloat16]

_AUTOTUNE_ENV = "NORM_FAST_TRITON_AUTOTUNE"


def autotune_enabled() -> bool:
    """Autotuning of the GPU block sizes: on unless NORM_FAST_TRITON_AUTOTUNE=0.

    Cost: the first launch for each new key (position-count bucket, C_s, C_t, n, dtypes,
    L and the other compile-time constants in `_TUNE_KEY`) compiles every configuration of
    the dtype that survives the pruning (at most 5) and times each with
    `triton.testing.do_bench` (about 25 ms of warm-up + 100 ms of repetitions each): on
    the order of a second per key, once per process (with ``cache_results`` the choice
    is also kept in Triton's cache directory and reused by later processes). For a key,
    the choice is fixed for the life of the process; different processes or DDP ranks
    may pick differently (timing noise), which changes the loss only by rounding (the
    number of partial sums and the K order). Set NORM_FAST_TRITON_AUTOTUNE=0 for
    bitwise-reproducible runs (the first, default configuration always).
    CUDA graphs: autotuning launches and synchronises, so capture a graph only after
    one eager warm-up forward+backward at the captured shapes.
    """
    return os.environ.get(_AUTOTUNE_ENV, "1") != "0"


def _clamp(P: int, C_s: int, C_t: int, cfg):
    """A configuration with each block clamped to the power of two covering its dimension
    (>= 16, tl.dot's minimum), so small channel counts do not pay for empty rows."""
    bp, bc, bk, warps, stages = cfg
    return (tlaunch.pow2_block(P, 16, bp), tlaunch.pow2_block(C_t, 16, bc),
            tlaunch.pow2_block(C_s, 16, bk), warps, stages)


def _blocks(P: int, C_s: int, C_t: int, dtype: torch.dtype, interpreted: bool,
            kind: str = "fwd"):
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps, num_stages) without autotuning.

    Interpreter: every tl op is one numpy call, so cost ~ (number of programs) x (ops per
    program); the largest blocks that cover the problem win (up to 256/128/128).
    GPU: the default configuration of `GPU_CONFIGS[kind]` ("fwd" or "bwd"), clamped (see
    `_clamp`).
    """
    if interpreted:
        return (tlaunch.pow2_block(P, 16, 256), tlaunch.pow2_block(C_t, 16, 128),
                tlaunch.pow2_block(C_s, 16, 128), 1, 1)
    return _clamp(P, C_s, C_t, GPU_CONFIGS[kind][dtype][0])


def _prune(configs, named_args, **kwargs):
    """The autotuner's pruning: the kernel's list for the input dtype, clamped to the
    problem, deduplicated."""
    x = named_args["x_ptr"]
    kind = "fwd" if "P" in named_args else "bwd"
    P = named_args["P"] if kind == "fwd" else named_args["Pc"]
    C_s, C_t = named_args["C_s"], named_args["C_t"]
    wanted = {_clamp(P, C_s, C_t, cfg) for cfg in GPU_CONFIGS[kind][x.dtype]}
    out = [c for c in configs if _config_tuple(c) in wanted]
    return out or configs[:1]


def _config_tuple(c):
    k = c.kwargs
    return (k["BLOCK_P"], k["BLOCK_C"], k["BLOCK_K"], c.num_warps, c.num_stages)


def _all_configs():
    """Every clamped variant of every listed configuration, as triton.Config objects."""
    seen = set()
    for cfgs in (c for kind in GPU_CONFIGS.values() for c in kind.values()):
        for bp, bc, bk, warps, stages in cfgs:
            for p2 in (16, 32, 64, 128):
                for c2 in (16, 32, 64, 128):
                    for k2 in (16, 32, 64):
                        seen.add((min(bp, p2), min(bc, c2), min(bk, k2), warps, stages))
    return [triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk), num_warps=w,
                          num_stages=st, maxnreg=tlaunch.MAXNREG)
            for bp, bc, bk, w, st in sorted(seen)]


def _with_residency(kernel):
    """X_RESIDENT = (C_s <= BLOCK_K), decided per configuration."""
    return triton.heuristics({"X_RESIDENT": lambda a: a["C_s"] <= a["BLOCK_K"]})(kernel)


# The autotuner's key: sizes, and the compile-time constants that change the work (Triton
# adds the dtypes of the tensor arguments itself).
_TUNE_KEY = ["P_BUCKET", "C_s", "C_t", "n", "L", "X_CONTIG", "T_CONTIG", "HAS_SHIFT", "PREC"]
_TUNE_FLAGS = {"_expand_mse_fwd_kernel": ["STORE_ERR"],
               "_expand_mse_bwd_err_kernel": ["WRITE_E", "WRITE_XC", "WRITE_DT", "E_BKL"]}


def _tuned(kernel):
    kw = dict(configs=_all_configs(), key=_TUNE_KEY + _TUNE_FLAGS[kernel.fn.__name__],
              prune_configs_by={"early_config_prune": _prune})
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True
    return triton.autotune(**kw)(_with_residency(kernel))


_TUNED = {}


def _launch(kernel, kind: str, P: int, C_s: int, C_t: int, args, consts, device,
            interpreted: bool, dtype: torch.dtype, grid_of):
    """Launch `kernel` with the interpreter's blocks, the GPU default or the autotuner.

    grid_of(BLOCK_P, BLOCK_C) -> grid. Returns the (BLOCK_P, BLOCK_C) used.
    """
    if interpreted or not autotune_enabled():
        bp, bc, bk, warps, stages = _blocks(P, C_s, C_t, dtype, interpreted, kind)
        tlaunch.launch(kernel, grid_of(bp, bc), args,
                       dict(consts, BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk,
                            X_RESIDENT=C_s <= bk),
                       device, num_warps=warps, num_stages=stages,
                       maxnreg=tlaunch.MAXNREG)
        return bp, bc
    tuned = _TUNED.get(kernel)
    if tuned is None:
        tuned = _TUNED[kernel] = _tuned(kernel)
    tlaunch.launch(tuned, lambda meta: grid_of(meta["BLOCK_P"], meta["BLOCK_C"]), args,
                   consts, device, num_warps=None)
    best = tuned.best_config.kwargs
    return best["BLOCK_P"], best["BLOCK_C"]


def _p_bucket(P: int) -> int:
    return triton.next_power_of_2(max(1, P))


def _common(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
            precision: str):
    """Compute dtype, kernel constants and the small operands as the kernels read them.

    a is handed to the kernels in the input dtype for 16-bit inputs (rounded once here,
    not per tile; half the bytes), else in the compute dtype.

    16-bit inputs: the shift is folded into the bias, a (x - shift) + b = a x + (b - a shift)
    (HAS_SHIFT off), so the tensor-core operand is x itself, exact in its dtype. Rounding
    x - shift to 16 bits instead gives every equal value of a channel (the zeros of a
    ReLU map: often half of them) the same rounding error, an error in Y that does not
    average out over positions: 3.6e-3 relative loss error in bfloat16 against the
    literal's 1.1e-5 (docs/design.md section 3). The centring buys no accuracy here:
    x carries 2^-8 relative error already, and a x accumulates in float32 as the
    literal's convolution does (same range).
    """
    cdt = compute_dtype(x.dtype)
    interpreted = tlaunch.uses_interpreter(x)
    rnd, dot, prec = tlaunch.dot_dtypes(x.dtype, interpreted, precision)
    half = x.dtype in _HALF
    a_k = a.to(x.dtype if half else cdt).contiguous()
    b_c = b.to(cdt)
    kernel_shift = shift is not None and not half
    if shift is not None and half:
        b_c = b_c - a_k.to(cdt) @ shift.to(cdt)
    b_c = b_c.contiguous()
    s_c = shift.to(cdt).contiguous() if kernel_shift else b_c  # else a dummy pointer
    consts = dict(L=x.shape[2], X_CONTIG=x.stride(2) == 1, T_CONTIG=t.stride(2) == 1,
                  HAS_SHIFT=kernel_shift, ACC=tlaunch.tl_dtype(cdt), RND=rnd, DOT=dot,
                  PREC=prec)
    return cdt, interpreted, a_k, b_c, s_c, consts


_HALF = (torch.float16, torch.bfloat16)


def _mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """a @ b accumulated and returned in float32 when the operands are 16-bit.

    CUDA: cuBLAS with 16-bit operands on tensor cores, float32 accumulation and output
    (``out_dtype``). Elsewhere ``mm.dtype`` does not exist: the operands are widened
    exactly to float32 first, the same products.
    """
    if a.dtype in _HALF:
        if a.is_cuda:
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        a, b = a.float(), b.float()
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


# ---------------------------------------------------------------------------------------
# Forward / backward helpers
# ---------------------------------------------------------------------------------------


def expand_mse_forward(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
                       n: int, store_error: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """sum_i ||a_i (x - shift) + b_i - t||^2 over all positions, in one fused pass.

    x (B, C_s, L), t (B, C_t, L): any strides; a (n*C_t, C_s); b (n*C_t,); shift (C_s,)
    or None. Returns (sq, err): sq 0-dim in the compute dtype; err (B, C_t, L) in the
    compute dtype when `store_error` (n == 1 only), else an empty tensor.

    precision: "ieee" | "tf32" | "tf32x3", the input precision of the P-sized products
    for float32 inputs on CUDA ("tf32": tensor cores, 10-bit mantissa operands;
    "tf32x3": three TF32 products, about float32 accuracy). Ignored for 16-bit inputs
    (tensor cores anyway) and float64, and under the interpreter (CPU tensors), which
    always multiplies exactly.

    Memory: the kernel keeps every expanded value in registers, so besides `err` it
    writes only one partial sum per program; `chunk_bytes` is accepted for parity with
    the torch kernel set and has nothing to bound here.
    """
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    cdt, interpreted, a_k, b_c, s_c, consts = _common(x, t, a, b, shift, precision)
    check_store_error(n, store_error)
    err = (torch.empty((B, C_t, L), dtype=cdt, device=x.device) if store_error
           else x.new_empty((0,), dtype=cdt))
    if P == 0 or C_t == 0 or n == 0:
        if store_error:
            err.zero_()
        return torch.zeros((), dtype=cdt, device=x.device), err
    # Sized for the smallest tiles any configuration may use (16 x 16, see `_clamp`); the
    # programs of the configuration that runs fill the first grid_p * grid_c entries.
    part = torch.empty(tlaunch.cdiv(P, 16) * tlaunch.cdiv(C_t, 16), dtype=cdt,
                       device=x.device)
    bp, bc = _launch(
        _expand_mse_fwd_kernel, "fwd", P, C_s, C_t,
        (x, t, a_k, b_c, s_c, part, err if store_error else part,
         P, C_s, C_t, n, _p_bucket(P), *x.stride(), *t.stride()),
        dict(STORE_ERR=store_error, **consts), x.device, interpreted, x.dtype,
        lambda bp, bc: (tlaunch.cdiv(P, bp), tlaunch.cdiv(C_t, bc)))
    return part[:tlaunch.cdiv(P, bp) * tlaunch.cdiv(C_t, bc)].sum(), err


def expand_mse_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                        shift: Optional[Tensor], n: int, err: Optional[Tensor],
                        grad_mask: List[bool], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        precision: str = "ieee", grad_precision: Optional[str] = None
                        ) -> Tuple[Tensor, ...]:
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
    to cuBLAS GEMMs. For 16-bit inputs 2g*E, x and a are held in the input dtype (E
    computed in float32 and rounded once on store; x exact, the shift folded into the
    bias by `_common` and taken out of da as the rank-one -(2g sum_p E) shift^T) and the GEMMs accumulate in float32
    on tensor cores (`_mm`). The error is stored scaled by 2g (no extra launches to scale
    the results): in float16, 2g*E falls below the normal range (6e-5) when the loss
    gradient is tiny, exactly as the literal's float16 gradient dY = 2g(Y - T) does under
    autocast; a GradScaler keeps both in range.
    Memory: at most `chunk_bytes` of error (at least one position) plus C_s * chunk for
    the centred student; never n*C_t*P.

    `err` (n == 1): the error stored by the forward; then nothing is recomputed.
    precision: as in `expand_mse_forward`, for the recomputing kernel's products;
    grad_precision (default `precision`) for the cuBLAS GEMMs (float32 on CUDA:
    `gemm_precision`, TF32 for "tf32", IEEE for every other).
    """
    want_x, want_t, want_a, want_b, want_s = grad_mask
    want_s = want_s and shift is not None
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    K = n * C_t
    cdt, interpreted, a_k, b_c, s_c, consts = _common(x, t, a, b, shift, precision)
    dev = x.device
    g2 = (2 * grad.to(device=dev, dtype=cdt)).reshape(1)
    empty = x.new_empty((0,), dtype=cdt)
    # The dtype of the GEMM operands E, xc, a (see the docstring).
    gdt = x.dtype if x.dtype in _HALF else cdt

    # The two GEMMs below are cuBLAS's: in float32 they follow `precision` too.
    with gemm_precision(dev, x.dtype, grad_precision or precision):
        if err is not None:
            return _backward_from_error(g2, x, t, a_k, shift, err, cdt, gdt,
                                        (want_x, want_t, want_a, want_b, want_s), empty)

        need_e = want_x or want_a or want_b or want_s
        dt = torch.empty((B, C_t, L), dtype=t.dtype, device=dev) if want_t else None
        # dx is gathered position-major, (P, C_s): each chunk's GEMM writes a contiguous
        # row block; the final transpose to (B, C_s, L) is one copy of dx.
        dx_pc = torch.empty((P, C_s), dtype=cdt, device=dev) if want_x else None
        da = torch.zeros((K, C_s), dtype=cdt, device=dev) if want_a else None
        # shift folded into the bias (16-bit, `_common`): the kernel writes x, not x - shift,
        # and da = 2g sum_p E x^T - (2g sum_p E) shift^T.
        folded = shift is not None and not consts["HAS_SHIFT"]
        e_rowsum = (torch.zeros((K,), dtype=cdt, device=dev)
                    if (want_b or want_s or (want_a and folded)) else None)

        if P > 0 and C_t > 0 and (need_e or want_t):
            itemsize = torch.finfo(gdt).bits // 8
            if need_e and K > 0:
                pc = max(1, min(P, chunk_bytes // (K * itemsize)))
            else:
                pc = P  # only dt: no error buffer, one launch over every position
            tile = 256 if interpreted else max(c[0] for c in GPU_CONFIGS["bwd"][x.dtype])
            if need_e and pc > tile:
                pc -= pc % tile  # whole position tiles per chunk, for any configuration
            e_buf = torch.empty(K * pc, dtype=gdt, device=dev) if need_e else None
            xc_buf = torch.empty(C_s * pc, dtype=gdt, device=dev) if want_a else None
            for p0 in range(0, P, pc):
                pcur = min(pc, P - p0)
                e = e_buf[:K * pcur].view(K, pcur) if need_e else None
                xc = xc_buf[:C_s * pcur].view(C_s, pcur) if want_a else None
                _launch(
                    _expand_mse_bwd_err_kernel, "bwd", pcur, C_s, C_t,
                    (x, t, a_k, b_c, s_c, g2,
                     e if need_e else g2, xc if want_a else g2, dt if want_t else g2,
                     p0, pcur, C_s, C_t, n, _p_bucket(pc), *x.stride(), *t.stride()),
                    dict(WRITE_E=need_e, WRITE_XC=want_a, WRITE_DT=want_t, E_BKL=False,
                         **consts),
                    dev, interpreted, x.dtype,
                    lambda bp, bc: (tlaunch.cdiv(pcur, bp), tlaunch.cdiv(C_t, bc)))
                if da is not None:
                    if gdt == cdt:
                        da.addmm_(e, xc.t())
                    else:  # 16-bit operands, float32 product (no in-place addmm for that)
                        da += _mm(e, xc.t())
                if e_rowsum is not None:
                    e_rowsum += e.sum(dim=1, dtype=cdt)
                if dx_pc is not None:
                    _mm(e.t(), a_k, out=dx_pc[p0:p0 + pcur])
        elif want_t:
            dt.zero_()
        if da is not None and folded:
            da.sub_(torch.outer(e_rowsum, shift.to(cdt)))
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
            -(a_k.t().to(cdt) @ e_rowsum) if want_s else empty,
        )


def expand_error(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor],
                 n: int, g2: Tensor, precision: str = "ieee") -> Tensor:
    """g2 * E, E the expanded error (B, n*C_t, L) of x (B, C_s, L) and t (B, C_t, L):
    `norm_fast.ops.eager.expand_error`, by the backward's recomputing kernel in one launch,
    stored in the layout of a 1x1 convolution's output gradient so that one
    convolution backward gives both da and dx (docs/design.md section 8). In x's dtype
    for 16-bit inputs (the GEMMs reading it run on tensor cores), else the compute dtype.
    The caller bounds its size (batch chunks)."""
    B, C_s, L = x.shape
    C_t = t.shape[1]
    P = B * L
    cdt, interpreted, a_k, b_c, s_c, consts = _common(x, t, a, b, shift, precision)
    gdt = x.dtype if x.dtype in _HALF else cdt
    e = torch.empty((B, n * C_t, L), dtype=gdt, device=x.device)
    if P == 0 or C_t == 0 or n == 0:
        return e
    g = g2.reshape(1)
    _launch(
        _expand_mse_bwd_err_kernel, "bwd", P, C_s, C_t,
        (x, t, a_k, b_c, s_c, g, e, g, g, 0, P, C_s, C_t, n, _p_bucket(P), *x.stride(),
         *t.stride()),
        dict(WRITE_E=True, WRITE_XC=False, WRITE_DT=False, E_BKL=True, **consts),
        x.device, interpreted, x.dtype,
        lambda bp, bc: (tlaunch.cdiv(P, bp), tlaunch.cdiv(C_t, bc)))
    return e


def _backward_from_error(g2: Tensor, x: Tensor, t: Tensor, a_k: Tensor,
                         shift: Optional[Tensor], err: Tensor, cdt: torch.dtype,
                         gdt: torch.dtype, wants, empty: Tensor) -> Tuple[Tensor, ...]:
    """Backward with the stored error err (B, C_t, L) (n == 1): GEMMs only.

    err holds E unscaled (compute dtype), so each product is scaled by g2 = 2g
    afterwards (the small ones: da, db, dshift) or on the way out (dx, dt: one
    elementwise pass each). For 16-bit inputs (gdt, the GEMM dtype, is the input dtype)
    E and xc are rounded once into channel-major (C, P) copies and the two P-sized GEMMs
    accumulate in float32 on tensor cores (`_mm`).
    """
    want_x, want_t, want_a, want_b, want_s = wants
    B, C_s, L = x.shape
    C_t = t.shape[1]
    dev = x.device
    e = err.to(cdt)
    esum = e.sum(dim=(0, 2)) if (want_b or want_s) else None
    g = g2[0]
    dx = da = empty
    if gdt == cdt:
        if want_x:
            dx = (torch.matmul(a_k.t(), e) * g).to(x.dtype)
        if want_a:
            xc = x.to(cdt)
            if shift is not None:
                xc = xc - shift.to(cdt)[None, :, None]
            da = torch.tensordot(e, xc, dims=([0, 2], [0, 2])) * g
    elif want_x or want_a:
        e16 = torch.empty((C_t, B, L), dtype=gdt, device=dev)
        e16.copy_(err.transpose(0, 1))                      # round once, (C_t, P)
        e16 = e16.view(C_t, B * L)
        if want_x:
            dx = torch.empty((B, C_s, L), dtype=x.dtype, device=dev)
            torch.mul(_mm(a_k.t(), e16).view(C_s, B, L).transpose(0, 1), g2, out=dx)
        if want_a:  # x exact, the shift as a rank-one term (see `_common`)
            x16 = torch.empty((C_s, B, L), dtype=gdt, device=dev)
            x16.copy_(x.transpose(0, 1))
            da = _mm(e16, x16.view(C_s, B * L).t())
            if shift is not None:
                da -= torch.outer(e.sum(dim=(0, 2)), shift.to(cdt))
            da = da * g
    return (
        dx,
        (e * (-g)).to(t.dtype) if want_t else empty,
        da,
        esum * g if want_b else empty,
        -(a_k.to(cdt).t() @ esum) * g if want_s else empty,
    )
