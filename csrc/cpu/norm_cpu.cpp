// CPU passes of the NORM ops (the table declared in csrc/pass_kernels.h).
//
// Every pass is parallel over channels (rows of the packed (C, K) matrices) with
// at::parallel_for; a task owns whole rows, so the per-row accumulators need no
// atomics and the results do not depend on the thread count.  A chunk is a range of
// flat positions [p0, p0 + K), possibly starting and ending inside batch rows; inner
// loops run over one run of positions within a batch row, contiguous in the packed
// matrix, in the contiguous (B, C, L) outputs and (after the driver's checks) in t
// and err: `omp simd` loops that the compiler vectorises (-fopenmp-simd; no OpenMP
// runtime).  Float32 partial sums are added into float64 row accumulators, so the
// summation error does not grow with P.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../pass_kernels.h"

#if defined(_MSC_VER) && !defined(__clang__)
#define NF_SIMD
#define NF_SIMD_SUM(var)
#else
#define NF_PRAGMA(x) _Pragma(#x)
#define NF_SIMD NF_PRAGMA(omp simd)
#define NF_SIMD_SUM(var) NF_PRAGMA(omp simd reduction(+ : var))
#endif

namespace norm_fast {
namespace {

// Elements a task should touch at least, so that scheduling stays cheap against work.
constexpr int64_t kGrainElems = 32768;

inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_row));
}

template <typename T>
inline T scalar_or_one(const at::Tensor& s) {
  return s.defined() ? s.item<T>() : T(1);
}

// The chunk [p0, p0 + K) of flat positions p = b * L + l, as runs within batch rows:
// f(b, l0, n, k) for positions b*L + l0 .. b*L + l0 + n - 1, at offset k of the chunk.
// Runs are contiguous in the packed rows and, along l, in every (B, C, L) tensor.
template <class F>
inline void for_each_run(int64_t p0, int64_t K, int64_t L, const F& f) {
  const int64_t p1 = p0 + K;
  for (int64_t p = p0; p < p1;) {
    const int64_t b = p / L, l0 = p - b * L, l1 = std::min(L, p1 - b * L);
    f(b, l0, l1 - l0, p - p0);
    p = b * L + l1;
  }
}

// Sum of a contiguous row: vectorised float partial sums of kBlock values, added up
// in float64.
template <typename T>
inline double row_sum(const T* p, int64_t K) {
  constexpr int64_t kBlock = 256;
  double total = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min(K, k0 + kBlock);
    T part = 0;
    NF_SIMD_SUM(part)
    for (int64_t k = k0; k < k1; ++k) part += p[k];
    total += part;
  }
  return total;
}

// ---------------------------------------------------------------------------------
// pack: dst(C, K)[c, p - p0] = src[b, c, l] - shift[c]; or, with row_mean, minus the
// row's own mean (written to row_mean in float64).  Each task fills its rows, then
// centres them while they are still in L1/L2.
template <typename T>
void centre_rows(T* d, int64_t K, int64_t c0, int64_t c1, double* row_mean) {
  for (int64_t c = c0; c < c1; ++c) {
    T* dp = d + c * K;
    const double m = row_sum(dp, K) / static_cast<double>(K);
    const T mt = static_cast<T>(m);
    NF_SIMD
    for (int64_t k = 0; k < K; ++k) dp[k] -= mt;
    // Second pass: the mean of the residuals corrects the first mean's rounding (the
    // block sums above round in T). A constant row then centres to exactly zero, as
    // the literal's BatchNorm does (docs/design.md section 3).
    const double r = row_sum(dp, K) / static_cast<double>(K);
    const T rt = static_cast<T>(r);
    NF_SIMD
    for (int64_t k = 0; k < K; ++k) dp[k] -= rt;
    row_mean[c] = static_cast<double>(mt) + static_cast<double>(rt);
  }
}

