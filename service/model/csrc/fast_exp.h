// exp_fast: e^t in fp32 as straight-line code the compiler vectorises (std::exp keeps a loop scalar), for the
// kernels' exponentials: SwiGLU's silu (silu_mul.cpp) and the decode attention's softmax.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// e^t for t in fp32, +inf past 88 (e^88.72 is fp32's largest), 0 below -87.3 (e^-87.3 is about fp32's smallest
// normal; std::exp goes on in subnormals, which every use here adds to 1 or to a sum of at least 1): Cody and
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
  return t > 88.f ? INFINITY : t < -87.3f ? 0.f : out;                // NaN: out is NaN
}
