"""The registry with a running engine: model changes go through `call_between_steps` on the engine's
thread while requests of other adapters are decoding, evictions happen between requests, and every
request's tokens equal those it gets alone and greedy decoding with the PEFT model on transformers."""
import asyncio
import random
import threading

import pytest
import torch

from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.registry import AdapterRegistry, tiers

from _fixtures import decoder, decoder_logits, hf_base, hf_logits, input_ids, make_registry, peft_adapter, run

ADAPTERS = {"lora0": ("lora", 0), "lora1": ("lora", 1), "ia3": ("ia3", 0), "adalora": ("adalora", 0),
            "pattern": ("lora_rank_pattern", 0)}
MAX_TOKENS = 6


def _prompt(i: int) -> list[int]:
    return torch.randint(0, 96, (5 + i,), generator=torch.Generator().manual_seed(i)).tolist()


@torch.no_grad()
def _peft_greedy(model, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(MAX_TOKENS):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


async def _generate(registry, engine, name, prompt):
    """One greedy request through the registry's lease and the running engine: its tokens."""
    lease = await registry.acquire(name)
    try:
        request = GenerationRequest(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), lease.model_name)
        return [ev.token_id async for ev in engine.stream(request) if ev.token_id is not None]
    finally:
        registry.release(lease)


@pytest.mark.parametrize("gated", [False, True], ids=["evictions-between-steps", "evictions-beside-steps"])
def test_requests_through_a_running_engine_with_evictions(tmp_path, monkeypatch, gated):
    """With the engine's step gate (as the service builds it) evictions run on the registry's evictor thread,
    holding the gate; the tokens are the same."""
    model = decoder()
    engine = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=64, max_batch_tokens=32, prefill_chunk=16))
    engine.start()
    threads, removers = set(), set()
    remove_all = tiers._remove_all

    def traced_remove_all(model, names):
        removers.add(threading.current_thread().name.split("_")[0])
        if threading.current_thread().name.startswith("adapter-evict"):
            assert engine.gate._lock.locked()          # the evictor holds the gate while it removes
        return remove_all(model, names)
    monkeypatch.setattr(tiers, "_remove_all", traced_remove_all)
    try:
        async def main():
            def engine_call(fn):            # records on which thread each model change runs
                def traced():
                    threads.add(threading.current_thread().name)
                    return fn()
                return engine.call_between_steps(traced)

            registry = AdapterRegistry(model, engine_call, str(tmp_path / "store"),
                                       max_device_adapters=2, max_cpu_adapters=1,
                                       step_gate=engine.gate if gated else None)
            for name, (kind, seed) in ADAPTERS.items():
                adapter = peft_adapter(kind, seed)
                await registry.register_files(name, adapter.config, adapter.weights)

            async def generate(name, prompt):
                return await _generate(registry, engine, name, prompt)

            alone = {name: await generate(name, _prompt(i)) for i, name in enumerate(ADAPTERS)}
            gate = asyncio.Semaphore(2)                 # at most max_device_adapters requests at once

            async def limited(name):
                async with gate:
                    return name, await generate(name, _prompt(list(ADAPTERS).index(name)))

            rng = random.Random(3)
            order = [rng.choice(list(ADAPTERS)) for _ in range(16)]
            together = await asyncio.gather(*(limited(n) for n in order))
            await registry.drain()
            return registry, alone, together

        registry, alone, together = run(main())
    finally:
        engine.stop()
    assert threads == {"engine"}                  # every load (and ungated eviction) ran between engine steps
    # (a load the engine applies in full, not prepared, removes its victims in the same engine call)
    assert ("adapter-evict" in removers) if gated else removers == {"engine"}
    for name, tokens in together:
        assert tokens == alone[name], name
    assert len({tuple(t) for t in alone.values()}) == len(ADAPTERS)      # the adapters really differ
    for i, (name, (kind, seed)) in enumerate(ADAPTERS.items()):
        assert alone[name] == _peft_greedy(peft_adapter(kind, seed).model, _prompt(i)), name
    assert _peft_greedy(hf_base(), _prompt(0)) != alone["lora0"]
    assert registry.tier_counts()["device"] == 2 == len(model.peft_config)
    assert sum(r.requests_served for r in registry.list()) == len(ADAPTERS) + 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tier_on_cuda(tmp_path):
    """On a GPU the device tier lives in GPU memory and the cpu tier keeps its own CPU copy."""
    adapter = peft_adapter("lora")
    model = decoder().to("cuda")
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store", model=model)
        await registry.register_files("a", adapter.config, adapter.weights)
        lease = await registry.acquire("a")
        got = decoder_logits(model, lease.model_name, ids.to("cuda")).cpu()
        assert all(t.device.type == "cpu" for t in registry.get("a").tensors.values())
        assert all(p.device.type == "cuda" for n, p in model.named_parameters() if lease.model_name in n)
        registry.release(lease)
        await registry.delete("a")
        assert not model.peft_config
        return got

    torch.testing.assert_close(run(main()), hf_logits(adapter.model, ids), atol=1e-4, rtol=0)


def test_attach_beside_running_steps_with_evictions(tmp_path):
    """On the CPU a prepared LoRA adapter is attached while the engine steps other requests and evictions
    leave at the next boundary: under a churn of 8 adapters through 3 device slots, every request's tokens
    equal those it gets alone, and most loads took the attach path."""
    names = [f"l{i}" for i in range(8)]
    model = decoder()
    engine = Engine(model, EngineConfig(max_batch_size=4, max_seq_len=64, max_batch_tokens=32, prefill_chunk=16))
    engine.start()
    try:
        async def main():
            registry = AdapterRegistry(model, engine.call_between_steps, str(tmp_path / "store"),
                                       max_device_adapters=3, max_cpu_adapters=1)
            assert registry.single_memory
            for i, name in enumerate(names):
                adapter = peft_adapter("lora", seed=10 + i)
                await registry.register_files(name, adapter.config, adapter.weights)
            applied = []
            registry.events = type("Events", (), {"adapter_applied": lambda self, n, s: applied.append(n)})()

            async def generate(name, prompt):
                return await _generate(registry, engine, name, prompt)

            alone = {name: await generate(name, _prompt(i)) for i, name in enumerate(names)}
            gate = asyncio.Semaphore(3)

            async def limited(name):
                async with gate:
                    return name, await generate(name, _prompt(names.index(name)))

            rng = random.Random(5)
            order = [rng.choice(names) for _ in range(40)]
            together = await asyncio.gather(*(limited(n) for n in order))
            await registry.drain()
            held = sorted(n.rsplit("__", 1)[0] for n in model.peft_config)
            return registry, alone, together, applied, held

        registry, alone, together, applied, held = run(main())
    finally:
        engine.stop()
    for name, tokens in together:
        assert tokens == alone[name], name
    assert len({tuple(t) for t in alone.values()}) == len(names)
    assert held == sorted(r.name for r in registry.list() if r.tier == "device") and len(held) <= 3
    assert len(applied) >= 20                                 # the churn really loaded adapters again and again
