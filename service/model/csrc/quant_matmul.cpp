// Skinny matmuls on weights kept in their stored format: out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias),
// with x and out in fp32 and W in one of the formats below. Decode multiplies 1-64 rows by every weight, so
// the step is bound by the bytes of weights it reads, not by arithmetic: serving the stored blocks (4.5-8.5
// bits a weight) instead of fp32 copies (32 bits) cuts those bytes 4-7x. Dequantisation is exact (gguf's
// `dequantize` values: every scale product is exact in fp32, so one rounding whether fused or not), so the
// result differs from `x @ dequantize(W).T` only in summation order.
//
// Scheme (per thread, over groups of NR weight rows): dequantise NR rows x KT columns into an fp32 tile in L1,
// then an MR x NR register micro-kernel multiplies every MR rows of x by the tile, accumulating whole vectors
// across the K tiles; one horizontal sum per output at the end. Each weight byte is read once per call (per
// 64-row chunk of x), each dequantised value is used M times from L1. The vector width and register blocking
// come from the compiler's target (-march=native at install, or a chosen variant): 16 lanes with AVX-512,
// 8 with AVX2/AVX, 4 otherwise (SSE2 or any other CPU), written once with GCC vector extensions.
#include <torch/extension.h>

#include "spin_pool.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#if defined(__F16C__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>                                // _mm_prefetch (quant_x16.h)
#endif

