"""Device operations of one NORM training step (BatchNorm on, residual on), counted on CPU.

Prints, for every (backend, algorithm) path present, the number of device operations of
one forward + backward (tests/launch_count.py says what counts), with the literal
reference's count beside it: run with ``-s`` to see the table. Triton runs under the
interpreter here, which launches the same kernels as CUDA would.

Asserted: the counter sees what it must (the literal's two 1x1 convolutions and their
backward, the Triton kernels), counts are deterministic, the GPU cost model's table is
the count, and a Triton training step stays within the launch budget of 35 device
operations (docs/design.md section 8; the literal's count is printed beside it).
"""
from __future__ import annotations

import pytest
import torch

from unittest import mock

from norm_fast import NORM, train_step

from conftest import paths_for
from launch_count import count_training_step

B, C_S, C_T, H, W, N = 2, 8, 6, 4, 4, 2


def _step(backend, algorithm, cuda_route=False):
    """Counts of one step; cuda_route: the C++ kernel set taking the route CUDA tensors
    take (the fused training step, `train_step.COMPOSED_ON_CPU`), standing for the CUDA
    extension, whose host code is the same."""
    if cuda_route:
        with mock.patch.object(train_step, "COMPOSED_ON_CPU", ()):
            return _step(backend, algorithm)
    torch.manual_seed(0)
    mod = NORM(C_S, C_T, N, batchnorm=True, residual=True, backend=backend,
               algorithm=algorithm)
    f_s = (torch.randn(B, C_S, H, W) + 1).requires_grad_()
    f_t = torch.randn(B, C_T, H, W)
    return count_training_step(mod, f_s, f_t)


PATHS = [p for p in paths_for("cpu") if p[0] != "cuda"]


def test_counts_the_literal_convolutions():
    c = _step("torch", "direct")
    assert c.by_op["convolution"] == 2  # expand and contract
    assert c.by_op["convolution_backward"] == 2
    assert c.by_op["native_batch_norm"] + c.by_op["_native_batch_norm_legit"] == 2
    assert c.triton == 0
    assert c.total == c.aten > 6


@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(p))
def test_counts_are_deterministic(path):
    first, second = _step(*path), _step(*path)
    assert first.by_op == second.by_op
    assert first.total > 0
    if path[0] == "triton":
        assert first.triton >= 2  # at least one forward and one backward kernel


def test_print_launch_counts(capsys):
    literal = _step("torch", "direct").total
    lines = [f"device operations, one training step, B={B} C_s={C_S} C_t={C_T} "
             f"{H}x{W} n={N} (BatchNorm, residual); literal = {literal}",
             f"{'backend':8} {'algorithm':11} {'total':>5} {'aten':>5} {'triton':>6} "
             f"{'literal':>7}"]
    for backend, algorithm in PATHS + [("cuda", "direct"), ("cuda", "decomposed")]:
        if backend == "cuda":
            if ("cpp", algorithm) not in PATHS:
                continue
            c = _step("cpp", algorithm, cuda_route=True)
        else:
            c = _step(backend, algorithm)
        lines.append(f"{backend:8} {algorithm:11} {c.total:5d} {c.aten:5d} {c.triton:6d} "
                     f"{literal:7d}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert literal > 0


BUDGET = 35


@pytest.mark.parametrize("algorithm", ["direct", "decomposed"])
def test_launch_budget(algorithm, capsys):
    """One Triton training step (the fused route of norm_fast/train_step.py) issues at most
    BUDGET device operations, forward and backward, counted with the literal's beside."""
    if ("triton", algorithm) not in PATHS:
        pytest.skip("triton not available here")
    c = _step("triton", algorithm)
    literal = _step("torch", "direct").total
    with capsys.disabled():
        print(f"\ntriton/{algorithm}: {c.total} device operations ({c.aten} ATen, "
              f"{c.triton} Triton) a training step; literal {literal}; budget {BUDGET}")
    assert c.total <= BUDGET, sorted(c.by_op.items())
    assert c.triton >= 5  # centring moments (3), expansion forward and backward


@pytest.mark.parametrize("path", [("torch", "direct"), ("torch", "decomposed"),
                                  ("triton", "direct"), ("triton", "decomposed"),
                                  ("cpp", "direct"), ("cpp", "decomposed"),
                                  ("cuda", "direct"), ("cuda", "decomposed")],
                         ids=lambda p: "-".join(p))
def test_gpu_model_launch_table_is_the_measured_count(path):
    """dispatch.LAUNCHES, the launch term of the GPU time model, is what this counter
    measures: a change of the code's operator count fails here until the table follows.
    ("cuda", ...) is counted as the C++ twin on the CUDA route (`_step`)."""
    from norm_fast import dispatch
    twin = ("cpp", path[1]) if path[0] == "cuda" else path
    if twin not in PATHS:
        pytest.skip(f"{twin[0]} not available here")
    key = ("torch", "literal") if path == ("torch", "direct") else path
    assert dispatch.LAUNCHES[key] == _step(*twin, cuda_route=path[0] == "cuda").total
