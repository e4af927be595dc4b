"""Shared test fixtures: devices, the backend x algorithm paths present, the oracle.

Backends that cannot run here drop out of `paths_for`; so that a broken install cannot
leave the suite green with most paths silently missing, NORM_FAST_REQUIRE (a comma list,
e.g. "cpp,triton", set by .ci/run) names backends that must be available: the session
stops with the reason when one is not.
"""
from __future__ import annotations

import os

import pytest
import torch

from norm_fast import dispatch


def pytest_sessionstart(session):
    required = [b.strip() for b in os.environ.get("NORM_FAST_REQUIRE", "").split(",") if b.strip()]
    missing = []
    for backend in required:
        if backend not in dispatch.REGISTRY:
            missing.append(f"{backend}: not a backend (choose from {sorted(dispatch.REGISTRY)})")
            continue
        ok, why = dispatch.is_available(backend)
        if not ok:
            missing.append(f"{backend}: {why}")
    if missing:
        raise pytest.UsageError("NORM_FAST_REQUIRE names backends that are not available "
                                "here:\n  " + "\n  ".join(missing))

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