namespace {

#if defined(__AVX512F__)
constexpr int V = 16, MR = 4, NR = 4;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int V = 8, MR = 3, NR = 4;
constexpr const char* kIsa = "avx2";
#elif defined(__AVX__)
constexpr int V = 8, MR = 3, NR = 4;
constexpr const char* kIsa = "avx";
#else
constexpr int V = 4, MR = 2, NR = 4;
constexpr const char* kIsa = "generic";
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef float vfu __attribute__((vector_size(V * 4), aligned(4)));   // unaligned loads and stores

constexpr int KT = 256;        // columns per dequantised tile: a multiple of every block size
constexpr int MCHUNK = 64;     // rows of x per pass over the weights (accumulators stay in L1)

// The formats; the values are the `FORMATS` table of service/model/quant_formats.py.
enum Format : int64_t { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, Q8_0 = 4, Q4_0 = 5, Q4_1 = 6, Q4_K = 7, Q6_K = 8 };
// Formats held with 16 rows interleaved (quant_x16.h) have kernel ids of their own: the three block formats
// the format's + kX16Offset (9, 10, 11), F32 12 and BF16 13 (`X16_KERNEL_IDS` in quant_formats.py)
constexpr int64_t kX16Offset = 5, kF32X16 = 12, kBF16X16 = 13, kLastFormat = kBF16X16;
inline int64_t x16_base(int64_t id) { return id == kF32X16 ? F32 : id == kBF16X16 ? BF16 : id - kX16Offset; }

// Values per block and bytes per block (1-value blocks for the plain formats).
inline int64_t block_values(int64_t f) { return f >= Q8_0 ? (f >= Q4_K ? 256 : 32) : 1; }
constexpr int64_t block_bytes(int64_t f) {
  switch (f) {
    case F32: return 4;
    case BF16: case F16: return 2;
    case I8: return 1;
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q4_K: return 144;
    case Q6_K: return 210;
  }
  return 0;
}

inline float half_to_float(uint16_t h) {          // IEEE binary16 -> binary32, exact (subnormals included)
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {                                          // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}
inline float load_half(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return half_to_float(h); }

// One block of a GGUF format into out (32 or 256 fp32 values), with gguf.quants' (numpy's) arithmetic.
// Every product below is exact in fp32 (an fp16 scale times a <= 8-bit integer, or times a 6-bit scale and
// then a 6-bit value: at most 24 significant bits), so whether the compiler fuses the following add or not,
// each value is the one rounding of numpy's `d * q + m`: the dequantisation is exact.
template <int64_t F>
inline void dequant_block(const uint8_t* blk, float* __restrict out) {
  if constexpr (F == Q8_0) {
    const float d = load_half(blk);
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(q[i]) * d;
  } else if constexpr (F == Q4_0) {
    const float d = load_half(blk);
    const uint8_t* q = blk + 2;
    for (int i = 0; i < 16; ++i) out[i] = d * static_cast<float>((q[i] & 15) - 8);
    for (int i = 0; i < 16; ++i) out[i + 16] = d * static_cast<float>((q[i] >> 4) - 8);
  } else if constexpr (F == Q4_1) {
    const float d = load_half(blk), m = load_half(blk + 2);
    const uint8_t* q = blk + 4;
    for (int i = 0; i < 16; ++i) out[i] = d * static_cast<float>(q[i] & 15) + m;
    for (int i = 0; i < 16; ++i) out[i + 16] = d * static_cast<float>(q[i] >> 4) + m;
  } else if constexpr (F == Q4_K) {
    const float d = load_half(blk), dmin = load_half(blk + 2);
    const uint8_t* s = blk + 4;                     // 12 bytes: 8 six-bit scales and 8 six-bit mins
    const uint8_t* q = blk + 16;                    // 128 bytes: 4 chunks of 32, low then high nibbles
    for (int j = 0; j < 8; ++j) {
      const int sc = j < 4 ? (s[j] & 63) : ((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
      const int mn = j < 4 ? (s[j + 4] & 63) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
      const float ds = d * static_cast<float>(sc), dm = dmin * static_cast<float>(mn);
      const uint8_t* qc = q + (j / 2) * 32;
      const int shift = (j & 1) * 4;
      for (int i = 0; i < 32; ++i) out[j * 32 + i] = ds * static_cast<float>((qc[i] >> shift) & 15) - dm;
    }
  } else {                                          // Q6_K: ql[128], qh[64], int8 scales[16], fp16 d
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = load_half(blk + 208);
    for (int h = 0; h < 2; ++h) {                   // two halves of 128 values
      const uint8_t* ql = blk + h * 64;
      const uint8_t* qh = blk + 128 + h * 32;
      for (int part = 0; part < 4; ++part) {        // 32 values each: low nibble shift, high-bits shift
        const int lshift = (part >> 1) * 4, hshift = part * 2, lo = (part & 1) * 32;
        float* o = out + h * 128 + part * 32;
        const float s0 = d * static_cast<float>(sc[(h * 128 + part * 32) >> 4]);
        const float s1 = d * static_cast<float>(sc[((h * 128 + part * 32) >> 4) + 1]);
        for (int i = 0; i < 16; ++i)
          o[i] = s0 * static_cast<float>((((ql[lo + i] >> lshift) & 15) | (((qh[i] >> hshift) & 3) << 4)) - 32);
        for (int i = 16; i < 32; ++i)
          o[i] = s1 * static_cast<float>((((ql[lo + i] >> lshift) & 15) | (((qh[i] >> hshift) & 3) << 4)) - 32);
      }
    }
  }
}

template <int64_t F>
inline void dequant_blocks(const uint8_t* row, int64_t k0, int64_t n, float* out) {
  constexpr int64_t bv = F >= Q4_K ? 256 : 32;
  const int64_t bb = block_bytes(F);
  for (int64_t b = k0 / bv; b < (k0 + n) / bv; ++b, out += bv) dequant_block<F>(row + b * bb, out);
}

// Values [k0, k0 + n) of one stored row into out (fp32). k0 and n are multiples of the format's block.
void dequant_span(int64_t f, const uint8_t* row, int64_t k0, int64_t n, float* __restrict out) {
  switch (f) {
    case F32: std::memcpy(out, row + k0 * 4, n * 4); return;
    case BF16: {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(row) + k0;
      uint32_t* dst = reinterpret_cast<uint32_t*>(out);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
      return;
    }
    case F16:
      for (int64_t i = 0; i < n; ++i) out[i] = load_half(row + (k0 + i) * 2);
      return;
    case I8: {                                       // the per-row scale is applied to the finished sum
      const int8_t* src = reinterpret_cast<const int8_t*>(row) + k0;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
      return;
    }
    case Q8_0: dequant_blocks<Q8_0>(row, k0, n, out); return;
    case Q4_0: dequant_blocks<Q4_0>(row, k0, n, out); return;
    case Q4_1: dequant_blocks<Q4_1>(row, k0, n, out); return;
    case Q4_K: dequant_blocks<Q4_K>(row, k0, n, out); return;
    case Q6_K: dequant_blocks<Q6_K>(row, k0, n, out); return;
  }
}

inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf vbroadcast(float s) {         // (vf{} + s would cost an add: 0 + s is not s for s = -0)
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#else
  vf v;
  for (int l = 0; l < V; ++l) v[l] = s;
  return v;
#endif
}

// acc[i][j] += sum over k of x[i][k] * w[j][k], as vectors of V partial sums; kt is a multiple of V.
template <int R>
inline void micro_kernel(const float* const* xr, const float* const* wr, int64_t kt, vf* acc) {
  vf a[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) a[i][j] = acc[i * NR + j];
  for (int64_t k = 0; k < kt; k += V) {
    vf w[NR];
    for (int j = 0; j < NR; ++j) w[j] = vload(wr[j] + k);
    for (int i = 0; i < R; ++i) {
      const vf xv = vload(xr[i] + k);
      for (int j = 0; j < NR; ++j) a[i][j] += xv * w[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = a[i][j];
}

inline void micro_dispatch(int rows, const float* const* xr, const float* const* wr, int64_t kt, vf* acc) {
  switch (rows) {
    case 1: micro_kernel<1>(xr, wr, kt, acc); break;
    case 2: micro_kernel<2>(xr, wr, kt, acc); break;
    case 3: micro_kernel<3>(xr, wr, kt, acc); break;   // reached only where MR > 3
    default: micro_kernel<MR>(xr, wr, kt, acc); break;
  }
}

inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0.f;
  for (int l = 0; l < V; ++l) s += v[l];
  return s;
#endif
}

// ---- A few rows of x (M <= MR): each block is dequantised in registers and used at once ----
// The tile path above stores every dequantised value to L1 and loads it back, which at one row of x costs
// more than the arithmetic it feeds. Here the formats whose blocks unpack into whole vectors (Q8_0, Q4_0,
// Q4_1, BF16, I8) go straight from their bytes to vector registers. Each accumulator lane takes the same
// values in the same order as in the tile path (lane l: columns k = l mod V, increasing), so both paths give
// bit-identical results; which one runs depends only on M.
typedef int32_t vi __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));

template <typename T>
inline T load_bytes(const uint8_t* p) { T v; std::memcpy(&v, p, sizeof(T)); return v; }
// V bytes at p widened to V int32 lanes, signed or not (gcc scalarises the generic conversion of a byte
// vector loaded from memory: one instruction here where the CPU has it)
template <bool Signed>
inline vi widen_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vi)(Signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vi)(Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  vi out;
  for (int l = 0; l < V; ++l) out[l] = Signed ? static_cast<int8_t>(p[l]) : p[l];
  return out;
#endif
}
inline vf signed_bytes_to_float(const uint8_t* p) { return __builtin_convertvector(widen_bytes<true>(p), vf); }

constexpr bool register_format(int64_t f) { return f == Q8_0 || f == Q4_0 || f == Q4_1 || f == BF16 || f == I8; }
// Values and bytes one step of the register path consumes: a 32-value block, or V plain values.
constexpr int step_values(int64_t f) { return f == BF16 || f == I8 ? V : 32; }
constexpr int64_t step_bytes(int64_t f) { return f == BF16 ? 2 * V : f == I8 ? V : block_bytes(f); }

// One step of format F at p into step_values(F) / V vectors, the values of dequant_block / dequant_span.
template <int64_t F>
inline void step_vectors(const uint8_t* p, vf* w) {
  if constexpr (F == Q8_0) {
    const float d = load_half(p);
    for (int h = 0; h < 32 / V; ++h)
      w[h] = signed_bytes_to_float(p + 2 + h * V) * d;
  } else if constexpr (F == Q4_0) {
    const float d = load_half(p);
    for (int h = 0; h < 16 / V; ++h) {
      const vi b = widen_bytes<false>(p + 2 + h * V);        // widened, then split
      w[h] = d * __builtin_convertvector((b & 15) - 8, vf);
      w[h + 16 / V] = d * __builtin_convertvector((b >> 4) - 8, vf);
    }
  } else if constexpr (F == Q4_1) {
    const float d = load_half(p), m = load_half(p + 2);
    for (int h = 0; h < 16 / V; ++h) {
      const vi b = widen_bytes<false>(p + 4 + h * V);
      w[h] = d * __builtin_convertvector(b & 15, vf) + m;
      w[h + 16 / V] = d * __builtin_convertvector(b >> 4, vf) + m;
    }
  } else if constexpr (F == BF16) {
    const vu bits = __builtin_convertvector(load_bytes<vh>(p), vu) << 16;
    std::memcpy(&w[0], &bits, sizeof(vf));
  } else {                                            // I8 (the row scale is applied to the finished sum)
    w[0] = signed_bytes_to_float(p);
  }
}

// acc[i * NR + j] = partial sums of x row i times weight row rows[j], as in the tile path.
template <int64_t F, int R>
inline void register_group(const float* x, int64_t ldx, const uint8_t* const* rows, int64_t K, vf* acc) {
  constexpr int SV = step_values(F), NV = SV / V;
  constexpr int64_t SB = step_bytes(F);
  vf a[R][NR];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) a[i][j] = vf{};
  for (int64_t s = 0; s < K / SV; ++s) {
    vf xv[R][NV];
    for (int i = 0; i < R; ++i)
      for (int h = 0; h < NV; ++h) xv[i][h] = vload(x + i * ldx + s * SV + h * V);
    for (int j = 0; j < NR; ++j) {
      vf wv[NV];
      step_vectors<F>(rows[j] + s * SB, wv);
      for (int i = 0; i < R; ++i)
        for (int h = 0; h < NV; ++h) a[i][j] += xv[i][h] * wv[h];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = a[i][j];
}

template <int64_t F>
void register_dispatch(int rows, const float* x, int64_t ldx, const uint8_t* const* wr, int64_t K, vf* acc) {
  switch (rows) {
    case 1: register_group<F, 1>(x, ldx, wr, K, acc); break;
    case 2: register_group<F, 2>(x, ldx, wr, K, acc); break;
    case 3: register_group<F, 3>(x, ldx, wr, K, acc); break;   // reached only where MR > 3
    default: register_group<F, MR>(x, ldx, wr, K, acc); break;
  }
}

void register_rows(int64_t fmt, int rows, const float* x, int64_t ldx, const uint8_t* const* wr, int64_t K,
                   vf* acc) {
  switch (fmt) {
    case Q8_0: register_dispatch<Q8_0>(rows, x, ldx, wr, K, acc); return;
    case Q4_0: register_dispatch<Q4_0>(rows, x, ldx, wr, K, acc); return;
    case Q4_1: register_dispatch<Q4_1>(rows, x, ldx, wr, K, acc); return;
    case BF16: register_dispatch<BF16>(rows, x, ldx, wr, K, acc); return;
    case I8: register_dispatch<I8>(rows, x, ldx, wr, K, acc); return;
  }
}

void qmatmul_impl(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t row_bytes, int64_t fmt,
                  int64_t N, int64_t K, const float* row_scale, const float* bias, float* out, int64_t ldo) {
  const int64_t groups = (N + NR - 1) / NR;
  const bool direct = fmt == F32;                     // fp32 rows are read in place, no tile
  const bool in_registers = M <= MR && register_format(fmt);
  alignas(64) static const float zeros[KT] = {};
  // small products run inline; otherwise contiguous runs of row groups per worker (csrc/spin_pool.h)
  const int64_t min_groups = M * N * K > (1 << 15) ? 2 : groups + 1;
  // outputs [m0, m0 + mc) x [n0, n0 + nr) from their vector partial sums
  auto finish = [&](int64_t m0, int64_t mc, int64_t n0, int64_t nr, const vf* acc) {
    for (int64_t i = 0; i < mc; ++i)
      for (int j = 0; j < nr; ++j) {
        float s = hsum(acc[i * NR + j]);
        if (row_scale) s *= row_scale[n0 + j];
        if (bias) s += bias[n0 + j];
        out[(m0 + i) * ldo + n0 + j] = s;
      }
  };
  spin_parallel(groups, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      alignas(64) float tile[NR][KT];
      alignas(64) vf acc[MCHUNK * NR];
      const int64_t n0 = g * NR, nr = std::min<int64_t>(NR, N - n0);
      if (in_registers) {                             // rows past N repeat the last row; their sums are dropped
        const uint8_t* wr[NR];
        for (int j = 0; j < NR; ++j) wr[j] = w + std::min<int64_t>(n0 + j, N - 1) * row_bytes;
        register_rows(fmt, static_cast<int>(M), x, ldx, wr, K, acc);
        finish(0, M, n0, nr, acc);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int64_t mc = std::min<int64_t>(MCHUNK, M - m0);
        for (int64_t i = 0; i < mc * NR; ++i) acc[i] = vf{};
        for (int64_t k0 = 0; k0 < K; k0 += KT) {
          const int64_t kt = std::min<int64_t>(KT, K - k0);
          const float* wr[NR];
          for (int j = 0; j < NR; ++j) {
            if (j >= nr) {
              wr[j] = zeros;
            } else if (direct) {
              wr[j] = reinterpret_cast<const float*>(w + (n0 + j) * row_bytes) + k0;
            } else {
              dequant_span(fmt, w + (n0 + j) * row_bytes, k0, kt, tile[j]);
              wr[j] = tile[j];
            }
          }
          for (int64_t i = 0; i < mc; i += MR) {
            const int rows = static_cast<int>(std::min<int64_t>(MR, mc - i));
            const float* xr[MR];
            for (int r = 0; r < rows; ++r) xr[r] = x + (m0 + i + r) * ldx + k0;
            micro_dispatch(rows, xr, wr, kt, acc + i * NR);
          }
        }
        finish(m0, mc, n0, nr, acc);
      }
    }
  }, min_groups);
}

#include "quant_x16.h"

int64_t row_bytes_for(int64_t fmt, int64_t K) {
  TORCH_CHECK(fmt >= F32 && fmt <= kLastFormat, "quant_matmul: unknown weight format ", fmt);
  if (fmt > Q6_K) fmt = x16_base(fmt);
  const int64_t bv = block_values(fmt);
  TORCH_CHECK(K % bv == 0, "quant_matmul: ", K, " columns are not whole blocks of ", bv);
  return K / bv * block_bytes(fmt);
}

const uint8_t* weight_bytes(const at::Tensor& w, int64_t fmt, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2, "quant_matmul: a contiguous 2-D CPU weight");
  TORCH_CHECK(w.size(1) * w.element_size() == row_bytes_for(fmt, K), "quant_matmul: weight rows hold ",
              w.size(1) * w.element_size(), " bytes, format ", fmt, " needs ", row_bytes_for(fmt, K), " for ", K,
              " columns");
  return static_cast<const uint8_t*>(w.data_ptr());
}

}  // namespace

// x [M, K] fp32 (rows may be strided), w [N, row_bytes] in format fmt -> out [M, N] fp32; an interleaved
// weight's threads also pull `alongside`'s spans into the cache as they go (quant_x16.h's Alongside).
at::Tensor quant_matmul_with(const at::Tensor& x, const at::Tensor& w, int64_t fmt,
                             const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& bias,
                             const Alongside* alongside, const BesideWork* beside = nullptr) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "quant_matmul: x must be a 2-D fp32 CPU tensor with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const uint8_t* wb = weight_bytes(w, fmt, K);
  TORCH_CHECK(K % 16 == 0, "quant_matmul: the inner dimension must be a multiple of 16, got ", K);
  const float* scale = nullptr;
  if (row_scale && row_scale->defined()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous() && row_scale->numel() == N,
                "quant_matmul: row_scale must be [N] fp32");
    scale = row_scale->data_ptr<float>();
  }
  const float* b = nullptr;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "quant_matmul: bias must be [N] fp32");
    b = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (fmt > Q6_K) {                                   // interleaved rows (quant_x16.h)
    TORCH_CHECK(N % kX16Rows == 0 && scale == nullptr, "quant_matmul: interleaved weights have rows in "
                "groups of 16 and no row scales");
    TORCH_CHECK(K % 32 == 0, "quant_matmul: interleaved weights have whole blocks of 32 columns, got ", K);
    if (M > 0)
      x16_matmul(x16_base(fmt), x.data_ptr<float>(), x.stride(0), M, wb, N, K, b, out.data_ptr<float>(), N, alongside,
                 beside);
    return out;
  }
  if (beside != nullptr) spin_parallel(beside->items, *beside->body);   // the rows' own layouts: work, then matmul
  if (M > 0 && N > 0)
    qmatmul_impl(x.data_ptr<float>(), x.stride(0), M, wb, w.size(1) * w.element_size(), fmt, N, K, scale, b,
                 out.data_ptr<float>(), N);
  if (beside != nullptr) {
    float* o = out.data_ptr<float>();
    spin_parallel(M, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < N; ++j) o[i * N + j] += beside->delta[i * beside->ldd + j];
    }, spin_min_items(M, M * N));
  }
  return out;
}

