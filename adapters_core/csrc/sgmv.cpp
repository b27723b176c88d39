// Fused per-token LoRA for CPU token batches, decode steps and prefill chunks alike (the shrink and
// expand of Punica's SGMV in one pass): result[g] += ((x[g] @ A[s]^T) * scale[s]) @ Bt[s] for s = slot[g],
// reading each token's adapter straight from the adapter's own tensors, wherever they are: a layer's
// *table* holds, per slot, the addresses of A [r, in] and Bt [r, out] (row-major, in their own dtype), of
// the fp32 scale per rank row [r] (LoRA's alpha/r, AdaLoRA's E * alpha / ranknum), and r. Adapters of any
// rank and dtype sit side by side without padding or copies (S-LoRA's point: a rank-8 adapter does not pay
// for a rank-64 one). Accumulation is in fp32 whatever the dtypes, and the delta is added into the base
// output in place (one rounding to its dtype, as `add_` of an fp32 delta does). An optional fp32 scale per
// token also multiplies the shrink's output h (a request's adapter_scale). The module also binds the load-time
// helpers of unpack.h (an adapter file's tensors put into place) and packed_header.h (a packed file's views).
#include <torch/extension.h>

#include "lora_table.h"
#include "spin_pool.h"
#include "packed_header.h"
#include "unpack.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace lora_table;         // the table rows' columns and dtype codes

// Portable version: any dtypes; the compiler vectorises the inner loops. h: [r] scratch, acc: [out].
template <typename wt, typename rt>
void lora_row_portable(const float* xf, const wt* a, const wt* bt, const float* rank_scale, const float* tok_scale,
                       rt* rg, int64_t in, int64_t rank, int64_t out_features, float* h, float* acc) {
  for (int64_t r = 0; r < rank; ++r) {                           // shrink: h = A x
    const wt* row = a + r * in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += xf[i] * to_float(row[i]);
    h[r] = s * rank_scale[r];
    if (tok_scale != nullptr) h[r] *= *tok_scale;
  }
  std::fill(acc, acc + out_features, 0.f);
  for (int64_t r = 0; r < rank; ++r) {                           // expand: acc = h Bt
    const float hr = h[r];
    const wt* row = bt + r * out_features;
#pragma omp simd
    for (int64_t o = 0; o < out_features; ++o) acc[o] += hr * to_float(row[o]);
  }
  for (int64_t o = 0; o < out_features; ++o) rg[o] = static_cast<rt>(to_float(rg[o]) + acc[o]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SGMV_AVX512 1
// AVX-512 version (built with -march=native on a CPU that has it): 16 fp32 lanes, four rank rows per pass
// of the shrink (four independent accumulators: the dependency chain of one would bound it), output columns
// in register blocks of 64 across the rank in the expand, and software prefetch of the next work item's
// rows into L2 while this one computes: each token reads its own adapter's rows, cache-cold in a decode step,
// and the hardware prefetcher stops at every 4 KiB page (measured on SmolLM2's shapes with padded stacks,
// 16 distinct adapters: 7.4 -> 6.5 ms per step).
inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}
// Loads and stores of 16 values, through a mask (kFull false: a row's last, partial chunk) or plain (kFull
// true). The same bytes either way, but on the Zen 5 the factors' reads from memory ran faster with plain loads
// of the full chunks: a 16-token step's calls (156 MB of bf16 r=16 factors) 7.2-7.9 -> 6.3-6.8 ms, alike from
// the L3 (BENCHMARKS.md, twenty-fifth session).
template <bool kFull>
inline __m512 load16(const float* p, __mmask16 m) { return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p); }
template <bool kFull>
inline __m256i load16_bits(const void* p, __mmask16 m) {         // 16 two-byte values
  return kFull ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}
template <bool kFull>
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {       // bf16 -> fp32 is exact: a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16_bits<kFull>(p, m)), 16));
}
template <bool kFull>
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(load16_bits<kFull>(p, m)); }
template <bool kFull>
inline void store16_bits(void* p, __m256i v, __mmask16 m) {
  if (kFull) _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  else _mm256_mask_storeu_epi16(p, m, v);
}
template <bool kFull>
inline void store16(float* p, __m512 v, __mmask16 m) {
  if (kFull) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}
template <bool kFull>
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {  // round to nearest even, NaN -> 0x7FC0: c10's rule
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  store16_bits<kFull>(p, _mm512_cvtepi32_epi16(r), m);
}
template <bool kFull>
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  store16_bits<kFull>(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m);
}

