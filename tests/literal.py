"""The float64 literal oracle, written here independently of the package.

`LiteralFT` is the NORM Feature Transform exactly as docs/design.md section 1 states it: two
1x1 convs with BatchNorm, an identity residual, and the loss
`mse_loss(Y, f_t.repeat(1, n, 1, 1)) * n`. Its submodules carry the same names as
`norm_fast.NORM`, so state dicts move between the two with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LiteralFT(nn.Module):
    def __init__(self, C_s, C_t, n, batchnorm=True, residual=True, segment_reduction="sum",
                 detach_teacher=True):
        super().__init__()
        self.n, self.residual = n, residual
        self.segment_reduction, self.detach_teacher = segment_reduction, detach_teacher
        self.expand = nn.Conv2d(C_s, n * C_t, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(n * C_t) if batchnorm else nn.Identity()
        self.contract = nn.Conv2d(n * C_t, C_s, 1, bias=False)
        self.contract_bn = nn.BatchNorm2d(C_s) if batchnorm else nn.Identity()

    # The precision of both convolutions and of their backward products: "ieee" as nn.Conv2d
    # computes them; "tf32" / "bfloat16" / ... as cuDNN would on a GPU, emulated on CPU
    # (norm_fast/ops/products.py: operands rounded, products exact, float32 sums).
    precision = "ieee"

    def _conv(self, conv, x):
        if self.precision == "ieee" or x.dtype == torch.float64:
            return conv(x)
        from norm_fast.ops import products
        return products.conv1x1(x, conv.weight.flatten(1), self.precision)

    def forward(self, f_s, f_t=None):
        y = self.expand_bn(self._conv(self.expand, f_s))
        feats = self.contract_bn(self._conv(self.contract, y))
        if self.residual:
            feats = feats + f_s
        if f_t is None:
            return feats, None
        t = f_t.detach() if self.detach_teacher else f_t
        loss = F.mse_loss(y, t.repeat(1, self.n, 1, 1)) * self.n
        return feats, (loss / self.n if self.segment_reduction == "mean" else loss)


def randomise_bn(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm parameters and running statistics (never all zeros/ones)."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            C = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(torch.rand(C, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(C, generator=generator) * 0.5)
                bn.running_mean.copy_(torch.randn(C, generator=generator))
                bn.running_var.copy_(torch.rand(C, generator=generator) + 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the scale of the truth), as a Python float."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
