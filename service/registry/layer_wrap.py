"""Wrapping the model's layers ahead of the loads that need them. A plain LoRA's load is prepared in the loader
thread and attached beside the step (`adapters_core.prepared`) only when the layers it adapts are wrapped
already; the first load on a set of layers used to wrap them itself, on the engine thread at a step boundary
(20-57 ms in a start's burst of cold loads, which the other loads of the burst then waited for). The
registry now wraps the layers its stored adapters target when it reads the store at start, and those of each
new registration as it lands (vLLM replaces its LoRA-capable layers when it builds the model). A wrapper
holding no adapter computes its base layer's output, and the direct step reads through it, so steps cost the
same; wrappers stay, as they do after an adapter is deleted."""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import adapters_core as ac
from adapters_core.prepared import preparable

log = logging.getLogger("service.registry")

_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def wrap_key(config) -> Optional[tuple]:
    """What decides which layers `config` adapts, as a key shared by configs that adapt the same ones; None
    for a config whose loads take the general path anyway (anything but a plain LoRA): they wrap what they
    need."""
    if not preparable(config, "adapter"):
        return None
    return tuple(repr(getattr(config, field, None)) for field in _TARGETING)


def wrap_layers(model, configs: Iterable) -> int:
    """Engine thread (model lock held): wrap every layer the configs target; returns how many were wrapped. A
    config that cannot be matched is left to its load, which reports why."""
    wrapped = 0
    for config in configs:
        try:
            wrapped += ac.wrap_target_layers(model, config)
        except ac.AdapterError as exc:
            log.info("layers of %s not wrapped ahead of its load: %s", config.target_modules, exc)
    return wrapped
