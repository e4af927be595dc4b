"""The fused training step (norm_fast/train_step.py, docs/design.md section 8).

* which steps take it (and which keep the composed route);
* against the float64 literal: loss, features, every gradient and the running statistics,
  on every kernel set that runs it (the C++ set through the route CUDA tensors take,
  standing for the CUDA extension, which shares the host code), both algorithms, both
  reductions, residual on and off, at channel counts that are not multiples of a tile;
* its new ops, Triton against the eager reading copy (`ops/eager.py`), in float64 at
  shapes that cross block boundaries.
"""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

from norm_fast import NORM, train_step
from norm_fast.ops import eager

from conftest import paths_for

TRITON = ("triton", "direct") in paths_for("cpu")
CPP = ("cpp", "direct") in paths_for("cpu")


def _module(C_s, C_t, n, reduction="sum", residual=True, seed=0):
    torch.manual_seed(seed)
    mod = NORM(C_s, C_t, n, backend="torch", algorithm="direct", segment_reduction=reduction,
               residual=residual).double()
    with torch.no_grad():
        for bn in (mod.expand_bn, mod.contract_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return mod


def _run(mod, f_s, f_t, g_feat):
    x = f_s.detach().clone().requires_grad_()
    feats, loss = mod(x, f_t)
    (3 * loss + (feats * g_feat).sum()).backward()
    return ([loss.detach(), feats.detach(), x.grad]
            + [p.grad for p in mod.parameters()] + [b.clone() for b in mod.buffers()])


def _cases():
    out = [("torch", "decomposed")]
    if TRITON:
        out += [("triton", "direct"), ("triton", "decomposed")]
    if CPP:
        out += [("cpp", "direct"), ("cpp", "decomposed")]
    return out


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("path", _cases(), ids=lambda p: "-".join(p))
def test_fused_step_equals_the_literal_in_float64(path, reduction, residual):
    backend, algorithm = path
    B, C_s, C_t, H, W, n = 3, 21, 11, 5, 3, 3          # P = 45 > C_s
    ref = _module(C_s, C_t, n, reduction, residual)
    mod = copy.deepcopy(ref)
    mod.backend, mod.algorithm = backend, algorithm
    gen = torch.Generator().manual_seed(1)
    f_s = torch.randn(B, C_s, H, W, dtype=torch.float64, generator=gen).relu() + 0.5
    f_t = torch.randn(B, C_t, H, W, dtype=torch.float64, generator=gen)
    g_feat = torch.randn(B, C_s, H, W, dtype=torch.float64, generator=gen)
    calls = []
    real = train_step.run

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(train_step, "COMPOSED_ON_CPU", ()), \
            mock.patch.object(train_step, "run", spy):
        got = _run(mod, f_s, f_t, g_feat)
    assert calls, "the fused route was not taken"
    want = _run(ref, f_s, f_t, g_feat)
    names = ["loss", "features", "d f_s"] + [f"d {k}" for k, _ in mod.named_parameters()] \
        + [k for k, _ in mod.named_buffers()]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        err = (g.double() - w.double()).abs().max().item()
        assert err <= 1e-10 * (1 + w.double().abs().max().item()), (name, err)


def _eligible(mod, f_s, f_t=True, backend="triton"):
    f_t = torch.randn(f_s.shape[0], mod.teacher_channels, *f_s.shape[2:]) if f_t else None
    return train_step.eligible(mod, f_s, f_t, None, backend)


def test_which_steps_take_the_fused_route():
    mod = NORM(8, 4, 2)
    f_s = torch.randn(2, 8, 4, 4)                       # P = 32 > 8
    assert _eligible(mod, f_s)
    assert not _eligible(mod, f_s, backend="cpp")       # CPU: the C++ composed route
    assert not _eligible(mod, f_s, f_t=False)           # no loss: nothing to fuse
    assert not _eligible(mod, torch.randn(2, 8, 2, 2))  # P = 8 <= C_s: from the data
    mod.eval()
    assert not _eligible(mod, f_s)                      # eval: fixed affine maps
    mod.train()
    mod.contract_bn.momentum = None                     # cumulative average
    assert not _eligible(mod, f_s)
    assert not _eligible(NORM(8, 4, 2, batchnorm=False), f_s)
    half = NORM(8, 4, 2).bfloat16()                     # 16-bit running statistics
    assert not _eligible(half, f_s.bfloat16())


@pytest.mark.skipif(not TRITON, reason="triton not available")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decomposed", [False, True])
def test_expansion_kernels_match_eager(decomposed, dtype):
    """Triton's centre_segments / expansion_forward / expansion_backward against
    ops/eager.py, C = 300 and C_t = 70 (several column slabs and row blocks, ragged):
    float64 to 1e-12; float32 (the float64 variance, a1 and means inside) to a few ulps."""
    from norm_fast.ops.triton import expansion
    g = torch.Generator().manual_seed(0)
    n, C_t, C, P = 3, 70, 300, 400
    O = n * C_t
    f64 = dict(dtype=torch.float64)
    X = torch.randn(C, P, generator=g, **f64)
    S = X @ X.t() / P
    W1 = torch.randn(O, C, generator=g, **f64) / C ** 0.5
    gamma, beta = torch.rand(O, generator=g, **f64) + 0.5, torch.randn(O, generator=g, **f64)
    origin, mean = torch.randn(C, generator=g, **f64), torch.randn(C, generator=g, **f64) * 1e-3
    sigma, inv = torch.tensor(2.0, **f64), torch.tensor(0.5, **f64)
    W1, S, gamma, beta, origin, mean, sigma, inv = (
        v.to(dtype) for v in (W1, S, gamma, beta, origin, mean, sigma, inv))
    tol = (dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64
           else dict(rtol=4e-6, atol=1e-6))
    torch.testing.assert_close(expansion.centre_segments(W1, n), eager.centre_segments(W1, n),
                               **tol)
    if decomposed:
        prod = eager.centre_segments(W1, n) @ S
        W1S, WbS = prod[:O], prod[O:]
    else:
        W1S, WbS = W1 @ S, W1.new_empty((0,))
    args = (W1, W1S, WbS, gamma, beta, origin, mean, sigma, inv, 1e-5, P / (P - 1), 0.25, n,
            decomposed)
    got, want = expansion.expansion_forward(*args), eager.expansion_forward(*args)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, k
        scale = b.abs().max().item() if b.numel() else 1.0
        if k in (8, 10) and decomposed:   # Aerr, rcoef: roundings, on the scale of Abar
            scale = want[6].abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30),
                                   msg=f"forward output {k}")
    a1, r1, A, _, _, _, Abar, DS, Aerr, _, rcoef, db, part = want
    if decomposed:
        G4 = torch.randn(C_t, C, generator=g, **f64).to(dtype)
        SR = torch.randn(C_t, generator=g, **f64).to(dtype)
        resid = torch.tensor(3.0, dtype=dtype)
        torch.testing.assert_close(
            expansion.decomposed_total(part, resid, Aerr, G4, rcoef, SR, 0.3, P),
            eager.decomposed_total(part, resid, Aerr, G4, rcoef, SR, 0.3, P), **tol)
    gA = torch.randn(O, C, generator=g, **f64).to(dtype)
    gA2 = torch.randn(O, C, generator=g, **f64).to(dtype) if not decomposed else W1.new_empty((0,))
    gAbar = torch.randn(C_t, C, generator=g, **f64).to(dtype) if decomposed else W1.new_empty((0,))
    gsum = torch.randn(C_t if decomposed else O, generator=g, **f64).to(dtype)
    bargs = (gA, gA2, gAbar, gsum, torch.tensor(0.7, dtype=dtype), 1e-3, W1, W1S, WbS, a1, r1,
             A, Abar, DS, db, mean, P, n, decomposed)
    got, want = expansion.expansion_backward(*bargs), eager.expansion_backward(*bargs)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, k
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a, b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale,
                                   msg=f"backward output {k}")


