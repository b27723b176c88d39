// Every decoder layer of a step in one call (decode rows and prompt chunks side by side): the sequence of direct_step.py (RMSNorm, joined q/k/v
// matmul, rotary, cache write and attention, o_proj, residual, RMSNorm, joined gate/up, SwiGLU, down_proj,
// residual) with the same kernels on the same tensors, so the result is bit-identical, without the ~40 us of
// Python and binding calls per layer (SmolLM2: 30 layers, ~1.2 ms of a ~7 ms single-sequence step). The
// stored-weight matmul comes from the quant kernel's module as a function pointer (`quant_matmul_entry`, an
// address passed as an integer: no Python object is touched while the GIL is released), since the two are
// built with different floating-point contraction flags; a step's LoRA deltas likewise come from adapters_core's
// fused kernel (`lora_add_group_entry`), called right after each joined matmul as direct_step.py calls it.
// Right after each matmul, `quant_read_ahead_entry` (when given) has the matmul pool's workers read the start
// of the next weight while this thread does the work between the two (bench/quant_kernel_bench.py's A/B, one
// SmolLM2 sequence on the Zen 4: F32 19.71 -> 19.32 ms a step, Q4_1 5.45 -> 5.40; 16 sequences unchanged).
// The residual stream is a copy of x added to in place, each add fused with the norm after it
// (`add_rms_norm_`: the same bits as x + o and the norm); with the norms, SwiGLU and rotary free of OpenMP's
// per-call region, the work between the matmuls of a one-sequence SmolLM2 step went from 1.21 to 1.05 ms
// (engine's kind of thread), and to 0.82 with SwiGLU's e^-x vectorised (silu_mul.cpp). Each matmul before a LoRA
// call gets that call's factors (`LoraDeltas::factors`, each adapter of the step once) for its threads to pull
// into the cache as they compute (`quant_matmul_alongside`): the fused call then reads them from the cache, not
// memory. bench/lora_alongside_bench.py on the Zen 4 (16 sequences on 16 bf16 r=16 adapters, all projections,
// the machine reading fast): the LoRA calls 6.3 -> 3.0 ms a step on Q4_1 weights, the step 40.17 -> 38.58 ms;
// one sequence on one adapter 6.62 -> 6.39 ms (Q4_1), 21.11 -> 20.78 (F32). F32 / BF16 matmuls of more than
// 2 rows take no spans (quant_x16.h's x16_matmul says why). Given `matmul_beside` and `lora_split`, each
// matmul's LoRA deltas are instead computed beside it on its threads (LoraDeltas::project): on one core the
// deltas' reads are paced by its fetch rate (~14 GB/s on the Zen 4) while the other computes, where one after
// the other the step paid both (16 sequences on 16 bf16 r=16 adapters, F32, 2 cores: 48.52 -> 47.39 ms a step,
// adapters / base 0.922 -> 0.944; Q4_1 45.74 -> 44.07).
#include <torch/extension.h>

#include "lora_table.h"
#include "ops.h"
#include "spin_pool.h"

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using QuantMatmul = at::Tensor (*)(at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>,
                                   c10::optional<at::Tensor>, const int64_t*, int64_t);   // quant_matmul_alongside
using ReadAhead = void (*)(const at::Tensor&, int64_t);

constexpr int kTensorsPerLayer = 14;   // in_norm, post_norm, then (data, row_scale, bias) x qkv, o, gate_up, down
constexpr int kIntsPerLayer = 4;       // kernel format ids of qkv, o, gate_up, down
constexpr int kLoraPerLayer = 7;       // LoRA slot tables of q, k, v, o, gate, up, down (None: no delta)

using LoraAdd = void (*)(std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, at::Tensor,
                         c10::optional<at::Tensor>);
using LoraSplit = void (*)(std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, at::Tensor,
                           c10::optional<at::Tensor>, const lora_table::Runner&);       // lora_add_group_split_
using QuantBeside = at::Tensor (*)(at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>,
                                   c10::optional<at::Tensor>, const BesideWork*);     // quant_matmul_beside

// The LoRA deltas of a step: adds, for the projections of one input that have a table, each token's delta
// into its output (a column slice of the joined matmul's result) with one fused call.
// A prompt chunk of the step: its cache slot, first position, length and first row of x.
struct PrefillSeq {
  int64_t slot, start, length, offset;
};

struct LoraDeltas {
  LoraAdd add = nullptr;
  const c10::optional<at::Tensor>* tables = nullptr;   // kLoraPerLayer per layer
  at::Tensor slots;
  c10::optional<at::Tensor> scales;
  bool alongside = true;              // factors() lists them (else the matmuls pull nothing alongside)
  LoraSplit split = nullptr;          // with `beside`: each matmul's threads compute its deltas beside it
  QuantBeside beside = nullptr;

