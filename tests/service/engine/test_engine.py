"""The engine: batching is invisible in results, scheduling is fair to short requests, sampling is
reproducible, cancellation frees slots, limits give clear errors."""
import asyncio

import pytest
import torch

import adapters_core as ac
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
from service.engine import engine_thread
from service.engine.engine import QueueFullError

from _tiny import prompt, tiny_decoder

ADAPTERS = ["lora0", "lora1", None, "lora2", "lora3", "ia3", "lora0", "__base__"]


@pytest.fixture(scope="module")
def model():
    return tiny_decoder()


def engine(model, **kw):
    cfg = dict(max_batch_size=8, max_seq_len=128, max_batch_tokens=48, prefill_chunk=16)
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg))


def greedy_requests(max_tokens=12):
    return [GenerationRequest(prompt(i, 5 + 4 * i), SamplingParams(max_tokens=max_tokens, temperature=0), a)
            for i, a in enumerate(ADAPTERS)]


def test_concurrent_greedy_requests_equal_one_at_a_time(model):
    eng = engine(model)
    together = eng.generate(greedy_requests())
    alone = [eng.generate([r])[0] for r in greedy_requests()]
    for t, a in zip(together, alone):
        assert t.token_ids == a.token_ids and len(t.token_ids) == 12
    # the adapters really change the continuations (otherwise equality would prove nothing)
    assert len({tuple(t.token_ids) for t in together[:6]}) == 6


def test_generation_matches_plain_forward_greedy(model):
    """Engine tokens equal argmax decoding with the plain full-sequence forward under mixed_batch."""
    eng = engine(model)
    for req in greedy_requests(max_tokens=6)[:3]:
        out = eng.generate([req])[0]
        ids = list(req.prompt_ids)
        name = req.adapter or "__base__"
        with torch.inference_mode():
            for _ in range(6):
                with ac.mixed_batch(model, [name]):
                    logits = model(torch.tensor([ids]))[0, -1]
                ids.append(int(logits.argmax()))
        assert out.token_ids == ids[len(req.prompt_ids):]


def test_batched_greedy_argmax_equals_per_request_sampling(model):
    """Plain greedy requests take one batched argmax per step; a greedy request asking for logprobs goes
    through its own sampler: both give the same tokens for the same prompt and adapter."""
    eng = engine(model)
    reqs = [GenerationRequest(prompt(i % 3, 7), SamplingParams(max_tokens=10, temperature=0, logprobs=i >= 3),
                              ADAPTERS[i % 3]) for i in range(6)]
    assert [r.params.logprobs for r in reqs] == [False] * 3 + [True] * 3
    outs = eng.generate(reqs)
    for plain, with_logprobs in zip(outs[:3], outs[3:]):
        assert plain.token_ids == with_logprobs.token_ids and len(plain.token_ids) == 10
        assert all(lp is not None and lp <= 0 for lp in with_logprobs.logprobs)


def test_chunked_prefill_does_not_change_results(model):
    long_prompt = prompt(42, 70)
    outs = []
    for chunk in (8, 16, 128):
        eng = engine(model, prefill_chunk=chunk, max_batch_tokens=128)
        outs.append(eng.generate([GenerationRequest(long_prompt, SamplingParams(max_tokens=8, temperature=0),
                                                    "lora1")])[0].token_ids)
    assert outs[0] == outs[1] == outs[2]


def test_short_request_submitted_during_long_one_finishes_first(model):
    eng = engine(model)
    long = GenerationRequest(prompt(1, 10), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), "lora0")
    eng.submit(long)
    for _ in range(5):
        eng.step()
    short = GenerationRequest(prompt(2, 6), SamplingParams(max_tokens=3, temperature=0), "lora1")
    eng.submit(short)
    finished_order = []
    while eng.has_work():
        finished_order += [s.request.request_id for s in eng.step()]
    assert finished_order == [short.request_id, long.request_id]


def test_same_seed_same_tokens_different_seed_differs(model):
    def run(seed, companions):
        eng = engine(model)
        reqs = [GenerationRequest(prompt(3, 8), SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40,
                                                               seed=seed), "lora2")]
        reqs += [GenerationRequest(prompt(10 + i, 7), SamplingParams(max_tokens=5, temperature=1.0), "ia3")
                 for i in range(companions)]
        return eng.generate(reqs)[0].token_ids
    assert run(7, 0) == run(7, 3)
    assert run(7, 0) != run(8, 0)