at::Tensor quant_matmul(at::Tensor x, at::Tensor w, int64_t fmt, c10::optional<at::Tensor> row_scale,
                        c10::optional<at::Tensor> bias) {
  return quant_matmul_with(x, w, fmt, row_scale, bias, nullptr);
}

// quant_matmul, its threads pulling `count` spans of whole cache lines (`spans`: address, bytes; nullptr for
// none) into the cache as they compute: the decoder's layer loop hands it the LoRA factors that the step's
// fused LoRA call reads right after the matmul, so their reads overlap the matmul's arithmetic instead of
// following it. Only the x16 layouts take the spans (their block loops pace them); the result is the same.
at::Tensor quant_matmul_alongside(at::Tensor x, at::Tensor w, int64_t fmt, c10::optional<at::Tensor> row_scale,
                                  c10::optional<at::Tensor> bias, const int64_t* spans, int64_t count) {
  Alongside side{spans, count, 0};
  for (int64_t i = 0; i < count; ++i) side.bytes += spans[2 * i + 1];
  return quant_matmul_with(x, w, fmt, row_scale, bias, spans != nullptr && count > 0 ? &side : nullptr);
}

// Rows `index` of w (format fmt, K columns) dequantised to fp32 [len(index), K]: embedding look-ups, and
// `dequantize` (all rows) for code that needs the dense weight.
at::Tensor dequant_rows(at::Tensor w, int64_t fmt, int64_t K, at::Tensor index) {
  const uint8_t* wb = weight_bytes(w, fmt, K);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "dequant_rows: index must be a 1-D int64 tensor");
  const int64_t n = index.size(0), rows = w.size(0), rb = w.size(1) * w.element_size();
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "dequant_rows: index ", idx[i], " out of range for ", rows, " rows");
  at::Tensor out = at::empty({n, K}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  spin_parallel(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (fmt > Q6_K)
        x16_dequant_row(x16_base(fmt), wb, idx[i], K, o + i * K);
      else
        dequant_span(fmt, wb + idx[i] * rb, 0, K, o + i * K);
    }
  }, spin_min_items(n, n * K));
  return out;
}

