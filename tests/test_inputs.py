"""Real-training inputs: memory formats, autocast, non-finite values, reference checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from norm_fast import NORM

from conftest import DEVICES, fast_paths, is_interpreted, paths_for
from literal import LiteralFT, randomise_bn, rel_err


def _module(backend, algorithm, device, dtype=torch.float64, n=3):
    torch.manual_seed(0)
    mod = NORM(6, 5, n, backend=backend, algorithm=algorithm, detach_teacher=False)
    randomise_bn(mod, torch.Generator().manual_seed(0))
    return mod.to(device, dtype)


def _run(mod, f_s, f_t):
    f_s = f_s.detach().requires_grad_()
    f_t = f_t.detach().requires_grad_()
    feats, loss = mod(f_s, f_t)
    (loss + feats.square().sum()).backward()
    return [feats.detach(), loss.detach(), f_s.grad, f_t.grad] + \
        [p.grad.clone() for p in mod.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_memory_formats_match_contiguous(device, layout):
    gen = torch.Generator().manual_seed(1)
    base_s = torch.randn(3, 6, 9, 7, generator=gen, dtype=torch.float64).to(device) + 1
    base_t = torch.randn(3, 5, 9, 7, generator=gen, dtype=torch.float64).to(device)
    if layout == "channels_last":
        f_s = base_s.to(memory_format=torch.channels_last)
        f_t = base_t.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        f_s = torch.cat([base_s, base_s], dim=3)[:, :, :, ::2]
        f_t = torch.cat([base_t, base_t], dim=3)[:, :, :, ::2]
        base_s, base_t = f_s.contiguous(), f_t.contiguous()
    else:
        f_s = base_s.transpose(2, 3).contiguous().transpose(2, 3)
        f_t = base_t.transpose(2, 3).contiguous().transpose(2, 3)
    assert not f_s.is_contiguous()
    for backend, algorithm in paths_for(device):
        want = _run(_module(backend, algorithm, device), base_s, base_t)
        got = _run(_module(backend, algorithm, device), f_s, f_t)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-12, (backend, algorithm)


def test_channels_last_is_read_without_a_copy():
    """The fused kernels read strides: a channels_last map reaches them as a view."""
    f_s = torch.randn(2, 6, 4, 4).to(memory_format=torch.channels_last)
    x = f_s.flatten(2)
    assert x.data_ptr() == f_s.data_ptr()


AUTOCAST = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)]
                                        if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_no_worse_than_reference(device, dtype):
    gen = torch.Generator().manual_seed(2)
    f_s = (torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64) + 1).to(device)
    f_t = torch.randn(4, 5, 5, 5, generator=gen, dtype=torch.float64).to(device)
    truth = _run(_module("torch", "direct", device), f_s, f_t)

    def under_autocast(backend, algorithm):
        mod = _module(backend, algorithm, device, torch.float32)
        with torch.autocast(device, dtype=dtype):
            f_s32 = f_s.float().requires_grad_()
            f_t32 = f_t.float().requires_grad_()
            feats, loss = mod(f_s32, f_t32)
        (loss + feats.float().square().sum()).backward()
        out = [feats.detach(), loss.detach(), f_s32.grad, f_t32.grad]
        return out + [p.grad for p in mod.parameters()], feats.dtype, loss.dtype

    ref, _, _ = under_autocast("torch", "direct")
    for backend, algorithm in fast_paths(device):
        got, feats_dtype, loss_dtype = under_autocast(backend, algorithm)
        assert feats_dtype == dtype and loss_dtype == torch.float32
        for i, (g, r, t) in enumerate(zip(got, ref, truth)):
            # Tolerance: a quarter of bfloat16's epsilon (features are returned rounded
            # to the autocast dtype, as the reference's convolutions are).
            assert rel_err(g, t) <= rel_err(r, t) + 1e-3, (backend, algorithm, i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_give_non_finite_loss(device, where, value):
    gen = torch.Generator().manual_seed(3)
    f_s = torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64).to(device)
    f_t = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64).to(device)
    (f_s if where == "student" else f_t)[1, 2, 1, 0] = value
    for backend, algorithm in paths_for(device):
        _, loss = _module(backend, algorithm, device)(f_s, f_t)
        assert not torch.isfinite(loss), (backend, algorithm, float(loss))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_reference_checkpoint(prefix):
    """A student checkpoint of the reference code (FT as layer31/layer32) reproduces its FT."""
    gen = torch.Generator().manual_seed(4)

    class RefStudent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.layer31 = nn.Sequential(nn.Conv2d(6, 4 * 5, 1, bias=False), nn.BatchNorm2d(20))
            self.layer32 = nn.Sequential(nn.Conv2d(20, 6, 1, bias=False), nn.BatchNorm2d(6))
            self.fc = nn.Linear(6, 10)

        def ft(self, f):
            return self.layer32(self.layer31(f)) + f

    ref = RefStudent().double()
    randomise_bn(ref, gen)
    ref.eval()
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    mod = NORM(6, 5, 4).double().eval()
    mod.load_reference_state_dict(sd)
    f_s = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    feats, _ = mod(f_s)
    assert rel_err(feats, ref.ft(f_s)) < 1e-12
    with pytest.raises(ValueError, match="layer99.0.weight"):
        mod.load_reference_state_dict(sd, expand_key="layer99")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs need a GPU")
def test_no_host_device_sync_on_cuda():
    for backend, algorithm in fast_paths("cuda"):
        mod = _module(backend, algorithm, "cuda", torch.float32)
        f_s = torch.randn(4, 6, 5, 5, device="cuda", requires_grad=True)
        f_t = torch.randn(4, 5, 5, 5, device="cuda")
        mod(f_s, f_t)  # first call: lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            feats, loss = mod(f_s, f_t)
            (loss + feats.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
