// Vector maths shared by the decoder's kernels: V fp32 lanes (16 with AVX-512, 8 with AVX, 4 otherwise) as GCC
// vector extensions, and e^x over them by Cephes' expf (range reduction by ln 2 and a degree-5 polynomial,
// within ~2 ulps of the exact value), the same function for every element so that a row's values never
// depend on how many rows share a call.
#pragma once

#include <cstdint>

namespace vec_math {

#if defined(__AVX512F__)
constexpr int V = 16;
#elif defined(__AVX__)
constexpr int V = 8;
#else
constexpr int V = 4;
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));

// e^x in every lane (Cephes expf). NaN stays NaN; beyond +-88.38 the argument is clamped, so e^x is then
// 4e-39 or 3.4e38 instead of 0 or inf (silu gives x or -0 to fp32 precision either way; a softmax's terms
// are at most 1).
inline vf vexp(vf x) {
  const vf hi = vf{} + 88.3762626647949f, lo = vf{} - 88.3762626647949f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);                 // truncated toward zero, then down to floor(fx)
  n += (vi)(__builtin_convertvector(n, vf) > fx);         // a true comparison lane is -1
  const vf nf = __builtin_convertvector(n, vf);
  x = x - nf * 0.693359375f - nf * -2.12194440e-4f;       // x - n ln 2, in two parts for precision
  const vf z = x * x;
  vf y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  const vi bits = (n + 127) << 23;                        // 2^n
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < V; ++l) s += v[l];
  return s;
}

}  // namespace vec_math
