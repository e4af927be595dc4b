"""Shared test fixtures: devices, the backend x algorithm paths present, the oracle."""
from __future__ import annotations

import pytest
import torch

from norm_fast import dispatch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def paths_for(device: str):
    """(backend, algorithm) pairs that can run on `device` here, the literal one first."""
    out = [("torch", "direct"), ("torch", "decomposed")]
    for backend in ("triton", "cpp", "cuda"):
        if device not in dispatch.devices_of(backend):
            continue
        if dispatch.is_available(backend)[0]:
            out += [(backend, "direct"), (backend, "decomposed")]
    return out


def fast_paths(device: str):
    return [p for p in paths_for(device) if p != ("torch", "direct")]


def is_interpreted(device: str, backend: str) -> bool:
    """Triton on CPU tensors runs in the interpreter: exact but slow, keep shapes small."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
