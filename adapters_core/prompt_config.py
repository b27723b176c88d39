"""Prompt-learning configs: PEFT's `PromptTuningConfig`, `PromptEncoderConfig` (P-tuning) and `PrefixTuningConfig`.

They share PEFT's `PromptLearningConfig` fields (`num_virtual_tokens`, `token_dim`,
`num_transformer_submodules`, `num_attention_heads`, `num_layers`) and read and write the JSON PEFT writes.
Only `num_virtual_tokens` and the model-shape fields matter at inference; the encoder and initialisation
fields are kept and written back because PEFT writes them. Settings this library cannot serve raise, naming
the field: a `num_transformer_submodules` other than 1 (encoder-decoder models), an encoder type PEFT does not
have, `modules_to_save`. Checks against a base model (token_dim, layers, heads) are in `prompt_learning.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from .config import AdapterConfig, _check_choice
from .errors import AdapterConfigError, UnsupportedFeatureError

# AdapterConfig fields that PEFT's prompt-learning configs do not have: never written for them.
_NOT_PEFT_FIELDS = ("target_modules", "exclude_modules", "fan_in_fan_out")
ENCODER_TYPES = ("MLP", "LSTM")


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise AdapterConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by the three prompt-learning kinds (PEFT's `PromptLearningConfig`)."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def validate(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise AdapterConfigError(f"{self.peft_type}: num_virtual_tokens must be a positive integer, got {n!r}")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            _optional_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise UnsupportedFeatureError(
                f"num_transformer_submodules={self.num_transformer_submodules} is for encoder-decoder models; "
                f"decoder-only models use 1")
        if self.modules_to_save:
            raise UnsupportedFeatureError(f"{self.peft_type} config field modules_to_save="
                                          f"{self.modules_to_save!r} is not supported for prompt learning")
        if self.target_modules is not None:
            raise AdapterConfigError(f"{self.peft_type} configs have no target_modules")

    @property
    def is_prefix(self) -> bool:
        """Prefix tuning feeds keys/values to every layer; the others feed input embeddings."""
        return False

    def to_dict(self) -> dict:
        data = super().to_dict()
        for key in _NOT_PEFT_FIELDS:
            data.pop(key, None)
        return data


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` learned input embeddings put before the prompt."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        _check_choice("prompt_tuning_init", self.prompt_tuning_init, ("RANDOM", "TEXT", "SAMPLE_VOCAB"))
        # PEFT's own checks (its config refuses these at construction, so no PEFT folder holds them)
        if self.prompt_tuning_init == "TEXT" and (not self.tokenizer_name_or_path
                                                  or self.prompt_tuning_init_text is None):
            raise AdapterConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path and "
                                     "prompt_tuning_init_text")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise AdapterConfigError("tokenizer_kwargs is only valid with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual embeddings reparameterised by an MLP or a bidirectional LSTM + MLP while training."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise UnsupportedFeatureError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not an encoder "
                f"PEFT has (one of {ENCODER_TYPES})")
        _optional_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        _optional_positive_int("encoder_num_layers", self.encoder_num_layers)
        dropout = self.encoder_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise AdapterConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values for `num_virtual_tokens` positions in every layer."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        _check_choice("init_weights", self.init_weights, (None, "zero"))
        _optional_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise AdapterConfigError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")

    @property
    def is_prefix(self) -> bool:
        return True
