"""The teacher->student feature shapes of the NORM paper's experiments, and their CPU scaling.

Each shape is the student's last feature map against the teacher's, at the batch size the
method trains with (the "paper batch": 256 for the ImageNet pairs, 64 for the CIFAR
pairs): C_t is the teacher's channels, C_s the student's, N = 8, BatchNorm on.

`make bench` (benchmarks/run.py) starts from the paper batch and lowers it only where its
time budget demands (benchmarks/plan.py). The pytest-benchmark suite scales statically
(`scaled`): a 2-core CPU cannot run the real batches in a benchmark suite, so
on CPU every batch is divided by `CPU_BATCH_DIVISOR` (8), then halved again while the
literal reference's forward still exceeds `CPU_MAX_MACS` multiply-adds (N*C_t*C_s*B*H*W
> 2^32), never below 2: resnet34-resnet18 256 -> 32, resnet50-mobilenet 256 -> 4, the
CIFAR pairs 64 -> 8. Channels, spatial size and N stay as they are. `full=True`
(`--full`, `BENCH_FULL=1`) keeps the real batch sizes; that is the default on CUDA.
Note that the P-independent part of norm_fast's algebra (N*C_t*C_s^2, docs/design.md s.5)
does not shrink with the batch: at small batches it dominates, as it would in training.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Tuple

PAPER_BATCH = {"imagenet": 256, "cifar": 64}

CPU_BATCH_DIVISOR = 8
CPU_MAX_MACS = 2**32


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    teacher_channels: int
    student_channels: int
    height: int
    width: int
    n: int = 8
    family: str = ""      # "imagenet" or "cifar": which paper batch applies

    @property
    def paper_batch(self) -> int:
        return PAPER_BATCH.get(self.family, self.batch)

    def at(self, batch: Optional[int] = None, n: Optional[int] = None) -> "Shape":
        """The same teacher->student pair at another batch size and/or N."""
        return replace(self, batch=int(self.batch if batch is None else batch),
                       n=int(self.n if n is None else n))

    @property
    def positions(self) -> int:
        return self.batch * self.height * self.width

    def student_size(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.student_channels, self.height, self.width)

    def teacher_size(self) -> Tuple[int, int, int, int]:
        return (self.batch, self.teacher_channels, self.height, self.width)

    def describe(self) -> str:
        return (f"B={self.batch} {self.teacher_channels}->{self.student_channels} "
                f"{self.height}x{self.width} N={self.n}")


SHAPES: Tuple[Shape, ...] = (
    Shape("resnet34-resnet18", 256, 512, 512, 7, 7, family="imagenet"),
    Shape("resnet50-mobilenet", 256, 2048, 1024, 7, 7, family="imagenet"),
    Shape("resnet32x4-resnet8x4", 64, 256, 256, 8, 8, family="cifar"),
    Shape("wrn40_2-wrn16_2", 64, 128, 128, 8, 8, family="cifar"),
    Shape("vgg13-vgg8", 64, 512, 512, 4, 4, family="cifar"),
    Shape("resnet50-mobilenetv2", 64, 2048, 1280, 2, 2, family="cifar"),
)
SHAPE_NAMES = tuple(s.name for s in SHAPES)

SCALING_NOTE = (f"CPU: batch / {CPU_BATCH_DIVISOR}, halved again while the literal forward "
                f"exceeds 2^{CPU_MAX_MACS.bit_length() - 1} multiply-adds (min 2); channels, "
                "spatial size and N as in the method")


def scaled(shape: Shape, device_type: str, full: bool = False,
           batch: Optional[int] = None) -> Shape:
    """The shape as benchmarked: real batch with `full` or on a GPU, scaled on CPU;
    `batch` overrides both (smoke runs)."""
    if batch is not None:
        return replace(shape, batch=int(batch))
    if full or device_type != "cpu":
        return shape
    batch = max(2, shape.batch // CPU_BATCH_DIVISOR)
    per_sample = (shape.n * shape.teacher_channels * shape.student_channels
                  * shape.height * shape.width)
    while batch > 2 and batch * per_sample > CPU_MAX_MACS:
        batch //= 2
    return replace(shape, batch=batch)


def select(names: Optional[Iterable[str]]) -> List[Shape]:
    """Shapes by name (all when `names` is empty); unknown names raise ValueError."""
    names = [n.strip() for n in (names or []) if n.strip()]
    if not names:
        return list(SHAPES)
    unknown = [n for n in names if n not in SHAPE_NAMES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {list(SHAPE_NAMES)}")
    return [s for s in SHAPES if s.name in names]


def by_name(name: str) -> Shape:
    return select([name])[0]
