"""The per-request sampler's vLLM / OpenAI features against references (transformers' logits processors where
one exists), and in the engine's batch: each request's features apply to it alone, and a request using none
keeps the engine's batched greedy path and its tokens."""
import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from _tiny import HF_KW, prompt, tiny_decoder
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from service.engine.sampling import RequestSampler

V = HF_KW["vocab_size"]


def logits(seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture(scope="module")
def model():
    return tiny_decoder()


def test_repetition_penalty_is_transformers_over_prompt_and_generated_tokens():
    ids = [3, 7, 7, 11, 50]
    for penalty in (0.7, 1.3, 2.0):
        sampler = RequestSampler(SamplingParams(temperature=0, repetition_penalty=penalty), V, ids)
        raw = logits(1)
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), raw[None].clone())[0]
        assert torch.allclose(sampler.processed(raw), expected)
        token, _, _ = sampler.sample(raw)
        assert sampler.seen[token] and sampler.seen[ids].all() and int(sampler.seen.sum()) == len(set(ids + [token]))


def test_tgi_frequency_penalty_is_each_tokens_share_of_prompt_and_generated_tokens():
    """TGI's and LoRAX's `HeterogeneousFrequencyPenaltyLogitsProcessor`: scores -= penalty * count / length, the
    counts and the length over the prompt and the tokens generated so far (one request, no padding)."""
    ids, penalty = [3, 7, 7, 11], 1.5
    sampler = RequestSampler(SamplingParams(temperature=0, frequency_penalty=penalty, frequency_over_context=True),
                             V, ids)
    seen = list(ids)
    for step in range(3):
        raw = logits(10 + step)
        counts = torch.bincount(torch.tensor(seen), minlength=V).float()
        assert torch.allclose(sampler.processed(raw), raw - penalty * counts / len(seen))
        token, _, _ = sampler.sample(raw)
        seen.append(token)
    openai = RequestSampler(SamplingParams(temperature=0, frequency_penalty=penalty), V, ids)     # generated only
    raw = logits(20)
    assert torch.equal(openai.processed(raw), raw)


def test_logit_bias_adds_to_its_tokens_only():
    sampler = RequestSampler(SamplingParams(temperature=0, logit_bias={5: 100.0, 9: -100.0}), V)
    raw = logits(2)
    out = sampler.processed(raw)
    assert out[5] == raw[5] + 100 and out[9] == raw[9] - 100
    assert torch.equal(out[[i for i in range(V) if i not in (5, 9)]], raw[[i for i in range(V) if i not in (5, 9)]])
    assert sampler.sample(raw)[0] == 5


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    raw = logits(3)
    raw[4] = raw[6] = 50.0                              # the EOS and a stop token are the likeliest by far
    sampler = RequestSampler(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]), V, eos_token_ids=[4])
    assert not sampler.plain_greedy
    assert all(sampler.sample(raw)[0] not in (4, 6) for _ in range(2))
    assert sampler.plain_greedy and sampler.sample(raw)[0] in (4, 6)
    kept = RequestSampler(SamplingParams(temperature=0, min_tokens=1, ignore_eos=True), V, eos_token_ids=[4])
    assert kept.sample(raw)[0] in (4, 6)              # ignore_eos: EOS is not masked, nothing else to mask


def test_min_tokens_picks_the_best_other_token():
    raw = logits(4)
    raw[4] = 50.0
    sampler = RequestSampler(SamplingParams(temperature=0, min_tokens=1), V, eos_token_ids=[4])
    masked = raw.clone()
    masked[4] = -math.inf
    assert sampler.sample(raw)[0] == int(torch.argmax(masked))


def test_top_logprobs_are_the_raw_distributions_most_likely_tokens():
    raw = logits(5)
    sampler = RequestSampler(SamplingParams(temperature=1.0, seed=1, logprobs=True, top_logprobs=4,
                                            logit_bias={0: 5.0}), V)
    token, logprob, top = sampler.sample(raw)
    reference = torch.log_softmax(raw, -1)
    values, ids = torch.topk(reference, 4)
    assert [t for t, _ in top] == ids.tolist()
    assert [lp for _, lp in top] == pytest.approx(values.tolist())
    assert logprob == pytest.approx(float(reference[token]))
    assert RequestSampler(SamplingParams(logprobs=True), V).sample(raw)[2] is None


def test_min_p_keeps_tokens_within_the_ratio_of_the_best():
    raw = torch.full((V,), -10.0)
    raw[:3] = torch.tensor([5.0, 4.5, 0.0])
    sampler = RequestSampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0), V)
    assert {sampler.sample(raw)[0] for _ in range(50)} == {0, 1}


def test_plain_greedy_only_without_features():
    assert RequestSampler(SamplingParams(temperature=0), V).plain_greedy
    for extra in ({"repetition_penalty": 1.1}, {"logit_bias": {1: 1.0}}, {"min_tokens": 1}, {"logprobs": True},
                  {"presence_penalty": 0.5}):
        assert not RequestSampler(SamplingParams(temperature=0, **extra), V, eos_token_ids=[1]).plain_greedy, extra


@pytest.mark.parametrize("params,field", [
    (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    (SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
    (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs"),
    (SamplingParams(logit_bias={1: 101.0}), "logit_bias"),
    (SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
    (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    (SamplingParams(min_p=1.5), "min_p"),
])
def test_bad_settings_name_their_field(params, field):
    with pytest.raises(ValueError, match=field):
        params.validate(V)


def test_features_apply_per_request_in_a_shared_batch(model):
    """Requests with logit_bias, repetition penalty, min_tokens and logprobs share a batch with plain greedy
    ones; the plain ones get exactly their tokens alone, the biased one only its forced token."""
    engine = Engine(model, EngineConfig(max_batch_size=8, max_seq_len=128), eos_token_ids=[2])
    plain = [GenerationRequest(prompt(i, 6), SamplingParams(max_tokens=8, temperature=0)) for i in range(3)]
    alone = [engine.generate([GenerationRequest(r.prompt_ids, r.params)])[0].token_ids for r in plain]
    forced = GenerationRequest(prompt(7, 5), SamplingParams(max_tokens=6, temperature=0, logit_bias={17: 100.0}))
    long = GenerationRequest(prompt(8, 5), SamplingParams(max_tokens=6, temperature=0, min_tokens=6,
                                                           repetition_penalty=1.5, logprobs=True, top_logprobs=3),
                             "lora1")
    outs = engine.generate(plain[:2] + [forced, long] + plain[2:])
    assert [o.token_ids for o in outs[:2] + outs[4:]] == alone
    assert outs[2].token_ids == [17] * 6
    assert len(outs[3].token_ids) == 6 and outs[3].finish_reason == FinishReason.LENGTH
    assert 2 not in outs[3].token_ids and all(lp is not None for lp in outs[3].logprobs)


def test_a_request_without_a_seed_is_set_up_keeping_the_gil():
    """Its seed is drawn without a torch op: on the event loop each op let the GIL go, and beside a busy loader
    or engine the loop waited up to a switch interval to take it back. Unseeded requests still draw apart."""
    from gil_check import lets_the_gil_go
    assert not lets_the_gil_go(lambda: RequestSampler(SamplingParams(temperature=1.0), vocab_size=32))
    seeds = {RequestSampler(SamplingParams(temperature=1.0), vocab_size=32).generator.initial_seed()
             for _ in range(8)}
    assert len(seeds) == 8
