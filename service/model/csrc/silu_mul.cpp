// SwiGLU's silu(gate) * up in one pass, with the roundings of the decoder's torch code: s = T(silu(gate))
// computed in fp32, out = T(s * up). e^-x comes from fast_exp.h's polynomial, which the compiler vectorises
// (std::exp kept the loop scalar: ~9 us for a SmolLM2 row of 1,536, a quarter of the work between a
// one-sequence step's matmuls); within 1.5 fp32 eps of the exact silu over [-88, 88] (torch's own
// x / (1 + exp(-x)): 1.4), so like torch's vectorised exp it may differ from std::exp in the last bits.
#include "fast_exp.h"
#include "ops.h"
#include "spin_pool.h"

namespace {

template <typename T>
void silu_mul_rows(const T* gate, const T* up, int64_t g_stride, int64_t u_stride, T* out, int64_t rows,
                   int64_t n) {
  spin_parallel(rows, [&](int64_t begin, int64_t end) {      // inline up to 64 Ki values
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * g_stride;
      const T* u = up + r * u_stride;
      T* o = out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float x = static_cast<float>(g[i]);
        const T s = static_cast<T>(x / (1.f + exp_fast(-x)));
        o[i] = static_cast<T>(static_cast<float>(s) * static_cast<float>(u[i]));
      }
    }
  }, spin_min_items(rows, rows * n));
}

}  // namespace

at::Tensor silu_mul(at::Tensor gate, at::Tensor up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu() && gate.scalar_type() == up.scalar_type(),
              "silu_mul: CPU tensors of one dtype");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "silu_mul: 2-D tensors of one shape with contiguous rows");
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), gate.stride(0), up.stride(0),
                            out.data_ptr<scalar_t>(), gate.size(0), gate.size(1));
  });
  return out;
}
