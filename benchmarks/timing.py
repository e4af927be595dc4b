"""Wall-clock timing of a step closure: warm-up, then rounds, reported as median and spread.

The closures synchronise the device themselves (steps.py), so `time.perf_counter` around
a call is the step's full time on CPU and CUDA alike. Warm-up runs until at least
`min_calls` calls and `min_seconds` have passed (first calls pay one-off costs: page
faults of fresh allocations, kernel selection, torch.compile). The number of timed rounds
follows from the warm step time and a time budget, clamped to [min_rounds, max_rounds].
`time_interleaved` times several steps round-robin (round r calls each once, the order
rotated by r), so a change in machine load during the rounds hits every step alike: the
ratios between them stay honest on a shared machine.

Every timed call also records the process CPU time it took (`time.process_time`: all
threads of this process), the steadier measure on a shared CPU; a timing whose
interquartile range exceeds `NOISY_IQR` of its median is flagged `noisy`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

NOISY_IQR = 0.2   # flag a timing whose interquartile range exceeds 20% of its median


@dataclass(frozen=True)
class Policy:
    min_calls: int = 1          # warm-up calls, at least
    min_seconds: float = 0.3    # warm-up time, at least (stops after max_calls regardless)
    max_calls: int = 10
    budget_s: float = 0.6       # timed rounds: about this much time ...
    min_rounds: int = 3         # ... but at least this many
    max_rounds: int = 20


# A memory measurement (one more call) runs between warm-up and the timed rounds, so
# every timed round comes after at least two calls.
QUICK = Policy(min_calls=1, min_seconds=0.0, max_calls=1, budget_s=0.1, min_rounds=3,
               max_rounds=3)
STANDARD = Policy()
# GPU steps take milliseconds: more warm-up calls and rounds, in less time per path.
GPU = Policy(min_calls=3, min_seconds=0.1, max_calls=50, budget_s=0.3, min_rounds=10,
             max_rounds=100)
GPU_QUICK = Policy(min_calls=2, min_seconds=0.0, max_calls=2, budget_s=0.05, min_rounds=5,
                   max_rounds=5)


def policy_for(device_type: str, quick: bool = False) -> Policy:
    if device_type == "cuda":
        return GPU_QUICK if quick else GPU
    return QUICK if quick else STANDARD


def for_training_step(policy: Policy) -> Policy:
    """A whole network's first calls are slow for longer (every layer's buffers and
    kernel choices): at least 3 warm-up calls."""
    return Policy(min_calls=max(3, policy.min_calls), min_seconds=policy.min_seconds,
                  max_calls=max(3, policy.max_calls), budget_s=policy.budget_s,
                  min_rounds=policy.min_rounds, max_rounds=policy.max_rounds)


def warm_up(step: Callable[[], object], policy: Policy) -> float:
    """Run the warm-up calls; returns the duration of the last one (seconds)."""
    start = time.perf_counter()
    last = 0.0
    for calls in range(1, max(policy.min_calls, policy.max_calls) + 1):
        t0 = time.perf_counter()
        step()
        last = time.perf_counter() - t0
        if calls >= policy.min_calls and time.perf_counter() - start >= policy.min_seconds:
            break
    return last


def rounds_for(step_seconds: float, policy: Policy) -> int:
    if step_seconds <= 0:
        return policy.max_rounds
    return int(min(policy.max_rounds, max(policy.min_rounds, policy.budget_s // step_seconds)))


def estimate_seconds(call_s: float, policy: "Policy", profiled: float = 1.5) -> float:
    """Wall time one path's measurement takes when one call takes `call_s`: the memory
    call (under the profiler: `profiled` times slower), the warm-up up to
    `policy.min_seconds`, then the timed rounds (`interleaved_rounds`). For planning."""
    warm = max(0.0, policy.min_seconds - profiled * call_s) if call_s < policy.min_seconds else 0.0
    rounds = max(policy.min_rounds, min(policy.max_rounds, int(policy.budget_s // max(call_s, 1e-9))))
    return profiled * call_s + warm + rounds * call_s


@dataclass
class Timing:
    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)

    def _ms(self) -> List[float]:
        return sorted(1e3 * s for s in self.seconds)

    @property
    def rounds(self) -> int:
        return len(self.seconds)

    @property
    def median_ms(self) -> float:
        return statistics.median(self._ms())

    @property
    def q1_ms(self) -> float:
        return _quantile(self._ms(), 0.25)

    @property
    def q3_ms(self) -> float:
        return _quantile(self._ms(), 0.75)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def min_ms(self) -> float:
        return self._ms()[0]

    @property
    def max_ms(self) -> float:
        return self._ms()[-1]

    @property
    def cpu_median_ms(self) -> Optional[float]:
        return statistics.median(1e3 * s for s in self.cpu_seconds) if self.cpu_seconds else None

    @property
    def noisy(self) -> bool:
        return self.iqr_ms > NOISY_IQR * self.median_ms

    def as_dict(self) -> dict:
        return {"time_ms": self.median_ms, "time_iqr_ms": self.iqr_ms,
                "time_q1_ms": self.q1_ms, "time_q3_ms": self.q3_ms,
                "time_min_ms": self.min_ms, "time_max_ms": self.max_ms, "rounds": self.rounds,
                "time_cpu_ms": self.cpu_median_ms, "noisy": self.noisy}


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_rounds(step: Callable[[], object], rounds: int) -> Timing:
    """Time `rounds` calls one by one (after warm-up)."""
    timing = Timing()
    for _ in range(rounds):
        _timed_call(step, timing)
    return timing


def _timed_call(step: Callable[[], object], timing: Timing) -> None:
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    timing.seconds.append(time.perf_counter() - t0)
    timing.cpu_seconds.append(time.process_time() - c0)


def measure(step: Callable[[], object], policy: Policy = STANDARD) -> Timing:
    """Warm up, then time `rounds_for(...)` calls one by one."""
    warm = warm_up(step, policy)
    return time_rounds(step, rounds_for(warm, policy))


def interleaved_rounds(warm_seconds: Sequence[float], policy: Policy) -> int:
    """Rounds for steps timed together: about `budget_s` per step, same count for all."""
    total = sum(warm_seconds)
    if total <= 0:
        return policy.max_rounds
    per_round_budget = policy.budget_s * len(warm_seconds)
    return int(min(policy.max_rounds, max(policy.min_rounds, per_round_budget // total)))


def time_interleaved(step_list: Sequence[Callable[[], object]], rounds: int
                     ) -> Tuple[List[Timing], List[Optional[BaseException]]]:
    """Time every step `rounds` times, round-robin with a rotating start. A step that
    raises is dropped from later rounds; its error is returned in its slot."""
    timings = [Timing() for _ in step_list]
    errors: List[Optional[BaseException]] = [None] * len(step_list)
    n = len(step_list)
    for r in range(rounds):
        for k in range(n):
            i = (r + k) % n
            if errors[i] is not None:
                continue
            try:
                _timed_call(step_list[i], timings[i])
            except Exception as exc:  # recorded by the caller as a failed path
                errors[i] = exc
    return timings, errors
