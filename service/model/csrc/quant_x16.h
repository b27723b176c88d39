// Interleaved formats: Q8_0, Q4_0, Q4_1, F32 and BF16 weights with 16 rows' blocks woven together, so that one
// vector holds the same column of 16 output rows. Included by quant_matmul.cpp after its vector types.
//
// Why: with the rows' own layout (GGUF's), each 32-value block is dequantised on its own, with two scalar
// fp16 loads and broadcasts per block, and every output ends in a horizontal sum; at one row of x the
// kernel spent more time unpacking than reading (Q4_1 at ~12 GB/s on a machine that reads 27 GB/s). Here
// a vector of lane r = row 16g + r takes byte j of each row's block at once, so unpacking is one widening,
// a mask or a shift and a conversion per 16 values, scales come as 16-lane fp16 vectors, x is broadcast,
// and the 16 outputs are the lanes themselves (no horizontal sum). llama.cpp repacks Q4_0 the same way
// for its AVX2/AVX-512 kernels; the bytes per weight do not change.
//
// Layout of row group g (rows 16g..16g+15) and block b: one chunk of 16 x block_bytes bytes at
// (g * blocks + b) * 16 * block_bytes, holding the 16 rows' fp16 d (Q4_1: then their fp16 m), then the
// quants transposed: byte r of the 16 at offset j is byte j of row r's quants (Q4_x: 16 bytes, low nibble
// value j, high nibble value j + 16; Q8_0: 32 int8 values). F32 and BF16 (no scales) take 32 columns as a
// block: a chunk of 16 x 32 values holds value j of row r at element j * 16 + r (the bytes of 32 columns of
// the 16 rows, transposed). Fp32 weights gained most: their rows' own layout went through the general tile
// path (dot products ending in horizontal sums), at 16 rows of x ~50 GFLOP/s on a Zen 4, a third of what the
// interleaved Q4_1 kernel reached on the same machine.
//
// Arithmetic, per output row and block, the same whatever the number of rows of x (so a sequence's result
// does not depend on its batch): lo = sum_{j<16} q_j x_j and hi = sum_{j>=16} q_j x_j in increasing j (fused
// multiply-adds where the CPU has them), block = lo + hi, then acc += d * block and (Q4_1) acc += m * xsum,
// xsum being the block's sum of x. F32 / BF16 have no halves: block = sum_{j<32} w_j x_j in increasing j, then
// acc += block (x16_plain_rows). The result differs from x @ dequantize(W).T only in rounding order:
// d * sum(q x) + m * sum(x) is the same sum as sum((d q + m) x) regrouped.
#pragma once

constexpr int64_t kX16Rows = 16;
// Register rows of x per pass: accumulators are 2 x (16 / V) vectors per row
constexpr int MRX = V == 16 ? 8 : (V == 8 ? 2 : 1);
constexpr int PX = 16 / V;                 // vectors per 16 rows

constexpr bool x16_plain(int64_t f) { return f == F32 || f == BF16; }     // values as they are, no scales
constexpr bool x16_format(int64_t f) { return f == Q8_0 || f == Q4_0 || f == Q4_1 || x16_plain(f); }
constexpr int64_t x16_scale_bytes(int64_t f) { return f == Q4_1 ? 64 : 32; }      // block formats' d (and m)
// Bytes of one row's 32-value block, and of the 16 rows' chunk.
constexpr int64_t x16_row_block_bytes(int64_t f) { return x16_plain(f) ? 32 * block_bytes(f) : block_bytes(f); }
constexpr int64_t x16_chunk_bytes(int64_t f) { return kX16Rows * x16_row_block_bytes(f); }

inline vf load_halves(const uint8_t* p) {    // V fp16 values -> fp32
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf out;
  for (int l = 0; l < V; ++l) out[l] = load_half(p + 2 * l);
  return out;
#endif
}

