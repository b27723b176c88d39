"""Reading and writing PEFT adapter folders: `load_adapter` (folder or hub repo id) and `save_adapter`.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or, read only through
`torch.load(weights_only=True)`, `adapter_model.bin`). Everything is read and checked before the model is
touched, and a load that fails half way removes what it added, so the model is never left changed.
Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) inject nothing: `load_adapter` hands them to
`prompt_learning.py`, and `save_adapter` writes their one `prompt_embeddings` tensor as PEFT does.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, AdapterConfig, load_config
from .errors import AdapterConfigError, AdapterError, AdapterWeightsError
from .injection import inject_adapter_in_model, unwrap_modules_since
from .management import active_adapters, cast_adapter_dtype, delete_adapter, set_adapter
from .model_tree import peft_configs, slot_table
from .prompt_config import PromptLearningConfig
from .prompt_learning import load_prompt_adapter, prompt_adapters
from .state_dict import PEFT_PREFIX, IncompatibleKeys, get_peft_model_state_dict, set_peft_model_state_dict

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def resolve_adapter_dir(path_or_repo_id: str, revision: Optional[str] = None) -> str:
    """A local folder as is; anything else is a hub repo id fetched (or found in the cache) by huggingface_hub."""
    if os.path.isdir(path_or_repo_id):
        return path_or_repo_id
    if os.path.exists(path_or_repo_id) or path_or_repo_id.startswith(("/", "./", "../")):
        raise AdapterConfigError(f"{path_or_repo_id} is not an adapter folder")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_repo_id, revision=revision,
                                 allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME])
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available"
        raise AdapterConfigError(f"cannot find adapter {path_or_repo_id!r} locally or on the hub: {exc}") from exc


def load_pickled_tensors(path: str) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of tensors, unpickled only with `weights_only=True` (no code can run)."""
    name = os.path.basename(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise AdapterWeightsError(f"{name} cannot be loaded safely (weights_only=True): {exc}") from exc
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise AdapterWeightsError(f"{name} does not hold a dict of tensors")
    return weights


@torch.inference_mode(False)
def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterWeightsError(f"{SAFETENSORS_NAME} is unreadable or truncated: {exc}") from exc
    if os.path.isfile(bin_path):
        return load_pickled_tensors(bin_path)
    raise AdapterWeightsError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {directory}")


@torch.inference_mode(False)
def load_adapter(model: nn.Module, path_or_repo_id: str, adapter_name: str = "default",
                 revision: Optional[str] = None, low_cpu_mem_usage: bool = True, is_trainable: bool = False,
                 autocast_adapter_dtype: bool = True, config: Optional[AdapterConfig] = None,
                 state_dict: Optional[dict] = None, factor_dtype: Optional[torch.dtype] = None) -> IncompatibleKeys:
    """Load a PEFT adapter into `model` as `adapter_name` and make it the active adapter.

    Like `PeftModel`, fp16/bf16 adapter weights are upcast to fp32 unless `autocast_adapter_dtype=False`.
    `config` / `state_dict` may be given to skip reading them from disk (the serving registry does).
    `factor_dtype` (not PEFT's; a server's adapter dtype, as vLLM's `--lora-dtype`): the LoRA / AdaLoRA factor
    tensors are held in it (`set_peft_model_state_dict`), and no autocast happens then."""
    if config is None or state_dict is None:
        directory = resolve_adapter_dir(path_or_repo_id, revision)
        config = load_config(directory) if config is None else config
        state_dict = read_adapter_weights(directory) if state_dict is None else state_dict
    config.inference_mode = not is_trainable
    if isinstance(config, PromptLearningConfig):
        if is_trainable:
            raise AdapterError("prompt-learning adapters load for inference only, as in PEFT (is_trainable=True)")
        load_prompt_adapter(model, adapter_name, config, state_dict)
        return IncompatibleKeys([], [])
    previous_active = active_adapters(model)
    wrapped_before = len(slot_table(model).modules)
    inject_adapter_in_model(config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    try:
        result = set_peft_model_state_dict(model, state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                           factor_dtype=factor_dtype)
        if result.missing_keys:
            raise AdapterWeightsError(f"the checkpoint lacks tensors for {len(result.missing_keys)} adapter "
                                      f"parameter(s), e.g. {result.missing_keys[:3]}")
    except Exception:
        delete_adapter(model, adapter_name)
        unwrap_modules_since(model, wrapped_before)
        if previous_active:
            set_adapter(model, previous_active)
        raise
    if result.unexpected_keys:
        warnings.warn(f"Found keys that fit no module of the model: {result.unexpected_keys[:5]}"
                      f"{' ...' if len(result.unexpected_keys) > 5 else ''}")
    cast_adapter_dtype(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype and factor_dtype is None)
    if not is_trainable and model.training:
        model.eval()
    return result


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` in PEFT's format."""
    configs = peft_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}")
    config = configs[adapter_name]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or \
            getattr(model, "name_or_path", None)
    prefix = "" if adapter_name in prompt_adapters(model) else PEFT_PREFIX    # PEFT saves `prompt_embeddings` bare
    tensors = {prefix + k: v.detach().clone().contiguous().cpu()
               for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    config.save(directory)
