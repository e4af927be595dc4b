"""dispatch: one immutable plan per call, a registry of kernel sets, environment overrides."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from norm_fast import NORM, dispatch, functional


def test_plan_is_immutable_and_names_a_registered_kernel_set():
    plan = dispatch.resolve("torch", "decomposed", "cpu", 2, 4, 4, 3, 3, 2)
    assert (plan.backend, plan.algorithm) == ("torch", "decomposed")
    assert plan.kernels is dispatch.REGISTRY["torch"][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.backend = "cpp"
    assert dispatch.resolve("torch", "direct", "cpu", 2, 4, 4, 3, 3, 2).literal
    assert dispatch.resolve("torch", "auto", "cpu", 2, 4, 4, 3, 3, 2).literal


def test_every_registered_kernel_set_has_the_contract():
    for name, (kernels, devices) in dispatch.REGISTRY.items():
        assert devices and set(devices) <= {"cpu", "cuda"}, name
        for member in ("available", "moments", "moments_backward", "expand_mse_forward",
                       "expand_mse_backward"):
            assert callable(getattr(kernels, member)), (name, member)


@pytest.mark.parametrize("algorithm", ["direct", "decomposed"])
def test_environment_overrides_the_arguments(monkeypatch, algorithm):
    f_s, f_t = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    mod = NORM(4, 3, 2, backend="cpp", algorithm="auto").double()
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    monkeypatch.setenv(dispatch.ENV_ALGORITHM, algorithm)
    plan = mod.resolve(f_s)
    assert plan.backend == "torch"
    assert plan.algorithm == ("literal" if algorithm == "direct" else "decomposed")
    w = torch.randn(6, 4, dtype=torch.float64)
    got = functional.norm_loss(f_s, f_t, w, 2, backend="cpp")
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    monkeypatch.delenv(dispatch.ENV_ALGORITHM)
    want = functional.norm_loss(f_s, f_t, w, 2, backend="torch")
    assert torch.allclose(got, want, rtol=1e-12)


def test_environment_overrides_are_validated(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "tpu")
    with pytest.raises(ValueError, match="NORM_FAST_BACKEND must be one of.*'tpu'"):
        NORM(4, 3, 2)(torch.randn(2, 4, 3, 3))
    monkeypatch.setenv(dispatch.ENV_BACKEND, "")
    monkeypatch.setenv(dispatch.ENV_ALGORITHM, "fast")
    with pytest.raises(ValueError, match="NORM_FAST_ALGORITHM must be one of.*'fast'"):
        NORM(4, 3, 2)(torch.randn(2, 4, 3, 3))


# --- the GPU time model ----------------------------------------------------------------

def _gpu_choice(B, C_s, C_t, H, W, n, dtype=torch.float32, backend="triton"):
    return dispatch._choose_algorithm("auto", backend, "auto", "cuda", B, C_s, C_t, H, W, n,
                                      dtype)


def test_gpu_model_charges_launches_where_the_work_is_small():
    """Tiny problems are host-bound: the form with the fewest device operations (the
    literal's) wins, and each candidate's time is at least its launches' host time."""
    t = dispatch.gpu_time_model(2, 16, 16, 2, 2, 4, "triton")
    for algo, key in (("literal", ("torch", "literal")), ("direct", ("triton", "direct")),
                      ("decomposed", ("triton", "decomposed"))):
        assert t[algo] >= dispatch.LAUNCHES[key] * dispatch.LAUNCH_S
    assert _gpu_choice(2, 16, 16, 2, 2, 4) == "literal"


def test_gpu_model_prefers_the_decomposed_form_when_n_and_p_grow():
    """The literal's tensor-core work and expanded passes grow with N*P; the decomposed
    form's P-sized work does not grow with N: at a large batch and N it wins."""
    assert _gpu_choice(512, 256, 256, 14, 14, 32) == "decomposed"
    t8, t32 = (dispatch.gpu_time_model(256, 512, 512, 7, 7, n, "triton") for n in (8, 32))
    assert t32["literal"] / t8["literal"] > 3
    assert t32["decomposed"] / t8["decomposed"] < t32["literal"] / t8["literal"]


def test_gpu_model_follows_the_product_dtype_and_tf32_policy():
    """bfloat16 and TF32 speed the literal's convolutions (tensor cores); IEEE float32
    products (cudnn TF32 off) slow them, not the exact small algebra."""
    shape = (256, 512, 512, 7, 7, 8)
    tf32 = dispatch.gpu_time_model(*shape, "triton", torch.float32, True)
    ieee = dispatch.gpu_time_model(*shape, "triton", torch.float32, False)
    bf16 = dispatch.gpu_time_model(*shape, "triton", torch.bfloat16, True)
    assert bf16["literal"] < tf32["literal"] < ieee["literal"]
    assert ieee["decomposed"] > tf32["decomposed"]


def test_product_dtype_reads_autocast():
    assert dispatch.product_dtype(torch.float32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.product_dtype(torch.float32, "cpu") == torch.bfloat16
        assert dispatch.product_dtype(torch.float64, "cpu") == torch.float64


def test_gpu_choice_is_a_pure_function_of_the_shape():
    """Every DDP rank with the same per-rank shape makes the same choice."""
    for shape in [(256, 512, 512, 7, 7, 8), (64, 2048, 1280, 2, 2, 8), (64, 128, 128, 8, 8, 8)]:
        assert len({_gpu_choice(*shape) for _ in range(3)}) == 1


def test_gpu_model_prices_each_product_at_its_planned_rate():
    """The time model and the precision plan in step (issue 19): every product a fused
    form runs is charged 2 * macs at the rate of its planned precision, and changing the
    plan changes the model (3xTF32 is a third of TF32's rate)."""
    from norm_fast import precision as plan
    shape = (256, 512, 512, 7, 7, 8)
    for algo in ("direct", "decomposed"):
        for policy in plan.POLICIES:
            got = dispatch.gpu_product_seconds(*shape, algo, policy)
            assert set(got) == {p for p in plan.PRODUCTS if plan.macs(p, *shape, algo)}
            for product, seconds in got.items():
                rate = dispatch.GPU_RATES[plan.of(policy, product)] * dispatch.GPU_EFFICIENCY
                assert seconds == pytest.approx(2 * plan.macs(product, *shape, algo) / rate)
    base = dispatch.gpu_product_seconds(*shape, "decomposed", "tf32")
    with plan.override({"gram": "tf32"}):
        assert dispatch.gpu_product_seconds(*shape, "decomposed", "tf32")["gram"] == \
            pytest.approx(base["gram"] / 3)
    assert plan.of("tf32", "gram") == "tf32x3"


@pytest.mark.parametrize("dtype,target", [(torch.float32, 3.0), (torch.bfloat16, 1.5)])
def test_gpu_model_puts_the_fused_form_ahead_at_the_imagenet_shapes(dtype, target):
    """What the plan buys, by the model (an estimate, not a timing): at resnet34->resnet18,
    B=256, the decomposed form at least `target` x faster than the literal, and ahead at
    resnet50->mobilenet (issue 19's targets)."""
    t = dispatch.gpu_time_model(256, 512, 512, 7, 7, 8, "triton", dtype)
    assert t["literal"] >= target * t["decomposed"]
    t = dispatch.gpu_time_model(256, 1024, 2048, 7, 7, 8, "triton", dtype)
    assert t["literal"] > t["decomposed"]
