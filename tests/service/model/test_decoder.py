"""Our decoder equals transformers on the same weights: Llama (tied and untied), Qwen2 (q/k/v bias),
Mistral, and the rope scalings those families use; the engine's step path (prefill chunks beside decode
tokens over the KV cache) equals the plain forward."""

import pytest
import torch
import transformers

from service.engine.kv_cache import KVCache
from service.model.config import ModelConfig
from service.model.decoder import Decoder, StepPlan, StepSequence

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)

CASES = {
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-attention-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16, rope_theta=10000.0))),
    "linear-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=10000.0))),
    "qwen2-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict()),
    "qwen2-yarn": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=10000.0))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
}


def pair(case):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf_config = config_cls(**SMALL, **extra)
    hf = model_cls(hf_config).eval()
    ours = Decoder.from_state_dict(ModelConfig.from_hf_dict(hf_config.to_dict()), hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(case):
    hf, ours = pair(case)
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama-tied", "qwen2-bias"])
def test_greedy_continuations_equal_transformers(case):
    hf, ours = pair(case)
    for seed in range(5):
        ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(seed))
        eos = hf.generation_config.eos_token_id
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 6:].tolist()
            seq = ids[0].tolist()
            for _ in range(32):
                logits = ours(torch.tensor([seq]))[0, -1]
                if eos is not None:
                    logits[eos] = float("-inf")      # what min_new_tokens does to generate
                seq.append(int(logits.argmax()))
        assert seq[6:] == ref


def test_step_path_equals_plain_forward():
    hf, ours = pair("qwen2-bias")
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(ours.config, 3, 64, torch.float32)
    with torch.no_grad():
        full = ours(ids)
        # step 1: sequence 0 prefills a first chunk of 25, sequence 1 its whole prompt, sequence 2 all but one
        plan = StepPlan([StepSequence(0, 0, 25), StepSequence(1, 0, 40), StepSequence(2, 0, 39)],
                        torch.tensor([24, 64, 103]))
        tokens = torch.cat([ids[0, :25], ids[1], ids[2, :39]])
        positions = torch.cat([torch.arange(25), torch.arange(40), torch.arange(39)])
        first = ours.lm_head(ours.forward_step(tokens, positions, plan, cache))
        # step 2: sequence 0's second chunk beside sequence 2's single (decode-shaped) token
        plan = StepPlan([StepSequence(0, 25, 15), StepSequence(2, 39, 1)], torch.tensor([14, 15]))
        second = ours.lm_head(ours.forward_step(torch.cat([ids[0, 25:], ids[2, 39:]]),
                                                torch.cat([torch.arange(25, 40), torch.tensor([39])]), plan, cache))
    torch.testing.assert_close(first[0], full[0, 24], atol=1e-5, rtol=0)
    torch.testing.assert_close(first[1], full[1, 39], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[0], full[0, 39], atol=1e-5, rtol=0)
    torch.testing.assert_close(second[1], full[2, 39], atol=1e-5, rtol=0)


def test_unsupported_rope_type_fails_at_load():
    hf = transformers.LlamaConfig(**SMALL, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
    with pytest.raises(ValueError, match="dynamic"):
        Decoder(ModelConfig.from_hf_dict(hf.to_dict()))
