"""float32 near convergence (docs/design.md sections 4-5): the decomposed form keeps its accuracy.

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


def near_convergence_nobn(device, shape=SHAPE, seed=0):
    """Without BatchNorm: segments = one base map + 1e-3 noise, teacher = segment 0 + noise."""
    B, C_s, C_t, H, W, n = shape
    gen = torch.Generator().manual_seed(seed)
    lit = LiteralFT(C_s, C_t, n, batchnorm=False).double()
    with torch.no_grad():
        base = torch.randn(C_t, C_s, 1, 1, generator=gen, dtype=torch.float64) / C_s ** 0.5
        noise = torch.randn(n, C_t, C_s, 1, 1, generator=gen, dtype=torch.float64)
        lit.expand.weight.copy_((base[None] + 1e-3 * noise * base.std()).reshape(n * C_t, C_s, 1, 1))
    f_s = torch.relu(torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)) + 0.5
    with torch.no_grad():
        y0 = lit.expand(f_s)[:, :C_t]
    f_t = y0 + 1e-3 * y0.std() * torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    g = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)
    return lit.to(device), f_s.to(device), f_t.to(device), g.to(device)


def run(mod, f_s, f_t, g, objective):
    """Outputs and gradients of ONE objective: the loss alone, or <features, g> alone.

    Tested apart: in their sum the loss's share of a gradient can sit below the test's
    floor, and an error in it (even a zeroed gradient) would pass unseen."""
    f_s = f_s.clone().requires_grad_()
    f_t = f_t.clone().requires_grad_()
    feats, loss = mod(f_s, f_t)
    (loss if objective == "loss" else (feats * g).sum()).backward()
    value = loss if objective == "loss" else feats
    return [value.detach(), f_s.grad, f_t.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in mod.parameters()]


def errors_of(backend, algorithm, lit, f_s, f_t, g, device, objective, train, bn=True):
    B, C_s, C_t, H, W, n = SHAPE
    sd = lit.state_dict()

    def make(b, a, dtype):
        mod = NORM(C_s, C_t, n, detach_teacher=False, backend=b, algorithm=a, batchnorm=bn)
        mod.load_state_dict(sd)
        return mod.to(device, dtype).train(train)

    got = run(make(backend, algorithm, torch.float32), f_s.float(), f_t.float(), g.float(),
              objective)
    truth = run(make("torch", "direct", torch.float64), f_s, f_t, g, objective)
    out = []
    for a, b in zip(got, truth):
        if b is None or not b.abs().max() > 0:
            out.append(None)    # (no gradient in this objective, e.g. f_t for the features)
        else:
            out.append(rel_err(a, b))
    return out


NAMES = ["value", "grad f_s", "grad f_t", "grad expand.weight", "grad expand_bn.weight",
         "grad expand_bn.bias", "grad contract.weight", "grad contract_bn.weight",
         "grad contract_bn.bias"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", ["loss", "features"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bn", [True, False])
def test_float32_near_convergence(device, objective, train, bn):
    """Every output and gradient within 4x the literal float32 error (floor 2e-6), for the
    loss and for the features each alone, BatchNorm on and off, train and eval."""
    for seed in (0, 1):
        setup = near_convergence if bn else near_convergence_nobn
        lit, f_s, f_t, g = setup(device, seed=seed)
        literal = errors_of("torch", "direct", lit, f_s, f_t, g, device, objective, train, bn)
        for backend, algorithm in paths_for(device)[1:]:
            if is_interpreted(device, backend) and (algorithm == "direct" or seed):
                continue  # the interpreted direct path is covered in float64 at smaller shapes
            errs = errors_of(backend, algorithm, lit, f_s, f_t, g, device, objective, train, bn)
            names = NAMES if bn else NAMES[:3] + ["grad expand.weight", "grad contract.weight"]
            for name, e, r in zip(names, errs, literal):
                if r is None:
                    continue
                # 4x the literal float32 error, with a floor of 16 float32 ulps (2e-6) where
                # both sit at rounding level (threaded reductions vary the literal's own
                # error run to run by more than 4x there).
                assert e <= 4 * r + 2e-6, \
                    f"{backend}/{algorithm} {objective} {name}: {e:.2e} vs literal {r:.2e}"
            if objective == "loss":
                assert errs[0] <= 1e-5, f"{backend}/{algorithm} loss rel err {errs[0]:.2e}"


def test_loss_gradient_is_checked_apart():
    """The loss objective sees its own gradients: zeroing the loss's gradient w.r.t. f_s
    (the mutant the combined objective could not see) fails the bound by far."""
    lit, f_s, f_t, g = near_convergence("cpu")
    literal = errors_of("torch", "direct", lit, f_s, f_t, g, "cpu", "loss", True)
    B, C_s, C_t, H, W, n = SHAPE
    mod = NORM(C_s, C_t, n, detach_teacher=False, backend="torch", algorithm="decomposed")
    mod.load_state_dict(lit.state_dict())
    got = run(mod, f_s.float(), f_t.float(), g.float(), "loss")
    truth_mod = NORM(C_s, C_t, n, detach_teacher=False, backend="torch")
    truth_mod.load_state_dict(lit.state_dict())
    truth = run(truth_mod.double(), f_s, f_t, g, "loss")
    zeroed = rel_err(torch.zeros_like(got[1]), truth[1])
    assert zeroed > 100 * (4 * literal[1] + 2e-6)


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


BF16_SHAPES = [(4, 64, 64, 7, 7, 8), (2, 40, 24, 5, 5, 3)]  # B, C_s, C_t, H, W, n


def bf16_run(backend, algorithm, state, shape, f_s, f_t, g, device, dtype):
    """Loss, features and every gradient of loss + <features, g>: float64 (dtype None,
    the truth) or float32 parameters under bfloat16 autocast with bfloat16 inputs."""
    B, C_s, C_t, H, W, n = shape
    mod = NORM(C_s, C_t, n, detach_teacher=False, backend=backend, algorithm=algorithm)
    mod = mod.to(device, torch.float64 if dtype is None else torch.float32)
    mod.load_state_dict(state)
    x = f_s.to(dtype or torch.float64).clone().requires_grad_()
    t = f_t.to(dtype or torch.float64).clone().requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                        enabled=dtype is not None):
        feats, loss = mod(x, t)
    torch.autograd.backward((loss, feats), (None, g.to(feats.dtype)))
    return [loss.detach(), feats.detach(), x.grad, t.grad] + [p.grad for p in mod.parameters()]


def bf16_errors(shape, device, seed):
    """{path: [relative error of each quantity vs float64]} for the literal and every
    path, on one draw of weights (seed) with post-ReLU features."""
    B, C_s, C_t, H, W, n = shape
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    f_s, f_t = torch.relu(randn(B, C_s, H, W)), torch.relu(randn(B, C_t, H, W))
    g = randn(B, C_s, H, W)
    torch.manual_seed(seed)  # the convolution weights
    ref = NORM(C_s, C_t, n).double()
    with torch.no_grad():
        for bn in (ref.expand_bn, ref.contract_bn):
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + .5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) - .5)
    state = ref.state_dict()
    f_s, f_t, g = f_s.to(device), f_t.to(device), g.to(device)
    truth = bf16_run("torch", "direct", state, shape, f_s, f_t, g, device, None)
    out = {}
    for path in paths_for(device):
        got = bf16_run(*path, state, shape, f_s, f_t, g, device, torch.bfloat16)
        out[path] = [rel_err(a, b) for a, b in zip(got, truth)]
    return out, ["loss", "features", "grad f_s", "grad f_t"] + [
        f"grad {k}" for k, _ in ref.named_parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_autocast_no_worse_than_literal(device, shape):
    """bfloat16 under autocast, post-ReLU features (many exact zeros): over three draws of
    weights, every path's root-mean-square error within 4x the literal's (in bfloat16,
    against float64) + 1e-4 for the loss, + 1e-3 for features and gradients.

    RMS over draws: one draw's loss error is a sum of many rounding errors and can cancel
    by chance (the literal's was 7.6e-6 on one draw, 2e-4 on the next), a poor yardstick.
    The ReLU zeros are the hard case for tensor-core operands: rounding x - shift to 16
    bits gives every zero of a channel the same error, which does not average out over
    positions (Triton's direct loss was 3.5e-3 off where the literal is 4e-5)."""
    draws = [bf16_errors(shape, device, seed) for seed in (0, 1, 2)]
    names = draws[0][1]
    rms = lambda path: [sum(d[0][path][q] ** 2 for d in draws) ** 0.5 / len(draws) ** 0.5
                        for q in range(len(names))]
    literal = rms(("torch", "direct"))
    for path in paths_for(device)[1:]:
        for name, e, r in zip(names, rms(path), literal):
            floor = 1e-4 if name == "loss" else 1e-3
            assert e <= 4 * r + floor, \
                f"{'/'.join(path)} bfloat16 {name}: RMS {e:.2e} vs literal {r:.2e}"