// F32 / BF16 chunks (2 KiB / 1 KiB for 16 rows) are read at one value per 2-32 flops, a thread's weights
// one sequential stream. With only the hardware prefetcher, the interleaved F32 matmuls of a SmolLM2 token
// were slower at one row of x than the rows' own layout (27 vs 21 ms on a Zen 4); each step j of a chunk now
// asks for a line of the chunk `ahead` bytes on (A/B in one process: 8 KiB ahead measured best at 1-2 rows
// of x, 2-4 KiB at 4-16, every distance far better than none). On AMD CPUs with AVX-512 (Zen 4 and later) as a
// non-temporal prefetch (the weights are read once a step, so the caches keep the rest: Zen 4, the one-sequence F32
// step in one process, alternating, medians of 40: 22.21 -> 21.69 and 22.56 -> 21.85 ms, 16 sequences 41.41 ->
// 40.94 ms); elsewhere a plain one: on an AVX2-only Zen 3 it was the faster (the 121 one-row F32 matmuls of a
// token, processes alternating, 3 pairs: 22.08 / 21.14 / 20.80 ms against 23.32 / 23.14 / 23.85 non-temporal; 16
// rows within the noise either way), and other vendors were not measured with it.
// ADAPTER_SERVE_PREFETCH_NTA=1 / 0 decides instead of the CPU.
inline bool amd_cpu(bool with_avx512) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd") != 0 && (__builtin_cpu_supports("avx512f") != 0) == with_avx512;
#else
  (void)with_avx512;
  return false;
#endif
}

inline const bool kNonTemporalPrefetch = [] {
  if (const char* env = std::getenv("ADAPTER_SERVE_PREFETCH_NTA")) return env[0] == '1';
  return amd_cpu(true);
}();

// How far ahead the prefetch reaches at 1-2 rows of x, in bytes; 0: no prefetch there. 8 KiB (measured best on
// the Zen 4), except on AMD CPUs without AVX-512 (the Zen 3 and older), whose hardware prefetcher alone kept the
// one-row stream faster: on an AVX2-only Zen 3, processes alternating, the 121 one-row F32 matmuls of a token
// without it took 16.00-17.93 ms at best and 20.40-21.16 as a median of 200 tokens (3 runs) against 18.29-18.73 /
// 21.30-23.47 with 8 KiB (4 KiB: 18.87-19.61 / 21.73-23.45; 16 and 32 KiB no better); the whole F32 step
// 17.67-21.51 ms at best against 21.00-21.53 (4 pairs). At 2 rows the two tied, at 16 rows the 4 KiB prefetch won
// (median 52.6-56.4 ms against 58.6-63.9), so more rows keep it everywhere. F32 only: BF16 chunks read slower
// without it there (one row, medians 16.31 / 20.41 ms against 15.46 / 18.72), so they keep 8 KiB.
// ADAPTER_SERVE_PREFETCH_AHEAD sets it (bytes, whole cache lines, negative as 0).
constexpr int64_t kAheadBytes = 8192;          // the distance measured best at 1-2 rows of x on the Zen 4
inline const int64_t kFewRowsAhead = [] {
  if (const char* env = std::getenv("ADAPTER_SERVE_PREFETCH_AHEAD"))
    return std::max<int64_t>(0, std::atoll(env)) & ~int64_t{63};
  return amd_cpu(false) ? int64_t{0} : kAheadBytes;
}();

template <int64_t F>
inline void x16_prefetch(const uint8_t* chunk, int64_t ahead, int j) {     // step j of 32
#if defined(__SSE__)
  constexpr int64_t lines = x16_chunk_bytes(F) / 64, every = 32 / lines;    // F32: 32 lines, BF16: 16
  if (j % every == 0) {
    const char* line = reinterpret_cast<const char*>(chunk + ahead + j / every * 64);
    if (kNonTemporalPrefetch)
      _mm_prefetch(line, _MM_HINT_NTA);
    else
      _mm_prefetch(line, _MM_HINT_T0);
  }
#else
  (void)chunk; (void)ahead; (void)j;
#endif
}

