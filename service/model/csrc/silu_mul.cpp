// SwiGLU's silu(gate) * up in one pass, with the roundings of the decoder's torch code: s = T(silu(gate))
// computed in fp32, out = T(s * up). e^-x comes from a polynomial written so the compiler vectorises the
// loop (std::exp kept it scalar: ~9 us for a SmolLM2 row of 1,536, a quarter of the work between a
// one-sequence step's matmuls); within a few fp32 ulps of the exact silu over the whole range (tested), so
// like torch's own vectorised exp it may differ from std::exp in the last bits.
#include "ops.h"
#include "spin_pool.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// e^t for t in fp32, +inf past 88 (e^88.72 is fp32's largest), 0 below -87.3 (fp32's smallest normal): Cody and
// Waite's reduction t = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6 polynomial for e^r (relative error
// ~1e-7), scaled by 2^n through the exponent bits. NaN gives NaN. Straight-line code: it vectorises.
inline float exp_fast(float t) {
  float c = t < -87.3f ? -87.3f : t;                                 // (ternaries: std::fmin / fmax kept the
  c = c > 88.f ? 88.f : c;                                            // loop scalar; NaN passes both)
  const float shifted = c * 1.44269504088896341f + 12582912.f;    // n = round(c / ln2), 1.5 * 2^23 rounds it
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, 4);
  const int32_t n = n_bits - 0x4B400000;
  const float fn = shifted - 12582912.f;
  const float r = (c - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;                                // e^r
  const int32_t scale_bits = (n + 127) << 23;                         // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  const float out = e * scale;
  return t > 88.f ? INFINITY : out;                                    // NaN: out is NaN
}

template <typename T>
void silu_mul_rows(const T* gate, const T* up, int64_t g_stride, int64_t u_stride, T* out, int64_t rows,
                   int64_t n) {
  spin_parallel(rows, [&](int64_t begin, int64_t end) {      // inline below 64 Ki values (see rms_norm.cpp)
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
  }, rows * n > (1 << 16) ? 2 : rows + 1);
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
