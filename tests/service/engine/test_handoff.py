"""The engine thread waits, after a step, for the event loop to take that step's tokens (`HandOff`,
`EngineConfig.handoff_wait_s`, the `HANDOFF_WAIT_MS` setting), and never longer than its bound."""
import asyncio
import threading
import time

import pytest
import torch

from service.app import handoff_wait_s
from service.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from service.engine.engine_thread import HandOff
from service.settings import Settings

from _tiny import prompt, tiny_decoder


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(adapters=False)


def produced_when_consumed(model, wait_s: float, block_s: float, tokens: int = 5) -> list[int]:
    """For each token event, how many tokens the engine had produced for the request when the consumer (which
    blocks the loop `block_s` seconds on every event) got to it."""
    eng = Engine(model, EngineConfig(max_batch_size=2, max_seq_len=64, handoff_wait_s=wait_s))
    eng.start()
    try:
        async def main():
            req = GenerationRequest(prompt(1, 6), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
            seen = []
            async for event in eng.stream(req):
                if event.token_id is None:
                    continue
                state = next((s for s in list(eng.running) if s.request is req), None)
                seen.append(len(state.output_ids) if state is not None else tokens)
                time.sleep(block_s)              # the loop busy with this token (detokenising, writing...)
            return seen
        return asyncio.run(main())
    finally:
        eng.stop()


def test_the_next_step_waits_until_the_loop_took_this_steps_token(model):
    # each event reaches its consumer before the engine starts the step after the one that made it
    assert produced_when_consumed(model, wait_s=30.0, block_s=0.05) == [1, 2, 3, 4, 5]


def test_without_the_wait_the_engine_runs_ahead_of_a_busy_loop(model):
    seen = produced_when_consumed(model, wait_s=0.0, block_s=0.05)
    assert any(n > i + 1 for i, n in enumerate(seen)), seen


def test_the_wait_is_bounded(model):
    # a loop busy for 0.3 s a token does not hold the engine: with a 10 ms bound it runs ahead
    seen = produced_when_consumed(model, wait_s=0.01, block_s=0.3, tokens=4)
    assert seen[1] > 2, seen                 # (its first token was read before the loop blocked)


def test_handoff_waits_for_every_batch_then_forgets_them():
    handoff, first, second = HandOff(), threading.Event(), threading.Event()
    handoff.track(first)
    handoff.track(first)                       # the same batch twice: one entry
    handoff.track(second)
    threading.Timer(0.05, first.set).start()
    threading.Timer(0.1, second.set).start()
    started = time.monotonic()
    assert handoff.wait(10.0)
    assert 0.09 < time.monotonic() - started < 5.0
    never = threading.Event()                  # a batch whose loop closed before draining it
    handoff.track(never)
    started = time.monotonic()
    assert not handoff.wait(0.05)
    assert time.monotonic() - started < 1.0
    assert handoff.wait(0.05)                  # forgotten: the next step does not wait for it again


def test_handoff_wait_setting():
    assert Settings(handoff_wait_ms=None).handoff_wait_ms is None
    assert handoff_wait_s(None, torch.device("cpu")) == 0.01
    assert handoff_wait_s(None, torch.device("cuda")) == 0.0
    assert handoff_wait_s(2.5, torch.device("cpu")) == 0.0025
    assert handoff_wait_s(0, torch.device("cpu")) == 0.0
    with pytest.raises(ValueError, match="handoff_wait_ms"):
        Settings(handoff_wait_ms=-1)
