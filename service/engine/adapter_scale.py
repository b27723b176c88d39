"""A request's `adapter_scale`: which adapters it may scale, and the per-token scales of an engine step.

The scale multiplies the request's LoRA delta (x @ A @ B times PEFT's scaling times the scale), which is
PEFT's output with `scaling[adapter]` multiplied by it: 0 is the base model, 1 the adapter as trained,
negative values subtract it. It applies to LoRA (rsLoRA, a LoRA bias and LoRA on embeddings included) and
AdaLoRA adapters, and to merged adapters (LoRA by construction). It is refused, naming the field, where
that product has no meaning: IA3 (it rescales activations, there is no delta to multiply), DoRA (its
magnitude normalisation depends on the scaling, so a scaled delta is not PEFT's scaled adapter),
`modules_to_save` (whole replaced modules), prompt-learning adapters (virtual tokens) and the base model.
A step whose requests all use scale 1 builds no scale tensor, so the adapter layers do no extra work.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

MAX_ADAPTER_SCALE = 10.0          # |adapter_scale|; far beyond any useful blend of an adapter


def check_adapter_scale(model, adapter: Optional[str], scale: float) -> None:
    """ValueError naming `adapter_scale` when `adapter` (its name in the model) cannot be scaled by `scale`."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
        raise ValueError(f"adapter_scale must be a finite number in [-{MAX_ADAPTER_SCALE:g}, {MAX_ADAPTER_SCALE:g}]")
    if scale == 1.0:
        return
    if adapter in (None, "__base__"):
        raise ValueError("adapter_scale: the base model has no adapter to scale; name an adapter")
    config = getattr(model, "peft_config", {}).get(adapter)
    kind = getattr(config, "peft_type", None)
    if kind is None or kind not in ("LORA", "ADALORA"):
        what = {"IA3": "an IA3 adapter (it rescales activations; there is no delta to multiply)"}.get(
            kind, "a prompt-learning adapter (virtual tokens)")
        raise ValueError(f"adapter_scale is not supported for {what}; only LoRA and AdaLoRA adapters scale")
    if getattr(config, "use_dora", False):
        raise ValueError("adapter_scale is not supported for DoRA adapters (the magnitude normalisation depends "
                         "on the scaling, so a scaled delta is not the scaled adapter)")
    if getattr(config, "modules_to_save", None):
        raise ValueError("adapter_scale is not supported for adapters with modules_to_save (whole replaced "
                         "modules cannot be scaled)")


def step_scales(items: Sequence[tuple[float, int]]) -> Optional[torch.Tensor]:
    """[tokens] fp32 scales on the host for (scale, token count) runs in token order (`token_batch` moves
    them with the step's mapping); None when every scale is 1."""
    if all(scale == 1.0 for scale, _ in items):
        return None
    scales = torch.tensor([scale for scale, _ in items], dtype=torch.float32)
    counts = torch.tensor([count for _, count in items], dtype=torch.long)
    return scales.repeat_interleave(counts)                                # [tokens]
