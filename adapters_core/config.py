"""Adapter configurations: typed dataclasses that read and write PEFT's `adapter_config.json`.

`from_dict` takes the JSON as PEFT writes it, drops keys this library does not know (as PEFT drops
unknown keys), and raises `UnsupportedFeatureError` naming the feature when a field asks for behaviour
we do not implement (DoRA is implemented; PiSSA init, layer replication, target_parameters... are not),
so an adapter is never served silently wrong. `to_dict` writes the fields PEFT expects, in PEFT's shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .errors import AdapterConfigError, UnsupportedFeatureError

CONFIG_NAME = "adapter_config.json"

# Fields every PEFT config carries; they are kept and written back.
_COMMON = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
           "inference_mode")

# Init schemes that only shape the starting weights: harmless when loading trained weights.
# inits that leave the base weights as they are ("eva" zeroes B as the default does; "orthogonal" and "mica"
# start from factors whose product is zero); PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weights
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# peft_type -> its config class: every AdapterConfig subclass naming a peft_type registers itself when it is
# defined (here, and the prompt-learning kinds in prompt_config.py, which the package imports)
CONFIG_CLASSES: dict[str, type] = {}


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value == default:
        return True
    return isinstance(value, (dict, list, tuple)) and len(value) == 0 and not default


@dataclass
class AdapterConfig:
    """Fields shared by every adapter kind (PEFT's `PeftConfig`)."""

    peft_type: ClassVar[str] = ""
    # PEFT fields we know but do not implement, with the value that means "feature off".
    unsupported: ClassVar[dict[str, Any]] = {}

    task_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("peft_type"):            # a kind of its own, not an intermediate base class
            CONFIG_CLASSES[cls.peft_type] = cls

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        self.validate()

    def validate(self) -> None:
        """Raise on values that are malformed for this kind."""

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise AdapterConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        kind = data.get("peft_type", cls.peft_type)
        if cls is AdapterConfig:
            target = CONFIG_CLASSES.get(str(kind).upper()) if kind else None
            if target is None:
                raise UnsupportedFeatureError(
                    f"peft_type {kind!r} is not supported (supported: {', '.join(sorted(CONFIG_CLASSES))})")
            return target.from_dict(data)
        if kind and str(kind).upper() != cls.peft_type:
            raise AdapterConfigError(f"{cls.__name__} cannot read peft_type {kind!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, dropped = {}, []
        for key, value in data.items():
            if key == "peft_type":
                continue
            if key in cls.unsupported:
                if not _is_default(value, cls.unsupported[key]):
                    raise UnsupportedFeatureError(
                        f"{cls.peft_type} config field {key}={value!r} asks for a feature adapters_core does not "
                        f"implement")
                continue
            if key in known:
                kwargs[key] = value
            else:
                dropped.append(key)
        if dropped:
            warnings.warn(f"Ignoring unknown {cls.peft_type} config keys: {', '.join(sorted(dropped))}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise AdapterConfigError(f"bad {cls.peft_type} config: {exc}") from exc

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["peft_type"] = self.peft_type
        for key, value in self.unsupported.items():
            data.setdefault(key, value)
        for key, value in list(data.items()):
            if isinstance(value, set):
                data[key] = sorted(value)
        return data

    def save(self, directory: str) -> None:
        data = self.to_dict()
        data["inference_mode"] = True
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise AdapterConfigError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (with rsLoRA, DoRA, lora_bias, rank/alpha patterns), as PEFT's `LoraConfig`."""

    peft_type: ClassVar[str] = "LORA"
    unsupported: ClassVar[dict[str, Any]] = {
        "megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
        "loftq_config": {}, "corda_config": None, "lora_ga_config": None,
        "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
        "monteclora_config": None, "layer_replication": None, "target_parameters": None, "use_bdlora": None,
        "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False, "runtime_config": None,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    init_lora_weights: Union[bool, str] = True
    eva_config: Optional[dict] = None           # EVA's data-driven init (a trained adapter's factors are as saved)
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)

    def validate(self) -> None:
        _check_positive_int("r", self.r)
        _check_choice("bias", self.bias, ("none", "all", "lora_only"))
        if self.init_lora_weights not in _PLAIN_LORA_INITS:
            raise UnsupportedFeatureError(
                f"init_lora_weights={self.init_lora_weights!r} rewrites the base weights; adapters_core does not "
                f"implement it")
        if self.lora_bias and self.use_dora:
            raise AdapterConfigError("lora_bias cannot be combined with use_dora")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError("layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("layers_pattern requires layers_to_transform")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA checkpoints for inference: `rank_pattern` holds the bool masks written by the rank allocator."""

    peft_type: ClassVar[str] = "ADALORA"
    unsupported: ClassVar[dict[str, Any]] = dict(LoraConfig.unsupported)

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def validate(self) -> None:
        if self.use_dora:
            raise UnsupportedFeatureError("AdaLoRA does not support DoRA (use_dora=True)")
        if self.lora_bias:
            raise UnsupportedFeatureError("AdaLoRA does not support lora_bias")
        _check_positive_int("init_r", self.init_r)
        if self.total_step is None or self.total_step <= 0:
            raise AdapterConfigError("AdaLoRA requires total_step > 0, as PEFT does")
        if self.rank_pattern is not None:
            for key, mask in self.rank_pattern.items():
                if not isinstance(mask, list) or not all(isinstance(b, (bool, int)) for b in mask):
                    raise AdapterConfigError(f"AdaLoRA rank_pattern[{key!r}] must be a list of booleans")
        self.alpha_pattern = dict(self.alpha_pattern or {})


@dataclass
class IA3Config(AdapterConfig):
    """IA3: learned vectors that scale a layer's output, or its input for `feedforward_modules`."""

    peft_type: ClassVar[str] = "IA3"
    unsupported: ClassVar[dict[str, Any]] = {}

    feedforward_modules: Optional[Union[list[str], str]] = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        if isinstance(self.feedforward_modules, (list, tuple, set)):
            self.feedforward_modules = sorted(set(self.feedforward_modules))
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(tm, list) and not set(ff) <= set(tm):
            raise AdapterConfigError("IA3 feedforward_modules must be a subset of target_modules")


def config_from_dict(data: dict) -> AdapterConfig:
    """Build the config class that `data["peft_type"]` names."""
    return AdapterConfig.from_dict(data)


def load_config(path: str) -> AdapterConfig:
    """Read `adapter_config.json` from a folder (or the file itself)."""
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise AdapterConfigError(f"no {CONFIG_NAME} found at {path}")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterConfigError(f"{file} is not valid JSON: {exc}") from exc
    return config_from_dict(data)