// Spreads the prefetch of the next work item's A and Bt rows over this item's loop steps, 128 bytes a step.
struct Prefetcher {
  const char* a;
  int64_t a_bytes;
  const char* b;
  int64_t b_bytes, done = 0;
  inline void step() {
    if (done < a_bytes) {
      _mm_prefetch(a + done, _MM_HINT_T1);
      _mm_prefetch(a + done + 64, _MM_HINT_T1);
    } else if (done < a_bytes + b_bytes) {
      _mm_prefetch(b + (done - a_bytes), _MM_HINT_T1);
      _mm_prefetch(b + (done - a_bytes) + 64, _MM_HINT_T1);
    } else {
      return;
    }
    done += 128;
  }
};

// One pass of the shrink over 16 input values (4 rank rows at a time) and one 64-column block of the expand;
// kFull: all their values lie inside the row (plain loads), else the masks cut them at its end.
template <bool kFull, typename wt>
inline void shrink_chunk(const float* xf, const wt* a0, const wt* a1, const wt* a2, const wt* a3, int64_t i,
                         int64_t in, __m512& s0, __m512& s1, __m512& s2, __m512& s3) {
  const __mmask16 m = kFull ? 0 : lanes(in - i);
  const __m512 xv = load16<kFull>(xf + i, m);
  s0 = _mm512_fmadd_ps(xv, load16<kFull>(a0 + i, m), s0);
  s1 = _mm512_fmadd_ps(xv, load16<kFull>(a1 + i, m), s1);
  s2 = _mm512_fmadd_ps(xv, load16<kFull>(a2 + i, m), s2);
  s3 = _mm512_fmadd_ps(xv, load16<kFull>(a3 + i, m), s3);
}

template <bool kFull, typename wt, typename rt>
inline void expand_block(const wt* bt, const float* h, rt* rg, int64_t o, int64_t rank, int64_t out_features,
                         Prefetcher& pf) {
  const __mmask16 m0 = kFull ? 0 : lanes(out_features - o), m1 = kFull ? 0 : lanes(out_features - o - 16),
                  m2 = kFull ? 0 : lanes(out_features - o - 32), m3 = kFull ? 0 : lanes(out_features - o - 48);
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t k = 0; k < rank; ++k) {
    const wt* row = bt + k * out_features + o;
    _mm_prefetch(reinterpret_cast<const char*>(row + out_features), _MM_HINT_T0);
    pf.step();
    const __m512 hr = _mm512_set1_ps(h[k]);
    c0 = _mm512_fmadd_ps(hr, load16<kFull>(row, m0), c0);
    c1 = _mm512_fmadd_ps(hr, load16<kFull>(row + 16, m1), c1);
    c2 = _mm512_fmadd_ps(hr, load16<kFull>(row + 32, m2), c2);
    c3 = _mm512_fmadd_ps(hr, load16<kFull>(row + 48, m3), c3);
  }
  store16<kFull>(rg + o, _mm512_add_ps(load16<kFull>(rg + o, m0), c0), m0);
  store16<kFull>(rg + o + 16, _mm512_add_ps(load16<kFull>(rg + o + 16, m1), c1), m1);
  store16<kFull>(rg + o + 32, _mm512_add_ps(load16<kFull>(rg + o + 32, m2), c2), m2);
  store16<kFull>(rg + o + 48, _mm512_add_ps(load16<kFull>(rg + o + 48, m3), c3), m3);
}

template <typename wt, typename rt>
inline void lora_row_avx512(const float* xf, const wt* a, const wt* bt, const float* rank_scale,
                            const float* tok_scale, rt* rg, int64_t in, int64_t rank, int64_t out_features,
                            float* h, Prefetcher& pf) {
  const int64_t in_full = in & ~int64_t{15}, out_full = out_features & ~int64_t{63};
  for (int64_t r = 0; r < rank; r += 4) {                        // shrink: h[r..r+3] = A[r..r+3] x
    const int64_t rows = std::min<int64_t>(4, rank - r);
    const wt* a0 = a + r * in;
    const wt* a1 = rows > 1 ? a0 + in : a0;                      // short last pass: repeat a row, drop its sum
    const wt* a2 = rows > 2 ? a0 + 2 * in : a0;
    const wt* a3 = rows > 3 ? a0 + 3 * in : a0;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < in_full; i += 16) {
      shrink_chunk<true>(xf, a0, a1, a2, a3, i, in, s0, s1, s2, s3);
      pf.step();
    }
    if (in_full < in) {
      shrink_chunk<false>(xf, a0, a1, a2, a3, in_full, in, s0, s1, s2, s3);
      pf.step();
    }
    const float sums[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1), _mm512_reduce_add_ps(s2),
                           _mm512_reduce_add_ps(s3)};
    for (int64_t k = 0; k < rows; ++k) {
      h[r + k] = sums[k] * rank_scale[r + k];
      if (tok_scale != nullptr) h[r + k] *= *tok_scale;
    }
  }
  for (int64_t o = 0; o < out_full; o += 64)                    // expand: result += h Bt, 64 columns at a time
    expand_block<true>(bt, h, rg, o, rank, out_features, pf);
  if (out_full < out_features) expand_block<false>(bt, h, rg, out_full, rank, out_features, pf);
}
#endif

