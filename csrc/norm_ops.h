// Device-agnostic drivers of the four NORM ops (the contract of
// norm_fast/ops/torch_ops.py), shared by the "cpp" (CPU) and "cuda" backends.
//
// Each op walks the flat positions p = b * L + l in chunks (ranges of positions, not
// of batch rows: a chunk's size depends on neither B nor L).  Per chunk:
//   1. pack      the chunk's student positions, centred (x - shift), into a (C_s, K)
//                matrix: one pass that also converts the dtype and absorbs any input
//                strides (a channels_last map's flatten(2) included);
//   2. GEMM      through ATen (BLAS / cuBLAS): a @ Xc, G @ Xc, E @ Xc^T, a^T @ E;
//   3. epilogue  one fused pass over the GEMM output: bias, teacher, squared norm,
//                error store, row sums, dt -- instead of separate elementwise
//                tensor passes, each allocating a P-sized temporary.
// Only the passes (pass_kernels.h) differ between devices.  Chunks are sized to the
// device's cache target (CPU: the buffers stay in cache between the GEMM and its
// epilogue) and, for the recomputed error of the direct algorithm, to `chunk_bytes`,
// so nothing of size n*C_t*P is ever allocated (docs/design.md section 5).
// Chunks run in sequence; each pass is parallel inside (CPU: at::parallel_for over
// channels, GPU: a grid) and so is each GEMM (multithreaded BLAS, cuBLAS).  Measured
// on the CPU, this beat running whole chunks concurrently (one per thread, serial
// BLAS) by 5-10% at the benchmark shape, and keeps results independent of the
// thread count.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "pass_kernels.h"

namespace norm_fast {

// float64 stays float64; every other floating dtype accumulates in float32.
inline at::ScalarType compute_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

inline const PassKernels& kernels_for(const at::Tensor& x) {
  if (x.is_cuda()) {
    const PassKernels* k = cuda_pass_kernels();
    TORCH_CHECK(k != nullptr,
                "norm_fast: this build of the extension has no CUDA kernels (it was built "
                "without a CUDA toolkit or against a CPU-only torch)");
    return *k;
  }
  TORCH_CHECK(x.device().is_cpu(), "norm_fast: unsupported device ", x.device());
  return cpu_pass_kernels();
}

inline void check_positions(const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.dim() == 3, "norm_fast: ", name, " must be (B, C, L), got shape ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "norm_fast: ", name,
              " must be a floating tensor, got ", v.scalar_type());
  TORCH_CHECK(v.size(0) > 0 && v.size(2) > 0, "norm_fast: ", name, " has no positions");
}

