// Every decoder layer of a decode-only step in one call: the sequence of direct_step.py (RMSNorm, joined q/k/v
// matmul, rotary, cache write and attention, o_proj, residual, RMSNorm, joined gate/up, SwiGLU, down_proj,
// residual) with the same kernels on the same tensors, so the result is bit-identical, without the ~40 us of
// Python and binding calls per layer (SmolLM2: 30 layers, ~1.2 ms of a ~7 ms single-sequence step). For steps
// without LoRA deltas; the stored-weight matmul comes from the quant kernel's module as a function pointer
// (`quant_matmul_entry`, an address passed as an integer: no Python object is touched
// while the GIL is released), since the two are built with different floating-point contraction flags.
#include <torch/extension.h>

#include "ops.h"

namespace {

using QuantMatmul = at::Tensor (*)(at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>,
                                   c10::optional<at::Tensor>);

constexpr int kTensorsPerLayer = 14;   // in_norm, post_norm, then (data, row_scale, bias) x qkv, o, gate_up, down
constexpr int kIntsPerLayer = 4;       // kernel format ids of qkv, o, gate_up, down

}  // namespace

// x [N, d] fp32 after every layer. `layers`: kTensorsPerLayer entries per layer (row scales and biases may be
// None); `formats`: kIntsPerLayer per layer; `shape`: q heads, kv heads, head dim, intermediate size;
// k_cache / v_cache [layers, slots, Hkv, T, D]; tokens / slots / positions as decode_attention_ takes them.
at::Tensor decode_layers(at::Tensor x, int64_t matmul, std::vector<c10::optional<at::Tensor>> layers,
                         std::vector<int64_t> formats, std::vector<int64_t> shape, double eps, at::Tensor cos,
                         at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tokens,
                         at::Tensor slots, at::Tensor positions, double scale) {
  const auto qm = reinterpret_cast<QuantMatmul>(static_cast<intptr_t>(matmul));
  TORCH_CHECK(layers.size() % kTensorsPerLayer == 0 && formats.size() * kTensorsPerLayer ==
              layers.size() * kIntsPerLayer && shape.size() == 4, "decode_layers: malformed layer tables");
  const int64_t n = x.size(0), heads = shape[0], kv_heads = shape[1], dim = shape[2], inter = shape[3];
  const int64_t q_size = heads * dim, kv_size = kv_heads * dim;
  const int64_t count = static_cast<int64_t>(layers.size()) / kTensorsPerLayer;
  TORCH_CHECK(k_cache.size(0) >= count && v_cache.size(0) >= count, "decode_layers: fewer cache layers than layers");
  for (int64_t l = 0; l < count; ++l) {
    const auto* t = layers.data() + l * kTensorsPerLayer;
    const int64_t* f = formats.data() + l * kIntsPerLayer;
    at::Tensor h = rms_norm(x, *t[0], eps);                                              // [N, d]
    at::Tensor qkv = qm(h, *t[2], f[0], t[3], t[4]);                                     // [N, q + 2 kv]
    at::Tensor q = qkv.narrow(1, 0, q_size).view({n, heads, dim});
    at::Tensor k = qkv.narrow(1, q_size, kv_size).view({n, kv_heads, dim});
    at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({n, kv_heads, dim});
    std::vector<at::Tensor> rotated = rotary(q, k, cos, sin);                            // [N, H(kv), D]
    at::Tensor out = at::empty_like(rotated[0]);                                         // [N, H, D]
    decode_attention_(out, rotated[0], rotated[1], v, k_cache[l], v_cache[l], tokens, slots, positions, scale);
    x = x + qm(out.view({n, q_size}), *t[5], f[1], t[6], t[7]);                          // [N, d]
    h = rms_norm(x, *t[1], eps);
    at::Tensor gate_up = qm(h, *t[8], f[2], t[9], t[10]);                                // [N, 2 I]
    at::Tensor hidden = silu_mul(gate_up.narrow(1, 0, inter), gate_up.narrow(1, inter, inter));   // [N, I]
    x = x + qm(hidden, *t[11], f[3], t[12], t[13]);
  }
  return x;
}
