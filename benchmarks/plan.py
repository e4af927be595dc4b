"""How large `make bench` can go on this machine: probes, estimates and the batch choice.

The headline table wants every shape at its paper batch (256 ImageNet, 64 CIFAR) and the
N sweep wants B=256; a 2-core CPU cannot do all of that in ten minutes, a GPU can. So
the batches are chosen from an *estimate*, made in three steps:

1. Probe: per teacher->student pair, the literal reference's forward+backward at the
   batch where the cost model puts it near `PROBE_MACS` multiply-adds (a few tenths of a
   second on the 2-core CPU), the fastest of two calls after a warm-up; once, the decomposed algorithm
   on the automatic backend at the resnet34-resnet18 probe batch, for norm_fast's rate.
   Measured here, in this run, under this load.
2. Scale (`Estimator.call_s`): a literal call at another batch or N takes its probe's time
   times the ratio of `dispatch.cost_model` multiply-adds; a direct or decomposed call,
   its multiply-adds at norm_fast's probed rate. A compiled path adds `COMPILE_S`.
3. Fit: start at the paper batch, halve where one literal forward+backward would exceed
   `call_cap_s` (the issue's "about 60 s"), then halve until the estimated wall time of
   the measurement (memory call, warm-up, timed rounds: `timing.estimate_seconds`) fits
   the shape's fair share of the section's budget (`choose_batches`; the N sweep's one
   batch: `shrink_to_budget`).
Every lowered batch says so in its rows (`batch_scaled`, `paper_batch`, `batch_choice`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from norm_fast import dispatch

from . import paths, shapes, steps, timing

# Seconds one torch.compile of the literal module costs (forward and backward graphs) on
# top of its measurement: 7-20 s cold on the 2-core development CPU under load, about 10 s
# in a quiet full run (issue 14). A planning figure only.
COMPILE_S = {"cpu": 11.0, "cuda": 30.0}
# Shares of the run's budget per section; the rest (8%) is margin for set-up and reports.
SHARES = {"headline": 0.52, "n": 0.25, "batch": 0.10, "step": 0.05}


PROBE_MACS = 8e9
RATE_PROBE_SHAPE = "resnet34-resnet18"


def _cost(shape: shapes.Shape, device_type: str) -> Dict[str, float]:
    return dispatch.cost_model(shape.batch, shape.student_channels, shape.teacher_channels,
                               shape.height, shape.width, shape.n, device_type)


def probe_batch(shape: shapes.Shape, device_type: str) -> int:
    """The largest power of two (at most the paper batch) whose literal forward+backward
    the cost model puts at no more than PROBE_MACS multiply-adds (at least 1)."""
    b = 1
    while (b * 2 <= shape.paper_batch
           and _cost(shape.at(batch=b * 2), device_type)["literal"] <= PROBE_MACS):
        b *= 2
    return b


def time_call_s(path: paths.PathSpec, shape: shapes.Shape, device: torch.device) -> float:
    """The faster of two forward+backward calls after one warm-up call (seconds)."""
    call, module = paths.build_module(path, shape, device)
    step = steps.make_step(call, module, shape, device, torch.float32, "forward+backward")
    step()
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


class Estimator:
    """Estimated seconds of calls and of whole measurements, from probes made in this run."""

    def __init__(self, device: torch.device, policy: timing.Policy):
        self.device, self.policy = device, policy
        self.literal: Dict[Tuple[int, int, int, int], Tuple[shapes.Shape, float]] = {}
        self.fast_rate: Optional[float] = None       # norm_fast MACs per second
        self.probe_s = 0.0                           # wall time spent probing

    def _probed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.probe_s += time.perf_counter() - t0

    def literal_probe(self, shape: shapes.Shape) -> Tuple[shapes.Shape, float]:
        key = (shape.teacher_channels, shape.student_channels, shape.height, shape.width)
        if key not in self.literal:
            small = shape.at(batch=probe_batch(shape, self.device.type), n=8)
            self.literal[key] = (small, self._probed(time_call_s, paths.REFERENCE, small,
                                                     self.device))
        return self.literal[key]

    def norm_fast_rate(self) -> float:
        if self.fast_rate is None:
            base = shapes.by_name(RATE_PROBE_SHAPE)
            small = base.at(batch=probe_batch(base, self.device.type))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                backend = dispatch.resolve_backend("auto", self.device.type)
            fast = paths.PathSpec(f"norm_fast-{backend}-decomposed", backend, "decomposed")
            t = self._probed(time_call_s, fast, small, self.device)
            self.fast_rate = _cost(small, self.device.type)["decomposed"] / t
        return self.fast_rate

    def call_s(self, algorithm: str, shape: shapes.Shape) -> float:
        """One forward+backward of `algorithm` ("literal", "direct", "decomposed")."""
        cost = _cost(shape, self.device.type)
        if algorithm == "literal":
            small, t = self.literal_probe(shape)
            return t * cost["literal"] / _cost(small, self.device.type)["literal"]
        return cost[algorithm] / self.norm_fast_rate()

    def literal_call_s(self, shape: shapes.Shape) -> float:
        return self.call_s("literal", shape)

    def describe(self, shape: shapes.Shape) -> str:
        small, t = self.literal_probe(shape)
        return (f"estimate: the literal forward+backward measured at B={small.batch} "
                f"({1e3 * t:.0f} ms), scaled by dispatch.cost_model to "
                f"{self.literal_call_s(shape):.1f} s at B={shape.batch}")

    def group_s(self, group: Sequence[paths.PathSpec], shape: shapes.Shape,
                passes: Iterable[str] = ("forward+backward",)) -> float:
        """Estimated wall seconds of measuring every non-twin path of `group` at `shape`."""
        total = 0.0
        for p in group:
            if paths.twin(p, group, shape, self.device.type) is not None:
                continue
            backend, alg = paths.resolved(p, shape, self.device.type)
            call = self.call_s("literal" if (backend, alg) == ("torch", "direct") else alg, shape)
            for pass_ in passes:
                factor = 0.4 if pass_ == "forward" else 1.0   # a forward: about 40% of both
                total += timing.estimate_seconds(factor * call, self.policy)
            if p.compiled:
                total += COMPILE_S.get(self.device.type, 15.0)
        return total


def shrink_to_budget(start: Dict[str, int], floor: Dict[str, int],
                     cost: Callable[[str, int], float], budget_s: float) -> Dict[str, int]:
    """Per item a value (a batch), halved greedily where halving saves the most estimated
    seconds, until the summed cost fits `budget_s` or every item is at its floor."""
    value = dict(start)
    while sum(cost(k, v) for k, v in value.items()) > budget_s:
        best, saving = None, 0.0
        for k, v in value.items():
            if v // 2 >= floor[k]:
                s = cost(k, v) - cost(k, v // 2)
                if s > saving:
                    best, saving = k, s
        if best is None:
            break
        value[best] //= 2
    return value


@dataclass
class BatchChoice:
    batch: int
    paper_batch: int
    reason: str

    @property
    def scaled(self) -> bool:
        return self.batch != self.paper_batch


def choose_batches(shape_list: Sequence[shapes.Shape], cost: Callable[[shapes.Shape], float],
                   est: Estimator, budget_s: float, call_cap_s: float,
                   floor: int = 2) -> Dict[str, BatchChoice]:
    """The batch of each shape: its paper batch where the literal fits `call_cap_s` and
    the shape fits its fair share of `budget_s`; otherwise the largest halving that does.

    Fair shares (max-min, "water-filling"): the shapes are taken cheapest first, each
    gets the budget left divided by the shapes left, and what a cheap shape does not use
    passes on to the dearer ones. So one expensive shape is lowered alone, as far as it
    must, and never pushes the others below their paper batch. A shape whose time hardly
    falls with its batch (norm_fast's batch-independent algebra dominates) keeps its
    batch and overspends its share; the run's deadline (run.py) is the backstop.
    """
    start = {}
    for s in shape_list:
        b = s.paper_batch
        while b // 2 >= floor and est.literal_call_s(s.at(batch=b)) > call_cap_s:
            b //= 2
        start[s.name] = b
    order = sorted(shape_list, key=lambda s: cost(s.at(batch=start[s.name])))
    left, chosen = budget_s, {}
    for i, s in enumerate(order):
        share = left / (len(order) - i)
        b = start[s.name]
        # Halve while over the share, but not where halving saves under a quarter: there
        # the batch-independent algebra dominates, and a smaller batch would only make
        # the row less like training without making the run shorter.
        while (b // 2 >= min(floor, b) and cost(s.at(batch=b)) > share
               and cost(s.at(batch=b // 2)) < 0.75 * cost(s.at(batch=b))):
            b //= 2
        chosen[s.name] = b
        left -= cost(s.at(batch=b))
    out = {}
    for s in shape_list:
        b = chosen[s.name]
        why = est.describe(s.at(batch=s.paper_batch))
        if start[s.name] != s.paper_batch:
            why += f"; over the {call_cap_s:.0f} s cap per literal call"
        if b != start[s.name]:
            why += (f"; lowered to B={b} to fit its share of this section's time budget "
                    f"({budget_s:.0f} s)")
        out[s.name] = BatchChoice(b, s.paper_batch, why)
    return out
