// Python bindings of the norm_fast extension: the four ops of the contract
// (norm_fast/ops/torch_ops.py) for CPU tensors and, when built with CUDA, CUDA tensors.
// The ops are the device-agnostic drivers of norm_ops.h; the device's passes come from
// csrc/cpu/norm_cpu.cpp and csrc/cuda/norm_cuda.cpp.  The GIL is released while an op
// runs, so other Python threads (data loading) keep going.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "norm_ops.h"

namespace norm_fast {

#ifndef NORM_FAST_WITH_CUDA
PassKernels* cuda_pass_kernels() { return nullptr; }
#endif

bool has_cuda_kernels() { return cuda_pass_kernels() != nullptr; }

// Test hook: the device's preferred chunk size in bytes (returns the previous value).
// Tests set it tiny to run the multi-chunk paths at small shapes.  Not thread-safe
// against ops running concurrently.
int64_t set_chunk_target_bytes(const std::string& device, int64_t bytes) {
  TORCH_CHECK(bytes >= 1, "chunk target must be >= 1 byte");
  PassKernels* k = device == "cpu" ? &cpu_pass_kernels() : cuda_pass_kernels();
  TORCH_CHECK(k != nullptr, "norm_fast: no kernels for device ", device);
  const int64_t old = k->chunk_target_bytes;
  k->chunk_target_bytes = bytes;
  return old;
}

}  // namespace norm_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace nf = norm_fast;
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.doc() = "norm_fast C++/CUDA kernels: the P-sized passes of the NORM loss";
  m.def("moments", &nf::moments, release(), "mean (C,) and biased covariance (C, C) of x",
        pybind11::arg("x"));
  m.def("moments_backward", &nf::moments_backward, release(),
        "dL/dx for (mean, cov) = moments(x)", pybind11::arg("x"), pybind11::arg("mean"),
        pybind11::arg("grad_mean"), pybind11::arg("grad_cov"));
  m.def("expand_mse_forward", &nf::expand_mse_forward, release(),
        "sum_i ||a_i (x - shift) + b_i - t||^2, and the error when store_error",
        pybind11::arg("x"), pybind11::arg("t"), pybind11::arg("a"), pybind11::arg("b"),
        pybind11::arg("shift"), pybind11::arg("n"), pybind11::arg("store_error"),
        pybind11::arg("chunk_bytes"));
  m.def("expand_mse_backward", &nf::expand_mse_backward, release(),
        "(dx, dt, da, db, dshift) of g * expand_mse_forward(...)[0]", pybind11::arg("grad"),
        pybind11::arg("x"), pybind11::arg("t"), pybind11::arg("a"), pybind11::arg("b"),
        pybind11::arg("shift"), pybind11::arg("n"), pybind11::arg("err"),
        pybind11::arg("grad_mask"), pybind11::arg("chunk_bytes"));
  m.def("has_cuda", &nf::has_cuda_kernels, "whether this build holds the CUDA kernels");
  m.def("_set_chunk_target_bytes", &nf::set_chunk_target_bytes,
        "test hook: set a device's preferred chunk size (bytes), return the old one",
        pybind11::arg("device"), pybind11::arg("bytes"));
}
