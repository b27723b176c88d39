// RMSNorm over the last dimension, computed as the decoder's torch code (and transformers) computes it:
// x in fp32, r = 1 / sqrt(mean(x^2) + eps), y = T(x * r), out = T(weight * y), with T the input dtype, in
// one pass per row instead of eight ops. The sum of squares runs in another order than torch's reduction
// (fp32 rounding differences; on bf16 outputs a rare last-bit difference).
#include "ops.h"
#include "spin_pool.h"

#include <cmath>

namespace {

// One row: r = 1 / sqrt(mean(x^2) + eps), out = T(weight * T(x * r)).
template <typename T>
void rms_row(const T* xr, const T* w, T* o, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(xr[i]);
    ss += v * v;
  }
  const float scale = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const T y = static_cast<T>(static_cast<float>(xr[i]) * scale);
    o[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(y));
  }
}

// Rows on the kernels' pool (spin_pool.h) past 64 Ki values, else inline: OpenMP's region, entered on every
// call even where its `if` clause kept it to one thread, was about half of a decode row's call (a row of 576
// from Python: 2.0-2.7 us with it, 1.5 without).
template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, int64_t x_stride, float eps) {
  spin_parallel(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(x + r * x_stride, w, out + r * n, n, eps);
  }, spin_min_items(rows, rows * n));
}

// x += residual row by row (T(x + residual), as torch's add rounds), then each row's norm into out.
template <typename T>
void add_rms_rows(T* x, const T* residual, const T* w, T* out, int64_t rows, int64_t n, float eps) {
  spin_parallel(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * n;
      const T* rr = residual + r * n;
      for (int64_t i = 0; i < n; ++i) xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      rms_row(xr, w, out + r * n, n, eps);
    }
  }, spin_min_items(rows, rows * n));
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.scalar_type() == weight.scalar_type(),
              "rms_norm: CPU tensors of one dtype");
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1 && weight.dim() == 1 && weight.is_contiguous() &&
              weight.size(0) == x.size(-1), "rms_norm: weight must match the contiguous last dimension");
  const int64_t n = x.size(-1);
  at::Tensor rows = x.reshape({-1, n});              // a view for the decoder's inputs
  TORCH_CHECK(rows.stride(1) == 1, "rms_norm: rows must have contiguous features");
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(rows.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       rows.size(0), n, rows.stride(0), static_cast<float>(eps));
  });
  return out;
}

at::Tensor add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && residual.device().is_cpu() && weight.device().is_cpu() &&
              x.scalar_type() == weight.scalar_type() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm_: CPU tensors of one dtype");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.sizes() == x.sizes() && residual.is_contiguous() &&
              weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "add_rms_norm_: contiguous x and residual [rows, n] and weight [n]");
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    add_rms_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}
