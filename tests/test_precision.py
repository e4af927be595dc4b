"""float32 near convergence (DESIGN.md s.4-5): the decomposed form keeps its accuracy.

Near convergence every segment is close to the teacher, so the loss is a small number
computed from large features: the setting in which the textbook Gram expansion
||A X||^2 - 2 <A X, T> + ||T||^2 cancels catastrophically. The tests compare float32
results against a float64 truth.
"""
from __future__ import annotations

import pytest
import torch

from norm_fast import NORM

from conftest import DEVICES, is_interpreted, paths_for
from literal import LiteralFT, rel_err

SHAPE = (8, 32, 48, 7, 7, 8)  # B, C_s, C_t, H, W, n


def near_convergence(device, shape=SHAPE, seed=0):
    """A module whose N segments nearly agree, a teacher = segment 0 + 1e-3 noise."""
    B, C_s, C_t, H, W, n = shape
    gen = torch.Generator().manual_seed(seed)
    lit = LiteralFT(C_s, C_t, n).double()
    with torch.no_grad():
        base = torch.randn(C_t, C_s, 1, 1, generator=gen, dtype=torch.float64) / C_s ** 0.5
        noise = torch.randn(n, C_t, C_s, 1, 1, generator=gen, dtype=torch.float64)
        lit.expand.weight.copy_((base[None] + 1e-3 * noise * base.std()).reshape(n * C_t, C_s, 1, 1))
        # Every segment shares the same BatchNorm affine parameters.
        gamma = torch.rand(C_t, generator=gen, dtype=torch.float64) * 0.1 + 1.0
        lit.expand_bn.weight.copy_(gamma.repeat(n))
        lit.expand_bn.bias.copy_(torch.randn(C_t, generator=gen, dtype=torch.float64).repeat(n))
    f_s = torch.relu(torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)) + 0.5
    with torch.no_grad():
        y0 = lit.expand_bn(lit.expand(f_s))[:, :C_t]
    lit.expand_bn.reset_running_stats()
    f_t = y0 + 1e-3 * y0.std() * torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    g = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)
    return lit.to(device), f_s.to(device), f_t.to(device), g.to(device)


def run(mod, f_s, f_t, g):
    f_s = f_s.clone().requires_grad_()
    f_t = f_t.clone().requires_grad_()
    feats, loss = mod(f_s, f_t)
    (loss + (feats * g).sum()).backward()
    return [loss.detach(), feats.detach(), f_s.grad, f_t.grad] + [p.grad for p in mod.parameters()]


NAMES = ["loss", "features", "grad f_s", "grad f_t", "grad expand.weight",
         "grad expand_bn.weight", "grad expand_bn.bias", "grad contract.weight",
         "grad contract_bn.weight", "grad contract_bn.bias"]


def errors_of(backend, algorithm, lit, f_s, f_t, g, device):
    B, C_s, C_t, H, W, n = SHAPE
    mod = NORM(C_s, C_t, n, detach_teacher=False, backend=backend, algorithm=algorithm)
    mod.load_state_dict(lit.state_dict())
    mod = mod.to(device, torch.float32)
    got = run(mod, f_s.float(), f_t.float(), g.float())
    truth_mod = NORM(C_s, C_t, n, detach_teacher=False, backend="torch")
    truth_mod.load_state_dict(lit.state_dict())
    truth = run(truth_mod.to(device, torch.float64), f_s, f_t, g)
    return [rel_err(a, b) for a, b in zip(got, truth)]


@pytest.mark.parametrize("device", DEVICES)
def test_float32_near_convergence(device):
    lit, f_s, f_t, g = near_convergence(device)
    literal = errors_of("torch", "direct", lit, f_s, f_t, g, device)
    for backend, algorithm in paths_for(device)[1:]:
        if is_interpreted(device, backend) and algorithm == "direct":
            continue  # the interpreted direct path is covered in float64 at smaller shapes
        errs = errors_of(backend, algorithm, lit, f_s, f_t, g, device)
        assert errs[0] <= 1e-5, f"{backend}/{algorithm} loss rel err {errs[0]:.2e}"
        for name, e, r in zip(NAMES[1:], errs[1:], literal[1:]):
            # 4x the literal float32 error, with a floor of 16 float32 ulps (2e-6) where
            # both are at rounding level: there the literal's own error varies run to run
            # (threaded reductions) by more than 4x. A regression to the Gram form misses
            # by three orders of magnitude (test below).
            assert e <= 4 * r + 2e-6, f"{backend}/{algorithm} {name}: {e:.2e} vs literal {r:.2e}"


def gram_form_loss(lit, f_s, f_t):
    """The textbook expansion sum_i ||Y_i||^2 - 2<Y_i, T> + ||T||^2 from second moments,
    in float32: what the decomposed algorithm must NOT regress to."""
    n, C_t = lit.n, f_t.shape[1]
    B, C_s, H, W = f_s.shape
    P = B * H * W
    X = f_s.float().permute(1, 0, 2, 3).reshape(C_s, P)
    T = f_t.float().permute(1, 0, 2, 3).reshape(C_t, P)
    bn = lit.expand_bn
    W1 = lit.expand.weight.float().reshape(n * C_t, C_s)
    xbar = X.mean(1)
    Xc = X - xbar[:, None]
    S = Xc @ Xc.T / P
    a = bn.weight.float() / torch.sqrt((W1 @ S * W1).sum(1) + bn.eps)
    A = a[:, None] * W1
    b = bn.bias.float()
    G = Xc @ Xc.T
    total = 0.0
    for i in range(n):
        Ai, bi = A[i * C_t:(i + 1) * C_t], b[i * C_t:(i + 1) * C_t]
        yy = (Ai @ G * Ai).sum() + P * (bi * bi).sum()
        yt = (Ai @ (Xc @ T.T)).trace() + (bi * T.sum(1)).sum()
        total = total + yy - 2 * yt + (T * T).sum()
    return total / (C_t * P)


def test_gram_form_would_fail_this_test():
    """The setting above is hard enough: the Gram form misses the 1e-5 bound by far."""
    lit, f_s, f_t, _ = near_convergence("cpu")
    truth_mod = NORM(SHAPE[1], SHAPE[2], SHAPE[5], backend="torch").double()
    truth_mod.load_state_dict(lit.state_dict())
    _, truth = truth_mod(f_s, f_t)
    assert rel_err(gram_form_loss(lit, f_s, f_t), truth) > 1e-3
