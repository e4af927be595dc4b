"""The float32 precision policy (dispatch.resolve_precision): the P-sized products follow the
literal's convolutions (TF32 exactly when torch.backends.cudnn.allow_tf32), an explicit
`precision=` overrides, the small algebra stays exact. Decisions are checked on CPU; the
CUDA errors under TF32 are the GPU check's (benchmarks/gpu_correctness.py)."""
from __future__ import annotations

import pytest
import torch

from norm_fast import NORM, custom_ops, dispatch, norm_loss
from norm_fast.ops import eager
from norm_fast.ops.spec import gemm_precision

from conftest import paths_for


@pytest.mark.parametrize("allow", [True, False])
def test_auto_follows_cudnn_tf32_on_cuda_float32(monkeypatch, allow):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    assert dispatch.resolve_precision("auto", "cuda", torch.float32) == ("tf32" if allow else "ieee")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert dispatch.resolve_precision("auto", "cuda", dtype) == "ieee"
    assert dispatch.resolve_precision("auto", "cpu", torch.float32) == "ieee"


@pytest.mark.parametrize("explicit", ["ieee", "tf32", "tf32x3"])
def test_explicit_precision_overrides_the_flags(monkeypatch, explicit):
    for allow in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        assert dispatch.resolve_precision(explicit, "cuda", torch.float32) == explicit
    plan = dispatch.resolve("torch", "decomposed", "cpu", 2, 4, 4, 3, 3, 2, torch.float32,
                            explicit)
    assert plan.precision == explicit


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision"):
        NORM(8, 8, 2, precision="fast")
    with pytest.raises(ValueError, match="precision"):
        norm_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(8, 4), 2,
                  precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        NORM(8, 8, 2, precision=32)


def test_autocast_dtype_sets_the_plan_precision(monkeypatch):
    """Under autocast the products run in 16 bits: no float32 precision to choose."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.product_dtype(torch.float32, "cpu") == torch.bfloat16


@pytest.mark.parametrize("path", [p for p in paths_for("cpu") if p != ("torch", "direct")],
                         ids=lambda p: "-".join(p))
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_the_plan_precision_reaches_every_product(monkeypatch, path, precision):
    """NORM(precision=...) hands its precision to every expand_mse call, forward and
    backward, on every backend (recorded at the custom op's kernel-set call)."""
    seen = []
    kernels = dispatch.REGISTRY[path[0]][0]
    for name in ("expand_mse_forward", "expand_mse_backward"):
        orig = getattr(kernels, name)

        def spy(*args, _orig=orig, _name=name, **kwargs):
            seen.append((_name, kwargs.get("precision")))
            return _orig(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)
    torch.manual_seed(0)
    mod = NORM(6, 5, 3, backend=path[0], algorithm=path[1], precision=precision,
               detach_teacher=False)
    f_s = torch.randn(2, 6, 3, 3, requires_grad=True)
    f_t = torch.randn(2, 5, 3, 3, requires_grad=True)
    feats, loss = mod(f_s, f_t)
    (loss + feats.sum()).backward()
    assert {n for n, _ in seen} == {"expand_mse_forward", "expand_mse_backward"}
    assert all(p == precision for _, p in seen), seen


def test_small_algebra_is_exact_whatever_the_global_flag():
    """The moments (eager and the extension's) run inside an "ieee" block: on CUDA the
    block overrides a global TF32 matmul setting; on CPU it changes nothing."""
    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    try:
        flags.fp32_precision = "tf32"
        seen = []
        orig = eager._moments

        def spy(x):
            seen.append(flags.fp32_precision)
            return orig(x)
        eager._moments = spy
        try:
            eager.moments(torch.randn(2, 3, 4))
            with gemm_precision(torch.device("cuda"), torch.float32, "ieee"):
                assert flags.fp32_precision == "ieee"
        finally:
            eager._moments = orig
        assert seen == ["tf32"]   # CPU tensors: the flag is not touched (no TF32 on CPU)
        assert flags.fp32_precision == "tf32"
    finally:
        flags.fp32_precision = before
