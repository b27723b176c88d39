// An adapter's tensors put into place at load time, on the loader thread (`adapters_core/packed_read.py`): one
// call per adapter file reads its data section into the packed buffers, converting the dtype or transposing LoRA
// B [out, r] into Bt [r, out] as the fused kernel (sgmv.cpp) reads it, and says per tensor whether every value is
// finite; and the tiled transpose on its own. Included once, by sgmv.cpp, whose module binds them.
#pragma once

#include <torch/extension.h>

#include "lora_table.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {
using namespace lora_table;              // dtype codes, element_bytes, to_float

// dst [C, R] = src [R, C]^T, converting the dtype, in 16 x 16 tiles: each tile's rows are read and its
// columns written while both stay in L1 (a strided element-by-element copy walks a whole column of src per
// row of dst).
template <typename st, typename dt>
void transpose_tiles(const st* src, dt* dst, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) {
          if constexpr (std::is_same<st, dt>::value) dst[j * rows + i] = src[i * cols + j];   // bits as they are
          else dst[j * rows + i] = static_cast<dt>(to_float(src[i * cols + j]));
        }
    }
  }
}
// Whether n values at p are all finite, from their bits (an all-ones exponent is an inf or a NaN); a loop the
// compiler vectorises, over a tensor just written (still in the cache).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using bits_t = typename std::conditional<sizeof(T) == 8, uint64_t,
                 typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type>::type;
  const bits_t mask = sizeof(T) == 8 ? bits_t(0x7ff0000000000000ull)
                    : std::is_same<T, float>::value ? bits_t(0x7f800000u)
                    : std::is_same<T, c10::Half>::value ? bits_t(0x7c00u) : bits_t(0x7f80u);
  const bits_t* b = reinterpret_cast<const bits_t*>(p);
  bits_t bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= bits_t((b[j] & mask) == mask);
  return bad == 0;
}
}  // namespace

// dst [C, R] = src [R, C]^T (LoRA B [out, r] -> Bt [r, out] as the tables read it), both contiguous, each
// fp32 / bf16 / fp16 (the value converted as `copy_` converts it: through its exact fp32 value, rounded to
// nearest even): how an adapter's B reaches its packed
// buffer at load time, on the loader thread (torch's strided copy took ~47 us per SmolLM2 B of rank 36).
void transpose_copy_(torch::Tensor dst, torch::Tensor src) {
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 2 && dst.size(0) == src.size(1) && dst.size(1) == src.size(0),
              "transpose_copy_: dst must be src's shape transposed");
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.device().is_cpu() && dst.device().is_cpu(),
              "transpose_copy_: contiguous CPU tensors only");
  for (const auto* t : {&src, &dst})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf,
                "transpose_copy_: fp32 / bf16 / fp16 only");      // each converts to fp32 exactly
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "transpose_src", [&] {
    using st = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "transpose_dst", [&] {
      transpose_tiles<st, scalar_t>(src.data_ptr<st>(), dst.data_ptr<scalar_t>(), src.size(0), src.size(1));
    });
  });
}

// An adapter file's tensors from one read of its data section into their places in the packed buffers
// (`packed_read.py`): dsts[i] gets the bytes of src at offsets[i], read as dtype codes[i] (kFloat / kBFloat16 /
// kHalf): copied, converted to dst's dtype (as `copy_` converts), or, where transposed[i], the [C, R] matrix
// there transposed into dst [R, C] (LoRA B [out, r] -> Bt). One call per file, the GIL released once (a call
// per tensor handed the GIL to the server's other threads and waited for it back, 120 times a SmolLM2 adapter).
// Returns, per destination, whether every value it now holds is finite (checked right after it is written, so
// the loader needs no second pass over the adapter: torch's fp32 sum of a 3.9 MB bf16 adapter took 0.8-2.4 ms).
std::vector<bool> unpack_(torch::Tensor src, std::vector<torch::Tensor> dsts, std::vector<int64_t> offsets,
             std::vector<int64_t> codes, std::vector<int64_t> transposed) {
  TORCH_CHECK(src.dim() == 1 && src.is_contiguous() && src.scalar_type() == at::kByte && src.device().is_cpu(),
              "unpack_: src must be a contiguous 1-D uint8 CPU tensor");
  TORCH_CHECK(dsts.size() == offsets.size() && dsts.size() == codes.size() && dsts.size() == transposed.size(),
              "unpack_: one offset, dtype code and transposed flag per destination");
  const uint8_t* base = src.data_ptr<uint8_t>();
  std::vector<bool> finite(dsts.size(), true);
  for (size_t i = 0; i < dsts.size(); ++i) {
    const torch::Tensor& dst = dsts[i];
    TORCH_CHECK(dst.is_contiguous() && dst.device().is_cpu() && (dst.scalar_type() == at::kFloat ||
                dst.scalar_type() == at::kBFloat16 || dst.scalar_type() == at::kHalf),
                "unpack_: destinations must be contiguous fp32 / bf16 / fp16 CPU tensors");
    TORCH_CHECK(codes[i] >= kFloat && codes[i] <= kHalf, "unpack_: unknown dtype code ", codes[i]);
    TORCH_CHECK(!transposed[i] || dst.dim() == 2, "unpack_: a transposed destination must be 2-D");
    const int64_t n = dst.numel(), size = element_bytes(codes[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + n * size <= src.numel(), "unpack_: tensor ", i,
                " lies outside the buffer");
    const uint8_t* p = base + offsets[i];
    std::vector<uint8_t> aligned;
    if (reinterpret_cast<uintptr_t>(p) % size != 0) {          // (safetensors does not align each tensor)
      aligned.assign(p, p + n * size);
      p = aligned.data();
    }
    auto run = [&](auto src_tag) {
      using st = decltype(src_tag);
      const st* sp = reinterpret_cast<const st*>(p);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "unpack_dst", [&] {
        scalar_t* dp = dst.data_ptr<scalar_t>();
        if (transposed[i]) {
          transpose_tiles<st, scalar_t>(sp, dp, dst.size(1), dst.size(0));
        } else if (std::is_same<st, scalar_t>::value) {
          std::memcpy(dp, sp, n * size);
        } else {
          for (int64_t j = 0; j < n; ++j) dp[j] = static_cast<scalar_t>(to_float(sp[j]));
        }
        finite[i] = all_finite(dp, n);
      });
    };
    if (codes[i] == kFloat) run(float{});
    else if (codes[i] == kBFloat16) run(c10::BFloat16{});
    else run(c10::Half{});
  }
  return finite;
}
