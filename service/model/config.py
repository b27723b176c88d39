"""`ModelConfig`: the hyper-parameters of one Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).

Both loaders produce it: `ModelConfig.from_hf_dict` reads a Hugging Face `config.json` (the v4 layout with
`rope_theta` / `rope_scaling` and the v5 one with `rope_parameters`), the GGUF loader fills it from
llama.cpp's metadata. Anything the decoder would have to compute differently from a plain Llama block
(another activation, sliding-window attention that actually bites, partial rotary, pre-quantised weights)
raises a `ValueError` naming the feature, so an unsupported checkpoint never loads and serves wrong text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# rope_scaling["rope_type"] values passed through to the decoder, with HF's parameter names unchanged.
SUPPORTED_ROPE_TYPES = ("linear", "llama3", "yarn")    # what rope.py computes; "dynamic"/"longrope" are refused
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 32768, "qwen2": 32768}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: Optional[dict[str, Any]] = None  # HF's dict, always with "rope_type"; None = plain rope
    attention_bias: bool = False  # bias on q/k/v (and on o when o_proj_bias)
    o_proj_bias: bool = False  # Llama's attention_bias covers o_proj too; Qwen2's q/k/v bias does not
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, list[int], None] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.o_proj_bias and not self.attention_bias:
            raise ValueError("o_proj_bias without attention_bias is not a layout any supported model uses")

    @property
    def eos_token_ids(self) -> list[int]:
        """`eos_token_id` as a list (a config may give one id or several)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face `config.json` of a Llama, Mistral or Qwen2 model."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "?")
            raise ValueError(f"quantization_config ({method}) is not supported: load unquantised weights or a GGUF")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        max_positions = d.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])
        rope_theta, rope_scaling = _rope_from_hf(d)
        _check_sliding_window(model_type, d, max_positions)
        if model_type == "qwen2":
            attention_bias, o_proj_bias, mlp_bias = True, False, False
        elif model_type == "llama":
            attention_bias = o_proj_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        else:
            attention_bias = o_proj_bias = mlp_bias = False
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=mlp_bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )


def check_rope_scaling(rope_scaling: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """HF's rope-scaling dict with "rope_type" set (old files say "type"); None for plain rope."""
    if not rope_scaling:
        return None
    scaling = dict(rope_scaling)
    rope_type = scaling.setdefault("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {scaling['partial_rotary_factor']} is not supported")
    return scaling


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from either config layout; transformers v5 writes `rope_parameters`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor {d['partial_rotary_factor']} is not supported")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params.get("rope_theta", d.get("rope_theta", 10000.0))), check_rope_scaling(scaling)
    return float(d.get("rope_theta", 10000.0)), check_rope_scaling(d.get("rope_scaling"))


def _check_sliding_window(model_type: str, d: dict[str, Any], max_positions: int) -> None:
    """Sliding-window attention equals full attention only while no sequence can be longer than the window."""
    window = d.get("sliding_window")
    if window is None or max_positions <= window:
        return
    if model_type == "mistral":
        sliding = True
    elif model_type == "qwen2":
        layer_types = d.get("layer_types")
        if layer_types is not None:
            sliding = "sliding_attention" in layer_types
        else:  # transformers v4: layers from max_window_layers on slide when use_sliding_window is set
            sliding = bool(d.get("use_sliding_window")) and d.get("max_window_layers", 0) < d["num_hidden_layers"]
    else:
        sliding = False
    if sliding:
        raise ValueError(
            f"sliding_window attention ({window}) shorter than max_position_embeddings ({max_positions}) "
            "is not supported"
        )
