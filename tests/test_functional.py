"""functional.norm_loss against the literal formula, gradcheck, match_spatial."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from norm_fast import NORM, functional, match_spatial

from conftest import DEVICES, is_interpreted, paths_for
from literal import rel_err

SHAPES = [(2, 6, 10, 7, 7, 8), (1, 5, 3, 5, 3, 2), (3, 17, 9, 1, 1, 1), (2, 33, 20, 5, 3, 1)]


def literal_loss(f_s, f_t, w, n, reduction):
    loss = F.mse_loss(F.conv2d(f_s, w.reshape(w.shape[0], -1, 1, 1)), f_t.repeat(1, n, 1, 1)) * n
    return loss / n if reduction == "mean" else loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_4d", [False, True])
def test_norm_loss_matches_literal(device, shape, reduction, weight_4d):
    B, C_s, C_t, H, W, n = shape
    gen = torch.Generator().manual_seed(1)
    f_s = (torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64) + 1).to(device)
    f_t = torch.randn(B, C_t, H, W, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(n * C_t, C_s, generator=gen, dtype=torch.float64).to(device)
    if weight_4d:
        w = w[:, :, None, None]
    truth_inputs = [v.clone().requires_grad_() for v in (f_s, f_t, w)]
    truth = literal_loss(*truth_inputs, n, reduction)
    truth.backward()
    for backend, algorithm in paths_for(device):
        if is_interpreted(device, backend) and shape[0] * shape[3] * shape[4] > 60:
            continue
        ins = [v.clone().requires_grad_() for v in (f_s, f_t, w)]
        loss = functional.norm_loss(*ins, n, segment_reduction=reduction, backend=backend,
                                    algorithm=algorithm)
        loss.backward()
        assert loss.shape == ()
        assert rel_err(loss, truth) < 1e-9, (backend, algorithm)
        for got, want, name in zip(ins, truth_inputs, ("f_s", "f_t", "weight")):
            assert rel_err(got.grad, want.grad) < 1e-9, (backend, algorithm, name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_norm_loss(device):
    gen = torch.Generator().manual_seed(2)
    f_s = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64).to(device)
    f_t = torch.randn(2, 4, 2, 3, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64).to(device)
    for backend, algorithm in paths_for(device):
        fn = lambda a, b, c: functional.norm_loss(a, b, c, 2, backend=backend, algorithm=algorithm)
        assert torch.autograd.gradcheck(fn, [v.clone().requires_grad_() for v in (f_s, f_t, w)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batchnorm", [True, False])
def test_gradcheck_module_loss(device, batchnorm):
    gen = torch.Generator().manual_seed(3)
    f_s = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64).to(device)
    f_t = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64).to(device)
    for backend, algorithm in paths_for(device):
        mod = NORM(3, 2, 3, batchnorm=batchnorm, detach_teacher=False, backend=backend,
                   algorithm=algorithm).double().to(device)
        names = [k for k, _ in mod.named_parameters()]

        def fn(a, b, *ps):
            # The module with its parameters replaced by the gradcheck inputs.
            feats, loss = torch.func.functional_call(mod, dict(zip(names, ps)), (a, b))
            return loss, feats

        ins = [f_s.clone().requires_grad_(), f_t.clone().requires_grad_()]
        ins += [p.detach().clone().requires_grad_() for p in mod.parameters()]
        assert torch.autograd.gradcheck(fn, ins)


def test_match_spatial():
    gen = torch.Generator().manual_seed(4)
    f_s = torch.randn(2, 3, 8, 6, generator=gen)
    f_t = torch.randn(2, 5, 4, 3, generator=gen)
    a, b = match_spatial(f_s, f_t)
    assert a.shape == (2, 3, 4, 3) and b is f_t
    assert torch.equal(a, F.max_pool2d(f_s, 2))
    b2, a2 = match_spatial(f_t, f_s)
    assert a2.shape == (2, 3, 4, 3) and b2 is f_t
    same_s, same_t = match_spatial(f_s, f_s)
    assert same_s is f_s and same_t is f_s
    with pytest.raises(ValueError, match="divide"):
        match_spatial(torch.randn(1, 1, 5, 5), torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="at least as large"):
        match_spatial(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 2, 4))
