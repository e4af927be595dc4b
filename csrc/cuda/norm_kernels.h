// Launcher interface of the NORM CUDA kernels (csrc/cuda/norm_kernels.cu).
//
// Plain C++ types only (pointers, sizes, element strides, a cudaStream_t), so that
// the kernels compile with nvcc alone, without torch headers; the torch binding
// (csrc/cuda/norm_cuda.cpp) turns at::Tensor arguments into these calls.  Every
// launcher enqueues on `stream`, never synchronises, and returns the launch's
// cudaGetLastError() for the caller to check.
//
// Layouts (see csrc/pass_kernels.h): a chunk is the flat positions [p0, p0 + K),
// p = b * L + l, possibly starting and ending inside batch rows; a packed matrix is
// (rows, K) row-major; (B, C, L) position tensors are passed by their base pointer
// and element strides, and every kernel addresses position p0 + k itself.  The compute
// dtype `cdt` is float32 or float64; all arithmetic and accumulation happen in it
// (float32 for fp16/bf16/fp32 sources).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace norm_fast {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A (B, C, L) position tensor: element (b, c, l) at ptr[b * sb + c * sc + l * sl].
struct PositionsView {
  const void* ptr;
  DType dtype;
  int64_t C, L;
  int64_t sb, sc, sl;
};

// dst (C, K) in cdt:  dst[c, p - p0] = src[b, c, l] - shift[c]   (shift: C values in
// cdt, or nullptr).  src may be fp16/bf16/fp32 with cdt float32, or fp64 with cdt
// float64.  A channels-last source (sc == 1) goes through a shared-memory transpose
// so both the reads and the writes are coalesced.
cudaError_t launch_pack(const PositionsView& src, int64_t p0, int64_t K, const void* shift,
                        void* dst, DType cdt, cudaStream_t stream);

// dst (B, C, L) contiguous:
//   dst[b, c, l] = scale * sum_{i < n} src[i * C + c, p - p0] + bias[c],  p in chunk
// src (n * C, K) packed; scale: one cdt value in device memory or nullptr (1); bias:
// C values or nullptr (0).  n = 1 is the plain unpack of a GEMM result (dx); n > 1
// the segment sum of the recomputed error (dt = -2g sum_i E_i).
cudaError_t launch_unpack_segments(const void* src, int64_t n, int64_t C, int64_t L,
                                   int64_t p0, int64_t K, const void* scale, const void* bias,
                                   void* dst, DType cdt, cudaStream_t stream);

// Per-row reduction of a packed (rows, K) matrix `out`, rows = n * C_t:
//   v[r, k] = out[r, k] + bias[r] - t[b, r % C_t, l]       (bias, t given: the error E)
//   v[r, k] = out[r, k]                                      (bias == t == nullptr)
// with p0 + k = b * L + l.  When write_back, out[r, k] = v; when err != nullptr
// (n == 1), err[b, r, l] = v (err a contiguous (B, C_t, L) tensor).  partial[r * nseg + s] receives
// the sum over the s-th segment of kRowSegment positions of v^2 (square) or v; nseg =
// row_reduce_segments(K).  The caller adds the partials up in float64, in a fixed
// order (deterministic: no atomics).  t: its (b, o) strides tsb, tsc; unit stride
// along l.
constexpr int64_t kRowSegment = 1024;
inline int64_t row_reduce_segments(int64_t K) { return (K + kRowSegment - 1) / kRowSegment; }

cudaError_t launch_row_reduce(void* out, int64_t rows, int64_t K, int64_t p0, const void* bias,
                              const void* t, int64_t tsb, int64_t tsc, int64_t C_t, int64_t L,
                              void* err, bool square, bool write_back, void* partial, DType cdt,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace norm_fast