std::string isa() { return kIsa; }

// Bytes of its first run each worker reads ahead (quant_read_ahead): half a Zen 4 core's 1 MiB L2, so the
// lines read first are still there when the matmul comes.
constexpr int64_t kReadAheadBytes = 256 << 10;

// Starts the pool's workers reading the beginning of the run each will most likely take first in the next
// matmul of the interleaved weight w (claim t for worker t: the calling thread, part 0, takes claim 0 as it
// publishes the job, the workers wake to the next ones), and returns at once. Called by the decoder's layer
// loop before the work between two matmuls (norms, rotary, attention, SwiGLU, residuals: ~55 us per layer of
// one sequence on SmolLM2, during which the weights' memory sat idle); the matmul's `run` stops what is
// still being read. The lines are only read: the result cannot change. Other formats: nothing.
void quant_read_ahead(const at::Tensor& w, int64_t fmt) {
  if (fmt <= Q6_K || !w.defined() || w.dim() != 2 || w.size(0) % kX16Rows != 0) return;
  const int64_t groups = w.size(0) / kX16Rows, group_bytes = kX16Rows * w.size(1) * w.element_size();
  const int parts = spin_parts(groups);
  if (parts <= 1) return;
  SpinPool& pool = SpinPool::instance();
  pool.post(parts, [w, groups, group_bytes, parts, &pool](int t) {   // (w held: the pool lets go of it at the next job)
    const uint8_t* base = static_cast<const uint8_t*>(w.data_ptr());
    const int64_t first = spin_claim_begin(groups, parts, t);
    const int64_t begin = first * group_bytes;
    const int64_t end = std::min((first + spin_claim_items(groups, parts, first)) * group_bytes,
                                 begin + kReadAheadBytes);
    for (int64_t page = begin; page < end && !pool.cancelled(); page += 4096)   // stops when the matmul starts
      for (int64_t line = page; line < std::min(end, page + 4096); line += 64)
        (void)*reinterpret_cast<const volatile uint8_t*>(base + line);        // one read per cache line
  });
}

