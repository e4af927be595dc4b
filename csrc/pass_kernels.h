// The P-sized passes of the NORM ops, one implementation per device.
//
// The four ops of norm_fast/ops/torch_ops.py (moments, moments_backward,
// expand_mse_forward, expand_mse_backward) are, per chunk of batch rows, a few
// matrix products (left to ATen: BLAS on the CPU, cuBLAS on CUDA; see norm_ops.h)
// glued together by memory-bound passes over P-sized data.  This header declares
// those passes, as a table of functions that each device fills in:
//   csrc/cpu/norm_cpu.cpp    at::parallel_for over channels, vectorised inner loops
//   csrc/cuda/norm_cuda.cpp  torch binding of the kernels in csrc/cuda/norm_kernels.cu
//
// Layouts shared by every pass (a chunk is the flat positions [p0, p1), K = p1 - p0;
// it may begin and end inside a batch row, so its size is free of B and L):
//   (B, C, L) tensors     x, t, err, dx, dt: positions p = b * L + l, any strides on
//                         input; outputs written by the passes are contiguous.
//   packed (C, K) matrix  row c holds channel c of the chunk's positions, contiguous,
//                         so that one GEMM covers the whole chunk (no per-batch GEMMs
//                         with L = 49 columns, no permute copies as in tensordot).
// Accumulators (`*_acc`) are float64 vectors, added to (never overwritten), so that
// sums over many chunks keep their precision in float32 too.  Scale factors are
// 0-dim tensors in the compute dtype on the tensors' device, or undefined for 1: the
// CUDA kernels read them on the device, so a CUDA backward never synchronises.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace norm_fast {

struct PassKernels {
  // pack: dst(C, K) = src[p0:p1] - shift, in dst's (compute) dtype.  shift (C) or
  // undefined.  src: (B, C, L), any strides; float32/float64, and fp16/bf16 where
  // `pack_any_dtype` (the driver converts other sources first).
  void (*pack)(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& shift,
               const at::Tensor& dst);

  // pack_centred: dst(C, K) = src[p0:p1] - m, m the chunk's own channel means, and
  // row_mean (C, float64) = m: the per-chunk centring of the covariance (norm_ops.h,
  // moments), so the data is read once and never cancels.
  void (*pack_centred)(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& dst,
                       const at::Tensor& row_mean);

  // unpack: dst[p0:p1] = scale * src(C, K) + bias, dst (B, C, L) contiguous (or
  // undefined: nothing written); bias (C) or undefined; row_acc (C) += sum_k src[c, k]
  // (unscaled) when defined.
  void (*unpack)(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& scale,
                 const at::Tensor& bias, const at::Tensor& dst, const at::Tensor& row_acc);

  // error_sq (forward): with out = a @ xc (n*C_t, K) from the GEMM, the error of
  // segment i is E[i*C_t + o, k] = out[i*C_t + o, k] + bias[i*C_t + o] - t[b, o, l]
  // (docs/design.md section 4).  sq_acc (n*C_t) += sum_k E^2; err (B, C_t, L) contiguous,
  // or undefined: err[p0:p1] = E (n == 1 only).  t is in the compute dtype.
  void (*error_sq)(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                   int64_t p0, int64_t p1, int64_t n, const at::Tensor& sq_acc,
                   const at::Tensor& err);

  // error_grad (backward, recomputed error): out <- E in place (the operand of the
  // dA and dX products); sum_acc (n*C_t) += sum_k E; dt (B, C_t, L) contiguous or
  // undefined: dt[p0:p1] = dt_scale * sum_i E_i.
  void (*error_grad)(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                     int64_t p0, int64_t p1, int64_t n, const at::Tensor& sum_acc,
                     const at::Tensor& dt, const at::Tensor& dt_scale);

  // pack_error (backward, stored error, n == 1): dst(C_t, K) = err[p0:p1] (or
  // undefined), sum_acc (C_t) += sum_k err, dt[p0:p1] = dt_scale * err (or undefined).
  void (*pack_error)(const at::Tensor& err, int64_t p0, int64_t p1, const at::Tensor& dst,
                     const at::Tensor& sum_acc, const at::Tensor& dt,
                     const at::Tensor& dt_scale);

  // Device tuning, read by the driver.
  bool pack_any_dtype;          // pack() reads fp16/bf16 sources itself
  int64_t chunk_target_bytes;   // preferred size of a chunk's packed buffers
  int64_t syrk_panel;           // row-panel size of the covariance product (0: one GEMM)
};

// The CPU table (always built).  Mutable only for the tuning fields, which tests set
// through the module's _set_chunk_target_bytes (forcing many small chunks).
PassKernels& cpu_pass_kernels();

// The CUDA table, or nullptr when the extension was built without CUDA.
PassKernels* cuda_pass_kernels();

}  // namespace norm_fast
