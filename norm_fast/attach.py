"""Attach NORM to existing models without editing their code, and merge it away after.

    norm = norm_fast.attach(student, "layer4", teacher=teacher, teacher_layer="layer4", n=8)
    for x, y in loader:
        with torch.no_grad():
            teacher(x)                            # its hook hands layer4's output to the FT
        logits = student(x)                       # layer4's output is replaced by the FT features
        loss = F.cross_entropy(logits, y) + alpha * norm.last_loss
    norm_fast.merge(student, "fc", check=x_val)   # plain student, same eval outputs (checked)

`attach` registers the NORM module as a submodule of the student (its parameters are in
`model.parameters()`, its state in `model.state_dict()`, and `model.train()` /
`model.eval()` / `model.to()` reach it) and a forward hook on the student's stage that
replaces the stage output by the FT features. With `teacher=` it also hooks the
teacher's stage: each teacher forward hands its features (detached) to the next student
forward, so a training step needs no hand-written hook. Without a teacher model, pass the
teacher features by hand with `norm.set_teacher(f_t)` before each student forward.
`merge` folds the eval-mode FT into the linear classifier (docs/design.md section 2) and
removes it and the hooks.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import match_spatial
from .module import NORM

MISSING_TEACHER = ("warn", "error", "ignore")

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


def _channels(given: Optional[int], stage: nn.Module, what: str, name: str, kwarg: str) -> int:
    """`given`, else the channels read from `stage` (`infer_out_channels`); ValueError
    naming the stage and the keyword to pass when they cannot be read."""
    if given is not None:
        return given
    channels = infer_out_channels(stage)
    if channels is None:
        raise ValueError(f"cannot infer the output channels of {what} {name!r} "
                         f"({type(stage).__name__}): expected a Conv2d or BatchNorm2d inside "
                         f"it, found none; pass {kwarg}")
    return channels


def _param_like(model: nn.Module, stage: nn.Module):
    """(device, dtype) of the stage's parameters, else the model's, else the defaults."""
    for module in (stage, model):
        for p in module.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class _Hooks:
    """The hooks of one attached NORM, as `norm._hook_handle` (so `norm.remove()` removes
    them all): the student stage's hook (replace the output by the FT features) and, with
    a teacher model, the teacher stage's hook (hand its output to the next student forward).

    A plain object whose bound methods are the hooks: `copy.deepcopy(model)` copies it with
    the model and rebinds the copy's hooks to the copied NORM.
    """

    def __init__(self, norm: NORM, missing_teacher: str):
        self.norm = norm
        self.missing_teacher = missing_teacher
        self.warned = False
        self.enabled = True               # False while merge() checks the folded model
        self.pool: Optional[Tuple[int, int]] = None   # max-pool of a student map larger than
        self.handles = []                             # the teacher's (see attach)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def teacher_hook(self, stage: nn.Module, inputs, output: Tensor) -> None:
        """Teacher stage forward hook: keep its output, detached, for the next student forward."""
        if not isinstance(output, Tensor):
            raise TypeError(f"the teacher stage {self.norm._teacher_layer!r} must return a "
                            f"tensor (B, C_t, H, W), got {type(output).__name__}")
        self.norm.set_teacher(output.detach())

    def student_hook(self, stage: nn.Module, inputs, output: Tensor) -> Tensor:
        """Student stage forward hook: the FT features (B, C_s, H', W') replace the output."""
        if not self.enabled:
            return output
        norm = self.norm
        f_t, norm._teacher = getattr(norm, "_teacher", None), None
        f_s = output
        if f_t is None:
            if norm.training and self.missing_teacher != "ignore":
                msg = (f"norm_fast: a training-mode forward of the student stage "
                       f"{norm._attached_to!r} got no teacher features, so norm.last_loss is "
                       "None. Run the teacher on the same batch first (`with torch.no_grad(): "
                       "teacher(x)` with attach(..., teacher=teacher)), or call "
                       "norm.set_teacher(f_t) before each student forward")
                if self.missing_teacher == "error":
                    raise RuntimeError(msg + " (missing_teacher='error')")
                if not self.warned:
                    self.warned = True
                    warnings.warn(msg + "; warned once (missing_teacher='warn').",
                                  RuntimeWarning, stacklevel=2)
        elif isinstance(f_t, Tensor) and isinstance(f_s, Tensor):   # else NORM says what is wrong
            if f_t.dim() == 4 and f_s.dim() == 4 and f_t.shape[2:] != f_s.shape[2:]:
                f_s_matched, f_t = match_spatial(f_s, f_t)
                if f_s_matched is not f_s:
                    H, W = f_s.shape[2:]
                    self.pool = (H // f_s_matched.shape[2], W // f_s_matched.shape[3])
                    f_s = f_s_matched
            f_t = f_t.to(device=f_s.device, dtype=f_s.dtype)
        if self.pool is not None and f_s is output:
            f_s = F.max_pool2d(f_s, self.pool)      # the same pooling in every later forward
        features, norm.last_loss = norm(f_s, f_t)
        return features


def attach(model: nn.Module, name: str, teacher_channels: Optional[int] = None, n: int = 8, *,
           teacher: Optional[nn.Module] = None, teacher_layer: Optional[str] = None,
           missing_teacher: str = "warn", **kw) -> NORM:
    """Put a NORM Feature Transform after the submodule `name` of `model`; return it.

    Args:
        model: the student, an nn.Module.
        name: dotted path of the stage whose output (B, C_s, H, W) the FT replaces, as in
            `model.get_submodule(name)`: "layer4", "features.18".
        teacher_channels: C_t, channels of the teacher features. Read from the teacher's
            stage when `teacher` is given and this is None; required otherwise.
        n: N, the expansion factor (default 8).
        teacher: the teacher model. Its stage `teacher_layer` gets a forward hook that
            hands its output, detached, to the next forward of the student's stage. Run
            the teacher first on the same batch, under `torch.no_grad()` and in eval mode
            (attach changes neither), then the student. Not registered on the student.
        teacher_layer: dotted path of the teacher's stage (default: `name`).
        missing_teacher: what a training-mode student forward without teacher features
            does: "warn" (default; a RuntimeWarning, once per NORM; `last_loss` is None),
            "error" (RuntimeError) or "ignore". Eval-mode forwards never need a teacher.
        **kw: keyword arguments of `NORM` (batchnorm, residual, segment_reduction, backend,
            ...), plus `student_channels=` to give C_s explicitly. Without it C_s is read
            from the last Conv2d / BatchNorm2d inside the stage (`infer_out_channels`);
            give it when the stage ends in something else.

    In the student's hook the teacher features are matched in space and dtype: when the
    maps differ in size the larger is max-pooled down to the smaller (kernel = stride =
    ratio, `norm_fast.match_spatial`, the reference's rule), and f_t is cast to the
    student's dtype and device. A student map LARGER than the teacher's is max-pooled
    before the FT, so the FT features (and the classifier's input) have the teacher's
    size, in training and, with the same kernel, in every later forward; such a student
    cannot be merged exactly (max pooling does not commute with the average pooling),
    and `merge` refuses it.

    The NORM is created on the device and dtype of the stage's (else the model's)
    parameters, registered on `model` as `norm_<name with dots as underscores>`; each
    forward of the stage returns the FT features instead of its output and sets
    `norm.last_loss` (0-dim) when teacher features were there, else None. Teacher
    features are consumed by one student forward and never reused. `norm.remove()`
    removes the hooks (the FT stays a submodule); `merge` folds it away.

    Raises:
        ValueError: `name` or `teacher_layer` is not a submodule (the message lists valid
            names), channels cannot be inferred, teacher_channels is missing, the
            attribute name is already taken, or missing_teacher is not a known mode.
        TypeError: model or teacher is not an nn.Module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if missing_teacher not in MISSING_TEACHER:
        raise ValueError(f"missing_teacher must be one of {MISSING_TEACHER}, got "
                         f"{missing_teacher!r}")
    stage = _get_submodule(model, name, "stage name")
    if isinstance(stage, NORM):
        raise ValueError(f"stage {name!r} is itself a NORM module: attach to a stage of the "
                         "student (e.g. 'layer4'), not to a Feature Transform")
    teacher_stage = None
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("teacher and student are the same module")
        teacher_layer = name if teacher_layer is None else teacher_layer
        teacher_stage = _get_submodule(teacher, teacher_layer, "teacher_layer")
        teacher_channels = _channels(teacher_channels, teacher_stage, "the teacher stage",
                                     teacher_layer, "teacher_channels=C_t")
    elif teacher_layer is not None:
        raise ValueError("teacher_layer was given without teacher=: pass the teacher model")
    elif teacher_channels is None:
        raise ValueError("teacher_channels is required without teacher= (the channels of "
                         "the features you will pass to norm.set_teacher)")
    student_channels = _channels(kw.pop("student_channels", None), stage, "stage", name,
                                 "student_channels=C_s")
    attr = _attr_name(name)
    if hasattr(model, attr):
        raise ValueError(f"cannot register the NORM as {attr!r}: {type(model).__name__} "
                         f"already has an attribute of that name (is {name!r} already "
                         "attached? call merge() or remove the existing one first)")
    device, dtype = _param_like(model, stage)
    norm = NORM(student_channels, teacher_channels, n, **kw).to(device=device, dtype=dtype)
    norm.train(model.training)
    model.add_module(attr, norm)
    hooks = _Hooks(norm, missing_teacher)
    hooks.handles.append(stage.register_forward_hook(hooks.student_hook))
    if teacher_stage is not None:
        hooks.handles.append(teacher_stage.register_forward_hook(hooks.teacher_hook))
    norm._hook_handle = hooks
    norm._attached_to = name
    norm._teacher_layer = teacher_layer
    return norm


def _find_norms(model: nn.Module) -> List[tuple]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM)]


