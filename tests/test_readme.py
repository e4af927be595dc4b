"""Every ```python block of README.md runs as written (so the README cannot drift).

Each block runs in a fresh namespace, in a temporary working directory. Where torchvision
does not import (beside the pinned CPU torch 2.13.0 here it cannot), `torchvision` is
the stand-in of tests/tiny_models.py: torchvision.models' resnet18/34/50 and mobilenet_v2
with the same structure at 1/8 of the widths. A block whose first line is
`# readme-test: compile-only` (one needing a `torchrun` launch) is only compiled.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import tiny_models

README = Path(__file__).resolve().parents[1] / "README.md"
COMPILE_ONLY = "# readme-test: compile-only"


def python_blocks():
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text[:m.start()].count("\n") + 1
        blocks.append((line, m.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_it_should():
    assert len(BLOCKS) >= 5
    joined = "\n".join(src for _, src in BLOCKS)
    for needle in ("norm_fast.attach(student, \"layer4\", teacher=teacher",
                   "norm_fast.merge(student, \"fc\", check=x)", "norm_fast.Distiller(",
                   "trace_autograd_ops = True", "torch.autocast", "DistributedDataParallel",
                   "norm_fast.norm_weight(epoch"):
        assert needle in joined, needle
    for _, src in BLOCKS:              # device-agnostic: nothing hard-wired to CUDA
        assert ".cuda()" not in src


@pytest.fixture
def torchvision_or_standin(monkeypatch):
    try:
        import torchvision.models  # noqa: F401
        return "torchvision"
    except Exception:              # ImportError, or an operator mismatch with this torch
        tv = tiny_models.torchvision_standin()
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
        return "stand-in"


@pytest.mark.parametrize("line,src", BLOCKS, ids=[f"README.md:{ln}" for ln, _ in BLOCKS])
def test_readme_block_runs(line, src, torchvision_or_standin, tmp_path, monkeypatch):
    code = compile(src, f"README.md:{line}", "exec")
    if src.startswith(COMPILE_ONLY):
        return
    import torch
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    dynamo_flag = getattr(torch._dynamo.config, "trace_autograd_ops", None)
    try:
        exec(code, namespace)
    finally:
        if dynamo_flag is not None:
            torch._dynamo.config.trace_autograd_ops = dynamo_flag
    if "max_diff" in namespace:        # the merge checks of the quick start and Distiller
        assert namespace["max_diff"] < 1e-3, namespace["max_diff"]
