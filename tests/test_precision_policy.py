"""The precision policy (dispatch.resolve_precision, norm_fast/precision.py): float32 follows
the literal's convolutions (TF32 exactly when torch.backends.cudnn.allow_tf32), autocast
gives the 16-bit policies, an explicit `precision=` overrides, and every product gets the
plan's precision under the policy. Decisions are checked on CPU; the errors of each plan
are tests/test_precision.py's (emulated) and the GPU check's."""
from __future__ import annotations

import pytest
import torch

from norm_fast import NORM, custom_ops, dispatch, norm_loss
from norm_fast import precision as plan
from norm_fast.ops.spec import gemm_precision

from conftest import paths_for


@pytest.mark.parametrize("allow", [True, False])
def test_auto_follows_cudnn_tf32_on_cuda_float32(monkeypatch, allow):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    assert dispatch.resolve_precision("auto", "cuda", torch.float32) == ("tf32" if allow else "ieee")
    for dtype, policy in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                          (torch.float64, "float64")):
        assert dispatch.resolve_precision("auto", "cuda", dtype) == policy
        assert dispatch.resolve_precision("auto", "cuda", torch.float32, dtype) == (
            policy if dtype != torch.float64 else ("tf32" if allow else "ieee"))
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
    """NORM(precision=...) hands the plan's precision of each product to every expand_mse
    call, forward and backward, on every backend (recorded at the kernel-set call)."""
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
    product = "direct" if path[1] == "direct" else "residual"
    assert all(p == plan.of(precision, product) for _, p in seen), seen


def test_gemm_block_sets_both_float32_flags():
    """`gemm_precision` (CUDA only) sets cuBLAS's and cuDNN's float32 flags and restores
    them; on CPU tensors it changes nothing."""
    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = mm.fp32_precision, conv.fp32_precision
    try:
        mm.fp32_precision = conv.fp32_precision = "tf32"
        with gemm_precision(torch.device("cpu"), torch.float32, "ieee"):
            assert (mm.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with gemm_precision(torch.device("cuda"), torch.float32, "ieee"):
            assert (mm.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (mm.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        mm.fp32_precision, conv.fp32_precision = before


@pytest.mark.parametrize("policy", plan.POLICIES)
def test_the_plan_is_complete_and_valid(policy):
    """Every product has a precision under every policy, one of PRECISIONS; the TF32 plan
    keeps above TF32 exactly what tests/test_precision.py's mutants show must be."""
    table = plan.table(policy)
    assert set(table) == set(plan.PRODUCTS)
    assert all(p in plan.PRECISIONS for p in table.values())
    if policy == "tf32":
        above = {k for k, v in table.items() if v in ("tf32x3", "ieee", "float64")}
        assert above == {"gram", "w1s", "residual", "direct", "direct_grad",
                         "gram_grad_direct"}
