"""Fault isolation in the engine: a request whose rows go wrong (an adapter with NaN or inf weights, an
exception in its part of the forward or in its sampling) finishes alone with `FinishReason.ERROR` and an
error message, and every other request of the same batches gives exactly its reference tokens."""
import asyncio

import pytest
import torch

import adapters_core as ac
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from service.engine.sampling import RequestSampler

from _tiny import prompt, tiny_decoder

GOOD = ["lora0", "lora1", None, "ia3", "lora2"]
POISON = 95                                      # a token id only the faulty request's prompt holds


@pytest.fixture(scope="module")
def model():
    model = tiny_decoder()
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        ac.inject_adapter_in_model(ac.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False), model, name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    p.fill_(value)
    return model.eval()


def engine(model):
    return Engine(model, EngineConfig(max_batch_size=8, max_seq_len=96, max_batch_tokens=64, prefill_chunk=16))


def clean_prompt(i: int, length: int) -> list[int]:
    return [t for t in prompt(i, length) if t != POISON] or [1]


def good_requests():
    """Greedy and seeded sampled requests on good adapters (ids differ per call)."""
    out = []
    for i, adapter in enumerate(GOOD):
        params = (SamplingParams(max_tokens=10, temperature=0) if i % 2 == 0
                  else SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=100 + i))
        out.append(GenerationRequest(clean_prompt(i, 6 + 3 * i), params, adapter))
    return out


def reference(model):
    return [o.token_ids for o in engine(model).generate(good_requests())]


def check(outputs, ref):
    assert [o.token_ids for o in outputs] == ref
    assert all(o.finish_reason == FinishReason.LENGTH for o in outputs)


def test_nan_and_inf_adapters_fail_alone(model):
    ref = reference(model)
    eng = engine(model)
    bad = [GenerationRequest(clean_prompt(50 + i, 7), SamplingParams(max_tokens=10, temperature=t), a)
           for i, (a, t) in enumerate([("nan", 0), ("nan", 1.0), ("inf", 0), ("inf", 0.7)])]
    good = good_requests()
    mixed = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4]]
    states = {}
    for r in mixed:
        eng.submit(r, lambda ev, rid=r.request_id: states.setdefault(rid, []).append(ev))
    while eng.has_work():
        eng.step()
    for r in bad:                 # greedy ones too: never empty text that looks like success
        last = states[r.request_id][-1]
        assert last.finish_reason == FinishReason.ERROR and "non-finite logits" in last.error, last
        assert r.adapter in last.error
    for r, tokens in zip(good, ref):
        events = states[r.request_id]
        assert [e.token_id for e in events if e.token_id is not None] == tokens
        assert events[-1].finish_reason == FinishReason.LENGTH
    assert eng.cache.free_slots == eng.cache.num_slots
    # the failed requests' cache slots were cleared and are reused: later requests are still exact
    check(eng.generate(good_requests()), ref)


def test_exception_in_one_requests_forward_fails_only_it(model, monkeypatch):
    ref = reference(model)
    forward = model.forward_step

    def faulty(tokens, positions, plan, cache):
        if bool((tokens == POISON).any()):
            raise RuntimeError("kernel fault on the poisoned rows")
        return forward(tokens, positions, plan, cache)

    monkeypatch.setattr(model, "forward_step", faulty)
    eng = engine(model)
    poisoned = GenerationRequest(clean_prompt(60, 9) + [POISON], SamplingParams(max_tokens=10, temperature=0), "lora3")
    good = good_requests()
    outs = eng.generate(good[:2] + [poisoned] + good[2:])
    assert outs[2].finish_reason == FinishReason.ERROR and outs[2].token_ids == []
    check(outs[:2] + outs[3:], ref)
    check(eng.generate(good_requests()), ref)


def test_exception_in_one_requests_sampling_fails_only_it(model, monkeypatch):
    ref = reference(model)
    sample = RequestSampler.sample

    def faulty(self, logits):
        if self.params.seed == 666 and self.counts is not None:
            raise FloatingPointError("sampler fault")
        return sample(self, logits)

    monkeypatch.setattr(RequestSampler, "sample", faulty)
    eng = engine(model)
    doomed = GenerationRequest(clean_prompt(61, 8), SamplingParams(max_tokens=10, temperature=1.0, seed=666,
                                                                   presence_penalty=0.5), "lora1")
    good = good_requests()
    outs = eng.generate([doomed] + good)
    assert outs[0].finish_reason == FinishReason.ERROR
    check(outs[1:], ref)


def test_stream_of_a_failing_request_ends_with_error_others_continue(model):
    ref = reference(model)
    eng = engine(model)
    eng.start()

    async def run():
        async def collect(request):
            return [ev async for ev in eng.stream(request)]
        bad = GenerationRequest(clean_prompt(70, 5), SamplingParams(max_tokens=10, temperature=1.0), "nan")
        return await asyncio.wait_for(asyncio.gather(collect(bad), *(collect(r) for r in good_requests())), 30)

    try:
        bad_events, *good_events = asyncio.run(run())
    finally:
        eng.stop()
    assert bad_events[-1].finish_reason == FinishReason.ERROR and bad_events[-1].error
    assert [[e.token_id for e in evs if e.token_id is not None] for evs in good_events] == ref


def test_listeners_hear_cancellations_and_idle_ticks(model):
    eng = engine(model)
    seen = []
    eng.step_listeners.append(lambda stats: seen.append((stats.sequences, eng.num_running, eng.num_waiting)))
    reqs = good_requests()
    for r in reqs:
        eng.submit(r)
    eng.step()
    assert seen[-1][1] == len(reqs)
    for r in reqs:
        eng.cancel(r.request_id)
    eng.step()                      # only cancels: nothing left to run, still reported
    assert seen[-1] == (0, 0, 0)
    seen.clear()
    eng.start()
    try:
        deadline = asyncio.run(asyncio.sleep(1.2))
    finally:
        eng.stop()
    assert deadline is None and seen and all(s == (0, 0, 0) for s in seen)   # idle ticks
