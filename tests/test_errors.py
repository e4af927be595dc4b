"""Bad input raises ValueError/TypeError naming what was expected and what came."""
from __future__ import annotations

import pytest
import torch

from norm_fast import NORM, functional


@pytest.fixture
def mod():
    return NORM(6, 5, 2, backend="torch")


def test_wrong_rank(mod):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*3 dims"):
        mod(torch.randn(2, 6, 4))


def test_wrong_channels(mod):
    with pytest.raises(ValueError, match=r"f_s must have 6 channels.*\(2, 7, 4, 4\)"):
        mod(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"f_t must have 5 channels.*\(2, 4, 4, 4\)"):
        mod(torch.randn(2, 6, 4, 4), torch.randn(2, 4, 4, 4))


def test_spatial_mismatch_points_to_match_spatial(mod):
    with pytest.raises(ValueError, match="match_spatial"):
        mod(torch.randn(2, 6, 4, 4), torch.randn(2, 5, 2, 2))


def test_batch_mismatch_does_not_suggest_match_spatial(mod):
    """match_spatial cannot fix a batch mismatch: the message must not point to it."""
    with pytest.raises(ValueError, match=r"batch size.*\(3, 5, 4, 4\)") as info:
        mod(torch.randn(2, 6, 4, 4), torch.randn(3, 5, 4, 4))
    assert "match_spatial" not in str(info.value)


def test_dtype_errors(mod):
    with pytest.raises(TypeError, match="float16, bfloat16, float32, float64.*int64"):
        mod(torch.ones(2, 6, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="parameters are torch.float32"):
        mod(torch.randn(2, 6, 4, 4, dtype=torch.float64))


def test_not_a_tensor(mod):
    with pytest.raises(TypeError, match="torch.Tensor.*list"):
        mod([1.0, 2.0])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        NORM(4, 4, 0)
    with pytest.raises(TypeError, match="n must be a positive int, got float"):
        NORM(4, 4, 2.0)
    with pytest.raises(ValueError, match="backend must be one of.*'tpu'"):
        NORM(4, 4, 2, backend="tpu")
    with pytest.raises(ValueError, match="algorithm must be one of.*'fast'"):
        NORM(4, 4, 2, algorithm="fast")
    with pytest.raises(ValueError, match="segment_reduction.*'max'"):
        NORM(4, 4, 2, segment_reduction="max")
    with pytest.raises(ValueError, match="teacher_channels must be a positive int, got -1"):
        NORM(4, -1, 2)


def test_backend_for_wrong_device():
    mod = NORM(4, 4, 2, backend="cuda")
    with pytest.raises(ValueError, match="backend 'cuda' runs on.*cuda.*got cpu"):
        mod(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))


def test_empty_batch(mod):
    with pytest.raises(ValueError, match="empty"):
        mod(torch.randn(0, 6, 4, 4), torch.randn(0, 5, 4, 4))


def test_single_value_per_channel_in_training(mod):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mod(torch.randn(1, 6, 1, 1), torch.randn(1, 5, 1, 1))


def test_functional_errors():
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(10, 3\).*\(9, 3\)"):
        functional.norm_loss(f_s, f_t, torch.randn(9, 3), 2)
    with pytest.raises(ValueError, match="n must be a positive int, got -2"):
        functional.norm_loss(f_s, f_t, torch.randn(10, 3), -2)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        functional.norm_loss(f_s, f_t, [[1.0]], 2)
    with pytest.raises(ValueError, match="match_spatial"):
        functional.norm_loss(f_s, torch.randn(2, 5, 2, 2), torch.randn(10, 3), 2)


def test_mixed_devices(mod):
    # The meta device stands in for a second device on machines without a GPU.
    with pytest.raises(ValueError, match="same device.*cpu.*meta"):
        mod(torch.randn(2, 6, 4, 4), torch.randn(2, 5, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="f_s is on meta.*parameters are on cpu"):
        mod(torch.randn(2, 6, 4, 4, device="meta"))
