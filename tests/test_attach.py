"""`norm_fast.attach` / `norm_fast.merge`: NORM on an unmodified model through a forward hook."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import norm_fast
from norm_fast import NORM

from conftest import DEVICES
from literal import LiteralFT, randomise_bn, rel_err
import tiny_models

C_IN, C_MID, C_S, C_T, N_CLASSES = 3, 6, 8, 5, 4


def block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """stem -> layer1 -> layer2 (the last stage, C_S channels) -> global avg pool -> fc."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = block(C_IN, C_MID)
        self.layer1 = block(C_MID, C_MID)
        self.layer2 = nn.Sequential(block(C_MID, C_S, 2), block(C_S, C_S))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C_S, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class SeqHeadCNN(nn.Module):
    """A classifier inside a Sequential ("classifier.1") and a stage at "features.2"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.features = nn.Sequential(block(C_IN, C_MID), block(C_MID, C_MID, 2),
                                      block(C_MID, C_S))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(C_S, N_CLASSES))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def batch(device, B=4, H=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, H, H, generator=gen, dtype=torch.float64).to(device)
    f_t = torch.randn(B, C_T, H // 2, H // 2, generator=gen, dtype=torch.float64).to(device)
    return x, f_t


def capture(stage):
    """Register a hook on `stage` that records its (possibly already replaced) output."""
    seen = []
    handle = stage.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return seen, handle


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_attach_registers_submodule_parameters_and_state(device):
    model = SmallCNN().double().to(device)
    plain_params = n_params(model)
    norm = norm_fast.attach(model, "layer2", teacher_channels=C_T, n=3)
    assert isinstance(norm, NORM)
    assert (norm.student_channels, norm.teacher_channels, norm.n) == (C_S, C_T, 3)
    assert model.norm_layer2 is norm
    assert norm._attached_to == "layer2" and norm._hook_handle is not None
    assert norm.expand.weight.dtype == torch.float64
    assert norm.expand.weight.device.type == device
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in norm.parameters())
    assert n_params(model) == plain_params + n_params(norm)
    keys = model.state_dict().keys()
    for k in norm.state_dict():
        assert f"norm_layer2.{k}" in keys
    assert "norm_layer2.expand_bn.running_mean" in keys
    model.eval()
    assert not norm.training           # train()/eval() of the model reach the FT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,algorithm", [("auto", "auto"), ("torch", "direct"),
                                               ("torch", "decomposed")])
def test_hooked_forward_equals_direct_norm(device, backend, algorithm):
    model = SmallCNN().double().to(device).train()
    raw, h_raw = capture(model.layer2)             # registered first: sees the stage output
    norm = norm_fast.attach(model, "layer2", C_T, n=3, backend=backend, algorithm=algorithm)
    replaced, h_rep = capture(model.layer2)        # registered after: sees the FT features
    x, f_t = batch(device)
    before = copy.deepcopy(norm)                   # same parameters and running stats
    literal = LiteralFT(C_S, C_T, 3).double().to(device)
    literal.load_state_dict(norm.state_dict(), strict=True)

    norm.set_teacher(f_t)
    logits = model(x)
    f_s = raw[0]
    want_feats, want_loss = before(f_s, f_t)
    lit_feats, lit_loss = literal(f_s, f_t)

    assert norm.last_loss is not None and norm.last_loss.dim() == 0
    assert rel_err(norm.last_loss, want_loss) < 1e-10
    assert rel_err(norm.last_loss, lit_loss) < 1e-10
    # The stage output seen downstream is the FT features, and the logits follow from them.
    assert rel_err(replaced[0], want_feats) < 1e-10
    assert rel_err(replaced[0], lit_feats) < 1e-10
    assert rel_err(logits, model.fc(replaced[0].mean((2, 3)))) < 1e-10
    # The FT's BatchNorm running statistics were updated by the training forward.
    assert rel_err(norm.expand_bn.running_mean, literal.expand_bn.running_mean) < 1e-10
    assert rel_err(norm.contract_bn.running_var, literal.contract_bn.running_var) < 1e-10
    h_raw.remove(), h_rep.remove()


def test_loss_backpropagates_into_student_and_ft():
    model = SmallCNN().double().train()
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    x, f_t = batch("cpu")
    y = torch.arange(x.shape[0]) % N_CLASSES
    f_t.requires_grad_(True)
    norm.set_teacher(f_t)
    loss = F.cross_entropy(model(x), y) + 0.5 * norm.last_loss
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert model.stem[0].weight.grad.abs().sum() > 0
    assert norm.expand.weight.grad.abs().sum() > 0
    assert f_t.grad is None                        # the teacher is detached by default


def test_teacher_is_consumed_by_one_forward():
    model = SmallCNN().double().train()
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    x, f_t = batch("cpu")
    assert norm.last_loss is None
    with pytest.warns(RuntimeWarning, match="got no teacher features"):
        model(x)                                   # no teacher set: no loss, and a warning
    assert norm.last_loss is None
    norm.set_teacher(f_t)
    model(x)
    assert norm.last_loss is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # warned once per NORM, not every step
        model(x)                                   # the teacher is not reused stale
    assert norm.last_loss is None
    norm.set_teacher(f_t)
    model.eval()
    with torch.no_grad():
        model(x)                                   # an eval forward with a teacher: a loss too
    assert norm.last_loss is not None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")             # eval forwards need no teacher
        model(x)
    assert norm.last_loss is None


def test_missing_teacher_modes():
    x, _ = batch("cpu")
    model = SmallCNN().double().train()
    norm_fast.attach(model, "layer2", C_T, n=2, missing_teacher="error")
    with pytest.raises(RuntimeError, match="no teacher features.*missing_teacher='error'"):
        model(x)
    model = SmallCNN().double().train()
    norm = norm_fast.attach(model, "layer2", C_T, n=2, missing_teacher="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert norm.last_loss is None
    with pytest.raises(ValueError, match="missing_teacher must be one of"):
        norm_fast.attach(SmallCNN(), "layer2", C_T, missing_teacher="raise")


def test_student_map_smaller_pools_the_teacher_and_bad_ratios_are_errors():
    model = SmallCNN().double().train()
    raw, h = capture(model.layer2)                 # the stage output before the FT
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    x, _ = batch("cpu")                            # the student stage gives 4x4 maps
    big = torch.randn(4, C_T, 8, 8, dtype=torch.float64)
    before = copy.deepcopy(norm)
    norm.set_teacher(big)
    model(x)
    _, small = norm_fast.match_spatial(raw[0], big)
    assert small.shape[2:] == (4, 4)
    assert rel_err(norm.last_loss, before(raw[0], small)[1]) < 1e-10
    norm.set_teacher(torch.randn(4, C_T, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="must divide"):
        model(x)
    h.remove()


def test_remove_restores_the_plain_forward():
    model = SmallCNN().double().eval()
    x, _ = batch("cpu")
    with torch.no_grad():
        plain = model(x)
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    randomise_bn(norm, torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_ft = model(x)
    assert rel_err(with_ft, plain) > 1e-3          # the FT changes the outputs ...
    norm.remove()
    assert len(model.layer2._forward_hooks) == 0
    with torch.no_grad():
        assert torch.equal(model(x), plain)        # ... and no longer once removed
    norm.remove()                                  # a second remove() is harmless
    assert model.norm_layer2 is norm               # the FT stays a submodule


# ------------------------------------------------------------------------------------------
def train_a_little(model, norm, steps=3):
    """A few SGD steps with the FT so that every parameter and running stat is non-trivial."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for s in range(steps):
        x, f_t = batch("cpu", seed=10 + s)
        y = torch.arange(x.shape[0]) % N_CLASSES
        norm.set_teacher(f_t)
        loss = F.cross_entropy(model(x), y) + norm.last_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_merge_gives_the_ft_students_outputs_with_plain_parameters(device):
    model = SmallCNN().double()
    plain_params = n_params(model)
    plain_keys = set(model.state_dict())
    norm = norm_fast.attach(model, "layer2", C_T, n=3)
    randomise_bn(norm, torch.Generator().manual_seed(4))
    train_a_little(model, norm)
    model.to(device).eval()
    x, _ = batch(device, B=6, seed=99)
    with torch.no_grad():
        want = model(x)
    assert norm_fast.merge(model, "fc") is model
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max().item() < 1e-10
    assert n_params(model) == plain_params
    assert set(model.state_dict()) == plain_keys
    assert not any(isinstance(m, NORM) for m in model.modules())
    assert not hasattr(model, "norm_layer2")
    assert len(model.layer2._forward_hooks) == 0
    assert isinstance(model.fc, nn.Linear) and model.fc.weight.dtype == torch.float64


