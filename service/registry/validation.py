"""`AdapterValidator`: everything that must hold before an adapter enters the registry, checked without
touching the served model.

Rules, in the order they are checked (cheap first): the name matches `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` and
is no route word (`ROUTE_WORDS`, 422; the base model's id is the registry's 409);
config + weights are at most `max_adapter_bytes` (413); `adapter_config.json` is JSON (else 400) that
`adapters_core` accepts (supported kind and features, a causal-LM `task_type` or none, else 422); the rank
is at most `max_lora_rank`, and a prompt-learning adapter's `num_virtual_tokens` leaves room for a prompt
token and a generated one under the context limit (422); every
number in the config is finite (JSON's NaN / Infinity are refused, 422 naming the field) and
LoRA's scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, over every `alpha_pattern` / `rank_pattern`
value; AdaLoRA's `lora_alpha`) is at most `MAX_LORA_SCALING` in magnitude; the weights read as
safetensors, or as a `.bin` only through `torch.load(weights_only=True)`, so a malicious pickle is refused
and never run (422); every tensor is floating point and finite (422 naming the tensor); copies of the base
model's own weights that PEFT saves with some adapters (`base_copies.py`) equal the served ones (else 422)
and are left out; and the adapter fits the base model. The fit check loads the adapter, with the library's
own matching and shape rules, into a *meta skeleton* of the base model: a copy of its module tree whose parameters live on the meta device
(built once, in milliseconds, and cloned per check), with adapters already on the model stripped off.
That finds targets the model lacks, tensors of the wrong shape, missing tensors and tensors that fit no
module (refused rather than silently ignored) exactly as a real load would, for any model, at no memory
cost and without racing the engine; for prompt-learning adapters, a token_dim, layer count or key/value
head count that the base model does not have.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import adapters_core as ac
from adapters_core.config import CONFIG_NAME
from adapters_core.io import BIN_NAME, SAFETENSORS_NAME
from adapters_core.packing import tensor_bytes
from service.json_nesting import TooDeep, check_depth

from .base_copies import check_base_copies, serving_config, split_base_copies
from .errors import Invalid, TooLarge

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Largest |scaling| a LoRA may apply to its B·A product. Trained adapters use about 0.1-100 (alpha 16-256
# over r 1-64); 1e4 leaves room for odd but real choices while a scaling such as -1e308 / 8 is refused.
MAX_LORA_SCALING = 1e4
MAX_CONFIG_INT = 2**63                  # a larger JSON integer is no count or size any config field holds
# PEFT task types whose adapters act on a causal LM's own head (feature extraction: the hidden states it feeds);
# a classification, token-classification, question-answering or encoder-decoder adapter was trained for another
# head or model (PEFT's SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM)
SERVED_TASKS = ("CAUSAL_LM", "FEATURE_EXTRACTION")
_MODEL_ATTRS = ("peft_config", "_adapter_slots", "_active_adapters", "_prompt_adapters")   # adapters_core state


# The first path segments of the service's routes: an adapter named so could be confused with a route by a
# gateway that routes on names, by the console or by a person reading logs (compared case-insensitively).
ROUTE_WORDS = frozenset({"admin", "v1", "generate", "generate_stream", "health", "ready", "metrics", "docs",
                         "redoc", "openapi.json", "console"})


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise Invalid(f"invalid adapter name {_clip(repr(name), 80)}: use 1-64 letters, digits, '.', '_' or '-', "
                      f"starting with a letter or digit")
    if name.casefold() in ROUTE_WORDS:
        raise Invalid(f"adapter name {name!r} is reserved: it is one of the service's routes "
                      f"({', '.join(sorted(ROUTE_WORDS))})")


def parse_config(raw: bytes) -> ac.AdapterConfig:
    """`adapter_config.json` bytes -> config: valid JSON (400), finite numbers, a kind and features
    `adapters_core` supports and a bounded LoRA scaling (422)."""
    try:
        check_depth(raw)
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Invalid(f"{CONFIG_NAME} is not valid JSON: {exc}", status=400) from exc
    except TooDeep as exc:                 # (measured first: the parser never recurses near its limit)
        raise Invalid(f"{CONFIG_NAME} is nested too deeply to be an adapter config: {exc}", status=400) from None
    check_numbers(data)
    task = data.get("task_type") if isinstance(data, dict) else None
    if task is not None and task not in SERVED_TASKS:
        raise Invalid(f"{CONFIG_NAME}: task_type {_clip(repr(task), 60)} is not served here: this server generates "
                      f"text with the base model's own head (task types {', '.join(map(repr, SERVED_TASKS))}, or none)")
    try:
        config = ac.config_from_dict(data)
    except ac.AdapterError as exc:
        raise Invalid(f"{CONFIG_NAME}: {exc}") from exc
    check_scaling(config)
    return config


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _field(path: tuple) -> str:
    """A JSON path for messages: `alpha_pattern['q_proj']`, `layers_to_transform[2]` (clipped)."""
    return _clip("".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if re.fullmatch(r"\w+", p) else
                                                               f"[{p!r}]") for p in path).lstrip("."))


def check_numbers(data) -> None:
    """Every number in the parsed JSON is finite and every integer in a 64-bit range (422 naming the field).
    Python's JSON parser takes NaN, Infinity and -Infinity, which no adapter config needs."""
    stack = [((), data)]
    while stack:                                   # iterative: the depth is the parser's, not ours
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((path + (str(k),), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"{CONFIG_NAME}: {_field(path)} is {value}; every number in the config must be finite")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
            raise Invalid(f"{CONFIG_NAME}: {_field(path)} is out of range (at most 2**63 in magnitude)")


def check_scaling(config: ac.AdapterConfig) -> None:
    """|scaling| <= MAX_LORA_SCALING for the worst pair of alpha (lora_alpha, alpha_pattern) and rank (r,
    rank_pattern; AdaLoRA divides by its kept rank, at least 1). IA3 has no scaling."""
    if not isinstance(config, ac.LoraConfig):
        return
    alphas = {"lora_alpha": config.lora_alpha}
    alphas.update({_field(("alpha_pattern", str(k))): v for k, v in (config.alpha_pattern or {}).items()})
    ranks = {"r": config.r}
    if not isinstance(config, ac.AdaLoraConfig):
        ranks.update({_field(("rank_pattern", str(k))): v for k, v in (config.rank_pattern or {}).items()})
    try:
        alpha_name, alpha = max(((n, float(a)) for n, a in alphas.items()), key=lambda x: abs(x[1]))
        rank_name, rank = (("AdaLoRA's smallest kept rank", 1.0) if isinstance(config, ac.AdaLoraConfig) else
                           min(((n, float(r)) for n, r in ranks.items()), key=lambda x: x[1]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise Invalid(f"{CONFIG_NAME}: lora_alpha, r and the alpha/rank patterns must be numbers ({exc})") from exc
    if not rank > 0:
        raise Invalid(f"{CONFIG_NAME}: {rank_name} is {rank:g}; ranks must be positive")
    scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    if not abs(scaling) <= MAX_LORA_SCALING:
        raise Invalid(f"{CONFIG_NAME}: {alpha_name}={alpha:g} over {rank_name}={rank:g} gives a LoRA scaling of "
                      f"{scaling:g}; its magnitude must be at most {MAX_LORA_SCALING:g}")


def check_tensors(tensors: dict[str, torch.Tensor], weights_name: str) -> None:
    """Every tensor floating point and finite (422 naming the first tensor at fault). Tensors that are views
    of one buffer (`pack_adapter_tensors`'s output, which covers its buffers exactly) are checked with one
    pass over each buffer, and only a buffer that fails is searched tensor by tensor."""
    bases = {}
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise Invalid(f"{weights_name}: adapter tensors must be floating point; {key!r} is {value.dtype}")
        base = value if value._base is None else value._base
        bases.setdefault(id(base), (base, []))[1].append(key)
    for base, keys in bases.values():
        if len(keys) > 1 and _sum_is_finite(base):
            continue                      # the whole buffer is finite, so is every view of it
        _check_finite(tensors, keys, weights_name)


def _sum_is_finite(value: torch.Tensor) -> bool:
    """True proves every value finite: a NaN or an inf makes the sum NaN or inf, while finite values give a
    finite fp32 sum unless it overflows (False then, and the exact search decides). One read without a
    temporary: `isfinite(x).all()` writes a bool per value and took 55-78 ms for a 44 MB adapter where this
    takes 2-7 ms (2 cores, from the loader thread)."""
    return bool(torch.isfinite(value.sum(dtype=torch.float32)))


def _check_finite(tensors: dict[str, torch.Tensor], keys: list[str], weights_name: str) -> None:
    for key in keys:
        value = tensors[key]
        if _sum_is_finite(value):
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            raise Invalid(f"{weights_name}: tensor {key!r} holds {int((~finite).sum())} non-finite values "
                          f"(NaN or inf) of {value.numel()}")


@dataclass
class AdapterSummary:
    """What the admin API shows about a config."""

    kind: str
    rank: Optional[int]
    alpha: Optional[float]
    targets: list[str]
    virtual_tokens: Optional[int] = None        # prompt learning: virtual tokens before every prompt

    @classmethod
    def of(cls, config: ac.AdapterConfig) -> "AdapterSummary":
        """Rank is the largest any module gets: LoRA's `r` or a `rank_pattern` value, AdaLoRA's `init_r`."""
        if isinstance(config, ac.PromptLearningConfig):
            return cls(config.peft_type, None, None, [], config.num_virtual_tokens)
        targets = config.target_modules
        if targets is not None and not isinstance(targets, str) and not (
                isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) for t in targets)):
            raise Invalid(f"{CONFIG_NAME}: target_modules must be a module name, a regex or a list of names, "
                          f"not {targets!r}")
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        try:
            if isinstance(config, ac.AdaLoraConfig):
                masks = (config.rank_pattern or {}).values()
                rank = max([int(config.init_r)] + [int(sum(bool(b) for b in m)) for m in masks])
                return cls(config.peft_type, rank, float(config.lora_alpha), targets)
            if isinstance(config, ac.LoraConfig):
                rank = max([int(config.r)] + [int(r) for r in (config.rank_pattern or {}).values()])
                return cls(config.peft_type, rank, float(config.lora_alpha), targets)
        except (TypeError, ValueError) as exc:
            raise Invalid(f"{CONFIG_NAME}: rank and alpha values must be numbers ({exc})") from exc
        return cls(config.peft_type, None, None, targets)


@dataclass
class ValidatedAdapter:
    config: ac.AdapterConfig
    tensors: dict[str, torch.Tensor]
    summary: AdapterSummary
    weights_name: str                           # the file the tensors came from (safetensors or bin)
    base_copy_bytes: int = 0                    # the file's copies of base weights, left out of `tensors`


def meta_skeleton(model: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """A copy of `model`'s module tree with every parameter and buffer on the meta device and no adapters.

    Modules are shallow-copied (so their class, sizes and config stay), with fresh parameter, buffer and
    child dicts; adapter wrappers are replaced by the module they wrap; tied parameters stay tied."""
    memo = {} if memo is None else memo
    if isinstance(model, ac.AdapterLayer):
        model = model.base_layer
    elif isinstance(model, ac.ModulesToSaveWrapper):
        model = model.original_module
    if id(model) in memo:
        return memo[id(model)]
    clone = copy.copy(model)
    memo[id(model)] = clone
    for key, value in list(clone.__dict__.items()):
        if key in _MODEL_ATTRS or isinstance(value, torch.Tensor):
            del clone.__dict__[key]           # adapters_core state, caches such as prepacked weights

    def meta(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
        return memo[id(t)]

    clone._parameters = {k: meta(v) for k, v in model._parameters.items()}
    clone._buffers = {k: meta(v) for k, v in model._buffers.items()}
    clone._modules = {k: (meta_skeleton(c, memo) if c is not None else None) for k, c in model._modules.items()}
    return clone


class AdapterValidator:
    def __init__(self, model: nn.Module, max_lora_rank: int = 64, max_adapter_bytes: int = 512 * 2**20):
        self.max_lora_rank = max_lora_rank
        self.max_adapter_bytes = max_adapter_bytes
        self._skeleton = meta_skeleton(model)
        self._model = model                    # read only: the base weights an adapter's copies must equal

    def check_size(self, size: int) -> None:
        if size > self.max_adapter_bytes:
            raise TooLarge(f"the adapter is {size} bytes; the limit is {self.max_adapter_bytes} "
                           f"(max_adapter_bytes)")

    def check_rank(self, summary: AdapterSummary) -> None:
        if summary.rank is not None and summary.rank > self.max_lora_rank:
            raise Invalid(f"rank {summary.rank} is above the limit max_lora_rank={self.max_lora_rank}")

    def check_virtual_tokens(self, summary: AdapterSummary) -> None:
        """A prompt-learning adapter must leave room for a prompt token and a generated one within the served
        context (`max_positions`, which the app sets to `max_seq_len`)."""
        limit = getattr(self._skeleton, "max_positions", None)
        if summary.virtual_tokens is not None and isinstance(limit, int) and summary.virtual_tokens > limit - 2:
            raise Invalid(f"{CONFIG_NAME}: num_virtual_tokens={summary.virtual_tokens} leaves no room for a prompt "
                          f"token and a generated one: the context limit (max_seq_len) is {limit} tokens")

    def validate(self, folder: str) -> ValidatedAdapter:
        """Check the PEFT folder `folder` (config + one weights file); raise RegistryError naming the fault."""
        config_path = os.path.join(folder, CONFIG_NAME)
        weights_name = next((n for n in (SAFETENSORS_NAME, BIN_NAME) if os.path.isfile(os.path.join(folder, n))),
                            None)
        if not os.path.isfile(config_path):
            raise Invalid(f"the adapter has no {CONFIG_NAME}")
        if weights_name is None:
            raise Invalid(f"the adapter has no {SAFETENSORS_NAME} (or {BIN_NAME})")
        self.check_size(os.path.getsize(config_path) + os.path.getsize(os.path.join(folder, weights_name)))
        with open(config_path, "rb") as fh:
            config = parse_config(fh.read())
        summary = AdapterSummary.of(config)
        self.check_rank(summary)
        self.check_virtual_tokens(summary)
        try:
            tensors = ac.read_adapter_weights(folder)
        except ac.AdapterError as exc:
            raise Invalid(str(exc)) from exc
        if not tensors:
            raise Invalid(f"{weights_name} holds no tensors")
        check_tensors(tensors, weights_name)
        tensors, copies = split_base_copies(config, tensors)
        check_base_copies(self._model, copies, weights_name)       # equal to the served base's: left out
        config = serving_config(config)
        if not tensors:
            raise Invalid(f"{weights_name} holds no tensors of the adapter's own (only copies of base weights)")
        self.check_fit(config, tensors)
        return ValidatedAdapter(config, tensors, summary, weights_name, tensor_bytes(copies))

    def check_fit(self, config: ac.AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Load into a fresh meta skeleton: the library's own target and shape checks, no real memory."""
        skeleton = meta_skeleton(self._skeleton)
        try:
            result = ac.load_adapter(skeleton, "", adapter_name="candidate", config=copy.deepcopy(config),
                                     state_dict=tensors, low_cpu_mem_usage=True, autocast_adapter_dtype=False)
        except (ac.AdapterError, ValueError, TypeError, RuntimeError, KeyError) as exc:
            raise Invalid(f"the adapter does not fit the base model: {exc}") from exc
        if result.unexpected_keys:
            keys = result.unexpected_keys
            raise Invalid(f"the adapter does not fit the base model: {len(keys)} tensor(s) fit no module of it, "
                          f"e.g. {keys[:3]}")