// Memory a matmul's threads pull into the cache while they compute, for the work that comes right after it
// (the decode loop's LoRA factors of the step's adapters: `quant_matmul_alongside`). `spans` holds (address,
// bytes) pairs of whole cache lines; each row group g of the weight takes its share, bytes [total g / groups,
// total (g + 1) / groups) of the spans laid end to end, a few lines per block of the group, so whichever
// thread claims which groups, the lines arrive spread over the whole matmul. Only prefetches: a wrong address
// cannot fault, and nothing the matmul computes changes.
struct Alongside {
  const int64_t* spans = nullptr;      // [count, 2] (address, bytes)
  int64_t count = 0, bytes = 0;
};

class AlongsideCursor {
 public:
  // Group g of `groups`, whose loop makes `steps` calls of step().
  AlongsideCursor(const Alongside* side, int64_t g, int64_t groups, int64_t steps) {
    if (side == nullptr || side->bytes <= 0) return;
    spans_ = side->spans;
    count_ = side->count;
    int64_t at = side->bytes * g / groups;
    left_ = side->bytes * (g + 1) / groups - at;
    while (span_ < count_ && at >= spans_[2 * span_ + 1]) at -= spans_[2 * span_++ + 1];
    offset_ = at & ~int64_t{63};
    per_step_ = (left_ / 64 + steps) / steps;
  }
  inline void step() {
#if defined(__SSE__)
    for (int64_t k = 0; k < per_step_ && left_ > 0 && span_ < count_; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(spans_[2 * span_] + offset_), _MM_HINT_T1);
      offset_ += 64;
      left_ -= 64;
      if (offset_ >= spans_[2 * span_ + 1]) {
        ++span_;
        offset_ = 0;
      }
    }
#endif
  }

 private:
  const int64_t* spans_ = nullptr;
  int64_t count_ = 0, span_ = 0, offset_ = 0, left_ = 0, per_step_ = 0;
};

// F32 / BF16 chunks hold value j of row r at element j * 16 + r: V rows' value j (0..31) from lane group p.
template <int64_t F>
inline vf x16_plain_values(const uint8_t* qs, int j, int p) {
  if constexpr (F == F32) {
    return vload(reinterpret_cast<const float*>(qs) + j * 16 + p * V);
  } else {                                              // the register path's exact bf16 -> fp32 (a shift)
    vf out;
    step_vectors<BF16>(qs + 2 * (j * 16 + p * V), &out);
    return out;
  }
}

// Column values of V rows from V bytes at p: Q4_x low / high nibble (Q4_0 minus 8), or Q8_0's int8.
template <int64_t F, bool High>
inline vf x16_values(const uint8_t* p) {
  if constexpr (F == Q8_0) {
    return signed_bytes_to_float(p);
  } else {
    const vi b = widen_bytes<false>(p);
    vi q = High ? (b >> 4) : (b & 15);
    if constexpr (F == Q4_0) q = q - 8;
    return __builtin_convertvector(q, vf);
  }
}

