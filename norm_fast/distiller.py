"""`Distiller`: NORM distillation of a student from a teacher as one nn.Module.

    distiller = norm_fast.Distiller(student, teacher, "layer4", "layer4", n=8,
                                    schedule="imagenet")
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        distiller.train()
        for x, y in loader:
            logits, losses = distiller.forward_train(x, y, epoch=epoch)
            loss = sum(losses.values())
            opt.zero_grad(); loss.backward(); opt.step()
    student = distiller.export()          # the plain student, FT folded into its classifier

The interface is mdistiller's `Distiller` (forward_train(image, target, **kwargs) ->
(logits, losses dict), forward_test(image), forward() choosing by mode,
get_learnable_parameters(), get_extra_parameters(); its trainers sum the values of the
losses dict), without depending on mdistiller. The NORM is attached to the student with
`norm_fast.attach(..., teacher=...)`, so the teacher's features reach it through hooks.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attach import attach, merge
from .schedule import SCHEDULES, norm_weight


class Distiller(nn.Module):
    """Student + frozen teacher + a NORM Feature Transform on the student's `student_layer`.

    Args:
        student: the student (B, 3, H, W) -> logits (B, classes); its `student_layer`
            output goes to global average pooling and the linear `fc_name` (for export).
        teacher: the teacher; frozen here (requires_grad False) and kept in eval mode by
            `train()`; it runs under no_grad.
        student_layer, teacher_layer: dotted stage names ("layer4", "features");
            teacher_layer defaults to student_layer.
        n: N, the expansion factor (default 8).
        alpha: weight of the NORM loss (default 1.0: the reference code's, with the
            "sum" segment reduction), multiplied by `norm_weight(epoch, schedule)` when
            `schedule` ("cifar" or "imagenet", the reference's ramps) is given.
        ce_weight: weight of the cross-entropy (default 1.0).
        fc_name: the student's linear classifier, for `export` (default "fc").
        **norm_kwargs: passed to `norm_fast.attach` / `NORM` (teacher_channels,
            student_channels, segment_reduction, backend, algorithm, batchnorm, ...).

    A training forward without teacher features is an error here (the Distiller always
    runs the teacher first; a RuntimeError would mean a hook went missing).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str = "layer4",
                 teacher_layer: Optional[str] = None, n: int = 8, *, alpha: float = 1.0,
                 ce_weight: float = 1.0, schedule: Optional[str] = None, fc_name: str = "fc",
                 **norm_kwargs):
        super().__init__()
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None or one of {tuple(SCHEDULES)}, got "
                             f"{schedule!r}")
        for name, value in (("alpha", alpha), ("ce_weight", ce_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.student = student
        self.teacher = teacher
        teacher.requires_grad_(False)
        self.alpha, self.ce_weight, self.schedule = float(alpha), float(ce_weight), schedule
        self.fc_name = fc_name
        self.norm = attach(student, student_layer, n=n, teacher=teacher,
                           teacher_layer=teacher_layer, missing_teacher="error", **norm_kwargs)
        self.train(student.training)

    def train(self, mode: bool = True) -> "Distiller":
        """Student (and its FT) in `mode`; the teacher always in eval mode."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self) -> List[nn.Parameter]:
        """The student's parameters, the FT's included (the teacher's are frozen)."""
        return list(self.student.parameters())

    def get_extra_parameters(self) -> int:
        """Parameters that exist only during training: the FT's (0 after `export`)."""
        return sum(p.numel() for p in self.norm.parameters())

    def norm_loss_weight(self, epoch=None) -> float:
        """alpha, times the reference ramp norm_weight(epoch, schedule) when a schedule is set."""
        if self.schedule is None:
            return self.alpha
        if epoch is None:
            raise ValueError(f"schedule={self.schedule!r} needs the epoch: "
                             "forward_train(image, target, epoch=epoch)")
        return self.alpha * norm_weight(epoch, self.schedule)

    def forward_train(self, image: Tensor, target: Tensor, **kwargs
                      ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """image (B, 3, H, W), target (B,) class indices -> (logits (B, classes),
        {"loss_ce": 0-dim, "loss_norm": 0-dim, already weighted}). kwargs: `epoch` for
        the schedule (mdistiller passes it)."""
        with torch.no_grad():
            self.teacher(image)                   # its hook hands the features to the FT
        logits = self.student(image)
        loss_ce = self.ce_weight * F.cross_entropy(logits, target)
        loss_norm = self.norm_loss_weight(kwargs.get("epoch")) * self.norm.last_loss
        return logits, {"loss_ce": loss_ce, "loss_norm": loss_norm}

    def forward_test(self, image: Tensor) -> Tensor:
        """Student logits (B, classes), with the FT (no loss)."""
        return self.student(image)

    def forward(self, image: Tensor, target: Optional[Tensor] = None, **kwargs):
        if self.training:
            if target is None:
                raise ValueError("a training-mode forward needs the target (class indices)")
            return self.forward_train(image, target, **kwargs)
        return self.forward_test(image)

    def export(self, check=None, rtol: Optional[float] = None):
        """A copy of the student with the FT folded into its classifier (`norm_fast.merge`):
        the plain student's parameters, the same eval outputs. The Distiller itself is
        unchanged (training can go on). With `check=` a batch, the copy is verified on it
        and `(student, max_abs_diff)` returned (see `merge`)."""
        # The last loss is a graph node (not deep-copyable) and means nothing to the copy.
        memo = {id(self.norm.last_loss): None} if self.norm.last_loss is not None else {}
        student = copy.deepcopy(self.student, memo)
        student.eval()
        return merge(student, self.fc_name, check=check, rtol=rtol)
