// Decode attention on the CPU for the engine's step: every decoding sequence has one new query token. For
// each sequence the kernel writes the token's key and value into its KV-cache slot, then attends over the
// slot's first `length` positions in place (no gathered copy of the cache), in fp32: scores = q.k * scale,
// softmax, weighted sum of values; query heads share KV heads as transformers' `repeat_kv` pairs them
// (head h reads KV head h / (H / Hkv)). Each (sequence, KV head) is computed alone and in a fixed order, so
// a sequence's result does not depend on what else is in the batch. Dot products run in 16-lane vectors
// summed as a tree, and the weighted values of 64- or 128-wide heads accumulate in registers: 16 sequences
// of 200 positions, SmolLM2's 30 layers, 23.7 -> 11.3 ms per step (measured beside other work). The softmax's
// exponentials come from fast_exp.h, vectorised (std::exp kept them scalar), summed in order as before: per
// layer, 9 heads of 64, one sequence of 500 positions 53 -> 27-40 us, 16 of 200 167 -> 135-141 us.
#include "fast_exp.h"
#include "ops.h"
#include "spin_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
inline v16 broadcast16(float w) { return v16{w, w, w, w, w, w, w, w, w, w, w, w, w, w, w, w}; }
#else
// Without AVX-512, GCC lowers a 64-byte generic vector through the stack (each operation stored, moved
// through general registers and loaded again): this kernel's AVX2 build ran 9x slower than the AVX-512
// one (one sequence of 400 positions, 9 heads of 64: 235 against 27 us a layer). Two 32-byte halves stay in
// AVX2 registers; lane l of the 16 is lane l of `lo` (l < 8) or l - 8 of `hi`, so every sum is the same.
typedef float v8 __attribute__((vector_size(32)));
struct v16 {
  v8 lo, hi;
};
inline v16 operator+(v16 a, v16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline v16 operator*(v16 a, v16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline v16& operator+=(v16& a, v16 b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
inline v16 broadcast16(float w) {
  const v8 h = {w, w, w, w, w, w, w, w};
  return {h, h};
}
#endif
static_assert(sizeof(v16) == 16 * sizeof(float), "v16: 16 fp32 lanes, in order");

inline v16 load16_fp32(const float* p) {          // 16 fp32 values (unaligned)
  v16 out;
#if defined(__AVX512F__)
  std::memcpy(&out, p, sizeof(out));
#else
  std::memcpy(&out.lo, p, sizeof(out.lo));          // one 32-byte load each (the whole struct at once went
  std::memcpy(&out.hi, p + 8, sizeof(out.hi));      // through 16-byte stack copies)
#endif
  return out;
}

template <typename T>
inline v16 load16(const T* p) {                     // 16 values as fp32 (unaligned)
  if constexpr (std::is_same<T, float>::value) {
    return load16_fp32(p);
  } else {
#if defined(__AVX512F__)
    v16 out;
    for (int l = 0; l < 16; ++l) out[l] = to_float(p[l]);
    return out;
#else
    float f[16];
    for (int l = 0; l < 16; ++l) f[l] = to_float(p[l]);
    return load16_fp32(f);
#endif
  }
}

inline float tree_sum(v16 v) {                      // lanes summed pairwise: depth 4, not a 16-add chain
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 half = reinterpret_cast<__m256>(v.lo + v.hi);                    // lane l + lane l + 8
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));   // l + l + 4
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                            // l + l + 2
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));                     // 0 + 1
#else
  const v8 half = v.lo + v.hi;                      // the first level: lane l + lane l + 8
  float s[8];
  std::memcpy(s, &half, sizeof(s));
  for (int w = 4; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
#endif
}

// q (fp32) . k (T) over dim values: four 16-lane accumulators summed as a tree. The `omp simd` reduction
// this replaces ended every dot product in a chain of 16 scalar adds (~64 cycles each, 5x the arithmetic).
template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  v16 a0{}, a1{}, a2{}, a3{};
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    a0 += load16(q + d) * load16(k + d);
    a1 += load16(q + d + 16) * load16(k + d + 16);
    a2 += load16(q + d + 32) * load16(k + d + 32);
    a3 += load16(q + d + 48) * load16(k + d + 48);
  }
  for (; d + 16 <= dim; d += 16) a0 += load16(q + d) * load16(k + d);
  float s = tree_sum((a0 + a1) + (a2 + a3));
  for (; d < dim; ++d) s += q[d] * to_float(k[d]);
  return s;
}

// acc[0..16 DV) = sum over t of p[t] * v_t (rows of dim = 16 DV values), accumulated in registers in
// increasing t, each product then sum rounded as the plain loop rounds them.
template <typename T, int DV>
inline void weighted_values(const float* p, const T* vc, int64_t length, float* acc) {
  v16 a[DV];
  for (int i = 0; i < DV; ++i) a[i] = v16{};
  for (int64_t t = 0; t < length; ++t) {
    const T* vt = vc + t * DV * 16;
    const float w = p[t];
    const v16 pt = broadcast16(w);                                         // one broadcast
    for (int i = 0; i < DV; ++i) a[i] += pt * load16(vt + 16 * i);
  }
  std::memcpy(acc, a, sizeof(a));
}

