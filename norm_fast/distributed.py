"""Global BatchNorm statistics across processes (DDP with synchronised BatchNorm).

The FT's batch statistics are functions of the mean and covariance of f_s alone
(docs/design.md section 3), so synchronising the BatchNorms means all-reducing a C_s vector and a
C_s x C_s matrix, whatever the algorithm: nothing of the expanded size crosses the wire.
Gradients flow back through the reduction as they do in nn.SyncBatchNorm (the backward
of a sum all-reduce is a sum all-reduce of the gradients).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable sum over the processes of `group` (default: the world)."""
    return _AllReduceSum.apply(tensor, group)


def sync_world_size(group=None) -> int:
    """Number of processes to synchronise with; 1 when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_moments(mean: Tensor, cov: Tensor, count: int, group=None
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Combine per-process (mean (C,), biased cov (C, C) or variances (C,), count P_r)
    into global ones.

    Two reductions, so that the covariance never comes from raw second moments (which
    cancel when the mean is large, docs/design.md section 3):
        g = sum_r P_r mean_r / sum_r P_r
        S = sum_r P_r (S_r + (mean_r - g)(mean_r - g)^T) / sum_r P_r
    Returns (g, S, total count as a 0-dim tensor).
    """
    C = mean.shape[0]
    n = torch.full((1,), float(count), dtype=mean.dtype, device=mean.device)
    first = all_reduce_sum(torch.cat([mean * count, n]), group)
    total = first[C]
    g = first[:C] / total
    d = mean - g
    spread = d[:, None] * d[None, :] if cov.dim() == 2 else d * d
    S = all_reduce_sum(count * (cov + spread), group) / total
    return g, S, total


def group_of(module, default: Optional[object]) -> Optional[object]:
    """The process group of an nn.SyncBatchNorm, else `default`."""
    return getattr(module, "process_group", None) or default


def statistics_group(owner, group):
    """The group to reduce the statistics in: `group` if given, else a dedicated one.

    gloo pairs collectives by their issue order within a group. Under DDP the gradient
    buckets are all-reduced asynchronously while the backward of the moments' reduction
    runs, so on one shared group the two can pair up differently on different ranks and
    hang (seen in testing, about 1 run in 6). The statistics therefore get a group of their
    own, created once, collectively, on the first synchronised forward (which every rank
    runs) and kept on `owner`. NCCL orders collectives on its stream: there the default
    group is used as is.
    """
    if group is not None or dist.get_backend() != "gloo":
        return group
    if getattr(owner, "_stats_group", None) is None:
        owner._stats_group = dist.new_group(backend="gloo")
    return owner._stats_group
