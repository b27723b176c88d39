"""adapters_core: a torch-only library that injects LoRA, IA3 and AdaLoRA adapters into any torch module, and
loads PEFT's prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) as virtual tokens.

Its API mirrors PEFT's functional integration API and it reads and writes PEFT's adapter format exactly;
its mixed-batch path (`mixed_batch`, `token_batch`) serves many adapters in one forward with stacked,
gathered computations instead of PEFT's per-adapter loop.
"""

from .batch import adapter_slot, mixed_batch, token_batch
from .config import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig, config_from_dict, load_config
from .group import grouped_forward
from .errors import (AdapterConfigError, AdapterError, AdapterWeightsError, ModuleConflictError, TargetNotFoundError,
                     UnknownAdapterError, UnsupportedFeatureError)
from .injection import conflicting_adapters, inject_adapter_in_model, wrap_target_layers
from .io import load_adapter, read_adapter_weights, resolve_adapter_dir, save_adapter
from .layer import AdapterLayer
from .management import (active_adapters, cast_adapter_dtype, delete_adapter, disable_adapters, enable_adapters,
                         set_adapter)
from .merging import add_weighted_adapter, merge_adapter, merge_and_unload, unload, unmerge_adapter
from .modules_to_save import ModulesToSaveWrapper
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from .prompt_learning import PromptAdapter, prefix_key_values, prompt_adapter, prompt_adapters, virtual_embeddings
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterConfigError", "AdapterError", "AdapterLayer", "AdapterWeightsError",
    "IA3Config", "LoraConfig", "ModuleConflictError", "ModulesToSaveWrapper", "TargetNotFoundError",
    "UnknownAdapterError", "conflicting_adapters",
    "PrefixTuningConfig", "PromptAdapter", "PromptEncoderConfig", "PromptLearningConfig", "PromptTuningConfig",
    "UnsupportedFeatureError", "active_adapters", "adapter_slot", "add_weighted_adapter", "cast_adapter_dtype",
    "config_from_dict", "delete_adapter", "disable_adapters", "enable_adapters", "get_peft_model_state_dict",
    "grouped_forward",
    "inject_adapter_in_model", "load_adapter", "load_config", "merge_adapter", "merge_and_unload", "mixed_batch",
    "prefix_key_values", "prompt_adapter", "prompt_adapters",
    "read_adapter_weights", "resolve_adapter_dir", "save_adapter", "set_adapter", "set_peft_model_state_dict",
    "token_batch", "unload", "unmerge_adapter", "virtual_embeddings", "wrap_target_layers",
]