// out[i][16g + r] for the R rows of x at x (row stride ldx), rows 16g.. of w; xsum[i * blocks + b] per row.
template <int64_t F, int R>
inline void x16_group(const float* x, int64_t ldx, const uint8_t* w, int64_t g, int64_t blocks,
                      const float* xsum, vf* acc, AlongsideCursor& side) {
  constexpr int64_t CH = x16_chunk_bytes(F), SB = x16_scale_bytes(F);
  for (int i = 0; i < R * PX; ++i) acc[i] = vf{};
  for (int64_t b = 0; b < blocks; ++b) {
    side.step();
    const uint8_t* chunk = w + (g * blocks + b) * CH;
    const uint8_t* qs = chunk + SB;
    vf lo[R][PX], hi[R][PX];
    for (int i = 0; i < R; ++i)
      for (int p = 0; p < PX; ++p) lo[i][p] = hi[i][p] = vf{};
    const float* xb = x + b * 32;
    for (int j = 0; j < 16; ++j) {                // value j into lo, value j + 16 into hi
      for (int p = 0; p < PX; ++p) {
        vf wl, wh;
        if constexpr (F == Q8_0) {
          wl = x16_values<F, false>(qs + j * 16 + p * V);
          wh = x16_values<F, false>(qs + (j + 16) * 16 + p * V);
        } else {
          wl = x16_values<F, false>(qs + j * 16 + p * V);
          wh = x16_values<F, true>(qs + j * 16 + p * V);
        }
        for (int i = 0; i < R; ++i) {
          lo[i][p] += wl * vbroadcast(xb[i * ldx + j]);
          hi[i][p] += wh * vbroadcast(xb[i * ldx + j + 16]);
        }
      }
    }
    for (int p = 0; p < PX; ++p) {
      const vf d = load_halves(chunk + p * V * 2);
      vf m{};
      if constexpr (F == Q4_1) m = load_halves(chunk + 32 + p * V * 2);
      for (int i = 0; i < R; ++i) {
        acc[i * PX + p] += d * (lo[i][p] + hi[i][p]);
        if constexpr (F == Q4_1) acc[i * PX + p] += m * vbroadcast(xsum[i * blocks + b]);
      }
    }
  }
}

// R rows of x times one unpacked tile (x16_group_tiled), accumulated into acc[R x PX] as x16_group does.
template <int64_t F, int R>
inline void x16_tile_rows(const vf (*tile)[PX], const vf* d, const vf* m, const float* xb, int64_t ldx,
                          const float* xsum, int64_t blocks, vf* acc) {
  vf lo[R][PX], hi[R][PX];
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < PX; ++p) lo[i][p] = hi[i][p] = vf{};
  for (int j = 0; j < 16; ++j)
    for (int p = 0; p < PX; ++p)
      for (int i = 0; i < R; ++i) {
        lo[i][p] += tile[j][p] * vbroadcast(xb[i * ldx + j]);
        hi[i][p] += tile[j + 16][p] * vbroadcast(xb[i * ldx + j + 16]);
      }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < PX; ++p) {
      acc[i * PX + p] += d[p] * (lo[i][p] + hi[i][p]);
      if constexpr (F == Q4_1) acc[i * PX + p] += m[p] * vbroadcast(xsum[i * blocks]);
    }
}

// More rows of x than registers hold: each block's 16 x 32 values are unpacked once into an L1 tile and every
// chunk of R rows multiplies the tile, with the arithmetic of x16_group (same values, same order: a row's
// result is the same bits whichever function computes it). acc holds M x PX vectors.
template <int64_t F>
inline void x16_group_tiled(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t g, int64_t blocks,
                            const float* xsum, vf* acc, AlongsideCursor& side) {
  constexpr int64_t CH = x16_chunk_bytes(F), SB = x16_scale_bytes(F);
  alignas(64) vf tile[32][PX];
  for (int64_t i = 0; i < M * PX; ++i) acc[i] = vf{};
  for (int64_t b = 0; b < blocks; ++b) {
    side.step();
    const uint8_t* chunk = w + (g * blocks + b) * CH;
    const uint8_t* qs = chunk + SB;
    for (int j = 0; j < 16; ++j)
      for (int p = 0; p < PX; ++p) {
        if constexpr (F == Q8_0) {
          tile[j][p] = x16_values<F, false>(qs + j * 16 + p * V);
          tile[j + 16][p] = x16_values<F, false>(qs + (j + 16) * 16 + p * V);
        } else {
          tile[j][p] = x16_values<F, false>(qs + j * 16 + p * V);
          tile[j + 16][p] = x16_values<F, true>(qs + j * 16 + p * V);
        }
      }
    vf d[PX], m[PX];
    for (int p = 0; p < PX; ++p) {
      d[p] = load_halves(chunk + p * V * 2);
      m[p] = F == Q4_1 ? load_halves(chunk + 32 + p * V * 2) : vf{};
    }
    const float* xb = x + b * 32;
    for (int64_t i0 = 0; i0 < M; i0 += MRX) {
      const int64_t R = std::min<int64_t>(MRX, M - i0);
      const float* xs = F == Q4_1 ? xsum + i0 * blocks + b : nullptr;
      if (R == MRX)
        x16_tile_rows<F, MRX>(tile, d, m, xb + i0 * ldx, ldx, xs, blocks, acc + i0 * PX);
      else
        for (int64_t i = 0; i < R; ++i)
          x16_tile_rows<F, 1>(tile, d, m, xb + (i0 + i) * ldx, ldx, xs ? xs + i * blocks : nullptr, blocks,
                              acc + (i0 + i) * PX);
    }
  }
}