template <typename T>
void pack_impl(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& shift,
               const at::Tensor& dst, const at::Tensor& row_mean) {
  const int64_t C = src.size(1), L = src.size(2), K = p1 - p0;
  const int64_t sb = src.stride(0), sc = src.stride(1), sl = src.stride(2);
  const T* s = src.const_data_ptr<T>();
  const T* sh = shift.defined() ? shift.const_data_ptr<T>() : nullptr;
  T* d = dst.mutable_data_ptr<T>();
  double* rm = row_mean.defined() ? row_mean.mutable_data_ptr<double>() : nullptr;

  if (sl == 1 || L == 1) {
    // (B, C, L) layout: each run is one contiguous copy.
    at::parallel_for(0, C, grain_rows(K), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T m = sh ? sh[c] : T(0);
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t n, int64_t k) {
          const T* sp = s + b * sb + c * sc + l0;
          T* dp = d + c * K + k;
          NF_SIMD
          for (int64_t l = 0; l < n; ++l) dp[l] = sp[l] - m;
        });
        if (rm) centre_rows(d, K, c, c + 1, rm);
      }
    });
  } else if (sc == 1) {
    // Channels-last (the flatten(2) of an NHWC map): a transpose.  Tiles of kCB
    // channels: each position reads kCB contiguous values and writes one element into
    // each of kCB packed rows; consecutive positions fill the same kCB cache lines.
    constexpr int64_t kCB = 64;
    const int64_t nblk = (C + kCB - 1) / kCB;
    at::parallel_for(0, nblk, grain_rows(kCB * K), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c0 = q * kCB, c1 = std::min(C, c0 + kCB);
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t n, int64_t k) {
          for (int64_t l = 0; l < n; ++l) {
            const T* sp = s + b * sb + (l0 + l) * sl;
            T* dp = d + k + l;
            for (int64_t c = c0; c < c1; ++c) dp[c * K] = sp[c] - (sh ? sh[c] : T(0));
          }
        });
        if (rm) centre_rows(d, K, c0, c1, rm);
      }
    });
  } else {
    at::parallel_for(0, C, grain_rows(K), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T m = sh ? sh[c] : T(0);
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t n, int64_t k) {
          for (int64_t l = 0; l < n; ++l)
            d[c * K + k + l] = s[b * sb + c * sc + (l0 + l) * sl] - m;
        });
        if (rm) centre_rows(d, K, c, c + 1, rm);
      }
    });
  }
}

// ---------------------------------------------------------------------------------
// unpack: dst[b, c, l] = scale * src[c, p - p0] + bias[c]; row_acc[c] += sum_k src[c, k].
template <typename T>
void unpack_impl(const at::Tensor& src, int64_t p0, const at::Tensor& scale,
                 const at::Tensor& bias, const at::Tensor& dst, const at::Tensor& row_acc) {
  const int64_t C = src.size(0), K = src.size(1);
  const int64_t L = dst.defined() ? dst.size(2) : 1;
  const T* s = src.const_data_ptr<T>();
  const T g = scalar_or_one<T>(scale);
  const T* bs = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* d = dst.defined() ? dst.mutable_data_ptr<T>() : nullptr;
  double* acc = row_acc.defined() ? row_acc.mutable_data_ptr<double>() : nullptr;
  at::parallel_for(0, C, grain_rows(K), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* row = s + c * K;
      if (d) {
        const T bc = bs ? bs[c] : T(0);
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t n, int64_t k) {
          const T* sp = row + k;
          T* dp = d + (b * C + c) * L + l0;
          NF_SIMD
          for (int64_t l = 0; l < n; ++l) dp[l] = g * sp[l] + bc;
        });
      }
      if (acc) acc[c] += row_sum(row, K);
    }
  });
}