  void apply(int64_t layer, const at::Tensor& input, const std::vector<std::pair<int, at::Tensor>>& outputs) const {
    if (add == nullptr) return;
    std::vector<at::Tensor> results, used;
    for (const auto& [column, output] : outputs) {
      const auto& table = tables[layer * kLoraPerLayer + column];
      if (table.has_value()) {
        results.push_back(output);
        used.push_back(*table);
      }
    }
    if (!results.empty()) add(results, input, used, slots, scales);
  }

  // out = input @ W^T (+ bias) for the layer's weight t[0] (format f, row scales t[1], bias t[2]) with the
  // deltas of `columns` (table column, first output column, width) added; `between` runs right after the matmul
  // (the read-ahead of the next weight). With `split` the deltas are computed into a scratch buffer by the
  // matmul's threads beside it (spin_parallel_beside) and added as it stores its outputs; else the matmul
  // pulls the factors into the cache alongside and the fused call adds them after it.
  template <typename Between>
  at::Tensor project(QuantMatmul qm, int64_t layer, const at::Tensor& input, const c10::optional<at::Tensor>* t,
                     int64_t f, std::initializer_list<std::tuple<int, int64_t, int64_t>> columns,
                     Between&& between) const {
    at::Tensor out;
    if (add == nullptr || split == nullptr || beside == nullptr) {
      std::vector<int> cols;
      for (const auto& [column, first, width] : columns) cols.push_back(column);
      std::vector<int64_t> side = factors(layer, cols);
      out = qm(input, *t[0], f, t[1], t[2], side.data(), side.size() / 2);
      between();
      std::vector<std::pair<int, at::Tensor>> outputs;
      for (const auto& [column, first, width] : columns) outputs.emplace_back(column, out.narrow(1, first, width));
      apply(layer, input, outputs);
      return out;
    }
    std::vector<std::pair<int64_t, int64_t>> ranges;       // (first output column, width) of each table used
    std::vector<at::Tensor> results, used;
    for (const auto& [column, first, width] : columns) {
      const auto& table = tables[layer * kLoraPerLayer + column];
      if (table.has_value()) {
        ranges.emplace_back(first, width);
        used.push_back(*table);
      }
    }
    if (used.empty()) {
      out = qm(input, *t[0], f, t[1], t[2], nullptr, 0);
    } else {
      const int64_t n = input.size(0), width_all = t[0]->size(0);
      at::Tensor scratch = at::empty({n, width_all}, input.options());                  // [N, out]: the deltas
      for (const auto& [first, width] : ranges) results.push_back(scratch.narrow(1, first, width));
      float* delta = scratch.data_ptr<float>();
      split(results, input, used, slots, scales, [&](int64_t items, const std::function<void(int64_t, int64_t)>& body) {
        const std::function<void(int64_t, int64_t)> work = [&](int64_t begin, int64_t end) {
          std::fill(delta + begin * width_all, delta + end * width_all, -0.0f);   // -0 + d is d, o + -0 is o
          body(begin, end);
        };
        const BesideWork job{items, &work, delta, width_all};
        out = beside(input, *t[0], f, t[1], t[2], &job);
      });
    }
    between();
    return out;
  }

  // (address, bytes) of whole cache lines: the A and Bt factors that apply() of `columns` will read, each
  // adapter in the step once, in the order of the tokens (the fused kernel's order), for the matmul before it
  // to pull into the cache as it computes (quant_matmul_alongside). The addresses come from the tables (the
  // stacks keep those tensors alive); only prefetched.
  std::vector<int64_t> factors(int64_t layer, const std::vector<int>& columns) const {
    std::vector<int64_t> spans;
    if (add == nullptr || !alongside) return spans;
    const int64_t n = slots.numel();
    const int64_t* sp = slots.data_ptr<int64_t>();
    std::vector<int64_t> seen;
    for (int64_t g = 0; g < n; ++g) {
      if (std::find(seen.begin(), seen.end(), sp[g]) != seen.end()) continue;
      seen.push_back(sp[g]);
      for (int column : columns) {
        const auto& table = tables[layer * kLoraPerLayer + column];
        if (!table.has_value() || sp[g] < 0 || sp[g] >= table->size(0)) continue;
        using namespace lora_table;
        const int64_t* row = table->data_ptr<int64_t>() + sp[g] * kColumns;
        if (row[kRank] <= 0) continue;
        const int64_t elem = element_bytes(row[kDtype]);
        for (const auto [address, bytes] : {std::pair{row[kA], row[kRank] * row[kIn] * elem},
                                            std::pair{row[kB], row[kRank] * row[kOut] * elem}}) {
          const int64_t first = address & ~int64_t{63}, end = (address + bytes + 63) & ~int64_t{63};
          spans.push_back(first);
          spans.push_back(end - first);
        }
      }
    }
    return spans;
  }
};

}  // namespace