inline void check_same_device(const at::Tensor& x, const at::Tensor& v, const char* name) {
  TORCH_CHECK(v.device() == x.device(), "norm_fast: ", name, " is on ", v.device(),
              " but x is on ", x.device());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Positions per chunk: as many as fit the device's chunk target at `bytes_per_pos`
// each, at most `limit` (P when unbounded), then evened out so that the chunks have
// near-equal sizes.
inline int64_t chunk_positions(const PassKernels& k, int64_t P, int64_t bytes_per_pos,
                               int64_t limit) {
  int64_t K = k.chunk_target_bytes / std::max<int64_t>(1, bytes_per_pos);
  K = std::max<int64_t>(1, std::min({K, limit, P}));
  return ceil_div(P, ceil_div(P, K));
}

// The most positions whose recomputed error (rows per position, `item` bytes each) the
// direct path may hold at once: what chunk_bytes allows, and never all P of them -- an
// n*C_t*P block is what this algorithm exists to avoid (docs/design.md section 5), even
// when it would fit.
inline int64_t direct_limit(int64_t P, int64_t rows, int64_t item, int64_t chunk_bytes) {
  const int64_t by_bytes = chunk_bytes / std::max<int64_t>(1, rows * item);
  return std::max<int64_t>(1, std::min(by_bytes, P > 1 ? ceil_div(P, 2) : 1));
}

// A contiguous (rows, cols) view of the front of a flat work buffer: the last chunk
// is shorter, and the passes and GEMMs want dense rows.
inline at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// The source as pack() reads it: the compute dtype, or a half type the device's pack
// converts on the fly.
inline at::Tensor as_source(const at::Tensor& x, at::ScalarType cdt, const PassKernels& k) {
  const auto s = x.scalar_type();
  if (s == cdt) return x;
  if (k.pack_any_dtype && cdt == at::kFloat && (s == at::kHalf || s == at::kBFloat16)) return x;
  return x.to(cdt);
}

// The teacher and the stored error are read along L by every device's passes (the
// CPU's inner loops, the GPU's coalesced warps): give them unit position stride once
// per op (a copy only for layouts such as channels_last; x itself is never copied,
// pack() reads any strides).
inline at::Tensor positions_contiguous(const at::Tensor& v) {
  return (v.size(2) == 1 || v.stride(2) == 1) ? v : v.contiguous();
}

inline at::Tensor vector_in(const std::optional<at::Tensor>& v, at::ScalarType cdt,
                            const at::Tensor& x, int64_t numel, const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  check_same_device(x, *v, name);
  TORCH_CHECK(v->numel() == numel, "norm_fast: ", name, " must have ", numel,
              " elements, got shape ", v->sizes());
  return v->to(cdt).reshape({numel}).contiguous();
}

// cov[lower] += xp xp^T by row panels: panel [i0, i1) gets rows i0..i1 against
// columns 0..i1, so only the lower triangle and the diagonal blocks are formed --
// (m + 1) / 2m of the full product's multiply-adds with m panels (5/8 at C = 512,
// m = 4): a blocked SYRK through GEMMs, which ATen offers on every device.  Measured
// against 64- and 256-row panels, 128 was fastest.  panel <= 0: one full GEMM.
inline void syrk_lower_accumulate(const at::Tensor& cov, const at::Tensor& xp, int64_t panel) {
  const int64_t C = xp.size(0);
  if (panel <= 0 || panel >= C) {
    cov.addmm_(xp, xp.t());
    return;
  }
  // Equal panels (the last one not much smaller than the others).
  const int64_t step = ceil_div(C, ceil_div(C, panel));
  for (int64_t i0 = 0; i0 < C; i0 += step) {
    const int64_t i1 = std::min(C, i0 + step);
    cov.narrow(0, i0, i1 - i0).narrow(1, 0, i1).addmm_(xp.narrow(0, i0, i1 - i0),
                                                       xp.narrow(0, 0, i1).t());
  }
}

// cov = its lower triangle mirrored, by panel blocks (cache-friendly transposed copies
// of step x step blocks instead of one strided pass over the whole matrix).
inline void mirror_lower(const at::Tensor& cov, int64_t panel) {
  const int64_t C = cov.size(0);
  const int64_t step = ceil_div(C, ceil_div(C, panel));
  for (int64_t i0 = 0; i0 < C; i0 += step) {
    const int64_t ni = std::min(C, i0 + step) - i0;
    const at::Tensor diag = cov.narrow(0, i0, ni).narrow(1, i0, ni);
    const at::Tensor low = diag.tril();
    diag.copy_(low + low.tril(-1).t());
    for (int64_t j0 = 0; j0 < i0; j0 += step) {
      const int64_t nj = std::min(C, j0 + step) - j0;
      cov.narrow(0, j0, nj).narrow(1, i0, ni).copy_(cov.narrow(0, i0, ni).narrow(1, j0, nj).t());
    }
  }
}

// ---------------------------------------------------------------------------------
// moments: mean (C) and biased covariance (C, C) over the B*L positions, in one pass
// over x (docs/design.md section 3).  Each chunk c of K_c positions is centred by its own
// channel means m_c before its product, so nothing cancels however large the mean is
// against the spread; the chunks combine exactly (Chan et al.'s pairwise update):
//   P * cov = sum_c Xc_c Xc_c^T + sum_c K_c (m_c - m)(m_c - m)^T,  m = sum_c K_c m_c / P.
// The second sum is a (C x nchunks)(nchunks x C) product in float64.
inline std::tuple<at::Tensor, at::Tensor> moments(const at::Tensor& x) {
  check_positions(x, "x");
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard(x.device());
  const PassKernels& k = kernels_for(x);
  const auto cdt = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  const auto opts64 = x.options().dtype(at::kDouble);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), P = B * L;
  const int64_t item = static_cast<int64_t>(c10::elementSize(cdt));
  const at::Tensor src = as_source(x, cdt, k);
  // The products are summed in float64 (float32 positions are widened chunk by chunk):
  // a float32 sum over P positions has a relative error of about eps * sqrt(P / 3) on
  // the diagonal (16 eps at P = 784), and near convergence every per-row scale of the
  // BatchNorm'd expansion derives from this covariance -- the loss moved by 2-4e-6
  // where the literal's float64-accumulated statistics err by 3e-7 (docs/design.md s.3).
  const bool widen = cdt == at::kFloat;
  at::Tensor cov = at::zeros({C, C}, widen ? opts64 : opts);
  if (C == 0) return {at::zeros({0}, opts), cov.to(cdt)};

  const int64_t K = chunk_positions(k, P, C * item, P), nchunks = ceil_div(P, K);
  const at::Tensor xbuf = at::empty({C * K}, opts);
  const at::Tensor wbuf = widen ? at::empty({C * K}, opts64) : at::Tensor();
  const at::Tensor chunk_means = at::empty({nchunks, C}, opts64);
  for (int64_t p0 = 0; p0 < P; p0 += K) {
    const int64_t p1 = std::min(P, p0 + K);
    const at::Tensor xp = front(xbuf, C, p1 - p0);
    k.pack_centred(src, p0, p1, xp, chunk_means[p0 / K]);
    if (widen) {
      const at::Tensor xw = front(wbuf, C, p1 - p0);
      xw.copy_(xp);
      syrk_lower_accumulate(cov, xw, k.syrk_panel);
    } else {
      syrk_lower_accumulate(cov, xp, k.syrk_panel);
    }
  }
  if (k.syrk_panel > 0 && k.syrk_panel < C) mirror_lower(cov, k.syrk_panel);

  // Positions per chunk (all K but the last) and the combination.
  const at::Tensor counts = at::full({nchunks}, double(K), opts64);
  counts.narrow(0, nchunks - 1, 1).fill_(double(P - (nchunks - 1) * K));
  const at::Tensor mean64 = at::matmul(counts, chunk_means).div_(static_cast<double>(P));
  if (nchunks > 1) {
    const at::Tensor dev = chunk_means - mean64;
    const at::Tensor between = at::matmul((dev * counts.unsqueeze(1)).t(), dev);
    cov.add_(((between + between.t()) * 0.5).to(cov.scalar_type()));  // exactly symmetric
  }
  cov.div_(static_cast<double>(P));
  return {mean64.to(cdt), cov.to(cdt)};
}

