// Python bindings of the decoder's CPU kernels (ops.h).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention_", &decode_attention_, "write decode tokens' K/V into the cache and attend (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm as the decoder computes it, one pass per row (CPU)");
  m.def("rotary", &rotary, "rotary embedding of q and k with the decoder's roundings (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up with the decoder's roundings (CPU)");
}
