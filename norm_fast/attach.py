"""Attach NORM to an existing model without editing its code, and merge it away after.

    norm = norm_fast.attach(student, "layer4", teacher_channels=512, n=8)
    for x, y in loader:
        norm.set_teacher(teacher_features(x))     # (B, C_t, H, W), used by the next forward only
        logits = student(x)                       # the stage output is replaced by the FT features
        loss = F.cross_entropy(logits, y) + alpha * norm.last_loss
    norm_fast.merge(student, "fc")                # plain student, same eval outputs

`attach` registers `norm.hook` as a forward hook on the named stage and the NORM module
as a submodule of the model (its parameters are in `model.parameters()`, its state in
`model.state_dict()`, and `model.train()` / `model.eval()` / `model.to()` reach it).
`merge` folds the eval-mode FT into the linear classifier (DESIGN.md s.2) and removes it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .module import NORM

_NAME_PREFIX = "norm_"


def _attr_name(stage_name: str) -> str:
    """The attribute under which the FT is registered on the model: "norm_<stage>"."""
    return _NAME_PREFIX + stage_name.replace(".", "_")


def _some_names(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return (shown + more) if names else "(the model has no submodules)"


def _get_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty dotted submodule name such as 'layer4' "
                         f"or 'features.7', got {name!r}; valid names include: "
                         f"{_some_names(model)}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} {name!r} is not a submodule of {type(model).__name__}; "
                         f"valid names include: {_some_names(model)}") from None


def infer_out_channels(stage: nn.Module) -> Optional[int]:
    """Output channels of `stage` read from its last Conv2d / BatchNorm2d (module order).

    Static, nothing is run: the last such layer registered in `stage` (or `stage` itself)
    is taken as the one that produces its output, which holds for the usual stages
    (ResNet layers, VGG/MobileNet feature blocks). Returns None when there is none.
    """
    channels = None
    for m in stage.modules():
        if isinstance(m, nn.Conv2d):
            channels = m.out_channels
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            channels = m.num_features
    return channels


def _param_like(model: nn.Module, stage: nn.Module):
    """(device, dtype) of the stage's parameters, else the model's, else the defaults."""
    for module in (stage, model):
        for p in module.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def attach(model: nn.Module, name: str, teacher_channels: int, n: int = 8, **kw) -> NORM:
    """Put a NORM Feature Transform after the submodule `name` of `model`; return it.

    Args:
        model: the student, an nn.Module.
        name: dotted path of the stage whose output (B, C_s, H, W) the FT replaces, as in
            `model.get_submodule(name)`: "layer4", "features.7".
        teacher_channels: C_t, channels of the teacher features passed to `set_teacher`.
        n: N, the expansion factor (default 8).
        **kw: keyword arguments of `NORM` (batchnorm, residual, segment_reduction, backend,
            ...), plus `student_channels=` to give C_s explicitly. Without it C_s is read
            from the last Conv2d / BatchNorm2d inside the stage (`infer_out_channels`);
            give it when the stage ends in something else (a pooling with a projection
            elsewhere, a squeeze-excitation block registered last, ...).

    The NORM is created on the device and dtype of the stage's (else the model's)
    parameters, registered on `model` as `norm_<name with dots as underscores>` and hooked
    with `stage.register_forward_hook(norm.hook)` (handle in `norm._hook_handle`, stage
    name in `norm._attached_to`). Each forward of the stage then returns the FT features
    (B, C_s, H, W) instead of its output, and sets `norm.last_loss` (0-dim) from the
    teacher given to `norm.set_teacher(f_t)` (f_t: (B, C_t, H, W), same H, W as the stage
    output: use `norm_fast.match_spatial` first if they differ), or to None when no
    teacher was set. A teacher is consumed by one forward and never reused.
    `norm.remove()` removes the hook (the FT stays a submodule); `merge` folds it away.

    Raises:
        ValueError: `name` is not a submodule (the message lists valid names), the
            student channels cannot be inferred, or the attribute name is already taken.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stage = _get_submodule(model, name, "stage name")
    if isinstance(stage, NORM):
        raise ValueError(f"stage {name!r} is itself a NORM module: attach to a stage of the "
                         "student (e.g. 'layer4'), not to a Feature Transform")
    student_channels = kw.pop("student_channels", None)
    if student_channels is None:
        student_channels = infer_out_channels(stage)
        if student_channels is None:
            raise ValueError(f"cannot infer the output channels of stage {name!r} "
                             f"({type(stage).__name__}): expected a Conv2d or BatchNorm2d "
                             "inside it, found none; pass student_channels=C_s")
    attr = _attr_name(name)
    if hasattr(model, attr):
        raise ValueError(f"cannot register the NORM as {attr!r}: {type(model).__name__} "
                         f"already has an attribute of that name (is {name!r} already "
                         "attached? call merge() or remove the existing one first)")
    device, dtype = _param_like(model, stage)
    norm = NORM(student_channels, teacher_channels, n, **kw).to(device=device, dtype=dtype)
    norm.train(model.training)
    model.add_module(attr, norm)
    norm._hook_handle = stage.register_forward_hook(norm.hook)
    norm._attached_to = name
    return norm


