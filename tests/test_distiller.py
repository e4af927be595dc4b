"""`norm_fast.Distiller`: mdistiller's Distiller interface around attach/merge.

On local models with torchvision's structure at tiny widths (tests/tiny_models.py):
torchvision itself does not import beside the pinned CPU torch here.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import norm_fast
from norm_fast import NORM, Distiller

import tiny_models


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def data(B=4, hw=64, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, hw, hw, generator=gen),
            torch.randint(0, classes, (B,), generator=gen))


def make(schedule=None, **kw):
    torch.manual_seed(0)
    teacher = tiny_models.resnet34(num_classes=10)
    student = tiny_models.resnet18(num_classes=10)
    return Distiller(student, teacher, "layer4", "layer4", n=4, schedule=schedule, **kw)


def test_interface_and_losses_equal_a_hand_written_step():
    d = make()
    assert isinstance(d, nn.Module) and isinstance(d.norm, NORM)
    assert not any(p.requires_grad for p in d.teacher.parameters())
    d.train()
    assert d.student.training and d.norm.training and not d.teacher.training
    params = d.get_learnable_parameters()
    assert {id(p) for p in params} == {id(p) for p in d.student.parameters()}
    assert {id(p) for p in d.norm.parameters()} <= {id(p) for p in params}
    assert d.get_extra_parameters() == n_params(d.norm) > 0

    x, y = data()
    ref_student = copy.deepcopy(d.student)           # same FT, same running stats
    logits, losses = d.forward_train(x, y)
    assert set(losses) == {"loss_ce", "loss_norm"}
    assert all(v.dim() == 0 for v in losses.values())
    # By hand: teacher features, then the student with the FT set on them.
    seen = []
    h = d.teacher.layer4.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        d.teacher(x)
    h.remove()
    ref_student.norm_layer4.set_teacher(seen[0])
    want_logits = ref_student(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(want_logits, y))
    torch.testing.assert_close(losses["loss_norm"], ref_student.norm_layer4.last_loss)
    # forward() dispatches on the mode, like mdistiller's.
    out = d(x, y)
    assert isinstance(out, tuple) and set(out[1]) == {"loss_ce", "loss_norm"}
    d.eval()
    assert not d.student.training and not d.teacher.training
    with torch.no_grad():
        torch.testing.assert_close(d(x), d.forward_test(x))


def test_schedule_and_weights():
    d = make(schedule="imagenet", alpha=2.0, ce_weight=0.5).train()
    x, y = data()
    with pytest.raises(ValueError, match="needs the epoch"):
        d.forward_train(x, y)
    assert d.norm_loss_weight(0) == pytest.approx(2.0 * 0.1)
    assert d.norm_loss_weight(30) == pytest.approx(2.0 * 0.9)
    d.train()
    _, a = d.forward_train(x, y, epoch=30)
    assert torch.isfinite(a["loss_norm"])
    with pytest.raises(ValueError, match="schedule must be None or one of"):
        make(schedule="cosine")
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        make(alpha=-1)
    with pytest.raises(ValueError, match="needs the target"):
        make().train()(x)


def test_a_short_training_run_and_export():
    d = make().train()
    plain = n_params(tiny_models.resnet18(num_classes=10))
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.02, momentum=0.9)
    first = None
    for step in range(4):
        x, y = data(B=8, seed=step % 2)
        _, losses = d.forward_train(x, y, epoch=0)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first                      # two batches seen twice: it learns
    assert all(p.grad is None for p in d.teacher.parameters())
    x, _ = data(B=8, seed=5)
    d.eval()
    with torch.no_grad():
        want = d.forward_test(x)
    student, diff = d.export(check=x)
    assert diff < 1e-4
    assert n_params(student) == plain
    assert not any(isinstance(m, NORM) for m in student.modules())
    assert not student.training
    with torch.no_grad():
        torch.testing.assert_close(student(x), want, rtol=1e-4, atol=1e-5)
    # The Distiller is untouched and trains on.
    assert isinstance(d.student.norm_layer4, NORM)
    d.train()
    _, losses = d.forward_train(*data(B=8), epoch=1)
    assert torch.isfinite(losses["loss_norm"])
    assert isinstance(d.export(), nn.Module)


def test_mobilenet_v2_student_of_a_resnet50_teacher():
    torch.manual_seed(0)
    d = Distiller(tiny_models.mobilenet_v2(num_classes=10), tiny_models.resnet50(num_classes=10),
                  "features", "layer4", n=8, fc_name="classifier.1").train()
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01)
    for step in range(2):
        _, losses = d.forward_train(*data(seed=step))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    x, _ = data(seed=9)
    student, diff = d.export(check=x)
    assert diff < 1e-4
    assert n_params(student) == n_params(tiny_models.mobilenet_v2(num_classes=10))
