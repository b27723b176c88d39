"""Prompt-learning adapters on a model: loading, saving and their virtual tokens (prompt, P- and prefix tuning).

PEFT cannot inject these into modules: they add `num_virtual_tokens` (NVT) virtual tokens before the prompt,
as input embeddings (prompt tuning, P-tuning) or as every layer's keys and values (prefix tuning). A loaded
one is a `PromptAdapter` in `model._prompt_adapters`, its config in `model.peft_config` beside the injected
kinds (so names are shared and `delete_adapter` works for all). It holds PEFT's `prompt_embeddings` tensor,
the encoder's output, in fp32 as PEFT keeps it; a checkpoint holding the encoder's weights instead (the
embedding plus P-tuning's MLP or LSTM head, or prefix tuning's projection) is run through that encoder once,
at load, in eval mode, as PEFT's `get_prompt_embedding_to_save` computes it. Shapes are checked against the
model's config (hidden size; for prefix tuning layers x 2 x kv_heads x head_dim, GQA included) so a bad
adapter fails at load, naming the field, never at serving. `virtual_embeddings` gives prompt / P-tuning rows
[NVT, hidden]; `prefix_key_values` gives prefix tuning's raw (never rotated) keys and values, each
[layers, kv_heads, NVT, head_dim], from PEFT's row layout [L0.K | L0.V | L1.K | ...], each block head-major.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import AdapterConfigError, AdapterError, AdapterWeightsError, UnknownAdapterError, UnsupportedFeatureError
from .model_tree import NAME_RE, peft_configs
from .slot_table import BASE
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig

PROMPT_KEY = "prompt_embeddings"
_ENCODER_MODULES = ("embedding", "mlp_head", "lstm_head", "transform")


@dataclass(frozen=True)
class ModelDims:
    """What a prompt-learning adapter must fit: read from a transformers-style `model.config`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelDims":
        config = getattr(model, "config", None)
        try:
            hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
            heads = int(config.num_attention_heads)
            kv = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        except (AttributeError, TypeError, ValueError) as exc:
            raise AdapterError("prompt-learning adapters need a model whose `config` has hidden_size, "
                               "num_hidden_layers and num_attention_heads") from exc
        return cls(hidden, layers, heads, kv, head_dim)

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True, eq=False)
class PromptAdapter:
    """A loaded prompt-learning adapter: its (filled-in) config and PEFT's `prompt_embeddings`."""

    config: PromptLearningConfig
    prompt_embeddings: torch.Tensor          # [NVT, hidden] or, prefix tuning, [NVT, layers * 2 * kv_heads * head_dim]
    dims: ModelDims

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    @property
    def is_prefix(self) -> bool:
        return self.config.is_prefix

    def embeddings(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if self.is_prefix:
            raise AdapterError("prefix tuning has no virtual input embeddings; use prefix_key_values")
        return self.prompt_embeddings.to(dtype or self.prompt_embeddings.dtype)      # [NVT, hidden]

    def key_values(self, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_prefix:
            raise AdapterError("prompt and P-tuning have no key/value prefix; use virtual_embeddings")
        d, nvt = self.dims, self.num_virtual_tokens
        # cast before the reshape, as PEFT's get_prompt does (an exact cast either way)
        e = self.prompt_embeddings.to(dtype or self.prompt_embeddings.dtype)
        kv = e.view(nvt, 2 * d.num_layers, d.num_kv_heads, d.head_dim).permute(1, 2, 0, 3)   # [2L, Hkv, NVT, D]
        return kv[0::2].contiguous(), kv[1::2].contiguous()                                   # [L, Hkv, NVT, D] x2


def prompt_adapters(model: nn.Module) -> dict[str, PromptAdapter]:
    adapters = model.__dict__.get("_prompt_adapters")
    if adapters is None:
        adapters = {}
        model.__dict__["_prompt_adapters"] = adapters
    return adapters


def prompt_adapter(model: nn.Module, adapter_name: str) -> PromptAdapter:
    adapter = model.__dict__.get("_prompt_adapters", {}).get(adapter_name)
    if adapter is None:
        raise UnknownAdapterError(f"no prompt-learning adapter {adapter_name!r} on the model")
    return adapter


def virtual_embeddings(model: nn.Module, adapter_name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Prompt / P-tuning: the virtual input embeddings [NVT, hidden] that go before the prompt's embeddings,
    at positions 0..NVT-1 (the prompt's tokens then start at position NVT)."""
    return prompt_adapter(model, adapter_name).embeddings(dtype)


def prefix_key_values(model: nn.Module, adapter_name: str,
                      dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix tuning: (keys, values), each [layers, kv_heads, NVT, head_dim], to put in cache slots
    0..NVT-1 of every layer as they are (no rotary embedding); the prompt's tokens start at position NVT."""
    return prompt_adapter(model, adapter_name).key_values(dtype)


def fill_config(config: PromptLearningConfig, dims: ModelDims) -> PromptLearningConfig:
    """A copy with the model-shape fields checked and filled as PEFT's `_prepare_prompt_learning_config` does."""
    config = copy.deepcopy(config)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 1
    if config.is_prefix:
        if config.num_layers not in (None, dims.num_layers):
            raise UnsupportedFeatureError(f"num_layers={config.num_layers} but the base model has "
                                          f"{dims.num_layers} layers")
        if config.token_dim not in (None, dims.kv_width):
            raise UnsupportedFeatureError(
                f"token_dim={config.token_dim} does not fit the base model: prefix tuning needs "
                f"num_key_value_heads x head_dim = {dims.num_kv_heads} x {dims.head_dim} = {dims.kv_width}")
        if config.num_attention_heads not in (None, dims.num_kv_heads):
            raise UnsupportedFeatureError(f"num_attention_heads={config.num_attention_heads} but prefix tuning "
                                          f"needs the base model's {dims.num_kv_heads} key/value heads")
        config.token_dim, config.num_attention_heads = dims.kv_width, dims.num_kv_heads
    elif config.token_dim not in (None, dims.hidden_size):
        raise UnsupportedFeatureError(f"token_dim={config.token_dim} differs from the base model's hidden size "
                                      f"{dims.hidden_size}")
    if config.num_layers is None:
        config.num_layers = dims.num_layers
    if config.token_dim is None:
        config.token_dim = dims.hidden_size
    if config.num_attention_heads is None:
        config.num_attention_heads = dims.num_kv_heads if config.is_prefix else dims.num_heads
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    return config


def _encoder_key(key: str) -> Optional[str]:
    """`...prompt_encoder.<adapter>.mlp_head.0.weight` or `mlp_head.0.weight` -> `mlp_head.0.weight`."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _ENCODER_MODULES:
            return ".".join(parts[i:])
    return None


def _build_encoder(config: PromptLearningConfig) -> nn.Module:
    """PEFT's training-mode encoder for `config` (PromptEmbedding / PromptEncoder / PrefixEncoder)."""
    nvt, td, hidden = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
    encoder = nn.Module()
    plain_prefix = isinstance(config, PrefixTuningConfig) and not config.prefix_projection
    encoder.embedding = nn.Embedding(nvt, config.num_layers * 2 * td if plain_prefix else td)
    if isinstance(config, PromptEncoderConfig) and config.encoder_reparameterization_type == "LSTM":
        encoder.lstm_head = nn.LSTM(td, hidden, num_layers=config.encoder_num_layers, bidirectional=True,
                                    batch_first=True)
        encoder.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, td))
    elif isinstance(config, PromptEncoderConfig):
        encoder.mlp_head = nn.Sequential(nn.Linear(td, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                         nn.Linear(hidden, td))
    elif isinstance(config, PrefixTuningConfig) and config.prefix_projection:
        encoder.transform = nn.Sequential(nn.Linear(td, hidden), nn.Tanh(),
                                          nn.Linear(hidden, config.num_layers * 2 * td))
    return encoder.eval()


@torch.inference_mode(False)
@torch.no_grad()
def _run_encoder(config: PromptLearningConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The virtual embeddings a training checkpoint's encoder produces (PEFT's `get_prompt_embedding_to_save`)."""
    with torch.random.fork_rng(devices=[]):     # the throwaway random init must not move the global RNG
        encoder = _build_encoder(config)
    try:
        encoder.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    except RuntimeError as exc:
        raise AdapterWeightsError(f"the prompt encoder's weights do not fit the config: {exc}") from exc
    x = encoder.embedding(torch.arange(config.num_virtual_tokens)[None])   # [1, NVT, width], one batch row as PEFT
    if hasattr(encoder, "transform"):
        return encoder.transform(x)[0]                                    # [NVT, layers * 2 * td]
    if hasattr(encoder, "lstm_head"):
        return encoder.mlp_head(encoder.lstm_head(x)[0])[0]               # [NVT, td]
    if hasattr(encoder, "mlp_head"):
        return encoder.mlp_head(x)[0]                                     # [NVT, td]
    return x[0]                                                           # prompt tuning, plain prefix


def prompt_embeddings_from(config: PromptLearningConfig, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's `prompt_embeddings` from a checkpoint: the tensor itself, or computed from encoder weights."""
    tensors = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    if PROMPT_KEY in tensors:
        extra = sorted(k for k in tensors if k != PROMPT_KEY)
        if extra:
            raise AdapterWeightsError(f"tensors that fit no part of a {config.peft_type} adapter: {extra[:3]}")
        return tensors[PROMPT_KEY].detach().float().clone()            # fp32, as PEFT keeps it
    encoder = {_encoder_key(k): v for k, v in tensors.items()}
    if not encoder or None in encoder:
        odd = sorted(k for k in tensors if _encoder_key(k) is None)
        raise AdapterWeightsError(f"the checkpoint has no {PROMPT_KEY!r} tensor" +
                                  (f"; tensors that fit no part of a {config.peft_type} adapter: {odd[:3]}"
                                   if odd else ""))
    return _run_encoder(config, encoder).detach()


def _expected_shape(config: PromptLearningConfig, dims: ModelDims) -> tuple[int, int]:
    width = dims.num_layers * 2 * dims.kv_width if config.is_prefix else dims.hidden_size
    return config.num_virtual_tokens, width


def load_prompt_adapter(model: nn.Module, adapter_name: str, config: PromptLearningConfig,
                        state_dict: dict[str, torch.Tensor]) -> None:
    """Check and add a prompt-learning adapter to `model` (nothing changes if anything is wrong)."""
    if adapter_name == BASE or not NAME_RE.match(adapter_name or ""):
        raise AdapterError(f"invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-'")
    configs = peft_configs(model)
    if adapter_name in configs:
        raise AdapterError(f"adapter {adapter_name!r} already exists; delete it first")
    if not isinstance(config, PromptLearningConfig):
        raise AdapterConfigError(f"{type(config).__name__} is not a prompt-learning config")
    dims = ModelDims.of(model)
    config = fill_config(config, dims)
    embeddings = prompt_embeddings_from(config, state_dict)
    expected = _expected_shape(config, dims)
    if tuple(embeddings.shape) != expected:
        layout = "layers x 2 x kv_heads x head_dim" if config.is_prefix else "hidden size"
        raise AdapterWeightsError(f"{PROMPT_KEY} has shape {list(embeddings.shape)} but this base model needs "
                                  f"{list(expected)} (num_virtual_tokens={config.num_virtual_tokens} by the "
                                  f"model's {layout})")
    if not bool(torch.isfinite(embeddings).all()):
        raise AdapterWeightsError(f"{PROMPT_KEY} holds non-finite values (NaN or inf)")
    config.inference_mode = True
    prompt_adapters(model)[adapter_name] = PromptAdapter(config, embeddings.contiguous(), dims)
    configs[adapter_name] = config


def remove_prompt_adapter(model: nn.Module, adapter_name: str) -> None:
    model.__dict__.get("_prompt_adapters", {}).pop(adapter_name, None)
