"""Decode attention on CUDA in Triton: one query token per sequence, its keys and values read in place from
the KV cache.

The torch path of `decoder.Attention.forward_step` gathers every decoding sequence's cache rows up to the
longest length into fresh tensors (`index_select` over [Bd, Hkv, L, D]) before two matmuls; here each
program takes one sequence and one KV head, reads that slot's keys and values straight from
`cache[slot, kv_head, :length]` in blocks of BLOCK_N positions, and keeps an online softmax (running max and
sum, fp32) for the query heads that share the KV head (grouped-query attention: GROUP heads padded to 16
rows for `tl.dot`). With a bf16 / fp16 cache the scores' products run on the tensor cores in the cache's
dtype (the query rounded to it; products exact, sums fp32) and the probabilities are rounded to it before
the weighted sum, as flash attention (the prompt chunks' SDPA) does: 7.5x faster than fp32 products on an
H200 (57.7 -> 7.7 us a call for 64 sequences of 192 positions, replayed from a CUDA graph; BENCHMARKS.md
"GPU"). An fp32 cache, or `precise=True`, keeps fp32 products (`input_precision="ieee"`, no TF32), as the
torch reference `decoder.decode_attention` computes them; only the order of the sums differs. Imported only
when it runs (`cuda_ops.py`); under `TRITON_INTERPRET=1` Triton's interpreter runs it on CPU tensors, which
is how the tests check it on a machine without GPU. It does not split a long sequence across programs
(flash-decoding's split-K): a step runs Bd x Hkv programs, enough to fill the GPU at serving batch sizes,
not for one very long sequence.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tokens_ptr, slots_ptr, last_ptr, scale, head_dim,
                             stride_qt, stride_qh, stride_ks, stride_kh, stride_kt,
                             stride_vs, stride_vh, stride_vt, stride_ot, stride_oh,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISE: tl.constexpr, EMULATE: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    tok = tl.load(tokens_ptr + b).to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    length = tl.load(last_ptr + b).to(tl.int32) + 1          # positions 0..last, the new token's included
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)            # [G, D]
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)                                   # [G, D]
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
    for n0 in range(0, length, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < length
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + pos[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)      # [N, D]
        v = tl.load(v_base + pos[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)      # [N, D]
        if PRECISE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale                  # [G, N]
        elif EMULATE:          # the interpreter's bf16 dot is wrong: the same exact products in fp32
            s = tl.dot(q.to(k.dtype).to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:                  # the cache's dtype on the tensor cores: exact products, fp32 sums
            s = tl.dot(q.to(k.dtype), tl.trans(k)) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])                                                                   # [G, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PRECISE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif EMULATE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:                  # the probabilities rounded to the cache's dtype, as flash attention does
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def decode_attention_(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tokens: torch.Tensor, slots: torch.Tensor, last: torch.Tensor, scale: float,
                      block_n: int = 64, num_warps: int = 4, precise: bool = False) -> None:
    """out[tokens[b]] [H, D] = attention of q[tokens[b]] [H, D] over positions 0..last[b] of cache slot
    slots[b] (k_cache / v_cache [slots, Hkv, T, D], already holding the new token's key and value), for
    every decoding sequence b. q and out are [N, H, D]; every last dimension contiguous. `block_n`,
    `num_warps` and `precise` (True: fp32 products for a bf16 / fp16 cache too) are tuning knobs for
    `bench/gpu_kernels.py`; the defaults are what the service runs."""
    num_seqs = tokens.numel()
    if num_seqs == 0:
        return
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    _decode_attention_kernel[(num_seqs, kv_heads)](
        q, k_cache, v_cache, out, tokens, slots, last, scale, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISE=precise or k_cache.dtype == torch.float32,
        EMULATE=_INTERPRET, num_warps=num_warps)
