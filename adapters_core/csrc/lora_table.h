// The fused LoRA kernel's slot tables (sgmv.cpp; `adapters_core.sgmv.table_row` writes their rows): per
// adapted layer an int64 [slots, kColumns] tensor whose row s holds, for the adapter in slot s, the addresses of
// its A [r, in] and Bt [r, out] (row-major, in their own dtype) and of its fp32 scale rows [r], then r, the
// factors' dtype code, in and out; a row of zeros is "no adapter in this slot". Shared by the kernel and the
// decoder's C++ layer loop (service/model/csrc/decode_layers.cpp), which reads the rows to prefetch the factors.
#pragma once

#include <cstdint>
#include <functional>

namespace lora_table {

enum Column : int64_t { kA = 0, kB, kScale, kRank, kDtype, kIn, kOut, kColumns };
enum Dtype : int64_t { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Bytes per value of a factor dtype code.
inline int64_t element_bytes(int64_t dtype) { return dtype == kFloat ? 4 : 2; }

// A value of any factor dtype (float, c10::BFloat16, c10::Half) as fp32: exact for all three.
template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// How the fused kernel's split entry (sgmv.cpp's lora_add_group_split_) hands its work over: runner(items,
// body) must call body(begin, end) over runs covering [0, items) once each, on any threads (the decoder's loop
// runs them beside the matmul of the same input).
using Runner = std::function<void(int64_t items, const std::function<void(int64_t, int64_t)>& body)>;

}  // namespace lora_table
