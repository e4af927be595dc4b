"""Finds the compiled norm_fast extension, or builds it on first use.

Order:
  1. the prebuilt module `norm_fast._C` (made by `pip install -e .`, see setup.py);
  2. a JIT build of csrc/ with `torch.utils.cpp_extension.load` (ninja), cached in
     torch's extension directory (TORCH_EXTENSIONS_DIR, default
     ~/.cache/torch_extensions) and rebuilt only when a source changes; with CUDA
     sources when torch is a CUDA build, a CUDA toolkit is found and a GPU is present,
     and CPU-only if that build fails;
  3. nothing: `load()` returns None and the reason, never raises, so a machine
     without a compiler imports norm_fast fine and the dispatcher falls back to the
     pure-PyTorch kernels with a visible warning.
Set NORM_FAST_NO_EXTENSION=1 to skip the extension entirely.

The sources are read from the repository's csrc/ (a source checkout or an editable
install) or, in an installed wheel, from the package's own copy `norm_fast/csrc/`
(setup.py ships it as package data). A JIT build that has to compile (nothing usable in
the cache yet) prints one message to stderr first: what is built, about how long it
takes, and where the cache lives; and one line when it is done.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from types import ModuleType
from typing import List, Optional, Tuple

from torch import Tensor

from . import eager
from .spec import DEFAULT_CHUNK_BYTES, check_store_error, compute_dtype, gemm_precision

_CPU_SOURCES = ("bindings.cpp", "cpu/norm_cpu.cpp")
_CUDA_SOURCES = ("cuda/norm_cuda.cpp", "cuda/norm_kernels.cu")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # .../norm_fast


def _find_csrc() -> str:
    """The C++ sources: the repository's csrc/ beside the package (source tree, editable
    install), else the copy installed inside the package (norm_fast/csrc/, a wheel)."""
    candidates = (os.path.join(os.path.dirname(_PACKAGE), "csrc"), os.path.join(_PACKAGE, "csrc"))
    for path in candidates:
        if all(os.path.isfile(os.path.join(path, s)) for s in _CPU_SOURCES):
            return path
    return candidates[-1]


_CSRC = _find_csrc()

_lock = threading.Lock()
_state: Optional[Tuple[Optional[ModuleType], str]] = None


def _cxx_flags():
    import sys
    return ["/O2"] if sys.platform == "win32" else ["-O3", "-fopenmp-simd"]


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def _want_cuda() -> Tuple[bool, str]:
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def _jit(with_cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load as cpp_load
    sources = [os.path.join(_CSRC, s) for s in _CPU_SOURCES]
    kwargs = {}
    name = "norm_fast_C_cpu"
    if with_cuda:
        sources += [os.path.join(_CSRC, s) for s in _CUDA_SOURCES]
        kwargs["extra_cuda_cflags"] = ["-O3", "-std=c++17"]
        kwargs["extra_cflags"] = _cxx_flags() + ["-DNORM_FAST_WITH_CUDA=1"]
        name = "norm_fast_C_cuda"
    else:
        kwargs["extra_cflags"] = _cxx_flags()
    cached, where = _cached_build(name, sources)
    if not cached:
        sys.stderr.write(
            f"norm_fast: compiling the C++{'/CUDA' if with_cuda else ''} extension "
            f"({name}) from {_CSRC} on first use; this happens once per torch version and "
            f"source change and takes about {'3-10 minutes' if with_cuda else '30-90 s'} "
            f"(ninja + {_compiler() or 'c++'}). Cache: {where} (set TORCH_EXTENSIONS_DIR to "
            "move it). To build at install time instead: pip install --no-build-isolation .\n")
        sys.stderr.flush()
    start = time.perf_counter()
    module = cpp_load(name=name, sources=sources, verbose=False, **kwargs)
    if not cached:
        sys.stderr.write(f"norm_fast: C++ extension ready "
                         f"({time.perf_counter() - start:.0f} s).\n")
    return module


def _cached_build(name: str, sources: List[str]) -> Tuple[bool, str]:
    """(whether torch's extension cache holds a build of `name` newer than every source,
    the cache directory). Only decides whether to announce a compile; the cache itself is
    torch.utils.cpp_extension's (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/
    py<ver>_<cpu|cuXY>/<name>)."""
    from torch.utils import cpp_extension
    try:
        where = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - a private helper; the message only loses its path
        return False, os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    newest_source = max((os.path.getmtime(s) for s in sources if os.path.exists(s)), default=0)
    try:
        built = [os.path.getmtime(os.path.join(where, f)) for f in os.listdir(where)
                 if f.endswith((".so", ".pyd"))]
    except OSError:
        built = []
    return bool(built) and max(built) >= newest_source, where


def _stale_prebuilt() -> str:
    """A reason to skip the prebuilt module when csrc/ changed after it was built (an
    editable install whose sources were edited since), else ""."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("norm_fast._C")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not os.path.isdir(_CSRC):
        return ""
    built = os.path.getmtime(spec.origin)
    for root, _, files in os.walk(_CSRC):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith((".cpp", ".h", ".cu", ".cuh")) and os.path.getmtime(path) > built:
                return (f"prebuilt norm_fast._C is older than csrc/"
                        f"{os.path.relpath(path, _CSRC)} (rebuild: pip install -e .)")
    return ""


