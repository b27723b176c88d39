"""Which modules an adapter config targets, by PEFT's exact rules (`check_target_module_exists`).

The rules are subtle and users rely on them: a list entry equal to the full module name matches and skips
the layer filter; other entries match as `.`-suffixes; a string is a `re.fullmatch`; the layer index is the
*first* numbered segment after a dotted prefix; `"all-linear"` expands to every Linear / Conv1D name but the
output embedding of a transformers-style model. Keep this file a faithful copy of those rules.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from torch import nn

ALL_LINEAR = "all-linear"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style `Conv1D`: a linear layer storing its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def is_excluded(config, key: str) -> bool:
    excl = getattr(config, "exclude_modules", None)
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return True
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return True
    for m in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return True
    return False


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config, key: str) -> bool:
    """True when the module named `key` (its full dotted name) is targeted by `config`."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = getattr(config, "layers_to_transform", None)
    if found and layers is not None and (not isinstance(layers, list) or len(layers) > 0):
        idx = _layer_index(key, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def expand_all_linear(config, model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> None:
    """Replace `target_modules="all-linear"` by the exact names of the model's linear layers, in place.
    `modules` is the model's (name, module) list without adapter internals; an adapter wrapper around a
    linear layer counts as linear, as in PEFT."""
    targets = config.target_modules
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return

    def linear(m: nn.Module) -> bool:
        m = getattr(m, "base_layer", m)
        return isinstance(m, nn.Linear) or is_conv1d(m)

    names = {name for name, m in modules if name and linear(m)}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out = get_out()
        for name, m in modules:
            if out is not None and m is out:
                names.discard(name)
    config.target_modules = sorted(names)


def pattern_value(patterns: dict, key: str, default):
    """PEFT's `get_pattern_key`: the first pattern `p` with `re.match(rf"(.*\\.)?({p})$", key)` wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def is_feedforward(config, key: str) -> bool:
    ff = getattr(config, "feedforward_modules", None)
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)
