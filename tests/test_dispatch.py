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