// quant_matmul with `beside`'s work on the matmul's threads (spin_parallel_beside) and its delta added to the
// result: out = (x W^T + bias) + delta, the bits of the matmul followed by out += delta.
at::Tensor quant_matmul_beside(at::Tensor x, at::Tensor w, int64_t fmt, c10::optional<at::Tensor> row_scale,
                               c10::optional<at::Tensor> bias, const BesideWork* beside) {
  return quant_matmul_with(x, w, fmt, row_scale, bias, nullptr, beside);
}

// quant_matmul_beside whose work copies delta [M, N] fp32 into the buffer it adds, row by row, each row after
// `wait_us` microseconds (tests: with no wait the matmul adds most rows' deltas as it stores them; with a long
// one it is done first and adds them all after)
at::Tensor quant_matmul_beside_rows(at::Tensor x, at::Tensor w, int64_t fmt, c10::optional<at::Tensor> row_scale,
                                    c10::optional<at::Tensor> bias, at::Tensor delta, int64_t wait_us) {
  TORCH_CHECK(delta.scalar_type() == at::kFloat && delta.is_contiguous() && delta.dim() == 2 &&
              delta.size(0) == x.size(0) && delta.size(1) == w.size(0), "quant_matmul_beside_rows: delta must be a "
              "contiguous fp32 [M, N] tensor");
  at::Tensor buffer = at::full_like(delta, std::nanf(""));
  const int64_t N = delta.size(1);
  const float* from = delta.data_ptr<float>();
  float* to = buffer.data_ptr<float>();
  const std::function<void(int64_t, int64_t)> copy = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (wait_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(wait_us));
      std::memcpy(to + i * N, from + i * N, N * sizeof(float));
    }
  };
  const BesideWork work{x.size(0), &copy, to, N};
  return quant_matmul_beside(x, w, fmt, row_scale, bias, &work);
}

