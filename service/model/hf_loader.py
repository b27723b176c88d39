"""Loading a Hugging Face model folder (or hub repo id) into a `LoadedModel`.

A folder holds `config.json`, the weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`; `pytorch_model.bin` and its index only through
`torch.load(weights_only=True)`), `tokenizer.json` with `tokenizer_config.json`, optionally
`chat_template.jinja` (which wins over the template in `tokenizer_config.json`) and `generation_config.json`.
Checkpoint keys are normalised to `LlamaForCausalLM`'s (a bare `LlamaModel` save lacks the `model.` prefix,
wrapped saves carry extra ones), rotary `inv_freq` buffers are dropped, and a tied `lm_head.weight` saved
anyway is dropped too. A hub repo id goes through `huggingface_hub.snapshot_download`, cache first.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from adapters_core.io import load_pickled_tensors

from .config import ModelConfig
from .loaded import LoadedModel, check_state_dict, check_vocab
from .tokenizer import Tokenizer

_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_STEMS = ("embed_tokens", "layers", "norm")  # what follows "model." in LlamaForCausalLM's keys
_WRAPPERS = ("model", "base_model", "language_model")  # prefixes that wrap the decoder in other saves


def load_hf_folder(path: str, dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """A transformers model folder; `dtype=None` keeps the checkpoint's floating-point type."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder")
    config_dict = _read_json(path, "config.json")
    if config_dict is None:
        raise FileNotFoundError(f"no config.json in {path}")
    config = ModelConfig.from_hf_dict(config_dict)
    state_dict = normalize_keys(read_weights(path), config)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    check_state_dict(config, state_dict, path)

    generation_config = _read_json(path, "generation_config.json")
    if generation_config is None:  # transformers' GenerationConfig.from_model_config keeps the special ids
        generation_config = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                             if getattr(config, k) is not None}
    tokenizer_config = _read_json(path, "tokenizer_config.json") or {}
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"no tokenizer.json in {path} (tokenizers without one are not supported)")
    stop_ids = generation_config.get("eos_token_id")
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    tokenizer = Tokenizer.from_file(tokenizer_file, tokenizer_config, eos_token_ids=stop_ids)
    check_vocab(config, tokenizer, path)
    return LoadedModel(config=config, state_dict=state_dict, tokenizer=tokenizer,
                       chat_template=read_chat_template(path, tokenizer_config),
                       generation_config=generation_config, name=os.path.basename(os.path.normpath(path)))


def load_hub(repo_id: str, revision: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """A hub repo id, from huggingface_hub's cache or downloaded (safetensors; `.bin` only when there are none)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja"]
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["pytorch_model*.bin"])
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available"
        raise FileNotFoundError(f"cannot find model {repo_id!r} locally or on the hub: {exc}") from exc
    loaded = load_hf_folder(folder, dtype=dtype)
    loaded.name = repo_id
    return loaded


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `path`, keys as saved."""
    for index_name, loader in ((_SAFETENSORS_INDEX, _load_safetensors), (_BIN_INDEX, _load_bin)):
        index = _read_json(path, index_name)
        if index is not None:
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                tensors.update(loader(os.path.join(path, shard)))
            return tensors
    if os.path.isfile(os.path.join(path, _SAFETENSORS)):
        return _load_safetensors(os.path.join(path, _SAFETENSORS))
    if os.path.isfile(os.path.join(path, _BIN)):
        return _load_bin(os.path.join(path, _BIN))
    raise FileNotFoundError(f"no {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_BIN} or {_BIN_INDEX} in {path}")


def normalize_keys(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` keys; rotary buffers dropped, and `lm_head.weight` too when it is tied."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        parts = key.split(".")
        while len(parts) > 2 and parts[0] in _WRAPPERS and parts[1] not in ("weight", "bias"):
            parts = parts[1:]
        if parts[0] in _STEMS:
            name = "model." + ".".join(parts)
        else:
            name = ".".join(parts)  # lm_head.weight, or a stranger that check_state_dict will name
        if name in out:
            raise ValueError(f"checkpoint keys {key!r} and another both map to {name!r}")
        out[name] = tensor
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def read_chat_template(path: str, tokenizer_config: dict[str, Any]) -> Optional[str]:
    """`chat_template.jinja`, else tokenizer_config's `chat_template` (a string, or named templates), else None."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the "default" one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    if template is None:
        legacy = _read_json(path, "chat_template.json")  # what processors save
        template = legacy.get("chat_template") if legacy else None
    return template


def _read_json(path: str, name: str) -> Optional[dict[str, Any]]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _load_safetensors(file: str) -> dict[str, torch.Tensor]:
    return load_file(file, device="cpu")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return load_pickled_tensors(file)        # weights_only=True; raises a ValueError naming the file
