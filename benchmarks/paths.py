"""Which NORM implementations ("paths") exist on this machine, and how each is built.

Paths, by name:
    reference                  the literal module (NORM backend="torch", algorithm="direct":
                               norm_fast/reference.py, the oracle), eager
    reference-compiled         the same module under torch.compile (dynamic=False)
    norm_fast-<backend>-<alg>  NORM(backend=<backend>, algorithm=<alg>) for every concrete
                               backend available on the device and alg in direct,
                               decomposed, auto ("torch"-direct and "torch"-auto are the
                               reference itself and are not repeated)
    norm_fast-auto             NORM() with its defaults (backend="auto", algorithm="auto"):
                               what a user gets
An "auto" path runs exactly the code of the concrete path it resolves to at a shape (its
"twin": norm_fast-<backend>-<algorithm>, or the reference for the literal form), so it is
not timed again where that twin is benchmarked: its records carry the twin's numbers and
`same_as` (see `twin`).
Availability is asked of `norm_fast.dispatch`, never assumed; what is left out is
returned with the reason.
"""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

from norm_fast import NORM, dispatch

from .shapes import Shape

CONCRETE_BACKENDS = ("torch", "triton", "cpp", "cuda")
ALGORITHMS = ("direct", "decomposed", "auto")


@dataclass(frozen=True)
class PathSpec:
    name: str
    backend: str          # as requested from NORM
    algorithm: str        # as requested from NORM
    compiled: bool = False

    @property
    def is_reference(self) -> bool:
        return self.name in ("reference", "reference-compiled")

    @property
    def is_fused_kernel(self) -> bool:
        """Paths whose kernels are fused GPU kernels (memory snapshots are taken of these)."""
        return self.backend in ("triton", "cuda") or self.name == "norm_fast-auto"


REFERENCE = PathSpec("reference", "torch", "direct")
REFERENCE_COMPILED = PathSpec("reference-compiled", "torch", "direct", compiled=True)


def _backend_usable(backend: str, device_type: str) -> Tuple[bool, str]:
    if device_type == "cpu" and backend == "triton":
        return False, "Triton on CPU runs under its interpreter: far too slow to benchmark"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dispatch.resolve_backend(backend, device_type)
    except (ValueError, RuntimeError) as exc:
        return False, str(exc)
    return True, ""


def discover(device_type: str) -> Tuple[List[PathSpec], List[Tuple[str, str]]]:
    """(paths to benchmark, [(left-out name, reason)]) on this device type."""
    paths = [REFERENCE, REFERENCE_COMPILED]
    skipped: List[Tuple[str, str]] = []
    for backend in CONCRETE_BACKENDS:
        ok, why = _backend_usable(backend, device_type)
        if not ok:
            skipped.append((f"norm_fast-{backend}-*", why))
            continue
        for alg in ALGORITHMS:
            name = f"norm_fast-{backend}-{alg}"
            if backend == "torch" and alg in ("direct", "auto"):
                skipped.append((name, "is the literal reference (benchmarked as `reference`)"))
                continue
            paths.append(PathSpec(name, backend, alg))
    paths.append(PathSpec("norm_fast-auto", "auto", "auto"))
    return paths, skipped


def filter_paths(paths: List[PathSpec], include: Optional[Iterable[str]] = None,
                 exclude: Optional[Iterable[str]] = None) -> List[PathSpec]:
    """Keep paths matching any `include` glob (all if none) and no `exclude` glob.
    The reference is always kept: every ratio is against it."""
    inc = [p.strip() for p in (include or []) if p.strip()]
    exc = [p.strip() for p in (exclude or []) if p.strip()]
    kept = []
    for p in paths:
        wanted = p is REFERENCE or not inc or any(fnmatch.fnmatchcase(p.name, g) for g in inc)
        if wanted and (p is REFERENCE or not any(fnmatch.fnmatchcase(p.name, g) for g in exc)):
            kept.append(p)
    return kept


def twin(path: PathSpec, group: List[PathSpec], shape: Shape,
         device_type: str) -> Optional[PathSpec]:
    """The concrete path in `group` that runs the same computation as the "auto" `path`
    at `shape`, or None (not an auto path, or its twin is not in the group)."""
    if path.compiled or "auto" not in (path.backend, path.algorithm):
        return None
    backend, algorithm = resolved(path, shape, device_type)
    for other in group:
        if other.compiled or other is path or "auto" in (other.backend, other.algorithm):
            continue
        if (other.backend, other.algorithm) == (backend, algorithm):
            return other
    return None


def build_module(path: PathSpec, shape: Shape, device: torch.device, seed: int = 0):
    """(module to call, the NORM module holding the parameters), seeded identically for
    every path, in training mode, float32 parameters (bfloat16 runs use autocast)."""
    torch.manual_seed(seed)
    module = NORM(shape.student_channels, shape.teacher_channels, shape.n, batchnorm=True,
                  backend=path.backend, algorithm=path.algorithm).to(device).train()
    if not path.compiled:
        return module, module
    torch._dynamo.reset()  # a fresh cache per shape: never fall back to eager on a cache limit
    return torch.compile(module, dynamic=False), module


def resolved(path: PathSpec, shape: Shape, device_type: str) -> Tuple[str, str]:
    """The (backend, algorithm) that actually runs for this path at this shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = dispatch.resolve(path.backend, path.algorithm, device_type, shape.batch,
                                shape.student_channels, shape.teacher_channels,
                                shape.height, shape.width, shape.n)
    # "literal" is reported as the ("torch", "direct") pair the results have always used
    return plan.backend, ("direct" if plan.literal else plan.algorithm)