// ---------------------------------------------------------------------------------
// error_sq: E = out + bias - t per segment; sq_acc += row sums of E^2; err = E (n == 1).
// Tasks own teacher channels o, and loop over the n segments inside: the teacher row
// of a run is read from memory once and reused n times from L1.
template <typename T, bool kStore>
void error_sq_impl(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                   int64_t p0, int64_t n, const at::Tensor& sq_acc, const at::Tensor& err) {
  const int64_t rows = out.size(0), K = out.size(1), L = t.size(2), C_t = rows / n;
  const int64_t tsb = t.stride(0), tsc = t.stride(1);
  const T* o_ptr = out.const_data_ptr<T>();
  const T* bs = bias.const_data_ptr<T>();
  const T* tp0 = t.const_data_ptr<T>();
  T* ep0 = kStore ? err.mutable_data_ptr<T>() : nullptr;
  double* acc = sq_acc.mutable_data_ptr<double>();
  at::parallel_for(0, C_t, grain_rows(n * K), [&](int64_t q0, int64_t q1) {
    for (int64_t o = q0; o < q1; ++o) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = i * C_t + o;
        const T br = bs[r];
        double total = 0;
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t m, int64_t k) {
          const T* op = o_ptr + r * K + k;
          const T* tp = tp0 + b * tsb + o * tsc + l0;
          T part = 0;
          if (kStore) {
            T* ep = ep0 + (b * C_t + o) * L + l0;
            NF_SIMD_SUM(part)
            for (int64_t l = 0; l < m; ++l) {
              const T e = op[l] + br - tp[l];
              ep[l] = e;
              part += e * e;
            }
          } else {
            NF_SIMD_SUM(part)
            for (int64_t l = 0; l < m; ++l) {
              const T e = op[l] + br - tp[l];
              part += e * e;
            }
          }
          total += part;
        });
        acc[r] += total;
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// error_grad: out <- E in place; sum_acc += row sums of E; dt = dt_scale * sum_i E_i.
// The segment sum of one teacher channel is gathered in a task-local row of K values.
template <typename T, bool kDt>
void error_grad_impl(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                     int64_t p0, int64_t n, const at::Tensor& sum_acc, const at::Tensor& dt,
                     const at::Tensor& dt_scale) {
  const int64_t rows = out.size(0), K = out.size(1), L = t.size(2), C_t = rows / n;
  const int64_t tsb = t.stride(0), tsc = t.stride(1);
  T* o_ptr = out.mutable_data_ptr<T>();
  const T* bs = bias.const_data_ptr<T>();
  const T* tp0 = t.const_data_ptr<T>();
  T* dt0 = kDt ? dt.mutable_data_ptr<T>() : nullptr;
  const T g = kDt ? scalar_or_one<T>(dt_scale) : T(1);
  double* acc = sum_acc.defined() ? sum_acc.mutable_data_ptr<double>() : nullptr;
  at::parallel_for(0, C_t, grain_rows(n * K), [&](int64_t q0, int64_t q1) {
    std::vector<T> seg(kDt ? K : 0);
    for (int64_t o = q0; o < q1; ++o) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = i * C_t + o;
        const T br = bs[r];
        double total = 0;
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t m, int64_t k) {
          T* op = o_ptr + r * K + k;
          const T* tp = tp0 + b * tsb + o * tsc + l0;
          T* sp = kDt ? seg.data() + k : nullptr;
          T part = 0;
          if (kDt && i == 0) {
            NF_SIMD_SUM(part)
            for (int64_t l = 0; l < m; ++l) {
              const T e = op[l] + br - tp[l];
              op[l] = e;
              sp[l] = e;
              part += e;
            }
          } else if (kDt) {
            NF_SIMD_SUM(part)
            for (int64_t l = 0; l < m; ++l) {
              const T e = op[l] + br - tp[l];
              op[l] = e;
              sp[l] += e;
              part += e;
            }
          } else {
            NF_SIMD_SUM(part)
            for (int64_t l = 0; l < m; ++l) {
              const T e = op[l] + br - tp[l];
              op[l] = e;
              part += e;
            }
          }
          total += part;
        });
        if (acc) acc[r] += total;
      }
      if (kDt) {
        for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t m, int64_t k) {
          const T* sp = seg.data() + k;
          T* dp = dt0 + (b * C_t + o) * L + l0;
          NF_SIMD
          for (int64_t l = 0; l < m; ++l) dp[l] = g * sp[l];
        });
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// pack_error: dst = err chunk (packed), sum_acc += row sums, dt = dt_scale * err.
template <typename T>
void pack_error_impl(const at::Tensor& err, int64_t p0, int64_t p1, const at::Tensor& dst,
                     const at::Tensor& sum_acc, const at::Tensor& dt,
                     const at::Tensor& dt_scale) {
  const int64_t C_t = err.size(1), L = err.size(2), K = p1 - p0;
  const int64_t esb = err.stride(0), esc = err.stride(1);
  const T* e0 = err.const_data_ptr<T>();
  T* d = dst.defined() ? dst.mutable_data_ptr<T>() : nullptr;
  T* dt0 = dt.defined() ? dt.mutable_data_ptr<T>() : nullptr;
  const T g = dt.defined() ? scalar_or_one<T>(dt_scale) : T(1);
  double* acc = sum_acc.defined() ? sum_acc.mutable_data_ptr<double>() : nullptr;
  at::parallel_for(0, C_t, grain_rows(K), [&](int64_t q0, int64_t q1) {
    for (int64_t o = q0; o < q1; ++o) {
      double total = 0;
      for_each_run(p0, K, L, [&](int64_t b, int64_t l0, int64_t m, int64_t k) {
        const T* ep = e0 + b * esb + o * esc + l0;
        if (d) {
          T* dp = d + o * K + k;
          NF_SIMD
          for (int64_t l = 0; l < m; ++l) dp[l] = ep[l];
        }
        if (dt0) {
          T* tp = dt0 + (b * C_t + o) * L + l0;
          NF_SIMD
          for (int64_t l = 0; l < m; ++l) tp[l] = g * ep[l];
        }
        if (acc) {
          T part = 0;
          NF_SIMD_SUM(part)
          for (int64_t l = 0; l < m; ++l) part += ep[l];
          total += part;
        }
      });
      if (acc) acc[o] += total;
    }
  });
}