// quant_matmul_alongside with the spans as an int64 [n, 2] tensor of (address, bytes) (tests)
at::Tensor quant_matmul_spans(at::Tensor x, at::Tensor w, int64_t fmt, c10::optional<at::Tensor> row_scale,
                              c10::optional<at::Tensor> bias, at::Tensor spans) {
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.is_contiguous() && spans.dim() == 2 && spans.size(1) == 2,
              "quant_matmul_spans: spans must be a contiguous int64 [n, 2] tensor");
  TORCH_CHECK(spans.numel() == 0 || spans.select(1, 1).min().item<int64_t>() >= 0,
              "quant_matmul_spans: a span's bytes must not be negative");
  return quant_matmul_alongside(x, w, fmt, row_scale, bias, spans.data_ptr<int64_t>(), spans.size(0));
}

// quant_matmul_alongside's address, for the decoder's C++ layer loop (csrc/decode_layers.cpp) in the other
// extension
int64_t quant_matmul_entry() { return static_cast<int64_t>(reinterpret_cast<intptr_t>(&quant_matmul_alongside)); }

// quant_matmul_beside's address, for the same loop
int64_t quant_matmul_beside_entry() {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(&quant_matmul_beside));
}

// quant_read_ahead's address, for the same loop
int64_t quant_read_ahead_entry() { return static_cast<int64_t>(reinterpret_cast<intptr_t>(&quant_read_ahead)); }

