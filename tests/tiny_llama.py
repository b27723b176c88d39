"""The tiny deterministic Llama shared by the core and compat tests (built from a config, no hub access).

initializer_range=0.1 (instead of Llama's 0.02) so logits and adapter effects are O(0.1..1): a wrong scaling
or a dropped adapter then moves the logits far beyond the 1e-5 tolerance.
"""
from __future__ import annotations

import torch
import transformers

VOCAB = 96
LLAMA_KW = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A deterministic tiny Llama in eval mode; the global RNG is left as it was."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW)).eval()
    torch.random.set_rng_state(gen_state)
    return model.to(dtype)