static_assert(MRX <= 8, "x16_rows has cases for 1..8 rows");

template <int64_t F>
void x16_rows(int rows, const float* x, int64_t ldx, const uint8_t* w, int64_t g, int64_t blocks,
              const float* xsum, vf* acc, AlongsideCursor& side) {
  switch (rows) {
    case 1: x16_group<F, 1>(x, ldx, w, g, blocks, xsum, acc, side); break;
    case 2: x16_group<F, 2>(x, ldx, w, g, blocks, xsum, acc, side); break;
    case 3: x16_group<F, 3>(x, ldx, w, g, blocks, xsum, acc, side); break;     // the cases past MRX never run:
    case 4: x16_group<F, 4>(x, ldx, w, g, blocks, xsum, acc, side); break;     // every count up to MRX has its
    case 5: x16_group<F, 5>(x, ldx, w, g, blocks, xsum, acc, side); break;     // own case (a larger R would read
    case 6: x16_group<F, 6>(x, ldx, w, g, blocks, xsum, acc, side); break;     // rows of x past the last one)
    case 7: x16_group<F, 7>(x, ldx, w, g, blocks, xsum, acc, side); break;
    default: x16_group<F, MRX>(x, ldx, w, g, blocks, xsum, acc, side); break;
  }
}

// F32 / BF16: each 32-column block's values summed in increasing column order into one partial per row of x
// and lane group, then added to that row's accumulator (no lo / hi halves: one vector of partials per row is
// what lets MRP rows of x share each weight load). Every row's arithmetic is the same whichever R handles it.
// MRP rows per pass: their partials and the weight vectors fit the vector registers. AVX2, F32: 5 rows, 10 chains
// of fused multiply-adds, where 4 rows' 8 chains (two FMA units of 4 cycles' latency need 8 in flight) left the
// units idle at every stall: on a Zen 3, 16 rows of x, the 121 F32 matmuls of a token took a median of 48.8-50.0
// ms against 57.5-61.9 (processes alternating, 3 pairs; a standalone loop 69-80 GFLOP/s against 44-46, 6 rows
// spilled registers: 36-40); 12 rows 32.5-34.1 against 39.5-42.2, 8 rows (5 + 2 + 1 against 4 + 4) within the noise.
// BF16 stays at 4 (its widening takes registers: 5 rows were slower there, 72.2-77.2 ms against 56.5-68.9).
template <int64_t F>
constexpr int MRP = V == 16 ? 16 : (V == 8 ? (F == F32 ? 5 : 4) : 2);