def test_merge_with_explicit_norm_and_nested_names():
    model = SeqHeadCNN().double()
    plain_params = n_params(model)
    norm = norm_fast.attach(model, "features.2", C_T, n=2)
    assert model.norm_features_2 is norm and norm._attached_to == "features.2"
    randomise_bn(norm, torch.Generator().manual_seed(5))
    model.eval()
    x, _ = batch("cpu")
    with torch.no_grad():
        want = model(x)
    norm_fast.merge(model, "classifier.1", norm=norm)
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max().item() < 1e-10
    assert n_params(model) == plain_params
    assert isinstance(model.classifier[1], nn.Linear)


def test_student_channels_override_and_float32():
    model = SmallCNN()                              # float32
    norm = norm_fast.attach(model, "layer2", C_T, n=2, student_channels=C_S,
                            batchnorm=False)
    assert norm.expand.weight.dtype == torch.float32 and not norm.batchnorm
    model.eval()
    x = torch.randn(2, C_IN, 8, 8)
    with torch.no_grad():
        want = model(x)
        norm_fast.merge(model)
        assert torch.allclose(model(x), want, rtol=1e-5, atol=1e-5)


# --- errors -------------------------------------------------------------------------------
def test_attach_unknown_stage_lists_valid_names():
    model = SmallCNN()
    with pytest.raises(ValueError, match=r"'layer9'.*valid names include: 'stem'"):
        norm_fast.attach(model, "layer9", C_T)
    with pytest.raises(ValueError, match="non-empty"):
        norm_fast.attach(model, "", C_T)
    with pytest.raises(TypeError, match="nn.Module"):
        norm_fast.attach(object(), "layer2", C_T)


