"""The C++ decode attention (`service/model/csrc/decode_attention.cpp`) writes the same cache entries and
computes the same attention as the torch path it replaces (to fp32 rounding; bf16 outputs to one ulp), for
strided new keys/values, grouped KV heads and sequences of different lengths; it refuses inconsistent
input; and the decoder's step path uses it with the same logits as without it. Under CI the kernel must
build (a compiler is there); elsewhere its absence skips these tests."""
import os

import pytest
import torch

from service.engine.kv_cache import KVCache
from service.model import attention_kernel
from service.model.config import ModelConfig
from service.model.decoder import Decoder, StepPlan, StepSequence, decode_attention

if attention_kernel.kernel() is None:
    if os.environ.get("CI"):
        raise RuntimeError("the C++ decode attention did not build under CI (see the logged warning)")
    pytest.skip("the C++ decode attention is unavailable here (no compiler or ninja)", allow_module_level=True)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, heads, kv_heads, dim, slots, max_len = 20, 9, 3, 64, 12, 80
    q = torch.randn(n, heads, dim, generator=g).to(dtype)
    packed = torch.randn(n, 2 * kv_heads * dim + 7, generator=g).to(dtype)    # k and v as strided views
    k = packed[:, :kv_heads * dim].view(n, kv_heads, dim)
    v = packed[:, kv_heads * dim:2 * kv_heads * dim].view(n, kv_heads, dim)
    k_cache = torch.randn(slots, kv_heads, max_len, dim, generator=g).to(dtype)
    v_cache = torch.randn(slots, kv_heads, max_len, dim, generator=g).to(dtype)
    tokens = torch.tensor([0, 3, 5, 6, 7, 11, 19])
    cache_slots = torch.tensor([4, 0, 11, 2, 7, 5, 9])
    positions = torch.tensor([0, 5, 79, 33, 1, 60, 10])
    return q, k, v, k_cache, v_cache, tokens, cache_slots, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_path(dtype):
    q, k, v, k_cache, v_cache, tokens, slots, positions = _inputs(dtype)
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out1, out2 = torch.zeros_like(q), torch.zeros_like(q)
    attention_kernel.decode_attention_(out1, q, k, v, kc1, vc1, tokens, slots, positions, 64 ** -0.5)

    kc2[slots, :, positions] = k.index_select(0, tokens)
    vc2[slots, :, positions] = v.index_select(0, tokens)
    length = int(positions.max()) + 1
    visible = torch.arange(length)[None, :] <= positions[:, None]
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    att = decode_attention(q.index_select(0, tokens), kc2[:, :, :length].index_select(0, slots),
                           vc2[:, :, :length].index_select(0, slots), mask)
    out2.index_copy_(0, tokens, att)

    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    untouched = torch.ones(q.shape[0], dtype=torch.bool)
    untouched[tokens] = False
    assert torch.equal(out1[untouched], torch.zeros_like(out1[untouched]))
    if dtype == torch.float32:
        torch.testing.assert_close(out1, out2, atol=2e-6, rtol=0)
    else:   # fp32 sums in another order: at most one bf16 ulp apart, and almost never
        ulp = out2.float().abs().clamp_min(2.0 ** -126) * 2.0 ** -7
        assert ((out1.float() - out2.float()).abs() <= ulp).all()
        assert (out1 != out2).float().mean() < 0.01
    assert out1[tokens].abs().amax() > 0


def test_kernel_refuses_inconsistent_input():
    q, k, v, k_cache, v_cache, tokens, slots, positions = _inputs(torch.float32)
    out = torch.zeros_like(q)
    with pytest.raises(RuntimeError, match="share a cache slot"):
        attention_kernel.decode_attention_(out, q, k, v, k_cache, v_cache, tokens[:2], torch.tensor([1, 1]),
                                           positions[:2], 0.125)
    with pytest.raises(RuntimeError, match="out of range"):
        attention_kernel.decode_attention_(out, q, k, v, k_cache, v_cache, tokens[:1], slots[:1],
                                           torch.tensor([80]), 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        attention_kernel.decode_attention_(out, q, k, v, k_cache.bfloat16(), v_cache, tokens, slots, positions, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_step_uses_kernel_with_same_logits(monkeypatch, dtype):
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    weights = {k: torch.randn(v.shape) * 0.3 for k, v in Decoder(config).state_dict().items()}
    model = Decoder.from_state_dict(config, weights, dtype=dtype)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))

    def run():
        cache = KVCache.for_model(config, 3, 32, dtype)
        plan = StepPlan([StepSequence(i, 0, 11) for i in range(3)], torch.tensor([10, 21, 32]))
        with torch.inference_mode():
            model.forward_step(ids[:, :11].flatten(), torch.arange(11).repeat(3), plan, cache)
            plan = StepPlan([StepSequence(2, 11, 1), StepSequence(0, 11, 1), StepSequence(1, 11, 1)],
                            torch.tensor([0, 1, 2]))
            return model.lm_head(model.forward_step(ids[[2, 0, 1], 11], torch.full((3,), 11), plan, cache))

    calls = []
    native = attention_kernel.decode_attention_
    monkeypatch.setattr(attention_kernel, "decode_attention_", lambda *a: calls.append(1) or native(*a))
    with_kernel = run()
    assert len(calls) == config.num_hidden_layers
    monkeypatch.setattr(attention_kernel, "kernel", lambda: None)
    without = run()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(with_kernel, without, atol=tol, rtol=tol)
