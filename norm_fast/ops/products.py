"""Products in a planned precision (`norm_fast/precision.py`), on a GPU and emulated on CPU.

`bilinear(fn, a, b, precision)` evaluates fn(a, b), fn bilinear in its two operands (a
GEMM, a 1x1 convolution, one output of a convolution's backward), in `precision`:

    CUDA   "ieee" / "tf32": one call under the cuBLAS and cuDNN float32 flags;
           "tf32x3": three TF32 calls on the operands split a = a_hi + a_lo;
           "bfloat16" / "float16": one call on 16-bit operands, the result rounded to
           16 bits (as a cuDNN convolution under autocast returns it), then widened.
    CPU    no tensor cores: the operands are rounded as the tensor cores would round them
           (`round_tf32`, round to nearest even) and multiplied in float32, whose products
           of two TF32 or 16-bit values are exact and whose sums accumulate in float32:
           the emulation tests/test_precision.py measures the plan with.
    "float64", and float64 operands anywhere: exact.

The float32 flags are process-wide while set (a matmul launched by another thread meanwhile
sees them too); the old values come back on exit.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Tuple

import torch
from torch import Tensor

_SIXTEEN = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def round_tf32(x: Tensor) -> Tensor:
    """float32 x rounded to TF32 (10 explicit mantissa bits, the float32 exponent range),
    round to nearest, ties to even; inf and NaN unchanged. Returned as float32."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_tf32 takes float32, got {x.dtype}")
    i = x.contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    r = (i + (0xFFF + lsb)) & ~0x1FFF
    finite = (i & 0x7F800000) != 0x7F800000
    return torch.where(finite, r, i).view(torch.float32).view(x.shape)


def round_to(x: Tensor, precision: str) -> Tensor:
    """x (float32) rounded to the operand format of `precision`, as float32."""
    if precision == "tf32":
        return round_tf32(x)
    if precision in _SIXTEEN:
        return x.to(_SIXTEEN[precision]).to(torch.float32)
    return x


def split_tf32(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(hi, lo), both TF32, hi = round(x), lo = round(x - hi) (x - hi is exact in float32):
    hi + lo carries 22 significant bits of x, the operands of 3xTF32."""
    hi = round_tf32(x)
    return hi, round_tf32(x - hi)


@contextlib.contextmanager
def float32_flags(device: torch.device, precision: str):
    """cuBLAS and cuDNN float32 products in TF32 for "tf32", IEEE otherwise, within the
    block (CUDA only; a no-op elsewhere)."""
    if device.type != "cuda":
        yield
        return
    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = mm.fp32_precision, conv.fp32_precision
    mm.fp32_precision = conv.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        yield
    finally:
        mm.fp32_precision, conv.fp32_precision = old


def native(device: torch.device, precision: str, *operands: Tensor) -> bool:
    """Whether a product in `precision` on `device` is one call under the float32 flags
    (IEEE/float64, non-float32 operands, TF32 on CUDA) rather than rounded or split."""
    return (precision in ("float64", "ieee")
            or any(t.dtype != torch.float32 for t in operands)
            or (device.type == "cuda" and precision == "tf32"))


def bilinear(fn: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor,
             precision: str) -> Tensor:
    """fn(a, b) in `precision` (module docstring). a and b float32 (16-bit operands
    multiply in their own dtype; float64 exactly): the result in fn's dtype."""
    if precision in ("float64", "ieee") or a.dtype != torch.float32 \
            or b.dtype != torch.float32:
        with float32_flags(a.device, "ieee"):
            return fn(a, b)
    cuda = a.device.type == "cuda"
    if precision == "tf32":
        if cuda:
            with float32_flags(a.device, "tf32"):
                return fn(a, b)
        return fn(round_tf32(a), round_tf32(b))
    if precision == "tf32x3":
        (ah, al), (bh, bl) = split_tf32(a), split_tf32(b)
        with float32_flags(a.device, "tf32"):
            # small terms first: their sum is exact-er before the large one joins
            return fn(ah, bl) + fn(al, bh) + fn(ah, bh)
    if precision in _SIXTEEN:
        dt = _SIXTEEN[precision]
        if cuda:
            return fn(a.to(dt), b.to(dt)).to(torch.float32)
        return round_to(fn(round_to(a, precision), round_to(b, precision)), precision)
    raise ValueError(f"precision must be one of the plan's, got {precision!r}")


def mm(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """a @ b in `precision`."""
    return bilinear(torch.matmul, a, b, precision)


def conv1x1(x: Tensor, w: Tensor, precision: str, bias: Tensor = None,
            grad_precision: str = None) -> Tensor:
    """The 1x1 convolution of x (B, C_in, H, W) by w (C_out, C_in) (+ bias) in
    `precision`, differentiable: autograd's backward products in `grad_precision`
    (default `precision`). Where `native`, one F.conv2d (its backward under the global
    flags, as the literal's); else an autograd.Function over the emulated/split products."""
    gp = grad_precision or precision
    if native(x.device, precision, x, w) and native(x.device, gp, x, w):
        with float32_flags(x.device, precision):
            return torch.nn.functional.conv2d(x, w[:, :, None, None], bias)
    out = _Conv1x1.apply(x, w, precision, gp)
    return out if bias is None else out + bias[:, None, None]


class _Conv1x1(torch.autograd.Function):
    """u = w x per position in `precision`; du/dx = w^T g and du/dw = g x^T in `gp`."""

    @staticmethod
    def forward(ctx, x, w, precision, gp):
        ctx.gp = gp
        ctx.save_for_backward(x, w)
        return bilinear(lambda u, v: torch.nn.functional.conv2d(u, v[:, :, None, None]), x, w,
                        precision)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gi, gw, _ = conv1x1_backward(g.contiguous(), x, w, ctx.needs_input_grad[0],
                                     ctx.needs_input_grad[1], False, ctx.gp)
        return gi, (gw.view(w.shape) if gw is not None else None), None, None


def conv1x1_backward(g: Tensor, x: Tensor, w: Tensor, want_input: bool, want_weight: bool,
                     want_bias: bool, precision: str):
    """(grad_input, grad_weight (C_out, C_in, 1, 1), grad_bias) of the 1x1 convolution
    x (B, C_in, H, W) -> g (B, C_out, H, W) by w (C_out, C_in) in `precision`; None where
    not wanted. Where the precision is the flags' (ieee/tf32 on CUDA, any on exact
    operands) this is ONE convolution backward, as the literal's; emulated or 3xTF32,
    one per output and term. grad_bias (the sum of g over positions) is no product."""
    w4 = w[:, :, None, None]
    args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    bias = [w.shape[0]] if want_bias else None
    if native(g.device, precision, g, x, w):
        with float32_flags(g.device, precision):
            gi, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w4, bias, *args, [want_input, want_weight, want_bias])
        return (gi if want_input else None, gw if want_weight else None,
                gb if want_bias else None)
    gi = gw = gb = None
    if want_input:
        gi = bilinear(lambda u, v: torch.ops.aten.convolution_backward(
            u, x, v[:, :, None, None], None, *args, [True, False, False])[0], g, w, precision)
    if want_weight:
        gw = bilinear(lambda u, v: torch.ops.aten.convolution_backward(
            u, v, w4, None, *args, [False, True, False])[1], g, x, precision)
    if want_bias:
        gb = g.sum(dim=(0, 2, 3))
    return gi, gw, gb