// x [N, d] fp32 after every layer. `layers`: kTensorsPerLayer entries per layer (row scales and biases may be
// None); `formats`: kIntsPerLayer per layer; `shape`: q heads, kv heads, head dim, intermediate size;
// k_cache / v_cache [layers, slots, Hkv, T, D]; tokens / slots / positions as decode_attention_ takes them.
// `read_ahead`: quant_read_ahead's address, or 0 for none. LoRA deltas, when `lora_add` (lora_add_group_'s
// address) is not 0: `lora_tables` holds kLoraPerLayer slot tables (or None) per layer, `lora_slots` [N]
// int64 each token's slot, `lora_scales` [N] fp32 or None; `matmul_beside` and `lora_split` (quant_matmul_beside's
// and lora_add_group_split_'s addresses, or 0) have the deltas computed beside each matmul.
// Prompt chunks of a mixed step: `prefill_seqs` holds (slot, start, length, first row) per chunk; their keys and
// values are written into the cache first, then the decode rows attend, then each chunk attends causally with
// `scaled_dot_product_attention` (decoder.py's Attention.forward_step, the same ops in the same order).
at::Tensor decode_layers(at::Tensor x, int64_t matmul, int64_t read_ahead, bool factors_alongside,
                         std::vector<c10::optional<at::Tensor>> layers,
                         std::vector<int64_t> formats, std::vector<int64_t> shape, double eps, at::Tensor cos,
                         at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tokens,
                         at::Tensor slots, at::Tensor positions, double scale, int64_t lora_add,
                         std::vector<c10::optional<at::Tensor>> lora_tables, c10::optional<at::Tensor> lora_slots,
                         c10::optional<at::Tensor> lora_scales, std::vector<int64_t> prefill_seqs,
                         int64_t matmul_beside, int64_t lora_split) {
  const auto qm = reinterpret_cast<QuantMatmul>(static_cast<intptr_t>(matmul));
  const auto ahead = reinterpret_cast<ReadAhead>(static_cast<intptr_t>(read_ahead));
  TORCH_CHECK(layers.size() % kTensorsPerLayer == 0 && formats.size() * kTensorsPerLayer ==
              layers.size() * kIntsPerLayer && shape.size() == 4, "decode_layers: malformed layer tables");
  const int64_t n = x.size(0), heads = shape[0], kv_heads = shape[1], dim = shape[2], inter = shape[3];
  const int64_t q_size = heads * dim, kv_size = kv_heads * dim;
  const int64_t count = static_cast<int64_t>(layers.size()) / kTensorsPerLayer;
  // the next matmul's weight, read ahead by the matmul pool's workers while this thread does the work between
  auto read_next = [&](int64_t layer, int which) {            // which: 0 qkv, 1 o, 2 gate_up, 3 down
    if (ahead != nullptr && layer < count)
      ahead(*layers[layer * kTensorsPerLayer + 2 + 3 * which], formats[layer * kIntsPerLayer + which]);
  };
  TORCH_CHECK(k_cache.size(0) >= count && v_cache.size(0) >= count, "decode_layers: fewer cache layers than layers");
  TORCH_CHECK(prefill_seqs.size() % 4 == 0, "decode_layers: prompt chunks come as (slot, start, length, row)");
  std::vector<PrefillSeq> prefill;
  for (size_t i = 0; i < prefill_seqs.size(); i += 4) {
    const PrefillSeq p{prefill_seqs[i], prefill_seqs[i + 1], prefill_seqs[i + 2], prefill_seqs[i + 3]};
    TORCH_CHECK(p.slot >= 0 && p.slot < k_cache.size(1) && p.start >= 0 && p.length > 0 &&
                p.start + p.length <= k_cache.size(3) && p.offset >= 0 && p.offset + p.length <= n,
                "decode_layers: a prompt chunk outside the cache or the rows");
    prefill.push_back(p);
  }
  LoraDeltas lora;
  if (lora_add != 0) {
    TORCH_CHECK(static_cast<int64_t>(lora_tables.size()) == count * kLoraPerLayer && lora_slots.has_value(),
                "decode_layers: LoRA deltas need ", kLoraPerLayer, " tables per layer and the tokens' slots");
    TORCH_CHECK(lora_slots->scalar_type() == at::kLong && lora_slots->is_contiguous() && lora_slots->numel() == n,
                "decode_layers: one int64 LoRA slot per row");
    lora = LoraDeltas{reinterpret_cast<LoraAdd>(static_cast<intptr_t>(lora_add)), lora_tables.data(), *lora_slots,
                      lora_scales, factors_alongside};
    if (matmul_beside != 0 && lora_split != 0) {
      lora.split = reinterpret_cast<LoraSplit>(static_cast<intptr_t>(lora_split));
      lora.beside = reinterpret_cast<QuantBeside>(static_cast<intptr_t>(matmul_beside));
    }
  }
  const int64_t d_model = x.size(1);
  read_next(0, 0);
  x = x.clone(at::MemoryFormat::Contiguous);    // the residual stream, added to in place (not the caller's x)
  at::Tensor down;                   // the previous layer's output, added to x with the next norm
  for (int64_t l = 0; l < count; ++l) {
    const auto* t = layers.data() + l * kTensorsPerLayer;
    const int64_t* f = formats.data() + l * kIntsPerLayer;
    at::Tensor h = l == 0 ? rms_norm(x, *t[0], eps) : add_rms_norm_(x, down, *t[0], eps);  // [N, d]
    at::Tensor qkv = lora.project(qm, l, h, t + 2, f[0], {{0, 0, q_size}, {1, q_size, kv_size},
                                  {2, q_size + kv_size, kv_size}}, [&] { read_next(l, 1); });   // [N, q + 2 kv]
    at::Tensor q = qkv.narrow(1, 0, q_size).view({n, heads, dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({n, kv_heads, dim});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, kv_heads, dim});
    std::vector<at::Tensor> rotated = rotary(q, k, cos, sin);                            // [N, H(kv), D]
    at::Tensor out = at::empty_like(rotated[0]);                                         // [N, H, D]
    at::Tensor layer_k = k_cache[l], layer_v = v_cache[l];                               // [slots, Hkv, T, D]
    for (const PrefillSeq& p : prefill) {                       // prompt rows' keys and values into their slots
      layer_k.select(0, p.slot).narrow(1, p.start, p.length).copy_(rotated[1].narrow(0, p.offset, p.length).transpose(0, 1));
      layer_v.select(0, p.slot).narrow(1, p.start, p.length).copy_(v.narrow(0, p.offset, p.length).transpose(0, 1));
    }
    if (tokens.numel() > 0)
      decode_attention_(out, rotated[0], rotated[1], v, layer_k, layer_v, tokens, slots, positions, scale);
    for (const PrefillSeq& p : prefill) {                       // each prompt chunk attends causally
      const int64_t end = p.start + p.length;
      at::Tensor qp = rotated[0].narrow(0, p.offset, p.length).transpose(0, 1).unsqueeze(0);   // [1, H, n, D]
      at::Tensor keys = layer_k.select(0, p.slot).narrow(1, 0, end).unsqueeze(0);              // [1, Hkv, end, D]
      at::Tensor values = layer_v.select(0, p.slot).narrow(1, 0, end).unsqueeze(0);
      at::Tensor att;
      if (p.start == 0) {
        att = at::scaled_dot_product_attention(qp, keys, values, c10::nullopt, 0.0, true, c10::nullopt, true);
      } else {                                                  // a later chunk: query j sees keys up to start + j
        at::Tensor visible = at::arange(end, at::kLong).unsqueeze(0) <=
                             (at::arange(p.length, at::kLong) + p.start).unsqueeze(1);          // [n, end]
        att = at::scaled_dot_product_attention(qp, keys, values, visible, 0.0, false, c10::nullopt, true);
      }
      out.narrow(0, p.offset, p.length).copy_(att.select(0, 0).transpose(0, 1));               // [n, H, D]
    }
    at::Tensor attended = out.view({n, q_size});                                         // [N, H D]
    at::Tensor o = lora.project(qm, l, attended, t + 5, f[1], {{3, 0, d_model}}, [&] { read_next(l, 2); });  // [N, d]
    h = add_rms_norm_(x, o, *t[1], eps);                                                 // x += o; [N, d]
    at::Tensor gate_up = lora.project(qm, l, h, t + 8, f[2], {{4, 0, inter}, {5, inter, inter}},
                                      [&] { read_next(l, 3); });                         // [N, 2 I]
    at::Tensor hidden = silu_mul(gate_up.narrow(1, 0, inter), gate_up.narrow(1, inter, inter));   // [N, I]
    down = lora.project(qm, l, hidden, t + 11, f[3], {{6, 0, d_model}}, [&] { read_next(l + 1, 0); });  // [N, d]
  }
  if (count > 0) x.add_(down);
  return x;
}
