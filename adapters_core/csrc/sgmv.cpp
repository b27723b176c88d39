// Fused per-token LoRA for decode-shaped batches on the CPU (the shrink and expand of Punica's SGMV in one
// pass): result[g] += (x[g] @ A[slot[g]]) @ B[slot[g]], reading each token's adapter rows straight from the
// stacked tensors (no gathered copies), accumulating in fp32 whatever the dtypes, and adding into the base
// output in place (one rounding to its dtype, as `add_` of an fp32 delta does).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename wt, typename xt, typename rt>
void sgmv_rows(const xt* x, int64_t x_stride, const wt* a_stack, const wt* b_stack, const int64_t* slots,
               rt* result, int64_t r_stride, int64_t groups, int64_t in, int64_t rank, int64_t out_features) {
#pragma omp parallel
  {
  std::vector<float> h(rank), acc(out_features);                 // per thread, reused for its rows
#pragma omp for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(h.begin(), h.end(), 0.f);
    std::fill(acc.begin(), acc.end(), 0.f);
    const wt* a = a_stack + slots[g] * in * rank;                // [in, R]
    const xt* xg = x + g * x_stride;
    for (int64_t i = 0; i < in; ++i) {
      const float xi = to_float(xg[i]);
      const wt* row = a + i * rank;
#pragma omp simd
      for (int64_t r = 0; r < rank; ++r) h[r] += xi * to_float(row[r]);
    }
    const wt* b = b_stack + slots[g] * rank * out_features;     // [R, out]
    for (int64_t r = 0; r < rank; ++r) {
      const float hr = h[r];
      const wt* row = b + r * out_features;
#pragma omp simd
      for (int64_t o = 0; o < out_features; ++o) acc[o] += hr * to_float(row[o]);
    }
    rt* rg = result + g * r_stride;
    for (int64_t o = 0; o < out_features; ++o) rg[o] = static_cast<rt>(to_float(rg[o]) + acc[o]);
  }
  }
}

template <typename wt, typename xt>
void dispatch_result(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                     const torch::Tensor& slots, torch::Tensor& result) {
  const int64_t groups = x.size(0), in = x.size(1), rank = a.size(2), out_features = b.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, result.scalar_type(), "sgmv_result", [&] {
    sgmv_rows<wt, xt, scalar_t>(x.data_ptr<xt>(), x.stride(0), a.data_ptr<wt>(), b.data_ptr<wt>(),
                                slots.data_ptr<int64_t>(), result.data_ptr<scalar_t>(), result.stride(0), groups,
                                in, rank, out_features);
  });
}

}  // namespace

// result [G, out] (rows may be strided, last dim contiguous) += x [G, in] @ A[slots] @ B[slots];
// A [n, in, R] and B [n, R, out] contiguous with one dtype; x and result any of fp32 / bf16 / fp16.
void sgmv_add_(torch::Tensor result, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor slots) {
  TORCH_CHECK(x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() && result.device().is_cpu(),
              "sgmv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && result.dim() == 2 && result.stride(1) == 1,
              "sgmv: x and result must be 2-D with contiguous rows");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous(), "sgmv: stacks must be contiguous");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sgmv: A and B must share a dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == x.size(0),
              "sgmv: one int64 slot per row");
  TORCH_CHECK(a.size(1) == x.size(1) && b.size(1) == a.size(2) && result.size(0) == x.size(0) &&
              result.size(1) == b.size(2), "sgmv: shapes do not chain");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t g = 0; g < x.size(0); ++g)
    TORCH_CHECK(sp[g] >= 0 && sp[g] < a.size(0) && sp[g] < b.size(0), "sgmv: slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sgmv_weights", [&] {
    using wt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sgmv_input", [&] {
      dispatch_result<wt, scalar_t>(x, a, b, slots, result);
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_add_", &sgmv_add_, "result += per-token LoRA shrink and expand (CPU, fused)");
}