// Each kernel releases the GIL while it runs, so the event loop thread (HTTP, streaming) runs beside a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", &quant_matmul, "x @ dequant(W).T on stored weight blocks (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequant_rows", &dequant_rows, "rows of a stored weight dequantised to fp32 (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("interleave", &x16_interleave, "Q8_0 / Q4_0 / Q4_1 / F32 / BF16 rows -> the 16-row interleaved layout (quant_x16.h)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_matmul_spans", &quant_matmul_spans, "quant_matmul whose threads also pull (address, bytes) spans "
        "into the cache (CPU; tests)", py::call_guard<py::gil_scoped_release>());
  m.def("quant_matmul_beside_rows", &quant_matmul_beside_rows, "quant_matmul plus a delta its threads copy beside "
        "it, each row after a wait (CPU; tests)", py::call_guard<py::gil_scoped_release>());
  m.def("quant_matmul_entry", &quant_matmul_entry, "quant_matmul_alongside's address (for csrc/decode_layers.cpp)");
  m.def("quant_matmul_beside_entry", &quant_matmul_beside_entry,
        "quant_matmul_beside's address (for csrc/decode_layers.cpp)");
  m.def("quant_read_ahead_entry", &quant_read_ahead_entry,
        "quant_read_ahead's address (for csrc/decode_layers.cpp)");
  m.def("read_ahead", &quant_read_ahead, "start the pool's workers reading the start of their first runs of an "
        "interleaved weight's next matmul (CPU; tests)", py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "the vector instruction set this build uses");
}