def _find_norms(model: nn.Module) -> List[tuple]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM)]


def merge(model: nn.Module, fc_name: str = "fc", norm: Optional[NORM] = None) -> nn.Module:
    """Fold an attached FT into the classifier `model.<fc_name>` and remove the FT.

    Replaces the nn.Linear `fc_name` (in_features C_s, any out_features) by
    `norm.merge_into(fc)`, removes the forward hook and deletes the NORM submodule, in
    place; returns `model`. Afterwards the model has exactly the parameters of the plain
    student and, in eval mode, the outputs of the student with the FT (BatchNorm running
    statistics; up to floating-point rounding).

    Valid ONLY when the attached stage's output (B, C_s, H, W) goes straight to global
    average pooling and then to this linear classifier (DESIGN.md s.2): the FT is a
    per-position affine map, which commutes with average pooling and composes with a
    linear layer, but not with anything non-linear (a BN + ReLU after the stage, as in
    wide ResNets, or a max pooling, a dropout in train mode, a second branch reading the
    stage output). That structure lives in the model's forward code and cannot be checked
    statically here: compare the eval outputs before and after on a batch if unsure (the
    tests do).

    Args:
        model: the student the FT was attached to with `attach`.
        fc_name: dotted path of the classifier, an nn.Linear ("fc", "classifier.1").
        norm: the NORM to merge; by default the only NORM submodule of `model`.

    Raises:
        ValueError: no NORM, or several and `norm` not given; `norm` not a submodule of
            `model` or not attached (hook already removed); `fc_name` not a submodule;
            channel mismatch.
        TypeError: the classifier is not an nn.Linear.
    """
    found = _find_norms(model)
    if norm is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no NORM submodule to merge: "
                             "expected one attached with norm_fast.attach")
        if len(found) > 1:
            raise ValueError(f"{type(model).__name__} has {len(found)} NORM submodules "
                             f"({', '.join(repr(n) for n, _ in found)}): pass norm= to say "
                             "which to merge")
        norm_path, norm = found[0]
    else:
        matches = [n for n, m in found if m is norm]
        if not matches:
            raise ValueError("norm is not a submodule of the model: expected the NORM "
                             "returned by norm_fast.attach(model, ...)")
        norm_path = matches[0]
    if getattr(norm, "_hook_handle", None) is None:
        raise ValueError(f"the NORM {norm_path!r} is not attached (no forward hook: it was "
                         "removed or never registered), so the model's outputs do not go "
                         "through it and folding it into the classifier would change them")
    fc = _get_submodule(model, fc_name, "fc_name")
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"merge expects {fc_name!r} to be an nn.Linear classifier, got "
                        f"{type(fc).__name__}")
    merged = norm.merge_into(fc)          # raises before anything changes on a mismatch
    fc_parent, _, fc_attr = fc_name.rpartition(".")
    setattr(model.get_submodule(fc_parent), fc_attr, merged)
    norm.remove()
    norm_parent, _, norm_attr = norm_path.rpartition(".")
    delattr(model.get_submodule(norm_parent), norm_attr)
    norm.last_loss = None
    norm.set_teacher(None)
    return model
