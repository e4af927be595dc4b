"""torch.compile: a whole training step compiles with fullgraph=True and matches eager."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from norm_fast import NORM

from conftest import paths_for

FULL_STEP = hasattr(torch._dynamo.config, "trace_autograd_ops")


def build(backend, algorithm):
    torch.manual_seed(0)
    return nn.ModuleDict(dict(student=nn.Conv2d(3, 8, 3, padding=1),
                              norm=NORM(8, 6, 4, backend=backend, algorithm=algorithm),
                              fc=nn.Linear(8, 10)))


def make_step(m, lr=0.1):
    """Student forward, NORM, classifier, backward and an SGD update in one function."""
    def step(x, f_t, y):
        feats, loss = m["norm"](torch.relu(m["student"](x)), f_t)
        total = nn.functional.cross_entropy(m["fc"](feats.mean((2, 3))), y) + loss
        if not FULL_STEP:
            return total
        total.backward()
        with torch.no_grad():
            for p in m.parameters():
                p.sub_(lr * p.grad)
                p.grad = None
        return total.detach()
    return step


@pytest.mark.parametrize("algorithm", ["direct", "decomposed"])
def test_training_step_compiles_fullgraph(algorithm):
    backend = "cpp" if ("cpp", algorithm) in paths_for("cpu") else "torch"
    _compare(backend, algorithm)


def _compare(backend, algorithm):
    """A compiled training step (fullgraph) against eager, three steps, then the
    parameters and buffers."""
    if FULL_STEP:
        torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.reset()
    eager, compiled = build(backend, algorithm), build(backend, algorithm)
    eager_step = make_step(eager)
    compiled_step = torch.compile(make_step(compiled), fullgraph=True)  # raises on a break
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, generator=gen)
        f_t = torch.randn(4, 6, 6, 6, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        a, b = eager_step(x, f_t, y), compiled_step(x, f_t, y)
        if not FULL_STEP:  # older torch: backward runs the AOT-compiled backward graph
            a.backward(), b.backward()
            for m in (eager, compiled):
                with torch.no_grad():
                    for p in m.parameters():
                        p.sub_(0.1 * p.grad)
                        p.grad = None
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled.buffers(), eager.buffers()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [("cpp", "direct"), ("cpp", "decomposed"),
                                  ("triton", "direct"), ("triton", "decomposed")],
                         ids=lambda p: "-".join(p))
def test_fused_training_step_compiles_fullgraph(path, monkeypatch):
    """The fused training step (norm_fast/train_step.py: one autograd.Function, custom ops
    inside, the contraction BatchNorm updating its running statistics in place) compiles
    with fullgraph=True and matches eager: on Triton (the interpreter here), and on the
    C++ kernel set sent down the route CUDA tensors take (standing for the CUDA
    extension)."""
    from norm_fast import train_step
    if path not in paths_for("cpu"):
        pytest.skip(f"{path[0]} not available here")
    monkeypatch.setattr(train_step, "COMPOSED_ON_CPU", ())
    calls = []
    real = train_step.run
    monkeypatch.setattr(train_step, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    _compare(*path)
    assert calls, "the fused route was not taken"