// ---------------------------------------------------------------------------------
// moments_backward: dx = ((G + G^T) (x - mean) + g_mean) / P in x's dtype, computed
// in mean's dtype (the Xc-through-mean term vanishes: Xc sums to zero).
inline at::Tensor moments_backward(const at::Tensor& x, const at::Tensor& mean,
                                   const std::optional<at::Tensor>& grad_mean,
                                   const std::optional<at::Tensor>& grad_cov) {
  check_positions(x, "x");
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard(x.device());
  const PassKernels& k = kernels_for(x);
  const auto cdt = mean.scalar_type();
  TORCH_CHECK(cdt == at::kFloat || cdt == at::kDouble,
              "norm_fast: mean must be float32 or float64, got ", cdt);
  check_same_device(x, mean, "mean");
  const auto opts = x.options().dtype(cdt);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), P = B * L;
  const double invP = 1.0 / static_cast<double>(P);
  at::Tensor bias = vector_in(grad_mean, cdt, x, C, "grad_mean");
  if (bias.defined()) bias = bias.mul(invP);  // out of place: vector_in may alias the input

  const bool has_cov = grad_cov.has_value() && grad_cov->defined();
  if (!has_cov) {
    at::Tensor dx = bias.defined() ? bias.view({1, C, 1}).expand({B, C, L})
                                   : at::zeros({B, C, L}, opts);
    return dx.to(x.scalar_type()).contiguous();
  }
  check_same_device(x, *grad_cov, "grad_cov");
  TORCH_CHECK(grad_cov->dim() == 2 && grad_cov->size(0) == C && grad_cov->size(1) == C,
              "norm_fast: grad_cov must be (C, C) with C=", C, ", got ", grad_cov->sizes());
  const at::Tensor G = (*grad_cov + grad_cov->t()).to(cdt).mul_(invP).contiguous();
  const at::Tensor mean_c = mean.reshape({C}).contiguous();
  const at::Tensor src = as_source(x, cdt, k);
  const int64_t item = static_cast<int64_t>(c10::elementSize(cdt));

  at::Tensor dx = at::empty({B, C, L}, opts);
  const int64_t K = chunk_positions(k, P, 2 * C * item, P);
  const at::Tensor xbuf = at::empty({C * K}, opts);
  const at::Tensor ybuf = at::empty({C * K}, opts);
  for (int64_t p0 = 0; p0 < P; p0 += K) {
    const int64_t p1 = std::min(P, p0 + K);
    const at::Tensor xp = front(xbuf, C, p1 - p0);
    at::Tensor yp = front(ybuf, C, p1 - p0);
    k.pack(src, p0, p1, mean_c, xp);
    at::mm_out(yp, G, xp);
    k.unpack(yp, p0, p1, at::Tensor(), bias, dx, at::Tensor());
  }
  return x.scalar_type() == cdt ? dx : dx.to(x.scalar_type());
}

