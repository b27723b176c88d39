// The decoder's optional C++ CPU kernels (built together into one extension by service/model/cpu_ops.py).
#pragma once
#include <ATen/ATen.h>

#include <vector>

void decode_attention_(at::Tensor out, at::Tensor q, at::Tensor k_new, at::Tensor v_new,
                       at::Tensor k_cache, at::Tensor v_cache, at::Tensor tokens, at::Tensor slots,
                       at::Tensor positions, double scale);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps);
std::vector<at::Tensor> rotary(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor gate, at::Tensor up);
std::vector<at::Tensor> row_argmax(at::Tensor logits);
at::Tensor decode_layers(at::Tensor x, int64_t matmul, int64_t read_ahead, bool factors_alongside,
                         std::vector<c10::optional<at::Tensor>> layers,
                         std::vector<int64_t> formats, std::vector<int64_t> shape, double eps, at::Tensor cos,
                         at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tokens,
                         at::Tensor slots, at::Tensor positions, double scale, int64_t lora_add,
                         std::vector<c10::optional<at::Tensor>> lora_tables, c10::optional<at::Tensor> lora_slots,
                         c10::optional<at::Tensor> lora_scales, std::vector<int64_t> prefill_seqs,
                         int64_t matmul_beside, int64_t lora_split);
