"""Input validation shared by the module and the functional API.

Every check raises ValueError (bad values or shapes) or TypeError (bad types or dtypes)
naming what was expected and what was received. Nothing is broadcast silently.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEGMENT_REDUCTIONS = ("sum", "mean")


def check_positive_int(name: str, value) -> int:
    """A positive integral number (int, numpy integer, 0-dim integer tensor), as an int."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} "
                        f"{value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_n(n) -> int:
    return check_positive_int("n", n)


def check_channels(name: str, value) -> int:
    return check_positive_int(name, value)


def check_choice(name: str, value, choices) -> str:
    """`value` must be one of `choices` (strings)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(segment_reduction: str) -> str:
    return check_choice("segment_reduction", segment_reduction, SEGMENT_REDUCTIONS)


def check_feature_map(name: str, x, channels: Optional[int] = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W) (4 dims), got {x.dim()} dims "
                         f"with shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be one of float16, bfloat16, float32, float64, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (shape (B, {channels}, H, W)), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): need B, H, W >= 1")
    return x


def check_pair(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Student and teacher maps must agree on batch, spatial size and device; returns f_t
    in f_s's dtype, or in f_s's compute dtype when the two differ (a float32 teacher
    beside a bfloat16 student under autocast stays float32)."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must have the same batch size, got f_s "
                         f"{tuple(f_s.shape)} and f_t {tuple(f_t.shape)}: pass the teacher "
                         "features of the same images, in the same order")
    if f_s.shape[2:] != f_t.shape[2:]:
        raise ValueError(
            "f_s and f_t must have the same spatial size, got f_s "
            f"{tuple(f_s.shape)} and f_t {tuple(f_t.shape)}; use norm_fast.match_spatial(f_s, f_t) "
            "to max-pool the larger map down to the smaller")
    if f_s.device != f_t.device:
        raise ValueError(f"f_s and f_t must be on the same device, got {f_s.device} and {f_t.device}")
    if f_s.dtype != f_t.dtype:
        f_t = f_t.to(torch.float64 if f_s.dtype == torch.float64 else torch.float32)
    return f_t


def check_param_compat(f_s: Tensor, param: Tensor, what: str) -> None:
    """Inputs must live where the parameters live, in their dtype unless autocast is on."""
    if f_s.device != param.device:
        raise ValueError(f"f_s is on {f_s.device} but the {what} parameters are on {param.device}")
    if f_s.dtype != param.dtype and not torch.is_autocast_enabled(f_s.device.type):
        raise TypeError(
            f"f_s is {f_s.dtype} but the {what} parameters are {param.dtype}: convert one of them "
            "(module.to(dtype)) or run under torch.autocast")