// Shared argument checks of the two expand_mse ops; returns C_t.
inline int64_t check_expand_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& a,
                                 const at::Tensor& b, int64_t n) {
  check_positions(x, "x");
  check_positions(t, "t");
  check_same_device(x, t, "t");
  check_same_device(x, a, "a");
  check_same_device(x, b, "b");
  TORCH_CHECK(n >= 1, "norm_fast: n must be >= 1, got ", n);
  TORCH_CHECK(t.size(0) == x.size(0) && t.size(2) == x.size(2),
              "norm_fast: t must be (B, C_t, L) with the B and L of x ", x.sizes(), ", got ",
              t.sizes());
  const int64_t C_t = t.size(1);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == n * C_t && a.size(1) == x.size(1),
              "norm_fast: a must be (n*C_t, C_s) = (", n * C_t, ", ", x.size(1), "), got ",
              a.sizes());
  TORCH_CHECK(b.numel() == n * C_t, "norm_fast: b must have n*C_t = ", n * C_t,
              " elements, got shape ", b.sizes());
  return C_t;
}

// ---------------------------------------------------------------------------------
// expand_mse_forward: sum_i ||a_i (x - shift) + b_i - t||^2 (docs/design.md section 4),
// and the error itself when store_error (n == 1: the decomposed residual R).
inline std::tuple<at::Tensor, at::Tensor> expand_mse_forward(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& a, const at::Tensor& b,
    const std::optional<at::Tensor>& shift, int64_t n, bool store_error, int64_t chunk_bytes) {
  TORCH_CHECK_VALUE(!store_error || n == 1,
                    "store_error needs n == 1 (one residual), got n=", n);
  const int64_t C_t = check_expand_args(x, t, a, b, n);
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard(x.device());
  const PassKernels& k = kernels_for(x);
  const auto cdt = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  const int64_t B = x.size(0), C_s = x.size(1), L = x.size(2), rows = n * C_t;
  const int64_t item = static_cast<int64_t>(c10::elementSize(cdt));

  const at::Tensor a_c = a.to(cdt).contiguous();
  const at::Tensor b_c = b.to(cdt).reshape({rows}).contiguous();
  const at::Tensor shift_c = vector_in(shift, cdt, x, C_s, "shift");
  const at::Tensor src = as_source(x, cdt, k);
  const at::Tensor tt = positions_contiguous(t.to(cdt));

  // The stored error is the output itself; the recomputed one is bounded.
  const int64_t P = B * L;
  const int64_t limit = store_error ? P : direct_limit(P, rows, item, chunk_bytes);
  const int64_t K = chunk_positions(k, P, (C_s + rows) * item, limit);
  const at::Tensor xbuf = at::empty({C_s * K}, opts);
  const at::Tensor obuf = at::empty({rows * K}, opts);
  const at::Tensor sq_acc = at::zeros({rows}, opts.dtype(at::kDouble));
  const at::Tensor err = store_error ? at::empty({B, C_t, L}, opts) : at::Tensor();
  for (int64_t p0 = 0; p0 < P; p0 += K) {
    const int64_t p1 = std::min(P, p0 + K);
    const at::Tensor xp = front(xbuf, C_s, p1 - p0);
    at::Tensor op = front(obuf, rows, p1 - p0);
    k.pack(src, p0, p1, shift_c, xp);
    at::mm_out(op, a_c, xp);
    k.error_sq(op, b_c, tt, p0, p1, n, sq_acc, err);
  }
  at::Tensor sq = sq_acc.sum().to(cdt);
  return {sq, store_error ? err : at::empty({0}, opts)};
}