def _find() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get("NORM_FAST_NO_EXTENSION", "") not in ("", "0"):
        return None, "disabled by NORM_FAST_NO_EXTENSION"
    stale = _stale_prebuilt()
    if stale:
        prebuilt_err = stale
    else:
        try:
            from norm_fast import _C  # type: ignore[attr-defined]
            return _C, "prebuilt norm_fast._C"
        except ImportError as exc:
            prebuilt_err = f"no usable prebuilt norm_fast._C ({exc})"
    if not all(os.path.exists(os.path.join(_CSRC, s)) for s in _CPU_SOURCES):
        return None, f"{prebuilt_err}, and the C++ sources are not installed ({_CSRC})"
    if _compiler() is None:
        return None, f"{prebuilt_err}, and no C++ compiler found (set CXX)"
    try:
        import torch.utils.cpp_extension  # noqa: F401  (ninja check happens inside load)
    except ImportError as exc:
        return None, f"{prebuilt_err}, and torch.utils.cpp_extension is unusable ({exc})"
    with_cuda, _ = _want_cuda()
    errors = []
    for cuda in ((True, False) if with_cuda else (False,)):
        try:
            return _jit(cuda), "JIT build" + (" with CUDA" if cuda else "")
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
            first = str(exc).strip().splitlines()
            errors.append(f"JIT build{' with CUDA' if cuda else ''} failed: "
                          f"{first[-1] if first else type(exc).__name__}")
    return None, f"{prebuilt_err}; " + "; ".join(errors)


def load() -> Tuple[Optional[ModuleType], str]:
    """(module, how it was found) or (None, why not); the search runs once per process."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _find()
    return _state


def available(device_type: str) -> Tuple[bool, str]:
    """Whether the extension's kernels can run on `device_type` ("cpu" or "cuda")."""
    module, how = load()
    if module is None:
        return False, how
    if device_type == "cuda":
        if not module.has_cuda():
            ok, why = _want_cuda()
            return False, ("the extension was built without CUDA kernels"
                           + (f" ({why})" if why else ""))
        import torch
        if not torch.cuda.is_available():
            return False, "no CUDA device"
    return True, how


def module() -> ModuleType:
    """The loaded extension; RuntimeError with the reason when there is none."""
    mod, how = load()
    if mod is None:
        raise RuntimeError(f"norm_fast C++ extension unavailable: {how}")
    return mod


def checked_module(device_type: str, backend: str, *tensors) -> ModuleType:
    """The extension, after checking that every given tensor is on `device_type`."""
    for t in tensors:
        if t is not None and t.device.type != device_type:
            raise ValueError(f"norm_fast backend {backend!r} runs on {device_type} tensors, "
                             f"got a tensor on {t.device}")
    return module()


class KernelSet:
    """The op contract (`norm_fast/ops/spec.py`) on one device of the extension: `CPP`
    (csrc/cpu, CPU tensors) and `CUDA` (csrc/cuda, CUDA tensors) below."""

    def __init__(self, device: str, name: str):
        self.device, self.name = device, name

    def available(self) -> Tuple[bool, str]:
        return available(self.device)

    # The extension's GEMMs are ATen's (cuBLAS on CUDA): `gemm_precision` sets their
    # float32 precision, exact for the moments, the plan's for the P-sized products.
    # Its moments are exact whatever the plan's "gram" says (float64 sums: at least as
    # accurate as any planned precision; `precision.ran_in` reports it).
    def moments(self, x: Tensor, precision: str = "float64") -> Tuple[Tensor, Tensor]:
        ext = checked_module(self.device, self.name, x)
        with gemm_precision(x.device, compute_dtype(x.dtype), "ieee"):
            return tuple(ext.moments(x))

    # The fused training step's small algebra (O x C elementwise work): ATen's ops, no
    # kernel of the extension's own (docs/design.md section 8).
    centred_moments = staticmethod(eager.centred_moments)
    centre_segments = staticmethod(eager.centre_segments)
    decomposed_total = staticmethod(eager.decomposed_total)
    expansion_forward = staticmethod(eager.expansion_forward)
    expansion_backward = staticmethod(eager.expansion_backward)

    def moments_backward(self, x: Tensor, mean: Tensor, grad_mean: Optional[Tensor],
                         grad_cov: Optional[Tensor], precision: str = "ieee") -> Tensor:
        ext = checked_module(self.device, self.name, x, mean, grad_mean, grad_cov)
        with gemm_precision(x.device, mean.dtype, "ieee"):
            return ext.moments_backward(x, mean, grad_mean, grad_cov)

    def expand_mse_forward(self, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                           shift: Optional[Tensor], n: int, store_error: bool,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                           precision: str = "ieee") -> Tuple[Tensor, Tensor]:
        check_store_error(n, store_error)
        ext = checked_module(self.device, self.name, x, t, a, b, shift)
        with gemm_precision(x.device, compute_dtype(x.dtype), precision):
            return tuple(ext.expand_mse_forward(x, t, a, b, shift, int(n), bool(store_error),
                                                int(chunk_bytes)))

    def expand_mse_backward(self, grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                            shift: Optional[Tensor], n: int, err: Optional[Tensor],
                            grad_mask: List[bool], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            precision: str = "ieee", grad_precision: Optional[str] = None
                            ) -> Tuple[Tensor, ...]:
        ext = checked_module(self.device, self.name, x, t, a, b, shift, err)
        # one C++ function recomputes and differentiates: the finer of the two precisions
        fine = "tf32" if precision == (grad_precision or precision) == "tf32" else "ieee"
        with gemm_precision(x.device, compute_dtype(x.dtype), fine):
            return tuple(ext.expand_mse_backward(grad, x, t, a, b, shift, int(n), err,
                                                 [bool(m) for m in grad_mask],
                                                 int(chunk_bytes)))


# The two kernel sets of the extension, registered by name in `norm_fast/dispatch.py`.
CPP = KernelSet("cpu", "cpp")
CUDA = KernelSet("cuda", "cuda")
