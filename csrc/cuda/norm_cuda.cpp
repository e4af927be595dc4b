// Torch binding of the NORM CUDA kernels: fills the CUDA PassKernels table
// (csrc/pass_kernels.h) by turning at::Tensor arguments into the plain launchers of
// norm_kernels.h.  Matrix products are not here: the device-agnostic drivers
// (csrc/norm_ops.h) run them through ATen, i.e. cuBLAS, on the same current stream.
//
// Every launch goes on the current CUDA stream of the current device (the driver
// holds a device guard for x's device) and its error is checked right after it.  The
// small reductions of the per-row partials (float64, fixed order) are ATen ops on the
// same stream; nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../pass_kernels.h"
#include "norm_kernels.h"

namespace norm_fast {
namespace {

cuda::DType dtype_of(const at::Tensor& v) {
  switch (v.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "norm_fast cuda: unsupported dtype ", v.scalar_type());
  }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* ptr_or_null(const at::Tensor& v) { return v.defined() ? v.const_data_ptr() : nullptr; }

cuda::PositionsView positions(const at::Tensor& v) {
  return cuda::PositionsView{v.const_data_ptr(), dtype_of(v), v.size(1), v.size(2),
                             v.stride(0), v.stride(1), v.stride(2)};
}

void pack_cuda(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& shift,
               const at::Tensor& dst) {
  C10_CUDA_CHECK(cuda::launch_pack(positions(src), p0, p1 - p0, ptr_or_null(shift),
                                   dst.mutable_data_ptr(), dtype_of(dst), current_stream()));
}

// The chunk's channel means through ATen on the packed (C, K) matrix (float64 sum),
// then subtracted in place: two extra passes over data cuBLAS reads right after.
void pack_centred_cuda(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& dst,
                       const at::Tensor& row_mean) {
  pack_cuda(src, p0, p1, at::Tensor(), dst);
  const at::Tensor m = dst.sum(1, /*keepdim=*/false, at::kDouble).div_(dst.size(1));
  row_mean.copy_(m);
  dst.sub_(m.to(dst.scalar_type()).unsqueeze(1));
}

void unpack_cuda(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& scale,
                 const at::Tensor& bias, const at::Tensor& dst, const at::Tensor& row_acc) {
  if (dst.defined()) {
    C10_CUDA_CHECK(cuda::launch_unpack_segments(
        src.const_data_ptr(), 1, src.size(0), dst.size(2), p0, p1 - p0, ptr_or_null(scale),
        ptr_or_null(bias), dst.mutable_data_ptr(), dtype_of(src), current_stream()));
  }
  if (row_acc.defined()) row_acc.add_(src.sum(1, /*keepdim=*/false, at::kDouble));
}

// Per-row partial sums (rows, nseg) of the row-reduce kernel, added into `acc`.
void row_reduce(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                int64_t p0, int64_t n, const at::Tensor& err, bool square, bool write_back,
                const at::Tensor& acc) {
  const int64_t rows = out.size(0), K = out.size(1), C_t = rows / n;
  at::Tensor partial = at::empty({rows, cuda::row_reduce_segments(K)}, out.options());
  C10_CUDA_CHECK(cuda::launch_row_reduce(
      out.mutable_data_ptr(), rows, K, p0, ptr_or_null(bias), ptr_or_null(t),
      t.defined() ? t.stride(0) : 0, t.defined() ? t.stride(1) : 0, C_t,
      t.defined() ? t.size(2) : 1, err.defined() ? err.mutable_data_ptr() : nullptr, square,
      write_back, partial.mutable_data_ptr(), dtype_of(out), current_stream()));
  if (acc.defined()) acc.add_(partial.sum(1, /*keepdim=*/false, at::kDouble));
}

void error_sq_cuda(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                   int64_t p0, int64_t p1, int64_t n, const at::Tensor& sq_acc,
                   const at::Tensor& err) {
  (void)p1;  // = p0 + out.size(1)
  row_reduce(out, bias, t, p0, n, err, /*square=*/true, /*write_back=*/false, sq_acc);
}

void error_grad_cuda(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                     int64_t p0, int64_t p1, int64_t n, const at::Tensor& sum_acc,
                     const at::Tensor& dt, const at::Tensor& dt_scale) {
  row_reduce(out, bias, t, p0, n, at::Tensor(), /*square=*/false, /*write_back=*/true,
             sum_acc);
  if (dt.defined()) {
    C10_CUDA_CHECK(cuda::launch_unpack_segments(
        out.const_data_ptr(), n, out.size(0) / n, dt.size(2), p0, p1 - p0,
        ptr_or_null(dt_scale), nullptr, dt.mutable_data_ptr(), dtype_of(out),
        current_stream()));
  }
}

// Through the pack kernel and ATen: a (B, C_t, L) view of the chunk's positions is
// not a strided tensor once the chunk splits batch rows, so the sums and dt go through
// the packed copy (or a flat view of err when it is contiguous).
void pack_error_cuda(const at::Tensor& err, int64_t p0, int64_t p1, const at::Tensor& dst,
                     const at::Tensor& sum_acc, const at::Tensor& dt,
                     const at::Tensor& dt_scale) {
  const int64_t C_t = err.size(1), L = err.size(2), K = p1 - p0;
  at::Tensor packed = dst;
  if (!packed.defined() && (sum_acc.defined() || dt.defined()))
    packed = at::empty({C_t, K}, err.options());
  if (!packed.defined()) return;
  pack_cuda(err, p0, p1, at::Tensor(), packed);
  if (sum_acc.defined()) sum_acc.add_(packed.sum(1, /*keepdim=*/false, at::kDouble));
  if (dt.defined()) {
    C10_CUDA_CHECK(cuda::launch_unpack_segments(
        packed.const_data_ptr(), 1, C_t, L, p0, K, ptr_or_null(dt_scale), nullptr,
        dt.mutable_data_ptr(), dtype_of(packed), current_stream()));
  }
}

}  // namespace

PassKernels* cuda_pass_kernels() {
  static PassKernels k = {
      pack_cuda, pack_centred_cuda, unpack_cuda, error_sq_cuda, error_grad_cuda,
      pack_error_cuda,
      /*pack_any_dtype=*/true,
      // GPU memory is large and cuBLAS is most efficient on long products: one chunk
      // unless `chunk_bytes` (the direct path's bound) asks for more.
      /*chunk_target_bytes=*/int64_t(1) << 30,
      // One full covariance GEMM: on the GPU the half-flop row panels lose more to
      // smaller launches than they save.
      /*syrk_panel=*/0,
  };
  return &k;
}

}  // namespace norm_fast