// ---------------------------------------------------------------------------------
// Dtype dispatch (float32 and float64: the compute dtypes).

void pack_cpu(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& shift,
              const at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "norm_fast cpu pack: dtype mismatch");
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "norm_fast_pack", [&] {
    pack_impl<scalar_t>(src, p0, p1, shift, dst, at::Tensor());
  });
}

void pack_centred_cpu(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& dst,
                      const at::Tensor& row_mean) {
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "norm_fast cpu pack: dtype mismatch");
  TORCH_CHECK(row_mean.scalar_type() == at::kDouble && row_mean.is_contiguous(),
              "norm_fast cpu pack: row_mean must be contiguous float64");
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "norm_fast_pack_centred", [&] {
    pack_impl<scalar_t>(src, p0, p1, at::Tensor(), dst, row_mean);
  });
}

void unpack_cpu(const at::Tensor& src, int64_t p0, int64_t p1, const at::Tensor& scale,
                const at::Tensor& bias, const at::Tensor& dst, const at::Tensor& row_acc) {
  (void)p1;  // = p0 + src.size(1)
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "norm_fast_unpack", [&] {
    unpack_impl<scalar_t>(src, p0, scale, bias, dst, row_acc);
  });
}

// The teacher and the stored error are read along L by the inner loops (the driver
// hands them over with unit position stride: norm_ops.h, positions_contiguous).
void check_unit_l(const at::Tensor& v) {
  TORCH_CHECK(v.size(2) == 1 || v.stride(2) == 1, "norm_fast cpu: positions must be contiguous");
}

void error_sq_cpu(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                  int64_t p0, int64_t p1, int64_t n, const at::Tensor& sq_acc,
                  const at::Tensor& err) {
  (void)p1;  // = p0 + out.size(1)
  check_unit_l(t);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "norm_fast_error_sq", [&] {
    if (err.defined())
      error_sq_impl<scalar_t, true>(out, bias, t, p0, n, sq_acc, err);
    else
      error_sq_impl<scalar_t, false>(out, bias, t, p0, n, sq_acc, err);
  });
}

void error_grad_cpu(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& t,
                    int64_t p0, int64_t p1, int64_t n, const at::Tensor& sum_acc,
                    const at::Tensor& dt, const at::Tensor& dt_scale) {
  (void)p1;  // = p0 + out.size(1)
  check_unit_l(t);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "norm_fast_error_grad", [&] {
    if (dt.defined())
      error_grad_impl<scalar_t, true>(out, bias, t, p0, n, sum_acc, dt, dt_scale);
    else
      error_grad_impl<scalar_t, false>(out, bias, t, p0, n, sum_acc, dt, dt_scale);
  });
}

void pack_error_cpu(const at::Tensor& err, int64_t p0, int64_t p1, const at::Tensor& dst,
                    const at::Tensor& sum_acc, const at::Tensor& dt,
                    const at::Tensor& dt_scale) {
  check_unit_l(err);
  AT_DISPATCH_FLOATING_TYPES(err.scalar_type(), "norm_fast_pack_error", [&] {
    pack_error_impl<scalar_t>(err, p0, p1, dst, sum_acc, dt, dt_scale);
  });
}

}  // namespace

PassKernels& cpu_pass_kernels() {
  static PassKernels k = {
      pack_cpu, pack_centred_cpu, unpack_cpu, error_sq_cpu, error_grad_cpu, pack_error_cpu,
      /*pack_any_dtype=*/false,
      // Packed chunk buffers of a few MiB: the GEMM output is still in L2/L3 when its
      // epilogue reads it.
      /*chunk_target_bytes=*/int64_t(8) << 20,
      // Row panels of the covariance (SYRK by GEMMs): 128 rows keep each GEMM large
      // enough for BLAS while skipping most of the upper triangle.
      /*syrk_panel=*/128,
  };
  return k;
}

}  // namespace norm_fast
