// CUDA kernels of the NORM passes (interface: norm_kernels.h).  Compiles with nvcc
// alone: no torch headers.
//
// The passes are memory-bound (the multiply-adds are in cuBLAS, called by the
// binding); what matters is that every global access is coalesced and that each
// value is read and written once:
//   pack            K-major rows of the packed matrix; a channels-last source goes
//                   through a 32x33 shared-memory tile (reads along channels, writes
//                   along positions, padding against bank conflicts).
//   unpack_segments one thread per output element of the chunk: for a fixed
//                   channel, consecutive positions are consecutive in the packed row
//                   and in the output row, so both sides coalesce; the n-segment sum
//                   (dt = -2g sum_i E_i) reads n rows of the packed error.
//   row_reduce      one warp per (row, segment of kRowSegment positions): 32 lanes
//                   read 32 consecutive positions, reduce with shuffles, and lane 0
//                   writes one partial.  The float64 sum of the partials is done by
//                   the caller in a fixed order: deterministic, no atomics.
// Arithmetic is in the compute type Tc (float for fp16/bf16/fp32 sources, double for
// fp64), as in norm_fast/ops/torch_ops.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "norm_kernels.h"

namespace norm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;   // elementwise kernels: threads per block
constexpr int kTile = 32;       // transpose tile edge; also the warp width
constexpr int kTileRows = 8;    // tile rows per pass: blocks of 32 x 8 threads
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::min(std::max<int64_t>(1, ceil_div(total, kThreads)),
                                        kMaxBlocks));
}

// Source element -> compute type.
template <typename Tc, typename Tin>
__device__ __forceinline__ Tc load_as(const Tin* p, int64_t i);
template <>
__device__ __forceinline__ float load_as<float, float>(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ double load_as<double, double>(const double* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load_as<float, __half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p,
                                                               int64_t i) {
  return __bfloat162float(p[i]);
}

// ---------------------------------------------------------------------------------
// pack, general strides (coalesced when sl == 1): one thread per packed element.
template <typename Tin, typename Tc>
__global__ void __launch_bounds__(kThreads)
    pack_rows_kernel(const Tin* __restrict__ src, int64_t C, int64_t L, int64_t p0, int64_t K,
                     int64_t sb, int64_t sc, int64_t sl, const Tc* __restrict__ shift,
                     Tc* __restrict__ dst) {
  const int64_t total = C * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t c = i / K, p = p0 + (i - c * K);
    const int64_t b = p / L, l = p - b * L;
    Tc v = load_as<Tc>(src, b * sb + c * sc + l * sl);
    if (shift != nullptr) v -= shift[c];
    dst[i] = v;
  }
}