def test_attach_cannot_infer_channels():
    model = SmallCNN()
    with pytest.raises(ValueError, match="cannot infer .*'pool'.*student_channels"):
        norm_fast.attach(model, "pool", C_T)
    norm = norm_fast.attach(model, "pool", C_T, n=2, student_channels=C_S)
    assert norm.student_channels == C_S


def test_attach_twice_to_the_same_stage_is_an_error():
    model = SmallCNN()
    norm_fast.attach(model, "layer2", C_T, n=2)
    with pytest.raises(ValueError, match="'norm_layer2'.*already"):
        norm_fast.attach(model, "layer2", C_T, n=2)
    assert len(model.layer2._forward_hooks) == 1


def test_attach_passes_norm_errors_through():
    with pytest.raises(ValueError, match="n must be a positive int"):
        norm_fast.attach(SmallCNN(), "layer2", C_T, n=0)
    with pytest.raises(ValueError, match="segment_reduction"):
        norm_fast.attach(SmallCNN(), "layer2", C_T, segment_reduction="max")


def test_merge_errors_leave_the_model_unchanged():
    model = SmallCNN()
    with pytest.raises(ValueError, match="no NORM submodule"):
        norm_fast.merge(model)
    n1 = norm_fast.attach(model, "layer2", C_T, n=2)
    n2 = norm_fast.attach(model, "layer1", C_T, n=2)
    with pytest.raises(ValueError, match="2 NORM submodules.*norm="):
        norm_fast.merge(model)
    with pytest.raises(ValueError, match="not a submodule"):
        norm_fast.merge(model, norm=NORM(C_S, C_T, 2))
    with pytest.raises(ValueError, match="'head'.*valid names"):
        norm_fast.merge(model, "head", norm=n1)
    with pytest.raises(TypeError, match="nn.Linear.*AdaptiveAvgPool2d"):
        norm_fast.merge(model, "pool", norm=n1)
    with pytest.raises(ValueError, match="in_features"):
        norm_fast.merge(model, "fc", norm=n2)      # layer1 has C_MID channels, fc takes C_S
    n1.remove()
    with pytest.raises(ValueError, match="not attached"):
        norm_fast.merge(model, "fc", norm=n1)
    assert model.norm_layer2 is n1 and model.norm_layer1 is n2
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == C_S