template <int64_t F, int R>
inline void x16_plain_rows(const uint8_t* chunk, const float* xb, int64_t ldx, vf* acc, int64_t ahead) {
  vf part[R][PX];
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < PX; ++p) part[i][p] = vf{};
  for (int j = 0; j < 32; ++j) {
    if (ahead) x16_prefetch<F>(chunk, ahead, j);
    for (int p = 0; p < PX; ++p) {
      const vf wv = x16_plain_values<F>(chunk, j, p);
      for (int i = 0; i < R; ++i) part[i][p] += wv * vbroadcast(xb[i * ldx + j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < PX; ++p) acc[i * PX + p] += part[i][p];
}

// acc [M x PX] = rows 16g.. of an interleaved F32 / BF16 weight times the M rows of x: per block, passes of
// MRP rows, a remainder in passes of halving size; the first pass of a block prefetches ahead (at 1-2 rows of x
// F32 kFewRowsAhead, BF16 8 KiB; 4 KiB otherwise), the others read the chunk from L1.
template <int64_t F>
void x16_plain_group(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t g, int64_t blocks,
                     vf* acc, AlongsideCursor& side) {
  constexpr int64_t CH = x16_chunk_bytes(F);
  const int64_t ahead = M <= 2 ? (F == F32 ? kFewRowsAhead : kAheadBytes) : 4096;
  for (int64_t i = 0; i < M * PX; ++i) acc[i] = vf{};
  for (int64_t b = 0; b < blocks; ++b) {
    side.step();
    const uint8_t* chunk = w + (g * blocks + b) * CH;
    const float* xb = x + b * 32;
    int64_t i0 = 0;
    auto pass = [&](auto rows_tag) {
      constexpr int R = decltype(rows_tag)::value;
      x16_plain_rows<F, R>(chunk, xb + i0 * ldx, ldx, acc + i0 * PX, i0 == 0 ? ahead : 0);
      i0 += R;
    };
    while (M - i0 >= MRP<F>) pass(std::integral_constant<int, MRP<F>>{});
    if constexpr (MRP<F> > 8) {
      if (M - i0 >= 8) pass(std::integral_constant<int, 8>{});
    }
    if constexpr (MRP<F> > 4) {
      if (M - i0 >= 4) pass(std::integral_constant<int, 4>{});
    }
    if constexpr (MRP<F> > 2) {
      if (M - i0 >= 2) pass(std::integral_constant<int, 2>{});
    }
    if (M - i0 >= 1) pass(std::integral_constant<int, 1>{});
  }
}

// out [M, N] = x [M, K] @ W^T (+ bias) for an interleaved weight (N a multiple of 16, K of 32). With `beside`,
// its work runs on the same threads (spin_parallel_beside) and its delta is added to out: as each row group is
// stored when the work is already done by then (most groups: the workers take it first), after the matmul for
// the others.
void x16_matmul(int64_t fmt, const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K,
                const float* bias, float* out, int64_t ldo, const Alongside* alongside = nullptr,
                const BesideWork* beside = nullptr) {
  const int64_t blocks = K / 32, groups = N / kX16Rows;
  std::vector<float> xsum(fmt == Q4_1 ? M * blocks : 0);      // Q4_1's m multiplies each block's sum of x
  for (int64_t i = 0; fmt == Q4_1 && i < M; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += x[i * ldx + b * 32 + j];
      xsum[i * blocks + b] = s;
    }
  // F32 / BF16 weights at more than 2 rows of x take no spans: their matmuls already draw on the memory at a
  // good part of its rate (4-8x Q4_1's bytes), and the factors' reads competed with the weights' there. On the
  // Zen 4 with 16 sequences on 16 adapters (bench/lora_alongside_bench.py), alongside vs not, F32: 40.97 vs
  // 41.59 and 41.36 vs 42.20 ms a step while the machine read fast, 46.96 vs 46.21 and 45.50 vs 44.36 while it
  // read slowly; Q4_1 (dequantisation-bound at 16 rows) 38.58 vs 40.17 and 44.63 vs 44.63; one sequence on one
  // adapter gained in both states (F32 20.78 vs 21.11 and 20.40 vs 20.73, Q4_1 6.39 vs 6.62 and 7.55 vs 7.92).
  if (x16_plain(fmt) && M > 2) alongside = nullptr;
  const int64_t min_groups = M * N * K > (1 << 15) ? 2 : groups + 1;
  const int64_t chunks = (M + MCHUNK - 1) / MCHUNK;
  std::atomic<int64_t> side_left{beside != nullptr ? beside->items : 0};
  std::vector<uint8_t> added(beside != nullptr ? groups * chunks : 0);    // per (group, chunk of rows): delta in
  auto matmul = [&](int64_t g_begin, int64_t g_end) {
    alignas(64) vf acc[MCHUNK * PX];
    for (int64_t g = g_begin; g < g_end; ++g) {
      AlongsideCursor side(alongside, g, groups, blocks);        // its steps go with the first pass of rows
      for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int rows = static_cast<int>(std::min<int64_t>(MCHUNK, M - m0));
        const float* xs = xsum.empty() ? nullptr : xsum.data() + m0 * blocks;
        const float* xm = x + m0 * ldx;
        if (fmt == F32) {
          x16_plain_group<F32>(xm, ldx, rows, w, g, blocks, acc, side);
        } else if (fmt == BF16) {
          x16_plain_group<BF16>(xm, ldx, rows, w, g, blocks, acc, side);
        } else if (rows <= MRX) {
          switch (fmt) {
            case Q8_0: x16_rows<Q8_0>(rows, xm, ldx, w, g, blocks, xs, acc, side); break;
            case Q4_0: x16_rows<Q4_0>(rows, xm, ldx, w, g, blocks, xs, acc, side); break;
            default: x16_rows<Q4_1>(rows, xm, ldx, w, g, blocks, xs, acc, side); break;
          }
        } else {
          switch (fmt) {
            case Q8_0: x16_group_tiled<Q8_0>(xm, ldx, rows, w, g, blocks, xs, acc, side); break;
            case Q4_0: x16_group_tiled<Q4_0>(xm, ldx, rows, w, g, blocks, xs, acc, side); break;
            default: x16_group_tiled<Q4_1>(xm, ldx, rows, w, g, blocks, xs, acc, side); break;
          }
        }
        const float* delta = nullptr;                              // the side work's delta, when it is done
        if (beside != nullptr && side_left.load(std::memory_order_acquire) == 0) {
          delta = beside->delta;
          added[g * chunks + m0 / MCHUNK] = 1;
        }
        for (int i = 0; i < rows; ++i)
          for (int p = 0; p < PX; ++p) {
            float* o = out + (m0 + i) * ldo + g * kX16Rows + p * V;
            vf v = acc[i * PX + p];
            if (bias) v += vload(bias + g * kX16Rows + p * V);
            if (delta) v += vload(delta + (m0 + i) * beside->ldd + g * kX16Rows + p * V);
            vstore(o, v);
          }
      }
    }
  };
  if (beside == nullptr) {
    spin_parallel(groups, matmul, min_groups);
    return;
  }
  spin_parallel_beside(groups, matmul, beside->items, *beside->body, side_left, min_groups);
  spin_parallel(groups, [&](int64_t g_begin, int64_t g_end) {        // the groups stored before the work was done
    for (int64_t g = g_begin; g < g_end; ++g)
      for (int64_t c = 0; c < chunks; ++c) {
        if (added[g * chunks + c]) continue;
        for (int64_t i = c * MCHUNK; i < std::min(M, (c + 1) * MCHUNK); ++i)
          for (int p = 0; p < PX; ++p) {
            float* o = out + i * ldo + g * kX16Rows + p * V;
            vstore(o, vload(o) + vload(beside->delta + i * beside->ldd + g * kX16Rows + p * V));
          }
      }
  }, spin_min_items(groups, M * N));
}

// Row n of an interleaved weight dequantised to out[K] (embedding look-ups, `dequantize` through the kernel):
// the values of dequant_block on the row's own blocks.
void x16_dequant_row(int64_t fmt, const uint8_t* w, int64_t n, int64_t K, float* out) {
  const int64_t blocks = K / 32, bb = block_bytes(fmt), g = n / kX16Rows, r = n % kX16Rows;
  if (x16_plain(fmt)) {                             // value j of row r at element j * 16 + r of each chunk
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* chunk = w + (g * blocks + b) * x16_chunk_bytes(fmt);
      for (int64_t j = 0; j < 32; ++j) {
        const uint8_t* v = chunk + (j * kX16Rows + r) * bb;
        const uint32_t bits =
            fmt == F32 ? load_bytes<uint32_t>(v) : static_cast<uint32_t>(load_bytes<uint16_t>(v)) << 16;
        std::memcpy(out + b * 32 + j, &bits, 4);
      }
    }
    return;
  }
  alignas(64) uint8_t blk[34];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* chunk = w + (g * blocks + b) * kX16Rows * bb;
    const int64_t sb = x16_scale_bytes(fmt), qbytes = bb - sb / 16;       // quant bytes per row block
    std::memcpy(blk, chunk + 2 * r, 2);                                   // d
    if (fmt == Q4_1) std::memcpy(blk + 2, chunk + 32 + 2 * r, 2);         // m
    const int64_t head = sb / 16;
    for (int64_t j = 0; j < qbytes; ++j) blk[head + j] = chunk[sb + j * kX16Rows + r];
    switch (fmt) {
      case Q8_0: dequant_block<Q8_0>(blk, out + b * 32); break;
      case Q4_0: dequant_block<Q4_0>(blk, out + b * 32); break;
      default: dequant_block<Q4_1>(blk, out + b * 32); break;
    }
  }
}