// pack, channels-last source (unit channel stride): a tiled transpose.
template <typename Tin, typename Tc>
__global__ void __launch_bounds__(kTile * kTileRows)
    pack_transpose_kernel(const Tin* __restrict__ src, int64_t C, int64_t L, int64_t p0,
                          int64_t K, int64_t sb, int64_t sl, const Tc* __restrict__ shift,
                          Tc* __restrict__ dst) {
  __shared__ Tc tile[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t ctiles = ceil_div(C, kTile);
  for (int64_t ct = blockIdx.y; ct < ctiles; ct += gridDim.y) {
    const int64_t c0 = ct * kTile;
    // Read: lanes along channels (unit stride), rows of the tile along positions.
    for (int j = ty; j < kTile; j += kTileRows) {
      const int64_t k = k0 + j, c = c0 + tx;
      if (k < K && c < C) {
        const int64_t p = p0 + k, b = p / L, l = p - b * L;
        tile[j][tx] = load_as<Tc>(src, b * sb + c + l * sl);
      }
    }
    __syncthreads();
    // Write: lanes along positions (a packed row is contiguous).
    for (int j = ty; j < kTile; j += kTileRows) {
      const int64_t c = c0 + j, k = k0 + tx;
      if (k < K && c < C) {
        Tc v = tile[tx][j];
        if (shift != nullptr) v -= shift[c];
        dst[c * K + k] = v;
      }
    }
    __syncthreads();  // the tile is refilled by the next channel tile
  }
}

template <typename Tin, typename Tc>
cudaError_t pack_typed(const PositionsView& s, int64_t p0, int64_t K, const void* shift,
                       void* dst, cudaStream_t stream) {
  const Tin* src = static_cast<const Tin*>(s.ptr);
  const Tc* sh = static_cast<const Tc*>(shift);
  Tc* d = static_cast<Tc*>(dst);
  if (s.sc == 1 && s.sl != 1 && s.L > 1) {
    const dim3 block(kTile, kTileRows);
    const dim3 grid(static_cast<unsigned>(ceil_div(K, kTile)),
                    static_cast<unsigned>(std::min(ceil_div(s.C, kTile), kMaxGridY)));
    pack_transpose_kernel<Tin, Tc><<<grid, block, 0, stream>>>(src, s.C, s.L, p0, K, s.sb,
                                                                s.sl, sh, d);
  } else {
    pack_rows_kernel<Tin, Tc><<<grid_for(s.C * K), kThreads, 0, stream>>>(
        src, s.C, s.L, p0, K, s.sb, s.sc, s.sl, sh, d);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------
// unpack with a sum over n segments: dst[b, c, l] = g * sum_i src[i*C + c, k] + bias[c],
// p0 + k = b * L + l.
template <typename Tc>
__global__ void __launch_bounds__(kThreads)
    unpack_segments_kernel(const Tc* __restrict__ src, int64_t n, int64_t C, int64_t L,
                           int64_t p0, int64_t K, const Tc* __restrict__ scale,
                           const Tc* __restrict__ bias, Tc* __restrict__ dst) {
  const Tc g = scale != nullptr ? *scale : Tc(1);
  const int64_t total = C * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t c = i / K, k = i - c * K;
    Tc s = src[i];
    for (int64_t q = 1; q < n; ++q) s += src[q * total + i];
    const int64_t p = p0 + k, b = p / L, l = p - b * L;
    Tc v = g * s;
    if (bias != nullptr) v += bias[c];
    dst[(b * C + c) * L + l] = v;
  }
}

// ---------------------------------------------------------------------------------
// Row reduction (see norm_kernels.h): a warp per (row, segment), blocks of 8 warps.
template <typename Tc, bool kSquare>
__global__ void __launch_bounds__(kTile * kTileRows)
    row_reduce_kernel(Tc* __restrict__ out, int64_t rows, int64_t K, int64_t p0,
                      const Tc* __restrict__ bias, const Tc* __restrict__ t, int64_t tsb,
                      int64_t tsc, int64_t C_t, int64_t L, Tc* __restrict__ err,
                      bool write_back, Tc* __restrict__ partial, int64_t nseg) {
  const int lane = threadIdx.x;
  const int64_t seg = blockIdx.x;
  const int64_t k_begin = seg * kRowSegment;
  const int64_t k_end = k_begin + kRowSegment < K ? k_begin + kRowSegment : K;
  // r is the same for the 32 lanes of a warp, so whole warps leave the loop together
  // and the full-mask shuffles below are safe.
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * kTileRows) {
    const int64_t o = r % C_t;
    const Tc br = (t != nullptr) ? bias[r] : Tc(0);
    Tc* row = out + r * K;
    Tc acc = 0;
    for (int64_t k = k_begin + lane; k < k_end; k += kTile) {
      Tc v = row[k];
      if (t != nullptr) {
        const int64_t p = p0 + k, b = p / L, l = p - b * L;
        v = v + br - t[b * tsb + o * tsc + l];
        if (err != nullptr) err[(b * C_t + o) * L + l] = v;
      }
      if (write_back) row[k] = v;
      acc += kSquare ? v * v : v;
    }
#pragma unroll
    for (int off = kTile / 2; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) partial[r * nseg + seg] = acc;
  }
}

template <typename Tc>
cudaError_t row_reduce_typed(void* out, int64_t rows, int64_t K, int64_t p0, const void* bias,
                             const void* t, int64_t tsb, int64_t tsc, int64_t C_t, int64_t L,
                             void* err, bool square, bool write_back, void* partial,
                             cudaStream_t stream) {
  const int64_t nseg = row_reduce_segments(K);
  const dim3 block(kTile, kTileRows);
  const dim3 grid(static_cast<unsigned>(nseg),
                  static_cast<unsigned>(std::min(ceil_div(rows, kTileRows), kMaxGridY)));
  Tc* o = static_cast<Tc*>(out);
  const Tc* bs = static_cast<const Tc*>(bias);
  const Tc* tp = static_cast<const Tc*>(t);
  Tc* e = static_cast<Tc*>(err);
  Tc* part = static_cast<Tc*>(partial);
  if (square)
    row_reduce_kernel<Tc, true><<<grid, block, 0, stream>>>(o, rows, K, p0, bs, tp, tsb, tsc,
                                                            C_t, L, e, write_back, part, nseg);
  else
    row_reduce_kernel<Tc, false><<<grid, block, 0, stream>>>(o, rows, K, p0, bs, tp, tsb, tsc,
                                                             C_t, L, e, write_back, part, nseg);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------
// Launchers: dtype dispatch.

cudaError_t launch_pack(const PositionsView& src, int64_t p0, int64_t K, const void* shift,
                        void* dst, DType cdt, cudaStream_t stream) {
  if (src.C == 0 || K == 0) return cudaSuccess;
  if (cdt == DType::kFloat64) {
    if (src.dtype != DType::kFloat64) return cudaErrorInvalidValue;
    return pack_typed<double, double>(src, p0, K, shift, dst, stream);
  }
  if (cdt != DType::kFloat32) return cudaErrorInvalidValue;
  switch (src.dtype) {
    case DType::kFloat32:
      return pack_typed<float, float>(src, p0, K, shift, dst, stream);
    case DType::kFloat16:
      return pack_typed<__half, float>(src, p0, K, shift, dst, stream);
    case DType::kBFloat16:
      return pack_typed<__nv_bfloat16, float>(src, p0, K, shift, dst, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_unpack_segments(const void* src, int64_t n, int64_t C, int64_t L,
                                   int64_t p0, int64_t K, const void* scale, const void* bias,
                                   void* dst, DType cdt, cudaStream_t stream) {
  if (C == 0 || K == 0) return cudaSuccess;
  if (cdt == DType::kFloat32) {
    unpack_segments_kernel<float><<<grid_for(C * K), kThreads, 0, stream>>>(
        static_cast<const float*>(src), n, C, L, p0, K, static_cast<const float*>(scale),
        static_cast<const float*>(bias), static_cast<float*>(dst));
  } else if (cdt == DType::kFloat64) {
    unpack_segments_kernel<double><<<grid_for(C * K), kThreads, 0, stream>>>(
        static_cast<const double*>(src), n, C, L, p0, K, static_cast<const double*>(scale),
        static_cast<const double*>(bias), static_cast<double*>(dst));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_row_reduce(void* out, int64_t rows, int64_t K, int64_t p0, const void* bias,
                              const void* t, int64_t tsb, int64_t tsc, int64_t C_t, int64_t L,
                              void* err, bool square, bool write_back, void* partial, DType cdt,
                              cudaStream_t stream) {
  if (rows == 0 || K == 0) return cudaSuccess;
  if (t != nullptr && bias == nullptr) return cudaErrorInvalidValue;
  if (cdt == DType::kFloat32)
    return row_reduce_typed<float>(out, rows, K, p0, bias, t, tsb, tsc, C_t, L, err, square,
                                   write_back, partial, stream);
  if (cdt == DType::kFloat64)
    return row_reduce_typed<double>(out, rows, K, p0, bias, t, tsb, tsc, C_t, L, err, square,
                                    write_back, partial, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace norm_fast