# --- the teacher side: attach(..., teacher=, teacher_layer=) -------------------------------
class TeacherCNN(nn.Module):
    """Like SmallCNN with C_T channels in its last stage and maps of `hw_div` the input's."""

    def __init__(self, stride=2, seed=7):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = block(C_IN, C_MID)
        self.layer2 = nn.Sequential(block(C_MID, C_T, stride), block(C_T, C_T))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C_T, N_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.stem(x))), 1))


def teacher_output(teacher, x):
    with torch.no_grad():
        return teacher.layer2(teacher.stem(x))


@pytest.mark.parametrize("teacher_stride,student_pooled", [(2, False), (1, False), (4, True)])
def test_teacher_hook_feeds_the_student_hook(teacher_stride, student_pooled):
    """Equal maps (stride 2: 4x4 both), a larger teacher map (8x8: pooled to 4x4) and a
    smaller one (2x2: the student's 4x4 is pooled before the FT), as match_spatial does."""
    model = SmallCNN().double().train()
    teacher = TeacherCNN(teacher_stride).double().eval()
    raw, h = capture(model.layer2)
    norm = norm_fast.attach(model, "layer2", teacher=teacher, teacher_layer="layer2", n=3)
    assert norm.teacher_channels == C_T            # read from the teacher's stage
    before = copy.deepcopy(norm)
    x, _ = batch("cpu")
    f_t = teacher_output(teacher, x)
    with torch.no_grad():
        teacher(x)
    logits = model(x)
    f_s, f_t = norm_fast.match_spatial(raw[0], f_t)
    want_feats, want_loss = before(f_s, f_t)
    assert rel_err(norm.last_loss, want_loss) < 1e-10
    assert rel_err(logits, model.fc(want_feats.mean((2, 3)))) < 1e-10
    assert (norm._hook_handle.pool is not None) == student_pooled
    norm.last_loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert norm.expand.weight.grad is not None
    if student_pooled:                             # eval forwards pool the same way
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert out.shape == (4, N_CLASSES)
        with pytest.raises(ValueError, match="max-pooled by"):
            norm_fast.merge(model, "fc")
        assert model.norm_layer2 is norm           # refused: unchanged
    h.remove()


def test_teacher_features_are_detached_and_cast():
    model = SmallCNN().float().train()
    teacher = TeacherCNN().double().train()        # float64, in train mode, with gradients
    norm = norm_fast.attach(model, "layer2", teacher=teacher, n=2)   # teacher_layer = name
    assert norm._teacher_layer == "layer2"
    x, _ = batch("cpu")
    teacher(x)                                     # without no_grad: still detached
    model(x.float())
    assert norm.last_loss.dtype == torch.float32
    norm.last_loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.stem[0].weight.grad is not None


def test_remove_and_merge_remove_the_teacher_hook_too():
    model = SmallCNN().double()
    teacher = TeacherCNN().double().eval()
    norm = norm_fast.attach(model, "layer2", teacher=teacher, n=2)
    assert len(teacher.layer2._forward_hooks) == 1
    norm.remove()
    assert len(teacher.layer2._forward_hooks) == 0 and len(model.layer2._forward_hooks) == 0
    model = SmallCNN().double()
    norm = norm_fast.attach(model, "layer2", teacher=teacher, n=2)
    norm_fast.merge(model, "fc")
    assert len(teacher.layer2._forward_hooks) == 0


def test_deepcopy_of_an_attached_model_uses_its_own_ft():
    model = SmallCNN().double().train()
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    clone = copy.deepcopy(model)
    x, f_t = batch("cpu")
    clone.norm_layer2.set_teacher(f_t)
    clone(x)
    assert clone.norm_layer2.last_loss is not None and norm.last_loss is None