// w [N, row_bytes] (GGUF rows) -> the interleaved layout, same shape and bytes.
at::Tensor x16_interleave(at::Tensor w, int64_t fmt, int64_t K) {
  TORCH_CHECK(x16_format(fmt), "interleave: Q8_0, Q4_0, Q4_1, F32 or BF16 only, got format ", fmt);
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(0) % kX16Rows == 0,
              "interleave: a contiguous [N, row_bytes] CPU weight with N a multiple of 16");
  const int64_t bb = block_bytes(fmt), blocks = K / 32, rb = w.size(1) * w.element_size();
  TORCH_CHECK(K % 32 == 0 && rb == blocks * x16_row_block_bytes(fmt), "interleave: rows of ", rb,
              " bytes do not hold ", K, " values");
  at::Tensor out = at::empty_like(w);
  const uint8_t* src = static_cast<const uint8_t*>(w.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(out.data_ptr());
  if (x16_plain(fmt)) {                             // value j of row r to element j * 16 + r of its chunk
    auto weave = [&](auto tag) {                    // T: the value's bits
      using T = decltype(tag);
      const T* s = reinterpret_cast<const T*>(src);
      T* d = reinterpret_cast<T*>(dst);
      const int64_t row = K;                                                  // values per row
      for (int64_t g = 0; g < w.size(0) / kX16Rows; ++g)
        for (int64_t b = 0; b < blocks; ++b) {
          T* chunk = d + (g * blocks + b) * kX16Rows * 32;
          for (int64_t r = 0; r < kX16Rows; ++r)
            for (int64_t j = 0; j < 32; ++j) chunk[j * kX16Rows + r] = s[(g * kX16Rows + r) * row + b * 32 + j];
        }
    };
    if (fmt == F32) weave(uint32_t{});
    else weave(uint16_t{});
    return out;
  }
  const int64_t sb = x16_scale_bytes(fmt), head = sb / 16, qbytes = bb - head;
  for (int64_t g = 0; g < w.size(0) / kX16Rows; ++g)
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* chunk = dst + (g * blocks + b) * kX16Rows * bb;
      for (int64_t r = 0; r < kX16Rows; ++r) {
        const uint8_t* blk = src + (g * kX16Rows + r) * rb + b * bb;
        std::memcpy(chunk + 2 * r, blk, 2);
        if (fmt == Q4_1) std::memcpy(chunk + 32 + 2 * r, blk + 2, 2);
        for (int64_t j = 0; j < qbytes; ++j) chunk[sb + j * kX16Rows + r] = blk[head + j];
      }
    }
  return out;
}