template <typename T>
void decode_rows(T* out, const T* q, const T* k_new, const T* v_new, T* k_cache, T* v_cache,
                 const int64_t* tokens, const int64_t* slots, const int64_t* positions, int64_t seqs,
                 int64_t heads, int64_t kv_heads, int64_t dim, int64_t max_len, int64_t q_stride,
                 int64_t k_stride, int64_t v_stride, float scale) {
  const int64_t group = heads / kv_heads;
  // Small steps (one sequence of a few hundred positions: ~10 us) run on the calling thread: waking this
  // extension's worker would leave it spinning beside the next matmul's workers, three threads on two cores.
  int64_t work = 0;
  for (int64_t b = 0; b < seqs; ++b) work += (positions[b] + 1) * heads * dim;
  spin_parallel(seqs * kv_heads, [&](int64_t task_begin, int64_t task_end) {
  std::vector<float> qf(group * dim), scores, acc(group * dim);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / kv_heads, kvh = task % kv_heads;
    const int64_t token = tokens[b], length = positions[b] + 1;
    const int64_t row = (slots[b] * kv_heads + kvh) * max_len;          // first cache row of this slot and head
    T* kc = k_cache + row * dim;
    T* vc = v_cache + row * dim;
    std::copy(k_new + token * k_stride + kvh * dim, k_new + token * k_stride + (kvh + 1) * dim,
              kc + positions[b] * dim);
    std::copy(v_new + token * v_stride + kvh * dim, v_new + token * v_stride + (kvh + 1) * dim,
              vc + positions[b] * dim);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = to_float(q[token * q_stride + (kvh * group + g) * dim + d]);
    scores.resize(group * length);
    for (int64_t t = 0; t < length; ++t) {
      const T* kt = kc + t * dim;
      for (int64_t g = 0; g < group; ++g) scores[g * length + t] = dot(qf.data() + g * dim, kt, dim) * scale;
    }
    for (int64_t g = 0; g < group; ++g) {                               // softmax over the visible positions
      float* sg = scores.data() + g * length;
      const float top = *std::max_element(sg, sg + length);
#pragma omp simd
      for (int64_t t = 0; t < length; ++t) sg[t] = exp_fast(sg[t] - top);       // vectorised (fast_exp.h)
      float sum = 0.f;
      for (int64_t t = 0; t < length; ++t) sum += sg[t];                         // in order, as before
      const float inv = 1.f / sum;
      for (int64_t t = 0; t < length; ++t) sg[t] *= inv;
    }
    if (dim == 64 || dim == 128) {
      for (int64_t g = 0; g < group; ++g) {
        if (dim == 64)
          weighted_values<T, 4>(scores.data() + g * length, vc, length, acc.data() + g * dim);
        else
          weighted_values<T, 8>(scores.data() + g * length, vc, length, acc.data() + g * dim);
      }
    } else {                                                            // other head sizes: the plain loop
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < length; ++t) {
        const T* vt = vc + t * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * length + t];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * to_float(vt[d]);
        }
      }
    }
    T* o = out + token * heads * dim + kvh * group * dim;
    for (int64_t i = 0; i < group * dim; ++i) o[i] = static_cast<T>(acc[i]);
  }
  }, work < (1 << 16) ? seqs * kv_heads + 1 : 2);
}

}  // namespace

// out [N, H, D] (contiguous; rows `tokens` are written), q [N, H, D], k_new / v_new [N, Hkv, D] (rows may be
// strided, heads and features contiguous), k_cache / v_cache [slots, Hkv, T, D] contiguous; tokens, slots,
// positions [Bd] int64: decoding sequence b's query row, cache slot and the position of its new token.
void decode_attention_(at::Tensor out, at::Tensor q, at::Tensor k_new, at::Tensor v_new,
                       at::Tensor k_cache, at::Tensor v_cache, at::Tensor tokens, at::Tensor slots,
                       at::Tensor positions, double scale) {
  for (const auto* t : {&out, &q, &k_new, &v_new, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type(),
                "decode_attention: CPU tensors of one dtype");
  TORCH_CHECK(out.dim() == 3 && q.dim() == 3 && k_new.dim() == 3 && v_new.dim() == 3 && k_cache.dim() == 4 &&
              v_cache.dim() == 4, "decode_attention: bad ranks");
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && out.sizes() == q.sizes(),
              "decode_attention: out and caches must be contiguous, out shaped like q");
  const int64_t n = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  const int64_t max_len = k_cache.size(2), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == dim && heads % kv_heads == 0,
              "decode_attention: cache shapes do not fit q");
  for (const auto* t : {&q, &k_new, &v_new})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == dim && t->size(2) == dim,
                "decode_attention: heads must be contiguous");
  TORCH_CHECK(k_new.size(0) == n && v_new.size(0) == n && k_new.size(1) == kv_heads && v_new.size(1) == kv_heads,
              "decode_attention: new keys/values do not fit q");
  const int64_t seqs = tokens.numel();
  for (const auto* t : {&tokens, &slots, &positions})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == seqs,
                "decode_attention: tokens, slots and positions must be int64 [Bd]");
  const int64_t *tp = tokens.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>(), *pp = positions.data_ptr<int64_t>();
  std::vector<bool> slot_used(num_slots, false);
  for (int64_t b = 0; b < seqs; ++b) {
    TORCH_CHECK(tp[b] >= 0 && tp[b] < n && sp[b] >= 0 && sp[b] < num_slots && pp[b] >= 0 && pp[b] < max_len,
                "decode_attention: token, slot or position out of range");
    TORCH_CHECK(!slot_used[sp[b]], "decode_attention: two sequences share a cache slot");
    slot_used[sp[b]] = true;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_rows<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k_new.data_ptr<scalar_t>(),
                          v_new.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), tp,
                          sp, pp, seqs, heads, kv_heads, dim, max_len, q.stride(0), k_new.stride(0), v_new.stride(0),
                          static_cast<float>(scale));
  });
}
