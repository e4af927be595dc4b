"""A ResNet18-style student (no torchvision) for NORM's share of a real training step.

`Student` is ResNet18 as in torchvision (7x7 stem, 4 stages of 2 BasicBlocks: 64, 128,
256, 512 channels, global average pooling, a linear classifier), with an optional NORM
Feature Transform between the last stage and the pooling, where the method places it.
The teacher's features are a random tensor of the last stage's shape (a ResNet34 teacher
also ends in 512 channels at the same spatial size), so only the student is trained.

`make_train_step(...)` is one SGD step: forward (under autocast for bfloat16),
cross-entropy (+ the NORM loss), backward, optimizer step. The learning rate is 0: the
optimizer does all its arithmetic (momentum, weight decay, update) but the weights stay
put, so every timed step does the same work. (With a real learning rate, repeating one
batch memorises it within a few dozen steps, the gradients flowing back underflow to
denormal floats, and CPU steps slow down up to 10x: measured, not a property of NORM.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .steps import autocast_for, synchronize


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Student(nn.Module):
    """ResNet18; `norm` (a NORM module, or None) sits on the last stage's output."""
    LAST_CHANNELS = 512

    def __init__(self, num_classes: int = 1000, norm: Optional[nn.Module] = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.norm = norm
        self.fc = nn.Linear(self.LAST_CHANNELS, num_classes)

    @staticmethod
    def last_stage_size(image_size: int) -> int:
        """Spatial size of the last stage for a square input (total stride 32)."""
        return -(-image_size // 32)

    def forward(self, images, teacher_features=None):
        f = self.stages(self.stem(images))
        norm_loss = None
        if self.norm is not None:
            if teacher_features is not None and teacher_features.dtype != f.dtype:
                teacher_features = teacher_features.to(f.dtype)  # the teacher's autocast dtype
            f, norm_loss = self.norm(f, teacher_features)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))
        return logits, norm_loss


@dataclass(frozen=True)
class StepConfig:
    batch: int
    image_size: int
    num_classes: int = 1000

    def describe(self) -> str:
        s = Student.last_stage_size(self.image_size)
        return (f"ResNet18 student, B={self.batch}, {self.image_size}x{self.image_size} input, "
                f"NORM on 512x{s}x{s}")


CPU_STEP = StepConfig(batch=8, image_size=64)
GPU_STEP = StepConfig(batch=256, image_size=224)
QUICK_STEP = StepConfig(batch=2, image_size=32)


def make_train_step(norm: Optional[nn.Module], config: StepConfig, device: torch.device,
                    dtype: torch.dtype, seed: int = 0) -> Callable[[], None]:
    """One SGD step of the student (with `norm` on its last stage when given)."""
    torch.manual_seed(seed)
    model = Student(config.num_classes, norm).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    s = Student.last_stage_size(config.image_size)
    images = torch.randn(config.batch, 3, config.image_size, config.image_size,
                         generator=gen).to(device)
    labels = torch.randint(0, config.num_classes, (config.batch,), generator=gen).to(device)
    teacher = torch.randn(config.batch, Student.LAST_CHANNELS, s, s, generator=gen).to(device)
    t = teacher.to(dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, dtype):
            logits, norm_loss = model(images, t if norm is not None else None)
            loss = F.cross_entropy(logits, labels)
        if norm_loss is not None:
            loss = loss + norm_loss.float()
        loss.backward()
        opt.step()
        synchronize(device)

    step.clear = lambda: opt.zero_grad(set_to_none=True)
    return step
