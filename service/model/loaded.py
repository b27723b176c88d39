"""`LoadedModel`: everything a loader hands the decoder and the engine, whatever the checkpoint format.

The state dict uses exactly the keys of transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM`
(`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, and
`lm_head.weight` only when the embeddings are not tied), in Hugging Face's layout (GGUF's rotary row
permutation already undone), so adapters trained with PEFT on the Hugging Face model address the same
tensors. `expected_shapes` / `check_state_dict` are that contract written down; both loaders call
`check_state_dict` (and `check_vocab`) before returning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .config import ModelConfig
from .quant_formats import StoredWeight
from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: Optional[str]
    generation_config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    # weights kept in a stored format (a GGUF's blocks, or converted: see weight_format.py), by state-dict key;
    # a key is either here or in `state_dict`, never both
    stored: dict[str, StoredWeight] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key a model with this config has, and its shape."""
    c = config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, c.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, c.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, c.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (c.hidden_size, q_out)
        if c.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        if c.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        if c.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (c.intermediate_size,)
            shapes[p + "mlp.up_proj.bias"] = (c.intermediate_size,)
            shapes[p + "mlp.down_proj.bias"] = (c.hidden_size,)
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
    shapes["model.norm.weight"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return shapes


def check_state_dict(config: ModelConfig, state_dict: dict[str, Any], source: str) -> None:
    """Raise a `ValueError` naming what is missing, unexpected or misshapen in `state_dict` (whose values
    are tensors or `StoredWeight`s)."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {shapes[k]}" for k in shapes
             if k in state_dict and tuple(state_dict[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise ValueError(f"{source} does not match its config: " + " | ".join(problems))


def check_vocab(config: ModelConfig, tokenizer: Tokenizer, source: str) -> None:
    """The tokenizer must not produce ids past the embedding table (fewer is fine: padded vocabularies)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                         f"{config.vocab_size}")
