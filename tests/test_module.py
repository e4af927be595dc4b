"""NORM against the float64 literal oracle: every path, every configuration, tiling shapes."""
from __future__ import annotations

import itertools

import pytest
import torch

from norm_fast import NORM

from conftest import DEVICES, is_interpreted, paths_for
from literal import LiteralFT, randomise_bn, rel_err

# (B, C_s, C_t, H, W, n): channel counts that are not powers of two, 1x1 / 7x7 / 5x3
# maps, batch 1, n in {1, 2, 8}.
SHAPES = [
    (2, 6, 10, 7, 7, 8),
    (1, 5, 3, 5, 3, 2),
    (3, 17, 9, 1, 1, 1),
    (1, 4, 4, 7, 7, 8),
    (4, 33, 20, 5, 3, 2),
]
CONFIGS = list(itertools.product([True, False], [True, False], ["sum", "mean"], [True, False]))
SMALL_SHAPES = [(2, 6, 10, 7, 7, 8), (1, 5, 3, 5, 3, 2), (3, 17, 9, 1, 1, 1)]


def _cases():
    for device in DEVICES:
        for backend, algorithm in paths_for(device):
            slow = is_interpreted(device, backend)
            for si, shape in enumerate(SMALL_SHAPES if slow else SHAPES):
                for ci, cfg in enumerate(CONFIGS):
                    # Under the interpreter, cover every config once and every shape once.
                    if slow and ci % len(SMALL_SHAPES) != si:
                        continue
                    yield pytest.param(device, backend, algorithm, shape, cfg,
                                       id=f"{device}-{backend}-{algorithm}-{shape}-{cfg}")


def make_pair(shape, cfg, backend, algorithm, device, dtype=torch.float64, seed=0):
    B, C_s, C_t, H, W, n = shape
    batchnorm, residual, reduction, detach = cfg
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the convs' Kaiming initialisation
    mod = NORM(C_s, C_t, n, batchnorm=batchnorm, residual=residual, segment_reduction=reduction,
               detach_teacher=detach, backend=backend, algorithm=algorithm)
    randomise_bn(mod, gen)
    lit = LiteralFT(C_s, C_t, n, batchnorm, residual, reduction, detach)
    lit.load_state_dict(mod.state_dict(), strict=True)
    return mod.to(device, dtype), lit.to(device, torch.float64)


def inputs(shape, device, seed, dtype=torch.float64):
    B, C_s, C_t, H, W, n = shape
    gen = torch.Generator().manual_seed(seed)
    # A non-zero mean, as post-ReLU features have, exercises the centring.
    f_s = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64) + 1.5
    f_t = torch.randn(B, C_t, H, W, generator=gen, dtype=torch.float64)
    g = torch.randn(B, C_s, H, W, generator=gen, dtype=torch.float64)
    return f_s.to(device, dtype), f_t.to(device, dtype), g.to(device, dtype)


def step(mod, f_s, f_t, g):
    """One forward + backward of loss + <features, g>; returns outputs and input grads."""
    f_s = f_s.clone().requires_grad_()
    f_t = f_t.clone().requires_grad_()
    feats, loss = mod(f_s, f_t)
    (loss + (feats * g).sum()).backward()
    return feats.detach(), loss.detach(), f_s.grad, f_t.grad


def compare(mod, lit, tol):
    for (name, p), (_, q) in zip(mod.named_parameters(), lit.named_parameters()):
        assert rel_err(p.grad, q.grad) < tol, f"grad of {name}"
    for (name, b), (_, c) in zip(mod.named_buffers(), lit.named_buffers()):
        assert rel_err(b.float() if b.dtype == torch.long else b, c.float() if c.dtype == torch.long
                       else c) < tol, f"buffer {name}"


@pytest.mark.parametrize("device,backend,algorithm,shape,cfg", list(_cases()))
def test_matches_literal_float64(device, backend, algorithm, shape, cfg):
    mod, lit = make_pair(shape, cfg, backend, algorithm, device)
    detach = cfg[3]
    # Three training steps: running statistics accumulate, gradients accumulate.
    for seed in range(3):
        f_s, f_t, g = inputs(shape, device, seed)
        a = step(mod, f_s, f_t, g)
        b = step(lit, f_s, f_t, g)
        assert rel_err(a[0], b[0]) < 1e-9, "features"
        assert rel_err(a[1], b[1]) < 1e-9, "loss"
        assert rel_err(a[2], b[2]) < 1e-9, "grad f_s"
        if detach:
            assert a[3] is None and b[3] is None
        else:
            assert rel_err(a[3], b[3]) < 1e-9, "grad f_t"
    compare(mod, lit, 1e-9)
    # Eval mode: running statistics, no update.
    mod.eval(), lit.eval()
    f_s, f_t, g = inputs(shape, device, 7)
    a, b = step(mod, f_s, f_t, g), step(lit, f_s, f_t, g)
    for x, y, what in zip(a, b, ("features", "loss", "grad f_s", "grad f_t")):
        if y is not None:
            assert rel_err(x, y) < 1e-9, f"eval {what}"
    compare(mod, lit, 1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_momentum(device, momentum):
    shape = (2, 6, 5, 4, 4, 3)
    for backend, algorithm in paths_for(device):
        mod, lit = make_pair(shape, (True, True, "sum", True), backend, algorithm, device)
        for bn in (mod.expand_bn, mod.contract_bn, lit.expand_bn, lit.contract_bn):
            bn.momentum = momentum
        for seed in range(3):
            f_s, f_t, g = inputs(shape, device, seed)
            step(mod, f_s, f_t, g), step(lit, f_s, f_t, g)
        compare(mod, lit, 1e-9)
        assert int(mod.expand_bn.num_batches_tracked) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_features_without_teacher(device):
    shape = (2, 6, 5, 3, 3, 4)
    for backend, algorithm in paths_for(device):
        mod, lit = make_pair(shape, (True, True, "sum", True), backend, algorithm, device)
        f_s, _, _ = inputs(shape, device, 0)
        feats, loss = mod(f_s)
        ref, _ = lit(f_s)
        assert loss is None
        assert rel_err(feats, ref) < 1e-9
        compare_buffers = list(zip(mod.buffers(), lit.buffers()))
        for b, c in compare_buffers:
            assert rel_err(b.double(), c.double()) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_float32_error_no_worse_than_reference(device):
    """float32 paths against the float64 truth: within a small factor of the literal float32."""
    shape = (4, 24, 20, 7, 7, 8)
    cfg = (True, True, "sum", False)
    f_s, f_t, g = inputs(shape, device, 3)
    truth_mod, lit = make_pair(shape, cfg, "torch", "direct", device)
    truth = step(lit, f_s, f_t, g)
    truth_grads = [p.grad.clone() for p in lit.parameters()]

    def errors(backend, algorithm):
        mod, _ = make_pair(shape, cfg, backend, algorithm, device, dtype=torch.float32)
        out = step(mod, f_s.float(), f_t.float(), g.float())
        errs = [rel_err(o, t) for o, t in zip(out, truth)]
        errs += [rel_err(p.grad, q) for p, q in zip(mod.parameters(), truth_grads)]
        return errs

    ref = errors("torch", "direct")
    for backend, algorithm in paths_for(device)[1:]:
        got = errors(backend, algorithm)
        for i, (e, r) in enumerate(zip(got, ref)):
            assert e <= 4 * r + 1e-5, f"{backend}/{algorithm} output {i}: {e:.2e} vs literal {r:.2e}"
