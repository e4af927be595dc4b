"""DDP with synchronised BatchNorm: 2 gloo processes on CPU equal one process over the
concatenated batch (mean of the ranks' losses, DDP-averaged gradients, running stats)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_worker
from literal import rel_err

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("mode", ["flag", "convert"])
@pytest.mark.parametrize("algorithm", ["direct", "decomposed"])
def test_two_processes_equal_one_global_batch(tmp_path, mode, algorithm):
    with socket.socket() as s:          # a free port for the TCP rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(dist_worker.worker, args=(2, f"tcp://127.0.0.1:{port}", mode, algorithm,
                                             str(tmp_path)), nprocs=2, join=False)
    deadline = time_limit = 300.0       # seconds (about 10 alone); never hang the suite on a lost process
    while not ctx.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process group did not finish within {time_limit:.0f} s")
    losses, grads, buffers = dist_worker.run_single(algorithm)
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        for a, b in zip(got["losses"], losses):
            assert rel_err(a, b) < 1e-10
        for k, g in grads.items():
            assert rel_err(got["grads"][k], g) < 1e-10, k
        for k, v in buffers.items():
            assert rel_err(got["buffers"][k].double(), v.double()) < 1e-10, k
