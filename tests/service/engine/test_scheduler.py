"""The scheduler's stall-free cap: while requests decode, a step's prompt tokens are capped at half as many as
decode (at least MIN_PREFILL) or at `prefill_while_decoding`; with nothing decoding a burst of prompts gets
the whole `max_batch_tokens`; a long prompt is chunked either way and every decode keeps its token."""
from collections import deque

from service.engine.request import GenerationRequest, RequestState
from service.engine.sampling import SamplingParams
from service.engine.scheduler import MIN_PREFILL, Scheduler


class Cache:
    def __init__(self, slots):
        self.free = list(range(slots))

    @property
    def free_slots(self):
        return len(self.free)

    def allocate(self):
        return self.free.pop()


def state(prompt_len, decoding=False):
    s = RequestState(GenerationRequest(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8)), 64, 0.0)
    if decoding:
        s.computed = prompt_len                    # its prompt is in the cache: it decodes
    return s


def prompt_tokens(plan):
    return sum(n for s, n in plan if s.prefilling)


def test_burst_without_decodes_gets_the_whole_budget():
    waiting = deque(state(40) for _ in range(20))
    plan = Scheduler(512, 256).schedule([], waiting, Cache(64))
    assert prompt_tokens(plan) == 512 and len(waiting) == 7


def test_decodes_cap_the_prompt_tokens_of_a_step():
    running = [state(5, decoding=True) for _ in range(96)]
    waiting = deque(state(40) for _ in range(20))
    plan = Scheduler(512, 256).schedule(running, waiting, Cache(128))
    assert sum(1 for s, n in plan if not s.prefilling) == 96          # every decode keeps its token
    assert prompt_tokens(plan) == 48                                   # half as many as decode
    plan = Scheduler(512, 256).schedule([state(5, decoding=True) for _ in range(48)],
                                        deque(state(40) for _ in range(5)), Cache(64))
    assert prompt_tokens(plan) == MIN_PREFILL                          # 24 would be below the floor
    few = [state(5, decoding=True) for _ in range(3)]
    plan = Scheduler(512, 256).schedule(few, deque(state(40) for _ in range(5)), Cache(64))
    assert prompt_tokens(plan) == MIN_PREFILL
    fixed = Scheduler(512, 256, prefill_while_decoding=100).schedule(
        [state(5, decoding=True) for _ in range(48)], deque(state(40) for _ in range(5)), Cache(64))
    assert prompt_tokens(fixed) == 100


def test_long_prompt_is_chunked_beside_decodes():
    running = [state(5, decoding=True) for _ in range(8)]
    long = state(300)
    scheduler, cache, waiting = Scheduler(512, 256), Cache(64), deque([long])
    steps = 0
    while long.computed < 300:
        plan = scheduler.schedule(running + ([long] if long.slot is not None else []), waiting, cache)
        for s, n in plan:
            if s is long:
                s.computed += n
        steps += 1
        assert prompt_tokens(plan) <= MIN_PREFILL
    assert steps == -(-300 // MIN_PREFILL)
