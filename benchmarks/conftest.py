"""Options and fixtures of the pytest-benchmark suite (`pytest benchmarks --benchmark-only`).

    --full                 real batch sizes (ImageNet B=256, CIFAR B=64): for GPUs
    --memory-snapshot DIR  CUDA: save torch.cuda.memory._record_memory_history snapshots of
                           the reference and the fused paths into DIR
    --bench-device DEV     cpu or cuda (default: cuda when available)
    --bench-dtypes LIST    e.g. float32 (default: float32 and bfloat16 where native)

Cases run in this order: eager paths (dtype, shape, path, pass), then the compiled
reference, so nothing eager is timed after inductor's kernels ran in the process.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from benchmarks import models, paths, shapes, steps, timing

warnings.filterwarnings("ignore", message="norm_fast: no compiled kernels")

# The suite's timing policy (timing.STANDARD on CPU: enough rounds for a median, few enough
# for 10 minutes on a 2-core CPU; timing.GPU on CUDA), chosen in `suite_policy`.


def pytest_addoption(parser):
    group = parser.getgroup("norm_fast benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="real batch sizes (ImageNet B=256); default on CPU: batch / "
                         f"{shapes.CPU_BATCH_DIVISOR}")
    group.addoption("--memory-snapshot", default="", metavar="DIR",
                    help="CUDA memory snapshots of the reference and fused paths into DIR")
    group.addoption("--bench-device", default="", help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-dtypes", default="", help="comma list of float32, bfloat16")


@dataclass(frozen=True)
class Case:
    path: paths.PathSpec
    shape: shapes.Shape
    dtype: str
    pass_: str

    @property
    def id(self) -> str:
        return f"{self.shape.name}-{self.path.name}-{self.dtype}-{self.pass_}"


@dataclass(frozen=True)
class SuiteConfig:
    device: torch.device
    full: bool
    dtypes: Tuple[str, ...]
    snapshot_dir: str
    skipped: Tuple[Tuple[str, str], ...]


def suite_config(config) -> SuiteConfig:
    cached = getattr(config, "_norm_bench_config", None)
    if cached is not None:
        return cached
    device = steps.pick_device(config.getoption("--bench-device"))
    ok, why = steps.bf16_supported(device)
    wanted = [d.strip() for d in config.getoption("--bench-dtypes").split(",") if d.strip()]
    dtypes = wanted or ["float32", "bfloat16"]
    skipped = []
    if "bfloat16" in dtypes and not ok:
        dtypes.remove("bfloat16")
        skipped.append(("bfloat16", why))
    cfg = SuiteConfig(device, config.getoption("--full"), tuple(dtypes),
                      config.getoption("--memory-snapshot"), tuple(skipped))
    config._norm_bench_config = cfg
    return cfg


def suite_cases(cfg: SuiteConfig) -> List[Case]:
    found, _ = paths.discover(cfg.device.type)
    shape_list = [shapes.scaled(s, cfg.device.type, cfg.full) for s in shapes.SHAPES]
    cases = []
    for compiled in (False, True):
        for dtype in cfg.dtypes:
            for shape in shape_list:
                for path in (p for p in found if p.compiled == compiled):
                    for pass_ in steps.PASSES:
                        cases.append(Case(path, shape, dtype, pass_))
    return cases


# Cases by id: tests are parametrized with the id strings (so pytest-benchmark's JSON
# holds plain params) and the `case` / `step_case` fixtures look them up here.
_CASES: Dict[str, Case] = {}
_STEP_CASES: Dict[str, Tuple[Optional[paths.PathSpec], str]] = {}


def pytest_generate_tests(metafunc):
    cfg = suite_config(metafunc.config)
    if "case_id" in metafunc.fixturenames:
        for c in suite_cases(cfg):
            _CASES[c.id] = c
        metafunc.parametrize("case_id", [c.id for c in suite_cases(cfg)])
    if "step_case_id" in metafunc.fixturenames:
        found, _ = paths.discover(cfg.device.type)
        norm_paths = [None] + [p for p in found if not p.compiled]
        for d in cfg.dtypes:
            for p in norm_paths:
                _STEP_CASES[f"{p.name if p else 'none'}-{d}"] = (p, d)
        metafunc.parametrize("step_case_id", list(_STEP_CASES))


@pytest.fixture
def case(case_id) -> Case:
    return _CASES[case_id]


@pytest.fixture
def step_case(step_case_id) -> Tuple[Optional[paths.PathSpec], str]:
    return _STEP_CASES[step_case_id]


def pytest_report_header(config):
    cfg = suite_config(config)
    _, skipped = paths.discover(cfg.device.type)
    scaling = ("real batch sizes" if cfg.full or cfg.device.type != "cpu"
               else shapes.SCALING_NOTE)
    lines = [f"norm_fast benchmarks: device {cfg.device}, dtypes {', '.join(cfg.dtypes)}, "
             f"shapes: {scaling}"]
    lines += [f"  not run: {n}: {why}" for n, why in list(skipped) + list(cfg.skipped)]
    return lines


@pytest.fixture(scope="session")
def bench_config(request) -> SuiteConfig:
    return suite_config(request.config)


@pytest.fixture(scope="session")
def suite_policy(bench_config) -> timing.Policy:
    return timing.policy_for(bench_config.device.type)


class _ModuleCache:
    """Keeps the last built (path, shape, dtype) module, so the forward and the
    forward+backward cases of a compiled path share one compilation."""

    def __init__(self):
        self.key: Optional[Tuple] = None
        self.value = None
        self.error: Optional[str] = None

    def get(self, case: Case, device: torch.device):
        key = (case.path, case.shape, case.dtype)
        if key != self.key:
            self.key, self.value, self.error = key, None, None
            self.value = paths.build_module(case.path, case.shape, device)
        return self.value


_CACHE = _ModuleCache()


@pytest.fixture
def module_cache() -> _ModuleCache:
    return _CACHE


@pytest.fixture(scope="session")
def step_config(bench_config) -> models.StepConfig:
    if bench_config.full or bench_config.device.type != "cpu":
        return models.GPU_STEP
    return models.CPU_STEP
