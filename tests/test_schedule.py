"""`norm_fast.norm_weight`: the reference NORM loss-weight ramp (docs/design.md section 1)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from norm_fast import norm_weight

CIFAR = [(0, 0.1), (9, 0.1), (9.99, 0.1), (10, 0.5), (19, 0.5), (20, 1.0), (179, 1.0),
         (180, 0.5), (209, 0.5), (210, 0.1), (239, 0.1), (10_000, 0.1)]
IMAGENET = [(0, 0.1), (4, 0.1), (5, 0.5), (14, 0.5), (15, 0.9), (59, 0.9), (60, 0.5),
            (79, 0.5), (80, 0.1), (119, 0.1)]


@pytest.mark.parametrize("epoch,weight", CIFAR)
def test_cifar(epoch, weight):
    assert norm_weight(epoch, "cifar") == weight
    assert isinstance(norm_weight(epoch, "cifar"), float)


def test_cifar_is_the_default():
    assert [norm_weight(e) for e, _ in CIFAR] == [w for _, w in CIFAR]


@pytest.mark.parametrize("epoch,weight", IMAGENET)
def test_imagenet(epoch, weight):
    assert norm_weight(epoch, "imagenet") == weight


def test_numpy_numbers_are_accepted():
    assert norm_weight(np.int64(15), "imagenet") == 0.9
    assert norm_weight(np.float32(20.0)) == 1.0


def test_errors():
    with pytest.raises(ValueError, match=r"one of \('cifar', 'imagenet'\), got 'svhn'"):
        norm_weight(3, "svhn")
    with pytest.raises(ValueError, match=">= 0, got -1"):
        norm_weight(-1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match=">= 0"):
            norm_weight(bad)
    with pytest.raises(TypeError, match="got str '3'"):
        norm_weight("3")
    with pytest.raises(TypeError, match="got bool"):
        norm_weight(True)
