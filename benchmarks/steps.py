"""Inputs and the timed closures: one NORM forward, or one forward+backward, in training mode.

Inputs are seeded, non-zero normal tensors: f_s (requires grad: it comes from the student),
f_t (the teacher, detached by NORM). bfloat16 runs keep float32 parameters and run under
`torch.autocast(dtype=torch.bfloat16)` with bfloat16 inputs, as mixed-precision training does.

forward           features, loss = module(f_s, f_t) with autograd recording (what a training
                  step pays before its backward); the outputs are returned, so a memory
                  measurement sees them and the graph they hold.
forward+backward  zero the gradients (set to None), forward, then backward from both
                  outputs: the loss (gradient 1) and the features (a fixed random gradient,
                  standing in for the classifier's), as in a real step.
Each closure ends with a device synchronisation, so wall-clock timing is honest on CUDA.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Tuple

import torch

from .shapes import Shape

PASSES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(requested: str = "") -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> Tuple[bool, str]:
    """Whether bfloat16 matrix work is native on the device (else it is skipped)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "" if ok else "this GPU has no native bfloat16"
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception as exc:  # older or unusual builds
        return False, f"cannot tell whether this CPU supports bfloat16 ({exc})"
    return ok, "" if ok else "this CPU has no native bfloat16 (avx512_bf16/amx)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, dtype: torch.dtype, cache: bool = True):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """f_s (requires grad), f_t, and a float32 gradient for the features (cast on use)."""
    gen = torch.Generator().manual_seed(seed)
    f_s = torch.randn(shape.student_size(), generator=gen).to(device=device, dtype=dtype)
    f_t = torch.randn(shape.teacher_size(), generator=gen).to(device=device, dtype=dtype)
    grad_features = torch.randn(shape.student_size(), generator=gen).to(device)
    return f_s.requires_grad_(True), f_t, grad_features


def make_step(call: Callable, params_module: torch.nn.Module, shape: Shape,
              device: torch.device, dtype: torch.dtype, pass_: str, seed: int = 1, *,
              sync: bool = True, autocast_cache: bool = True, inputs=None
              ) -> Callable[[], object]:
    """The closure timed for one (path, shape, dtype, pass); `step.clear()` drops the
    gradients left by earlier calls.

    sync: end each call with a device synchronisation (wall-clock timing; CUDA-event
    timing and graph capture want none); autocast_cache: autocast's weight-cast cache
    (off for graph capture: a cached cast would be captured once and go stale); inputs:
    make_inputs(...) to share between paths (each step drops f_s.grad first)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    f_s, f_t, grad_f32 = inputs or make_inputs(shape, device, dtype, seed)
    grads: Dict[torch.dtype, torch.Tensor] = {}
    done = (lambda: synchronize(device)) if sync else (lambda: None)

    def forward():
        with autocast_for(device, dtype, autocast_cache):
            return call(f_s, f_t)

    def clear():
        """Drop the gradients of earlier calls (a memory measurement starts from here)."""
        params_module.zero_grad(set_to_none=True)
        f_s.grad = None

    if pass_ == "forward":
        def step():
            out = forward()
            done()
            return out
        step.clear = clear
        return step

    def step():
        clear()
        features, loss = forward()
        g = grads.get(features.dtype)
        if g is None:
            g = grads[features.dtype] = grad_f32.to(features.dtype)
        torch.autograd.backward((loss, features), (None, g))
        done()
    step.clear = clear
    return step