// One layer of a group: its table and output. Members share the input and the slots.
struct Member {
  const int64_t* table;      // [n, kColumns]
  void* result;
  int64_t r_stride, out_features;
};

template <typename wt, typename rt>
inline void lora_row(const float* xf, const int64_t* row, const float* tok_scale, rt* rg, int64_t in,
                     int64_t out_features, float* h, float* acc, const int64_t* next_row) {
  const wt* a = reinterpret_cast<const wt*>(row[kA]);
  const wt* bt = reinterpret_cast<const wt*>(row[kB]);
  const float* rank_scale = reinterpret_cast<const float*>(row[kScale]);
#ifdef SGMV_AVX512
  if constexpr (!std::is_same<wt, double>::value && !std::is_same<rt, double>::value) {
    const int64_t elem = element_bytes(next_row[kDtype]);
    Prefetcher pf{reinterpret_cast<const char*>(next_row[kA]), next_row[kRank] * next_row[kIn] * elem,
                  reinterpret_cast<const char*>(next_row[kB]), next_row[kRank] * next_row[kOut] * elem};
    lora_row_avx512<wt, rt>(xf, a, bt, rank_scale, tok_scale, rg, in, row[kRank], out_features, h, pf);
    return;
  }
#endif
  (void)next_row;
  lora_row_portable<wt, rt>(xf, a, bt, rank_scale, tok_scale, rg, in, row[kRank], out_features, h, acc);
}

template <typename xt, typename rt>
void lora_group(const xt* x, int64_t x_stride, int64_t in, const int64_t* slots, const float* scales,
                int64_t tokens, const std::vector<Member>& members, int64_t max_rank, int64_t max_out,
                const Runner& runner) {
  static const int64_t kEmpty[kColumns] = {0, 0, 0, 0, 0, 0, 0};
  const int64_t n_members = static_cast<int64_t>(members.size());
  runner(tokens, [&](int64_t g_begin, int64_t g_end) {
    std::vector<float> xf(in), h(max_rank + 4), acc(max_out);  // per thread, reused for its tokens
    for (int64_t g = g_begin; g < g_end; ++g) {
      const xt* xg = x + g * x_stride;
      for (int64_t i = 0; i < in; ++i) xf[i] = to_float(xg[i]);  // converted once for all members
      for (int64_t k = 0; k < n_members; ++k) {
        const Member& m = members[k];
        const int64_t* row = m.table + slots[g] * kColumns;
        const int64_t rank = row[kRank];
        // the next work item, whose rows are fetched while this one computes: next member, or next token
        const int64_t gn = k + 1 < n_members ? g : std::min(g + 1, tokens - 1);
        const int64_t* next_row = members[k + 1 < n_members ? k + 1 : 0].table + slots[gn] * kColumns;
        if (next_row[kRank] == 0) next_row = kEmpty;
        if (rank == 0) continue;                                 // no adapter of this layer in that slot
        rt* rg = static_cast<rt*>(m.result) + g * m.r_stride;
        const float* ts = scales != nullptr ? scales + g : nullptr;
        switch (row[kDtype]) {
          case kFloat: lora_row<float, rt>(xf.data(), row, ts, rg, in, m.out_features, h.data(), acc.data(), next_row); break;
          case kBFloat16: lora_row<c10::BFloat16, rt>(xf.data(), row, ts, rg, in, m.out_features, h.data(), acc.data(), next_row); break;
          default: lora_row<c10::Half, rt>(xf.data(), row, ts, rg, in, m.out_features, h.data(), acc.data(), next_row); break;
        }
      }
    }
  });
}

}  // namespace

