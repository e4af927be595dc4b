"""Worker for test_distributed.py: one rank of a 2-process gloo group on CPU."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from norm_fast import NORM

SHAPE = (4, 6, 5, 3, 3, 3)   # global batch B, C_s, C_t, H, W, n
STEPS = 2


def data(step: int):
    B, C_s, C_t, H, W, n = SHAPE
    gen = torch.Generator().manual_seed(100 + step)
    f_s = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64) + 1.0
    f_t = torch.randn(B, C_t, H, W, generator=gen, dtype=torch.float64)
    g = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)
    return f_s, f_t, g


def make_module(algorithm: str, sync: bool, group=None) -> NORM:
    B, C_s, C_t, H, W, n = SHAPE
    torch.manual_seed(0)
    mod = NORM(C_s, C_t, n, backend="torch", algorithm=algorithm, detach_teacher=True,
               sync_batchnorm=sync, process_group=group).double()
    with torch.no_grad():
        for bn in (mod.expand_bn, mod.contract_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return mod


def run_single(algorithm: str):
    """The truth: one process over the whole batch, objective = mean of the ranks'."""
    mod = make_module(algorithm, sync=False)
    losses = []
    for step in range(STEPS):
        f_s, f_t, g = data(step)
        feats, loss = mod(f_s, f_t)
        (loss + (feats * g).sum() / 2).backward()
        losses.append(loss.detach())
    return losses, {k: p.grad for k, p in mod.named_parameters()}, dict(mod.named_buffers())


def worker(rank: int, world: int, init_method: str, mode: str, algorithm: str, out: str):
    # A finite timeout: a lost peer fails the test in a minute instead of hanging CI.
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        # The default group, under DDP: NORM reduces its statistics in a dedicated gloo
        # group of its own (distributed.statistics_group), so this must not hang.
        mod = make_module(algorithm, sync=(mode == "flag"))
        if mode == "convert":
            mod = nn.SyncBatchNorm.convert_sync_batchnorm(mod)
            model = mod
        else:
            model = DDP(mod)
        half = SHAPE[0] // world
        losses = []
        for step in range(STEPS):
            f_s, f_t, g = (v[rank * half:(rank + 1) * half] for v in data(step))
            feats, loss = model(f_s, f_t)
            (loss + (feats * g).sum()).backward()
            losses.append(loss.detach())
        if mode == "convert":
            # Without DDP (which refuses SyncBatchNorm on CPU), average gradients by hand.
            for p in mod.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        for l in losses:
            dist.all_reduce(l)
        torch.save({"losses": [l / world for l in losses],
                    "grads": {k: p.grad for k, p in mod.named_parameters()},
                    "buffers": dict(mod.named_buffers())}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The results are saved: leave without running destructors. Tearing down the DDP
    # reducer and NORM's dedicated gloo group after the peer has gone can wait forever
    # (seen: one rank stuck in a futex after `worker` returned, its peer exited cleanly).
    os._exit(0)
