"""Rotary position embeddings for the Llama family, with the scaling variants their configs use.

`rope_parameters` is the config's `rope_scaling` / `rope_parameters` dict (or None): "default", "linear"
(positions divided by `factor`), "llama3" (Llama 3.1+ frequency smoothing) and "yarn" (Qwen2.5 long
context) are computed exactly as transformers' `modeling_rope_utils` does; "dynamic" and "longrope" depend
on the running sequence length and are refused with an error naming them. The cos/sin tables are built
once for every position up to `max_positions` and indexed by each token's position.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def inverse_frequencies(head_dim: int, theta: float, params: Optional[dict],
                        max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2], attention scaling) for the rope type in `params`."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params, max_position_embeddings), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, params, max_position_embeddings)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3, yarn)")


def _llama3(inv_freq: torch.Tensor, params: dict, max_pos: int) -> torch.Tensor:
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params.get("original_max_position_embeddings", max_pos)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, params: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    original = params.get("original_max_position_embeddings", max_pos)
    factor = params.get("factor") or max_pos / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


class RotaryTable:
    """cos/sin for every position (float32 maths, cast to the model dtype), indexed per token."""

    def __init__(self, head_dim: int, theta: float, params: Optional[dict], max_position_embeddings: int,
                 max_positions: int, dtype: torch.dtype, device: torch.device):
        inv_freq, scaling = inverse_frequencies(head_dim, theta, params, max_position_embeddings)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]                  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                         # [P, D]
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scaling).to(device=device, dtype=dtype)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions [..., T], shaped [..., T, 1, D]: gathered once per forward, used by every layer."""
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]):
    """q [..., T, H, D], k [..., T, Hkv, D] rotated by (cos, sin) from `RotaryTable.at`."""
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