// results[k] [T, out_k] (rows may be strided, last dim contiguous) += each token's LoRA delta of member k,
// read through tables[k] [n, 7] int64 (see Column) at row slots[t], for every member k (layers reading the
// same input: q/k/v, gate/up): one call and one pass over the tokens. x and the results any of fp32 / bf16 /
// fp16, the results sharing one dtype. scales: None, or [T] fp32 contiguous multiplying each token's h. The
// tables' addresses are trusted (adapters_core's stacks keep the tensors alive); their sizes are checked.
void lora_add_group_split_(std::vector<torch::Tensor> results, torch::Tensor x, std::vector<torch::Tensor> tables,
                           torch::Tensor slots, c10::optional<torch::Tensor> scales, const Runner& runner) {
  TORCH_CHECK(!results.empty() && results.size() == tables.size(), "sgmv: one table per result");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "sgmv: x and result must be 2-D with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.numel() == x.size(0),
              "sgmv: one int64 slot per row");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float* scale_p = nullptr;
  if (scales.has_value() && scales->defined()) {
    TORCH_CHECK(scales->device().is_cpu() && scales->scalar_type() == torch::kFloat32 && scales->is_contiguous() &&
                scales->numel() == x.size(0), "sgmv: scales must be one contiguous fp32 value per row");
    scale_p = scales->data_ptr<float>();
  }
  std::vector<Member> members;
  int64_t max_rank = 0, max_out = 0;
  for (size_t k = 0; k < results.size(); ++k) {
    const auto &result = results[k], &table = tables[k];
    TORCH_CHECK(result.device().is_cpu() && table.device().is_cpu(), "sgmv: CPU tensors only");
    TORCH_CHECK(result.dim() == 2 && result.stride(1) == 1, "sgmv: x and result must be 2-D with contiguous rows");
    TORCH_CHECK(result.scalar_type() == results[0].scalar_type(), "sgmv: the results must share a dtype");
    TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.dim() == 2 && table.size(1) == kColumns &&
                table.is_contiguous(), "sgmv: a table is a contiguous int64 [n, 7] tensor");
    TORCH_CHECK(result.size(0) == x.size(0), "sgmv: shapes do not chain");
    const int64_t* tp = table.data_ptr<int64_t>();
    for (int64_t g = 0; g < x.size(0); ++g) {
      TORCH_CHECK(sp[g] >= 0 && sp[g] < table.size(0), "sgmv: slot out of range");
      const int64_t* row = tp + sp[g] * kColumns;
      if (row[kRank] == 0) continue;
      TORCH_CHECK(row[kRank] > 0 && row[kA] != 0 && row[kB] != 0 && row[kScale] != 0 && row[kDtype] >= kFloat &&
                  row[kDtype] <= kHalf, "sgmv: a table row is malformed");
      TORCH_CHECK(row[kIn] == x.size(1) && row[kOut] == result.size(1), "sgmv: shapes do not chain");
      max_rank = std::max(max_rank, row[kRank]);
    }
    max_out = std::max(max_out, result.size(1));
    members.push_back(Member{tp, result.data_ptr(), result.stride(0), result.size(1)});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sgmv_input", [&] {
    using xt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, results[0].scalar_type(), "sgmv_result", [&] {
      lora_group<xt, scalar_t>(x.data_ptr<xt>(), x.stride(0), x.size(1), sp, scale_p, x.size(0), members, max_rank,
                               max_out, runner);
    });
  });
}

void lora_add_group_(std::vector<torch::Tensor> results, torch::Tensor x, std::vector<torch::Tensor> tables,
                     torch::Tensor slots, c10::optional<torch::Tensor> scales) {
  lora_add_group_split_(std::move(results), std::move(x), std::move(tables), std::move(slots), std::move(scales),
                        [](int64_t items, const std::function<void(int64_t, int64_t)>& body) {
                          spin_parallel(items, body);
                        });
}

// lora_add_group_'s address, for the decoder's C++ layer loop (service/model/csrc/decode_layers.cpp), which
// adds a decode step's LoRA deltas without returning to Python (both extensions are built by the same
// compiler against the same libtorch, so the signature is the same on both sides).
int64_t lora_add_group_entry() { return static_cast<int64_t>(reinterpret_cast<intptr_t>(&lora_add_group_)); }

// lora_add_group_split_'s address, for the same loop: the checks and set-up of lora_add_group_, then the
// tokens handed to the caller's runner (lora_table::Runner) instead of the pool, with the same arithmetic.
int64_t lora_add_group_split_entry() {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(&lora_add_group_split_));
}

// Each kernel releases the GIL while it runs, so the event loop thread (HTTP, streaming) runs beside a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("transpose_copy_", &transpose_copy_, "dst = src.T for contiguous 2-D tensors, any float dtypes, in tiles",
        py::call_guard<py::gil_scoped_release>());
  m.def("unpack_", &unpack_,
        "dsts[i] = src's bytes at offsets[i] as dtype codes[i], copied, converted or transposed; per dst, whether "
        "it is all finite",
        py::call_guard<py::gil_scoped_release>());
  // keeps the GIL (its point: see packed_header.h); it makes views, it does not copy
  m.def("packed_views", &packed_header::packed_views,
        "(tensors, metadata) of a packed adapter file mapped as uint8 data: header parsed and checked, views made");
  m.def("lora_add_group_entry", &lora_add_group_entry, "lora_add_group_'s address (for decode_layers.cpp)");
  m.def("lora_add_group_split_entry", &lora_add_group_split_entry,
        "lora_add_group_split_'s address (for decode_layers.cpp)");
  m.def("lora_add_group_", &lora_add_group_, "results[k] += per-token LoRA shrink and expand read through tables",
        py::arg("results"), py::arg("x"), py::arg("tables"), py::arg("slots"), py::arg("scales") = py::none(),
        py::call_guard<py::gil_scoped_release>());
}