@pytest.mark.skipif(not TRITON, reason="triton not available")
@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1.0), (torch.float32, 1.0),
                                         (torch.float32, 2.0 ** 60)])
def test_centred_moments_match_eager(dtype, scale):
    """Triton's centred_moments against ops/eager.py: the stored xc bit for bit (the same
    rounding of (x - origin) / sigma), origin, sigma and the moments; a constant channel
    centres to exactly zero; with max |x| beyond 2^50, sigma = 2^(e - 50)."""
    from norm_fast.ops.triton import moments
    g = torch.Generator().manual_seed(0)
    B, C, L = 3, 150, 37                              # ragged blocks of channels and positions
    x = (torch.randn(B, C, L, generator=g, dtype=torch.float64).relu() * 3 + 1) * scale
    x[:, 7] = 0.3 * scale                              # a constant channel
    x = x.to(dtype)
    got, want = moments.centred_moments(x), eager.centred_moments(x)
    xc, origin, scales, mean, cov = got
    assert torch.equal(scales, want[2])
    e = int(torch.frexp(x.abs().max().double())[1])                 # max |x| = m 2^e
    assert scales[0].item() == 2.0 ** max(0, e - 50) and scales[1].item() == 1 / scales[0].item()
    assert (scales[0].item() > 1) == (scale > 1)
    torch.testing.assert_close(origin, want[1], rtol=1e-6 if dtype == torch.float32 else 1e-14,
                               atol=0)
    assert torch.equal(xc[:, 7], torch.zeros_like(xc[:, 7]))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(xc, want[0], **tol)
    # the mean of xc is a rounding residual: compared on the scale of xc
    big = xc.abs().max().item()
    torch.testing.assert_close(mean, want[3], rtol=0,
                               atol=(1e-6 if dtype == torch.float32 else 1e-14) * big)
    torch.testing.assert_close(cov, want[4], rtol=tol["rtol"], atol=tol["atol"] * big * big)
    assert torch.equal(cov, cov.t())
