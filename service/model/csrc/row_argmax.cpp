// For the engine's sampling: each row of the logits [R, V] checked for non-finite values and its argmax
// (the first index of the largest value, as torch.argmax), in one pass over the rows on the kernels' worker
// threads. torch's `isfinite(...).all(-1)` and `argmax(-1)` called from the engine's own thread paid
// OpenMP's late wake-ups there: ~6 ms of a 16-sequence SmolLM2 step for 3 MB of logits.
// An fp32 row is read twice, with vector loads: its maximum and finiteness, then the first index holding that
// maximum (on average half a row). The one-pass scalar loop (a compare and branch per value, which the
// compiler cannot vectorise) took ~40 us for SmolLM2's 49,152 logits, a few tenths of a percent of a step.
#include "ops.h"
#include "spin_pool.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>

namespace {

// The row's largest value (any value when the row is not all finite) and whether it is all finite.
inline float max_and_finite(const float* row, int64_t vocab, bool* finite) {
  int64_t v = 0;
  float best = -INFINITY;
  bool ok = true;
#if defined(__AVX512F__)
  const __m512 inf = _mm512_set1_ps(INFINITY);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  __mmask16 bad = 0;
  for (; v + 16 <= vocab; v += 16) {
    const __m512 x = _mm512_loadu_ps(row + v);
    vmax = _mm512_max_ps(vmax, x);
    bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(x), inf, _CMP_NLT_UQ);      // |x| >= inf, or NaN
  }
  best = _mm512_reduce_max_ps(vmax);
  ok = bad == 0;
#elif defined(__AVX2__)
  const __m256 inf = _mm256_set1_ps(INFINITY);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  for (; v + 8 <= vocab; v += 8) {
    const __m256 x = _mm256_loadu_ps(row + v);
    vmax = _mm256_max_ps(vmax, x);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), inf, _CMP_NLT_UQ));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  for (float lane : lanes) best = lane > best ? lane : best;
  ok = _mm256_movemask_ps(bad) == 0;
#endif
  for (; v < vocab; ++v) {
    ok &= std::isfinite(row[v]);
    best = row[v] > best ? row[v] : best;
  }
  *finite = ok;
  return best;
}

// The first index of `best` in the row (0 when none holds it: a row of NaN or -inf only).
inline int64_t first_index_of(const float* row, int64_t vocab, float best) {
  int64_t v = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(best);
  for (; v + 16 <= vocab; v += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + v), target, _CMP_EQ_OQ);
    if (hit) return v + __builtin_ctz(hit);
  }
#elif defined(__AVX2__)
  const __m256 target = _mm256_set1_ps(best);
  for (; v + 8 <= vocab; v += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + v), target, _CMP_EQ_OQ));
    if (hit) return v + __builtin_ctz(hit);
  }
#endif
  for (; v < vocab; ++v)
    if (row[v] == best) return v;
  return 0;
}

}  // namespace

std::vector<at::Tensor> row_argmax(at::Tensor logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "row_argmax: a 2-D CPU tensor with contiguous rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1), ld = logits.stride(0);
  at::Tensor index = at::empty({rows}, at::TensorOptions().dtype(at::kLong));
  at::Tensor finite = at::empty({rows}, at::TensorOptions().dtype(at::kBool));
  int64_t* ip = index.data_ptr<int64_t>();
  bool* fp = finite.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "row_argmax", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    spin_parallel(rows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = base + r * ld;
        if constexpr (std::is_same<scalar_t, float>::value) {
          const float* frow = reinterpret_cast<const float*>(row);       // (compiled for every type)
          bool ok;
          const float best = max_and_finite(frow, vocab, &ok);
          ip[r] = first_index_of(frow, vocab, best);
          fp[r] = ok;
          continue;
        }
        float best = -INFINITY;
        int64_t at = 0;
        bool ok = true;
        for (int64_t v = 0; v < vocab; ++v) {
          const float x = static_cast<float>(row[v]);
          ok &= std::isfinite(x);
          if (x > best) { best = x; at = v; }
        }
        ip[r] = at;
        fp[r] = ok;
      }
    });
  });
  return {index, finite};
}
