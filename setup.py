"""Build script: the norm_fast package, its C++/CUDA sources, and the extension `norm_fast._C`.

Two ways to get the C++ kernels (README "Install"):

* `pip install .` / `pip install -e .` (build isolation, the default): the isolated build
  environment has no torch (on purpose: torch in build-system.requires would download a
  multi-GB CUDA build there), so nothing is compiled at install time. The sources csrc/
  are shipped inside the package as `norm_fast/csrc/` (package data below), and the first
  use compiles them once with torch.utils.cpp_extension.load (ninja, an install
  dependency) into torch's extension cache, with a message while it builds
  (norm_fast/ops/extension.py).
* `pip install --no-build-isolation [-e] .`: this script sees the installed torch and
  compiles csrc/ into `norm_fast._C` at install time, against that torch: the CPU
  kernels always, and the CUDA kernels too when both a CUDA toolkit (nvcc, found through
  CUDA_HOME) and a CUDA build of torch are present.

Set NORM_FAST_NO_EXTENSION=1 to skip the extension, NORM_FAST_NO_CUDA=1 to build it
without CUDA. A failed compile does not fail the install: the package falls back to the
JIT build at first use, and to the pure-PyTorch kernels with a visible warning when that
fails as well.
"""
import os
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _extension_args():
    if _flag("NORM_FAST_NO_EXTENSION"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: the JIT loader takes over later
        return {}

    # Sources are listed relative to setup.py (setuptools rejects absolute paths).
    sources = ["csrc/bindings.cpp", "csrc/cpu/norm_cpu.cpp"]
    if sys.platform == "win32":
        cxx = ["/O2", "/std:c++20"]
    else:
        # -O3 for the vectorised inner loops; -fopenmp-simd honours their `omp simd`
        # pragmas without linking an OpenMP runtime; no -march: the build stays
        # portable to any x86-64 / aarch64 machine of the same platform.
        cxx = ["-O3", "-fopenmp-simd"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _flag("NORM_FAST_NO_CUDA"))
    if with_cuda:
        sources += ["csrc/cuda/norm_cuda.cpp", "csrc/cuda/norm_kernels.cu"]
        ext = cpp_extension.CUDAExtension(
            "norm_fast._C", sources,
            define_macros=[("NORM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            optional=True)
    else:
        ext = cpp_extension.CppExtension(
            "norm_fast._C", sources, extra_compile_args={"cxx": cxx}, optional=True)

    class BuildExtension(cpp_extension.BuildExtension):
        """Builds with ninja; an optional extension that fails to compile only warns."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
                if not getattr(ext, "optional", False):
                    raise
                warnings.warn(f"norm_fast: the C++ extension was not built ({exc}); it will "
                              "be JIT-compiled at first use, or the pure-PyTorch kernels used")

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


# The C++/CUDA sources travel inside the package as `norm_fast/csrc/` (a data-only
# package mapped onto the repository's csrc/), so an installed wheel can JIT-build them.
CSRC_PATTERNS = ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cpp", "cuda/*.h", "cuda/*.cu",
                 "cuda/*.cuh"]

setup(packages=find_packages(include=["norm_fast", "norm_fast.*"]) + ["norm_fast.csrc"],
      package_dir={"norm_fast.csrc": "csrc"},
      package_data={"norm_fast.csrc": CSRC_PATTERNS},
      **_extension_args())
