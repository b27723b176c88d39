"""Our decoder on the GPU equals transformers on the same weights and device.

fp32: logits of a plain causal pass to 1e-4 (TF32 off, as torch's default for matmuls), greedy continuations
of the engine's step path (SDPA prefill, the Triton decode attention reading the cache in place) are
transformers' greedy choices (teacher-forced, see `_gpu.assert_greedy_under`), and a step mixing a later prompt chunk with decode tokens equals the plain pass.
bf16 (what `dtype=auto` serves on a GPU): logits within bf16's rounding of transformers' bf16 logits."""
import pytest
import torch

from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.engine.kv_cache import KVCache
from service.model.decoder import StepPlan, StepSequence

from _gpu import VOCAB, assert_greedy_under, hf_llama, kernel_counts, our_decoder, triton_expected

pytestmark = pytest.mark.gpu


def ids(batch, length, seed):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fp32_logits_equal_transformers(device):
    hf = hf_llama(device)
    ours = our_decoder(hf, device)
    x = ids(3, 48, 1).to(device)
    with torch.inference_mode():
        ref, out = hf(x).logits, ours(x)
    assert out.device.type == device.type and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_bf16_logits_close_to_transformers(device):
    hf = hf_llama(device, torch.bfloat16)
    ours = our_decoder(hf_llama(device), device, torch.bfloat16)
    x = ids(2, 40, 2).to(device)
    with torch.inference_mode():
        ref, out = hf(x).logits.float(), ours(x).float()
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 0.05 * scale           # bf16 rounds each op's output to 8 bits
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_engine_greedy_is_transformers_greedy(device):
    hf = hf_llama(device)
    ours = our_decoder(hf, device)
    engine = Engine(ours, EngineConfig(max_batch_size=4, max_seq_len=160, max_batch_tokens=256, prefill_chunk=64))
    prompts = [ids(1, n, 10 + n)[0].tolist() for n in (5, 17, 90, 33)]     # 90: two prefill chunks
    with kernel_counts() as counts:
        outs = engine.generate([GenerationRequest(p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts])
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == 24
        assert_greedy_under(hf, prompt, out.token_ids, device)
    assert (counts["attention"] > 0) == triton_expected(device)


def test_step_with_prompt_chunk_beside_decode_tokens_equals_plain_pass(device):
    hf = hf_llama(device)
    ours = our_decoder(hf, device)
    x = ids(3, 40, 3).to(device)
    cache = KVCache.for_model(ours.config, 3, 64, torch.float32, device)
    with torch.inference_mode():
        full = ours(x)
        plan = StepPlan([StepSequence(0, 0, 25), StepSequence(1, 0, 39), StepSequence(2, 0, 39)],
                        torch.tensor([24, 63, 102], device=device))
        ours.forward_step(torch.cat([x[0, :25], x[1, :39], x[2, :39]]),
                          torch.cat([torch.arange(25), torch.arange(39), torch.arange(39)]).to(device), plan, cache)
        # sequence 0's second chunk (start 25: SDPA with a mask over the cache) beside two decode tokens
        plan = StepPlan([StepSequence(1, 39, 1), StepSequence(0, 25, 15), StepSequence(2, 39, 1)],
                        torch.tensor([0, 15, 16], device=device))
        hidden = ours.forward_step(torch.cat([x[1, 39:], x[0, 25:], x[2, 39:]]),
                                   torch.tensor([39, *range(25, 40), 39], device=device), plan, cache)
        step = ours.lm_head(hidden)
    torch.testing.assert_close(step, torch.stack([full[1, 39], full[0, 39], full[2, 39]]), atol=1e-4, rtol=0)
