"""Classifier merge (docs/design.md section 2) and state-dict compatibility with a literal FT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from norm_fast import NORM

from conftest import DEVICES, paths_for
from literal import LiteralFT, randomise_bn, rel_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batchnorm,residual", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_equals_ft_then_classifier(device, batchnorm, residual, bias):
    gen = torch.Generator().manual_seed(0)
    mod = NORM(6, 5, 4, batchnorm=batchnorm, residual=residual).double()
    randomise_bn(mod, gen)
    mod = mod.to(device).eval()
    fc = nn.Linear(6, 3, bias=bias).double().to(device)
    before = {k: v.clone() for k, v in fc.state_dict().items()}
    merged = mod.merge_into(fc)
    f_s = (torch.randn(4, 6, 5, 3, generator=gen, dtype=torch.float64) + 1).to(device)
    feats, _ = mod(f_s)
    want = fc(feats.mean((2, 3)))
    got = merged(f_s.mean((2, 3)))
    assert rel_err(got, want) < 1e-12
    # fc is untouched and the merged student has no parameter more than fc.
    for k, v in fc.state_dict().items():
        assert torch.equal(v, before[k])
    assert merged.weight.shape == fc.weight.shape
    assert sum(p.numel() for p in merged.parameters()) <= fc.weight.numel() + fc.out_features


def test_merge_rejects_wrong_classifier():
    mod = NORM(6, 5, 2)
    with pytest.raises(ValueError, match="in_features"):
        mod.merge_into(nn.Linear(7, 3))
    with pytest.raises(TypeError, match="nn.Linear"):
        mod.merge_into(nn.Conv2d(6, 3, 1))


def test_merge_rejects_batchnorm_without_running_stats():
    mod = NORM(6, 5, 2)
    mod.expand_bn = nn.BatchNorm2d(10, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        mod.merge_into(nn.Linear(6, 3))


@pytest.mark.parametrize("batchnorm", [True, False])
def test_state_dict_loads_both_ways(batchnorm):
    mod = NORM(6, 5, 3, batchnorm=batchnorm)
    lit = LiteralFT(6, 5, 3, batchnorm=batchnorm)
    assert list(mod.state_dict()) == list(lit.state_dict())
    lit.load_state_dict(mod.state_dict(), strict=True)
    mod2 = NORM(6, 5, 3, batchnorm=batchnorm)
    mod2.load_state_dict(lit.state_dict(), strict=True)
    for a, b in zip(mod.state_dict().values(), mod2.state_dict().values()):
        assert torch.equal(a, b)


def test_submodules_and_initialisation():
    torch.manual_seed(0)
    mod = NORM(64, 32, 8)
    assert isinstance(mod.expand, nn.Conv2d) and mod.expand.weight.shape == (256, 64, 1, 1)
    assert mod.expand.bias is None and mod.contract.bias is None
    assert mod.contract.weight.shape == (64, 256, 1, 1)
    assert isinstance(mod.expand_bn, nn.BatchNorm2d) and mod.expand_bn.num_features == 256
    assert isinstance(mod.contract_bn, nn.BatchNorm2d) and mod.contract_bn.num_features == 64
    # Kaiming normal, fan_out, relu: std = sqrt(2 / fan_out).
    assert abs(mod.expand.weight.std().item() - (2 / 256) ** 0.5) < 0.1 * (2 / 256) ** 0.5
    assert abs(mod.contract.weight.std().item() - (2 / 64) ** 0.5) < 0.1 * (2 / 64) ** 0.5
    assert torch.equal(mod.expand_bn.weight, torch.ones(256))
    assert torch.equal(mod.contract_bn.bias, torch.zeros(64))
    plain = NORM(64, 32, 8, batchnorm=False)
    assert isinstance(plain.expand_bn, nn.Identity) and isinstance(plain.contract_bn, nn.Identity)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_falls_when_training(device):
    """A few optimisation steps of a tiny student with NORM on synthetic data."""
    torch.manual_seed(0)
    teacher = nn.Conv2d(3, 12, 3, padding=1).to(device)
    for backend, algorithm in paths_for(device):
        torch.manual_seed(1)
        student = nn.Conv2d(3, 8, 3, padding=1).to(device)
        norm = NORM(8, 12, 4, backend=backend, algorithm=algorithm).to(device)
        opt = torch.optim.SGD(list(student.parameters()) + list(norm.parameters()), lr=0.05,
                              momentum=0.9)
        losses = []
        for it in range(30):
            x = torch.randn(8, 3, 6, 6, device=device)
            with torch.no_grad():
                f_t = torch.relu(teacher(x))
            _, loss = norm(torch.relu(student(x)), f_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (backend, algorithm, losses)