def test_teacher_argument_errors():
    model, teacher = SmallCNN(), TeacherCNN()
    with pytest.raises(ValueError, match="teacher_channels is required"):
        norm_fast.attach(model, "layer2")
    with pytest.raises(ValueError, match="teacher_layer was given without teacher"):
        norm_fast.attach(model, "layer2", C_T, teacher_layer="layer2")
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        norm_fast.attach(model, "layer2", teacher="resnet34")
    with pytest.raises(ValueError, match="teacher_layer 'layer9'.*valid names"):
        norm_fast.attach(model, "layer2", teacher=teacher, teacher_layer="layer9")
    with pytest.raises(ValueError, match="cannot infer the output channels of the teacher"):
        norm_fast.attach(model, "layer2", teacher=teacher, teacher_layer="pool")
    assert not hasattr(model, "norm_layer2")       # nothing registered by the failures


# --- merge(check=...) ---------------------------------------------------------------------
def test_merge_check_reports_the_largest_difference():
    model = SmallCNN().double()
    norm = norm_fast.attach(model, "layer2", C_T, n=3)
    randomise_bn(norm, torch.Generator().manual_seed(4))
    train_a_little(model, norm)
    x, _ = batch("cpu", B=6, seed=99)
    model.train()
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    merged, diff = norm_fast.merge(model, "fc", check=x)
    assert merged is model and model.training      # the mode is restored
    assert 0 <= diff < 1e-10
    with torch.no_grad():
        assert (model.eval()(x) - want).abs().max().item() == pytest.approx(diff, abs=1e-14)


class ReluAfterStage(SmallCNN):
    """The stage output passes a ReLU before pooling: the FT cannot be folded."""

    def forward(self, x):
        f = torch.relu(self.layer2(self.layer1(self.stem(x))) - 0.5)
        return self.fc(torch.flatten(self.pool(f), 1))


def test_merge_check_failure_leaves_the_model_unchanged():
    model = ReluAfterStage().double()
    norm = norm_fast.attach(model, "layer2", C_T, n=3)
    randomise_bn(norm, torch.Generator().manual_seed(4))
    train_a_little(model, norm)
    fc = model.fc
    x, f_t = batch("cpu", B=6, seed=99)
    with pytest.raises(ValueError, match="merge check failed.*model is unchanged"):
        norm_fast.merge(model, "fc", check=x)
    assert model.fc is fc and model.norm_layer2 is norm and norm._hook_handle is not None
    norm.set_teacher(f_t)
    model.train()(x)
    assert norm.last_loss is not None              # still attached and working


# --- real architectures: torchvision's structure at tiny widths (tests/tiny_models.py) -----
@pytest.mark.parametrize("teacher_fn,student_fn,student_layer,teacher_layer,fc_name", [
    (tiny_models.resnet34, tiny_models.resnet18, "layer4", "layer4", "fc"),
    (tiny_models.resnet50, tiny_models.mobilenet_v2, "features", "layer4", "classifier.1"),
])
def test_attach_train_merge_on_torchvision_structures(teacher_fn, student_fn, student_layer,
                                                      teacher_layer, fc_name):
    torch.manual_seed(0)
    teacher, student = teacher_fn(num_classes=10).eval(), student_fn(num_classes=10)
    plain = n_params(student)
    norm = norm_fast.attach(student, student_layer, teacher=teacher,
                            teacher_layer=teacher_layer, n=8)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    student.train()
    for _ in range(2):
        x = torch.randn(4, 3, 64, 64, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        with torch.no_grad():
            teacher(x)
        loss = F.cross_entropy(student(x), y) + norm.last_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    x = torch.randn(4, 3, 64, 64, generator=gen)
    _, diff = norm_fast.merge(student, fc_name, check=x)
    assert diff < 1e-4
    assert n_params(student) == plain


def test_teacher_that_is_not_a_tensor_is_a_type_error():
    model = SmallCNN().double().train()
    norm = norm_fast.attach(model, "layer2", C_T, n=2)
    norm.set_teacher([1.0, 2.0])
    with pytest.raises(TypeError, match="f_t must be a torch.Tensor"):
        model(batch("cpu")[0])
