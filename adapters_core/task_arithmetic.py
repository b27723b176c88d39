"""Combining several LoRA adapters' factors into one: PEFT's task-arithmetic merges for `add_weighted_adapter`.

PEFT's `add_weighted_adapter` builds a new LoRA adapter whose A (and B) at each layer is a combination of
the source adapters' A (and B) factors, each weighted by sqrt(|weight * scaling|) (the sign on A only):
`linear` sums them (task arithmetic), `magnitude_prune` keeps each factor's `density` largest entries first,
`ties` also elects a majority sign per entry and averages the entries that agree with it (TIES-merging), and
`dare_linear` / `dare_ties` drop entries at random with probability 1 - density and rescale the rest (DARE).
The functions here do the same torch operations in the same order as `peft.utils.merge_utils` and
`LoraModel._generalized_task_arithmetic_weighted_adapter`, so the results are PEFT's bit for bit (DARE's
random drops given the same random stream: PEFT draws from torch's global generator, these from `generator`
when one is given). The new adapter has the sources' rank and scaling 1 (lora_alpha = r).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import AdapterError

# Strategies that combine A and B factor by factor (all sources need one rank); PEFT's names.
FACTOR_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """tensors [k, ...] * weights [k] broadcast over the trailing dimensions."""
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its `density` fraction of largest-magnitude entries set to zero."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float, rescale: bool,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`tensor` with each entry kept with probability `density` (divided by it when `rescale`)."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def pruned(tensor: torch.Tensor, density: float, method: str, rescale: bool = False,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if density >= 1:                  # PEFT warns and keeps everything
        return tensor
    if density < 0:
        raise AdapterError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_pruned(tensor, density)
    return randomly_pruned(tensor, density, rescale, generator)


def majority_sign_mask(tensors: torch.Tensor, method: str = "total") -> torch.Tensor:
    """[k, ...] bool: whether each entry has the sign elected by the sum (`total`) or count (`frequency`)."""
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise AdapterError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def disjoint_merge(tensors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over k of the entries the mask keeps (0 where none is kept)."""
    mixed = (tensors * mask).sum(dim=0)
    kept = mask.sum(dim=0)
    return mixed / torch.clamp(kept, min=1.0)


def combine(strategy: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: Optional[float],
            sign_method: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One merged tensor from k same-shaped tensors and their k weights, by `strategy`."""
    if strategy == "linear":
        return _weighted(torch.stack(list(tensors), dim=0), weights).sum(dim=0)
    if strategy in ("magnitude_prune", "ties"):
        kept = [pruned(t, density, "magnitude") for t in tensors]
    else:
        kept = [pruned(t, density, "random", rescale=True, generator=generator) for t in tensors]
    stacked = torch.stack(kept, dim=0)
    if strategy in ("magnitude_prune", "dare_linear"):
        return _weighted(stacked, weights).sum(dim=0)
    mask = majority_sign_mask(stacked, sign_method)                 # ties, dare_ties: elect, then average
    return disjoint_merge(_weighted(stacked, weights), mask)


def combine_factors(strategy: str, factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                    weights: Sequence[float], density: Optional[float] = None, sign_method: str = "total",
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) of the merged adapter at one layer from the sources' (A, B, scaling) there
    and their weights, as PEFT's `_generalized_task_arithmetic_weighted_adapter` computes them."""
    weights_a, weights_b = [], []
    for (_, _, scaling), weight in zip(factors, weights):
        weight_with_scaling = weight * scaling
        sign = 1 if weight_with_scaling >= 0 else -1             # on A only, so that signs do not cancel
        weights_a.append(math.sqrt(abs(weight_with_scaling)) * sign)
        weights_b.append(math.sqrt(abs(weight_with_scaling)))
    device, dtype = factors[0][0].device, factors[0][0].dtype
    merged_a = combine(strategy, [a for a, _, _ in factors], torch.tensor(weights_a).to(device), density,
                       sign_method, generator)
    merged_b = combine(strategy, [b for _, b, _ in factors], torch.tensor(weights_b).to(device), density,
                       sign_method, generator)
    return merged_a.to(dtype), merged_b.to(dtype)


def check_strategy(strategy: str, density: Optional[float], sign_method: str) -> None:
    """AdapterError naming the argument when the strategy's parameters are missing or out of range."""
    if strategy in NEEDS_DENSITY:
        if density is None or not (isinstance(density, (int, float)) and math.isfinite(density)):
            raise AdapterError(f"density: combination_type {strategy!r} needs a finite density in [0, 1]")
        if not 0 <= density <= 1:
            raise AdapterError(f"density must be in [0, 1], got {density}")
    if strategy in ("ties", "dare_ties") and sign_method not in SIGN_METHODS:
        raise AdapterError(f"majority_sign_method must be one of {SIGN_METHODS}, got {sign_method!r}")