// ---------------------------------------------------------------------------------
// expand_mse_backward: gradients of g * expand_mse_forward(...)[0]; grad_mask =
// [x, t, a, b, shift]; unwanted gradients are empty tensors.  With E the error:
//   da = 2g E Xc^T   db = 2g sum_p E   dx = 2g a^T E   dt = -2g sum_i E_i
//   dshift = -sum_p dx.
// `err`: the stored error (n == 1), or none: E is recomputed chunk by chunk.
inline std::vector<at::Tensor> expand_mse_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& a,
    const at::Tensor& b, const std::optional<at::Tensor>& shift, int64_t n,
    const std::optional<at::Tensor>& err, const std::vector<bool>& grad_mask,
    int64_t chunk_bytes) {
  TORCH_CHECK(grad_mask.size() == 5, "norm_fast: grad_mask must have 5 entries, got ",
              grad_mask.size());
  const int64_t C_t = check_expand_args(x, t, a, b, n);
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard guard(x.device());
  const PassKernels& k = kernels_for(x);
  const auto cdt = compute_dtype(x.scalar_type());
  const auto opts = x.options().dtype(cdt);
  const int64_t B = x.size(0), C_s = x.size(1), L = x.size(2), rows = n * C_t;
  const int64_t item = static_cast<int64_t>(c10::elementSize(cdt));
  const bool has_shift = shift.has_value() && shift->defined();
  const bool want_x = grad_mask[0], want_t = grad_mask[1], want_a = grad_mask[2],
             want_b = grad_mask[3], want_s = grad_mask[4] && has_shift;
  const bool need_dx = want_x || want_s;  // dshift is minus the position sum of dx
  const at::Tensor empty = at::empty({0}, opts);
  if (!(need_dx || want_t || want_a || want_b)) return {empty, empty, empty, empty, empty};

  const bool stored = err.has_value() && err->defined();
  at::Tensor e_src;
  if (stored) {
    TORCH_CHECK(n == 1, "norm_fast: a stored error needs n == 1, got n=", n);
    check_same_device(x, *err, "err");
    TORCH_CHECK(err->dim() == 3 && err->size(0) == B && err->size(1) == C_t &&
                    err->size(2) == L,
                "norm_fast: err must be (B, C_t, L) = (", B, ", ", C_t, ", ", L, "), got ",
                err->sizes());
    e_src = positions_contiguous(err->to(cdt));
  }
  // 2g on the device, never read back (no synchronisation on CUDA).
  const at::Tensor g2 = grad.to(x.device(), cdt).reshape({}).mul(2);
  const at::Tensor neg_g2 = g2.neg();
  const at::Tensor a_c = a.to(cdt).contiguous();
  const at::Tensor b_c = b.to(cdt).reshape({rows}).contiguous();
  const at::Tensor shift_c = has_shift ? vector_in(shift, cdt, x, C_s, "shift") : at::Tensor();
  const at::Tensor src = as_source(x, cdt, k);
  const at::Tensor tt = stored ? at::Tensor() : positions_contiguous(t.to(cdt));

  const bool need_xp = !stored || want_a;        // E's recomputation and dA read Xc
  const bool need_ep = !stored || want_a || need_dx;
  const int64_t P = B * L;
  const int64_t limit = stored ? P : direct_limit(P, rows, item, chunk_bytes);
  const int64_t Kc = chunk_positions(k, P, (C_s + rows) * item, limit);
  // xbuf holds Xc, then (after the dA product) a^T E for dx.
  const at::Tensor xbuf = (need_xp || need_dx) ? at::empty({C_s * Kc}, opts) : at::Tensor();
  const at::Tensor ebuf = need_ep ? at::empty({rows * Kc}, opts) : at::Tensor();

  const at::Tensor dx = want_x ? at::empty({B, C_s, L}, opts) : at::Tensor();
  const at::Tensor dt = want_t ? at::empty({B, C_t, L}, opts) : at::Tensor();
  at::Tensor da = want_a ? at::zeros({rows, C_s}, opts) : at::Tensor();
  const auto acc_opts = opts.dtype(at::kDouble);
  const at::Tensor db_acc = want_b ? at::zeros({rows}, acc_opts) : at::Tensor();
  const at::Tensor ds_acc = want_s ? at::zeros({C_s}, acc_opts) : at::Tensor();

  for (int64_t p0 = 0; p0 < P; p0 += Kc) {
    const int64_t p1 = std::min(P, p0 + Kc), K = p1 - p0;
    const at::Tensor xp = need_xp ? front(xbuf, C_s, K) : at::Tensor();
    at::Tensor ep = need_ep ? front(ebuf, rows, K) : at::Tensor();
    if (need_xp) k.pack(src, p0, p1, shift_c, xp);
    if (stored) {
      k.pack_error(e_src, p0, p1, ep, db_acc, dt, neg_g2);
    } else {
      at::mm_out(ep, a_c, xp);
      k.error_grad(ep, b_c, tt, p0, p1, n, db_acc, dt, neg_g2);
    }
    if (want_a) {
      // da = sum_p E (2g xc)^T: scaled before the product, so that E xc^T cannot
      // overflow where the literal's gradient (scaled per element) does not.
      xp.mul_(g2);
      da.addmm_(ep, xp.t());
    }
    if (need_dx) {
      at::Tensor yp = front(xbuf, C_s, K);  // Xc is no longer needed
      at::mm_out(yp, a_c.t(), ep);
      k.unpack(yp, p0, p1, g2, at::Tensor(), dx, ds_acc);
    }
  }
  return {
      want_x ? (x.scalar_type() == cdt ? dx : dx.to(x.scalar_type())) : empty,
      want_t ? (t.scalar_type() == cdt ? dt : dt.to(t.scalar_type())) : empty,
      want_a ? da : empty,
      want_b ? db_acc.to(cdt).mul_(g2) : empty,
      want_s ? ds_acc.to(cdt).mul_(g2).neg_() : empty,
  };
}

}  // namespace norm_fast