def test_stop_token_ends_generation_without_emitting_it(model):
    eng = engine(model)
    req = greedy_requests(max_tokens=12)[0]
    free = eng.generate([req])[0].token_ids
    stop_at = free[4]
    req2 = GenerationRequest(req.prompt_ids, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]),
                             req.adapter)
    out = eng.generate([req2])[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == free[:free.index(stop_at)]


def test_cancel_frees_the_slot_at_the_next_step(model):
    eng = engine(model, max_batch_size=2)
    reqs = [GenerationRequest(prompt(i, 6), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), "lora0")
            for i in range(2)]
    for r in reqs:
        eng.submit(r)
    eng.step()
    assert eng.cache.free_slots == 0
    eng.cancel(reqs[0].request_id)
    eng.step()
    assert eng.cache.free_slots == 1 and eng.num_running == 1


def test_limits_are_clear_errors(model):
    eng = engine(model, max_seq_len=32, max_waiting=2)
    with pytest.raises(ValueError, match="context limit of 32"):
        eng.submit(GenerationRequest(prompt(0, 30), SamplingParams(max_tokens=5)))
    with pytest.raises(ac.UnknownAdapterError, match="nope"):
        eng.submit(GenerationRequest(prompt(0, 3), SamplingParams(max_tokens=2), "nope"))
    with pytest.raises(ValueError, match="empty"):
        eng.submit(GenerationRequest([], SamplingParams(max_tokens=2)))
    for i in range(2):
        eng.submit(GenerationRequest(prompt(i, 3), SamplingParams(max_tokens=2)))
    with pytest.raises(QueueFullError):
        eng.submit(GenerationRequest(prompt(9, 3), SamplingParams(max_tokens=2)))


def test_stream_yields_tokens_and_background_loop_serves_many(model):
    eng = engine(model)
    eng.start()
    try:
        async def collect(req):
            return [ev async for ev in eng.stream(req)]

        async def main():
            return await asyncio.gather(*(collect(r) for r in greedy_requests(max_tokens=5)))
        streams = asyncio.run(main())
    finally:
        eng.stop()
    expected = engine(model).generate(greedy_requests(max_tokens=5))
    for events, out in zip(streams, expected):
        assert [e.token_id for e in events if e.token_id is not None] == out.token_ids
        assert events[-1].finish_reason == FinishReason.LENGTH


def test_events_reach_the_loop_in_batches_in_order_and_not_once_it_is_closed():
    """`LoopInbox`: events handed over before the loop drains share one `call_soon_threadsafe` (a self-pipe
    write, which lets the GIL go), not one each; each queue gets its events in order; once the loop is closed,
    handing one over raises (the engine then cancels that request)."""
    loop = asyncio.new_event_loop()
    wake_ups, wake = [], loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a, **kw: wake_ups.append(a[0]) or wake(*a, **kw)
    inbox = engine_thread.LoopInbox(loop)
    first, second = asyncio.Queue(), asyncio.Queue()
    for i in range(10):
        inbox.put(first if i % 2 else second, i)
    assert len(wake_ups) == 1
    loop.run_until_complete(asyncio.sleep(0))                     # the loop drains
    inbox.put(first, 10)
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wake_ups) == 2
    assert [first.get_nowait() for _ in range(first.qsize())] == [1, 3, 5, 7, 9, 10]
    assert [second.get_nowait() for _ in range(second.qsize())] == [0, 2, 4, 6, 8]
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        inbox.put(first, 11)


def test_cancelled_stream_frees_its_slot(model):
    eng = engine(model, max_batch_size=2)
    eng.start()
    try:
        async def main():
            req = GenerationRequest(prompt(5, 6), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
            agen = eng.stream(req)
            await agen.__anext__()
            await agen.aclose()          # the client goes away
            for _ in range(200):
                if eng.cache.free_slots == 2:
                    return True
                await asyncio.sleep(0.01)
            return False
        assert asyncio.run(main())
    finally:
        eng.stop()


def test_adapter_on_lm_head_applies_per_request():
    """The head runs under the batch's adapter mapping when an adapter wraps it (and without one otherwise)."""
    model = tiny_decoder(adapters=False)
    ac.inject_adapter_in_model(ac.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                             init_lora_weights=False), model, "head")
    model.eval()
    eng = engine(model)
    requests = [GenerationRequest(prompt(i, 6), SamplingParams(max_tokens=5, temperature=0), a)
                for i, a in enumerate(["head", None, "head"])]
    together = eng.generate(requests)
    for req, out in zip(requests, together):
        ids = list(req.prompt_ids)
        with torch.inference_mode():
            for _ in range(5):
                with ac.mixed_batch(model, [req.adapter or "__base__"]):
                    ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out.token_ids == ids[len(req.prompt_ids):]
    with torch.inference_mode(), ac.mixed_batch(model, ["head", "__base__"]):
        hidden = torch.randn(2, 64)
        logits = model.lm_head(hidden)
        base = model.lm_head.base_layer(hidden)
    assert not torch.allclose(logits[0], base[0])
    assert torch.equal(logits[1], base[1])
