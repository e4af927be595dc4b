"""Shared launch utilities of the Triton kernel set.

One kernel source serves two devices:

* CUDA tensors: the ``@triton.jit`` kernel is compiled and launched as usual.
* CPU tensors: the same Python function runs under Triton's interpreter
  (``triton.runtime.interpreter.InterpretedFunction``), built on first use and cached,
  so nothing depends on ``TRITON_INTERPRET=1`` being set before ``import triton``.

The interpreter only rewrites the launched kernel itself; library functions of
``triton.language`` that are written as ``@triton.jit`` code (``tl.sum``, ``tl.zeros``...)
stay ``JITFunction`` objects when the environment variable was unset at import time, and
calling one outside a compiled kernel raises. `_interpreter_patches` therefore interprets
such nested calls too, for the duration of one launch (what ``TRITON_INTERPRET=1`` does
at decoration time); our kernels' own ``@triton.jit`` helpers (the segment loop of
expand_mse.py) go the same way.
The same context also papers over one Triton 3.6 interpreter incompatibility with
NumPy >= 2.4 (see `_interpreter_patches`).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as _interp_mod
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..spec import PRECISIONS

# The interpreter keeps global builder state: one interpreted launch at a time.
_INTERPRETER_LOCK = threading.RLock()
_INTERPRETED: Dict[Callable, InterpretedFunction] = {}


def _interpreted(fn: Callable) -> InterpretedFunction:
    """The cached interpreter wrapper of the plain Python function `fn`."""
    f = _INTERPRETED.get(fn)
    if f is None:
        f = _INTERPRETED[fn] = InterpretedFunction(fn)
    return f


@contextlib.contextmanager
def _interpreter_patches():
    """Within the block, interpreted kernels can call library JITFunctions and loop.

    1. Calling any JITFunction runs it under the interpreter, its ``triton.language``
       patch scoped to the call. Outside a kernel
       ``JITFunction.__call__`` only raises, and compiled launches never call it (code
       generation walks the AST), so replacing it for the duration of an interpreted
       launch cannot change a compiled kernel running beside it.
    2. Scalar kernel arguments are 1-element numpy arrays in the interpreter, and
       ``range(n)`` calls their ``__index__``. Triton 3.6 implements it as
       ``int(array)``, which NumPy >= 2.4 rejects for 1-d arrays; Triton 3.9 squeezes
       first. The interpreter's per-launch tensor patch is wrapped to install the 3.9
       form on every version (its scope restores both at the end of the launch).
    """
    original_call = JITFunction.__call__
    original_patch = getattr(_interp_mod, "_patch_lang_tensor", None)

    def call(self, *args, **kwargs):
        # What InterpretedFunction.__call__ does (patch the callee's triton.language,
        # run its rewritten body), except that it restores the patch afterwards: Triton's
        # own device-call path leaves `tl` patched for good (3.6 and 3.9), after which
        # compiling any kernel in the process fails.
        scope = _interp_mod._patch_lang(self.fn)
        try:
            return _interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    def patch_lang_tensor(tensor, scope, *rest, **kw):
        original_patch(tensor, scope, *rest, **kw)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    JITFunction.__call__ = call
    if original_patch is not None:
        _interp_mod._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        JITFunction.__call__ = original_call
        if original_patch is not None:
            _interp_mod._patch_lang_tensor = original_patch


# Register ceiling handed to ptxas (.maxnreg) for the GPU launches of the expand_mse
# kernels: without one, ptxas sometimes settles on 128 registers a thread and spills a
# few bytes (float64 forward 64x32x16 with Triton 3.9: 28 B; float32 forward 64x64x16,
# x resident, with 3.6: 8 B) where 128 < need <= 255 would not spill. 255 is the
# hardware maximum. Not for the moments kernel: with it, ptxas (3.9) takes all 255 and
# spills 28 B there, and without it uses 151 and none.
MAXNREG = 255


def uses_interpreter(t: torch.Tensor) -> bool:
    """True when kernels on `t` run under the interpreter (any non-CUDA tensor)."""
    return t.device.type != "cuda"


def launch(kernel: JITFunction, grid: Tuple[int, ...], args: Sequence[Any],
           constexprs: Dict[str, Any], device: torch.device, num_warps: int = 4,
           num_stages: int = 2, maxnreg: Optional[int] = None) -> None:
    """Launch `kernel` on `grid` with positional `args` and constexpr keywords.

    CUDA: compiled launch (num_warps/num_stages/maxnreg apply; num_warps=None for an
    autotuned kernel, whose configurations carry them). Anything else: interpreted,
    program by program, on the host copies of the tensors.
    """
    if device.type == "cuda":
        tune = {} if num_warps is None else dict(num_warps=num_warps, num_stages=num_stages)
        if num_warps is not None and maxnreg is not None:
            tune["maxnreg"] = maxnreg
        with torch.cuda.device(device):
            kernel[grid](*args, **constexprs, **tune)
        return
    with _INTERPRETER_LOCK, _interpreter_patches():
        _interpreted(kernel.fn)[grid](*args, **constexprs)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi] (lo >= 16: tl.dot's minimum)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch floating dtype."""
    return {
        torch.float64: tl.float64,
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]



def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def dot_dtypes(in_dtype: torch.dtype, interpreted: bool, precision: str = "ieee"):
    """(operand rounding dtype, tl.dot operand dtype, input_precision) for `in_dtype`.

    float64 multiplies exactly ("ieee", DMMA on GPU). float32 multiplies with the
    requested `precision` when compiled ("ieee": exact products on CUDA cores; "tf32":
    tensor cores, operands rounded to 10-bit mantissas; "tf32x3": three TF32 products,
    near float32); the interpreter always multiplies exactly (numpy), whatever
    `precision` says. float16/bfloat16 inputs round the tile operands to the input
    dtype and accumulate in float32 (tensor cores on GPU; `precision` does not apply).
    The interpreter's ``tl.dot`` misreads bfloat16 operands (it multiplies their raw
    16-bit patterns), so there the operands are rounded to the input dtype and
    multiplied as float32: the same products.
    Plan precisions beyond tl.dot's (`norm_fast/precision.py`): "float64" multiplies
    float32 operands exactly ("ieee"); "bfloat16"/"float16" round float32 operands to that
    dtype and multiply on tensor cores (the interpreter: rounded, multiplied as float32).
    """
    check_precision(precision)
    if in_dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if in_dtype == torch.float32 and precision in ("bfloat16", "float16"):
        rnd = tl.bfloat16 if precision == "bfloat16" else tl.float16
        return (rnd, tl.float32, "ieee") if interpreted else (rnd, rnd, "tf32")
    if in_dtype == torch.float32:
        prec = "ieee" if precision == "float64" else precision
        return tl.float32, tl.float32, ("ieee" if interpreted else prec)
    rnd = tl_dtype(in_dtype)
    if interpreted and in_dtype == torch.bfloat16:
        return rnd, tl.float32, "ieee"
    return rnd, rnd, "tf32"  # precision only concerns float32 operands; default value
