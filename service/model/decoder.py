"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) with Hugging Face's module names.

Module and parameter names are transformers' (`model.layers.N.self_attn.q_proj`, `mlp.down_proj`,
`model.norm`, `lm_head`), so a transformers state dict loads as is and adapters trained with PEFT on the
transformers model target the same modules here. Two entry points: `forward(input_ids [B, S])`, a plain
causal pass used for parity checks, and `forward_step`, the engine's: a flattened batch of new tokens from
many sequences (prefill chunks and decode tokens side by side) that reads and writes a preallocated KV
cache and returns logits only where the engine will sample.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapters_core.group import grouped_forward
from adapters_core.watched import Watched

from . import cpu_ops, cuda_ops
from .direct_step import direct_decode
from .packed_linear import LinearGroup, group_linears, pack_linears
from .quant_formats import StoredWeight
from .quant_linear import QuantEmbedding, QuantLinear, group_quant_linears, interleaved
from .rope import RotaryTable, apply_rotary, inverse_frequencies


class RMSNorm(Watched, nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) == 1 and cpu_ops.usable(x, self.weight):
            return cpu_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class StepSequence:
    """One sequence's share of a step: `length` new tokens at positions start..start+length-1, cache row `slot`."""

    slot: int
    start: int
    length: int


@dataclass
class StepPlan:
    """What `forward_step` computes: sequences in token order, and the flat token indices to return logits for."""

    sequences: list[StepSequence]
    logit_index: torch.Tensor                 # [num_outputs] indices into the flattened tokens

    def __post_init__(self) -> None:
        self.offsets = []
        offset = 0
        for seq in self.sequences:
            self.offsets.append(offset)
            offset += seq.length
        self.num_tokens = offset
        self.decode = [i for i, s in enumerate(self.sequences) if s.length == 1]
        self.prefill = [i for i, s in enumerate(self.sequences) if s.length > 1]
        self._decode_tensors: dict = {}
        self._decode_masks: dict = {}

    def decode_tensors(self, device: torch.device):
        """(token indices, cache slots, key positions, key count) of the one-token sequences, built once."""
        if device not in self._decode_tensors:
            seqs = [self.sequences[i] for i in self.decode]
            rows = torch.tensor([[self.offsets[i] for i in self.decode], [s.slot for s in seqs],
                                 [s.start for s in seqs]], dtype=torch.long, device=device)    # [3, Bd]
            max_len = max(s.start for s in seqs) + 1       # from the plan: no wait for a GPU's copy
            self._decode_tensors[device] = (rows[0], rows[1], rows[2], max_len)
        return self._decode_tensors[device]

    def decode_mask(self, device: torch.device) -> torch.Tensor:
        """The additive mask [Bd, 1, 1, L] of the one-token sequences' keys (for torch's attention only: the
        kernels read the key positions), built once."""
        if device not in self._decode_masks:
            _, _, last, max_len = self.decode_tensors(device)
            visible = torch.arange(max_len, device=device)[None, :] <= last[:, None]      # [Bd, L]
            mask = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(~visible,
                                                                                              float("-inf"))
            self._decode_masks[device] = mask[:, None, None, :]
        return self._decode_masks[device]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query token per sequence: q [Bd, H, D], keys/values [Bd, Hkv, L, D], additive mask [Bd, 1, 1, L]
    -> [Bd, H, D]. Two batched matmuls and a softmax in fp32, the query heads grouped by their KV head as
    transformers' `repeat_kv` pairs them. On the CPU this beats `scaled_dot_product_attention`, whose flash
    kernel tiles for long queries (SmolLM2, 16 decoding sequences: 39.1 -> 37.1 ms per engine step, best of
    20 A/B rounds), and is at least as exact (fp32 scores)."""
    bd, h, d = q.shape
    hkv = keys.shape[1]
    qg = q.view(bd, hkv, h // hkv, d).to(torch.float32)                         # [Bd, Hkv, G, D]
    scores = torch.matmul(qg, keys.to(torch.float32).transpose(-1, -2))         # [Bd, Hkv, G, L]
    scores = scores.mul_(d ** -0.5).add_(mask)
    out = torch.matmul(torch.softmax(scores, dim=-1), values.to(torch.float32))  # [Bd, Hkv, G, D]
    return out.view(bd, h, d).to(q.dtype)


class Attention(Watched, nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = bool(config.attention_bias)
        o_bias = bool(getattr(config, "o_proj_bias", config.attention_bias))
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.qkv_group: Optional[LinearGroup] = None           # set by `Decoder.group_projections`

    def _qkv(self, x: torch.Tensor, cos_sin):
        shape = x.shape[:-1]
        with self.qkv_group.computing(x) if self.qkv_group is not None else nullcontext():
            q, k, v = grouped_forward([self.q_proj, self.k_proj, self.v_proj], x)
        q = q.view(*shape, self.num_heads, self.head_dim)
        k = k.view(*shape, self.num_kv_heads, self.head_dim)
        v = v.view(*shape, self.num_kv_heads, self.head_dim)
        if q.dim() == 3 and q.stride(-1) == 1 and k.stride(-1) == 1 and cpu_ops.usable(q, k, *cos_sin):
            q, k = cpu_ops.rotary(q, k, *cos_sin)          # the step path: [N, H, D], one call for both
        else:
            q, k = apply_rotary(q, k, cos_sin)
        return q, k, v

    def forward(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """Plain causal attention over x [B, S, d]."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos_sin)                         # [B, S, H(kv), D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)   # [B, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def forward_step(self, x: torch.Tensor, cos_sin, plan: StepPlan, cache) -> torch.Tensor:
        """x [N, d]: new tokens of several sequences; reads/writes cache.k/v [layers, slots, Hkv, T, D]."""
        q, k, v = self._qkv(x, cos_sin)                         # [N, H, D], [N, Hkv, D]
        k_cache, v_cache = cache.k[self.layer_index], cache.v[self.layer_index]   # [slots, Hkv, T, D]
        for i in plan.prefill:
            seq, off = plan.sequences[i], plan.offsets[i]
            k_cache[seq.slot, :, seq.start:seq.start + seq.length] = k[off:off + seq.length].transpose(0, 1)
            v_cache[seq.slot, :, seq.start:seq.start + seq.length] = v[off:off + seq.length].transpose(0, 1)
        out = torch.empty_like(q)                                       # [N, H, D]
        if plan.decode:
            tokens, slots, last, max_len = plan.decode_tensors(x.device)
            if cpu_ops.usable(q, k, v, k_cache):                         # cache write and attention, one call
                cpu_ops.decode_attention_(out, q, k, v, k_cache, v_cache, tokens, slots, last, self.head_dim ** -0.5)
            else:
                k_cache[slots, :, last] = k.index_select(0, tokens)     # one write for all decode tokens
                v_cache[slots, :, last] = v.index_select(0, tokens)
                if cuda_ops.usable(q, k_cache, v_cache, out):          # CUDA: the cache read in place
                    cuda_ops.decode_attention_(out, q, k_cache, v_cache, tokens, slots, last, self.head_dim ** -0.5)
                else:
                    keys = k_cache[:, :, :max_len].index_select(0, slots)    # [Bd, Hkv, L, D]
                    values = v_cache[:, :, :max_len].index_select(0, slots)
                    att = decode_attention(q.index_select(0, tokens), keys, values,
                                           plan.decode_mask(x.device))                            # [Bd, H, D]
                    out.index_copy_(0, tokens, att)
        for i in plan.prefill:
            seq, off = plan.sequences[i], plan.offsets[i]
            end = seq.start + seq.length
            qp = q[off:off + seq.length].transpose(0, 1).unsqueeze(0)    # [1, H, n, D]
            keys = k_cache[seq.slot, :, :end].unsqueeze(0)               # [1, Hkv, start + n, D]
            values = v_cache[seq.slot, :, :end].unsqueeze(0)
            if seq.start == 0:
                att = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, enable_gqa=True)
            else:   # a later chunk of a long prompt: query j sees keys up to start + j
                visible = (torch.arange(end, device=x.device)[None, :]
                           <= seq.start + torch.arange(seq.length, device=x.device)[:, None])
                att = F.scaled_dot_product_attention(qp, keys, values, attn_mask=visible, enable_gqa=True)
            out[off:off + seq.length] = att[0].transpose(0, 1)
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(Watched, nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up_group: Optional[LinearGroup] = None       # set by `Decoder.group_projections`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.gate_up_group.computing(x) if self.gate_up_group is not None else nullcontext():
            gate, up = grouped_forward([self.gate_proj, self.up_proj], x)
        if gate.dim() == 2 and gate.stride(-1) == 1 and up.stride(-1) == 1 and cpu_ops.usable(gate, up):
            hidden = cpu_ops.silu_mul(gate, up)
        else:
            hidden = F.silu(gate) * up
        return self.down_proj(hidden)


class DecoderLayer(Watched, nn.Module):
    def __init__(self, config, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, plan: Optional[StepPlan] = None, cache=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if plan is None:
            x = x + self.self_attn(h, cos_sin)
        else:
            x = x + self.self_attn.forward_step(h, cos_sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(Watched, nn.Module):
    """transformers' `LlamaModel` part: embeddings, layers, final norm (under the attribute `model`)."""

    def __init__(self, config):
        super().__init__()
        # an explicit (uninitialised) table skips nn.Embedding's random init, whose first call imports
        # torch's compiler stack: ~1.5 s of every start-up, for values the checkpoint replaces anyway
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(Watched, nn.Module):
    """A causal LM with transformers' `LlamaForCausalLM` names; `max_positions` bounds the rotary table."""

    _unwatched = frozenset({"_rope", "_direct_plan"})    # caches of what the model is (watched.py)

    def __init__(self, config, max_positions: Optional[int] = None):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_positions = max_positions or config.max_position_embeddings
        self._rope: Optional[RotaryTable] = None
        with torch.device("cpu"):    # real (tiny) tensors even under a meta-device build: meta `pow` imports
            inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,   # torch's compiler
                                config.max_position_embeddings)  # an unsupported rope type fails here, at load

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", max_positions: Optional[int] = None,
                        pack: bool = True, stored: Optional[dict[str, StoredWeight]] = None) -> "Decoder":
        """Build from a transformers-named state dict. `pack`: on the CPU in bf16, linears use oneDNN
        prepacked weights (bit-identical, faster: see packed_linear.py). `stored`: weights kept in a stored
        format by key (`LoadedModel.stored`); their layers become `QuantLinear` / `QuantEmbedding`, which
        compute in fp32 on the CPU, so `dtype` must then be float32 and `device` the CPU."""
        stored = stored or {}
        if stored and (torch.device(device).type != "cpu" or dtype != torch.float32):
            raise ValueError("stored-format weights are served on the CPU in float32")
        with torch.device("meta"):
            model = cls(config, max_positions)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        missing = [k for k in missing if k not in stored
                   and not (k == "lm_head.weight" and config.tie_word_embeddings)]
        known = model.state_dict().keys()
        unexpected += [k for k in stored if k not in known]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model._use_stored(stored)
        if config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
            model.lm_head.weight = model.model.embed_tokens.weight
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if pack:
            pack_linears(model)
        if pack or stored:
            model.group_projections()
        return model

    def _use_stored(self, stored: dict[str, StoredWeight]) -> None:
        """Swap the layers whose weights are in `stored` for their QuantLinear / QuantEmbedding. Block formats
        the kernel reads faster interleaved are interleaved here, in `stored` too (so the rows are held once)."""
        for key in list(stored):
            weight = stored[key] = interleaved(stored[key])
            path = key[: -len(".weight")]
            parent_name, _, attr = path.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            old = getattr(parent, attr)
            if isinstance(old, nn.Embedding):
                setattr(parent, attr, QuantEmbedding(weight, old.padding_idx))
            else:
                bias = None if old.bias is None or old.bias.is_meta else old.bias
                setattr(parent, attr, QuantLinear(weight, bias))
        embed = self.model.embed_tokens
        if self.config.tie_word_embeddings and isinstance(embed, QuantEmbedding):
            self.lm_head = QuantLinear(embed.stored)          # the head reads the same stored rows

    def group_projections(self) -> None:
        """Compute q/k/v and gate/up as one matmul each where they are packed or stored (see packed_linear.py
        and quant_linear.py). Call before injecting adapters: the groups hold the plain linears, which
        adapters then wrap."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
            attn.qkv_group = group_linears(qkv) or group_quant_linears(qkv)
            mlp.gate_up_group = group_linears(gate_up) or group_quant_linears(gate_up)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def rope(self) -> RotaryTable:
        weight = self.model.norm.weight
        if self._rope is None or self._rope.cos.device != weight.device or self._rope.cos.dtype != weight.dtype:
            c = self.config
            self._rope = RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings,
                                     self.max_positions, weight.dtype, weight.device)
        return self._rope

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal LM over input_ids [B, S] with no cache; returns logits [B, S, V]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos_sin = self.rope().at(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos_sin)
        return self.lm_head(self.model.norm(x))

    def forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, plan: StepPlan, cache,
                     embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens, positions [N] (flattened over sequences) -> final hidden states [len(plan.logit_index), d]
        of the tokens the engine samples from; `lm_head(...)` of them gives the logits. The head is left to
        the caller because an adapter on `lm_head` needs a token mapping for the selected tokens only. `embeds`
        [N, d], when given, replaces the token embeddings (prompt-learning virtual tokens)."""
        cos_sin = self.rope().at(positions)
        x = self.model.embed_tokens(tokens) if embeds is None else embeds         # [N, d]
        direct = direct_decode(self, x, cos_sin, plan, cache)      # decode-only steps: the kernels in a row
        if direct is not None:
            x = direct
        else:
            for layer in self.model.layers:
                x = layer(x, cos_sin, plan, cache)
        return self.model.norm(x.index_select(0, plan.logit_index))