def merge(model: nn.Module, fc_name: str = "fc", norm: Optional[NORM] = None, *,
          check=None, rtol: Optional[float] = None):
    """Fold an attached FT into the classifier `model.<fc_name>` and remove the FT.

    Replaces the nn.Linear `fc_name` (in_features C_s, any out_features) by
    `norm.merge_into(fc)`, removes the forward hooks (student's and teacher's) and deletes
    the NORM submodule, in place. Afterwards the model has exactly the parameters of the
    plain student and, in eval mode, the outputs of the student with the FT (BatchNorm
    running statistics; up to floating-point rounding).

    Valid ONLY when the attached stage's output (B, C_s, H, W) goes straight to global
    average pooling and then to this linear classifier (docs/design.md section 2): the FT
    is a per-position affine map, which commutes with average pooling and composes with a
    linear layer, but not with anything non-linear (a BN + ReLU after the stage, as in
    wide ResNets, or a max pooling, a dropout in train mode, a second branch reading the
    stage output). That structure lives in the model's forward code and cannot be checked
    statically: pass `check=` to compare on a batch.

    Args:
        model: the student the FT was attached to with `attach`.
        fc_name: dotted path of the classifier, an nn.Linear ("fc", "classifier.1").
        norm: the NORM to merge; by default the only NORM submodule of `model`.
        check: a batch (a tensor, or a tuple of the model's positional arguments). The
            model is run on it in eval mode under no_grad before and after the fold; when
            the largest difference of the outputs exceeds `rtol` times their largest
            magnitude, the fold is undone and ValueError raised.
        rtol: tolerance of the check, relative to max |output before|; default
            sqrt(eps) of the classifier's dtype (3.5e-4 for float32, 1.5e-8 for float64).

    Returns:
        `model`; with `check=`, `(model, max_abs_diff)`: the largest absolute difference
        between the outputs before and after the fold, a float.

    Raises:
        ValueError: no NORM, or several and `norm` not given; `norm` not a submodule of
            `model` or not attached (hook already removed); `fc_name` not a submodule;
            channel mismatch; the student map is max-pooled before the FT (a student map
            larger than the teacher's, see `attach`); the check failed. The model is
            left unchanged in every case.
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
    hooks = getattr(norm, "_hook_handle", None)
    if hooks is None:
        raise ValueError(f"the NORM {norm_path!r} is not attached (no forward hook: it was "
                         "removed or never registered), so the model's outputs do not go "
                         "through it and folding it into the classifier would change them")
    if getattr(hooks, "pool", None) is not None:
        raise ValueError(f"the NORM {norm_path!r} runs on the student map max-pooled by "
                         f"{hooks.pool} (the student's map is larger than the teacher's): "
                         "max pooling does not commute with the average pooling before the "
                         "classifier, so the FT cannot be folded into it exactly")
    fc = _get_submodule(model, fc_name, "fc_name")
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"merge expects {fc_name!r} to be an nn.Linear classifier, got "
                        f"{type(fc).__name__}")
    merged = norm.merge_into(fc)          # raises before anything changes on a mismatch
    fc_parent, _, fc_attr = fc_name.rpartition(".")
    if check is not None:
        if rtol is None:
            rtol = torch.finfo(fc.weight.dtype).eps ** 0.5
        before = _eval_outputs(model, check)
        setattr(model.get_submodule(fc_parent), fc_attr, merged)
        hooks.enabled = False             # the stage output now goes straight to the fold
        try:
            after = _eval_outputs(model, check)
        finally:
            hooks.enabled = True
        diff = (after.double() - before.double()).abs().max().item()
        scale = before.double().abs().max().item()
        if not diff <= rtol * max(scale, torch.finfo(before.dtype).tiny):
            setattr(model.get_submodule(fc_parent), fc_attr, fc)     # undo
            raise ValueError(
                f"merge check failed: the folded model's outputs differ from the model with "
                f"the FT by up to {diff:.3e} (max |output| {scale:.3e}, rtol {rtol:.1e}). "
                f"Is the output of {norm._attached_to!r} fed straight to global average "
                f"pooling and {fc_name!r}? (docs/design.md section 2). The model is unchanged")
    setattr(model.get_submodule(fc_parent), fc_attr, merged)
    norm.remove()
    norm_parent, _, norm_attr = norm_path.rpartition(".")
    delattr(model.get_submodule(norm_parent), norm_attr)
    norm.last_loss = None
    norm.set_teacher(None)
    return (model, diff) if check is not None else model


@torch.no_grad()
def _eval_outputs(model: nn.Module, batch) -> Tensor:
    """model(*batch) in eval mode (the mode restored after), as one tensor."""
    was_training = model.training
    model.eval()
    try:
        out = model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor):
        raise TypeError(f"merge(check=...) compares the model's outputs, which must be a "
                        f"tensor, got {type(out).__name__}")
    return out
