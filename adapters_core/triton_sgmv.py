"""Triton kernels for the mixed batch's per-token LoRA delta on CUDA: Punica's SGMV shrink and expand.

The GPU counterpart of the fused CPU kernel (`sgmv.py`): `result[t] += ((x[t] @ A[s]) * scale[t]) @ B[s]`
for every token t with its adapter slot s, read straight from the layer's stacks (`stack.LayerStack`:
A [n, in, R] scale-folded, B [n, R, out]) instead of gathering each token's rows into fresh tensors. The
batch is cut into *segments* of tokens that share a slot, exactly the `BatchMapping`'s segments
(`seg_slots` [G], `gather` [G, L] token indices, padded by repeating the segment's last token; or
segment g = tokens g*L .. g*L+L-1 without `gather`): one program takes BLOCK_M tokens of one segment,
so a prefill chunk reads its adapter's rows once per tile and multiplies them on the tensor cores
(`tl.dot`), and a decode step (segments of one token) is the BGMV case of the same kernel. Segments on
slot 0 (the base model, whose stacked rows are zeros) return at once. Shrink writes h [G*L, R] in fp32,
scaled per token, as partial sums over slices of the input features when there are few segments (a decode
step: `_split_k`); expand sums the partials in a fixed order and adds h @ B into the result in place,
accumulating in fp32 and rounding once, as the torch path's `baddbmm_` does (h is rounded to B's dtype
first, as that path's `bmm` output is).
fp32 operands multiply in full precision (`input_precision="ieee"`, no TF32). Imported only when a kernel
runs (`cuda_lora.py`): with `TRITON_INTERPRET=1` set before that, Triton's interpreter runs the same
kernels on CPU tensors, which is how the tests check them against the torch path on a machine without GPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _segment_tokens(gather_ptr, g, offs_m, seg_len, HAS_GATHER: tl.constexpr):
    """(token index, valid) of positions offs_m of segment g; padding (a repeated index) is not valid."""
    in_seg = offs_m < seg_len
    if HAS_GATHER:
        tok = tl.load(gather_ptr + g * seg_len + offs_m, mask=in_seg, other=0)
        prev = tl.load(gather_ptr + g * seg_len + offs_m - 1, mask=in_seg & (offs_m > 0), other=-1)
        valid = in_seg & (tok != prev)
    else:
        tok = (g * seg_len + offs_m).to(tl.int64)
        valid = in_seg
    return tok, valid


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, seg_slots_ptr, gather_ptr, scales_ptr, seg_len, in_features, rank,
                   split_len, split_stride, stride_xt, stride_an, stride_ak,
                   HAS_GATHER: tl.constexpr, HAS_SCALES: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    g = tl.program_id(0)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    if slot == 0:
        return
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok, valid = _segment_tokens(gather_ptr, g, offs_m, seg_len, HAS_GATHER)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    split = tl.program_id(2)                                  # this program's share of the input features
    k_end = tl.minimum(in_features, (split + 1) * split_len)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                            # [BM, R]
    for k0 in range(split * split_len, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)                 # [BM, BK]
        a = tl.load(a_ptr + slot * stride_an + offs_k[:, None] * stride_ak + offs_r[None, :],
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)                # [BK, R]
        if DOT_FP32:
            acc += tl.dot(x.to(a.dtype).to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(a.dtype), a)
    if HAS_SCALES:
        acc = acc * tl.load(scales_ptr + tok, mask=valid, other=0.0)[:, None]         # each token's scale
    h_rows = (g * seg_len + offs_m).to(tl.int64)
    tl.store(h_ptr + split * split_stride + h_rows[:, None] * BLOCK_R + offs_r[None, :], acc,
             mask=(offs_m < seg_len)[:, None])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, out_ptr, seg_slots_ptr, gather_ptr, seg_len, rank, out_features,
                   splits, split_stride, stride_bn, stride_br, stride_ot,
                   HAS_GATHER: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    g = tl.program_id(0)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    if slot == 0:
        return
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok, valid = _segment_tokens(gather_ptr, g, offs_m, seg_len, HAS_GATHER)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    h_rows = (g * seg_len + offs_m).to(tl.int64)
    h_ptrs = h_ptr + h_rows[:, None] * BLOCK_R + offs_r[None, :]
    h = tl.load(h_ptrs, mask=valid[:, None], other=0.0)                                                  # [BM, R]
    for split in range(1, splits):                        # the shrink's partial sums, in a fixed order
        h += tl.load(h_ptrs + split * split_stride, mask=valid[:, None], other=0.0)
    b = tl.load(b_ptr + slot * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :],
                mask=(offs_r < rank)[:, None] & n_mask[None, :], other=0.0)                             # [R, BN]
    if DOT_FP32:
        d = tl.dot(h.to(b.dtype).to(tl.float32), b.to(tl.float32), input_precision="ieee")             # [BM, BN]
    else:
        d = tl.dot(h.to(b.dtype), b)
    o_ptrs = out_ptr + tok[:, None] * stride_ot + offs_n[None, :]
    o_mask = valid[:, None] & n_mask[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + d).to(o.dtype), mask=o_mask)


_BLOCK_K = 64
_PROGRAMS = 528              # shrink programs worth launching: 4 per multiprocessor of an H100 / H200 (132)
_MIN_SPLIT = 4 * _BLOCK_K    # the fewest input features a program sums


def _split_k(programs: int, in_features: int, target: int = _PROGRAMS) -> tuple[int, int]:
    """(splits, features per split) for the shrink: a decode step has one program per token (64 at most),
    each summing all `in_features` in a serial loop whose load latency set its time (15 us per call measured
    on an H200 for 2,048-8,192 features), so the features are split across programs until about _PROGRAMS
    run, each summing at least _MIN_SPLIT of them; the expand adds the partial sums in a fixed order, so the
    result does not depend on timing. Batches with more programs (prompt chunks: a program per BLOCK_M
    tokens of a segment) are split less, from 528 programs on not at all."""
    splits = max(1, min(triton.cdiv(target, max(1, programs)), triton.cdiv(in_features, _MIN_SPLIT)))
    split_len = triton.cdiv(triton.cdiv(in_features, splits), _BLOCK_K) * _BLOCK_K
    return triton.cdiv(in_features, split_len), split_len


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))        # tl.dot takes dimensions of at least 16


def add_lora_(out: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              seg_slots: torch.Tensor, gather: Optional[torch.Tensor], seg_len: int,
              scales: Optional[torch.Tensor] = None, programs: int = _PROGRAMS, block_n: int = 128) -> torch.Tensor:
    """out [T, out] += each token's ((x [T, in] @ A[slot]) * scale) @ B[slot], in place. Rows of `out` and
    `x` may be strided, their features contiguous; A [n, in, R] and B [n, R, out] with contiguous last
    dimensions. Segment g holds slot seg_slots[g] [G] and tokens gather[g] [G, seg_len] (int64, padded by
    repeating its last token) or, with `gather` None, tokens g*seg_len .. g*seg_len+seg_len-1.
    `scales` [T] fp32 or None (no multiply). `programs` (shrink programs to aim for when splitting the input
    features; 0: never split) and `block_n` (output columns per expand program) are tuning knobs for
    `bench/gpu_kernels.py`; the defaults are what the service runs (128 columns: half the expand programs of
    64, each re-reading its token's partial sums; for 64 tokens on an H200, graph replays: 6.9 against 7.6 us
    a q_proj call, 11.9 against 14.8 a gate_proj call, BENCHMARKS.md "GPU")."""
    num_segments = seg_slots.numel()
    if num_segments == 0 or x.shape[0] == 0:
        return out
    in_features, rank, out_features = a_stack.shape[1], a_stack.shape[2], b_stack.shape[2]
    block_r = _block_r(rank)
    # fp32 stacks multiply in fp32 without TF32; so does every dtype under the interpreter, whose bf16 `tl.dot`
    # multiplies the raw bits (bf16 products are exact in fp32, so only the order of the sums differs)
    dot_fp32 = a_stack.dtype == torch.float32 or _INTERPRET
    block_m = 16 if seg_len <= 16 else 32 if seg_len <= 32 else 64
    m_blocks = triton.cdiv(seg_len, block_m)
    splits, split_len = _split_k(num_segments * m_blocks, in_features, programs) if programs else (1, in_features)
    rows = num_segments * seg_len
    h = torch.empty((splits, rows, block_r), dtype=torch.float32, device=x.device)    # [S, G*L, R] partial sums
    gather_arg = seg_slots if gather is None else gather          # any pointer when unused
    scales_arg = seg_slots if scales is None else scales
    _shrink_kernel[(num_segments, m_blocks, splits)](
        x, a_stack, h, seg_slots, gather_arg, scales_arg, seg_len, in_features, rank,
        split_len, rows * block_r, x.stride(0), a_stack.stride(0), a_stack.stride(1),
        HAS_GATHER=gather is not None, HAS_SCALES=scales is not None, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_K=_BLOCK_K, BLOCK_R=block_r)
    _expand_kernel[(num_segments, m_blocks, triton.cdiv(out_features, block_n))](
        h, b_stack, out, seg_slots, gather_arg, seg_len, rank, out_features,
        splits, rows * block_r, b_stack.stride(0), b_stack.stride(1), out.stride(0),
        HAS_GATHER=gather is not None, DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return out
